"""Ray casting through occupancy grids with the semantics of the RayIoU benchmark.

A ray walks the voxel grid with a 3D-DDA (Amanatides & Woo) exactly as the renderer
behind the published RayIoU numbers does:

- Coordinates are voxel units, ``(p - range_min) / voxel_size``; the walk starts in the
  voxel containing the origin (``floor``), even when that voxel is occupied.
- Each step leaves the current voxel through the axis whose next boundary crossing
  comes first. Ties are broken as the strict ``<`` comparisons of the reference
  traversal do: z before y before x (``if tx < ty: (x if tx < tz else z) else (y if
  ty < tz else z)``). Directions with a zero component never cross that axis.
- The **hit** is the first visited voxel inside the grid that is occupied; its
  **depth** is the ray parameter (metres, unit direction) at which the ray *leaves*
  that voxel. A ray that leaves the grid without a hit reports the last voxel it
  visited inside the grid and the distance at which it left it (``hit = False``).
- A ray whose origin lies outside the grid walks in from outside; one that never
  enters reports voxel ``-1`` and depth ``0``.

Two implementations give these results. On CPU, a small C kernel
(``csrc/ray_walk.c``, built on first use, :mod:`voxelsplat.evaluation.native`) walks
each ray voxel by voxel exactly as the reference loop does, rays spread over CPU threads.
The PyTorch walk (CUDA, and CPU where no C compiler is found) marches all rays in
lock-step with tensor operations (float64 crossing times) and compacts finished rays
away every few steps. Both share one walk between several occupancy volumes (e.g. ground
truth and prediction along the same rays). Long stretches of empty space are crossed in one jump: a per-level 2D
chessboard clearance says how many columns around a voxel are free at that level,
and the walk skips to the last boundary crossing inside that free square without
crossing a z boundary. Skipped voxels are all free, so the hits are those of the
step-by-step walk (``tests/test_eval_ray_casting.py``), with one caveat: a jump computes
crossing times by multiplication where the walk adds them up, so a ray passing within
~1e-12 voxel of a voxel edge may go round it on the other side (the benchmark's float32
ray directions already make such rays arbitrary).

Ray geometry and rounding (``ray_precision``). The benchmark's rays are built in
float32, and :func:`cast_rays` reproduces that by default (``ray_precision="official"``):

- the unit directions are computed in float64 and stored as float32
  (:func:`lidar_ray_directions` returns them so);
- each origin is rounded to float32, and each ray's end point ``origin + direction`` is
  formed in float32;
- origin and end point are converted to voxel units in float32,
  ``(p - range_min) / voxel_size`` with float32 ``range_min`` and ``voxel_size``;
- the walk reads those float32 numbers into float64, takes the direction as end point
  minus origin, normalises it (``r / sqrt(rx*rx + ry*ry + rz*rz)``) and walks in float64;
- the depth it finds (voxel units, float64) is stored as float32 and multiplied by the
  float32 voxel size in float32: ``RayCastResult.depth`` is float32 metres.

Rounding the end point moves the direction by up to ~1e-5 relative on the 200 x 200 x 16
grid, enough to change a few hits and depth differences that sit on a threshold; this is
how RayIoU is computed for the published numbers. ``ray_precision="float64"`` instead
walks the exact geometry (float64 origins, directions normalised in float64, float64
depths) - for studies of the metric itself, not for numbers to compare with published ones.

The LiDAR ray pattern of the benchmark (:func:`lidar_ray_directions`) has 39 pitch
angles - 10 at ``-(pi/2 - atan(k))`` for k = 1..10 (-45 deg to -5.7 deg), then
continuing with the last spacing (about 0.63 deg) until the upper edge of the
nuScenes LiDAR field of view (0.21 rad) is passed - times 360 azimuths (1 deg apart,
from 0), pitch-major.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple, Union

import numpy as np
import torch

from voxelsplat.structures import DEFAULT_GRID, OccupancyGrid

from .native import native_ray_walk, ray_walk_library

__all__ = [
    "RAY_PRECISIONS",
    "RayCastResult",
    "cast_rays",
    "lidar_pitch_angles",
    "lidar_ray_directions",
    "ray_geometry_voxels",
]

# "official": the benchmark's float32 ray rounding; "float64": the exact geometry (see the module docstring)
RAY_PRECISIONS = ("official", "float64")

# Upper edge of the nuScenes LiDAR's vertical field of view (rad): the pitch list grows until it passes it.
LIDAR_MAX_PITCH = 0.21
# Bit of the code volume marking the one-voxel border around the grid ("outside").
_OUTSIDE = 128
# Finite stand-in for "never crosses this axis" (keeps 0 * far = 0, unlike inf).
_FAR = 1e300
# Per-level clearance is counted up to this many columns (the jump radius is at most _CLEARANCE_CAP - 1).
_CLEARANCE_CAP = 16


def lidar_pitch_angles(max_pitch: float = LIDAR_MAX_PITCH) -> List[float]:
    """Pitch angles (radians, negative = downwards) of the benchmark's virtual LiDAR.

    Ten steep angles ``-(pi/2 - atan(k))`` for k = 1..10, then steps of the last spacing
    until an angle of at least ``max_pitch`` has been added (39 angles for 0.21 rad).
    """
    pitches = [-(math.pi / 2 - math.atan(k + 1)) for k in range(10)]
    while pitches[-1] < max_pitch:
        pitches.append(pitches[-1] + (pitches[-1] - pitches[-2]))
    return pitches


def lidar_ray_directions(num_azimuths: int = 360, max_pitch: float = LIDAR_MAX_PITCH,
                         device: Union[str, torch.device, None] = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit ray directions of the benchmark's virtual LiDAR in the ego frame (x forward,
    y left, z up), pitch-major: ``(len(lidar_pitch_angles()) * num_azimuths, 3)``,
    row ``p * num_azimuths + a`` has pitch ``p`` and azimuth ``a * 360 / num_azimuths`` degrees.

    Computed in float64 (``cos(pitch) cos(azimuth)``, ``cos(pitch) sin(azimuth)``,
    ``sin(pitch)``) and returned as ``dtype``: float32 by default, the values the benchmark
    casts; ``torch.float64`` for the unrounded directions."""
    pitch = np.asarray(lidar_pitch_angles(max_pitch), dtype=np.float64)[:, None]
    azimuth = np.deg2rad(np.arange(num_azimuths, dtype=np.float64) * (360.0 / num_azimuths))[None, :]
    directions = np.stack([np.cos(pitch) * np.cos(azimuth), np.cos(pitch) * np.sin(azimuth),
                           np.broadcast_to(np.sin(pitch), (pitch.shape[0], num_azimuths))], axis=-1)
    return torch.from_numpy(directions.reshape(-1, 3)).to(device=device, dtype=dtype)


