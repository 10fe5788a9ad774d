"""RayIoU / mAVE / OccScore and Occ3D mIoU: known answers and independent slow references.

Two references: the challenge's pipeline written out step by step (float32 rays, a per-ray
float64 walk, float32 depths, the challenge's counting and mAVE), which the default
``ray_precision="official"`` must reproduce; and an exact-geometry one for
``ray_precision="float64"``."""
import math

import numpy as np
import pytest
import torch

from voxelsplat.structures import DEFAULT_GRID, OPENOCC_V2_CLASSES, OccupancyGrid, OccupancySpec
from voxelsplat.evaluation import cast_sample_rays, compute_occ3d_miou, compute_ray_metrics, lidar_ray_directions

FREE = OPENOCC_V2_CLASSES.index("free")
CAR, TRUCK, PEDESTRIAN, BARRIER, MANMADE, VEGETATION = 0, 1, 7, 9, 14, 15
NAMES = list(OPENOCC_V2_CLASSES)
# 22 x 20 x 8 voxels of 0.4 m: depths of a few metres, so the 1/2/4 m thresholds all matter
SMALL_GRID = OccupancyGrid((-4.0, -4.0, -1.0, 4.8, 4.0, 2.2), 0.4)
AXIS_RAYS = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])


def empty(grid=SMALL_GRID):
    return np.full(grid.shape, FREE, np.int64)


def random_scene(rng, grid=SMALL_GRID, num_blocks=10):
    """Ground of two classes, random blocks of random classes, free above."""
    X, Y, Z = grid.shape
    sem = empty(grid)
    sem[:, :, 0] = rng.choice([10, 12, 13], size=(X, Y))
    for _ in range(num_blocks):
        x0, y0, z0 = rng.integers(0, X - 2), rng.integers(0, Y - 2), rng.integers(1, Z - 1)
        w, d, h = rng.integers(1, 5, size=3)
        sem[x0:x0 + w, y0:y0 + d, z0:z0 + h] = rng.integers(0, FREE)
    flow = np.zeros(grid.shape + (2,), np.float32)
    moving = sem < 8
    flow[moving] = rng.normal(0, 2, size=(int(moving.sum()), 2))
    return sem, flow


def perturb(rng, sem, flow):
    """A plausible prediction: some voxels relabelled, a block shifted, some voxels freed, noisy flow."""
    pred = sem.copy()
    flip = rng.random(sem.shape) < 0.08
    pred[flip] = rng.integers(0, FREE + 1, size=int(flip.sum()))
    pred = np.roll(pred, shift=int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2)))
    pred_flow = flow + rng.normal(0, 0.5, size=flow.shape).astype(np.float32)
    return pred, pred_flow


def random_directions(rng, count):
    d = rng.normal(size=(count, 3))
    d[:, 2] = -np.abs(d[:, 2]) * rng.random(count)  # mostly downward-ish, like the LiDAR pattern
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def random_origins(rng, count, grid=SMALL_GRID):
    lo, hi = grid.range_min + 0.5, grid.range_max - 0.5
    origins = lo + (hi - lo) * rng.random((count, 3))
    origins[:, 2] = rng.uniform(0.0, 1.5, count)
    return origins


# ----------------------------------------------------------------------------- reference

def reference_walk(occupied, origin_vox, direction):
    """Voxels along one ray from the list of all its plane crossings, sorted by parameter
    (ties: z, then y, then x). Returns (voxel (x, y, z) or None, exit parameter in voxel
    units, hit). Origins must lie inside the grid."""
    shape = occupied.shape
    voxel = [int(math.floor(c)) for c in origin_vox]
    crossings = []
    for axis in range(3):
        d = direction[axis]
        if d > 0:
            planes = range(voxel[axis] + 1, shape[axis] + 1)
        elif d < 0:
            planes = range(voxel[axis], -1, -1)
        else:
            continue
        priority = 2 - axis  # z first on ties
        crossings += [((b - origin_vox[axis]) / d, priority, axis, 1 if d > 0 else -1) for b in planes]
    crossings.sort()
    last = None
    for t, _, axis, step in crossings:
        if occupied[tuple(voxel)]:
            return tuple(voxel), t, True
        last = (tuple(voxel), t)
        voxel[axis] += step
        if not 0 <= voxel[axis] < shape[axis]:
            return last[0], last[1], False
    raise AssertionError("a ray inside the grid must leave it")


