"""Which voxels become Gaussians for the VoxelSplat regularizer.

Per sample, ``num_samples`` voxels are drawn without replacement among the candidate
(ray-visible) voxels. A candidate of class ``c`` whose speed falls in bin ``b`` has weight

    w = w_class[c] * w_speed[b],   w_class[c] = (1 / (n_c^0.5 + eps)) / sum_c' (1 / (n_c'^0.5 + eps))

(``w_speed`` likewise from the speed-bin counts ``m_b``), ``eps = 1e-6``, as the released code
computes them. Where the counts come from is the caller's choice (see
:class:`voxelsplat.data.mapper.TemporalDatasetMapper`'s regularizer options):

- **dataset-wide** counts (the release): every voxel of every training sample's labels, free
  included -- fixed constants for nuScenes (:data:`NUSCENES_OPENOCC_V2_CLASS_COUNTS`,
  :data:`NUSCENES_OPENOCC_V2_SPEED_BIN_COUNTS`), or counted once over a registered split
  (:func:`count_dataset_voxels`, cached on disk);
- **per-sample** counts among the sample's candidates (:func:`count_voxels` with a mask).

Speed bins. ``edges = (1, 2, 5, 10)`` m/s give five bins, and two rules place a speed in them:

- ``"corrected"``: half-open ``[0, 1), [1, 2), [2, 5), [5, 10), [10, inf)``; a static voxel is
  in the first bin.
- ``"release"``: the released code's ``torch.bucketize(speed, [0, 1, 2, 5, 10]) - 1``, i.e.
  left-open ``(0, 1], (1, 2], (2, 5], (5, 10], (10, inf)``, and a speed of exactly 0 gets index
  -1, the *last* bin. Static voxels (almost all of them) therefore take the weight of the
  fast bin, whose count is small, instead of the tiny weight of the static bin. The published
  numbers were trained this way, so the release configs keep it; corrected configs do not.

Counts are always taken with the corrected rule: that is how the released constants were
counted (their first bin holds 21.8e9 of the 21.9e9 voxels, i.e. the static ones), and a
count describes the data whichever rule later picks the entry a voxel is weighted by.

Drawing is successive sampling without replacement with probability proportional to the
weights among the remaining candidates (the law of ``torch.multinomial(p, n,
replacement=False)``), done in one pass with exponential keys (Efraimidis-Spirakis: keep the
``num_samples`` smallest ``E_i / w_i``, E_i ~ Exp(1)), exact and linear-time for the ~640k
voxels of a grid. Voxels of weight 0 are never drawn.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from ..utils.io import atomic_write_json, read_json
from .loading import load_occupancy_labels
from ..structures import IGNORE_LABEL, NUSCENES_VOXEL_COUNTS

logger = logging.getLogger(__name__)

__all__ = [
    "SPEED_BIN_EDGES",
    "SPEED_BIN_RULES",
    "NUSCENES_OPENOCC_V2_CLASS_COUNTS",
    "NUSCENES_OPENOCC_V2_SPEED_BIN_COUNTS",
    "VoxelCounts",
    "speed_bin_index",
    "count_voxels",
    "count_dataset_voxels",
    "class_counts_in_label_order",
    "inverse_frequency_weights",
    "gaussian_voxel_weights",
    "sample_voxels_by_weight",
    "sample_gaussian_voxels",
]

# Upper edges (m/s) of the first four speed bins; the last bin is open-ended.
SPEED_BIN_EDGES = (1.0, 2.0, 5.0, 10.0)
SPEED_BIN_RULES = ("release", "corrected")
# w ∝ 1 / (count^FREQUENCY_EXPONENT + FREQUENCY_EPS), for classes and speed bins alike.
FREQUENCY_EXPONENT = 0.5
FREQUENCY_EPS = 1e-6

# Voxel counts of the released code (nusc_param.py): every voxel of the 34149 nuScenes
# trainval keyframes (train + val, 34149 x 200 x 200 x 16 = 21,855,360,000), OpenOcc v2 labels,
# keyed by class name; the focal-loss class weights come from the same counts.
NUSCENES_OPENOCC_V2_CLASS_COUNTS = dict(NUSCENES_VOXEL_COUNTS["openocc_v2"])
# The same voxels per speed bin of SPEED_BIN_EDGES, static voxels in the first bin.
NUSCENES_OPENOCC_V2_SPEED_BIN_COUNTS = (21813410495, 6412527, 12202872, 18054418, 5279688)

# Bumped whenever what a cached count means changes, so stale caches are never reused.
COUNT_FORMAT_VERSION = 1


class VoxelCounts(NamedTuple):
    """Voxels per class (int64, (num_classes,)) and per speed bin (int64, (len(edges) + 1,))."""

    class_counts: np.ndarray
    speed_bin_counts: np.ndarray


def speed_bin_index(flow: np.ndarray, edges: Sequence[float] = SPEED_BIN_EDGES,
                    rule: str = "corrected") -> np.ndarray:
    """Speed-bin index of velocities.

    Args:
        flow: (..., 2) velocities (vx, vy) in m/s.
        edges: increasing upper edges of all bins but the last (m/s), all > 0.
        rule: "corrected" (bin ``i`` is ``[edges[i-1], edges[i])`` with ``edges[-1] = 0``) or
            "release" (bin ``i`` is ``(edges[i-1], edges[i]]`` and speed 0 is in the last bin);
            see the module docstring.
    Returns:
        int64 array (...) in ``[0, len(edges)]``.
    """
    if rule not in SPEED_BIN_RULES:
        raise ValueError(f"speed_bin_index: unknown rule {rule!r}; expected one of {SPEED_BIN_RULES}")
    flow = np.asarray(flow)
    speed = np.hypot(flow[..., 0].astype(np.float64), flow[..., 1].astype(np.float64))
    if not np.isfinite(speed).all():
        raise ValueError("speed_bin_index: flow has non-finite values")
    edges = np.asarray(edges, dtype=np.float64)
    if rule == "corrected":
        return np.searchsorted(edges, speed, side="right").astype(np.int64)
    # torch.bucketize(speed, [0, *edges]) - 1 (right=False): index of the first boundary >= speed, minus one
    index = np.searchsorted(np.concatenate([[0.0], edges]), speed, side="left").astype(np.int64) - 1
    return np.where(index < 0, len(edges), index)


def count_voxels(semantics: np.ndarray, flow: Optional[np.ndarray], num_classes: int,
                 edges: Sequence[float] = SPEED_BIN_EDGES, mask: Optional[np.ndarray] = None) -> VoxelCounts:
    """Voxels per class and per speed bin (corrected rule, see the module docstring).

    Args:
        semantics: (X, Y, Z) int class per voxel, in [0, num_classes) or ``IGNORE_LABEL``
            (not counted).
        flow: (X, Y, Z, 2) velocity (m/s) or None (all static).
        mask: (X, Y, Z) bool, count only these voxels; None: all.
    """
    classes = np.asarray(semantics).reshape(-1)
    bins = (np.zeros(classes.shape, np.int64) if flow is None
            else speed_bin_index(np.asarray(flow).reshape(-1, 2), edges, "corrected"))
    keep = classes != IGNORE_LABEL
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool).reshape(-1)
    if not keep.all():
        classes, bins = classes[keep], bins[keep]
    return VoxelCounts(np.bincount(classes.astype(np.int64), minlength=num_classes).astype(np.int64),
                       np.bincount(bins, minlength=len(edges) + 1).astype(np.int64))


def class_counts_in_label_order(counts: Union[Mapping[str, float], Sequence[float]],
                                class_names: Sequence[str]) -> np.ndarray:
    """Per-class counts as a float64 array in the order of ``class_names``.

    Args:
        counts: ``{class name: count}`` covering exactly ``class_names`` (e.g.
            :data:`NUSCENES_OPENOCC_V2_CLASS_COUNTS`), or a sequence already in label order.
    Raises:
        ValueError: names missing or unknown, wrong length, negative or non-finite counts.
    """
    class_names = [str(n) for n in class_names]
    if isinstance(counts, Mapping):
        given = {str(k): v for k, v in counts.items()}
        missing = [n for n in class_names if n not in given]
        unknown = sorted(set(given) - set(class_names))
        if missing or unknown:
            raise ValueError(f"class counts: missing classes {missing}, unknown classes {unknown}; the label set is "
                             f"{class_names}")
        values = np.array([float(given[n]) for n in class_names])
    else:
        values = np.asarray([float(c) for c in counts], dtype=np.float64)
        if len(values) != len(class_names):
            raise ValueError(f"class counts: {len(values)} values for {len(class_names)} classes {class_names}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"class counts must be finite and >= 0, got {values.tolist()}")
    return values


def inverse_frequency_weights(counts: Sequence[float]) -> np.ndarray:
    """``(1 / (n^0.5 + 1e-6))`` normalised to sum 1 (float64, same length as ``counts``), as the
    released code weights classes and speed bins."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or not len(counts) or not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"inverse_frequency_weights: counts must be a non-empty 1-D array of finite values >= 0, "
                         f"got {counts.tolist()}")
    weights = 1.0 / (counts ** FREQUENCY_EXPONENT + FREQUENCY_EPS)
    return weights / weights.sum()