@dataclass
class RayCastResult:
    """Where each ray stops, for each cast volume.

    Attributes:
        voxel_index: (V, N) int64 flat index ``(x * Y + y) * Z + z`` of the hit voxel, or of
            the last voxel visited inside the grid when ``hit`` is False; -1 where the ray
            never entered the grid.
        depth: (V, N) metres from the origin to where the ray leaves that voxel (0 where the
            ray never entered the grid). ``ray_precision="official"``: float32,
            ``float32(depth_voxels) * float32(voxel_size)`` in float32, as the benchmark
            stores it; ``"float64"``: float64, ``depth_voxels * voxel_size``.
        depth_voxels: (V, N) float64, the same distance in voxel units as the walk found it.
        hit: (V, N) bool, True where ``voxel_index`` is occupied in that volume.

    Rays are ordered origin-major: ray ``k * R + r`` starts at origin ``k`` with direction ``r``.
    """

    voxel_index: torch.Tensor
    depth: torch.Tensor
    depth_voxels: torch.Tensor
    hit: torch.Tensor

    @property
    def entered(self) -> torch.Tensor:
        """(V, N) bool, False for rays that never entered the grid."""
        return self.voxel_index >= 0


def _check_precision(ray_precision: str, caller: str) -> str:
    if ray_precision not in RAY_PRECISIONS:
        raise ValueError(f"{caller}: unknown ray_precision {ray_precision!r}, expected one of {RAY_PRECISIONS}")
    return ray_precision


