"""Statistics of a paired benchmark experiment: a paired bootstrap of pooled ray metrics,
the gate a baseline must pass before any comparison is reported, and their markdown.

The experiment: a baseline and one or more variants trained with the same S seeds (per
seed the same initialisation and data order for every model) and evaluated on the same F
validation frames. What is compared is a *pooled* metric: RayIoU adds up the TP / GT /
Pred ray counts of the frames and only then divides and averages over classes, mAVE adds
up per-class error sums and counts (see :mod:`voxelsplat.evaluation.ray_metrics`). The
mean of per-frame RayIoUs is a different number; everything here pools the per-frame
:class:`~voxelsplat.evaluation.ray_metrics.SampleStats`, as :func:`summarize` of
``SampleStats.total(...)`` does.

Definitions used by :func:`paired_bootstrap`:

- Per-seed value: ``M(model, s)`` = the metric of ``SampleStats.total`` of seed s's F
  frames (what the evaluator reports for that run).
- Point estimate: ``difference = mean_s [M(variant, s) - M(baseline, s)]``, the mean over
  seeds of the per-seed differences (NaN-ignoring) - the difference of the per-seed means
  that ``tools/run_experiment.py`` reports. Counts are not pooled across seeds: every seed
  is a separate training run and weighs the same.
- Resampling (one resample): S seed indices drawn with replacement and F frame indices
  drawn with replacement, independently of each other; every drawn seed is pooled over the
  SAME drawn frames, and the baseline and the variant get the same draw (paired). The
  resample's statistic is ``sum_s n_s [M*(variant, s) - M*(baseline, s)] / sum_s n_s``,
  where ``n_s`` is how often seed s was drawn and ``M*`` the metric pooled over the drawn
  frames (a frame drawn k times counts k times).
- Interval: the percentile interval of the resample statistics, ``numpy.quantile`` with
  its default (linear) interpolation at ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``.

Why the frame draw is shared by the seeds (a crossed, "pigeonhole" bootstrap) rather than
drawn again inside each drawn seed (nested): seeds and frames are crossed factors - every
seed is evaluated on the same frames, and a frame that is hard (a rare class, a far
object) is hard for every seed. The question the interval answers is whether the
difference would hold for other seeds *and* other frames of the same kind. Drawing frames
independently per seed would average the frame-sampling noise over the S seeds and shrink
it about S-fold, as though each seed had its own validation set; sharing one frame draw
keeps the frame noise that every seed's number carries. The crossed bootstrap is, if
anything, slightly conservative (it counts the seed x frame interaction twice), the safe
side for a claim. Pairing cancels what the two models share (hard frames, lucky seeds).

Per-frame counts travel between the evaluator and the experiment script as one ``.npz``
per evaluation (:data:`SAMPLE_STATS_FILE`, :func:`sample_stats_to_arrays`,
:func:`sample_stats_from_arrays`).

Caveats: with S = 5 seeds the seed-level bootstrap sees few distinct seed sets and a
percentile interval is about ``sqrt((S - 1) / S)`` too narrow for the seed term; a pooled
ratio metric is nonlinear, so the resample distribution need not be centred on the point
estimate. Intervals are per comparison, not corrected for comparing several variants or
metrics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .ray_metrics import MAVE_THRESHOLD, RAY_IOU_THRESHOLDS, SampleStats, summarize

__all__ = [
    "NO_EFFECT",
    "VARIANT_BETTER",
    "VARIANT_WORSE",
    "UNDEFINED",
    "PairedBootstrapResult",
    "GateCriterion",
    "GateResult",
    "SAMPLE_STATS_FILE",
    "higher_is_better",
    "sample_stats_to_arrays",
    "sample_stats_from_arrays",
    "paired_bootstrap",
    "benchmark_gate",
    "format_markdown",
]

NO_EFFECT = "no effect detected"
VARIANT_BETTER = "variant better"
VARIANT_WORSE = "variant worse"
UNDEFINED = "undefined"  # the metric is NaN in every resample (e.g. a class absent from every frame)

# the SampleStats count arrays, in the order they are laid out for pooling
_RAY_FIELDS = ("tp", "gt", "pred")
_FLOW_FIELDS = ("flow_all_error_sum", "flow_all_count")
_FLOW_TP_FIELDS = ("flow_error_sum", "flow_tp")

# per-frame counts of one evaluation, beside occupancy_results.json (see sample_stats_to_arrays)
SAMPLE_STATS_FILE = "occupancy_sample_stats.npz"
_COUNT_FIELDS = ("tp", "gt", "pred", "flow_error_sum", "flow_tp", "flow_all_error_sum", "flow_all_count")

# pooled counts of (resamples, seeds) at a time are held in memory in blocks of about this size
_BLOCK_BYTES = 64 * 2 ** 20

FrameStats = Union[Sequence[SampleStats], Mapping[str, SampleStats]]


@dataclass(frozen=True)
class PairedBootstrapResult:
    """The paired comparison of one metric (variant - baseline).

    Attributes:
        metric: the :func:`summarize` key (``"RayIoU"``, ``"RayIoU@1"``, ``"mAVE"``, ...).
        higher_is_better: the metric's direction (False for ``mAVE*`` and ``AVE*``).
        baseline, variant: each model's mean over seeds of its per-seed pooled metric
            (NaN-ignoring), in the metric's units (percent for RayIoU, m/s for mAVE).
        difference: the point estimate, ``mean_s [M(variant, s) - M(baseline, s)]``.
        interval: ``(low, high)`` percentile interval of the resample statistics.
        confidence: the interval's nominal coverage (0.95).
        num_resamples: the number of resamples drawn.
        num_undefined: resamples whose statistic is NaN (left out of the interval).
        verdict: ``"no effect detected"`` when the interval contains 0, else ``"variant
            better"`` / ``"variant worse"`` by the metric's direction; ``"undefined"`` when
            no resample is defined.
        num_seeds, num_frames: S and F.
        samples: (num_resamples,) float64 resample statistics, in draw order.
    """

    metric: str
    higher_is_better: bool
    baseline: float
    variant: float
    difference: float
    interval: Tuple[float, float]
    confidence: float
    num_resamples: int
    num_undefined: int
    verdict: str
    num_seeds: int
    num_frames: int
    samples: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class GateCriterion:
    """One criterion of :func:`benchmark_gate`.

    ``value`` is compared with ``threshold`` (the comparison is in ``reason``); ``per_seed``
    holds the per-seed values behind ``value`` when there are any."""

    name: str
    value: float
    threshold: float
    passed: bool
    reason: str
    per_seed: Tuple[float, ...] = ()


@dataclass(frozen=True)
class GateResult:
    """Outcome of :func:`benchmark_gate`: ``passed`` when every criterion passed."""

    passed: bool
    criteria: Dict[str, GateCriterion]

    @property
    def failed(self) -> List[str]:
        return [name for name, criterion in self.criteria.items() if not criterion.passed]


def higher_is_better(metric: str) -> bool:
    """The direction of a :func:`summarize` key: False for flow errors (``mAVE``,
    ``mAVE_TP``, ``AVE/<class>``, ``AVE_TP/<class>``), True otherwise (RayIoU, OccScore,
    mIoU, IoU)."""
    return not (metric.startswith("mAVE") or metric.startswith("AVE"))


# ---------------------------------------------------------------------------------- counts


def sample_stats_to_arrays(stats: Mapping[str, SampleStats]) -> Dict[str, np.ndarray]:
    """Per-frame counts as arrays for ``numpy.savez`` (no pickling), frames in token order.

    Args:
        stats: ``sample_token -> SampleStats`` of single frames (the evaluator's ``_stats``).
    Returns:
        ``sample_token`` (F,) str, ``tp`` (F, T, C) int64, ``gt``, ``pred``, ``flow_tp``,
        ``flow_all_count`` (F, C) int64, ``flow_error_sum``, ``flow_all_error_sum`` (F, C)
        float64, and ``confusion`` (F, C, C) int64 when every frame has one.
    """
    if not stats:
        raise ValueError("sample_stats_to_arrays: no frames")
    tokens = sorted(stats)
    arrays = {"sample_token": np.array(tokens, dtype=str)}
    for name in _COUNT_FIELDS:
        shapes = {np.shape(getattr(stats[t], name)) for t in tokens}
        if len(shapes) != 1:
            raise ValueError(f"sample_stats_to_arrays: {name} has different shapes across frames: {sorted(shapes)}")
        arrays[name] = np.stack([getattr(stats[t], name) for t in tokens])
    if all(stats[t].confusion is not None for t in tokens):
        arrays["confusion"] = np.stack([stats[t].confusion for t in tokens])
    return arrays


def sample_stats_from_arrays(arrays: Mapping[str, np.ndarray]) -> Dict[str, SampleStats]:
    """Inverse of :func:`sample_stats_to_arrays` (e.g. of ``numpy.load`` of the saved file):
    ``sample_token -> SampleStats``, in token order."""
    missing = [k for k in ("sample_token",) + _COUNT_FIELDS if k not in arrays]
    if missing:
        raise KeyError(f"sample_stats_from_arrays: missing {missing} (expected the keys of sample_stats_to_arrays)")
    tokens = [str(t) for t in np.asarray(arrays["sample_token"])]
    values = {name: np.asarray(arrays[name]) for name in _COUNT_FIELDS}
    confusion = np.asarray(arrays["confusion"]) if "confusion" in arrays else None
    for name, value in dict(values, **({"confusion": confusion} if confusion is not None else {})).items():
        if len(value) != len(tokens):
            raise ValueError(f"sample_stats_from_arrays: {name} holds {len(value)} frames, sample_token {len(tokens)}")
    return {token: SampleStats(**{name: values[name][i].copy() for name in _COUNT_FIELDS},
                               confusion=None if confusion is None else confusion[i].copy(), num_samples=1)
            for i, token in enumerate(tokens)}



def _frames_of_seed(frames: FrameStats, where: str) -> Tuple[Optional[List[str]], List[SampleStats]]:
    if isinstance(frames, Mapping):
        tokens = sorted(frames)
        return tokens, [frames[token] for token in tokens]
    if isinstance(frames, SampleStats):
        raise TypeError(f"{where}: expected the per-frame SampleStats of the seed (a list or a token -> "
                        "SampleStats mapping), got one SampleStats")
    return None, list(frames)


def _stack(model: Sequence[FrameStats], fields: Sequence[str], shapes: Dict[str, Tuple[int, ...]],
           where: str) -> Tuple[Optional[List[str]], Dict[str, np.ndarray]]:
    """Per-frame counts of one model as float64 arrays (S, F, *shapes[field])."""
    if isinstance(model, (SampleStats, Mapping)) or not len(model):
        raise ValueError(f"{where}: expected a non-empty list over seeds of per-frame SampleStats")
    tokens: Optional[List[str]] = None
    per_seed: List[List[SampleStats]] = []
    for s, frames in enumerate(model):
        seed_tokens, stats = _frames_of_seed(frames, f"{where} seed #{s}")
        if not stats:
            raise ValueError(f"{where} seed #{s}: no frames")
        if s == 0:
            tokens = seed_tokens
        elif (seed_tokens is None) != (tokens is None):
            raise ValueError(f"{where} seed #{s}: every seed must give its frames the same way (all lists or all "
                             "token mappings)")
        elif tokens is not None and seed_tokens != tokens:
            missing, extra = sorted(set(tokens) - set(seed_tokens)), sorted(set(seed_tokens) - set(tokens))
            raise ValueError(f"{where} seed #{s}: frames differ from seed #0 (missing {missing[:5]}, extra "
                             f"{extra[:5]})")
        if per_seed and len(stats) != len(per_seed[0]):
            raise ValueError(f"{where} seed #{s}: {len(stats)} frames, seed #0 has {len(per_seed[0])}; every seed "
                             "must be evaluated on the same frames")
        for f, item in enumerate(stats):
            if not isinstance(item, SampleStats):
                raise TypeError(f"{where} seed #{s} frame #{f}: expected SampleStats, got {type(item).__name__}")
            for name in fields:
                value = getattr(item, name)
                if value is None:
                    raise ValueError(f"{where} seed #{s} frame #{f}: no {name} (the Occ3D confusion matrix is needed "
                                     "for mIoU / IoU)")
                if np.shape(value) != shapes[name]:
                    raise ValueError(f"{where} seed #{s} frame #{f}: {name} has shape {np.shape(value)}, expected "
                                     f"{shapes[name]} (the class names and thresholds given)")
        per_seed.append(stats)
    arrays = {name: np.stack([np.stack([np.asarray(getattr(item, name), np.float64) for item in stats])
                              for stats in per_seed]) for name in fields}
    return tokens, arrays


def _pool(arrays: Dict[str, np.ndarray], frame_weights: np.ndarray) -> Dict[str, np.ndarray]:
    """Counts pooled over the frames with integer weights.

    arrays: field -> (S, F, *shape); frame_weights: (B, F). Returns field -> (B, S, *shape)."""
    num_seeds, num_frames = next(iter(arrays.values())).shape[:2]
    flat = [a.reshape(num_seeds, num_frames, -1) for a in arrays.values()]
    sizes = [a.shape[2] for a in flat]
    # one matrix product: (B, F) @ (F, S * K)
    stacked = np.concatenate(flat, axis=2).transpose(1, 0, 2).reshape(num_frames, -1)
    pooled = (frame_weights @ stacked).reshape(len(frame_weights), num_seeds, -1)
    out, start = {}, 0
    for (name, array), size in zip(arrays.items(), sizes):
        out[name] = pooled[:, :, start:start + size].reshape(pooled.shape[:2] + array.shape[2:])
        start += size
    return out


# ----------------------------------------------------------------- metrics on pooled counts


def _nanmean(values: np.ndarray, axis) -> np.ndarray:
    finite = ~np.isnan(values)
    count = finite.sum(axis=axis)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1e-300), np.nan)


class _MetricSpec:
    """How a :func:`summarize` key is computed from pooled counts with any leading shape.

    Mirrors :func:`summarize` (and ``ray_iou_table`` / ``average_velocity_errors`` /
    ``miou_from_confusion``) on arrays of shape (..., T, C) / (..., C) / (..., C, C)."""

    def __init__(self, metric: str, class_names: Sequence[str], free_index: int,
                 flow_classes: Optional[Sequence[int]], thresholds: Sequence[float]):
        self.metric = metric
        self.class_names = list(class_names)
        self.keep = [c for c in range(len(class_names)) if c != free_index]
        self.flow_classes = list(flow_classes) if flow_classes is not None else []
        self.thresholds = list(thresholds)
        index = {name: c for c, name in enumerate(self.class_names)}
        by_threshold = {f"RayIoU@{t:g}": j for j, t in enumerate(self.thresholds)}
        family, _, name = metric.partition("/")
        self.row: Optional[int] = by_threshold.get(metric)
        self.column: Optional[int] = index.get(name) if name else None
        self.fields: Tuple[str, ...] = ()
        if metric == "RayIoU" or metric in by_threshold or (family == "RayIoU" and name in index):
            self.fields = _RAY_FIELDS
        elif metric in ("mAVE", "mAVE_TP", "OccScore") or (family in ("AVE", "AVE_TP") and name in index):
            if not self.flow_classes:
                raise ValueError(f"paired_bootstrap: metric {metric!r} needs flow_classes")
            if name and self.column not in self.flow_classes:
                raise ValueError(f"paired_bootstrap: {metric!r}: {name!r} is not a flow class")
            self.fields = _RAY_FIELDS + _FLOW_FIELDS if metric == "OccScore" else \
                _FLOW_TP_FIELDS if family.endswith("_TP") else _FLOW_FIELDS
        elif metric == "mIoU" or (family == "IoU" and name in index):
            self.fields = ("confusion",)
        if not self.fields or self.column == free_index:
            raise ValueError(f"paired_bootstrap: unknown metric {metric!r}; expected a key of summarize(): "
                             f"RayIoU, {', '.join(by_threshold)}, RayIoU/<class>, mAVE, mAVE_TP, AVE/<flow class>, "
                             "AVE_TP/<flow class>, OccScore, mIoU or IoU/<non-free class>")

    def _ray_iou_mean(self, counts: Dict[str, np.ndarray]) -> np.ndarray:
        union = counts["gt"][..., None, :] + counts["pred"][..., None, :] - counts["tp"]
        iou = _ratio(counts["tp"], union)[..., self.keep]  # (..., T, C')
        return 100 * _nanmean(iou.reshape(iou.shape[:-2] + (-1,)), axis=-1)

    def __call__(self, counts: Dict[str, np.ndarray]) -> np.ndarray:
        metric = self.metric
        if self.fields == _RAY_FIELDS:
            if metric == "RayIoU":
                return self._ray_iou_mean(counts)
            union = counts["gt"][..., None, :] + counts["pred"][..., None, :] - counts["tp"]
            iou = _ratio(counts["tp"], union)
            if metric.startswith("RayIoU@"):
                return 100 * _nanmean(iou[..., self.row, self.keep], axis=-1)
            return 100 * _nanmean(iou[..., :, self.column], axis=-1)
        if self.fields in (_FLOW_FIELDS, _FLOW_TP_FIELDS):
            total, count = (counts[name] for name in self.fields)
            ave = _ratio(total, count)
            if self.column is not None:
                return ave[..., self.column]
            return _nanmean(ave[..., self.flow_classes], axis=-1)
        if metric == "OccScore":
            ray_iou = self._ray_iou_mean(counts)
            mave = _nanmean(_ratio(counts["flow_all_error_sum"], counts["flow_all_count"])[..., self.flow_classes],
                            axis=-1)
            return np.where(np.isnan(mave), np.nan, 100 * (0.9 * ray_iou / 100 + 0.1 * np.maximum(1.0 - mave, 0.0)))
        confusion = counts["confusion"]
        diagonal = np.diagonal(confusion, axis1=-2, axis2=-1)
        iou = _ratio(diagonal, confusion.sum(-2) + confusion.sum(-1) - diagonal)
        if self.column is not None:
            return 100 * iou[..., self.column]
        return 100 * _nanmean(iou[..., self.keep], axis=-1)


# -------------------------------------------------------------------------- the bootstrap


def _multiplicities(indices: np.ndarray, size: int, what: str) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 2 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"paired_bootstrap: {what} indices must be an integer array (B, n), got "
                         f"{indices.dtype} {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= size):
        raise ValueError(f"paired_bootstrap: {what} indices must lie in [0, {size - 1}]")
    counts = np.zeros((indices.shape[0], size), np.float64)
    np.add.at(counts, (np.repeat(np.arange(indices.shape[0]), indices.shape[1]), indices.reshape(-1)), 1.0)
    return counts


def _seed_weighted_difference(baseline: np.ndarray, variant: np.ndarray, seed_weights: np.ndarray) -> np.ndarray:
    """(B,) weighted mean over seeds of variant - baseline, NaN entries left out."""
    difference = variant - baseline
    defined = ~np.isnan(difference)
    weight = np.where(defined, seed_weights, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        total = weight.sum(-1)
        return np.where(total > 0, (weight * np.where(defined, difference, 0.0)).sum(-1) / np.maximum(total, 1e-300),
                        np.nan)


def _verdict(low: float, high: float, higher_better: bool) -> str:
    if math.isnan(low) or math.isnan(high):
        return UNDEFINED
    if low <= 0.0 <= high:
        return NO_EFFECT
    return VARIANT_BETTER if (low > 0.0) == higher_better else VARIANT_WORSE


def paired_bootstrap(
    baseline: Sequence[FrameStats],
    variant: Sequence[FrameStats],
    metrics: Union[str, Sequence[str]],
    *,
    class_names: Sequence[str],
    free_index: int,
    flow_classes: Optional[Sequence[int]] = None,
    thresholds: Sequence[float] = RAY_IOU_THRESHOLDS,
    num_resamples: int = 4000,
    confidence: float = 0.95,
    rng: Union[int, np.random.Generator] = 0,
    resamples: Optional[Tuple[np.ndarray, np.ndarray]] = None,
) -> Dict[str, PairedBootstrapResult]:
    """Paired seed-and-frame bootstrap of pooled metrics, variant - baseline.

    The definitions (per-seed pooled value, point estimate, the crossed resampling, the
    percentile interval) and why the frame draw is shared by all seeds are in the module
    docstring. Every metric of one call sees the same draws.

    Args:
        baseline, variant: per seed (S entries, the same seeds in the same order), the
            per-frame :class:`SampleStats` of the F validation frames - either a list (the
            same frames in the same order for every seed and both models) or a mapping
            ``sample_token -> SampleStats`` (the evaluator's ``_stats``; frames are then
            aligned by token and must be the same set everywhere). Mappings are ordered by
            token, so explicit ``resamples`` index the sorted tokens.
        metrics: one or several :func:`summarize` keys: ``RayIoU``, ``RayIoU@<t>``,
            ``RayIoU/<class>``, ``mAVE``, ``mAVE_TP``, ``AVE/<flow class>``,
            ``AVE_TP/<flow class>``, ``OccScore``, ``mIoU``, ``IoU/<class>`` (the last two
            need the confusion matrices).
        class_names, free_index, flow_classes, thresholds: the label set and RayIoU
            thresholds, as given to :func:`summarize`.
        num_resamples: B, the number of random resamples (ignored with ``resamples``).
        confidence: coverage of the percentile interval.
        rng: seed of ``numpy.random.default_rng``, or a Generator, for the draws.
        resamples: instead of random draws, explicit ``(seed_indices, frame_indices)``,
            integer arrays (B, n_seeds) with values in [0, S) and (B, n_frames) in [0, F)
            (tests, exhaustive enumeration of small cases).
    Returns:
        ``{metric: PairedBootstrapResult}`` in the order of ``metrics``.
    """
    metric_list = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metric_list:
        raise ValueError("paired_bootstrap: no metrics given")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_bootstrap: confidence must lie in (0, 1), got {confidence}")
    specs = [_MetricSpec(m, class_names, free_index, flow_classes, thresholds) for m in metric_list]
    fields = tuple(dict.fromkeys(name for spec in specs for name in spec.fields))
    num_classes = len(class_names)
    shapes = {name: (len(thresholds), num_classes) if name == "tp" else
              (num_classes, num_classes) if name == "confusion" else (num_classes,) for name in fields}
    base_tokens, base = _stack(baseline, fields, shapes, "paired_bootstrap: baseline")
    var_tokens, var = _stack(variant, fields, shapes, "paired_bootstrap: variant")
    base_size, var_size = base[fields[0]].shape[:2], var[fields[0]].shape[:2]
    if base_size != var_size:
        raise ValueError(f"paired_bootstrap: the baseline has (seeds, frames) = {base_size}, the variant "
                         f"{var_size}; a paired comparison needs the same seeds and frames")
    if base_tokens != var_tokens:
        raise ValueError("paired_bootstrap: the baseline and the variant were evaluated on different frames")
    num_seeds, num_frames = next(iter(base.values())).shape[:2]

    if resamples is not None:
        seed_weights = _multiplicities(resamples[0], num_seeds, "seed")
        frame_weights = _multiplicities(resamples[1], num_frames, "frame")
        if len(seed_weights) != len(frame_weights):
            raise ValueError(f"paired_bootstrap: {len(seed_weights)} seed draws and {len(frame_weights)} frame draws")
    else:
        if num_resamples < 1:
            raise ValueError(f"paired_bootstrap: num_resamples must be positive, got {num_resamples}")
        generator = np.random.default_rng(rng)
        seed_weights = generator.multinomial(num_seeds, np.full(num_seeds, 1.0 / num_seeds),
                                             size=num_resamples).astype(np.float64)
        frame_weights = generator.multinomial(num_frames, np.full(num_frames, 1.0 / num_frames),
                                              size=num_resamples).astype(np.float64)
    total_resamples = len(seed_weights)

    # both models' counts side by side, so that one matrix product pools them with the same draw
    arrays = {**{f"b.{k}": v for k, v in base.items()}, **{f"v.{k}": v for k, v in var.items()}}
    # point estimate and per-model values: every frame once, every seed once
    everything = _pool(arrays, np.ones((1, num_frames)))
    per_seed = {}
    for spec in specs:
        b = spec({k: everything[f"b.{k}"][0] for k in spec.fields})
        v = spec({k: everything[f"v.{k}"][0] for k in spec.fields})
        per_seed[spec.metric] = (b, v)

    samples = {spec.metric: np.empty(total_resamples) for spec in specs}
    bytes_per_resample = 8 * num_seeds * sum(a[0, 0].size for a in arrays.values())
    block = max(1, _BLOCK_BYTES // max(bytes_per_resample, 1))
    for start in range(0, total_resamples, block):
        stop = min(start + block, total_resamples)
        pooled = _pool(arrays, frame_weights[start:stop])
        for spec in specs:
            b = spec({k: pooled[f"b.{k}"] for k in spec.fields})
            v = spec({k: pooled[f"v.{k}"] for k in spec.fields})
            samples[spec.metric][start:stop] = _seed_weighted_difference(b, v, seed_weights[start:stop])

    results: Dict[str, PairedBootstrapResult] = {}
    for spec in specs:
        b, v = per_seed[spec.metric]
        draws = samples[spec.metric]
        defined = draws[~np.isnan(draws)]
        if defined.size:
            low, high = (float(q) for q in np.quantile(defined, [(1 - confidence) / 2, (1 + confidence) / 2]))
        else:
            low = high = float("nan")
        direction = higher_is_better(spec.metric)
        results[spec.metric] = PairedBootstrapResult(
            metric=spec.metric, higher_is_better=direction,
            baseline=float(_nanmean(b, axis=-1)), variant=float(_nanmean(v, axis=-1)),
            difference=float(_seed_weighted_difference(b, v, np.ones(num_seeds))),
            interval=(low, high), confidence=confidence, num_resamples=total_resamples,
            num_undefined=int(draws.size - defined.size), verdict=_verdict(low, high, direction),
            num_seeds=num_seeds, num_frames=num_frames, samples=draws)
    return results


# ------------------------------------------------------------------------------- the gate


def _per_seed_values(values: Union[float, Sequence[float]], what: str) -> Tuple[float, ...]:
    if isinstance(values, (int, float, np.floating, np.integer)):
        return (float(values),)
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError(f"benchmark_gate: no {what} values")
    return values


def _fmt(value: float, digits: int = 2) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def benchmark_gate(
    baseline_stats: Sequence[SampleStats],
    class_prior_ray_iou: float,
    gt_occupancy_mave: Union[float, Sequence[float]],
    zero_flow_mave: Union[float, Sequence[float]],
    *,
    class_names: Sequence[str],
    free_index: int,
    class_name: str = "car",
    prior_factor: float = 2.0,
    min_true_positive_rays: int = 50,
    tp_threshold: float = MAVE_THRESHOLD,
    flow_factor: float = 0.7,
    thresholds: Sequence[float] = RAY_IOU_THRESHOLDS,
    moving_shares: Optional[Tuple[float, float]] = None,
    max_moving_share_gap: float = 0.10,
) -> GateResult:
    """Whether a benchmark's baseline learned enough for comparisons against it to mean anything.

    Criteria (each must hold; comparisons are reported only when all do):

    - ``ray_iou_over_class_prior`` (a): the baseline's RayIoU, mean over seeds of the
      per-seed pooled RayIoU, is above ``prior_factor`` x the RayIoU of the class-prior
      floor (the model that predicts the class prior; percent, like :func:`summarize`).
    - ``class_ray_iou`` (b): ``RayIoU/<class_name>`` > 0 in every seed.
    - ``class_true_positive_rays`` (b): at least ``min_true_positive_rays`` true-positive
      rays of ``class_name`` at the ``tp_threshold`` (default 2 m, the mAVE threshold) in
      every seed (summed over the validation frames of the seed).
    - ``flow_vs_zero_flow`` (c): the baseline's flow error read on the ground-truth
      occupancy (the evaluator's ``mAVE_gt_occupancy``: its predicted occupancy replaced by
      the GT, its predicted flow kept; mean over the values given) is below ``flow_factor``
      x the zero-flow reference mAVE (mean over the values given). With GT occupancy every
      object is found, so the number measures flow alone; the reference is what predicting
      no motion scores - like for like, zero flow on the GT occupancy (then one value, the
      same for every seed); the evaluator's ``mAVE_zero_flow`` (zero flow on each seed's
      predicted occupancy) may be passed per seed instead.
    - ``split_motion_match`` (d, only with ``moving_shares``): the training and validation
      splits move alike: their shares of moving flow-class voxels
      (:func:`voxelsplat.engine.floors.motion_statistics`) differ by at most
      ``max_moving_share_gap`` (0.10: ten points). A validation split that barely moves
      rewards predicting no motion.

    Args:
        baseline_stats: per seed, the baseline's counts pooled over the validation frames
            (``SampleStats.total`` of the seed's per-frame stats).
        class_prior_ray_iou: RayIoU (percent) of the class-prior floor.
        gt_occupancy_mave: the baseline's GT-occupancy mAVE (m/s), per seed or one value.
        zero_flow_mave: the zero-flow reference mAVE (m/s), per seed or one pooled value.
            Both are compared as means; a NaN fails the criterion.
        class_names, free_index, thresholds: the label set and RayIoU thresholds.
        class_name, prior_factor, min_true_positive_rays, tp_threshold, flow_factor: the
            criteria's parameters (defaults: car, 2.0, 50, 2 m, 0.7).
        moving_shares: (training, validation) moving shares in [0, 1], or None to skip (d).
        max_moving_share_gap: the largest gap (d) allows.
    Returns:
        :class:`GateResult`; its ``criteria`` are keyed by the names above, each with the
        value, the threshold, whether it passed and a one-line reason naming the criterion.
    """
    stats = list(baseline_stats)
    if not stats or not all(isinstance(s, SampleStats) for s in stats):
        raise ValueError("benchmark_gate: baseline_stats must be a non-empty list of per-seed SampleStats")
    if class_name not in class_names:
        raise ValueError(f"benchmark_gate: class {class_name!r} is not in {list(class_names)}")
    if tp_threshold not in thresholds:
        raise ValueError(f"benchmark_gate: tp_threshold {tp_threshold} m is not one of the RayIoU thresholds "
                         f"{list(thresholds)}")
    class_index, row = list(class_names).index(class_name), list(thresholds).index(tp_threshold)
    results = [summarize(s, class_names, free_index, None, thresholds) for s in stats]
    seeds = len(stats)
    criteria: Dict[str, GateCriterion] = {}

    ray_iou = tuple(r["RayIoU"] for r in results)
    value, floor = float(np.mean(ray_iou)), prior_factor * float(class_prior_ray_iou)
    passed = bool(value > floor)
    criteria["ray_iou_over_class_prior"] = GateCriterion(
        "ray_iou_over_class_prior", value, floor, passed,
        f"ray_iou_over_class_prior (a): baseline RayIoU {_fmt(value)} (mean of {seeds} seeds) "
        f"{'>' if passed else '<='} {prior_factor:g} x class-prior RayIoU {_fmt(class_prior_ray_iou)} = "
        f"{_fmt(floor)}", ray_iou)

    class_iou = tuple(r[f"RayIoU/{class_name}"] for r in results)
    bad = [s for s, v in enumerate(class_iou) if not v > 0]
    value = float(np.min(class_iou)) if not any(math.isnan(v) for v in class_iou) else float("nan")
    criteria["class_ray_iou"] = GateCriterion(
        "class_ray_iou", value, 0.0, not bad,
        f"class_ray_iou (b): {class_name} RayIoU " + (
            f"> 0 in all {seeds} seeds (lowest {_fmt(value)})" if not bad else
            f"not > 0 in seed(s) #{', #'.join(map(str, bad))} "
            f"({', '.join(_fmt(class_iou[s]) for s in bad)})"), class_iou)

    class_tp = tuple(float(s.tp[row, class_index]) for s in stats)
    bad = [s for s, v in enumerate(class_tp) if v < min_true_positive_rays]
    value = float(np.min(class_tp))
    criteria["class_true_positive_rays"] = GateCriterion(
        "class_true_positive_rays", value, float(min_true_positive_rays), not bad,
        f"class_true_positive_rays (b): {class_name} true-positive rays at {tp_threshold:g} m " + (
            f">= {min_true_positive_rays} in all {seeds} seeds (lowest {int(value)})" if not bad else
            f"< {min_true_positive_rays} in seed(s) #{', #'.join(map(str, bad))} "
            f"({', '.join(str(int(class_tp[s])) for s in bad)})"), class_tp)

    flow = _per_seed_values(gt_occupancy_mave, "gt_occupancy_mave")
    reference = _per_seed_values(zero_flow_mave, "zero_flow_mave")
    value, limit = float(np.mean(flow)), flow_factor * float(np.mean(reference))
    passed = bool(value < limit)  # False for NaN
    criteria["flow_vs_zero_flow"] = GateCriterion(
        "flow_vs_zero_flow", value, limit, passed,
        f"flow_vs_zero_flow (c): baseline GT-occupancy mAVE {_fmt(value, 4)} m/s (mean of {len(flow)}) "
        f"{'<' if passed else '>='} {flow_factor:g} x zero-flow mAVE {_fmt(float(np.mean(reference)), 4)} = "
        f"{_fmt(limit, 4)}", flow)

    if moving_shares is not None:
        train_share, val_share = (float(v) for v in moving_shares)
        gap = abs(train_share - val_share)
        passed = bool(gap <= max_moving_share_gap)  # False for NaN
        criteria["split_motion_match"] = GateCriterion(
            "split_motion_match", gap, float(max_moving_share_gap), passed,
            f"split_motion_match (d): moving share of flow-class voxels {100 * train_share:.1f}% (train) vs "
            f"{100 * val_share:.1f}% (val), gap {100 * gap:.1f} points "
            f"{'<=' if passed else '>'} {100 * max_moving_share_gap:g}")

    return GateResult(passed=all(c.passed for c in criteria.values()), criteria=criteria)


# -------------------------------------------------------------------------- markdown


def _digits(metric: str) -> int:
    return 4 if not higher_is_better(metric) else 2


def format_markdown(
    gate: GateResult,
    comparisons: Mapping[str, Mapping[str, PairedBootstrapResult]],
    *,
    baseline_name: str = "baseline",
) -> List[str]:
    """Markdown lines for a results file: the gate, then (only if it passed) the comparisons.

    Args:
        gate: the baseline's :func:`benchmark_gate` result.
        comparisons: ``{variant name: {metric: PairedBootstrapResult}}`` (e.g. the outputs
            of :func:`paired_bootstrap`, one per variant).
        baseline_name: the baseline's name in the table.
    Returns:
        Lines without trailing newlines.
    """
    lines = [f"Benchmark gate: {'passed' if gate.passed else 'FAILED'}", "",
             "| criterion | value | threshold | passed | reason |", "|---|---|---|---|---|"]
    for name, criterion in gate.criteria.items():
        lines.append(f"| {name} | {_fmt(criterion.value, 4)} | {_fmt(criterion.threshold, 4)} | "
                     f"{'yes' if criterion.passed else 'no'} | {criterion.reason} |")
    lines.append("")
    if not gate.passed:
        lines.append(f"Comparisons withheld: the baseline failed {', '.join(gate.failed)}.")
        return lines
    first = next((r for results in comparisons.values() for r in results.values()), None)
    if first is None:
        lines.append("No comparisons.")
        return lines
    lines += [f"Paired bootstrap over {first.num_seeds} seeds x {first.num_frames} frames (seeds and frames "
              f"resampled, the same draw for both models; {first.num_resamples} resamples; "
              f"{100 * first.confidence:g}% percentile intervals; difference = variant - baseline, "
              "mean over seeds of the per-seed pooled metric).", "",
              f"| variant | metric | {baseline_name} | variant | difference | {100 * first.confidence:g}% interval "
              "| verdict |", "|---|---|---|---|---|---|---|"]
    for variant_name, results in comparisons.items():
        for metric, r in results.items():
            d = _digits(metric)
            undefined = f" ({r.num_undefined} resamples undefined)" if r.num_undefined else ""
            lines.append(f"| {variant_name} | {metric} | {_fmt(r.baseline, d)} | {_fmt(r.variant, d)} | "
                         f"{r.difference:+.{d}f} | [{_fmt(r.interval[0], d)}, {_fmt(r.interval[1], d)}] | "
                         f"{r.verdict}{undefined} |")
    return lines
