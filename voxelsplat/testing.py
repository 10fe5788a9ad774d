"""Fake mapped samples for tests and benchmarks: a street scene on any :class:`OccupancySpec`'s
grid, seen by a ring of outward-looking cameras.

Each sample is what :class:`~voxelsplat.data.TemporalDatasetMapper` returns for one keyframe
(the contract in :mod:`voxelsplat.structures.sample_fields`) and passes
:func:`~voxelsplat.structures.sample_fields.check_sample` before it is returned, so a model, a
loss or an evaluator can be run without a dataset on disk::

    from voxelsplat.structures import OccupancySpec
    from voxelsplat.testing import make_sample

    spec = OccupancySpec.for_label_set("occ3d")
    sample = make_sample(spec, seed=0, image_size=(176, 64))
    outputs = model([sample])

The scene, in the ego frame (x forward, y left, z up) of the keyframe:

- ground below ``ground_height``: a road along x, sidewalks beside it, terrain beyond;
- static structures (buildings, vegetation) behind the sidewalks;
- vehicles standing on the road, clear of the ego's lane, moving along it with their velocity
  in ``occ_flow`` when their class is one of the spec's flow classes (and the label set has flow);
- free space everywhere else.

Classes are looked up by name in ``spec.class_names``, sizes are given in metres and turned into
voxels with the spec's grid, so the same call works for both label sets and for any grid. All
randomness comes from ``seed``: the same arguments give the same sample.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from voxelsplat.structures import OccupancySpec
from voxelsplat.structures.sample_fields import check_sample
from voxelsplat.utils.geometry import invert_transform, select_lidar_origins

__all__ = [
    "KEYFRAME_INTERVAL_S",
    "VEHICLE_SIZES_M",
    "camera_ring",
    "make_sample",
    "make_sequence",
    "render_views",
    "street_labels",
]

# nuScenes keyframes (LiDAR sweeps with annotations) come at 2 Hz.
KEYFRAME_INTERVAL_S = 0.5
# Height of the nuScenes roof LiDAR above the ego origin (m).
LIDAR_HEIGHT_M = 1.84
# (length, width, height) in metres of typical objects of the nuScenes flow classes; classes not
# listed get DEFAULT_VEHICLE_SIZE_M.
VEHICLE_SIZES_M: Dict[str, Tuple[float, float, float]] = {
    "car": (4.6, 1.9, 1.6),
    "truck": (7.0, 2.5, 2.8),
    "bus": (11.0, 2.9, 3.4),
    "trailer": (9.0, 2.6, 3.4),
    "construction_vehicle": (6.4, 2.8, 3.0),
    "bicycle": (1.8, 0.6, 1.3),
    "motorcycle": (2.1, 0.8, 1.5),
    "pedestrian": (0.7, 0.7, 1.8),
}
DEFAULT_VEHICLE_SIZE_M = (4.0, 2.0, 1.6)
# Sideways gap (m) between a vehicle and the ego's path (y = 0), so that no LiDAR origin or
# camera sits inside an object.
_EGO_LANE_CLEARANCE_M = 0.6


def _default_spec(spec: Optional[OccupancySpec]) -> OccupancySpec:
    if spec is None:
        return OccupancySpec.for_label_set("openocc_v2")
    if not isinstance(spec, OccupancySpec):
        raise TypeError(f"voxelsplat.testing: spec must be an OccupancySpec, got {type(spec).__name__}")
    return spec


def _class_indices(spec: OccupancySpec, names: Sequence[str], role: str) -> List[int]:
    """Labels of ``names`` in ``spec``; a KeyError naming the missing class and the role."""
    missing = [name for name in names if name not in spec.class_names]
    if missing:
        raise KeyError(f"voxelsplat.testing: {role} {missing} are not classes of {spec.describe()}; "
                       f"classes: {list(spec.class_names)}")
    return [spec.class_names.index(name) for name in names]


def _image_size(image_size: Sequence[int], name: str) -> Tuple[int, int]:
    if len(image_size) != 2 or any(int(v) != v or v < 1 for v in image_size):
        raise ValueError(f"voxelsplat.testing: {name} must be (width, height) in pixels, got {tuple(image_size)}")
    return int(image_size[0]), int(image_size[1])


# --------------------------------------------------------------------------------------------- cameras
def camera_ring(num_cameras: int = 6, image_size: Sequence[int] = (176, 64), *, horizontal_fov_deg: float = 70.0,
                mount_height: float = 1.6, mount_radius: float = 0.5,
                position: Sequence[float] = (0.0, 0.0)) -> Dict[str, torch.Tensor]:
    """A ring of ``num_cameras`` pinhole cameras looking outwards, horizontally.

    Camera ``n`` looks along the ego-frame yaw ``2 pi n / num_cameras`` (camera 0 forward, +x;
    then counter-clockwise, towards +y) from ``position + mount_radius * (cos yaw, sin yaw)`` at
    ``mount_height`` metres. Its image is ``image_size`` = (W, H) pixels with the principal point
    at the image centre and square pixels, ``fx = fy = W / (2 tan(horizontal_fov_deg / 2))``.

    Returns:
        dict with ``intrinsics`` (C, 3, 3) float32 and ``cam2ego`` (C, 4, 4) float32, OpenCV
        cameras (x right, y down, z forward) to the ego frame (x forward, y left, z up): the
        fields of a mapped sample.
    """
    if int(num_cameras) < 1:
        raise ValueError(f"camera_ring: num_cameras must be >= 1, got {num_cameras}")
    if not 0.0 < horizontal_fov_deg < 180.0:
        raise ValueError(f"camera_ring: horizontal_fov_deg must be in (0, 180), got {horizontal_fov_deg}")
    width, height = _image_size(image_size, "camera_ring image_size")
    focal = width / (2.0 * math.tan(math.radians(horizontal_fov_deg) / 2.0))
    intrinsics = torch.tensor([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]],
                              dtype=torch.float64).repeat(int(num_cameras), 1, 1)
    cam2ego = torch.zeros(int(num_cameras), 4, 4, dtype=torch.float64)
    for n in range(int(num_cameras)):
        yaw = 2.0 * math.pi * n / int(num_cameras)
        forward = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0], dtype=torch.float64)
        right = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0], dtype=torch.float64)
        down = torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
        cam2ego[n, :3, :3] = torch.stack([right, down, forward], dim=1)
        cam2ego[n, :3, 3] = torch.tensor([position[0] + mount_radius * math.cos(yaw),
                                          position[1] + mount_radius * math.sin(yaw), mount_height])
        cam2ego[n, 3, 3] = 1.0
    return {"intrinsics": intrinsics.float(), "cam2ego": cam2ego.float()}


def render_views(intrinsics: torch.Tensor, cam2ego: torch.Tensor, image_size: Sequence[int], scale: float = 1.0, *,
                 frame_offsets: Sequence[int] = (0,), ego_velocity: Sequence[float] = (0.0, 0.0),
                 keyframe_interval: float = KEYFRAME_INTERVAL_S) -> Dict[str, object]:
    """The VoxelSplat regularizer's render fields for a camera rig: the rig's cameras at
    ``scale`` times their resolution, at each keyframe offset.

    The ego moves at the constant ``ego_velocity`` (vx, vy) m/s of the current ego frame, so the
    cameras of keyframe ``t + o`` sit ``o * keyframe_interval * ego_velocity`` further along (no
    rotation); their time offset is ``o * keyframe_interval`` seconds.

    Args:
        intrinsics: (C, 3, 3) intrinsics of images of ``image_size``.
        cam2ego: (C, 4, 4) OpenCV camera -> current ego frame.
        image_size: (W, H) of the cameras' images.
        scale: render resolution relative to ``image_size``.
        frame_offsets: keyframe offsets of the views, e.g. (-1, 0, 1).
    Returns:
        dict (V = len(frame_offsets) * C views, offset-major) with ``render_viewmats`` (V, 4, 4)
        float32 (= inv(moved cam2ego)), ``render_intrinsics`` (V, 3, 3) float32 (rows 0 and 1 scaled
        by the exact per-axis render/image size ratios), ``render_image_size`` (W, H) ints,
        ``render_frame_offsets`` (V,) int64 and ``render_time_offsets`` (V,) float32: the
        ``REGULARIZER_FIELDS`` of :mod:`voxelsplat.structures.sample_fields` but the Gaussians.
    """
    width, height = _image_size(image_size, "render_views image_size")
    if not scale > 0:
        raise ValueError(f"render_views: scale must be > 0, got {scale}")
    render_size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
    pixel_scale = torch.diag(torch.tensor([render_size[0] / width, render_size[1] / height, 1.0], dtype=torch.float64))
    cam2ego = torch.as_tensor(cam2ego, dtype=torch.float64)
    intrinsics = torch.as_tensor(intrinsics, dtype=torch.float64)
    viewmats, offsets = [], []
    for offset in (int(o) for o in frame_offsets):
        moved = cam2ego.clone()
        moved[:, 0, 3] += offset * keyframe_interval * float(ego_velocity[0])
        moved[:, 1, 3] += offset * keyframe_interval * float(ego_velocity[1])
        viewmats.append(invert_transform(moved))
        offsets += [offset] * len(cam2ego)
    offsets = torch.tensor(offsets, dtype=torch.int64)
    return {
        "render_viewmats": torch.cat(viewmats).float(),
        "render_intrinsics": (pixel_scale @ intrinsics).repeat(len(frame_offsets), 1, 1).float(),
        "render_image_size": render_size,
        "render_frame_offsets": offsets,
        "render_time_offsets": (offsets.double() * keyframe_interval).float(),
    }


# --------------------------------------------------------------------------------------------- labels
def _index_range(grid, axis: int, low_m: float, high_m: float) -> slice:
    """Voxels of ``axis`` whose centres lie in [low_m, high_m), at least one, inside the grid."""
    size = grid.shape[axis]
    first = int(math.ceil((low_m - grid.range_min[axis]) / grid.voxel_size - 0.5))
    stop = int(math.ceil((high_m - grid.range_min[axis]) / grid.voxel_size - 0.5))
    first = min(max(first, 0), size - 1)
    return slice(first, min(max(stop, first + 1), size))


def street_labels(spec: Optional[OccupancySpec] = None, seed: int = 0, *, num_vehicles: int = 5,
                  vehicle_classes: Optional[Sequence[str]] = None, speed_range: Tuple[float, float] = (2.0, 8.0),
                  ground_classes: Sequence[str] = ("driveable_surface", "sidewalk", "terrain"),
                  structure_classes: Sequence[str] = ("manmade", "vegetation"),
                  ground_height: float = 0.0, road_half_width: float = 7.0,
                  sidewalk_width: float = 3.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """GT labels of a street on ``spec``'s grid.

    Layout (metres, ego frame): voxels whose centre lies below ``ground_height`` (at least the
    lowest layer) are ground: ``ground_classes[0]`` for ``|y| < road_half_width``,
    ``ground_classes[1]`` for the next ``sidewalk_width``, ``ground_classes[2]`` beyond (a class
    list shorter than three repeats its last class). Behind the sidewalks, blocks 3-12 m long, 2-5 m
    deep and 2-8 m high (clipped to the grid) of ``structure_classes`` line both sides, with gaps.
    ``num_vehicles`` boxes of ``VEHICLE_SIZES_M`` stand on the ground, on the road but clear of
    the ego's path (``|y| >= 0.6 m``), each of a class drawn from ``vehicle_classes`` (default: car,
    truck and bus where the spec has them as flow classes, else all its flow classes) and moving
    along x at a speed drawn from ``speed_range`` m/s (plus a sideways component of at most 20%).
    On a small grid the bands shrink with it: the road to at most 35% and the sidewalk to 15% of
    the grid's smaller half-width, so that structures stay inside.

    Returns:
        ``(semantics, flow)``: (X, Y, Z) int64 labels of ``spec`` and (X, Y, Z, 2) float32
        velocity (vx, vy) in m/s, non-zero only on vehicles of the spec's flow classes and only
        when ``spec.has_flow``.
    """
    spec = _default_spec(spec)
    grid = spec.grid
    ground = _class_indices(spec, ground_classes, "ground_classes")
    structures = _class_indices(spec, structure_classes, "structure_classes") if structure_classes else []
    if vehicle_classes is None:
        flow_names = [spec.class_names[c] for c in spec.flow_classes]
        vehicle_classes = [n for n in ("car", "truck", "bus") if n in flow_names] or flow_names
        if num_vehicles and not vehicle_classes:
            raise ValueError(f"street_labels: {spec.describe()} has no flow classes to draw vehicles from; "
                             "pass vehicle_classes or num_vehicles=0")
    vehicles = _class_indices(spec, vehicle_classes, "vehicle_classes") if num_vehicles else []
    if not ground:
        raise ValueError("street_labels: ground_classes must name at least one class")
    generator = torch.Generator().manual_seed(int(seed))

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))

    x_size, y_size, z_size = grid.shape
    semantics = torch.full((x_size, y_size, z_size), spec.free_index, dtype=torch.int64)
    flow = torch.zeros(x_size, y_size, z_size, 2, dtype=torch.float32)
    (x_min, y_min, z_min), (x_max, y_max, _) = grid.range_min, grid.range_max
    half_width = min(abs(y_min), abs(y_max)) if y_min < 0 < y_max else (y_max - y_min) / 2
    road = min(road_half_width, 0.35 * half_width)
    sidewalk = min(sidewalk_width, 0.15 * half_width)

    # ground bands by |y| of the voxel centres
    ground_z = _index_range(grid, 2, z_min, ground_height)
    y_centres = torch.from_numpy(grid.range_min[1] + grid.voxel_size * (np.arange(y_size) + 0.5)).abs()
    band = (y_centres >= road).long() + (y_centres >= road + sidewalk).long()
    band_class = torch.tensor([ground[min(b, len(ground) - 1)] for b in range(3)])
    semantics[:, :, ground_z] = band_class[band][None, :, None]
    top = ground_z.stop * grid.voxel_size + z_min  # ground top, metres

    # structures behind the sidewalks, both sides, in blocks along x
    if structures:
        for side in (-1.0, 1.0):
            near = road + sidewalk
            x = x_min
            while x < x_max:
                length = uniform(3.0, 12.0)
                if float(torch.rand((), generator=generator)) < 0.75:  # else a gap
                    depth, height = uniform(2.0, 5.0), uniform(2.0, 8.0)
                    label = structures[int(torch.randint(len(structures), (), generator=generator))]
                    y_low, y_high = (near, near + depth) if side > 0 else (-near - depth, -near)
                    semantics[_index_range(grid, 0, x, x + length), _index_range(grid, 1, y_low, y_high),
                              _index_range(grid, 2, top, top + height)] = label
                x += length + uniform(0.0, 3.0)

    # vehicles on the road, clear of the ego's path
    for _ in range(int(num_vehicles)):
        label = vehicles[int(torch.randint(len(vehicles), (), generator=generator))]
        length, width, height = VEHICLE_SIZES_M.get(spec.class_names[label], DEFAULT_VEHICLE_SIZE_M)
        length = min(length, (x_max - x_min) / 4)
        side = 1.0 if float(torch.rand((), generator=generator)) < 0.5 else -1.0
        lateral_room = max(road - width - _EGO_LANE_CLEARANCE_M, 0.0)
        y_centre = side * (_EGO_LANE_CLEARANCE_M + width / 2 + uniform(0.0, lateral_room))
        x_centre = uniform(x_min + length / 2, x_max - length / 2)
        speed = uniform(*speed_range) * -side  # traffic on each side drives its own way
        velocity = torch.tensor([speed, uniform(-0.2, 0.2) * abs(speed)], dtype=torch.float32)
        box = (_index_range(grid, 0, x_centre - length / 2, x_centre + length / 2),
               _index_range(grid, 1, y_centre - width / 2, y_centre + width / 2),
               _index_range(grid, 2, top, top + height))
        semantics[box] = label
        moving = spec.has_flow and label in spec.flow_classes
        flow[box] = velocity if moving else torch.zeros(2)
    return semantics, flow


# --------------------------------------------------------------------------------------------- sensors
def _lidar_depth(semantics: torch.Tensor, spec: OccupancySpec, cameras: Dict[str, torch.Tensor],
                 image_size: Tuple[int, int], num_points: int, generator: torch.Generator) -> torch.Tensor:
    """(C, H, W) float32 sparse depth: ``num_points`` points on the exposed faces of occupied voxels
    (voxels with a free neighbour), jittered inside their voxel, nearest per pixel."""
    from voxelsplat.data.lidar_depth import lidar_depth_maps

    occupied = semantics != spec.free_index
    exposed = torch.zeros_like(occupied)
    for axis in range(3):
        for step in (1, -1):
            neighbour_free = torch.ones_like(occupied)  # outside the grid counts as free
            source = [slice(None)] * 3
            target = [slice(None)] * 3
            source[axis] = slice(max(step, 0), semantics.shape[axis] + min(step, 0))
            target[axis] = slice(max(-step, 0), semantics.shape[axis] + min(-step, 0))
            neighbour_free[tuple(target)] = ~occupied[tuple(source)]
            exposed |= occupied & neighbour_free
    candidates = exposed.nonzero()
    if len(candidates) == 0 or num_points == 0:
        return torch.zeros(len(cameras["cam2ego"]), image_size[1], image_size[0])
    picked = candidates[torch.randint(len(candidates), (int(num_points),), generator=generator)]
    jitter = (torch.rand(len(picked), 3, generator=generator, dtype=torch.float64) - 0.5) * spec.grid.voxel_size
    points = spec.grid.index_to_center(picked.numpy()) + jitter.numpy()
    depth = lidar_depth_maps(points, cameras["cam2ego"].double().numpy(), cameras["intrinsics"].double().numpy(),
                             image_size)
    return torch.from_numpy(depth)


def _camera_mask(spec: OccupancySpec, cameras: Dict[str, torch.Tensor], image_size: Tuple[int, int]) -> torch.Tensor:
    """(X, Y, Z) bool: voxels whose centre projects into some camera's image, in front of it."""
    centres = torch.from_numpy(spec.grid.voxel_centers().reshape(-1, 3)).float()
    # K [R | t] of every camera in one (N, 4) x (4, 3C) product: project_points' batched 3x3
    # products take ten times as long on a full grid
    world2cam = invert_transform(cameras["cam2ego"].double())[:, :3, :]
    projection = (cameras["intrinsics"].double() @ world2cam).float()  # (C, 3, 4)
    pixels = torch.cat([centres, torch.ones(len(centres), 1)], 1) @ projection.reshape(-1, 4).T
    pixels = pixels.reshape(len(centres), -1, 3)
    depth = pixels[..., 2]  # in front: 0 <= u < W is 0 <= u depth < W depth, no division
    seen = (depth > 0) & (pixels[..., 0] >= 0) & (pixels[..., 0] < image_size[0] * depth) \
        & (pixels[..., 1] >= 0) & (pixels[..., 1] < image_size[1] * depth)
    return seen.any(1).reshape(spec.grid.shape)


