"""Single source of truth for the occupancy label sets and the voxel grid.

Class names, the free index, flow classes and grid geometry reach the rest of the
library through detectron2's ``MetadataCatalog`` (see :func:`occupancy_metadata`);
this module is where those values are defined, once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

# OpenOcc v2 order (the default label set): 16 semantic classes + free.
OPENOCC_V2_CLASSES: Tuple[str, ...] = (
    "car", "truck", "trailer", "bus", "construction_vehicle", "bicycle", "motorcycle",
    "pedestrian", "traffic_cone", "barrier", "driveable_surface", "other_flat", "sidewalk",
    "terrain", "manmade", "vegetation", "free",
)
# Occ3D-nuScenes order: "others" first, free last.
OCC3D_CLASSES: Tuple[str, ...] = (
    "others", "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle",
    "pedestrian", "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat",
    "sidewalk", "terrain", "manmade", "vegetation", "free",
)
# Classes whose voxels carry velocity (OpenOcc v2 indices 0-7).
FLOW_CLASS_NAMES: Tuple[str, ...] = OPENOCC_V2_CLASSES[:8]

LABEL_SETS: Dict[str, Tuple[str, ...]] = {"openocc_v2": OPENOCC_V2_CLASSES, "occ3d": OCC3D_CLASSES}

# Label of voxels without ground truth (no loss, never a Gaussian), e.g. the corners a BEV
# rotation brings into the grid.
IGNORE_LABEL = 255

# Voxels per class in the nuScenes ground truth, keyed by label set and class name: the
# statistics the released recipe weights its focal loss with (``1 / log(count)``).
# OpenOcc v2: the counts of the VoxelSplat release (every voxel of the trainval keyframes);
# Occ3D: the Occ3D-nuScenes training-set counts FB-Occ ships.
NUSCENES_VOXEL_COUNTS: Dict[str, Dict[str, int]] = {
    "openocc_v2": {
        "car": 89275612, "truck": 30702871, "trailer": 14707768, "bus": 13641797, "construction_vehicle": 5860037,
        "bicycle": 388063, "motorcycle": 543072, "pedestrian": 5070078, "traffic_cone": 846475, "barrier": 4671687,
        "driveable_surface": 468293495, "other_flat": 13572616, "sidewalk": 151618193, "terrain": 211187466,
        "manmade": 382769006, "vegetation": 454647803, "free": 20007563961,
    },
    "occ3d": {
        "others": 944004, "barrier": 1897170, "bicycle": 152386, "bus": 2391677, "car": 16957802,
        "construction_vehicle": 724139, "motorcycle": 189027, "pedestrian": 2074468, "traffic_cone": 413451,
        "trailer": 2384460, "truck": 5916653, "driveable_surface": 175883646, "other_flat": 4275424,
        "sidewalk": 51393615, "terrain": 61411620, "manmade": 105975596, "vegetation": 116424404,
        "free": 1892500630,
    },
}


def nuscenes_voxel_counts(gt_format: str) -> List[int]:
    """Per-class nuScenes voxel counts of a label set, in its class order."""
    if gt_format not in NUSCENES_VOXEL_COUNTS:
        raise KeyError(f"no nuScenes voxel counts for gt_format {gt_format!r}; known: {sorted(NUSCENES_VOXEL_COUNTS)}")
    counts = NUSCENES_VOXEL_COUNTS[gt_format]
    return [counts[name] for name in LABEL_SETS[gt_format]]


@dataclass(frozen=True)
class OccupancyGrid:
    """Axis-aligned voxel grid in the ego frame of a keyframe (x forward, y left, z up).

    Arrays over the grid are indexed ``[x, y, z]``; voxel ``(i, j, k)`` has centre
    ``range_min + voxel_size * (index + 0.5)``.

    Attributes:
        point_cloud_range: (x_min, y_min, z_min, x_max, y_max, z_max) in metres.
        voxel_size: edge length in metres (cubic voxels).
    """

    point_cloud_range: Tuple[float, float, float, float, float, float] = (-40.0, -40.0, -1.0, 40.0, 40.0, 5.4)
    voxel_size: float = 0.4

    @property
    def shape(self) -> Tuple[int, int, int]:
        lo, hi = np.array(self.point_cloud_range[:3]), np.array(self.point_cloud_range[3:])
        return tuple(int(round(v)) for v in (hi - lo) / self.voxel_size)

    @property
    def range_min(self) -> np.ndarray:
        return np.asarray(self.point_cloud_range[:3], dtype=np.float64)

    @property
    def range_max(self) -> np.ndarray:
        return np.asarray(self.point_cloud_range[3:], dtype=np.float64)

    def voxel_centers(self) -> np.ndarray:
        """Centres of all voxels, float64 array of shape (X, Y, Z, 3), metres, ego frame."""
        axes = [self.range_min[a] + self.voxel_size * (np.arange(n) + 0.5) for a, n in enumerate(self.shape)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)

    def index_to_center(self, index: np.ndarray) -> np.ndarray:
        """(..., 3) integer voxel indices -> (..., 3) centres in metres."""
        return self.range_min + self.voxel_size * (np.asarray(index, dtype=np.float64) + 0.5)

    def point_to_index(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) points in metres -> (..., 3) int64 voxel indices (may fall outside the grid)."""
        return np.floor((np.asarray(points, dtype=np.float64) - self.range_min) / self.voxel_size).astype(np.int64)

    def contains_index(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index)
        return np.all((index >= 0) & (index < np.asarray(self.shape)), axis=-1)


DEFAULT_GRID = OccupancyGrid()


def openocc_to_occ3d_lut() -> np.ndarray:
    """uint8 lookup table mapping OpenOcc v2 class indices to Occ3D class indices."""
    return np.array([OCC3D_CLASSES.index(n) for n in OPENOCC_V2_CLASSES], dtype=np.uint8)


def occupancy_metadata(gt_format: str = "openocc_v2", grid: OccupancyGrid = DEFAULT_GRID) -> dict:
    """Metadata entries for a dataset in ``MetadataCatalog`` (class names, free index,
    flow classes, grid). ``gt_format`` is "openocc_v2" or "occ3d"."""
    if gt_format not in LABEL_SETS:
        raise KeyError(f"unknown gt_format {gt_format!r}; expected one of {sorted(LABEL_SETS)}")
    names: List[str] = list(LABEL_SETS[gt_format])
    return dict(
        gt_format=gt_format,
        class_names=names,
        thing_classes=names,  # detectron2 tooling (visualizer) reads this name
        free_index=names.index("free"),
        flow_class_names=list(FLOW_CLASS_NAMES),
        flow_classes=[names.index(n) for n in FLOW_CLASS_NAMES],
        point_cloud_range=list(grid.point_cloud_range),
        voxel_size=grid.voxel_size,
        grid_shape=list(grid.shape),
    )


def grid_from_metadata(meta) -> OccupancyGrid:
    """Rebuild the grid from a ``MetadataCatalog`` entry (or a dict with the same keys)."""
    get = meta.get if isinstance(meta, dict) else (lambda k: getattr(meta, k))
    grid = OccupancyGrid(tuple(float(v) for v in get("point_cloud_range")), float(get("voxel_size")))
    return grid
