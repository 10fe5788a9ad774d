"""The occupancy label sets, the voxel grid and :class:`OccupancySpec`, which carries both.

This module is where class names, the free index, the flow classes and the grid geometry are
defined, once. A dataset's registration puts its spec into detectron2's ``MetadataCatalog``
(:meth:`OccupancySpec.metadata`); configs build the model's spec from the dataset's
``gt_format`` (:func:`occupancy_spec`), and the model checks its first batch against it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

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
# Label sets whose ground truth carries per-voxel velocity.
LABEL_SETS_WITH_FLOW: Tuple[str, ...] = ("openocc_v2",)

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

    def index_to_center(self, index):
        """(..., 3) integer voxel indices -> (..., 3) centres in metres: float64 for an array; for a
        torch tensor a float32 tensor on its device."""
        if hasattr(index, "new_tensor"):  # torch.Tensor: stay on its device
            lo = index.new_tensor(self.range_min, dtype=torch.float32)
            return lo + self.voxel_size * (index.float() + 0.5)
        return self.range_min + self.voxel_size * (np.asarray(index, dtype=np.float64) + 0.5)

    def point_to_index(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) points in metres -> (..., 3) int64 voxel indices (may fall outside the grid)."""
        return np.floor((np.asarray(points, dtype=np.float64) - self.range_min) / self.voxel_size).astype(np.int64)

    def contains_index(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index)
        return np.all((index >= 0) & (index < np.asarray(self.shape)), axis=-1)

    def coarsened(self, factor: int) -> "OccupancyGrid":
        """The same range at ``factor`` times the voxel edge (e.g. a network's internal volume)."""
        if int(factor) != factor or factor < 1:
            raise ValueError(f"OccupancyGrid.coarsened: factor must be a positive integer, got {factor!r}")
        if any(n % int(factor) for n in self.shape):
            raise ValueError(f"OccupancyGrid.coarsened: grid {self.shape} is not divisible by {factor}")
        return OccupancyGrid(self.point_cloud_range, self.voxel_size * int(factor))

    def __post_init__(self):
        if len(self.point_cloud_range) != 6:
            raise ValueError(f"OccupancyGrid: point_cloud_range needs 6 values, got {self.point_cloud_range!r}")
        object.__setattr__(self, "point_cloud_range", tuple(float(v) for v in self.point_cloud_range))
        object.__setattr__(self, "voxel_size", float(self.voxel_size))
        if not self.voxel_size > 0:
            raise ValueError(f"OccupancyGrid: voxel_size must be > 0, got {self.voxel_size}")
        extent = self.range_max - self.range_min
        if np.any(extent <= 0):
            raise ValueError(f"OccupancyGrid: empty point_cloud_range {self.point_cloud_range}")
        cells = extent / self.voxel_size
        if np.any(np.abs(cells - np.round(cells)) > 1e-6):
            raise ValueError(f"OccupancyGrid: point_cloud_range {self.point_cloud_range} is not a whole number of "
                             f"{self.voxel_size} m voxels")


DEFAULT_GRID = OccupancyGrid()


def openocc_to_occ3d_lut() -> np.ndarray:
    """uint8 lookup table mapping OpenOcc v2 class indices to Occ3D class indices."""
    return np.array([OCC3D_CLASSES.index(n) for n in OPENOCC_V2_CLASSES], dtype=np.uint8)