def reference_metrics(preds, gts, origins_list, pred_flows, gt_flows, directions, grid=SMALL_GRID):
    """RayIoU / mAVE / mAVE_TP / OccScore on the exact geometry (``ray_precision="float64"``),
    written out ray by ray (percent for IoUs, as the library reports)."""
    C, thresholds = len(NAMES), (1.0, 2.0, 4.0)
    tp, gt_count, pred_count = np.zeros((3, C)), np.zeros(C), np.zeros(C)
    flow_sum, flow_n = np.zeros(C), np.zeros(C)
    all_sum, all_n = np.zeros(C), np.zeros(C)
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    for pred, gt, origins, pflow, gflow in zip(preds, gts, origins_list, pred_flows, gt_flows):
        sample_errors, sample_tp = [], set()
        for origin in origins:
            o = (np.asarray(origin, np.float64) - grid.range_min) / grid.voxel_size
            for d in unit:
                g_vox, g_t, g_hit = reference_walk(gt != FREE, o, d)
                if not g_hit:
                    continue
                p_vox, p_t, _ = reference_walk(pred != FREE, o, d)
                g_cls, p_cls = gt[g_vox], pred[p_vox]
                gt_count[g_cls] += 1
                pred_count[p_cls] += 1
                error_vox = abs(p_t - g_t)
                for j, t in enumerate(thresholds):
                    if g_cls == p_cls and error_vox < t / grid.voxel_size:
                        tp[j, g_cls] += 1
                flow_error = np.linalg.norm(pflow[p_vox].astype(np.float64) - gflow[g_vox])
                sample_errors.append(flow_error)
                if g_cls == p_cls and error_vox < 2.0 / grid.voxel_size:
                    flow_sum[g_cls] += flow_error
                    flow_n[g_cls] += 1
                    sample_tp.add(g_cls)
        for c in sample_tp:  # the challenge's mAVE: every ray of the sample, for each class found
            all_sum[c] += sum(sample_errors)
            all_n[c] += len(sample_errors)
    out = {}
    iou = np.full((3, C), np.nan)
    for j in range(3):
        for c in range(C):
            union = gt_count[c] + pred_count[c] - tp[j, c]
            if union > 0:
                iou[j, c] = tp[j, c] / union
    keep = [c for c in range(C) if c != FREE]
    out["RayIoU"] = 100 * np.nanmean(iou[:, keep])
    for j, t in enumerate(thresholds):
        out[f"RayIoU@{t:g}"] = 100 * np.nanmean(iou[j, keep])
    for c in keep:
        out[f"RayIoU/{NAMES[c]}"] = 100 * np.nanmean(iou[:, c]) if not np.isnan(iou[:, c]).all() else np.nan
    ave_tp = [flow_sum[c] / flow_n[c] if flow_n[c] else np.nan for c in range(8)]
    ave = [all_sum[c] / all_n[c] if all_n[c] else np.nan for c in range(8)]
    out["mAVE_TP"], out["mAVE"] = np.nanmean(ave_tp), np.nanmean(ave)
    for c in range(8):
        out[f"AVE_TP/{NAMES[c]}"], out[f"AVE/{NAMES[c]}"] = ave_tp[c], ave[c]
    out["OccScore"] = 0.9 * out["RayIoU"] + 10 * max(1 - out["mAVE"], 0)
    return out


def assert_same_numbers(got, expected):
    for key, value in expected.items():
        if np.isnan(value):
            assert math.isnan(got[key]), (key, got[key])
        else:
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


# ----------------------------------------------------------------------------- the challenge's pipeline

def official_lidar_rays():
    """The benchmark's 39 x 360 unit directions: float64 trigonometry, stored as float32."""
    pitches = [-(math.pi / 2 - math.atan(k)) for k in range(1, 11)]
    while pitches[-1] < 0.21:
        pitches.append(2 * pitches[-1] - pitches[-2])
    rows = []
    for pitch in pitches:
        for degrees in range(360):
            azimuth = np.deg2rad(degrees)
            rows.append((np.cos(pitch) * np.cos(azimuth), np.cos(pitch) * np.sin(azimuth), np.sin(pitch)))
    return np.array(rows, dtype=np.float32)


def official_walk(occupied, start, end):
    """The renderer's ray walk for one ray: ``start``/``end`` voxel-unit float32 values read
    as float64; direction = end - start, normalised; strict-< axis choice (z, then y, then
    x on ties); crossing times accumulated by addition. Returns (stop voxel, distance in
    voxel units at which the ray leaves it, hit)."""
    xo, yo, zo = (float(c) for c in start)
    rx, ry, rz = float(end[0]) - xo, float(end[1]) - yo, float(end[2]) - zo
    length = math.sqrt(rx * rx + ry * ry + rz * rz)
    d = (rx / length, ry / length, rz / length)
    voxel = [int(xo), int(yo), int(zo)]  # the origins lie inside the grid
    step = [1 if c >= 0 else -1 for c in d]
    t_max = [(voxel[a] + (1 if step[a] > 0 else 0) - (xo, yo, zo)[a]) / d[a] if d[a] != 0 else math.inf
             for a in range(3)]
    t_delta = [step[a] / d[a] if d[a] != 0 else math.inf for a in range(3)]
    shape = occupied.shape
    last = None
    while all(0 <= voxel[a] < shape[a] for a in range(3)):
        if t_max[0] < t_max[1]:
            axis = 0 if t_max[0] < t_max[2] else 2
        else:
            axis = 1 if t_max[1] < t_max[2] else 2
        leave = t_max[axis]
        here = tuple(voxel)
        if occupied[here]:
            return here, leave, True
        last = (here, leave)
        voxel[axis] += step[axis]
        t_max[axis] += t_delta[axis]
    return last[0], last[1], False