def gaussian_voxel_weights(semantics: np.ndarray, flow: Optional[np.ndarray], candidates: Optional[np.ndarray],
                           class_weights: np.ndarray, speed_bin_weights: np.ndarray,
                           edges: Sequence[float] = SPEED_BIN_EDGES, speed_bin_rule: str = "corrected") -> np.ndarray:
    """Sampling weight of every voxel: ``class_weights[class] * speed_bin_weights[speed bin]``
    on candidates, 0 elsewhere.

    Args:
        semantics: (X, Y, Z) int class per voxel.
        flow: (X, Y, Z, 2) velocity (m/s) or None (all static: speed 0).
        candidates: (X, Y, Z) bool voxels that may be drawn, or None for all.
        class_weights: (num_classes,) per-class weight, e.g. :func:`inverse_frequency_weights`.
        speed_bin_weights: (len(edges) + 1,) per-speed-bin weight.
        speed_bin_rule: "release" or "corrected" (:func:`speed_bin_index`).
    Returns:
        (X, Y, Z) float64.
    """
    semantics = np.asarray(semantics)
    class_weights = np.asarray(class_weights, dtype=np.float64)
    speed_bin_weights = np.asarray(speed_bin_weights, dtype=np.float64)
    if len(speed_bin_weights) != len(edges) + 1:
        raise ValueError(f"gaussian_voxel_weights: {len(speed_bin_weights)} speed-bin weights for {len(edges) + 1} "
                         f"bins (edges {tuple(edges)})")
    # voxels without ground truth (IGNORE_LABEL) get weight 0, as in the release
    labelled = semantics != IGNORE_LABEL
    if semantics.size and labelled.any() and semantics[labelled].max() >= len(class_weights):
        raise ValueError(f"gaussian_voxel_weights: class {int(semantics[labelled].max())} has no weight "
                         f"({len(class_weights)} class weights)")
    if flow is None:
        flow = np.zeros(semantics.shape + (2,), np.float32)
    bins = speed_bin_index(flow, edges, speed_bin_rule)
    weights = np.where(labelled, class_weights[np.where(labelled, semantics, 0).astype(np.int64)], 0.0) \
        * speed_bin_weights[bins]
    if candidates is not None:
        if candidates.shape != semantics.shape:
            raise ValueError(f"gaussian_voxel_weights: candidate mask {candidates.shape} does not match "
                             f"{semantics.shape}")
        weights = np.where(candidates, weights, 0.0)
    return weights


