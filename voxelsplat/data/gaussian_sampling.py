"""Which voxels become Gaussians for the VoxelSplat regularizer.

Per sample, ``num_samples`` voxels are drawn without replacement among the candidate
(ray-visible) voxels. A candidate of class ``c`` in speed bin ``b`` has weight

    w = 1 / sqrt(n_c) * 1 / sqrt(m_b)

where ``n_c`` and ``m_b`` count the candidates of that class and speed bin. Speed bins are
half-open: [0, 1), [1, 2), [2, 5), [5, 10), [10, inf) m/s, so a static voxel (speed 0) is in
the *first* bin (the released reference code puts it in the last one).

Drawing is successive sampling without replacement with probability proportional to the
weights among the remaining candidates, done in one pass with exponential keys
(Efraimidis-Spirakis: keep the ``num_samples`` smallest ``E_i / w_i``, E_i ~ Exp(1)),
which is exact and linear-time for the ~640k voxels of a grid.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["SPEED_BIN_EDGES", "speed_bin_index", "gaussian_sampling_weights", "sample_gaussian_voxels"]

# Upper edges (m/s) of the first four speed bins; the last bin is [10, inf).
SPEED_BIN_EDGES = (1.0, 2.0, 5.0, 10.0)


def speed_bin_index(flow: np.ndarray, edges: Sequence[float] = SPEED_BIN_EDGES) -> np.ndarray:
    """(..., 2) velocities (m/s) -> int64 (...) speed-bin index; bin ``i`` is
    ``[edges[i-1], edges[i])`` with ``edges[-1] = 0`` and a last bin ``[edges[-1], inf)``."""
    flow = np.asarray(flow)
    speed = np.hypot(flow[..., 0], flow[..., 1])
    if not np.isfinite(speed).all():
        raise ValueError("speed_bin_index: flow has non-finite values")
    return np.searchsorted(np.asarray(edges, dtype=np.float64), speed, side="right").astype(np.int64)


def gaussian_sampling_weights(classes: np.ndarray, speed_bins: np.ndarray, num_classes: int,
                              num_speed_bins: int = len(SPEED_BIN_EDGES) + 1) -> np.ndarray:
    """Per-candidate weights ``1/sqrt(n_class) * 1/sqrt(n_speed_bin)`` (float64, shape (M,)),
    frequencies counted among the given candidates.

    Args:
        classes: (M,) int class index per candidate.
        speed_bins: (M,) int speed-bin index per candidate.
    """
    classes = np.asarray(classes, dtype=np.int64)
    speed_bins = np.asarray(speed_bins, dtype=np.int64)
    class_count = np.bincount(classes, minlength=num_classes).astype(np.float64)
    bin_count = np.bincount(speed_bins, minlength=num_speed_bins).astype(np.float64)
    return 1.0 / np.sqrt(class_count[classes] * bin_count[speed_bins])


def sample_gaussian_voxels(semantics: np.ndarray, flow: Optional[np.ndarray], candidates: Optional[np.ndarray],
                           num_samples: int, num_classes: int, rng: np.random.Generator,
                           speed_bin_edges: Sequence[float] = SPEED_BIN_EDGES) -> np.ndarray:
    """Sample voxel indices for the Gaussians of one sample.

    Args:
        semantics: (X, Y, Z) int class per voxel.
        flow: (X, Y, Z, 2) velocity (m/s) or None (all static).
        candidates: (X, Y, Z) bool mask of voxels that may be drawn (ray-visible), or None
            for all voxels.
        num_samples: voxels to draw; all candidates when there are fewer.
        num_classes: number of classes of the label set (free included).
        rng: the sample's generator.
    Returns:
        (N, 3) int64 voxel indices [x, y, z], sorted by flat index, N = min(num_samples, #candidates).
    """
    shape = semantics.shape
    if candidates is None:
        flat = np.arange(semantics.size)
    else:
        if candidates.shape != shape:
            raise ValueError(f"sample_gaussian_voxels: candidate mask {candidates.shape} does not match {shape}")
        flat = np.flatnonzero(candidates)
    if len(flat) > num_samples:
        classes = semantics.reshape(-1)[flat]
        speed_bins = (np.zeros(len(flat), dtype=np.int64) if flow is None
                      else speed_bin_index(flow.reshape(-1, 2)[flat], speed_bin_edges))
        weights = gaussian_sampling_weights(classes, speed_bins, num_classes, len(speed_bin_edges) + 1)
        keys = rng.standard_exponential(len(flat)) / weights
        flat = np.sort(flat[np.argpartition(keys, num_samples - 1)[:num_samples]]) if num_samples > 0 else flat[:0]
    return np.stack(np.unravel_index(flat, shape), axis=-1).astype(np.int64)
