"""Occupancy/flow losses against direct formula implementations (float64, random inputs)."""
import math

import numpy as np
import pytest
import torch

from voxelsplat.structures import OccupancyGrid, OccupancySpec


def _spec(num_classes, free_index, flow_classes, grid):
    """A made-up label set of ``num_classes`` labels on ``grid``."""
    names = [f"class_{i}" for i in range(num_classes)]
    names[free_index] = "free"
    return OccupancySpec("test", names, free_index, flow_classes, grid=grid)
from voxelsplat.modeling.heads.losses import (
    OccupancyFlowLoss, class_weights_from_frequencies, flow_l1_loss, geo_scal_loss, lovasz_softmax, sem_scal_loss,
    sigmoid_focal_loss,
)


def _random_problem(seed, voxels=300, classes=6):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(voxels, classes))
    target = rng.integers(0, classes, voxels)
    target[rng.random(voxels) < 0.5] = classes - 1  # a dominant "free" class, like real scenes
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return rng, logits, target, probs


def _lovasz_reference(probs, target):
    """Lovasz extension of the Jaccard loss from its definition, with explicit sets."""
    losses = []
    for c in np.unique(target):
        foreground = set(np.flatnonzero(target == c).tolist())
        errors = np.abs((target == c).astype(float) - probs[:, c])
        order = np.argsort(-errors, kind="stable")

        def jaccard_loss(mispredicted):
            kept = len(foreground - mispredicted)
            union = len(foreground | mispredicted)
            return 1.0 - kept / union

        previous, total, prefix = jaccard_loss(set()), 0.0, set()
        for index in order:
            prefix.add(int(index))
            current = jaccard_loss(prefix)
            total += errors[index] * (current - previous)
            previous = current
        losses.append(total)
    return float(np.mean(losses))


def test_lovasz_softmax_matches_definition():
    _, _, target, probs = _random_problem(0)
    exact = lovasz_softmax(torch.from_numpy(probs), torch.from_numpy(target), num_buckets=None)
    assert exact.item() == pytest.approx(_lovasz_reference(probs, target), rel=1e-10)


def test_bucketed_lovasz_is_within_its_bound():
    _, _, target, probs = _random_problem(1, voxels=2000, classes=8)
    reference = _lovasz_reference(probs, target)
    for buckets in (64, 16384):
        value = lovasz_softmax(torch.from_numpy(probs), torch.from_numpy(target), num_buckets=buckets).item()
        assert abs(value - reference) <= 1.0 / buckets
    # Its gradient is the exact gradient of the bucketed value: compare with a torch
    # re-implementation of that value through autograd.
    probs_t = torch.from_numpy(probs).requires_grad_()
    lovasz_softmax(probs_t, torch.from_numpy(target), num_buckets=64).backward()
    probs_r = torch.from_numpy(probs).requires_grad_()
    per_class = []
    for c in np.unique(target):
        fg = torch.from_numpy((target == c).astype(float))
        errors = (fg - probs_r[:, c]).abs()
        level = ((1 - errors.detach()) * 64).long().clamp(0, 63)
        value, cumulative_fg, cumulative_all, previous = 0.0, 0.0, 0.0, 0.0
        for k in range(64):
            members = level == k
            if not members.any():
                continue
            cumulative_fg += float(fg[members].sum())
            cumulative_all += float(members.sum())
            total = float(fg.sum())
            jaccard = 1 - (total - cumulative_fg) / (total + cumulative_all - cumulative_fg)
            value = value + errors[members].mean() * (jaccard - previous)
            previous = jaccard
        per_class.append(value)
    torch.stack(per_class).mean().backward()
    torch.testing.assert_close(probs_t.grad, probs_r.grad, rtol=1e-9, atol=1e-12)


def _neg_log(x, eps=1e-5):
    return -math.log(min(max(x, eps), 1 - eps))


