"""Evaluation: ray casting, RayIoU / mAVE / OccScore, Occ3D mIoU and the detectron2 evaluator.
The floors (predictors that need no model) are scored by :mod:`voxelsplat.engine.floors`."""
from .evaluator import OccupancyEvaluator
from .submission import SubmissionSpool, write_submission
from .ray_casting import (
    RAY_PRECISIONS,
    RayCastResult,
    cast_rays,
    lidar_pitch_angles,
    lidar_ray_directions,
    ray_geometry_voxels,
)
from .ray_metrics import (
    MAVE_THRESHOLD,
    RAY_IOU_THRESHOLDS,
    SampleStats,
    cast_sample_rays,
    compute_occ3d_miou,
    compute_ray_metrics,
    sample_stats,
    summarize,
)

from .statistics import (
    SAMPLE_STATS_FILE,
    GateResult,
    PairedBootstrapResult,
    benchmark_gate,
    format_markdown,
    paired_bootstrap,
    sample_stats_from_arrays,
    sample_stats_to_arrays,
)

__all__ = [
    "SubmissionSpool",
    "write_submission",
    "OccupancyEvaluator",
    "SAMPLE_STATS_FILE",
    "GateResult",
    "PairedBootstrapResult",
    "benchmark_gate",
    "format_markdown",
    "paired_bootstrap",
    "sample_stats_from_arrays",
    "sample_stats_to_arrays",
    "RAY_PRECISIONS",
    "RayCastResult",
    "cast_rays",
    "lidar_pitch_angles",
    "lidar_ray_directions",
    "ray_geometry_voxels",
    "MAVE_THRESHOLD",
    "RAY_IOU_THRESHOLDS",
    "SampleStats",
    "cast_sample_rays",
    "compute_occ3d_miou",
    "compute_ray_metrics",
    "sample_stats",
    "summarize",
]