@dataclass(frozen=True)
class OccupancySpec:
    """What a dataset's occupancy labels are: the label set and the voxel grid.

    Every component that depends on them takes the spec (or the parts it needs from it):
    the mapper, the model's projections, head, losses and regularizer, the evaluator.

    Attributes:
        label_set: the label set's name ("openocc_v2", "occ3d"), the datasets' ``gt_format``.
        class_names: class names in label order, free included.
        free_index: label of empty space.
        flow_classes: labels whose voxels carry velocity (the flow loss's and mAVE's classes).
        has_flow: whether the labels carry flow (OpenOcc v2 does, Occ3D does not).
        grid: the voxel grid of the labels.
    """

    label_set: str
    class_names: Tuple[str, ...]
    free_index: int
    flow_classes: Tuple[int, ...] = ()
    has_flow: bool = True
    grid: OccupancyGrid = field(default=DEFAULT_GRID)

    def __post_init__(self):
        object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))
        object.__setattr__(self, "flow_classes", tuple(int(c) for c in self.flow_classes))
        object.__setattr__(self, "free_index", int(self.free_index))
        if len(set(self.class_names)) != len(self.class_names) or not self.class_names:
            raise ValueError(f"OccupancySpec({self.label_set!r}): class_names must be non-empty and unique, "
                             f"got {self.class_names}")
        if not 0 <= self.free_index < self.num_classes:
            raise ValueError(f"OccupancySpec({self.label_set!r}): free_index {self.free_index} outside "
                             f"[0, {self.num_classes})")
        bad = [c for c in self.flow_classes if not 0 <= c < self.num_classes or c == self.free_index]
        if bad:
            raise ValueError(f"OccupancySpec({self.label_set!r}): flow_classes {bad} are not occupied classes of "
                             f"[0, {self.num_classes})")
        if not isinstance(self.grid, OccupancyGrid):
            raise TypeError(f"OccupancySpec({self.label_set!r}): grid must be an OccupancyGrid, got "
                            f"{type(self.grid).__name__}")

    @property
    def num_classes(self) -> int:
        """Number of labels, free included."""
        return len(self.class_names)

    @classmethod
    def for_label_set(cls, label_set: str, grid: OccupancyGrid = DEFAULT_GRID) -> "OccupancySpec":
        """The spec of a known label set (``LABEL_SETS``) on ``grid``."""
        if label_set not in LABEL_SETS:
            raise KeyError(f"unknown label set (gt_format) {label_set!r}; expected one of {sorted(LABEL_SETS)}")
        names = LABEL_SETS[label_set]
        return cls(label_set=label_set, class_names=names, free_index=names.index("free"),
                   flow_classes=tuple(names.index(n) for n in FLOW_CLASS_NAMES),
                   has_flow=label_set in LABEL_SETS_WITH_FLOW, grid=grid)

    def metadata(self) -> dict:
        """The spec as ``MetadataCatalog`` entries (plain values; :meth:`from_metadata` inverts it)."""
        names = list(self.class_names)
        return dict(
            gt_format=self.label_set,
            class_names=names,
            thing_classes=names,  # detectron2 tooling (visualizer) reads this name
            free_index=self.free_index,
            flow_class_names=[names[c] for c in self.flow_classes],
            flow_classes=list(self.flow_classes),
            has_flow=self.has_flow,
            point_cloud_range=list(self.grid.point_cloud_range),
            voxel_size=self.grid.voxel_size,
            grid_shape=list(self.grid.shape),
        )

    @classmethod
    def from_metadata(cls, meta) -> "OccupancySpec":
        """The spec of a ``MetadataCatalog`` entry (or a dict with :meth:`metadata`'s keys)."""
        get = meta.get if isinstance(meta, Mapping) else (lambda k, d=None: getattr(meta, k, d))
        missing = [k for k in ("gt_format", "free_index", "point_cloud_range", "voxel_size") if get(k) is None]
        names = get("thing_classes") or get("class_names")
        if missing or not names:
            name = get("name") or "(metadata)"
            raise KeyError(f"dataset {name!r}: metadata lacks the occupancy spec entries "
                           f"{missing + ([] if names else ['class_names'])}; register it with "
                           f"voxelsplat.data.register_nuscenes_occupancy")
        flow = get("flow_classes")
        return cls(label_set=str(get("gt_format")), class_names=tuple(names), free_index=int(get("free_index")),
                   flow_classes=tuple(flow) if flow is not None else (),
                   has_flow=bool(get("has_flow", get("gt_format") in LABEL_SETS_WITH_FLOW)),
                   grid=grid_from_metadata(meta))

    def describe(self) -> str:
        """Short text for error messages: label set, class count, grid."""
        shape = "x".join(str(n) for n in self.grid.shape)
        return (f"{self.label_set} ({self.num_classes} classes, free = {self.free_index}, grid {shape} of "
                f"{self.grid.voxel_size:g} m)")


