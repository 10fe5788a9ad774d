"""RayIoU, mAVE and OccScore (the OpenOcc v2 occupancy-and-flow benchmark) and Occ3D mIoU.

Definitions (the challenge's evaluation; see :mod:`voxelsplat.evaluation.ray_casting` for
the ray walk and its float32 rounding):

- Rays: the virtual LiDAR pattern (39 pitches x 360 azimuths) from each of a sample's
  ray origins (up to 8, ego frame, see ``voxelsplat.utils.geometry.select_lidar_origins``),
  cast through the ground truth and through the prediction. A ray's class is the class of
  the voxel it stops in; its depth is where it leaves that voxel; its flow is the flow
  stored at that voxel (prediction at the predicted hit - or at the last voxel walked when
  nothing was hit - ground truth at the GT hit).
- Only rays whose ground-truth hit is not free count. Per class c and threshold t in
  {1, 2, 4} m: ``TP = #(gt class = pred class = c and |depth error| < t)``, ``GT = #(gt
  class = c)``, ``Pred = #(pred class = c)``, pooled over the whole dataset; ``IoU = TP /
  (GT + Pred - TP)`` (NaN when the class appears in neither). ``RayIoU@t`` is the mean over
  the non-free classes (NaN-ignoring), ``RayIoU`` the mean over classes and thresholds.
- ``mAVE`` (the challenge's definition, the one published figures use): at the 2 m
  threshold, for every flow class that has at least one true-positive ray in a sample,
  the L2 flow errors (m/s) of *all* counted rays of that sample (every class, true
  positive or not) are added to that class's sum, and their number to its count.
  ``AVE/<class>`` = sum / count over the dataset, ``mAVE`` the mean over the flow classes
  (NaN-ignoring). A class's AVE is thus the flow error of the whole scene, weighted by
  the samples in which the class was found at all.
- ``mAVE_TP`` (this library's variant, reported next to it): ``AVE_TP/<class>`` is the
  mean flow error over that class's own true-positive rays at 2 m, ``mAVE_TP`` the mean
  over the flow classes (NaN-ignoring). It is the velocity error on the objects of each
  class that were found, without the flow errors of the road, buildings and
  misclassified rays that dominate the challenge's mAVE: for analysing flow prediction,
  not for comparison with published numbers.
- ``OccScore = 0.9 RayIoU + 0.1 max(1 - mAVE, 0)`` with the challenge's mAVE.
- Occ3D ``mIoU``: voxel confusion matrix over camera-visible voxels, per-class IoU,
  mean over the non-free classes (NaN-ignoring).

Depths and true positives (``ray_precision``): by default (``"official"``) depths are
float32 metres, rounded as the benchmark rounds them, and a ray is a true positive at t
when ``|d_pred - d_gt| < t`` in float32 - the challenge's comparison, which makes a few
errors of exactly t (an object k voxels off, ``k * voxel_size = t``) count or not
depending on the rounding of the two depths. ``ray_precision="float64"`` casts the exact
geometry and compares in voxel units, ``|d_pred - d_gt| < t / voxel_size - 1e-9``, so
that an error of exactly t never counts. Flow errors are computed in float64 either way.

Not reproduced: the challenge's submission stores each ray's depth and flow as float16,
and its server scores those rounded values; the numbers here come from the float32
depths (float64 flow errors), so a server's figures for an exported submission may
differ slightly.

Reported numbers: RayIoU*, mIoU and OccScore in percent (0-100, as papers print them),
mAVE and AVE in m/s.

Statistics are kept as small per-sample count arrays (:class:`SampleStats`) that add up
across samples and processes; :func:`summarize` turns a sum into the numbers above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

from voxelsplat.structures import DEFAULT_GRID, OccupancyGrid, OccupancySpec

from .ray_casting import RAY_PRECISIONS, RayCastResult, cast_rays, lidar_ray_directions

__all__ = [
    "RAY_IOU_THRESHOLDS",
    "MAVE_THRESHOLD",
    "SampleStats",
    "RaySampleResult",
    "cast_sample_rays",
    "sample_stats",
    "summarize",
    "compute_ray_metrics",
    "compute_occ3d_miou",
]

RAY_IOU_THRESHOLDS = (1.0, 2.0, 4.0)  # metres
MAVE_THRESHOLD = 2.0  # metres: the true positives at this threshold select the flow errors

ArrayLike = Union[np.ndarray, torch.Tensor]


@dataclass
class SampleStats:
    """Counts of one sample (or a sum of samples). C = number of classes, T = thresholds.

    Attributes:
        tp: (T, C) int64 true-positive rays per threshold and class.
        gt: (C,) int64 counted rays per ground-truth class.
        pred: (C,) int64 counted rays per predicted class.
        flow_error_sum: (C,) float64 summed L2 flow error (m/s) over each class's true
            positives at :data:`MAVE_THRESHOLD` (``mAVE_TP``).
        flow_tp: (C,) int64 number of those true positives.
        flow_all_error_sum: (C,) float64 per class, the summed L2 flow error (m/s) of all
            counted rays of every sample in which the class has at least one true positive
            at :data:`MAVE_THRESHOLD` (the challenge's ``mAVE``); a sample adds its whole
            error sum to each such class.
        flow_all_count: (C,) int64 the number of rays behind ``flow_all_error_sum``.
        confusion: (C, C) int64 Occ3D voxel confusion matrix [gt, pred] over camera-visible
            voxels, or None when mIoU is not computed.
        num_samples: how many samples were added up.
    """

    tp: np.ndarray
    gt: np.ndarray
    pred: np.ndarray
    flow_error_sum: np.ndarray
    flow_tp: np.ndarray
    flow_all_error_sum: np.ndarray
    flow_all_count: np.ndarray
    confusion: Optional[np.ndarray] = None
    num_samples: int = 1

    @classmethod
    def zeros(cls, num_classes: int, num_thresholds: int = len(RAY_IOU_THRESHOLDS),
              with_confusion: bool = False) -> "SampleStats":
        return cls(
            tp=np.zeros((num_thresholds, num_classes), np.int64), gt=np.zeros(num_classes, np.int64),
            pred=np.zeros(num_classes, np.int64), flow_error_sum=np.zeros(num_classes, np.float64),
            flow_tp=np.zeros(num_classes, np.int64), flow_all_error_sum=np.zeros(num_classes, np.float64),
            flow_all_count=np.zeros(num_classes, np.int64),
            confusion=np.zeros((num_classes, num_classes), np.int64) if with_confusion else None, num_samples=0)

    def __add__(self, other: "SampleStats") -> "SampleStats":
        if self.tp.shape != other.tp.shape:
            raise ValueError(f"SampleStats: cannot add counts of shape {self.tp.shape} and {other.tp.shape} "
                             "(different class lists or thresholds)")
        if (self.confusion is None) != (other.confusion is None):
            raise ValueError("SampleStats: cannot add stats with and without an Occ3D confusion matrix")
        return SampleStats(
            tp=self.tp + other.tp, gt=self.gt + other.gt, pred=self.pred + other.pred,
            flow_error_sum=self.flow_error_sum + other.flow_error_sum, flow_tp=self.flow_tp + other.flow_tp,
            flow_all_error_sum=self.flow_all_error_sum + other.flow_all_error_sum,
            flow_all_count=self.flow_all_count + other.flow_all_count,
            confusion=None if self.confusion is None else self.confusion + other.confusion,
            num_samples=self.num_samples + other.num_samples)

    @staticmethod
    def total(stats: Iterable["SampleStats"]) -> "SampleStats":
        stats = list(stats)
        if not stats:
            raise ValueError("SampleStats.total: no samples to add up")
        result = stats[0]
        for item in stats[1:]:
            result = result + item
        return result


@dataclass
class RaySampleResult:
    """The rays of one sample: prediction (and ground truth) class, depth and flow per ray.

    All arrays have N = K * R rays, origin-major. GT fields are None without ground truth.
    ``pred_depth``/``gt_depth`` are metres (float32 with ``ray_precision="official"``,
    float64 with ``"float64"``, see :class:`~voxelsplat.evaluation.ray_casting.RayCastResult`);
    ``*_depth_voxels`` float64 voxel units.
    """

    pred_class: torch.Tensor
    pred_depth: torch.Tensor
    pred_depth_voxels: torch.Tensor
    pred_flow: Optional[torch.Tensor]
    gt_class: Optional[torch.Tensor] = None
    gt_depth: Optional[torch.Tensor] = None
    gt_depth_voxels: Optional[torch.Tensor] = None
    gt_flow: Optional[torch.Tensor] = None
    counted: Optional[torch.Tensor] = field(default=None)  # (N,) bool: GT hit is not free
    ray_precision: str = "official"
    gt_voxel_index: Optional[torch.Tensor] = None  # (N,) int64 flat index of the GT stop voxel, -1: never entered


def _as_tensor(value: ArrayLike, name: str, token: str, device=None) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"sample {token}: {name} must be a numpy array or tensor, got {type(value).__name__}")
    return value.to(device) if device is not None else value


def _check_semantics(value: torch.Tensor, name: str, token: str, grid: OccupancyGrid, num_classes: int) -> torch.Tensor:
    if tuple(value.shape) != tuple(grid.shape):
        raise ValueError(f"sample {token}: {name} has shape {tuple(value.shape)}, expected the grid's (X, Y, Z) = "
                         f"{tuple(grid.shape)}")
    if value.is_floating_point() or value.dtype == torch.bool:
        raise ValueError(f"sample {token}: {name} must hold integer class indices, got {value.dtype}")
    value = value.long()
    low, high = int(value.min()), int(value.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"sample {token}: {name} holds class indices in [{low}, {high}], expected [0, "
                         f"{num_classes - 1}]")
    return value


def _check_flow(value: torch.Tensor, name: str, token: str, grid: OccupancyGrid) -> torch.Tensor:
    expected = tuple(grid.shape) + (2,)
    if tuple(value.shape) != expected:
        raise ValueError(f"sample {token}: {name} has shape {tuple(value.shape)}, expected the grid's (X, Y, Z, 2) = "
                         f"{expected}")
    if not value.is_floating_point():
        value = value.to(torch.float64)
    if not bool(torch.isfinite(value).all()):
        finite = torch.isfinite(value).all(-1)
        bad = [int(i) for i in (~finite).nonzero()[0]]
        raise ValueError(f"sample {token}: {name} has {int((~finite).sum())} voxels with non-finite values "
                         f"(first at voxel {bad})")
    return value


def cast_sample_rays(
    pred_semantics: ArrayLike,
    lidar_origins: ArrayLike,
    gt_semantics: Optional[ArrayLike] = None,
    pred_flow: Optional[ArrayLike] = None,
    gt_flow: Optional[ArrayLike] = None,
    *,
    num_classes: int,
    free_index: int,
    grid: OccupancyGrid = DEFAULT_GRID,
    ray_directions: Optional[torch.Tensor] = None,
    token: str = "<unknown>",
    ray_precision: str = "official",
) -> RaySampleResult:
    """Cast the benchmark's rays through one sample's prediction (and ground truth).

    Args:
        pred_semantics, gt_semantics: (X, Y, Z) integer class per voxel (``free_index`` = free).
        lidar_origins: (K, 3) ray origins, metres, ego frame of the grid.
        pred_flow, gt_flow: optional (X, Y, Z, 2) flow per voxel (m/s).
        ray_directions: (R, 3) unit directions; default :func:`lidar_ray_directions` (float32).
        token: sample token, named in error messages.
        ray_precision: ``"official"`` (the benchmark's float32 rays and depths) or
            ``"float64"`` (exact geometry); see :func:`~voxelsplat.evaluation.cast_rays`.
    The rays are cast on the device of ``pred_semantics``.
    """
    if ray_precision not in RAY_PRECISIONS:
        raise ValueError(f"cast_sample_rays: unknown ray_precision {ray_precision!r}, expected one of "
                         f"{RAY_PRECISIONS}")
    pred = _check_semantics(_as_tensor(pred_semantics, "prediction", token), "prediction", token, grid, num_classes)
    device = pred.device
    origins = _as_tensor(lidar_origins, "lidar_origins", token, device).to(torch.float64)
    if origins.dim() != 2 or origins.shape[1] != 3:
        raise ValueError(f"sample {token}: lidar_origins has shape {tuple(origins.shape)}, expected (K, 3)")
    if not bool(torch.isfinite(origins).all()):
        raise ValueError(f"sample {token}: lidar_origins holds non-finite values")
    directions = lidar_ray_directions(device=device) if ray_directions is None else \
        torch.as_tensor(ray_directions, device=device)
    if not directions.is_floating_point():
        directions = directions.to(torch.float64)
    volumes = [pred != free_index]
    gt = None
    if gt_semantics is not None:
        gt = _check_semantics(_as_tensor(gt_semantics, "ground truth", token, device), "ground truth", token, grid,
                              num_classes)
        volumes.insert(0, gt != free_index)
    cast: RayCastResult = cast_rays(torch.stack(volumes), origins, directions, grid, ray_precision=ray_precision)
    p = len(volumes) - 1  # the prediction's volume in the cast
    pred_index = cast.voxel_index[p]
    entered = pred_index >= 0
    safe_index = pred_index.clamp_min(0)
    pred_class = torch.where(entered, pred.reshape(-1)[safe_index], torch.full_like(safe_index, free_index))
    flow_p = None if pred_flow is None else flow_at_voxels(pred_flow, pred_index, grid, token, "predicted flow")
    result = RaySampleResult(pred_class=pred_class, pred_depth=cast.depth[p], pred_depth_voxels=cast.depth_voxels[p],
                             pred_flow=flow_p, ray_precision=ray_precision)
    if gt is not None:
        gt_index = cast.voxel_index[0].clamp_min(0)
        result.gt_class = torch.where(cast.voxel_index[0] >= 0, gt.reshape(-1)[gt_index],
                                      torch.full_like(gt_index, free_index))
        result.gt_depth, result.gt_depth_voxels = cast.depth[0], cast.depth_voxels[0]
        result.counted = cast.hit[0]
        result.gt_voxel_index = cast.voxel_index[0]
        if gt_flow is not None:
            result.gt_flow = flow_at_voxels(gt_flow, cast.voxel_index[0], grid, token, "ground-truth flow")
    return result


def flow_at_voxels(flow: ArrayLike, voxel_index: torch.Tensor, grid: OccupancyGrid, token: str,
                   name: str) -> torch.Tensor:
    """(N, 2) float64 flow read at the flat voxel indices of rays (``RayCastResult.voxel_index``),
    0 for rays that never entered the grid (index -1). ``flow`` (X, Y, Z, 2) is checked first
    (shape, finite values); ``name`` says which flow in error messages."""
    checked = _check_flow(_as_tensor(flow, name, token, voxel_index.device), name, token, grid)
    entered = voxel_index >= 0
    return checked.reshape(-1, 2)[voxel_index.clamp_min(0)].to(torch.float64) * entered[:, None]


# ray_precision="float64": depth errors within this many voxels below a threshold count as
# reaching it (rounding of the depths)
_DEPTH_TOLERANCE_VOXELS = 1e-9


def _threshold_voxels(threshold_m: float, voxel_size: float) -> float:
    return threshold_m / voxel_size - _DEPTH_TOLERANCE_VOXELS


def sample_stats(
    rays: RaySampleResult,
    *,
    num_classes: int,
    voxel_size: float,
    thresholds: Sequence[float] = RAY_IOU_THRESHOLDS,
    flow_threshold: float = MAVE_THRESHOLD,
) -> SampleStats:
    """Count one sample's rays (which must have been cast with ground truth).

    True positives are decided as ``rays.ray_precision`` says: ``"official"``:
    ``|pred_depth - gt_depth| < t`` in float32 metres; ``"float64"``: in voxel units,
    ``< t / voxel_size - 1e-9``."""
    if rays.gt_class is None:
        raise ValueError("sample_stats: the rays were cast without ground truth")
    counted = rays.counted
    gt_class = rays.gt_class[counted]
    pred_class = rays.pred_class[counted]
    match = gt_class == pred_class
    if rays.ray_precision == "official":
        error = (rays.pred_depth[counted].to(torch.float32) - rays.gt_depth[counted].to(torch.float32)).abs()

        def within(threshold: float) -> torch.Tensor:
            return error < threshold  # float32 comparison, as the challenge's script makes it
    else:
        error = (rays.pred_depth_voxels[counted] - rays.gt_depth_voxels[counted]).abs()

        def within(threshold: float) -> torch.Tensor:
            return error < _threshold_voxels(threshold, voxel_size)

    def per_class(classes, weights=None):
        return torch.bincount(classes, weights=weights, minlength=num_classes).cpu().numpy()

    tp = np.stack([per_class(gt_class[match & within(t)]) for t in thresholds]).astype(np.int64)
    stats = SampleStats(tp=tp, gt=per_class(gt_class).astype(np.int64), pred=per_class(pred_class).astype(np.int64),
                        flow_error_sum=np.zeros(num_classes, np.float64), flow_tp=np.zeros(num_classes, np.int64),
                        flow_all_error_sum=np.zeros(num_classes, np.float64),
                        flow_all_count=np.zeros(num_classes, np.int64))
    if rays.pred_flow is not None and rays.gt_flow is not None:
        flow_tp = match & within(flow_threshold)
        flow_error = (rays.pred_flow[counted].to(torch.float64) - rays.gt_flow[counted].to(torch.float64)).norm(dim=-1)
        # mAVE_TP: each class's own true positives
        stats.flow_error_sum = per_class(gt_class[flow_tp], flow_error[flow_tp]).astype(np.float64)
        stats.flow_tp = per_class(gt_class[flow_tp]).astype(np.int64)
        # mAVE (the challenge's): every counted ray of the sample, for each class with a true positive
        found = stats.flow_tp > 0
        stats.flow_all_error_sum = np.where(found, float(flow_error.sum()), 0.0).astype(np.float64)
        stats.flow_all_count = np.where(found, int(flow_error.numel()), 0).astype(np.int64)
    return stats


def occ3d_confusion(pred_semantics: ArrayLike, gt_semantics: ArrayLike, mask_camera: Optional[ArrayLike], *,
                    num_classes: int, token: str = "<unknown>", grid: OccupancyGrid = DEFAULT_GRID) -> np.ndarray:
    """(C, C) int64 voxel confusion matrix [gt, pred] over the voxels where ``mask_camera`` is set;
    every array of ``grid``'s (X, Y, Z) shape."""
    pred = _check_semantics(_as_tensor(pred_semantics, "prediction", token), "prediction", token, grid, num_classes)
    gt = _check_semantics(_as_tensor(gt_semantics, "ground truth", token, pred.device), "ground truth", token, grid,
                          num_classes)
    pred, gt = pred.reshape(-1), gt.reshape(-1)
    if mask_camera is not None:
        mask = _as_tensor(mask_camera, "mask_camera", token, pred.device)
        if tuple(mask.shape) != tuple(grid.shape):
            raise ValueError(f"sample {token}: mask_camera has shape {tuple(mask.shape)}, expected the grid's "
                             f"(X, Y, Z) = {tuple(grid.shape)}")
        mask = mask.reshape(-1).bool()
        pred, gt = pred[mask], gt[mask]
    counts = torch.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def ray_iou_table(stats: SampleStats) -> np.ndarray:
    """(T, C) float64 IoU per threshold and class (NaN where a class appears in neither)."""
    union = stats.gt[None, :] + stats.pred[None, :] - stats.tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, stats.tp / np.maximum(union, 1), np.nan)


def average_velocity_errors(stats: SampleStats, *, true_positives_only: bool = False) -> np.ndarray:
    """(C,) float64 AVE per class (m/s), NaN for classes never found at 2 m.

    Default: the challenge's definition (``AVE/<class>``: all counted rays of the samples in
    which the class has a 2 m true positive); ``true_positives_only``: the mean over the
    class's own 2 m true positives (``AVE_TP/<class>``)."""
    total, count = (stats.flow_error_sum, stats.flow_tp) if true_positives_only else \
        (stats.flow_all_error_sum, stats.flow_all_count)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def summarize(
    stats: SampleStats,
    class_names: Sequence[str],
    free_index: int,
    flow_classes: Optional[Sequence[int]] = None,
    thresholds: Sequence[float] = RAY_IOU_THRESHOLDS,
) -> Dict[str, float]:
    """The benchmark numbers from (summed) counts.

    Returns ``RayIoU``, ``RayIoU@<t>`` (percent), ``RayIoU/<class>`` (percent, mean over
    thresholds); with ``flow_classes``: ``mAVE``, ``AVE/<class>`` (the challenge's
    definition), ``mAVE_TP``, ``AVE_TP/<class>`` (true positives only; m/s) and
    ``OccScore`` (percent, from ``mAVE``); with a confusion matrix: ``mIoU`` and
    ``IoU/<class>`` (percent).
    """
    if len(class_names) != stats.gt.shape[0]:
        raise ValueError(f"summarize: {len(class_names)} class names for counts of {stats.gt.shape[0]} classes")
    keep = [c for c in range(len(class_names)) if c != free_index]
    iou = ray_iou_table(stats)[:, keep]
    results: Dict[str, float] = {"RayIoU": 100 * _nanmean(iou)}
    for j, t in enumerate(thresholds):
        results[f"RayIoU@{t:g}"] = 100 * _nanmean(iou[j])
    for column, c in enumerate(keep):
        results[f"RayIoU/{class_names[c]}"] = 100 * _nanmean(iou[:, column])
    if flow_classes is not None and len(flow_classes):
        flow_classes = list(flow_classes)
        for suffix, tp_only in (("", False), ("_TP", True)):
            ave = average_velocity_errors(stats, true_positives_only=tp_only)
            results[f"mAVE{suffix}"] = _nanmean(ave[flow_classes])
            for c in flow_classes:
                results[f"AVE{suffix}/{class_names[c]}"] = float(ave[c])
        ray_iou = results["RayIoU"] / 100
        results["OccScore"] = 100 * (0.9 * ray_iou + 0.1 * max(1.0 - results["mAVE"], 0.0)) \
            if not math.isnan(results["mAVE"]) else float("nan")
    if stats.confusion is not None:
        results.update(miou_from_confusion(stats.confusion, class_names, free_index))
    return results


def miou_from_confusion(confusion: np.ndarray, class_names: Sequence[str], free_index: int) -> Dict[str, float]:
    """Occ3D ``mIoU`` and ``IoU/<class>`` (percent) from a [gt, pred] confusion matrix."""
    diagonal = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - diagonal
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, diagonal / np.maximum(union, 1), np.nan)
    keep = [c for c in range(len(class_names)) if c != free_index]
    results = {"mIoU": 100 * _nanmean(iou[keep])}
    for c in keep:
        results[f"IoU/{class_names[c]}"] = 100 * float(iou[c])
    return results