def ray_geometry_voxels(
    origins: torch.Tensor,
    directions: torch.Tensor,
    grid: OccupancyGrid = DEFAULT_GRID,
    ray_precision: str = "official",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rays as the walk sees them: origins and unit directions in voxel units.

    Args:
        origins: (K, 3) metres, frame of the grid.
        directions: (R, 3) shared by every origin, or (K, R, 3) per origin, metres, nonzero.
        ray_precision: ``"official"``: origins and directions rounded to float32, end points
            ``origin + direction`` formed in float32, both converted to voxel units in
            float32, the direction taken in float64 from their difference and normalised
            (every origin then has its own (R, 3) directions); ``"float64"``: the exact
            geometry, directions normalised in float64.
    Returns:
        ``origins_vox`` (K, 3) float64 and ``unit_directions`` (Kd, R, 3) float64 with Kd = K,
        or Kd = 1 for shared directions with ``"float64"``. Both on the device of ``origins``.
    """
    _check_precision(ray_precision, "ray_geometry_voxels")
    if origins.dim() != 2 or origins.shape[1] != 3:
        raise ValueError(f"cast_rays: origins have shape {tuple(origins.shape)}, expected (K, 3)")
    shared = directions.dim() == 2
    if not ((shared and directions.shape[1] == 3) or
            (directions.dim() == 3 and directions.shape[0] == origins.shape[0] and directions.shape[2] == 3)):
        raise ValueError(f"cast_rays: directions have shape {tuple(directions.shape)}, expected (R, 3) or "
                         f"({origins.shape[0]}, R, 3)")
    if not (torch.isfinite(origins).all() and torch.isfinite(directions).all()):
        raise ValueError("cast_rays: origins and directions must be finite")
    device = origins.device
    if ray_precision == "float64":
        origins = origins.to(torch.float64)
        directions = directions.to(torch.float64)
        if shared:
            directions = directions[None]
        length = directions.norm(dim=-1, keepdim=True)
        if (length == 0).any():
            raise ValueError("cast_rays: a ray direction has zero length")
        range_min = torch.as_tensor(grid.range_min, dtype=torch.float64, device=device)
        return (origins - range_min) / grid.voxel_size, directions / length

    f32 = torch.float32
    origins32 = origins.to(f32)
    directions32 = directions.to(f32)
    if shared:
        directions32 = directions32[None]
    # float32 throughout: (origin + direction - range_min) / voxel_size, element by element
    # (a voxel-size tensor, not a scalar, so every division is a correctly rounded one)
    offset = torch.as_tensor(grid.range_min, dtype=f32, device=device)
    scale = torch.full((3,), grid.voxel_size, dtype=f32, device=device)
    origins_vox = (origins32 - offset) / scale  # (K, 3)
    ends_vox = ((directions32 + origins32[:, None, :]) - offset) / scale  # (K, R, 3)
    start = origins_vox.to(torch.float64)
    ray = ends_vox.to(torch.float64) - start[:, None, :]
    rx, ry, rz = ray.unbind(-1)
    length = torch.sqrt(rx * rx + ry * ry + rz * rz)
    if (length == 0).any():
        raise ValueError("cast_rays: a ray direction has zero length (after rounding its end point to float32)")
    return start, ray / length[..., None]


def cast_rays(
    occupancy: torch.Tensor,
    origins: torch.Tensor,
    directions: torch.Tensor,
    grid: OccupancyGrid = DEFAULT_GRID,
    *,
    skip_empty_space: bool = True,
    backend: str = "auto",
    ray_precision: str = "official",
) -> RayCastResult:
    """Cast rays through one or more occupancy volumes of the same grid.

    Args:
        occupancy: (X, Y, Z) or (V, X, Y, Z) bool (any dtype; nonzero = occupied), indexed
            ``[x, y, z]`` on ``grid``; V <= 7 volumes share every ray's walk.
        origins: (K, 3) ray origins in metres, in the frame of the grid (ego frame).
        directions: (R, 3) directions shared by every origin, or (K, R, 3) per origin; any
            nonzero length, metres. With ``ray_precision="official"`` the end point
            ``origin + direction`` defines the ray (unit directions, as the benchmark's);
            otherwise they are normalised here.
        grid: the voxel grid (range and voxel size; its shape must match ``occupancy``).
        skip_empty_space: for the PyTorch walk, cross empty space in jumps (same result,
            faster); False walks one voxel per step.
        backend: ``"native"``: the compiled C walk, one ray at a time on CPU threads
            (:mod:`voxelsplat.evaluation.native`; CPU tensors only); ``"torch"``: the
            vectorised PyTorch walk (CPU or CUDA); ``"auto"``: native for CPU tensors where
            it builds, else torch. Both give the reference traversal's results.
        ray_precision: ``"official"`` (default): the benchmark's float32 rounding of the
            rays and depths; ``"float64"``: the exact geometry (see the module docstring).

    Returns:
        :class:`RayCastResult` with V = number of volumes (1 for an (X, Y, Z) input) and
        N = K * R rays, on the device of ``occupancy``.
    """
    if occupancy.dim() == 3:
        occupancy = occupancy[None]
    if occupancy.dim() != 4 or tuple(occupancy.shape[1:]) != tuple(grid.shape):
        raise ValueError(f"cast_rays: occupancy has shape {tuple(occupancy.shape)}, expected (V, "
                         f"{', '.join(map(str, grid.shape))}) for the grid {grid}")
    num_volumes = occupancy.shape[0]
    if backend not in ("auto", "native", "torch"):
        raise ValueError(f"cast_rays: unknown backend {backend!r}, expected 'auto', 'native' or 'torch'")
    if backend == "native" and occupancy.device.type != "cpu":
        raise ValueError(f"cast_rays: the native backend walks CPU tensors, the occupancy is on {occupancy.device}")
    if not 1 <= num_volumes <= 7:
        raise ValueError(f"cast_rays: {num_volumes} volumes given, at most 7 can share a walk")
    _check_precision(ray_precision, "cast_rays")
    device = occupancy.device
    origins = torch.as_tensor(origins, device=device)
    directions = torch.as_tensor(directions, device=device)
    origins_vox, unit_directions = ray_geometry_voxels(origins, directions, grid, ray_precision)

    code = _code_volume(occupancy)
    if device.type == "cpu" and (backend == "native" or (backend == "auto" and ray_walk_library() is not None)):
        voxel_index, depth_vox, hit = native_ray_walk(code, grid.shape, num_volumes, origins_vox, unit_directions)
    else:
        clearance = _level_clearance(code != 0) if skip_empty_space else None
        volume_bits = (1 << num_volumes) - 1
        voxel_index, depth_vox, hit = _march(code, clearance, grid.shape, origins_vox, unit_directions, volume_bits,
                                             num_volumes)
    if ray_precision == "official":
        # stored as float32, then scaled by the float32 voxel size in float32
        depth = depth_vox.to(torch.float32) * torch.full((), grid.voxel_size, dtype=torch.float32, device=device)
    else:
        depth = depth_vox * grid.voxel_size
    return RayCastResult(voxel_index=voxel_index, depth=depth, depth_voxels=depth_vox, hit=hit)


# --------------------------------------------------------------------------------------
# implementation
# --------------------------------------------------------------------------------------

def _code_volume(occupancy: torch.Tensor) -> torch.Tensor:
    """(V, X, Y, Z) occupancy -> (X+2, Y+2, Z+2) uint8 codes: bit v = occupied in volume v,
    bit 7 on the one-voxel border outside the grid."""
    bits = torch.zeros(occupancy.shape[1:], dtype=torch.uint8, device=occupancy.device)
    for v in range(occupancy.shape[0]):
        bits |= (occupancy[v] != 0).to(torch.uint8) << v
    code = torch.full([n + 2 for n in occupancy.shape[1:]], _OUTSIDE, dtype=torch.uint8, device=occupancy.device)
    code[1:-1, 1:-1, 1:-1] = bits
    return code


def _level_clearance(blocked: torch.Tensor, cap: int = _CLEARANCE_CAP) -> torch.Tensor:
    """Per z level, the chessboard (L-inf) distance in columns from each cell to the nearest
    blocked cell of the same level, minus one, capped at ``cap - 1``: every cell within that
    many columns (same level) is free. ``blocked``: (Xp, Yp, Zp) bool -> same shape uint8."""
    reached = blocked.permute(2, 0, 1).contiguous()  # (Z, X, Y): contiguous 2D levels
    radius = torch.zeros(reached.shape, dtype=torch.uint8, device=blocked.device)
    grown = torch.empty_like(reached)
    for _ in range(cap - 1):
        # grow the blocked set by one column in x, then in y (a 3x3 chessboard dilation)
        grown.copy_(reached)
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        reached.copy_(grown)
        reached[:, :, 1:] |= grown[:, :, :-1]
        reached[:, :, :-1] |= grown[:, :, 1:]
        radius += ~reached
    return radius.permute(1, 2, 0).contiguous()


def _choose_axis(t_next: torch.Tensor) -> torch.Tensor:
    """(N, 3) next crossing times -> (N,) axis the DDA steps along (z > y > x on ties)."""
    tx, ty, tz = t_next.unbind(-1)
    return torch.where(tx < ty, torch.where(tx < tz, 0, 2), torch.where(ty < tz, 1, 2))


def _enter_grid(voxel, step, t_next, t_delta, origin, direction, shape):
    """Advance rays (rows of (M, 3) tensors, voxel units) that start outside the grid to the
    first voxel they visit inside it. Returns the new (voxel, t_next) and an (M,) bool mask
    of the rays that enter the grid at all."""
    size = torch.tensor(shape, dtype=origin.dtype, device=origin.device)
    moving = direction != 0
    safe = torch.where(moving, direction, torch.ones_like(direction))
    t_lo, t_hi = (0 - origin) / safe, (size - origin) / safe
    in_slab = (origin >= 0) & (origin < size)  # an axis the ray does not move along: always or never inside
    far = torch.full_like(origin, _FAR)
    enter = torch.where(moving, torch.minimum(t_lo, t_hi), torch.where(in_slab, -far, far))
    leave = torch.where(moving, torch.maximum(t_lo, t_hi), torch.where(in_slab, far, -far))
    t_in = enter.max(-1).values.clamp_min(0)
    enters = t_in < leave.min(-1).values
    # every boundary crossing before t_in happens outside the grid: take them all at once
    crossed = torch.where(moving, torch.ceil((t_in[:, None] - t_next) * direction.abs()).clamp_min(0),
                          torch.zeros_like(t_next))
    voxel = voxel + crossed * step
    t_next = t_next + crossed * t_delta
    rows = torch.arange(len(voxel), device=voxel.device)
    for _ in range(4):  # then the crossing(s) at t_in itself, in DDA order
        todo = enters & ~((voxel >= 0) & (voxel < size)).all(-1)
        if not bool(todo.any()):
            break
        axis = _choose_axis(t_next)
        move = todo.to(voxel.dtype)
        voxel[rows, axis] += step[rows, axis] * move
        t_next[rows, axis] += t_delta[rows, axis] * move
    return voxel, t_next, enters & ((voxel >= 0) & (voxel < size)).all(-1)


class _Rays:
    """Per-ray marching state (rows are the rays still walking)."""

    names = ("ray_id", "flat", "tx", "ty", "tz", "dx", "dy", "dz", "ax", "ay", "az", "sx", "sy", "sz", "need")

    def __init__(self, **tensors):
        for name in self.names:
            setattr(self, name, tensors[name])

    def keep(self, rows: torch.Tensor) -> None:
        for name in self.names:
            setattr(self, name, getattr(self, name).index_select(0, rows))


def _march(code, clearance, shape, origin, direction, volume_bits, num_volumes,
           resolve_every: int = 8, warmup: int = 8):
    """Walk every ray until each volume has been hit or the ray left the grid.

    ``origin``: (K, 3) and ``direction``: (1 or K, R, 3) unit vectors, voxel units.
    Returns voxel index (V, K * R) int64, depth (V, K * R) float64 in voxel units, hit (V, K * R) bool.
    """
    device, f64 = origin.device, torch.float64
    num_rays = origin.shape[0] * direction.shape[1]
    X, Y, Z = shape
    Xp, Yp, Zp = code.shape
    code_flat = code.reshape(-1)
    clear_flat = clearance.reshape(-1) if clearance is not None else None

    out_index = torch.full((num_volumes, num_rays), -1, dtype=torch.int64, device=device)
    out_depth = torch.zeros((num_volumes, num_rays), dtype=f64, device=device)
    out_hit = torch.zeros((num_volumes, num_rays), dtype=torch.bool, device=device)

    # per origin (K, 3), per direction (Kd, R, 3) with Kd = 1 (shared) or K, per ray (K, R, 3)
    K, R = origin.shape[0], direction.shape[1]
    num_dirs = direction.shape[0]
    voxel = torch.floor(origin)
    step = torch.where(direction >= 0, 1.0, -1.0).to(f64)
    moving = direction != 0
    abs_dir = direction.abs()
    t_delta = torch.where(moving, 1.0 / abs_dir.clamp_min(1e-300), _FAR)
    safe = torch.where(moving, direction, torch.ones_like(direction))
    boundary = voxel[:, None, :] + (step > 0).to(f64)
    t_next = torch.where(moving, (boundary - origin[:, None, :]) / safe, _FAR).reshape(num_rays, 3)

    strides = torch.tensor([Yp * Zp, Zp, 1], dtype=f64, device=device)
    flat = ((voxel + 1) * strides).sum(-1)[:, None].expand(K, R).reshape(num_rays).clone()
    walking = None
    size = torch.tensor(shape, dtype=f64, device=device)
    outside_origins = (~((voxel >= 0) & (voxel < size)).all(-1)).nonzero().squeeze(1)
    if outside_origins.numel():
        out_rays = (outside_origins[:, None] * R + torch.arange(R, device=device)).reshape(-1)
        pick_dir = outside_origins if num_dirs > 1 else torch.zeros_like(outside_origins)
        per_ray = lambda t: t.index_select(0, pick_dir).reshape(-1, 3)  # noqa: E731
        ray_origin = origin.index_select(0, outside_origins)[:, None, :].expand(-1, R, -1).reshape(-1, 3)
        ray_voxel = voxel.index_select(0, outside_origins)[:, None, :].expand(-1, R, -1).reshape(-1, 3)
        new_voxel, new_t, enters = _enter_grid(ray_voxel.clone(), per_ray(step), t_next[out_rays], per_ray(t_delta),
                                               ray_origin, per_ray(direction), shape)
        flat[out_rays] = ((new_voxel + 1) * strides).sum(-1)
        t_next[out_rays] = new_t
        walking = torch.ones(num_rays, dtype=torch.bool, device=device)
        walking[out_rays] = enters
        walking = walking.nonzero().squeeze(1)
        if walking.numel() == 0:
            return out_index, out_depth, out_hit

    def per_axis(values, axis):  # (Kd, R, 3) or (num_rays, 3) -> contiguous (num_rays,) of the walking rays
        column = values[..., axis]
        if column.dim() == 2:
            column = column.expand(K, R)
        column = column.reshape(num_rays)
        return column.index_select(0, walking) if walking is not None else column.contiguous()

    stride_step = step * strides
    rays = _Rays(
        ray_id=walking if walking is not None else torch.arange(num_rays, device=device),
        flat=flat.index_select(0, walking) if walking is not None else flat,
        tx=per_axis(t_next, 0), ty=per_axis(t_next, 1), tz=per_axis(t_next, 2),
        dx=per_axis(t_delta, 0), dy=per_axis(t_delta, 1), dz=per_axis(t_delta, 2),
        ax=per_axis(abs_dir, 0), ay=per_axis(abs_dir, 1), az=per_axis(abs_dir, 2),
        sx=per_axis(stride_step, 0), sy=per_axis(stride_step, 1), sz=per_axis(stride_step, 2),
        need=None,
    )
    rays.need = torch.full((rays.ray_id.numel(),), volume_bits | _OUTSIDE, dtype=torch.uint8, device=device)

    # scratch buffers, sliced to the number of walking rays
    capacity = rays.ray_id.numel()

    def buffer(dtype):
        return torch.empty(capacity, dtype=dtype, device=device)

    index, codes, clear = buffer(torch.int64), buffer(torch.uint8), buffer(torch.uint8)
    alive, t_min, fx, fy, fz, rest = (buffer(f64) for _ in range(6))
    jump, box_x, box_y, nx, ny = (buffer(f64) for _ in range(5))
    zeros = torch.zeros(capacity, dtype=f64, device=device)

    # each step advances a walking ray by at least one voxel; a ray waits at most
    # ``resolve_every`` steps for each of its volumes to be resolved
    max_iterations = (X + Y + Z + 8) + (num_volumes + 2) * resolve_every + warmup
    iteration = 0
    while True:
        n = rays.ray_id.numel()
        for _ in range(resolve_every):
            idx, cod, alv = index[:n], codes[:n], alive[:n]
            idx.copy_(rays.flat)
            torch.index_select(code_flat, 0, idx, out=cod)
            cod &= rays.need
            torch.eq(cod, 0, out=alv)  # 1.0 for rays still walking, 0.0 for rays stopped on an event
            if clear_flat is not None and iteration >= warmup:
                _jump(rays, clear_flat, idx, clear[:n], jump[:n], box_x[:n], box_y[:n], nx[:n], ny[:n], zeros[:n])
            _step(rays, alv, t_min[:n], fx[:n], fy[:n], fz[:n], rest[:n])
            iteration += 1
        _resolve(rays, code_flat, (Yp * Zp, Zp), (X, Y, Z), volume_bits, num_volumes, out_index, out_depth, out_hit)
        remaining = ((rays.need & volume_bits) != 0).nonzero().squeeze(1)
        if remaining.numel() == 0:
            break
        if remaining.numel() < n:
            rays.keep(remaining)
        if iteration > max_iterations:
            raise RuntimeError(f"cast_rays: {remaining.numel()} rays still walking after {iteration} steps "
                               f"(bound {max_iterations}); this is a bug")
    return out_index, out_depth, out_hit


def _step(rays: _Rays, alive, t_min, fx, fy, fz, rest) -> None:
    """One DDA step for every walking ray (rays with ``alive == 0`` stay put)."""
    torch.minimum(rays.tx, rays.ty, out=t_min)
    torch.minimum(t_min, rays.tz, out=t_min)
    # z wins ties, then y, then x: fz, fy, fx are 0/1 and sum to ``alive``
    torch.eq(rays.tz, t_min, out=fz)
    fz *= alive
    torch.eq(rays.ty, t_min, out=fy)
    torch.sub(alive, fz, out=rest)
    fy *= rest
    torch.sub(rest, fy, out=fx)
    rays.tx.addcmul_(rays.dx, fx)
    rays.ty.addcmul_(rays.dy, fy)
    rays.tz.addcmul_(rays.dz, fz)
    rays.flat.addcmul_(rays.sx, fx)
    rays.flat.addcmul_(rays.sy, fy)
    rays.flat.addcmul_(rays.sz, fz)


def _jump(rays: _Rays, clear_flat, idx, clear, jump, box_x, box_y, nx, ny, zeros) -> None:
    """Take, at once, every x/y boundary crossing that stays inside the free square of
    columns around the current voxel and comes before the next z crossing. (Rays stopped
    on an event stand on a blocked voxel, whose clearance is 0: they do not move.)"""
    torch.index_select(clear_flat, 0, idx, out=clear)
    jump.copy_(clear)
    # the free square ends at the jump-th crossing after the next one, in x or in y
    torch.addcmul(rays.tx, jump, rays.dx, out=box_x)
    torch.addcmul(rays.ty, jump, rays.dy, out=box_y)
    torch.minimum(box_x, box_y, out=box_x)
    torch.minimum(box_x, rays.tz, out=box_x)  # t_box: crossings strictly before it are taken
    for t_axis, abs_axis, count in ((rays.tx, rays.ax, nx), (rays.ty, rays.ay, ny)):
        torch.sub(box_x, t_axis, out=count)
        count *= abs_axis
        count.ceil_()
        torch.clamp(count, zeros, jump, out=count)
    rays.tx.addcmul_(nx, rays.dx)
    rays.ty.addcmul_(ny, rays.dy)
    rays.flat.addcmul_(nx, rays.sx)
    rays.flat.addcmul_(ny, rays.sy)


def _resolve(rays: _Rays, code_flat, pad_strides, shape, volume_bits, num_volumes, out_index, out_depth,
             out_hit) -> None:
    """Record the result of every ray standing on an event (an occupied voxel of a volume it
    still needs, or the border outside the grid) and clear those volumes from ``need``."""
    events = code_flat.index_select(0, rays.flat.to(torch.int64))
    events &= rays.need
    rows = events.nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    pick = lambda t: t.index_select(0, rows)  # noqa: E731
    events, ray_id, flat, need = pick(events), pick(rays.ray_id), pick(rays.flat), pick(rays.need)
    tx, ty, tz = pick(rays.tx), pick(rays.ty), pick(rays.tz)
    occupied = events & volume_bits
    left_grid = (events & _OUTSIDE) != 0
    depth = torch.minimum(torch.minimum(tx, ty), tz)
    out_rows = left_grid.nonzero().squeeze(1)
    if out_rows.numel():
        # step back to the last voxel inside: the latest crossing (x, then y, then z on ties)
        sub = rows.index_select(0, out_rows)
        entered = []
        for t_next, t_delta, abs_dir in ((rays.tx, rays.dx, rays.ax), (rays.ty, rays.dy, rays.ay),
                                         (rays.tz, rays.dz, rays.az)):
            at = t_next.index_select(0, sub) - t_delta.index_select(0, sub)
            entered.append(torch.where(abs_dir.index_select(0, sub) > 0, at, torch.full_like(at, -_FAR)))
        ex, ey, ez = entered
        last_x = (ex >= ey) & (ex >= ez)
        last_y = ~last_x & (ey >= ez)
        back = torch.where(last_x, rays.sx.index_select(0, sub),
                           torch.where(last_y, rays.sy.index_select(0, sub), rays.sz.index_select(0, sub)))
        flat[out_rows] -= back
        depth[out_rows] = torch.where(last_x, ex, torch.where(last_y, ey, ez))
    flat = flat.to(torch.int64)
    px, rem = flat // pad_strides[0], flat % pad_strides[0]
    py, pz = rem // pad_strides[1], rem % pad_strides[1]
    X, Y, Z = shape
    grid_index = ((px - 1) * Y + (py - 1)) * Z + (pz - 1)
    remaining = need & volume_bits
    for v in range(num_volumes):
        bit = 1 << v
        take = ((occupied & bit) != 0) | (left_grid & ((remaining & bit) != 0))
        take_rows = take.nonzero().squeeze(1)
        if take_rows.numel() == 0:
            continue
        ids = ray_id.index_select(0, take_rows)
        out_index[v].index_copy_(0, ids, grid_index.index_select(0, take_rows))
        out_depth[v].index_copy_(0, ids, depth.index_select(0, take_rows))
        out_hit[v].index_copy_(0, ids, (occupied.index_select(0, take_rows) & bit) != 0)
    need &= ~occupied
    need.masked_fill_(left_grid, 0)
    rays.need.index_copy_(0, rows, need)