def official_render(semantics, flow, origins, lidar_rays, grid):
    """One volume's per-ray class, float32 depth (metres) and flow for every origin, as the
    challenge's submission script produces them (before its float16 storage)."""
    offset = np.asarray(grid.range_min, np.float32)
    scale = np.full(3, grid.voxel_size, np.float32)
    occupied = semantics != FREE
    cls, dist, ray_flow = [], [], []
    for origin in np.asarray(origins, np.float64).astype(np.float32):
        ends = lidar_rays + origin  # float32
        start = (origin - offset) / scale
        stops = (ends - offset) / scale
        assert start.dtype == stops.dtype == np.float32
        for end in stops:
            voxel, leave, _ = official_walk(occupied, start, end)
            cls.append(semantics[voxel])
            depth = np.float32(leave)  # the renderer writes float32, then multiplies by the voxel size
            dist.append(depth * np.float32(grid.voxel_size))
            ray_flow.append(flow[voxel])
    return np.array(cls), np.array(dist, np.float32), np.array(ray_flow, np.float32)


def official_calc_metrics(pred_rays, gt_rays):
    """The challenge's counting: per sample and threshold, rays with a free GT class dropped,
    TP = class match and float32 |depth error| < t; a flow class with a TP in the sample adds
    the flow errors of all the sample's remaining rays (threshold 2 m for mAVE)."""
    thresholds, C = [1, 2, 4], len(NAMES)
    gt_cnt, pred_cnt, tp_cnt = np.zeros(C), np.zeros(C), np.zeros((3, C))
    ave, ave_count = np.zeros((3, C)), np.zeros((3, C))
    ave[:, 8:] = np.nan  # no flow for the other classes
    for (p_cls, p_dist, p_flow), (g_cls, g_dist, g_flow) in zip(pred_rays, gt_rays):
        keep = g_cls != FREE
        p_cls, p_dist, p_flow = p_cls[keep], p_dist[keep], p_flow[keep]
        g_cls, g_dist, g_flow = g_cls[keep], g_dist[keep], g_flow[keep]
        close = np.abs(p_dist - g_dist)
        assert close.dtype == np.float32
        flow_error = np.linalg.norm(g_flow - p_flow, axis=1)
        for j, threshold in enumerate(thresholds):
            for c in range(C):
                tp = (p_cls == c) & (g_cls == c) & (close < threshold)
                if j == 0:
                    gt_cnt[c] += (g_cls == c).sum()
                    pred_cnt[c] += (p_cls == c).sum()
                tp_cnt[j, c] += tp.sum()
                if c < 8 and tp.sum() > 0:
                    ave[j, c] += flow_error.sum()
                    ave_count[j, c] += len(flow_error)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = [(tp_cnt[j] / (gt_cnt + pred_cnt - tp_cnt[j]))[:-1] for j in range(3)]
        ave_list = ave[1][:-1] / ave_count[1][:-1]
    out = {"RayIoU": 100 * np.nanmean(iou), "mAVE": np.nanmean(ave_list)}
    for j, t in enumerate(thresholds):
        out[f"RayIoU@{t}"] = 100 * np.nanmean(iou[j])
    for c in range(8):
        out[f"AVE/{NAMES[c]}"] = ave_list[c]
    out["OccScore"] = 0.9 * out["RayIoU"] + 10 * max(1 - out["mAVE"], 0)
    return out


def official_metrics(preds, gts, origins_list, pred_flows, gt_flows, lidar_rays, grid=SMALL_GRID):
    pred_rays = [official_render(p, f, o, lidar_rays, grid) for p, f, o in zip(preds, pred_flows, origins_list)]
    gt_rays = [official_render(g, f, o, lidar_rays, grid) for g, f, o in zip(gts, gt_flows, origins_list)]
    return official_calc_metrics(pred_rays, gt_rays)


def assert_close_numbers(got, expected, rel=1e-6):
    for key, value in expected.items():
        if np.isnan(value):
            assert math.isnan(got[key]), (key, got[key])
        else:
            assert got[key] == pytest.approx(value, rel=rel, abs=1e-9), key


def float32_unit_directions(rng, count):
    return random_directions(rng, count).astype(np.float32)


# ----------------------------------------------------------------------------- known answers

def test_identical_prediction_scores_perfectly_on_the_full_benchmark_rays():
    rng = np.random.default_rng(0)
    grid = OccupancyGrid()  # the benchmark grid and the real 39 x 360 ray pattern
    X, Y, Z = grid.shape
    sem = np.full(grid.shape, FREE, np.int64)
    sem[:, :, :2] = 10
    for _ in range(40):
        x0, y0 = rng.integers(0, X - 12, size=2)
        sem[x0:x0 + rng.integers(2, 12), y0:y0 + rng.integers(2, 12), 2:2 + rng.integers(2, 10)] = rng.integers(0, 16)
    flow = rng.normal(size=grid.shape + (2,)).astype(np.float32)
    origins = np.array([[0.0, 0.0, 1.84], [5.3, -2.1, 1.9]])
    result = compute_ray_metrics([sem], [sem.copy()], [origins], [flow], [flow.copy()])
    assert result["RayIoU"] == 100 and result["RayIoU@1"] == result["RayIoU@2"] == result["RayIoU@4"] == 100
    assert result["mAVE"] == 0 and result["OccScore"] == 100
    present = set(np.unique(sem).tolist()) - {FREE}
    for c in range(FREE):
        value = result[f"RayIoU/{NAMES[c]}"]
        assert (value == 100 or math.isnan(value)) if c in present else math.isnan(value), NAMES[c]
    assert result["RayIoU/driveable_surface"] == 100