def test_scene_class_affinity_losses_match_formulas():
    _, _, target, probs = _random_problem(2)
    free = probs.shape[1] - 1
    target[:3] = 0  # make sure class 0 is present
    target[target == 2] = free  # and class 2 absent (skipped)
    total, count = 0.0, 0
    for c in range(probs.shape[1]):
        if c == free or not np.any(target == c):
            continue
        p, t = probs[:, c], (target == c).astype(float)
        precision = (p * t).sum() / (p.sum() + 1e-5)
        recall = (p * t).sum() / (t.sum() + 1e-5)
        specificity = ((1 - p) * (1 - t)).sum() / ((1 - t).sum() + 1e-5)
        total += _neg_log(precision) + _neg_log(recall) + _neg_log(specificity)
        count += 1
    sem = sem_scal_loss(torch.from_numpy(probs), torch.from_numpy(target), free)
    assert sem.item() == pytest.approx(total / count, rel=1e-9)

    occupied_prob, occupied = 1 - probs[:, free], (target != free).astype(float)
    precision = (occupied_prob * occupied).sum() / (occupied_prob.sum() + 1e-5)
    recall = (occupied_prob * occupied).sum() / (occupied.sum() + 1e-5)
    specificity = ((1 - occupied) * probs[:, free]).sum() / ((1 - occupied).sum() + 1e-5)
    geo = geo_scal_loss(torch.from_numpy(probs), torch.from_numpy(target), free)
    assert geo.item() == pytest.approx(_neg_log(precision) + _neg_log(recall) + _neg_log(specificity), rel=1e-9)


def test_sigmoid_focal_loss_matches_formula_and_passes_gradcheck():
    rng, logits, target, _ = _random_problem(3, voxels=40, classes=5)
    class_weights = torch.from_numpy(rng.uniform(0.5, 2.0, 5))
    voxel_weights = torch.from_numpy(rng.uniform(1.0, 2.0, 40))
    x = torch.from_numpy(logits).requires_grad_()
    t = torch.from_numpy(target)
    value = sigmoid_focal_loss(x, t, class_weights, voxel_weights, gamma=2.0, alpha=0.25, chunk_voxels=7)
    expected = 0.0
    for v in range(40):
        for k in range(5):
            p = 1 / (1 + math.exp(-logits[v, k]))
            positive = target[v] == k
            p_true = p if positive else 1 - p
            alpha = 0.25 if positive else 0.75
            expected += -alpha * (1 - p_true) ** 2 * math.log(p_true) * class_weights[k].item() * voxel_weights[v].item()
    assert value.item() == pytest.approx(expected / 40, rel=1e-10)
    for chunk in (7, None):
        assert torch.autograd.gradcheck(
            lambda z: sigmoid_focal_loss(z, t, class_weights, voxel_weights, 1.5, 0.3, chunk_voxels=chunk), (x,))


def test_flow_loss_weights_by_speed_and_ignores_other_classes():
    rng = np.random.default_rng(4)
    pred, gt = rng.normal(size=(50, 2)), rng.normal(scale=3.0, size=(50, 2))
    mask = rng.random(50) < 0.4
    gt[0] = np.nan
    mask[0] = True  # a non-finite target is left out
    keep = mask & np.isfinite(gt).all(1)
    weights = np.linalg.norm(gt[keep], axis=1) + 0.1
    weighted_error = (weights * np.abs(pred[keep] - gt[keep]).sum(1)).sum()
    per_voxel = flow_l1_loss(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(mask), "voxel_count")
    assert per_voxel.item() == pytest.approx(weighted_error / keep.sum(), rel=1e-10)
    released = flow_l1_loss(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(mask))
    assert released.item() == pytest.approx(weighted_error / weights.sum(), rel=1e-10)


def test_flow_loss_released_normalisation_by_hand():
    """Three voxels: a moving car (gt (3, 4), |gt| = 5), a static voxel (gt 0) and a free
    voxel (gt 0). Released: 0.5 x sum_v (|g|+0.1)|d|_1 / sum_v (|g|+0.1) over ALL voxels."""
    pred = torch.tensor([[2.0, 4.5], [0.3, -0.2], [0.0, 1.0]])
    gt = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]])
    # errors |d|_1: 1.5, 0.5, 1.0; weights 5.1, 0.1, 0.1
    expected_all = (5.1 * 1.5 + 0.1 * 0.5 + 0.1 * 1.0) / (5.1 + 0.1 + 0.1)
    assert flow_l1_loss(pred, gt).item() == pytest.approx(expected_all, rel=1e-6)
    # only the car voxel, per voxel: 5.1 * 1.5 / 1
    car = torch.tensor([True, False, False])
    assert flow_l1_loss(pred, gt, car, "voxel_count").item() == pytest.approx(7.65, rel=1e-6)
    # the module, released settings: 0.5 x the all-voxel value; 2 flow classes of 3 + free
    grid = OccupancyGrid((0.0, 0.0, 0.0, 1.5, 0.5, 0.5), 0.5)  # 3 x 1 x 1
    module = OccupancyFlowLoss(_spec(4, 3, [0, 1], grid), focal_weight=0.0,
                               lovasz_weight=0.0, sem_scal_weight=0.0, geo_scal_weight=0.0)
    flow = pred.t().reshape(1, 2, 3, 1, 1)
    classes = torch.tensor([0, 2, 3]).reshape(1, 3, 1, 1)  # car, a static class, free
    out = module(torch.zeros(1, 4, 3, 1, 1), flow, classes, gt.reshape(1, 3, 1, 1, 2))
    assert out["loss_flow"].item() == pytest.approx(0.5 * expected_all, rel=1e-6)
    old = OccupancyFlowLoss(_spec(4, 3, [0, 1], grid), focal_weight=0.0,
                            lovasz_weight=0.0, sem_scal_weight=0.0, geo_scal_weight=0.0, flow_weight=1.0,
                            flow_voxels="flow_classes", flow_normalization="voxel_count")
    out = old(torch.zeros(1, 4, 3, 1, 1), flow, classes, gt.reshape(1, 3, 1, 1, 2))
    assert out["loss_flow"].item() == pytest.approx(7.65, rel=1e-6)
    with pytest.raises(ValueError, match="flow_voxels"):
        OccupancyFlowLoss(_spec(4, 3, [0, 1], grid), flow_voxels="moving")