def _lidar_origins(spec: OccupancySpec, frame_index: int, num_keyframes: int, ego_speed: float,
                   keyframe_interval: float, max_origins: int) -> torch.Tensor:
    """(K, 3) float32: the roof LiDAR of the scene's keyframes (the ego drives along x at
    ``ego_speed``) in the current ego frame, chosen as the mapper does (``select_lidar_origins``),
    within the grid's horizontal range less one voxel; the current keyframe's is always among them."""
    grid = spec.grid
    positions = np.arange(num_keyframes, dtype=np.float64) * ego_speed * keyframe_interval
    half_voxel = grid.voxel_size / 2
    height = float(np.clip(LIDAR_HEIGHT_M, grid.range_min[2] + half_voxel, grid.range_max[2] - half_voxel))
    poses = np.tile(np.eye(4), (num_keyframes, 1, 1))
    poses[:, 0, 3] = positions
    poses[:, 2, 3] = height
    current = np.eye(4)
    current[0, 3] = positions[frame_index]
    reach = float(min(np.abs(grid.range_min[:2]).min(), np.abs(grid.range_max[:2]).min())) - grid.voxel_size
    origins = select_lidar_origins(poses, current, max_origins=max_origins, max_abs_xy=max(reach, grid.voxel_size))
    if not np.any(np.all(np.isclose(origins, [0.0, 0.0, height]), axis=1)):
        origins = np.concatenate([origins[: max_origins - 1], [[0.0, 0.0, height]]])
    return torch.from_numpy(origins.astype(np.float32))