def shifted_room(k):
    """A room of walls around the origin voxel; the prediction's walls moved k voxels
    outwards (k > 0) or inwards (k < 0) along the axis rays."""
    gt, pred = empty(), empty()
    X, Y, Z = SMALL_GRID.shape
    cx, cy = 4, 4  # origin voxel; walls at +-3 voxels in GT, far enough for shifts up to 11 outwards
    for sem, offset in ((gt, 0), (pred, k)):
        reach = 3 + offset
        sem[cx + reach, :, :] = MANMADE
        sem[:, cy + reach, :] = MANMADE
        if cx - reach >= 0:
            sem[cx - reach, :, :] = MANMADE
        if cy - reach >= 0:
            sem[:, cy - reach, :] = MANMADE
    origin = SMALL_GRID.index_to_center([cx, cy, 3])
    return gt, pred, origin


EXACT = dict(ray_precision="float64")  # exact geometry: an error of exactly t is never a TP


@pytest.mark.parametrize("k, true_at", [(1, (1, 2, 4)), (2, (1, 2, 4)), (3, (2, 4)), (5, (4,)), (6, (4,)),
                                        (9, (4,)), (10, ()), (11, ()), (-1, (1, 2, 4)), (-2, (1, 2, 4))])
def test_wall_shifted_by_k_voxels_changes_depth_by_0_4k_and_crosses_thresholds(k, true_at):
    gt, pred, origin = shifted_room(k)
    rays = cast_sample_rays(pred, origin[None], gt, num_classes=len(OPENOCC_V2_CLASSES), free_index=FREE, grid=SMALL_GRID,
                            ray_directions=torch.tensor(AXIS_RAYS), **EXACT)
    # the walls at -x/-y exist in the prediction only while they stay inside the grid
    inside = [True, 4 - (3 + k) >= 0, True, 4 - (3 + k) >= 0]
    for r in range(4):
        assert int(rays.gt_class[r]) == MANMADE
        if inside[r]:
            assert float(rays.pred_depth[r] - rays.gt_depth[r]) == pytest.approx(0.4 * k, abs=1e-12)
    if not all(inside):
        return
    result = compute_ray_metrics([pred], [gt], [origin[None]], grid=SMALL_GRID,
                                 ray_directions=torch.tensor(AXIS_RAYS), **EXACT)
    for t in (1, 2, 4):
        assert result[f"RayIoU@{t}"] == (100.0 if t in true_at else 0.0), (k, t)


def test_outward_shift_thresholds_on_the_positive_axes():
    # walls moved outwards on +x/+y only (the -x/-y walls leave the small grid): 2 of 4 rays shifted
    for k, true_at in ((2, (1, 2, 4)), (3, (2, 4)), (5, (4,)), (6, (4,)), (10, ()), (11, ())):
        gt, pred, origin = shifted_room(k)
        pred[:4, :, :] = gt[:4, :, :]  # keep the -x wall
        pred[:, :4, :] = np.where(gt[:, :4, :] == MANMADE, MANMADE, pred[:, :4, :])  # keep the -y wall
        result = compute_ray_metrics([pred], [gt], [origin[None]], grid=SMALL_GRID,
                                     ray_directions=torch.tensor(AXIS_RAYS), **EXACT)
        for t in (1, 2, 4):
            # 2 unshifted rays are always TP: IoU = TP / (4 + 4 - TP)
            expected = 100.0 if t in true_at else 100 * 2 / 6
            assert result[f"RayIoU@{t}"] == pytest.approx(expected), (k, t)


def test_float32_rounding_decides_a_true_positive_at_the_threshold():
    """A wall predicted 5 voxels (2.0 m) too far along +x: no TP at 2 m on the exact geometry,
    but the float32 depths the challenge compares differ by slightly less than 2 m."""
    gt, pred = empty(), empty()
    gt[3], pred[8] = MANMADE, MANMADE
    origin = np.array([[-3.78, 0.2, 0.4]])  # voxel x coordinate float32(0.22 / 0.4) = 0.55 (rounded)
    ray = torch.tensor([[1.0, 0.0, 0.0]])
    # by hand, as the challenge rounds: origin in voxel units in float32, the ray leaves the
    # GT wall at x = 4 and the predicted one at x = 9 voxels; float32 depths in metres
    f32 = np.float32
    start = (f32(-3.78) - f32(-4.0)) / f32(0.4)
    gt_depth, pred_depth = (f32(f32(float(exit_x) - float(start)) * f32(0.4)) for exit_x in (4, 9))
    assert abs(pred_depth - gt_depth) < f32(2.0) and abs((9 - 4) * 0.4 - 2.0) == 0
    rays = cast_sample_rays(pred, origin, gt, num_classes=len(OPENOCC_V2_CLASSES), free_index=FREE, grid=SMALL_GRID, ray_directions=ray)
    assert (rays.gt_depth.item(), rays.pred_depth.item()) == (gt_depth, pred_depth)
    official = compute_ray_metrics([pred], [gt], [origin], grid=SMALL_GRID, ray_directions=ray)
    exact = compute_ray_metrics([pred], [gt], [origin], grid=SMALL_GRID, ray_directions=ray, **EXACT)
    assert (official["RayIoU@1"], official["RayIoU@2"], official["RayIoU@4"]) == (0.0, 100.0, 100.0)
    assert (exact["RayIoU@1"], exact["RayIoU@2"], exact["RayIoU@4"]) == (0.0, 0.0, 100.0)


