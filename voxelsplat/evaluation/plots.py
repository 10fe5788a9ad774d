"""Pictures of a multi-seed experiment (``tools/run_experiment.py``): learning curves, per-class
bars and the paired differences with their intervals. Each function writes one PNG and returns
its path; nothing is written when it fails (:func:`voxelsplat.utils.io.atomic_write`).

Inputs are plain data, so the pictures can be redrawn from ``experiment.json``:

- learning curves: ``{model: [per seed: [(iteration, value), ...]]}``;
- per class: ``{model: {class name: [per-seed values]}}``;
- paired differences: ``{variant: {metric: PairedBootstrapResult or {"difference", "interval"}}}``.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

from voxelsplat.utils.io import atomic_write, read_json_lines

logger = logging.getLogger(__name__)

__all__ = ["curve_band", "plot_learning_curves", "plot_per_class", "plot_paired_differences", "read_eval_curves"]

Curve = Sequence[Tuple[float, float]]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _figure(width: float, height: float):
    plt = _pyplot()
    return plt, plt.subplots(figsize=(width, height), dpi=110)


def _save(plt, figure, path: str) -> str:
    try:
        figure.tight_layout()
        with atomic_write(path, "wb", suffix=".png") as f:
            figure.savefig(f, format="png")
    finally:
        plt.close(figure)
    return path


def curve_band(curves: Sequence[Curve]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean and band over seeds of per-seed curves, at the iterations every seed evaluated.

    Args:
        curves: per seed, ``(iteration, value)`` pairs (any order; NaN values are skipped).
    Returns:
        ``(iterations, mean, low, high)``: the common iterations in increasing order, the
        mean over seeds and the lowest / highest seed at each.
    Raises:
        ValueError: no curves, or no iteration that every seed evaluated.
    """
    if not curves:
        raise ValueError("curve_band: no curves")
    per_seed = [{float(i): float(v) for i, v in curve if not math.isnan(float(v))} for curve in curves]
    common = sorted(set.intersection(*(set(c) for c in per_seed)))
    if not common:
        raise ValueError(f"curve_band: the {len(curves)} curves share no evaluated iteration")
    values = np.array([[c[i] for i in common] for c in per_seed])
    return np.array(common), values.mean(0), values.min(0), values.max(0)


def plot_learning_curves(curves: Mapping[str, Sequence[Curve]], metric: str, path: str,
                         floors: Mapping[str, float] = ()) -> str:
    """One line per model (mean over seeds) with its band (lowest to highest seed) of
    ``metric`` on the validation split against the training iteration; floors as dashed
    horizontal lines. Models without a shared iteration are left out."""
    plt, (figure, axes) = _figure(6.4, 4.0)
    for index, (model, seeds) in enumerate(curves.items()):
        try:
            iterations, mean, low, high = curve_band(seeds)
        except ValueError:
            continue
        colour = f"C{index}"
        axes.plot(iterations, mean, marker="o", color=colour, label=f"{model} ({len(seeds)} seeds)")
        if len(seeds) > 1:
            axes.fill_between(iterations, low, high, color=colour, alpha=0.2)
    for index, (name, value) in enumerate(dict(floors).items()):
        if value is not None and not math.isnan(float(value)):
            axes.axhline(float(value), linestyle="--", color=f"C{index + 5}", linewidth=1, label=name)
    axes.set_xlabel("iteration")
    axes.set_ylabel(f"{metric} (validation)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return _save(plt, figure, path)


def plot_per_class(values: Mapping[str, Mapping[str, Sequence[float]]], class_names: Sequence[str], path: str,
                   metric: str = "RayIoU") -> str:
    """Grouped bars: per class, one bar per model at the mean over seeds, with a line from the
    lowest to the highest seed."""
    models = list(values)
    plt, (figure, axes) = _figure(max(6.4, 0.55 * len(class_names) * max(1, len(models)) / 1.5), 4.2)
    width = 0.8 / max(1, len(models))
    x = np.arange(len(class_names))
    for index, model in enumerate(models):
        per_class: List[List[float]] = [[v for v in values[model].get(name, []) if not math.isnan(float(v))]
                                        for name in class_names]
        means = np.array([np.mean(v) if v else np.nan for v in per_class])
        low = np.array([min(v) if v else np.nan for v in per_class])
        high = np.array([max(v) if v else np.nan for v in per_class])
        offset = x - 0.4 + width * (index + 0.5)
        axes.bar(offset, np.nan_to_num(means), width, color=f"C{index}", label=model)
        axes.vlines(offset, low, high, color="black", linewidth=1)
    axes.set_xticks(x)
    axes.set_xticklabels(class_names, rotation=60, ha="right", fontsize=7)
    axes.set_ylabel(f"{metric} per class (validation)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7)
    return _save(plt, figure, path)


def _interval_of(result) -> Tuple[float, float, float]:
    if isinstance(result, Mapping):
        low, high = result["interval"]
        return float(result["difference"]), float(low), float(high)
    return float(result.difference), float(result.interval[0]), float(result.interval[1])


def plot_paired_differences(comparisons: Mapping[str, Mapping[str, object]], path: str) -> str:
    """One panel per metric: each variant's paired difference to the baseline (point) with its
    interval (line), and the zero line: an interval across it is "no effect detected"."""
    metrics: List[str] = []
    for results in comparisons.values():
        metrics += [m for m in results if m not in metrics]
    if not metrics:
        raise ValueError("plot_paired_differences: no comparisons")
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.4), dpi=110, squeeze=False)
    variants = list(comparisons)
    for column, metric in enumerate(metrics):
        ax = axes[0, column]
        for row, variant in enumerate(variants):
            if metric not in comparisons[variant]:
                continue
            difference, low, high = _interval_of(comparisons[variant][metric])
            ax.plot([low, high], [row, row], color=f"C{row + 1}", linewidth=2)
            ax.plot([difference], [row], marker="o", color=f"C{row + 1}")
        ax.axvline(0.0, color="black", linewidth=1)
        ax.set_title(metric, fontsize=9)
        ax.set_yticks(range(len(variants)))
        ax.set_yticklabels(variants if column == 0 else [""] * len(variants), fontsize=7)
        ax.set_ylim(-0.5, len(variants) - 0.5)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
    figure.suptitle("variant - baseline, 95% paired bootstrap interval", fontsize=9)
    return _save(plt, figure, path)


def read_eval_curves(metrics_json: str, keys: Sequence[str]) -> Dict[str, List[Tuple[int, float]]]:
    """``{key: [(iteration, value), ...]}`` of the evaluations a training run wrote to its
    ``metrics.json`` (lines with ``occupancy/<key>``). A line cut by a killed run is skipped
    (:func:`voxelsplat.utils.io.read_json_lines`) and an empty file gives empty curves, each with
    a warning naming the file."""
    curves: Dict[str, List[Tuple[int, float]]] = {key: [] for key in keys}
    records = read_json_lines(metrics_json)
    if not records:
        logger.warning("%s holds no records (a run stopped before its first log); no curves from it", metrics_json)
    for record in records:
        if not isinstance(record, dict):
            continue
        for key in keys:
            value = record.get(f"occupancy/{key}")
            if value is not None:
                curves[key].append((int(record.get("iteration", 0)), float(value)))
    return curves