def _label_set(spec: Optional[OccupancySpec], class_names, free_index, flow_classes, grid):
    """(class names, free index, flow classes, grid): the spec's (default OpenOcc v2 on the default
    grid) with the given parts in their place, checked together."""
    spec = OccupancySpec.for_label_set("openocc_v2") if spec is None else spec
    changes = dict(class_names=class_names, free_index=free_index, flow_classes=flow_classes, grid=grid)
    spec = replace(spec, **{k: v for k, v in changes.items() if v is not None})
    return list(spec.class_names), spec.free_index, list(spec.flow_classes), spec.grid


def compute_ray_metrics(
    pred_semantics: Sequence[ArrayLike],
    gt_semantics: Sequence[ArrayLike],
    lidar_origins: Sequence[ArrayLike],
    pred_flows: Optional[Sequence[ArrayLike]] = None,
    gt_flows: Optional[Sequence[ArrayLike]] = None,
    *,
    spec: Optional[OccupancySpec] = None,
    class_names: Optional[Sequence[str]] = None,
    free_index: Optional[int] = None,
    flow_classes: Optional[Sequence[int]] = None,
    grid: Optional[OccupancyGrid] = None,
    ray_directions: Optional[torch.Tensor] = None,
    ray_precision: str = "official",
) -> Dict[str, float]:
    """RayIoU (and, with flows, mAVE, mAVE_TP and OccScore) of a list of samples.

    Args:
        pred_semantics, gt_semantics: per sample an (X, Y, Z) integer class array.
        lidar_origins: per sample a (K, 3) array of ray origins (metres, ego frame).
        pred_flows, gt_flows: per sample an (X, Y, Z, 2) flow array (m/s), or None for
            RayIoU only.
        spec: label set and grid of the arrays (default: OpenOcc v2 on the default grid).
        class_names, free_index, flow_classes, grid: override parts of the spec.
        ray_directions: (R, 3) override of the LiDAR pattern (tests, ablations).
        ray_precision: ``"official"`` (default: the benchmark's float32 rays, depths and
            depth comparison) or ``"float64"`` (exact geometry, see the module docstring).
    Returns:
        See :func:`summarize`.
    """
    if not (len(pred_semantics) == len(gt_semantics) == len(lidar_origins)):
        raise ValueError(f"compute_ray_metrics: {len(pred_semantics)} predictions, {len(gt_semantics)} ground "
                         f"truths and {len(lidar_origins)} origin sets; expected one of each per sample")
    if (pred_flows is None) != (gt_flows is None):
        raise ValueError("compute_ray_metrics: pass both pred_flows and gt_flows (mAVE) or neither (RayIoU only)")
    with_flow = pred_flows is not None
    if with_flow and not (len(pred_flows) == len(gt_flows) == len(pred_semantics)):
        raise ValueError("compute_ray_metrics: expected one predicted and one ground-truth flow per sample")
    if not len(pred_semantics):
        raise ValueError("compute_ray_metrics: no samples")
    class_names, free_index, flow_classes, grid = _label_set(spec, class_names, free_index, flow_classes, grid)
    per_sample: List[SampleStats] = []
    for i in range(len(pred_semantics)):
        rays = cast_sample_rays(
            pred_semantics[i], lidar_origins[i], gt_semantics[i],
            pred_flows[i] if with_flow else None, gt_flows[i] if with_flow else None,
            num_classes=len(class_names), free_index=free_index, grid=grid, ray_directions=ray_directions,
            token=f"#{i}", ray_precision=ray_precision)
        per_sample.append(sample_stats(rays, num_classes=len(class_names), voxel_size=grid.voxel_size))
    return summarize(SampleStats.total(per_sample), class_names, free_index, flow_classes if with_flow else None)