def test_class_never_predicted_has_iou_zero_and_absent_classes_are_ignored():
    gt, _, origin = shifted_room(0)
    gt[7, :, :] = CAR  # the +x wall is a car
    pred = gt.copy()
    pred[pred == CAR] = TRUCK  # never predicts car
    result = compute_ray_metrics([pred], [gt], [origin[None]], grid=SMALL_GRID,
                                 ray_directions=torch.tensor(AXIS_RAYS))
    assert result["RayIoU/car"] == 0 and result["RayIoU/truck"] == 0  # predicted truck where GT has none
    assert result["RayIoU/manmade"] == 100
    assert math.isnan(result["RayIoU/bus"])
    assert result["RayIoU"] == pytest.approx(100 / 3)


def flow_room():
    """Sample A of the flow tests: origin voxel (10, 10, 3), rays +x, -x, +y, -y.

    +x: car, a TP, flow error 5; -x: car predicted 6 voxels = 2.4 m too far (no TP at 2 m),
    flow error |(100, 0) - (1, -2)|; +y: pedestrian, a TP, flow error 1; -y: a car predicted
    where GT has a barrier (counted, no TP), flow error 50."""
    gt, pred = empty(), empty()
    gt[13], pred[13] = CAR, CAR
    gt[6], pred[0] = CAR, CAR
    gt[:, 13], pred[:, 13] = PEDESTRIAN, PEDESTRIAN
    gt[:, 6], pred[:, 6] = BARRIER, CAR
    gt_flow = np.zeros(SMALL_GRID.shape + (2,), np.float32)
    gt_flow[gt == CAR] = (1.0, -2.0)
    gt_flow[gt == PEDESTRIAN] = (0.5, 0.5)
    pred_flow = gt_flow.copy()
    pred_flow[13] += (3.0, 4.0)
    pred_flow[:, 13] += (0.6, 0.8)
    pred_flow[0] = (100.0, 0.0)
    pred_flow[:, 6] = (-50.0, 0.0)
    return gt, pred, gt_flow, pred_flow


def walled_car():
    """Sample B: a car TP on +x with flow error 2, manmade walls (no flow, no error) on the
    other three rays; the pedestrian class is absent."""
    gt = empty()
    gt[13] = CAR
    gt[6], gt[:, 13], gt[:, 6] = MANMADE, MANMADE, MANMADE
    gt_flow = np.zeros(SMALL_GRID.shape + (2,), np.float32)
    gt_flow[gt == CAR] = (3.0, 1.0)
    pred_flow = gt_flow.copy()
    pred_flow[13] += (0.0, 2.0)
    return gt, gt.copy(), gt_flow, pred_flow


@pytest.mark.parametrize("precision", ["official", "float64"])
def test_mave_counts_every_ray_of_a_sample_and_mave_tp_only_true_positives(precision):
    origin = SMALL_GRID.index_to_center([10, 10, 3])[None]
    directions = torch.tensor(AXIS_RAYS)
    kwargs = dict(grid=SMALL_GRID, ray_directions=directions, ray_precision=precision)
    gt, pred, gt_flow, pred_flow = flow_room()
    rays = cast_sample_rays(pred, origin, gt, pred_flow, gt_flow, num_classes=len(OPENOCC_V2_CLASSES), free_index=FREE, **kwargs)
    assert rays.gt_class.tolist() == [CAR, CAR, PEDESTRIAN, BARRIER]
    assert rays.pred_class.tolist() == [CAR, CAR, PEDESTRIAN, CAR]
    assert (rays.pred_depth - rays.gt_depth).tolist() == pytest.approx([0.0, 2.4, 0.0, 0.0], abs=1e-5)
    # the flow of a ray is the one stored where it stopped: the predicted hit, the GT hit
    assert rays.pred_flow.tolist() == [[4.0, 2.0], [100.0, 0.0], pytest.approx([1.1, 1.3]), [-50.0, 0.0]]
    assert rays.gt_flow.tolist() == [[1.0, -2.0], [1.0, -2.0], [0.5, 0.5], [0.0, 0.0]]

    errors_a = [5.0, math.hypot(99.0, 2.0), 1.0, 50.0]
    result = compute_ray_metrics([pred], [gt], [origin], [pred_flow], [gt_flow], **kwargs)
    # mAVE_TP: each class's own true positives at 2 m
    assert result["AVE_TP/car"] == pytest.approx(5.0)
    assert result["AVE_TP/pedestrian"] == pytest.approx(1.0)
    assert math.isnan(result["AVE_TP/bus"])
    assert result["mAVE_TP"] == pytest.approx(3.0)
    # mAVE: car and pedestrian are found in the sample, so each gets the error of all four rays
    assert result["AVE/car"] == result["AVE/pedestrian"] == pytest.approx(sum(errors_a) / 4)
    assert math.isnan(result["AVE/bus"])
    assert result["mAVE"] == pytest.approx(sum(errors_a) / 4)
    assert result["OccScore"] == pytest.approx(0.9 * result["RayIoU"] + 10 * max(1 - result["mAVE"], 0))
    # car: 2 GT rays, 3 predicted, 1 TP within 1 and 2 m, 2 within 4 m
    assert result["RayIoU/car"] == pytest.approx(100 * (1 / 4 + 1 / 4 + 2 / 3) / 3)

    # with sample B (a car TP, no pedestrian), the car sums both samples' rays, the pedestrian only A's
    b = walled_car()
    both = compute_ray_metrics([pred, b[1]], [gt, b[0]], [origin, origin], [pred_flow, b[3]], [gt_flow, b[2]],
                               **kwargs)
    errors_b = [2.0, 0.0, 0.0, 0.0]
    assert both["AVE/car"] == pytest.approx((sum(errors_a) + sum(errors_b)) / 8)
    assert both["AVE/pedestrian"] == pytest.approx(sum(errors_a) / 4)
    assert both["mAVE"] == pytest.approx(((sum(errors_a) + sum(errors_b)) / 8 + sum(errors_a) / 4) / 2)
    assert both["AVE_TP/car"] == pytest.approx((5.0 + 2.0) / 2) and both["AVE_TP/pedestrian"] == pytest.approx(1.0)
    assert both["mAVE_TP"] == pytest.approx((3.5 + 1.0) / 2)
    assert both["OccScore"] == pytest.approx(0.9 * both["RayIoU"])  # mAVE > 1: the flow term is 0