def sample_voxels_by_weight(weights: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``num_samples`` voxels without replacement, successively with probability
    proportional to ``weights`` among those left (voxels of weight 0 never).

    Args:
        weights: (X, Y, Z) float >= 0.
        num_samples: voxels to draw; every voxel of positive weight when there are fewer.
        rng: the sample's generator.
    Returns:
        (N, 3) int64 voxel indices [x, y, z] sorted by flat index, N = min(num_samples, #positive).
    """
    weights = np.asarray(weights, dtype=np.float64)
    flat_weights = weights.reshape(-1)
    if not np.isfinite(flat_weights).all() or (flat_weights < 0).any():
        raise ValueError("sample_voxels_by_weight: weights must be finite and >= 0")
    flat = np.flatnonzero(flat_weights > 0)
    num_samples = max(int(num_samples), 0)
    if len(flat) > num_samples:
        keys = rng.standard_exponential(len(flat)) / flat_weights[flat]
        flat = np.sort(flat[np.argpartition(keys, num_samples - 1)[:num_samples]]) if num_samples else flat[:0]
    return np.stack(np.unravel_index(flat, weights.shape), axis=-1).astype(np.int64)


def sample_gaussian_voxels(semantics: np.ndarray, flow: Optional[np.ndarray], candidates: Optional[np.ndarray],
                           num_samples: int, rng: np.random.Generator, class_counts: Sequence[float],
                           speed_bin_counts: Sequence[float], edges: Sequence[float] = SPEED_BIN_EDGES,
                           speed_bin_rule: str = "corrected") -> np.ndarray:
    """Sample the voxels of one sample's Gaussians (see the module docstring).

    Args:
        semantics: (X, Y, Z) int class per voxel.
        flow: (X, Y, Z, 2) velocity (m/s), the BEV-augmented GT flow, or None (all static).
        candidates: (X, Y, Z) bool mask of voxels that may be drawn (ray-visible), or None for all.
        num_samples: voxels to draw; all candidates when there are fewer.
        rng: the sample's generator.
        class_counts: (num_classes,) voxel counts per class in label order (free included),
            dataset-wide or per sample.
        speed_bin_counts: (len(edges) + 1,) voxel counts per speed bin.
        edges, speed_bin_rule: the speed bins (:func:`speed_bin_index`).
    Returns:
        (N, 3) int64 voxel indices [x, y, z], sorted by flat index, N = min(num_samples, #candidates).
    """
    weights = gaussian_voxel_weights(semantics, flow, candidates, inverse_frequency_weights(class_counts),
                                     inverse_frequency_weights(speed_bin_counts), edges, speed_bin_rule)
    return sample_voxels_by_weight(weights, num_samples, rng)


# --- dataset-wide counts --------------------------------------------------------------------


class _LabelCounts:
    """Map-style dataset: record index -> (class counts, speed-bin counts) of its labels.npz."""

    def __init__(self, records: Sequence[dict], grid_shape, num_classes: int, edges):
        self.items = [(r["gt_path"], r["sample_token"], r["gt_format"]) for r in records]
        self.grid_shape, self.num_classes, self.edges = tuple(grid_shape), int(num_classes), tuple(edges)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, token, gt_format = self.items[index]
        labels = load_occupancy_labels(path, token, gt_format, self.grid_shape, self.num_classes)
        return tuple(count_voxels(labels["semantics"], labels["flow"], self.num_classes, self.edges))


def _first(batch):
    return batch


def _counts_cache_path(cache_dir: str, records: Sequence[dict], grid_shape, num_classes: int, edges) -> str:
    """Cache file keyed by what the counts depend on: every label file (path, size,
    modification time), the grid, the label set size and the speed-bin edges."""
    key = hashlib.blake2b(digest_size=12)
    for part in (COUNT_FORMAT_VERSION, tuple(int(s) for s in grid_shape), int(num_classes),
                 tuple(float(e) for e in edges)):
        key.update(repr(part).encode() + b"\0")
    entries = []
    for record in records:
        path = record["gt_path"]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sample {record['sample_token']}: occupancy labels {path!r} do not exist")
        stat = os.stat(path)
        entries.append((os.path.realpath(path), record["gt_format"], stat.st_size, stat.st_mtime_ns))
    for entry in sorted(entries):
        key.update(repr(entry).encode() + b"\0")
    return os.path.join(cache_dir, f"voxel_counts_{len(records)}_{key.hexdigest()}.json")


def _count_list(value, length: int) -> Optional[np.ndarray]:
    """``value`` as int64 counts if it is a list of ``length`` non-negative integers, else None."""
    if not isinstance(value, list) or len(value) != length:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return None
    return np.asarray(value, np.int64)


def _read_counts_cache(path: str, num_classes: int, num_bins: int) -> Optional[VoxelCounts]:
    """The counts of a cache file of :func:`count_dataset_voxels`; None (with a warning naming the
    file, which is then counted again and rewritten) when it is unreadable or does not hold
    ``num_classes`` class counts and ``num_bins`` speed-bin counts."""
    try:
        cached = read_json(path)
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable voxel-count cache %s (%s); counting again", path, error)
        return None
    class_counts = _count_list(cached.get("class_counts"), num_classes) if isinstance(cached, dict) else None
    bin_counts = _count_list(cached.get("speed_bin_counts"), num_bins) if isinstance(cached, dict) else None
    if class_counts is None or bin_counts is None:
        logger.warning("ignoring voxel-count cache %s: it does not hold %d class counts and %d speed-bin counts "
                       "(non-negative integers); counting again", path, num_classes, num_bins)
        return None
    return VoxelCounts(class_counts, bin_counts)


def count_dataset_voxels(records: Sequence[dict], grid_shape: Sequence[int], num_classes: int,
                         edges: Sequence[float] = SPEED_BIN_EDGES, cache_dir: Optional[str] = None,
                         num_workers: int = 0) -> VoxelCounts:
    """Dataset-wide voxel counts: every voxel of every record's ``labels.npz`` (un-augmented,
    free included), per class and per speed bin (corrected rule), as the released constants
    were counted.

    Args:
        records: dataset records (``gt_path``, ``gt_format``, ``sample_token`` are read).
        grid_shape: (X, Y, Z) of the labels.
        num_classes: size of the label set.
        cache_dir: where the result is cached (a JSON file keyed by every label file's path,
            size and modification time, the grid, the label set size and the edges; written
            atomically; an unreadable or malformed one is counted again and rewritten); None: no
            cache.
        num_workers: processes reading label files (0: this process).
    Raises:
        FileNotFoundError / OccupancyLabelError: a label file is missing or unusable (named).
    """
    if not records:
        raise ValueError("count_dataset_voxels: no records")
    cache_path = _counts_cache_path(cache_dir, records, grid_shape, num_classes, edges) if cache_dir else None
    if cache_path and os.path.isfile(cache_path):
        counts = _read_counts_cache(cache_path, num_classes, len(edges) + 1)
        if counts is not None:
            logger.info("voxel counts of %d samples read from %s", len(records), cache_path)
            return counts

    per_sample = _LabelCounts(records, grid_shape, num_classes, edges)
    class_counts = np.zeros(int(num_classes), np.int64)
    bin_counts = np.zeros(len(edges) + 1, np.int64)
    if num_workers > 0 and len(records) > 1:
        from torch.utils.data import DataLoader

        items = DataLoader(per_sample, batch_size=None, num_workers=min(int(num_workers), len(records)),
                           collate_fn=_first)
    else:
        items = (per_sample[i] for i in range(len(per_sample)))
    for sample_classes, sample_bins in items:
        class_counts += np.asarray(sample_classes, np.int64)
        bin_counts += np.asarray(sample_bins, np.int64)
    counts = VoxelCounts(class_counts, bin_counts)
    if cache_path:
        atomic_write_json(cache_path, dict(class_counts=class_counts.tolist(), speed_bin_counts=bin_counts.tolist(),
                                           num_samples=len(records), grid_shape=[int(s) for s in grid_shape],
                                           speed_bin_edges=[float(e) for e in edges]))
    logger.info("counted the voxels of %d samples%s", len(records), f"; cached in {cache_path}" if cache_path else "")
    return counts