def compute_occ3d_miou(
    pred_semantics: Sequence[ArrayLike],
    gt_semantics: Sequence[ArrayLike],
    masks_camera: Sequence[Optional[ArrayLike]],
    *,
    spec: Optional[OccupancySpec] = None,
    class_names: Optional[Sequence[str]] = None,
    free_index: Optional[int] = None,
    grid: Optional[OccupancyGrid] = None,
) -> Dict[str, float]:
    """Occ3D mIoU of a list of samples (confusion over camera-visible voxels; None = all voxels).
    ``spec``: label set and grid (default OpenOcc v2 on the default grid); ``class_names`` /
    ``free_index`` / ``grid`` override parts of it."""
    class_names, free_index, _, grid = _label_set(spec, class_names, free_index, None, grid)
    if not (len(pred_semantics) == len(gt_semantics) == len(masks_camera)):
        raise ValueError("compute_occ3d_miou: expected one prediction, ground truth and mask per sample")
    confusion = np.zeros((len(class_names), len(class_names)), np.int64)
    for i, (pred, gt, mask) in enumerate(zip(pred_semantics, gt_semantics, masks_camera)):
        confusion += occ3d_confusion(pred, gt, mask, num_classes=len(class_names), token=f"#{i}",
                                    grid=grid)
    return miou_from_confusion(confusion, class_names, free_index)
