"""RayIoU / mAVE / OccScore and Occ3D mIoU: known answers and an independent slow reference."""
import math

import numpy as np
import pytest
import torch

from voxelsplat.data.occupancy_meta import OPENOCC_V2_CLASSES, OccupancyGrid
from voxelsplat.evaluation import cast_sample_rays, compute_occ3d_miou, compute_ray_metrics

FREE = 16
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
    """RayIoU / mAVE / OccScore written out ray by ray (percent for IoUs, as the library reports)."""
    C, thresholds = len(NAMES), (1.0, 2.0, 4.0)
    tp, gt_count, pred_count = np.zeros((3, C)), np.zeros(C), np.zeros(C)
    flow_sum, flow_n = np.zeros(C), np.zeros(C)
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    for pred, gt, origins, pflow, gflow in zip(preds, gts, origins_list, pred_flows, gt_flows):
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
                if g_cls == p_cls and error_vox < 2.0 / grid.voxel_size:
                    flow_sum[g_cls] += np.linalg.norm(pflow[p_vox].astype(np.float64) - gflow[g_vox])
                    flow_n[g_cls] += 1
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
    ave = [flow_sum[c] / flow_n[c] if flow_n[c] else np.nan for c in range(8)]
    out["mAVE"] = np.nanmean(ave)
    out["OccScore"] = 0.9 * out["RayIoU"] + 10 * max(1 - out["mAVE"], 0)
    return out


def assert_same_numbers(got, expected):
    for key, value in expected.items():
        if np.isnan(value):
            assert math.isnan(got[key]), (key, got[key])
        else:
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key


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


@pytest.mark.parametrize("k, true_at", [(1, (1, 2, 4)), (2, (1, 2, 4)), (3, (2, 4)), (5, (4,)), (6, (4,)),
                                        (9, (4,)), (10, ()), (11, ()), (-1, (1, 2, 4)), (-2, (1, 2, 4))])
def test_wall_shifted_by_k_voxels_changes_depth_by_0_4k_and_crosses_thresholds(k, true_at):
    gt, pred, origin = shifted_room(k)
    rays = cast_sample_rays(pred, origin[None], gt, num_classes=17, free_index=FREE, grid=SMALL_GRID,
                            ray_directions=torch.tensor(AXIS_RAYS))
    # the walls at -x/-y exist in the prediction only while they stay inside the grid
    inside = [True, 4 - (3 + k) >= 0, True, 4 - (3 + k) >= 0]
    for r in range(4):
        assert int(rays.gt_class[r]) == MANMADE
        if inside[r]:
            assert float(rays.pred_depth[r] - rays.gt_depth[r]) == pytest.approx(0.4 * k, abs=1e-12)
    if not all(inside):
        return
    result = compute_ray_metrics([pred], [gt], [origin[None]], grid=SMALL_GRID,
                                 ray_directions=torch.tensor(AXIS_RAYS))
    for t in (1, 2, 4):
        assert result[f"RayIoU@{t}"] == (100.0 if t in true_at else 0.0), (k, t)


def test_outward_shift_thresholds_on_the_positive_axes():
    # walls moved outwards on +x/+y only (the -x/-y walls leave the small grid): 2 of 4 rays shifted
    for k, true_at in ((2, (1, 2, 4)), (3, (2, 4)), (5, (4,)), (6, (4,)), (10, ()), (11, ())):
        gt, pred, origin = shifted_room(k)
        pred[:4, :, :] = gt[:4, :, :]  # keep the -x wall
        pred[:, :4, :] = np.where(gt[:, :4, :] == MANMADE, MANMADE, pred[:, :4, :])  # keep the -y wall
        result = compute_ray_metrics([pred], [gt], [origin[None]], grid=SMALL_GRID,
                                     ray_directions=torch.tensor(AXIS_RAYS))
        for t in (1, 2, 4):
            # 2 unshifted rays are always TP: IoU = TP / (4 + 4 - TP)
            expected = 100.0 if t in true_at else 100 * 2 / 6
            assert result[f"RayIoU@{t}"] == pytest.approx(expected), (k, t)


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


