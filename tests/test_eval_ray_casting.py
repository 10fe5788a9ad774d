"""Ray casting of the RayIoU benchmark against a slow, obvious per-ray walk.

Most tests check the walk itself on exact (``ray_precision="float64"``) geometry; the
``official`` tests check the benchmark's float32 rounding of the rays and depths."""
import math
import os

import numpy as np
import pytest
import torch

from voxelsplat.structures import DEFAULT_GRID, OccupancyGrid
from voxelsplat.evaluation import native, ray_casting
from voxelsplat.evaluation.native import native_ray_walk
from voxelsplat.evaluation.ray_casting import cast_rays, lidar_pitch_angles, lidar_ray_directions

SMALL_GRID = OccupancyGrid((-3.0, -2.0, -1.0, 4.0, 3.5, 2.0), 0.5)  # 14 x 11 x 6 voxels


def reference_cast(occupied, origin_vox, direction, with_margin=False):
    """One ray, pure Python, float64: the reference traversal's loop written out.

    ``occupied``: (X, Y, Z) bool numpy array; ``origin_vox``: origin in voxel units.
    Returns (flat voxel index or -1, exit distance in voxel units, hit), and with
    ``with_margin`` also the smallest gap (voxel units) between the crossing taken and the
    next other crossing along the walk: rays closer than ~1e-12 to a voxel edge may take
    the other side of it under different (equally valid) rounding."""
    shape = occupied.shape
    o = [float(v) for v in origin_vox]
    length = math.sqrt(sum(float(v) ** 2 for v in direction))
    d = [float(v) / length for v in direction]
    v = [math.floor(c) for c in o]
    step = [1 if c >= 0 else -1 for c in d]
    t_max = [((v[a] + (1 if step[a] > 0 else 0)) - o[a]) / d[a] if d[a] != 0 else math.inf for a in range(3)]
    t_delta = [step[a] / d[a] if d[a] != 0 else math.inf for a in range(3)]
    was_inside, last, margin = False, None, math.inf
    for _ in range(4 * sum(shape) + 64):
        inside = all(0 <= v[a] < shape[a] for a in range(3))
        if inside:
            was_inside = True
        elif was_inside:
            break
        if t_max[0] < t_max[1]:
            axis = 0 if t_max[0] < t_max[2] else 2
        else:
            axis = 1 if t_max[1] < t_max[2] else 2
        exit_distance = t_max[axis]
        if inside:
            flat = (v[0] * shape[1] + v[1]) * shape[2] + v[2]
            if occupied[v[0], v[1], v[2]]:
                return (flat, exit_distance, True, margin) if with_margin else (flat, exit_distance, True)
            last = (flat, exit_distance)
        others = [t_max[a] for a in range(3) if a != axis]
        margin = min(margin, min(others) - exit_distance)
        v[axis] += step[axis]
        t_max[axis] += t_delta[axis]
    result = (-1, 0.0, False) if last is None else (last[0], last[1], False)
    return result + (margin,) if with_margin else result