def test_occscore_combines_rayiou_and_clipped_mave():
    rng = np.random.default_rng(3)
    directions = torch.tensor(random_directions(rng, 150))
    for noise in (0.05, 3.0):  # mAVE below 1 and above 1 (clipped to 0)
        gt, gt_flow = random_scene(rng, num_blocks=25)
        pred, _ = perturb(rng, gt, gt_flow)
        gt_flow[:] = (1.0, -1.0)  # one velocity everywhere: every ray's flow error is the prediction's noise
        pred_flow = np.float32((1.0, -1.0)) + rng.normal(0, noise, size=gt_flow.shape).astype(np.float32)
        result = compute_ray_metrics([pred], [gt], [random_origins(rng, 2)], [pred_flow], [gt_flow],
                                     grid=SMALL_GRID, ray_directions=directions)
        assert result["OccScore"] == pytest.approx(0.9 * result["RayIoU"] + 10 * max(1 - result["mAVE"], 0.0))
        # over all rays: of the order of the mean length of 2D Gaussian noise, noise * sqrt(pi / 2)
        # (rays share voxels, so few independent draws)
        assert 0.5 < result["mAVE"] / (noise * math.sqrt(math.pi / 2)) < 2
        assert (result["mAVE"] < 1) == (result["mAVE_TP"] < 1) == (noise < 1) and result["OccScore"] > 0


# ----------------------------------------------------------------------------- reference comparison

def random_samples(rng, count, grid=SMALL_GRID, num_blocks=10):
    preds, gts, origins, pred_flows, gt_flows = [], [], [], [], []
    for _ in range(count):
        gt, gt_flow = random_scene(rng, grid, num_blocks)
        pred, pred_flow = perturb(rng, gt, gt_flow)
        preds.append(pred), gts.append(gt), pred_flows.append(pred_flow), gt_flows.append(gt_flow)
        origins.append(random_origins(rng, int(rng.integers(1, 4)), grid))
    return preds, gts, origins, pred_flows, gt_flows


def test_official_metrics_match_the_challenge_pipeline_on_random_scenes():
    rng = np.random.default_rng(17)
    for _ in range(3):
        directions = float32_unit_directions(rng, 50)
        preds, gts, origins, pred_flows, gt_flows = random_samples(rng, 3, num_blocks=14)
        got = compute_ray_metrics([torch.from_numpy(p) for p in preds], gts, origins, pred_flows, gt_flows,
                                  grid=SMALL_GRID, ray_directions=torch.from_numpy(directions))
        expected = official_metrics(preds, gts, origins, pred_flows, gt_flows, directions)
        assert 0 < got["RayIoU"] < 100 and 0 < got["mAVE"] and got["mAVE"] != got["mAVE_TP"]
        assert_close_numbers(got, expected)


def street_sample(rng, grid):
    """A street-like scene on the benchmark grid and a prediction of it, with origins near the centre."""
    spec = OccupancySpec.for_label_set("openocc_v2", grid)
    X, Y, Z = grid.shape
    sem = np.full(grid.shape, spec.free_index, np.int64)
    ground = [spec.class_names.index(n) for n in ("driveable_surface", "sidewalk", "terrain")]
    sem[:, :, :2] = rng.choice(ground, size=(X, Y))[:, :, None]
    for _ in range(60):  # blocks of any occupied class in the central 40 % of the grid
        x0, y0 = rng.integers(int(0.3 * X), int(0.7 * X), size=2)
        sem[x0:x0 + rng.integers(2, 10), y0:y0 + rng.integers(2, 10), 2:2 + rng.integers(2, 8)] = \
            rng.integers(0, spec.num_classes - 1)  # free is the last OpenOcc v2 label
    flow = np.zeros(grid.shape + (2,), np.float32)
    moving = np.isin(sem, spec.flow_classes)
    flow[moving] = rng.normal(0, 2, size=(int(moving.sum()), 2))
    pred = np.roll(sem, int(rng.integers(-2, 3)), axis=0)
    relabel = rng.random(sem.shape) < 0.04
    pred[relabel] = rng.integers(0, spec.num_classes, size=int(relabel.sum()))
    pred_flow = flow + rng.normal(0, 0.5, size=flow.shape).astype(np.float32)
    origins = np.stack([rng.uniform(-8, 8, 2), rng.uniform(-8, 8, 2), rng.uniform(1.5, 2.0, 2)], 1)
    return pred, sem, origins, pred_flow, flow