# A dataset whose labels lie on another grid than the default says so in this file at its root
# (the synthetic generator writes it); nuScenes' OpenOcc v2 / Occ3D labels have none.
GRID_FILE = "occupancy_grid.json"


def grid_to_json(grid: OccupancyGrid) -> str:
    """The text of a :data:`GRID_FILE` describing ``grid``."""
    return json.dumps({"point_cloud_range": list(grid.point_cloud_range), "voxel_size": grid.voxel_size,
                       "grid_shape": list(grid.shape)}, indent=1) + "\n"


def dataset_grid(dataroot: Optional[str]) -> OccupancyGrid:
    """The grid of the labels under ``dataroot``: the one its :data:`GRID_FILE` describes, else
    (no file, or no dataroot) the default grid. A file that cannot be read as a grid is an
    error naming it."""
    if not dataroot:
        return DEFAULT_GRID
    path = os.path.join(str(dataroot), GRID_FILE)
    if not os.path.isfile(path):
        return DEFAULT_GRID
    try:
        with open(path) as f:
            entries = json.load(f)
        grid = OccupancyGrid(tuple(float(v) for v in entries["point_cloud_range"]), float(entries["voxel_size"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a readable occupancy grid ({type(error).__name__}: {error}); expected JSON "
                         f"with point_cloud_range (6 numbers) and voxel_size") from error
    shape = entries.get("grid_shape")
    if shape is not None and [int(v) for v in shape] != list(grid.shape):
        raise ValueError(f"{path}: grid_shape {shape} disagrees with point_cloud_range {grid.point_cloud_range} "
                         f"at {grid.voxel_size} m voxels ({list(grid.shape)})")
    return grid


def occupancy_spec(label_set: str = "openocc_v2", point_cloud_range: Optional[Sequence[float]] = None,
                   voxel_size: Optional[float] = None, dataroot: Optional[str] = None) -> OccupancySpec:
    """The :class:`OccupancySpec` of a label set (LazyConfig entry point:
    ``L(occupancy_spec)(label_set="${dataloader.train.dataset.gt_format}",
    dataroot="${dataloader.train.dataset.dataroot}")``). The grid: ``point_cloud_range`` /
    ``voxel_size`` where given, else the grid of the dataset at ``dataroot``
    (:func:`dataset_grid`: the default grid unless its root has a :data:`GRID_FILE`)."""
    grid = dataset_grid(dataroot)
    if point_cloud_range is not None or voxel_size is not None:
        grid = OccupancyGrid(tuple(point_cloud_range if point_cloud_range is not None else grid.point_cloud_range),
                             float(voxel_size if voxel_size is not None else grid.voxel_size))
    return OccupancySpec.for_label_set(label_set, grid)


def volume_grid(spec: OccupancySpec, downsample: int) -> OccupancyGrid:
    """A network's internal volume: the spec's grid at ``downsample`` times its voxel edge
    (the released FB-Occ: 2, 0.8 m voxels, 100x100x8)."""
    return spec.grid.coarsened(downsample)


def check_grid(grid, owner: str) -> OccupancyGrid:
    """``grid`` if it is an :class:`OccupancyGrid`, else a TypeError naming ``owner``."""
    if not isinstance(grid, OccupancyGrid):
        raise TypeError(f"{owner}: grid must be an OccupancyGrid (e.g. voxelsplat.structures.volume_grid(spec, 2)), "
                        f"got {type(grid).__name__}")
    return grid


def occupancy_metadata(gt_format: str = "openocc_v2", grid: OccupancyGrid = DEFAULT_GRID) -> dict:
    """``MetadataCatalog`` entries of a known label set on ``grid`` (see :meth:`OccupancySpec.metadata`)."""
    return OccupancySpec.for_label_set(gt_format, grid).metadata()


def grid_from_metadata(meta) -> OccupancyGrid:
    """The grid of a ``MetadataCatalog`` entry (or a dict with the same keys)."""
    get = meta.get if isinstance(meta, Mapping) else (lambda k: getattr(meta, k))
    return OccupancyGrid(tuple(float(v) for v in get("point_cloud_range")), float(get("voxel_size")))