# --------------------------------------------------------------------------------------------- samples
def make_sample(spec: Optional[OccupancySpec] = None, seed: int = 0, *, image_size: Sequence[int] = (176, 64),
                camera_image_size: Optional[Sequence[int]] = None, num_cameras: int = 6,
                camera_options: Optional[dict] = None, frame_index: int = 0, sequence_start: Optional[bool] = None,
                scene_token: str = "scene", sample_token: Optional[str] = None, num_keyframes: int = 40,
                ego_speed: float = 4.0, num_lidar_origins: int = 1, lidar_points: int = 4000,
                with_camera_mask: bool = False, with_regularizer: bool = False, num_gaussians: int = 1500,
                occupied_fraction: float = 2.0 / 3.0, render_scale: float = 0.5,
                render_frame_offsets: Sequence[int] = (0,), **scene_options) -> Dict[str, object]:
    """One mapped sample (:mod:`voxelsplat.structures.sample_fields`) of a street scene.

    Args:
        spec: label set and grid (default: OpenOcc v2 on the default grid).
        seed: draws the scene, the images, the LiDAR and the Gaussians.
        image_size: (W, H) of ``img`` (the network's input, after image augmentation).
        camera_image_size: (W, H) of the cameras' own images (default ``image_size``); the input
            images are these resized, ``img_aug = diag(W / W_cam, H / H_cam, 1)``, as the mapper
            would; the render views are scaled from this size.
        num_cameras, camera_options: the :func:`camera_ring` (``camera_options``: its keyword
            arguments, e.g. ``horizontal_fov_deg``).
        frame_index: the keyframe's index in its scene: ``timestamp = 1 s + frame_index *
            KEYFRAME_INTERVAL_S`` (microseconds), the ego at ``x = frame_index * ego_speed *
            KEYFRAME_INTERVAL_S`` m of the scene's frame; ``sequence_start`` defaults to
            ``frame_index == 0``; ``prev_sample_token`` is ``""`` at frame 0, else the token
            ``make_sample(seed=seed - 1)`` gives (see :func:`make_sequence`).
        sample_token: default ``f"sample{seed}"``.
        num_keyframes, num_lidar_origins: ``lidar_origins`` are up to ``num_lidar_origins`` of the
            roof-LiDAR positions of the scene's ``num_keyframes`` keyframes in this keyframe's ego
            frame, picked as the mapper picks them (``select_lidar_origins``) within the grid's
            horizontal range less one voxel; this keyframe's own is always among them.
        lidar_points: points of the sparse ``lidar_depth``, on exposed faces of occupied voxels.
        with_camera_mask: add ``occ_mask_camera``: voxels inside some camera's view frustum.
        with_regularizer: add the ``REGULARIZER_FIELDS``: ``num_gaussians`` voxel indices, a
            ``occupied_fraction`` of them among occupied voxels and the rest among free ones
            (fewer when the grid has fewer), and the :func:`render_views` of the ring at
            ``render_scale`` of ``camera_image_size`` for ``render_frame_offsets``.
        scene_options: keyword arguments of :func:`street_labels` (``num_vehicles``,
            ``vehicle_classes``, ``ground_classes``, ...).
    Returns:
        the sample dict, checked by ``check_sample`` (``with_regularizer`` included).
    """
    spec = _default_spec(spec)
    width, height = _image_size(image_size, "make_sample image_size")
    camera_size = _image_size(camera_image_size or (width, height), "make_sample camera_image_size")
    frame_index = int(frame_index)
    if not 0 <= frame_index < num_keyframes:
        raise ValueError(f"make_sample: frame_index {frame_index} outside the scene's {num_keyframes} keyframes")
    semantics, flow = street_labels(spec, seed, **scene_options)
    generator = torch.Generator().manual_seed(int(seed) + 1)  # apart from the scene's own draws

    rig = camera_ring(num_cameras, camera_size, **(camera_options or {}))
    img_aug = torch.diag(torch.tensor([width / camera_size[0], height / camera_size[1], 1.0])).repeat(num_cameras, 1, 1)
    cameras = {"intrinsics": img_aug @ rig["intrinsics"], "cam2ego": rig["cam2ego"]}
    ego2global = torch.eye(4, dtype=torch.float64)
    ego2global[0, 3] = frame_index * ego_speed * KEYFRAME_INTERVAL_S
    token = sample_token if sample_token is not None else f"sample{seed}"
    sample: Dict[str, object] = {
        "img": torch.randint(0, 256, (num_cameras, 3, height, width), generator=generator, dtype=torch.uint8),
        "intrinsics": cameras["intrinsics"], "cam2ego": cameras["cam2ego"], "ego2global": ego2global,
        "img_aug": img_aug, "bda": torch.eye(4),
        "lidar_depth": _lidar_depth(semantics, spec, cameras, (width, height), lidar_points, generator),
        "occ_semantics": semantics, "occ_flow": flow, "gt_format": spec.label_set,
        "sample_token": token, "scene_token": scene_token,
        "timestamp": 1_000_000 + int(round(frame_index * KEYFRAME_INTERVAL_S * 1e6)),
        "frame_index": frame_index,
        "sequence_start": frame_index == 0 if sequence_start is None else bool(sequence_start),
        "prev_sample_token": "" if frame_index == 0 else f"sample{int(seed) - 1}",
        "lidar_origins": _lidar_origins(spec, frame_index, num_keyframes, ego_speed, KEYFRAME_INTERVAL_S,
                                        num_lidar_origins),
    }
    if with_camera_mask:
        sample["occ_mask_camera"] = _camera_mask(spec, cameras, (width, height))
    if with_regularizer:
        occupied = (semantics != spec.free_index).nonzero()
        free = (semantics == spec.free_index).nonzero()
        num_occupied = min(int(round(num_gaussians * occupied_fraction)), len(occupied))
        picked_occupied = occupied[torch.randperm(len(occupied), generator=generator)[:num_occupied]]
        picked_free = free[torch.randperm(len(free), generator=generator)[:num_gaussians - num_occupied]]
        sample["gaussian_voxel_indices"] = torch.cat([picked_occupied, picked_free])
        sample.update(render_views(rig["intrinsics"], rig["cam2ego"], camera_size, render_scale,
                                   frame_offsets=render_frame_offsets, ego_velocity=(ego_speed, 0.0)))
    check_sample(sample, with_regularizer=with_regularizer)
    return sample


def make_sequence(spec: Optional[OccupancySpec] = None, seed: int = 0, num_frames: int = 3,
                  **kwargs) -> List[Dict[str, object]]:
    """``num_frames`` consecutive keyframes of one scene: ``make_sample(spec, seed + f,
    frame_index=f, **kwargs)`` for f = 0, 1, ...; each names the previous one in
    ``prev_sample_token`` and only the first starts the sequence. The scenes are drawn
    independently (the labels are not a world moving in time)."""
    return [make_sample(spec, seed + frame, frame_index=frame, **kwargs) for frame in range(int(num_frames))]