def test_occupancy_flow_loss_module_masks_and_weights():
    torch.manual_seed(5)
    grid = OccupancyGrid((-2.0, -2.0, -1.0, 2.0, 2.0, 1.0), 0.5)  # 8 x 8 x 4
    num_classes, free = 5, 4
    frequencies = [1e3, 5e3, 2e4, 1e5, 1e7]
    loss = OccupancyFlowLoss(_spec(num_classes, free, [0, 1], grid),
                             class_frequencies=frequencies, lovasz_weight=2.0, flow_weight=0.5)
    logits = torch.randn(2, num_classes, *grid.shape, dtype=torch.float64, requires_grad=True)
    flow = torch.randn(2, 2, *grid.shape, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, num_classes, (2, *grid.shape))
    target[0, 0] = 255  # ignored voxels
    flow_target = torch.randn(2, *grid.shape, 2, dtype=torch.float64)
    out = loss(logits, flow, target, flow_target)
    assert set(out) == {"loss_occ_focal", "loss_occ_lovasz", "loss_occ_sem_scal", "loss_occ_geo_scal", "loss_flow"}
    # The same terms from the functions on the valid voxels.
    valid = (target != 255).reshape(-1)
    flat_logits = logits.permute(0, 2, 3, 4, 1).reshape(-1, num_classes)[valid]
    flat_target = target.reshape(-1)[valid]
    centers = torch.from_numpy(grid.voxel_centers()[..., :2])
    radius = centers.norm(dim=-1)
    distance = (1 + radius / radius.max())[None].expand(2, *grid.shape).reshape(-1)[valid]
    weights = class_weights_from_frequencies(frequencies)
    torch.testing.assert_close(out["loss_occ_focal"], sigmoid_focal_loss(flat_logits, flat_target, weights, distance))
    torch.testing.assert_close(out["loss_occ_lovasz"], 2.0 * lovasz_softmax(flat_logits.softmax(-1), flat_target))
    torch.testing.assert_close(out["loss_flow"], 0.5 * flow_l1_loss(flow.permute(0, 2, 3, 4, 1).reshape(-1, 2),
                                                                     flow_target.reshape(-1, 2), valid))
    # Changing predictions on ignored voxels changes nothing.
    with torch.no_grad():
        edited = logits.clone()
        edited[0, :, 0] += 5.0
    for name, value in loss(edited, flow, target, flow_target).items():
        torch.testing.assert_close(value, out[name])
    # Flow loss off: zero, yet the flow branch stays in the graph.
    off = loss(logits, flow, target, flow_target, flow_loss_enabled=False)["loss_flow"]
    assert off.item() == 0.0 and off.requires_grad
    # Everything ignored: finite zeros.
    empty = loss(logits, flow, torch.full_like(target, 255), flow_target)
    assert all(v.item() == 0.0 for v in empty.values())
    assert torch.isfinite(sum(out.values()))
    # A class id the head cannot predict (e.g. Occ3D's 18 classes into a 17-class model) is an error.
    wrong = target.clone()
    wrong[1, 2, 3, 1] = num_classes
    with pytest.raises(ValueError, match=f"class id {num_classes} .*predicts {num_classes} classes.*gt_format"):
        loss(logits, flow, wrong, flow_target)


def test_class_weights_reject_fractions():
    with pytest.raises(ValueError, match="voxel counts"):
        class_weights_from_frequencies([0.2, 0.8])
    torch.testing.assert_close(class_weights_from_frequencies([10.0, 100.0]),
                               torch.tensor([1 / math.log(10.001), 1 / math.log(100.001)], dtype=torch.float64))