def test_flow_error_averages_over_true_positive_rays_only():
    # origin voxel (10, 10, 3); rays +x, -x, +y, -y
    gt, pred = empty(), empty()
    gt[13], pred[13] = CAR, CAR  # +x: car, a true positive
    gt[6], pred[1] = CAR, CAR  # -x: car, predicted 5 voxels = 2 m too far: no true positive at 2 m
    gt[:, 13], pred[:, 13] = PEDESTRIAN, PEDESTRIAN  # +y: pedestrian, a true positive
    gt[:, 6], pred[:, 6] = BARRIER, CAR  # -y: a car predicted where GT is a barrier
    gt_flow = np.zeros(SMALL_GRID.shape + (2,), np.float32)
    gt_flow[gt == CAR] = (1.0, -2.0)
    gt_flow[gt == PEDESTRIAN] = (0.5, 0.5)
    pred_flow = gt_flow.copy()
    pred_flow[13] += (3.0, 4.0)  # the car true positive: error 5
    pred_flow[:, 13] += (0.6, 0.8)  # the pedestrian true positive: error 1
    pred_flow[1] = (100.0, 0.0)  # the car ray that is no true positive: a huge error that must not count
    pred_flow[:, 6] = (-50.0, 0.0)
    origin = SMALL_GRID.index_to_center([10, 10, 3])[None]
    directions = torch.tensor(AXIS_RAYS)
    rays = cast_sample_rays(pred, origin, gt, pred_flow, gt_flow, num_classes=17, free_index=FREE,
                            grid=SMALL_GRID, ray_directions=directions)
    assert rays.gt_class.tolist() == [CAR, CAR, PEDESTRIAN, BARRIER]
    assert rays.pred_class.tolist() == [CAR, CAR, PEDESTRIAN, CAR]
    assert (rays.pred_depth - rays.gt_depth).tolist() == pytest.approx([0.0, 2.0, 0.0, 0.0], abs=1e-12)
    result = compute_ray_metrics([pred], [gt], [origin], [pred_flow], [gt_flow], grid=SMALL_GRID,
                                 ray_directions=directions)
    assert result["AVE/car"] == pytest.approx(5.0)
    assert result["AVE/pedestrian"] == pytest.approx(1.0)
    assert math.isnan(result["AVE/bus"])
    assert result["mAVE"] == pytest.approx(3.0)
    # averaging over every car ray instead (the released script's defect) gives another answer
    all_car_rays = (5.0 + np.hypot(100.0 - 1.0, 0.0 + 2.0)) / 2
    assert abs(all_car_rays - result["AVE/car"]) > 40
    # car: 2 GT rays, 3 predicted, 1 TP within 1 and 2 m, 2 within 4 m
    assert result["RayIoU/car"] == pytest.approx(100 * (1 / 4 + 1 / 4 + 2 / 3) / 3)
    assert result["OccScore"] == pytest.approx(0.9 * result["RayIoU"] + 10 * max(1 - 3.0, 0))


def test_occscore_combines_rayiou_and_clipped_mave():
    rng = np.random.default_rng(3)
    directions = torch.tensor(random_directions(rng, 150))
    for noise in (0.05, 3.0):  # mAVE below 1 and above 1 (clipped to 0)
        gt, gt_flow = random_scene(rng, num_blocks=25)
        pred, _ = perturb(rng, gt, gt_flow)
        gt_flow[:] = 0
        gt_flow[gt < 8] = (1.0, -1.0)  # one velocity: a true positive's error is the prediction's noise
        pred_flow = np.float32((1.0, -1.0)) + rng.normal(0, noise, size=gt_flow.shape).astype(np.float32)
        result = compute_ray_metrics([pred], [gt], [random_origins(rng, 2)], [pred_flow], [gt_flow],
                                     grid=SMALL_GRID, ray_directions=directions)
        assert result["OccScore"] == pytest.approx(0.9 * result["RayIoU"] + 10 * max(1 - result["mAVE"], 0.0))
        assert (result["mAVE"] < 1) == (noise < 1) and result["OccScore"] > 0


# ----------------------------------------------------------------------------- reference comparison

def test_metrics_match_a_slow_per_ray_reference_on_random_scenes():
    rng = np.random.default_rng(7)
    directions = random_directions(rng, 60)
    preds, gts, origins, pred_flows, gt_flows = [], [], [], [], []
    for _ in range(3):
        gt, gt_flow = random_scene(rng)
        pred, pred_flow = perturb(rng, gt, gt_flow)
        preds.append(pred), gts.append(gt), pred_flows.append(pred_flow), gt_flows.append(gt_flow)
        origins.append(random_origins(rng, int(rng.integers(1, 4))))
    got = compute_ray_metrics([torch.from_numpy(p) for p in preds], gts, origins, pred_flows, gt_flows,
                              grid=SMALL_GRID, ray_directions=torch.tensor(directions))
    expected = reference_metrics(preds, gts, origins, pred_flows, gt_flows, directions)
    assert 0 < got["RayIoU"] < 100 and 0 < got["mAVE"]
    assert_same_numbers(got, expected)
    # RayIoU alone (no flows) gives the same IoUs and no flow numbers
    no_flow = compute_ray_metrics(preds, gts, origins, grid=SMALL_GRID, ray_directions=torch.tensor(directions))
    assert no_flow["RayIoU"] == got["RayIoU"] and "mAVE" not in no_flow and "OccScore" not in no_flow


def test_occ3d_miou_matches_a_confusion_matrix_reference():
    rng = np.random.default_rng(11)
    preds, gts, masks = [], [], []
    for _ in range(3):
        gt, _ = random_scene(rng)
        pred, _ = perturb(rng, gt, np.zeros(gt.shape + (2,), np.float32))
        preds.append(pred), gts.append(gt), masks.append(rng.random(gt.shape) < 0.6)
    got = compute_occ3d_miou(preds, gts, masks)
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
    assert compute_occ3d_miou(preds, gts, [None] * 3)["mIoU"] != pytest.approx(got["mIoU"])


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
    with pytest.raises(ValueError, match="sample #0: .*mask_camera has 10 voxels"):
        compute_occ3d_miou([gt], [gt], [np.ones(10, bool)])
