"""Sensing the synthetic world: ray casting against the ground plane and the boxes, camera
images with shading and class textures, LiDAR sweeps, and the voxel ground truth
(semantics, flow, ray-visibility masks) of a keyframe.

All casts start from one origin per call (a camera centre or the LiDAR) with unit
directions, so ``t`` is a distance in metres.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from voxelsplat.structures import DEFAULT_GRID, OccupancyGrid

from .world import CLASS, FREE, BoxSet, World

__all__ = ["RayHits", "cast_rays", "render_camera", "lidar_scan", "occupancy_labels", "ray_visibility",
           "camera_rays", "points_in_boxes"]

SKY = -2
GROUND = -1
MAX_DISTANCE = 250.0
_SUN = np.array([0.45, 0.25, 0.86]) / np.linalg.norm([0.45, 0.25, 0.86])
_SKY_COLOUR = np.array([0.62, 0.74, 0.9])


@dataclass
class RayHits:
    """What each ray hit: ``t`` distance (inf for sky), ``box`` index into the box set
    (GROUND, SKY or >= 0), ``label`` OpenOcc class (free for sky), ``local`` hit point in
    the box frame (box hits), ``axis``/``sign`` of the face normal in the box frame."""

    t: np.ndarray
    box: np.ndarray
    label: np.ndarray
    local: np.ndarray
    axis: np.ndarray
    sign: np.ndarray

    def box_normals(self, boxes: BoxSet, rows: np.ndarray) -> np.ndarray:
        """(len(rows), 3) global unit normals of the box faces hit by rays ``rows`` (box hits)."""
        normal_local = np.zeros((len(rows), 3))
        normal_local[np.arange(len(rows)), self.axis[rows]] = self.sign[rows]
        return _yaw_rotate(normal_local, boxes.yaw[self.box[rows]])


def _yaw_rotate(vectors: np.ndarray, yaw) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    x, y = vectors[..., 0], vectors[..., 1]
    return np.stack([c * x - s * y, s * x + c * y, vectors[..., 2]], axis=-1)


def cast_rays(world: World, boxes: BoxSet, origin: np.ndarray, directions: np.ndarray,
              candidates: Optional[Callable[[int], np.ndarray]] = None, max_distance: float = MAX_DISTANCE) -> RayHits:
    """First hit of each ray (origin (3,), unit directions (R, 3), global frame).

    ``candidates(b)`` returns the ray indices that may hit box ``b`` (default: rays passing
    within the box's bounding sphere)."""
    origin = np.asarray(origin, dtype=np.float64)
    directions = np.asarray(directions, dtype=np.float64)
    count = len(directions)
    best = np.full(count, np.inf)
    box_index = np.full(count, SKY, dtype=np.int64)
    local = np.zeros((count, 3))
    axis = np.zeros(count, dtype=np.int64)
    sign = np.zeros(count)
    # ground plane z = 0
    down = directions[:, 2] < -1e-9
    t_ground = np.where(down, -origin[2] / np.where(down, directions[:, 2], -1.0), np.inf)
    ground_hit = down & (t_ground > 0) & (t_ground < max_distance)
    best[ground_hit] = t_ground[ground_hit]
    box_index[ground_hit] = GROUND
    offsets = boxes.centers - origin
    radii = 0.5 * np.linalg.norm(boxes.sizes, axis=1)
    reach = np.linalg.norm(offsets, axis=1) - radii < max_distance
    for b in np.flatnonzero(reach):
        if candidates is not None:
            rays = candidates(b)
        else:
            along = directions @ offsets[b]
            miss2 = offsets[b] @ offsets[b] - along ** 2  # unit directions
            rays = np.flatnonzero((along > -radii[b]) & (miss2 < radii[b] ** 2))
        if len(rays) == 0:
            continue
        o_local = _yaw_rotate(-offsets[b][None], -boxes.yaw[b])[0]
        d_local = _yaw_rotate(directions[rays], -boxes.yaw[b])
        half = 0.5 * boxes.sizes[b]
        safe = np.where(np.abs(d_local) < 1e-12, 1e-12, d_local)
        t1 = (-half - o_local) / safe
        t2 = (half - o_local) / safe
        t_near_axes = np.minimum(t1, t2)
        t_near = t_near_axes.max(axis=1)
        t_far = np.maximum(t1, t2).min(axis=1)
        hit = (t_near <= t_far) & (t_near > 1e-6) & (t_near < best[rays])
        if not hit.any():
            continue
        rays_hit = rays[hit]
        best[rays_hit] = t_near[hit]
        box_index[rays_hit] = b
        hit_axis = t_near_axes[hit].argmax(axis=1)
        axis[rays_hit] = hit_axis
        sign[rays_hit] = -np.sign(d_local[hit, hit_axis])
        local[rays_hit] = o_local + t_near[hit, None] * d_local[hit]
    label = np.full(count, FREE, dtype=np.int64)
    on_box = box_index >= 0
    label[on_box] = boxes.labels[box_index[on_box]]
    on_ground = box_index == GROUND
    if on_ground.any():
        p = origin + best[on_ground, None] * directions[on_ground]
        label[on_ground] = world.ground.label_at(p[:, 0], p[:, 1])
    return RayHits(best, box_index, label, local, axis, sign)


def camera_rays(cam2global: np.ndarray, intrinsics: np.ndarray, width: int, height: int,
                stride: int = 1) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit global directions (H'*W', 3) through the centres of every ``stride``-th pixel,
    and the pixel columns / rows they go through."""
    cols = np.arange(0, width, stride)
    rows = np.arange(0, height, stride)
    u, v = np.meshgrid(cols + 0.5, rows + 0.5)
    pixels = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1)
    rays_cam = pixels @ np.linalg.inv(intrinsics).T
    rays = rays_cam @ cam2global[:3, :3].T
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    return rays, np.tile(cols, len(rows)), np.repeat(rows, len(cols))


def _screen_candidates(boxes: BoxSet, cam2global: np.ndarray, intrinsics: np.ndarray, width: int, height: int,
                       stride: int = 1) -> Callable[[int], np.ndarray]:
    """Pixels inside the projected bounding rectangle of each box (all pixels for boxes
    that straddle the image plane, none for boxes behind the camera)."""
    corners = boxes.corners()
    world2cam = np.linalg.inv(cam2global)
    cam = corners @ world2cam[:3, :3].T + world2cam[:3, 3]
    cols, rows = len(range(0, width, stride)), len(range(0, height, stride))

    def candidates(b: int) -> np.ndarray:
        z = cam[b, :, 2]
        if (z <= 0.05).all():
            return np.zeros(0, dtype=np.int64)
        if (z <= 0.05).any():
            c0, c1, r0, r1 = 0, cols, 0, rows
        else:
            uvw = cam[b] @ intrinsics.T
            u, v = uvw[:, 0] / uvw[:, 2], uvw[:, 1] / uvw[:, 2]
            c0 = max(0, int(np.floor(u.min() / stride)) - 1)
            c1 = min(cols, int(np.ceil(u.max() / stride)) + 1)
            r0 = max(0, int(np.floor(v.min() / stride)) - 1)
            r1 = min(rows, int(np.ceil(v.max() / stride)) + 1)
            if c0 >= c1 or r0 >= r1:
                return np.zeros(0, dtype=np.int64)
        rr, cc = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        return (rr * cols + cc).ravel()

    return candidates


def _hash01(*coords: np.ndarray) -> np.ndarray:
    """Deterministic value noise in [0, 1] from integer lattice coordinates."""
    h = np.uint64(0x9E3779B97F4A7C15)
    primes = (np.uint64(0x85EBCA77C2B2AE63), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9))
    with np.errstate(over="ignore"):
        for c, p in zip(coords, primes):
            h = (h ^ (np.asarray(c).astype(np.int64).astype(np.uint64) * p))
            h = (h ^ (h >> np.uint64(29))) * np.uint64(0xBF58476D1CE4E5B9)
        h = h ^ (h >> np.uint64(32))
    return (h & np.uint64(0xFFFF)).astype(np.float64) / 65535.0


def _frac(x):
    return x - np.floor(x)


_GROUND_COLOURS = {
    CLASS["driveable_surface"]: (0.3, 0.3, 0.32), CLASS["sidewalk"]: (0.62, 0.6, 0.58),
    CLASS["other_flat"]: (0.55, 0.45, 0.33), CLASS["terrain"]: (0.33, 0.5, 0.2),
}
_VEHICLES = [CLASS[n] for n in ("car", "truck", "trailer", "bus", "construction_vehicle", "motorcycle")]


def shade(world: World, boxes: BoxSet, hits: RayHits, origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] for each ray: class colour and texture, Lambert shading, haze, sky."""
    count = len(hits.t)
    colour = np.tile(_SKY_COLOUR, (count, 1))
    elevation = np.clip(directions[:, 2], -1, 1)
    colour = colour * (0.85 + 0.25 * np.clip(elevation * 3, 0, 1))[:, None]
    finite = np.isfinite(hits.t)
    points = origin + np.where(finite, hits.t, 0.0)[:, None] * directions

    # ground: per-class colour, noise, sidewalk tiles and lane markings
    g = np.flatnonzero(hits.box == GROUND)
    if len(g):
        x, y = points[g, 0], points[g, 1]
        labels = hits.label[g]
        base = np.array([_GROUND_COLOURS.get(int(c), (0.4, 0.4, 0.4)) for c in range(FREE + 1)])[labels]
        fine = _hash01(np.floor(x / 0.1), np.floor(y / 0.1))
        coarse = _hash01(np.floor(x / 1.3), np.floor(y / 1.3), 7)
        amplitude = np.where(labels == CLASS["terrain"], 0.45, np.where(labels == CLASS["other_flat"], 0.3, 0.15))
        base = base * (1 - 0.5 * amplitude + amplitude * (0.6 * fine + 0.4 * coarse))[:, None]
        tiles = (labels == CLASS["sidewalk"]) & ((_frac(x / 1.0) < 0.05) | (_frac(y / 1.0) < 0.05))
        base[tiles] *= 0.7
        paint = (labels == CLASS["driveable_surface"]) & world.ground.marking_at(x, y)
        base[paint] = (0.88, 0.86, 0.78)
        colour[g] = base * (0.45 + 0.55 * _SUN[2])

    b = np.flatnonzero(hits.box >= 0)
    if len(b):
        index = hits.box[b]
        labels = hits.label[b]
        base = boxes.colours[index].copy()
        size = boxes.sizes[index]
        local = hits.local[b]
        height = local[:, 2] + 0.5 * size[:, 2]  # above the box bottom
        rel = height / size[:, 2]
        side = hits.axis[b] != 2
        along = np.where(hits.axis[b] == 0, local[:, 1], local[:, 0])
        seed = boxes.seeds[index]
        noise = _hash01(np.floor(local[:, 0] / 0.12), np.floor(local[:, 1] / 0.12), np.floor(local[:, 2] / 0.12) + seed)

        manmade = labels == CLASS["manmade"]
        big = manmade & (size[:, 0] > 2.0) & side
        windows = big & (_frac(along / 3.0) > 0.3) & (_frac(along / 3.0) < 0.7) & (_frac(height / 3.2) > 0.35) & \
            (_frac(height / 3.2) < 0.8) & (height > 1.2)
        base[manmade] *= (0.85 + 0.3 * noise[manmade])[:, None]
        base[windows] = np.array([0.18, 0.24, 0.32]) + 0.15 * noise[windows, None]

        veg = labels == CLASS["vegetation"]
        leaf = _hash01(np.floor(local[:, 0] / 0.25), np.floor(local[:, 1] / 0.25), np.floor(local[:, 2] / 0.25) + seed)
        base[veg] *= (0.45 + 0.9 * (0.5 * noise[veg] + 0.5 * leaf[veg]))[:, None]

        vehicle = np.isin(labels, _VEHICLES)
        glass = vehicle & side & (rel > 0.55) & (rel < 0.88) & (labels != CLASS["motorcycle"])
        bus_glass = (labels == CLASS["bus"]) & side & (rel > 0.45) & (rel < 0.85) & (_frac(along / 1.6) < 0.8)
        base[glass | bus_glass] = (0.1, 0.13, 0.18)
        tyres = vehicle & side & (height < 0.45) & (np.abs(np.abs(along) - 0.3 * size[:, 0]) < 0.45)
        base[tyres] = (0.05, 0.05, 0.05)
        stripes = (labels == CLASS["construction_vehicle"]) & (_frac((along + height) / 0.9) < 0.25) & (rel < 0.5)
        base[stripes] = (0.1, 0.1, 0.1)
        roof = vehicle & (hits.axis[b] == 2)
        base[roof] *= 0.85
        # lamps across the lower front (white) and rear (red) of the body, as real vehicles carry:
        # the heading, and so the direction of travel, can be read from one image
        lamps = vehicle & (hits.axis[b] == 0) & (rel > 0.28) & (rel < 0.48) & \
            (np.abs(local[:, 1]) > 0.2 * size[:, 1]) & (labels != CLASS["motorcycle"])
        front = lamps & (hits.sign[b] > 0) & (labels != CLASS["trailer"])
        base[front] = (1.0, 0.97, 0.82)
        base[lamps & (hits.sign[b] < 0)] = (0.85, 0.06, 0.05)

        person = labels == CLASS["pedestrian"]
        base[person & (rel > 0.86)] = (0.8, 0.64, 0.5)
        base[person & (rel < 0.47)] = (0.16, 0.16, 0.24)

        cycle = labels == CLASS["bicycle"]
        wheels = cycle & (rel < 0.45)
        base[wheels] = np.where((_frac(along / 0.35) < 0.5)[wheels, None], 0.08, 0.35)

        cone = labels == CLASS["traffic_cone"]
        base[cone & (_frac(height / 0.22) < 0.35)] = (0.95, 0.95, 0.95)
        barrier = labels == CLASS["barrier"]
        base[barrier & (_frac((along + height) / 0.7) < 0.5)] = (0.8, 0.12, 0.1)

        light = 0.4 + 0.6 * np.clip(hits.box_normals(boxes, b) @ _SUN, 0, 1)
        colour[b] = base * light[:, None]

    haze = 1 - np.exp(-np.where(finite, hits.t, 0.0) / 220.0)
    colour[finite] = colour[finite] * (1 - haze[finite, None]) + _SKY_COLOUR * haze[finite, None]
    return np.clip(colour, 0, 1)


def render_camera(world: World, boxes: BoxSet, cam2global: np.ndarray, intrinsics: np.ndarray, width: int,
                  height: int, stride: int = 1) -> Dict[str, np.ndarray]:
    """Render one camera: ``image`` uint8 (H, W, 3) RGB, ``label`` uint8 (H, W) (free for
    sky) and ``depth`` float32 (H, W) distance along the ray (inf for sky)."""
    directions, _, _ = camera_rays(cam2global, intrinsics, width, height, stride)
    origin = cam2global[:3, 3]
    candidates = _screen_candidates(boxes, cam2global, intrinsics, width, height, stride)
    hits = cast_rays(world, boxes, origin, directions, candidates)
    rgb = shade(world, boxes, hits, origin, directions)
    rows, cols = len(range(0, height, stride)), len(range(0, width, stride))
    return dict(image=np.round(rgb * 255).astype(np.uint8).reshape(rows, cols, 3),
                label=hits.label.astype(np.uint8).reshape(rows, cols),
                depth=hits.t.astype(np.float32).reshape(rows, cols))


# Reflectivity of each class for the LiDAR intensity channel (0-255 scale).
_REFLECTIVITY = np.array([60, 55, 50, 60, 50, 30, 40, 25, 90, 80, 12, 20, 30, 18, 35, 22, 0], dtype=np.float64)


def lidar_scan(world: World, boxes: BoxSet, lidar2global: np.ndarray, directions_lidar: np.ndarray,
               ring: np.ndarray, max_range: float) -> Tuple[np.ndarray, RayHits, np.ndarray]:
    """One LiDAR sweep: points (P, 5) float32 (x, y, z, intensity, ring) in the sensor
    frame for the rays that hit within ``max_range``, the hits of every ray and the global
    unit directions."""
    origin = lidar2global[:3, 3]
    directions = directions_lidar @ lidar2global[:3, :3].T
    hits = cast_rays(world, boxes, origin, directions, max_distance=max_range)
    keep = hits.t < max_range
    points_lidar = directions_lidar[keep] * hits.t[keep, None]
    cos_incidence = np.ones(int(keep.sum()))
    on_box = hits.box[keep] >= 0
    if on_box.any():
        rows = np.flatnonzero(keep)[on_box]
        cos_incidence[on_box] = np.abs(np.einsum("ij,ij->i", hits.box_normals(boxes, rows), directions[rows]))
    on_ground = hits.box[keep] == GROUND
    cos_incidence[on_ground] = np.abs(directions[keep][on_ground, 2])
    intensity = _REFLECTIVITY[hits.label[keep]] * (0.3 + 0.7 * cos_incidence)
    points = np.concatenate([points_lidar, intensity[:, None], ring[keep, None].astype(np.float64)], axis=1)
    return points.astype(np.float32), hits, directions


def points_in_boxes(points_global: np.ndarray, boxes: BoxSet) -> np.ndarray:
    """Number of points inside each box (M,)."""
    counts = np.zeros(len(boxes), dtype=np.int64)
    for b in range(len(boxes)):
        rel = points_global - boxes.centers[b]
        near = np.abs(rel[:, 0]) + np.abs(rel[:, 1]) < boxes.sizes[b, 0] + boxes.sizes[b, 1]
        if not near.any():
            continue
        local = _yaw_rotate(rel[near], -boxes.yaw[b])
        counts[b] = int(np.all(np.abs(local) <= 0.5 * boxes.sizes[b] + 1e-3, axis=1).sum())
    return counts


# Static classes first, agents last: later boxes win where boxes overlap.
_PRIORITY = {CLASS["vegetation"]: 0, CLASS["manmade"]: 1, CLASS["barrier"]: 2, CLASS["traffic_cone"]: 3}


def _lattice(grid: OccupancyGrid) -> Tuple[np.ndarray, np.ndarray]:
    """(anchor, shift): voxel ``i`` of ``grid`` along axis ``a`` has its centre at
    ``anchor[a] + voxel_size * (i + shift[a] + 0.5)``. A grid on the default grid's lattice
    (same voxel size, range shifted by whole voxels) is computed on that lattice, so that its
    labels are exactly the crop of the default grid's, up to the last bit of every voxel centre."""
    vs = grid.voxel_size
    if vs == DEFAULT_GRID.voxel_size:
        shift = (grid.range_min - DEFAULT_GRID.range_min) / vs
        if np.all(np.abs(shift - np.round(shift)) < 1e-6):
            return DEFAULT_GRID.range_min, np.round(shift).astype(np.int64)
    return grid.range_min, np.zeros(3, dtype=np.int64)


def occupancy_labels(world: World, boxes: BoxSet, ego2global: np.ndarray,
                     grid: OccupancyGrid) -> Tuple[np.ndarray, np.ndarray]:
    """Voxel semantics (X, Y, Z) uint8 (OpenOcc v2 classes) and flow (X, Y, Z, 2) float32
    (vx, vy in m/s in the ego frame; agents' velocity, 0 elsewhere) in the grid around the
    ego pose ``ego2global``."""
    shape = grid.shape
    semantics = np.full(shape, FREE, dtype=np.uint8)
    flow = np.zeros(shape + (2,), dtype=np.float32)
    vs = grid.voxel_size
    lo, shift = _lattice(grid)
    # the ground layer: the voxels holding z = 0
    k_ground = int(np.floor((0.0 - lo[2]) / vs)) - int(shift[2])
    if 0 <= k_ground < shape[2]:
        xs = lo[0] + vs * (np.arange(shape[0]) + shift[0] + 0.5)
        ys = lo[1] + vs * (np.arange(shape[1]) + shift[1] + 0.5)
        gx, gy = np.meshgrid(xs, ys, indexing="ij")
        global_xy = ego2global[:2, :2] @ np.stack([gx.ravel(), gy.ravel()]) + ego2global[:2, 3:4]
        semantics[:, :, k_ground] = world.ground.label_at(global_xy[0], global_xy[1]).reshape(shape[:2])
    global2ego = np.linalg.inv(ego2global)
    ego_yaw = np.arctan2(ego2global[1, 0], ego2global[0, 0])
    centers = boxes.centers @ global2ego[:3, :3].T + global2ego[:3, 3]
    yaw = boxes.yaw - ego_yaw
    velocity = np.stack([boxes.velocity[:, 0], boxes.velocity[:, 1], np.zeros(len(boxes))], axis=1) @ global2ego[:3, :3].T
    half_range = np.maximum(np.abs(grid.range_min[:2]), np.abs(grid.range_max[:2]))
    reach = np.all(np.abs(centers[:, :2]) - 0.5 * np.linalg.norm(boxes.sizes[:, :2], axis=1)[:, None] < half_range, axis=1)
    order = sorted(np.flatnonzero(reach), key=lambda b: (_PRIORITY.get(int(boxes.labels[b]), 10), b))
    for b in order:
        # a voxel is occupied by every box it touches: the box grown by the voxel's half
        # extent along the box axes (exact for the box's own axes, as real labels built from
        # surface points occupy every voxel a surface passes through)
        relative = yaw[b]
        grow = 0.5 * vs * (abs(np.cos(relative)) + abs(np.sin(relative)))
        half = 0.5 * boxes.sizes[b] + np.array([grow, grow, 0.5 * vs])
        extent = np.array([abs(np.cos(relative)) * half[0] + abs(np.sin(relative)) * half[1],
                           abs(np.sin(relative)) * half[0] + abs(np.cos(relative)) * half[1], half[2]])
        low = np.clip(np.floor((centers[b] - extent - lo) / vs).astype(int) - shift, 0, shape)
        high = np.clip(np.floor((centers[b] + extent - lo) / vs).astype(int) + 1 - shift, 0, shape)
        if np.any(high <= low):
            continue
        axes = [lo[a] + vs * (np.arange(low[a], high[a]) + shift[a] + 0.5) - centers[b][a] for a in range(3)]
        rel = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
        c, s = np.cos(-relative), np.sin(-relative)
        lx = c * rel[..., 0] - s * rel[..., 1]
        ly = s * rel[..., 0] + c * rel[..., 1]
        inside = (np.abs(lx) < half[0]) & (np.abs(ly) < half[1]) & (np.abs(rel[..., 2]) < half[2])
        if not inside.any():
            continue
        window = (slice(low[0], high[0]), slice(low[1], high[1]), slice(low[2], high[2]))
        semantics[window][inside] = boxes.labels[b]
        if boxes.ids[b] >= 0:
            flow[window][inside] = velocity[b, :2]
        else:
            flow[window][inside] = 0.0
    return semantics, flow


def ray_visibility(origin: np.ndarray, directions: np.ndarray, hit_t: np.ndarray, grid: OccupancyGrid,
                   step: Optional[float] = None, chunk: int = 8192, traverse_every: int = 1) -> np.ndarray:
    """Voxels crossed by rays (ego frame of the grid) up to their hit, and the voxel holding
    each ray's end (just behind the hit): bool (X, Y, Z). Rays are sampled every ``step``
    metres (default: half a voxel); rays with an infinite ``hit_t`` run to the grid's boundary.
    With ``traverse_every`` = k only every k-th ray marks the free space it crosses (dense ray
    patterns cross the same voxels many times); every ray marks its end voxel."""
    shape = np.array(grid.shape)
    lo, hi = grid.range_min, grid.range_max
    step = step or 0.5 * grid.voxel_size
    visible = np.zeros(grid.shape, dtype=bool)
    flat = visible.reshape(-1)
    origin = np.asarray(origin, dtype=np.float64)
    directions = np.asarray(directions, dtype=np.float64)
    # distance at which each ray leaves the grid box
    safe = np.where(np.abs(directions) < 1e-12, 1e-12, directions)
    t_exit = np.maximum((lo - origin) / safe, (hi - origin) / safe).min(axis=1)
    end = np.minimum(np.where(np.isfinite(hit_t), hit_t + 0.5 * step, np.inf), t_exit - 1e-6)
    end = np.maximum(end, 0.0)
    # positions in voxel units: start + k * per_step
    start_v = ((origin - lo) / grid.voxel_size).astype(np.float32)
    per_step = (directions * (step / grid.voxel_size)).astype(np.float32)
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int64)
    limit = shape.astype(np.float32)

    def mark(points_v: np.ndarray) -> None:
        inside = np.all((points_v >= 0) & (points_v < limit), axis=1)
        index = points_v[inside].astype(np.int64)  # non-negative: truncation is floor
        flat[index @ strides] = True

    for first_ray in range(0, len(directions), chunk):
        e = end[first_ray:first_ray + chunk]
        counts = np.floor(e / step).astype(np.int64) + 1
        if traverse_every > 1:
            counts[(np.arange(first_ray, first_ray + len(e)) % traverse_every) != 0] = 1
        ray = np.repeat(np.arange(len(e)), counts)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        k = (np.arange(counts.sum()) - np.repeat(offsets, counts)).astype(np.float32)
        mark(start_v + k[:, None] * per_step[first_ray:first_ray + chunk][ray])
        mark(start_v + (e / step).astype(np.float32)[:, None] * per_step[first_ray:first_ray + chunk])
    return visible