def test_official_metrics_match_the_challenge_pipeline_on_the_benchmark_grid():
    grid = DEFAULT_GRID
    lidar_rays = official_lidar_rays()
    assert np.array_equal(lidar_ray_directions().numpy(), lidar_rays)  # the pattern, bit for bit
    rays = lidar_rays[::5]  # every fifth ray keeps the pure-Python walk quick
    rng = np.random.default_rng(81)  # a seed where the float32 rounding changes RayIoU in the 4th digit
    samples = [street_sample(rng, grid) for _ in range(2)]
    preds, gts, origins, pred_flows, gt_flows = (list(column) for column in zip(*samples))
    got = compute_ray_metrics(preds, gts, origins, pred_flows, gt_flows, ray_directions=torch.from_numpy(rays))
    expected = official_metrics(preds, gts, origins, pred_flows, gt_flows, rays, grid)
    assert 10 < got["RayIoU"] < 90 and 0 < got["mAVE"]
    assert_close_numbers(got, expected)
    # the exact geometry does not give the challenge's numbers (29.041 instead of 29.054)
    exact = compute_ray_metrics(preds, gts, origins, pred_flows, gt_flows, ray_directions=torch.from_numpy(rays),
                                **EXACT)
    assert abs(exact["RayIoU"] - expected["RayIoU"]) > 1e-4 * expected["RayIoU"]
    assert exact["mAVE"] != pytest.approx(expected["mAVE"], rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_official_metrics_on_cuda_equal_the_cpu_ones():
    rng = np.random.default_rng(31)
    preds, gts, origins, pred_flows, gt_flows = random_samples(rng, 2, num_blocks=14)
    directions = torch.from_numpy(float32_unit_directions(rng, 80))
    cpu = compute_ray_metrics(preds, gts, origins, pred_flows, gt_flows, grid=SMALL_GRID, ray_directions=directions)
    gpu = compute_ray_metrics([torch.from_numpy(p).cuda() for p in preds], gts, origins, pred_flows, gt_flows,
                              grid=SMALL_GRID, ray_directions=directions)
    assert_close_numbers(gpu, cpu, rel=1e-12)


def test_exact_geometry_metrics_match_a_slow_per_ray_reference_on_random_scenes():
    rng = np.random.default_rng(7)
    directions = random_directions(rng, 60)
    preds, gts, origins, pred_flows, gt_flows = random_samples(rng, 3)
    got = compute_ray_metrics([torch.from_numpy(p) for p in preds], gts, origins, pred_flows, gt_flows,
                              grid=SMALL_GRID, ray_directions=torch.tensor(directions), **EXACT)
    expected = reference_metrics(preds, gts, origins, pred_flows, gt_flows, directions)
    assert 0 < got["RayIoU"] < 100 and 0 < got["mAVE"] and 0 < got["mAVE_TP"]
    assert_same_numbers(got, expected)
    # RayIoU alone (no flows) gives the same IoUs and no flow numbers
    no_flow = compute_ray_metrics(preds, gts, origins, grid=SMALL_GRID, ray_directions=torch.tensor(directions),
                                  **EXACT)
    assert no_flow["RayIoU"] == got["RayIoU"] and "mAVE" not in no_flow and "OccScore" not in no_flow
    assert "mAVE_TP" not in no_flow


def test_occ3d_miou_matches_a_confusion_matrix_reference():
    rng = np.random.default_rng(11)
    preds, gts, masks = [], [], []
    for _ in range(3):
        gt, _ = random_scene(rng)
        pred, _ = perturb(rng, gt, np.zeros(gt.shape + (2,), np.float32))
        preds.append(pred), gts.append(gt), masks.append(rng.random(gt.shape) < 0.6)
    got = compute_occ3d_miou(preds, gts, masks, grid=SMALL_GRID)
    confusion = np.zeros((17, 17), np.int64)
    for pred, gt, mask in zip(preds, gts, masks):
        for g, p in zip(gt[mask], pred[mask]):
            confusion[g, p] += 1
    ious = []
    for c in range(16):  # free excluded from the mean, counted in the matrix
        union = confusion[c, :].sum() + confusion[:, c].sum() - confusion[c, c]
        iou = confusion[c, c] / union if union else np.nan
        ious.append(iou)
        assert (math.isnan(got[f"IoU/{NAMES[c]}"]) if union == 0
                else got[f"IoU/{NAMES[c]}"] == pytest.approx(100 * iou)), NAMES[c]
    assert got["mIoU"] == pytest.approx(100 * np.nanmean(ious))
    assert "IoU/free" not in got
    # the mask matters: all voxels give another answer
    assert compute_occ3d_miou(preds, gts, [None] * 3, grid=SMALL_GRID)["mIoU"] != pytest.approx(got["mIoU"])


# ----------------------------------------------------------------------------- bad input

def test_bad_input_names_what_and_the_sample():
    rng = np.random.default_rng(5)
    gt, flow = random_scene(rng)
    origins = random_origins(rng, 2)
    d = torch.tensor(random_directions(rng, 10))
    kwargs = dict(grid=SMALL_GRID, ray_directions=d)
    with pytest.raises(ValueError, match=r"sample #1: prediction has shape \(22, 20\)"):
        compute_ray_metrics([gt, gt[:, :, 0]], [gt, gt], [origins] * 2, **kwargs)
    bad = gt.copy()
    bad[3, 4, 5] = 17
    with pytest.raises(ValueError, match=r"sample #0: ground truth holds class indices in \[0, 17\]"):
        compute_ray_metrics([gt], [bad], [origins], **kwargs)
    bad[3, 4, 5] = -1
    with pytest.raises(ValueError, match=r"sample #0: prediction holds class indices in \[-1"):
        compute_ray_metrics([bad], [gt], [origins], **kwargs)
    with pytest.raises(ValueError, match="sample #0: prediction must hold integer class indices"):
        compute_ray_metrics([gt.astype(np.float32)], [gt], [origins], **kwargs)
    nan_flow = flow.copy()
    nan_flow[2, 3, 4, 1] = np.nan
    with pytest.raises(ValueError, match=r"sample #0: predicted flow has 1 voxels with non-finite .*\[2, 3, 4\]"):
        compute_ray_metrics([gt], [gt], [origins], [nan_flow], [flow], **kwargs)
    with pytest.raises(ValueError, match="sample #0: ground-truth flow has shape"):
        compute_ray_metrics([gt], [gt], [origins], [flow], [flow[..., :1]], **kwargs)
    with pytest.raises(ValueError, match=r"sample #0: lidar_origins has shape \(2, 2\)"):
        compute_ray_metrics([gt], [gt], [origins[:, :2]], **kwargs)
    with pytest.raises(ValueError, match="sample #0: lidar_origins holds non-finite"):
        compute_ray_metrics([gt], [gt], [np.full((1, 3), np.inf)], **kwargs)
    with pytest.raises(ValueError, match="2 predictions, 1 ground truths"):
        compute_ray_metrics([gt, gt], [gt], [origins], **kwargs)
    with pytest.raises(ValueError, match="both pred_flows and gt_flows"):
        compute_ray_metrics([gt], [gt], [origins], [flow], None, **kwargs)
    with pytest.raises(ValueError, match=r"sample #0: mask_camera has shape \(10,\)"):
        compute_occ3d_miou([gt], [gt], [np.ones(10, bool)], grid=SMALL_GRID)


def test_every_array_must_have_the_grid_shape_exactly():
    """A transposed volume (Z, X, Y) holds as many voxels as the grid, and used to be accepted
    (reshaped) with a wrong RayIoU / mAVE: now it is an error giving both shapes."""
    rng = np.random.default_rng(3)
    x, y, z = SMALL_GRID.shape
    gt = rng.integers(0, len(OPENOCC_V2_CLASSES), (x, y, z))
    flow = rng.normal(size=(x, y, z, 2)).astype(np.float32)
    origin = [np.zeros((1, 3))]
    common = dict(grid=SMALL_GRID, ray_directions=torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    compute_ray_metrics([gt], [gt], origin, [flow], [flow], **common)  # the right shapes work
    transposed = np.ascontiguousarray(gt.transpose(2, 0, 1))
    with pytest.raises(ValueError, match=rf"prediction has shape \({z}, {x}, {y}\), expected .*\({x}, {y}, {z}\)"):
        compute_ray_metrics([transposed], [gt], origin, **common)
    with pytest.raises(ValueError, match=r"ground truth has shape"):
        compute_ray_metrics([gt], [gt.reshape(-1)], origin, **common)
    with pytest.raises(ValueError, match=rf"predicted flow has shape \({z}, {x}, {y}, 2\)"):
        compute_ray_metrics([gt], [gt], origin, [np.ascontiguousarray(flow.transpose(2, 0, 1, 3))], [flow], **common)
    with pytest.raises(ValueError, match=r"ground-truth flow has shape .*expected the grid's \(X, Y, Z, 2\)"):
        compute_ray_metrics([gt], [gt], origin, [flow], [flow[..., :1].repeat(2, -1).reshape(x, y, z * 2, 1)],
                            **common)
    with pytest.raises(ValueError, match=r"mask_camera has shape"):
        compute_occ3d_miou([gt], [gt], [np.ones((z, x, y), bool)],
                           spec=OccupancySpec.for_label_set("openocc_v2", SMALL_GRID))
    mask = rng.random((x, y, z)) < 0.5
    miou = compute_occ3d_miou([gt], [gt], [mask], spec=OccupancySpec.for_label_set("openocc_v2", SMALL_GRID))
    assert miou["mIoU"] == pytest.approx(100.0)