def realistic_occupancy(rng, shape, num_boxes=12):
    """Ground of varying height plus boxes: (X, Y, Z) bool."""
    X, Y, Z = shape
    occupied = np.zeros(shape, bool)
    ground = 1 + (rng.random((X // 10 + 1, Y // 10 + 1)) < 0.4)
    occupied[np.arange(Z)[None, None, :] < np.kron(ground, np.ones((10, 10), int))[:X, :Y, None]] = True
    for _ in range(num_boxes):
        x0, y0 = rng.integers(0, X - 4), rng.integers(0, Y - 4)
        w, d, h = rng.integers(2, max(3, X // 8)), rng.integers(2, max(3, Y // 8)), rng.integers(2, Z)
        occupied[x0:x0 + w, y0:y0 + d, 1:h] = True
    return occupied


def compare_with_reference(occupancy, origins, directions, grid, result, rays=None):
    """Assert ``result`` matches :func:`reference_cast` for every volume and (selected) ray."""
    occupancy = occupancy if occupancy.ndim == 4 else occupancy[None]
    directions = directions if directions.ndim == 3 else np.broadcast_to(directions, (len(origins),) + directions.shape)
    num_dirs = directions.shape[1]
    rays = range(len(origins) * num_dirs) if rays is None else rays
    for ray in rays:
        k, r = divmod(int(ray), num_dirs)
        origin_vox = (origins[k] - grid.range_min) / grid.voxel_size
        for v in range(occupancy.shape[0]):
            index, distance, hit = reference_cast(occupancy[v], origin_vox, directions[k, r])
            got = (int(result.voxel_index[v, ray]), float(result.depth[v, ray]), bool(result.hit[v, ray]))
            assert got[0] == index and got[2] == hit and got[1] == pytest.approx(distance * grid.voxel_size, abs=1e-9), \
                (v, k, r, origins[k], directions[k, r], got, (index, distance * grid.voxel_size, hit))


def test_lidar_ray_pattern_matches_the_benchmark():
    pitches = lidar_pitch_angles()
    assert len(pitches) == 39
    # ten steep rays at -(90 deg - atan(k)), k = 1..10, then evenly spaced up past 0.21 rad
    assert pitches[0] == pytest.approx(-math.pi / 4)
    for k in range(10):
        assert pitches[k] == pytest.approx(-(math.pi / 2 - math.atan(k + 1)), abs=1e-15)
    spacing = pitches[9] - pitches[8]
    assert np.allclose(np.diff(pitches[9:]), spacing, atol=1e-12)
    assert pitches[-2] < 0.21 <= pitches[-1]
    exact = lidar_ray_directions(dtype=torch.float64).numpy()
    assert exact.shape == (39 * 360, 3) and exact.dtype == np.float64
    assert np.allclose(np.linalg.norm(exact, axis=1), 1.0, rtol=0, atol=1e-15)
    p, a = 20, 137  # row p * 360 + a: pitch p, azimuth a degrees
    pitch, azimuth = pitches[p], math.radians(a)
    expected = [math.cos(pitch) * math.cos(azimuth), math.cos(pitch) * math.sin(azimuth), math.sin(pitch)]
    assert np.allclose(exact[p * 360 + a], expected, rtol=0, atol=1e-15)
    # the benchmark casts them as float32: computed in float64, then rounded
    directions = lidar_ray_directions().numpy()
    assert directions.dtype == np.float32
    assert np.array_equal(directions, np.array([[math.cos(p) * math.cos(math.radians(a)),
                                                 math.cos(p) * math.sin(math.radians(a)), math.sin(p)]
                                                for p in pitches for a in range(360)], np.float32))


# the compiled walk, the vectorised walk with empty-space jumps, and without them
WALKS = [dict(backend="native", ray_precision="float64"), dict(backend="torch", ray_precision="float64"),
         dict(backend="torch", skip_empty_space=False, ray_precision="float64")]
WALK_IDS = ["native", "torch", "torch-plain"]


@pytest.mark.parametrize("walk", WALKS, ids=WALK_IDS)
def test_cast_matches_reference_on_random_grids(walk):
    rng = np.random.default_rng(7)
    axes = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
    for density in (0.0, 0.05, 0.2, 0.5):
        occupancy = rng.random((2,) + SMALL_GRID.shape) < density
        # origins inside the grid and up to a voxel outside it, in every direction
        origins = rng.uniform(SMALL_GRID.range_min - 0.5, SMALL_GRID.range_max + 0.5, size=(6, 3))
        directions = rng.normal(size=(6, 30, 3))
        directions[:, :6] = axes  # rays along the axes
        result = cast_rays(torch.from_numpy(occupancy), torch.from_numpy(origins), torch.from_numpy(directions),
                           SMALL_GRID, **walk)
        compare_with_reference(occupancy, origins, directions, SMALL_GRID, result)


@pytest.mark.parametrize("walk", WALKS, ids=WALK_IDS)
def test_ties_follow_the_z_then_y_then_x_rule(walk):
    """Rays through voxel edges and corners, and along voxel faces, from exact positions."""
    grid = SMALL_GRID
    corner = grid.range_min + grid.voxel_size * np.array([2.0, 2.0, 2.0])  # a voxel corner
    directions = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1], [-1, 1, 0], [1, -1, -1], [-1, -1, 1],
                           [2, 2, 1], [1, 0, 0], [0, 1, 0]], float)
    rng = np.random.default_rng(3)
    occupancy = rng.random((3,) + grid.shape) < 0.15
    for origin in (corner, corner + [0.2, 0.0, 0.0], corner + [0.0, 0.0, 0.2]):
        result = cast_rays(torch.from_numpy(occupancy), torch.from_numpy(origin[None]),
                           torch.from_numpy(directions), grid, **walk)
        compare_with_reference(occupancy, origin[None], directions, grid, result)

    # known answers: through the xy edge at (3, 3) the walk visits (2, 3, .) (y first), never (3, 2, .)
    origin = grid.range_min + grid.voxel_size * np.array([[2.0, 2.0, 0.5]])
    for side_voxel, is_visited in (((2, 3, 0), True), ((3, 2, 0), False)):
        occupied = np.zeros(grid.shape, bool)
        occupied[side_voxel] = True
        result = cast_rays(torch.from_numpy(occupied), torch.from_numpy(origin), torch.tensor([[1.0, 1.0, 0.0]]), grid,
                           **walk)
        assert bool(result.hit[0, 0]) is is_visited
        if is_visited:
            assert int(result.voxel_index[0, 0]) == np.ravel_multi_index(side_voxel, grid.shape)
            # entered and left at the edge: depth = distance to the edge
            assert float(result.depth[0, 0]) == pytest.approx(math.sqrt(2) * grid.voxel_size, abs=1e-12)
    # z wins a tie with x: through the xz edge the walk visits (2, ., 3) before (3, ., 3)
    origin = grid.range_min + grid.voxel_size * np.array([[2.0, 0.5, 2.0]])
    occupied = np.zeros(grid.shape, bool)
    occupied[3, 0, 2] = True  # the x-first side: skipped
    occupied[3, 0, 4] = True  # further along the diagonal: the hit
    result = cast_rays(torch.from_numpy(occupied), torch.from_numpy(origin), torch.tensor([[1.0, 0.0, 1.0]]), grid,
                       **walk)
    assert int(result.voxel_index[0, 0]) == np.ravel_multi_index((3, 0, 4), grid.shape)


@pytest.mark.parametrize("walk", WALKS, ids=WALK_IDS)
def test_occupied_origin_voxel_is_the_hit(walk):
    grid = SMALL_GRID
    occupied = np.zeros(grid.shape, bool)
    occupied[5, 5, 2] = True
    origin = grid.range_min + grid.voxel_size * np.array([[5.25, 5.5, 2.5]])
    result = cast_rays(torch.from_numpy(occupied), torch.from_numpy(origin), torch.tensor([[1.0, 0.0, 0.0]]), grid, **walk)
    assert bool(result.hit[0, 0]) and int(result.voxel_index[0, 0]) == np.ravel_multi_index((5, 5, 2), grid.shape)
    assert float(result.depth[0, 0]) == pytest.approx(0.75 * grid.voxel_size)


@pytest.mark.parametrize("walk", WALKS, ids=WALK_IDS)
def test_rays_that_hit_nothing_report_the_last_voxel_and_where_they_leave_the_grid(walk):
    grid = SMALL_GRID
    rng = np.random.default_rng(11)
    origins = rng.uniform(grid.range_min + 0.01, grid.range_max - 0.01, size=(4, 3))
    directions = rng.normal(size=(50, 3))
    result = cast_rays(torch.zeros(grid.shape, dtype=torch.bool), torch.from_numpy(origins),
                       torch.from_numpy(directions), grid, **walk)
    assert not result.hit.any()
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    for k, origin in enumerate(origins):
        # slab method: where the ray leaves the grid box
        with np.errstate(divide="ignore"):
            far = np.where(unit > 0, grid.range_max, grid.range_min)
            exit_distance = np.min(np.where(unit != 0, (far - origin) / unit, np.inf), axis=1)
        depth = result.depth[0, k * 50:(k + 1) * 50].numpy()
        assert np.allclose(depth, exit_distance, atol=1e-9)
        # the reported voxel contains the point just before the exit
        inner = origin + unit * (exit_distance - 1e-6)[:, None]
        expected = np.ravel_multi_index(tuple(grid.point_to_index(inner).T), grid.shape)
        assert np.array_equal(result.voxel_index[0, k * 50:(k + 1) * 50].numpy(), expected)


@pytest.mark.parametrize("walk", WALKS, ids=WALK_IDS)
def test_rays_that_never_enter_the_grid(walk):
    grid = SMALL_GRID
    occupied = torch.ones(grid.shape, dtype=torch.bool)
    above = torch.tensor([[0.0, 0.0, grid.range_max[2] + 1.0]], dtype=torch.float64)
    result = cast_rays(occupied, above, torch.tensor([[0.0, 0.3, 1.0], [0.0, 0.0, -1.0]]), grid, **walk)
    assert result.voxel_index[0, 0] == -1 and result.depth[0, 0] == 0 and not result.hit[0, 0]
    # straight down: enters through the top, the first voxel is occupied; depth 1 m + one voxel
    top = np.ravel_multi_index(tuple(grid.point_to_index([0.0, 0.0, grid.range_max[2] - 0.01])), grid.shape)
    assert int(result.voxel_index[0, 1]) == top and bool(result.hit[0, 1])
    assert float(result.depth[0, 1]) == pytest.approx(1.0 + grid.voxel_size)


def float32_rays_in_voxels(origins, directions, grid):
    """The benchmark's ray rounding written out in numpy: float32 origins and directions,
    end point = origin + direction in float32, both in voxel units in float32. Returns
    float64 (K, 3) origins and (K, R, 3) direction vectors (end - origin, not normalised)."""
    offset = np.asarray(grid.range_min, np.float32)
    scale = np.full(3, grid.voxel_size, np.float32)
    o32 = np.asarray(origins, np.float64).astype(np.float32)
    d32 = np.asarray(directions, np.float64).astype(np.float32)
    o_vox = (o32 - offset) / scale
    e_vox = ((d32[None] + o32[:, None]) - offset) / scale
    assert o_vox.dtype == e_vox.dtype == np.float32
    return o_vox.astype(np.float64), e_vox.astype(np.float64) - o_vox.astype(np.float64)[:, None]


def official_scene(seed=12, num_origins=3):
    rng = np.random.default_rng(seed)
    occupancy = np.stack([realistic_occupancy(rng, DEFAULT_GRID.shape, 40) for _ in range(2)])
    origins = np.stack([rng.uniform(-30, 30, num_origins), rng.uniform(-30, 30, num_origins),
                        rng.uniform(1.0, 2.5, num_origins)], 1)
    return rng, occupancy, origins


@pytest.mark.parametrize("walk", [dict(backend="native"), dict(backend="torch"),
                                  dict(backend="torch", skip_empty_space=False)], ids=WALK_IDS)
def test_official_rounding_walks_the_float32_rays_and_rounds_depths_to_float32(walk):
    grid = DEFAULT_GRID
    rng, occupancy, origins = official_scene(num_origins=2)
    directions = lidar_ray_directions()[::3]  # float32, the benchmark's (every third: a quick test)
    result = cast_rays(torch.from_numpy(occupancy), torch.from_numpy(origins), directions, grid, **walk)
    assert result.depth.dtype == torch.float32 and result.depth_voxels.dtype == torch.float64
    o_vox, rays = float32_rays_in_voxels(origins, directions.numpy(), grid)
    voxel_size = np.float32(grid.voxel_size)
    for ray in rng.choice(len(origins) * len(directions), 300, replace=False):
        k, r = divmod(int(ray), len(directions))
        for v in range(2):
            index, distance, hit = reference_cast(occupancy[v], o_vox[k], rays[k, r])
            assert (int(result.voxel_index[v, ray]), bool(result.hit[v, ray])) == (index, hit), (k, r, v)
            assert float(result.depth_voxels[v, ray]) == pytest.approx(distance, rel=0, abs=1e-12)
            depth = np.float32(np.float32(distance) * voxel_size)  # float32 voxels times float32 voxel size
            assert result.depth[v, ray].item() == depth, (k, r, v)


def test_official_rounding_moves_some_hits_of_the_exact_geometry():
    grid = DEFAULT_GRID
    _, occupancy, origins = official_scene()
    occupancy, origins, directions = torch.from_numpy(occupancy), torch.from_numpy(origins), lidar_ray_directions()
    official = cast_rays(occupancy, origins, directions, grid)
    exact = cast_rays(occupancy, origins, directions, grid, ray_precision="float64")
    moved = (exact.voxel_index != official.voxel_index).any(0)
    assert 0 < int(moved.sum()) < 0.01 * moved.numel()  # 32 of 42120 rays
    same = ~moved
    difference = (exact.depth[:, same] - official.depth[:, same].double()).abs()
    assert 1e-4 < float(difference.max()) < 1e-2  # the end point's float32 rounding tilts the rays
    # the official path from the float64 directions: they are rounded to float32 first
    assert torch.equal(cast_rays(occupancy, origins, directions.double(), grid).depth, official.depth)


def test_official_rounding_of_per_origin_directions_and_bad_precision():
    grid = SMALL_GRID
    rng = np.random.default_rng(2)
    occupancy = torch.from_numpy(rng.random(grid.shape) < 0.2)
    origins = torch.tensor([[0.1, 0.3, 0.7], [-1.3, 1.1, 0.2]], dtype=torch.float64)
    directions = torch.randn(2, 30, 3, dtype=torch.float64)
    directions /= directions.norm(dim=-1, keepdim=True)
    per_origin = cast_rays(occupancy, origins, directions, grid)
    for k in range(2):  # the same as casting each origin with its own shared directions
        alone = cast_rays(occupancy, origins[k:k + 1], directions[k], grid)
        assert torch.equal(alone.voxel_index[0], per_origin.voxel_index[0, k * 30:(k + 1) * 30])
        assert torch.equal(alone.depth[0], per_origin.depth[0, k * 30:(k + 1) * 30])
    with pytest.raises(ValueError, match="unknown ray_precision 'float32'"):
        cast_rays(occupancy, origins, directions, grid, ray_precision="float32")
    with pytest.raises(ValueError, match="zero length"):  # lost in the float32 end point
        cast_rays(occupancy, origins, torch.full((1, 3), 1e-12, dtype=torch.float64), grid)


def test_empty_space_jumps_match_the_plain_walk_except_on_edge_grazing_rays():
    grid = DEFAULT_GRID
    rng = np.random.default_rng(5)
    occupancy = np.stack([realistic_occupancy(rng, grid.shape, 40) for _ in range(2)])
    origins = np.array([[0.9, 0.0, 1.84], [-20.3, 6.1, 1.5]])
    directions = lidar_ray_directions()
    # the second origin sits at voxel coordinates (49.25, 115.25, 6.25): rays at 45 deg azimuth
    # pass within 1e-14 voxel of voxel edges all along their way
    exact = dict(ray_precision="float64")
    fast = cast_rays(torch.from_numpy(occupancy), torch.from_numpy(origins), directions, grid, backend="torch",
                     **exact)
    plain = cast_rays(torch.from_numpy(occupancy), torch.from_numpy(origins), directions, grid, backend="torch",
                      skip_empty_space=False, **exact)
    differ = ((fast.voxel_index != plain.voxel_index) | (fast.hit != plain.hit)).any(0).nonzero().squeeze(1)
    assert len(differ) <= 10
    for ray in differ.tolist():  # only rays grazing an edge may differ, and the plain walk is the reference's
        k, r = divmod(ray, directions.shape[0])
        origin_vox = (origins[k] - grid.range_min) / grid.voxel_size
        for v in range(2):
            index, distance, hit, margin = reference_cast(occupancy[v], origin_vox, directions[r], with_margin=True)
            assert (int(plain.voxel_index[v, ray]), bool(plain.hit[v, ray])) == (index, hit)
            if (int(fast.voxel_index[v, ray]), bool(fast.hit[v, ray])) != (index, hit):
                assert margin < 1e-12, (ray, v, margin)
    same = torch.ones(fast.voxel_index.shape[1], dtype=torch.bool)
    same[differ] = False
    assert torch.equal(fast.voxel_index[:, same], plain.voxel_index[:, same])
    assert torch.equal(fast.hit[:, same], plain.hit[:, same])
    assert torch.allclose(fast.depth[:, same], plain.depth[:, same], rtol=0, atol=1e-9)
    assert 0.2 < fast.hit.float().mean() < 0.95  # the scene stops some rays and not others
    some = rng.choice(fast.voxel_index.shape[1], 150, replace=False)
    compare_with_reference(occupancy, origins, directions.numpy(), grid, fast, rays=some)


def test_native_walk_equals_the_vectorised_plain_walk_on_a_street_grid():
    """The benchmark grid and rays, origins inside, outside and far outside the grid; any
    thread count gives the same bytes."""
    grid = DEFAULT_GRID
    rng = np.random.default_rng(8)
    occupancy = torch.from_numpy(np.stack([realistic_occupancy(rng, grid.shape, 40) for _ in range(3)]))
    origins = torch.tensor([[0.9, 0.0, 1.84], [-20.3, 6.1, 1.5], [33.7, -12.2, 2.2], [0.13, -0.07, 9.0],
                            [-45.0, 3.03, 1.07], [300.3, 250.1, 40.7]], dtype=torch.float64)
    directions = lidar_ray_directions()
    native = cast_rays(occupancy, origins, directions, grid, backend="native", ray_precision="float64")
    plain = cast_rays(occupancy, origins, directions, grid, backend="torch", skip_empty_space=False,
                      ray_precision="float64")
    # the vectorised walk takes the crossings outside the grid in one multiplication where the
    # native walk adds them up as the reference does: only rays that graze a voxel edge
    # on their way in may differ
    differ = ((native.voxel_index != plain.voxel_index) | (native.hit != plain.hit)).any(0).nonzero().squeeze(1)
    assert set((differ // directions.shape[0]).tolist()) <= {3, 4, 5} and len(differ) <= 10
    for ray in differ.tolist():
        k, r = divmod(ray, directions.shape[0])
        origin_vox = (origins[k].numpy() - grid.range_min) / grid.voxel_size
        for v in range(3):
            index, _, hit, margin = reference_cast(occupancy[v].numpy(), origin_vox, directions[r].numpy(),
                                                   with_margin=True)
            assert margin < 1e-12 or (int(native.voxel_index[v, ray]), bool(native.hit[v, ray])) == (index, hit)
    same = torch.ones(native.voxel_index.shape[1], dtype=torch.bool)
    same[differ] = False
    assert torch.equal(native.voxel_index[:, same], plain.voxel_index[:, same])
    assert torch.equal(native.hit[:, same], plain.hit[:, same])
    assert torch.allclose(native.depth[:, same], plain.depth[:, same], rtol=0, atol=1e-9)
    some = rng.choice(native.voxel_index.shape[1], 100, replace=False)
    compare_with_reference(occupancy.numpy(), origins.numpy(), directions.numpy(), grid, native, rays=some)
    assert 0.2 < native.hit.float().mean() < 0.95 and (native.voxel_index == -1).any()
    # the walk is split over threads in chunks of rays: the thread count changes nothing
    code = ray_casting._code_volume(occupancy)
    origins_vox = (origins - torch.tensor(grid.range_min, dtype=torch.float64)) / grid.voxel_size
    unit = directions.double() / directions.double().norm(dim=-1, keepdim=True)
    one, two = (native_ray_walk(code, grid.shape, 3, origins_vox, unit[None], threads=t) for t in (1, 2))
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    assert torch.equal(one[0], native.voxel_index)


@pytest.mark.parametrize("compiler,reason", [("no-such-compiler", "no C compiler"), ("false", "failed")],
                         ids=["missing", "failing"])
def test_native_walk_falls_back_to_torch_without_a_compiler(monkeypatch, tmp_path, caplog, compiler, reason):
    monkeypatch.setenv("CC", compiler if compiler == "false" else str(tmp_path / compiler))
    monkeypatch.setenv("VOXELSPLAT_NATIVE_DIR", str(tmp_path / "native"))
    monkeypatch.setattr(native.RAY_WALK, "_library", None)
    monkeypatch.setattr(native.RAY_WALK, "_failure", None)
    with caplog.at_level("WARNING", logger="voxelsplat.utils.native"):
        assert native.ray_walk_library() is None
    assert "falls back to the PyTorch walk" in caplog.text and reason in caplog.text
    assert list(tmp_path.rglob("*.partial")) == []  # a failed build leaves nothing behind
    rng = np.random.default_rng(4)
    occupancy = torch.from_numpy(rng.random(SMALL_GRID.shape) < 0.2)
    origins, directions = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    auto = cast_rays(occupancy, origins, directions, SMALL_GRID, ray_precision="float64")  # walks with torch
    compare_with_reference(occupancy.numpy(), origins.numpy(), directions.numpy(), SMALL_GRID, auto)
    with pytest.raises(native.NativeBuildError, match=reason):
        cast_rays(occupancy, origins, directions, SMALL_GRID, backend="native")


def test_native_walk_builds_into_its_cache_and_rebuilds_a_damaged_library(monkeypatch, tmp_path):
    cache = tmp_path / "native"
    monkeypatch.setenv("VOXELSPLAT_NATIVE_DIR", str(cache))
    monkeypatch.setattr(native.RAY_WALK, "_library", None)
    monkeypatch.setattr(native.RAY_WALK, "_failure", None)
    target = native.RAY_WALK.path()
    assert os.path.dirname(target) == str(cache)
    os.makedirs(cache)
    with open(target, "wb") as f:  # e.g. a copy cut short
        f.write(b"not a shared library")
    assert native.ray_walk_library(required=True) is not None
    assert sorted(os.listdir(cache)) == [os.path.basename(target)]  # rebuilt in place, nothing partial left
    with open(target, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    occupancy = torch.zeros(SMALL_GRID.shape, dtype=torch.bool)
    occupancy[7, 5, 3] = True
    origin = torch.tensor([[SMALL_GRID.range_min[0] + 0.25, SMALL_GRID.range_min[1] + 2.75, 0.75]], dtype=torch.float64)
    result = cast_rays(occupancy, origin, torch.tensor([[1.0, 0.0, 0.0]]), SMALL_GRID, backend="native")
    assert bool(result.hit[0, 0]) and int(result.voxel_index[0, 0]) == np.ravel_multi_index((7, 5, 3), SMALL_GRID.shape)
    assert float(result.depth[0, 0]) == pytest.approx(8 * SMALL_GRID.voxel_size - 0.25)


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="occupancy has shape"):
        cast_rays(torch.zeros(3, 4, 5, dtype=torch.bool), torch.zeros(1, 3), torch.ones(1, 3), SMALL_GRID)
    with pytest.raises(ValueError, match="zero length"):
        cast_rays(torch.zeros(SMALL_GRID.shape, dtype=torch.bool), torch.zeros(1, 3), torch.zeros(1, 3), SMALL_GRID)
    with pytest.raises(ValueError, match="unknown backend 'numba'"):
        cast_rays(torch.zeros(SMALL_GRID.shape, dtype=torch.bool), torch.zeros(1, 3), torch.ones(1, 3), SMALL_GRID,
                  backend="numba")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cast_on_cuda_matches_cpu():
    grid = DEFAULT_GRID
    rng = np.random.default_rng(2)
    occupancy = torch.from_numpy(np.stack([realistic_occupancy(rng, grid.shape, 40) for _ in range(2)]))
    origins = torch.tensor([[0.9, 0.0, 1.84], [10.0, -3.0, 1.7]], dtype=torch.float64)
    cpu = cast_rays(occupancy, origins, lidar_ray_directions(), grid)
    gpu = cast_rays(occupancy.cuda(), origins.cuda(), lidar_ray_directions(device="cuda"), grid)
    assert torch.equal(cpu.voxel_index, gpu.voxel_index.cpu()) and torch.equal(cpu.hit, gpu.hit.cpu())
    assert torch.allclose(cpu.depth, gpu.depth.cpu(), atol=1e-9)
