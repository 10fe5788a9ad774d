"""GaussianSplatRegularizer on samples built to the mapper contract: render geometry with
mapper-produced cameras, flow propagation, loss values, gradients and learning, the decoded
mode, training-only use in the model, and the TensorBoard image hook."""
import math
from unittest import mock

import numpy as np
import pytest
import torch

from voxelsplat import testing
from voxelsplat.structures import OccupancyGrid, OccupancySpec, occupancy_metadata
from voxelsplat.data.render_views import adjacent_render_views
from voxelsplat.modeling.regularizers import GaussianSplatRegularizer
from voxelsplat.modeling.regularizers.gaussian_splat import gather_voxels
from voxelsplat.utils.geometry import bda_matrix, pose_to_transform, project_points

META = occupancy_metadata("openocc_v2")
CLASSES = META["class_names"]
FREE = META["free_index"]
# A small grid (same conventions, fewer voxels) keeps the learning tests fast.
SMALL_GRID = OccupancyGrid((-12.0, -12.0, -1.0, 12.0, 12.0, 2.2), 0.4)
SMALL_SPEC = OccupancySpec.for_label_set("openocc_v2", SMALL_GRID)
# Render cameras of the street samples: a ring at the ego origin, 1.2 m up, 80 degree field of view.
RING = dict(mount_radius=0.0, mount_height=1.2, horizontal_fov_deg=80.0)
RING_IMAGE_SIZE = (64, 40)

# nuScenes calibration of CAM_FRONT and CAM_BACK (scene-0061), 1600x900 images.
NUSCENES_CAMERAS = {
    "CAM_FRONT": dict(translation=[1.70079118954, 0.0159456324149, 1.51095763913],
                      rotation=[0.4998015430569128, -0.5030316162024876, 0.4997798114386805, -0.49701864389469785],
                      intrinsics=[[1266.417203046554, 0.0, 816.2670197447984], [0.0, 1266.417203046554, 491.50706579294757],
                                  [0.0, 0.0, 1.0]]),
    "CAM_BACK": dict(translation=[0.0283260309358, 0.00345136761476, 1.57910346144],
                     rotation=[0.5037872666382278, -0.49740249788611096, -0.4941850223835201, 0.5045496097725578],
                     intrinsics=[[809.2209905677063, 0.0, 829.2196003259838], [0.0, 809.2209905677063, 481.77842384512485],
                                 [0.0, 0.0, 1.0]]),
}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_regularizer(grid=SMALL_GRID, **kwargs):
    kwargs.setdefault("backend", "torch")
    spec = OccupancySpec.for_label_set("openocc_v2", grid)
    return GaussianSplatRegularizer(spec=spec, **kwargs)


def _record(frame, cameras, ego_x):
    ego2global = pose_to_transform([ego_x, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    return dict(sample_token=f"s{frame}", frame_index=frame, timestamp=1_000_000 + 500_000 * frame, ego2global=ego2global,
                cameras=[dict(channel=name, cam2ego=pose_to_transform(c["translation"], c["rotation"]),
                              ego2global=ego2global, intrinsics=np.array(c["intrinsics"]), width=1600, height=900,
                              timestamp=1_000_000 + 500_000 * frame + 1000 * i)
                         for i, (name, c) in enumerate(cameras.items())])


def mapper_views(bda=np.eye(4), frame_offsets=(0,), render_scale=0.0625):
    """Render views exactly as the mapper builds them (adjacent_render_views), 100x56 px."""
    records = [_record(f, NUSCENES_CAMERAS, ego_x=2.0 * f) for f in range(3)]
    views = adjacent_render_views(records[1], records, frame_offsets, bda, render_scale)
    return dict(render_viewmats=torch.from_numpy(views["render_viewmats"]).float(),
                render_intrinsics=torch.from_numpy(views["render_intrinsics"]).float(),
                render_image_size=tuple(views["render_image_size"]),
                render_frame_offsets=torch.from_numpy(views["render_frame_offsets"]),
                render_time_offsets=torch.from_numpy(views["render_time_offsets"]).float())


def street_sample(seed, dt=(0.0, 0.5, -0.5, 0.5), num_gaussians=600, classes=None):
    """A mapped training sample (voxelsplat.testing) on SMALL_GRID: a street with 4 moving cars,
    Gaussians sampled among all voxels (2/3 occupied), render views = the ring's ``len(dt)``
    cameras (RING) at full scale with time offsets ``dt`` (s). ``classes``: one class name for
    every occupied voxel."""
    one_class = {} if classes is None else dict(ground_classes=classes, structure_classes=classes)
    sample = testing.make_sample(SMALL_SPEC, seed, sample_token=f"street{seed}", image_size=RING_IMAGE_SIZE,
                                 num_cameras=len(dt), camera_options=RING, with_regularizer=True,
                                 num_gaussians=num_gaussians, render_scale=1.0, num_vehicles=4,
                                 vehicle_classes=classes or ("car",), **one_class)
    sample["render_time_offsets"] = torch.tensor(dt, dtype=torch.float32)
    return sample


def ring_views(num_views, dt, width=RING_IMAGE_SIZE[0], height=RING_IMAGE_SIZE[1]):
    """Render fields of the RING of ``num_views`` cameras (camera 0 along +x) at full scale,
    with view time offsets ``dt`` (s)."""
    rig = testing.camera_ring(num_views, (width, height), **RING)
    views = testing.render_views(rig["intrinsics"], rig["cam2ego"], (width, height))
    views["render_time_offsets"] = torch.tensor(dt, dtype=torch.float32)
    return views


def matching_head_outputs(sample, grid=SMALL_GRID, magnitude=25.0):
    """Head outputs that agree with the GT: class logit +magnitude / others -magnitude, GT flow."""
    semantics = sample["occ_semantics"]
    logits = torch.full((len(CLASSES),) + tuple(grid.shape), -magnitude)
    logits.scatter_(0, semantics[None], magnitude)
    return {"occ_logits": logits[None], "flow": sample["occ_flow"].permute(3, 0, 1, 2)[None].clone()}


# --------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("flip_x,rotation_deg", [(False, 0.0), (True, 20.0)])
def test_gt_voxel_renders_at_its_projected_pixel_in_mapper_cameras(flip_x, rotation_deg):
    """A car voxel ahead of the ego shows in CAM_FRONT at K (R p + t), nothing in CAM_BACK;
    a voxel behind shows in CAM_BACK. Cameras that looked backwards would swap them."""
    grid = OccupancyGrid()
    bda = bda_matrix(rotation_deg=rotation_deg, flip_x=flip_x)
    views = mapper_views(bda=bda)
    regularizer = make_regularizer(grid=grid, keep_views=2)
    semantics = torch.full(grid.shape, FREE, dtype=torch.int64)
    ahead = np.array([12.2, 1.0, 0.6])  # metres, un-augmented ego frame
    augmented = (bda[:3, :3] @ ahead)
    index = torch.from_numpy(grid.point_to_index(augmented))
    semantics[tuple(index)] = CLASSES.index("car")
    centre = torch.from_numpy(grid.index_to_center(index.numpy())).float()
    sample = dict(sample_token="geometry", occ_semantics=semantics, occ_flow=torch.zeros(*grid.shape, 2),
                  gaussian_voxel_indices=index[None], **views)
    head = matching_head_outputs(sample, grid)
    regularizer(  # noqa: the losses are not the point here, the stashed GT renders are
        [sample], head, flow_loss_enabled=False)
    renders = regularizer.last_renders
    front_alpha, back_alpha = renders["gt_alphas"][0], renders["gt_alphas"][1]
    assert float(back_alpha.max()) == 0.0
    assert float(front_alpha.max()) > 0.5
    uv, depth = project_points(views["render_intrinsics"][0], views["render_viewmats"][0], centre[None])
    assert 8.0 < float(depth[0]) < 16.0
    peak = int(front_alpha.flatten().argmax())
    width = views["render_image_size"][0]
    assert (peak % width, peak // width) == (int(uv[0, 0]), int(uv[0, 1]))
    # the rendered class is "car"
    assert int(renders["gt_features"][0].flatten(0, 1)[peak].argmax()) == CLASSES.index("car")

    # a voxel behind the ego shows in CAM_BACK only
    behind = torch.from_numpy(grid.point_to_index(bda[:3, :3] @ np.array([-10.2, -0.6, 0.6])))
    semantics2 = torch.full(grid.shape, FREE, dtype=torch.int64)
    semantics2[tuple(behind)] = CLASSES.index("bus")
    sample2 = dict(sample, occ_semantics=semantics2, gaussian_voxel_indices=behind[None])
    regularizer([sample2], matching_head_outputs(sample2, grid), flow_loss_enabled=False)
    assert float(regularizer.last_renders["gt_alphas"][0].max()) == 0.0
    assert float(regularizer.last_renders["gt_alphas"][1].max()) > 0.5


@pytest.mark.parametrize("propagation_seconds,expected_shift", [(None, (-2.0, 1.2)), (1.0, (-5.0, 3.0))])
def test_propagated_state_moves_renders_by_flow_times_propagation_time(propagation_seconds, expected_shift):
    """Corrected: flow x the view's time offset (0.4 s); released: flow x 1 s for every view."""
    views = ring_views(1, dt=(0.4,), width=80, height=48)
    regularizer = make_regularizer(propagation_seconds=propagation_seconds)
    semantics = torch.full(SMALL_GRID.shape, FREE, dtype=torch.int64)
    index = torch.from_numpy(SMALL_GRID.point_to_index(np.array([8.1, -1.3, 0.5])))
    semantics[tuple(index)] = CLASSES.index("car")
    flow = torch.zeros(*SMALL_GRID.shape, 2)
    flow[tuple(index)] = torch.tensor([-5.0, 3.0])  # m/s
    sample = dict(sample_token="move", occ_semantics=semantics, occ_flow=flow, gaussian_voxel_indices=index[None], **views)
    fields = regularizer.sample_inputs(sample, torch.device("cpu"))
    times = regularizer.propagation_times(fields["time_offsets"])
    assert times.tolist() == pytest.approx([0.4 if propagation_seconds is None else 1.0])
    gt = regularizer.gt_gaussians(sample, fields["indices"])
    still = regularizer.render(gt, fields)
    moved = regularizer.render(gt, fields, regularizer.flow_displacement(gt["flow"], times))
    centre = torch.from_numpy(SMALL_GRID.index_to_center(index.numpy())).float()
    for render, point in ((still, centre), (moved, centre + torch.tensor([*expected_shift, 0.0]))):
        uv, _ = project_points(views["render_intrinsics"][0], views["render_viewmats"][0], point[None])
        peak = int(render[1][0].flatten().argmax())
        assert (peak % 80, peak // 80) == (int(uv[0, 0]), int(uv[0, 1]))
    assert not torch.equal(still[1], moved[1])


def test_release_camera_flip_renders_what_lies_behind_the_camera_mirrored():
    """flip_render_cameras=True (the released code): w2c' = diag(1, -1, -1, 1) w2c, so a
    voxel in front of the camera is not rendered and one behind it appears at
    u = fx x / (-z) + cx, v = fy y / z + cy (camera coordinates of the unflipped camera)."""
    views = ring_views(1, dt=(0.0,), width=80, height=48)  # looks along +x from (0, 0, 1.2)
    semantics = torch.full(SMALL_GRID.shape, FREE, dtype=torch.int64)
    front = torch.from_numpy(SMALL_GRID.point_to_index(np.array([8.1, -1.3, 0.5])))
    behind = torch.from_numpy(SMALL_GRID.point_to_index(np.array([-8.1, -1.3, 0.5])))
    for index in (front, behind):
        semantics[tuple(index)] = CLASSES.index("car")
    sample = dict(sample_token="flip", occ_semantics=semantics, occ_flow=torch.zeros(*SMALL_GRID.shape, 2),
                  gaussian_voxel_indices=torch.stack([front, behind]), **views)
    for flip, visible, hidden in ((False, front, behind), (True, behind, front)):
        regularizer = make_regularizer(flip_render_cameras=flip)
        fields = regularizer.sample_inputs(sample, torch.device("cpu"))
        viewmat = views["render_viewmats"][0].double()
        expected_viewmat = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)) @ viewmat \
            if flip else viewmat
        torch.testing.assert_close(fields["viewmats"][0].double(), expected_viewmat)
        alphas = regularizer.render(regularizer.gt_gaussians(sample, fields["indices"]), fields)[1][0]
        point = torch.from_numpy(SMALL_GRID.index_to_center(visible.numpy())).double()
        x, y, z = (viewmat[:3, :3] @ point + viewmat[:3, 3]).tolist()
        K = views["render_intrinsics"][0].double()
        if flip:
            assert z < 0
            u, v = K[0, 0] * x / -z + K[0, 2], K[1, 1] * y / z + K[1, 2]
        else:
            u, v = K[0, 0] * x / z + K[0, 2], K[1, 1] * y / z + K[1, 2]
        peak = int(alphas.flatten().argmax())
        assert (peak % 80, peak // 80) == (int(u), int(v))
        assert float(alphas.max()) > 0.5
        # the other voxel alone renders nothing
        other = dict(sample, gaussian_voxel_indices=hidden[None])
        fields = regularizer.sample_inputs(other, torch.device("cpu"))
        assert float(regularizer.render(regularizer.gt_gaussians(other, fields["indices"]), fields)[1].max()) == 0.0


# --------------------------------------------------------------------------------------------- losses
def test_matching_prediction_gives_near_zero_losses_and_wrong_ones_do_not():
    sample = street_sample(0, classes=("car",))  # one class: every covered pixel has a pure target
    regularizer = make_regularizer()
    head = matching_head_outputs(sample)
    losses = regularizer([sample], head, flow_loss_enabled=True)
    assert set(losses) == {"loss_splat_semantic", "loss_splat_depth", "loss_splat_flow"}
    assert float(regularizer.last_renders["gt_alphas"].max()) > 0.9
    # The released semantic target is the unnormalised accumulated one-hot and the rendered
    # logits are alpha-weighted: faint edge pixels keep a small cross-entropy even for a
    # perfect prediction.
    for name, value in losses.items():
        assert float(value) < (2e-2 if name == "loss_splat_semantic" else 1e-3), name

    wrong_class = {k: v.clone() for k, v in head.items()}
    wrong_class["occ_logits"][:, [CLASSES.index("car"), CLASSES.index("bus")]] = \
        wrong_class["occ_logits"][:, [CLASSES.index("bus"), CLASSES.index("car")]]
    assert float(regularizer([sample], wrong_class, flow_loss_enabled=True)["loss_splat_semantic"]) > 1.0

    wrong_flow = {k: v.clone() for k, v in head.items()}
    wrong_flow["flow"] = wrong_flow["flow"] + 3.0
    worse = regularizer([sample], wrong_flow, flow_loss_enabled=True)
    assert float(worse["loss_splat_flow"]) > 1.0
    # moved by the wrong flow in the propagated state, the depth render no longer matches
    assert float(worse["loss_splat_depth"]) > 10 * float(losses["loss_splat_depth"]) + 1e-3

    empty = {k: v.clone() for k, v in head.items()}
    empty["occ_logits"][:, FREE] = 25.0  # everything predicted free: no coverage, wrong depth
    assert float(regularizer([sample], empty, flow_loss_enabled=False)["loss_splat_depth"]) > 0.5


def _direct_losses(pred, gt, depth_scale=1.0):
    """The released render losses written pixel by pixel (float64): (semantic, depth, flow)."""
    ce, ce_count, depth, depth_count, flow, flow_weight = 0.0, 0, 0.0, 0, 0.0, 0.0
    views, height, width = gt[1].shape
    for v in range(views):
        for i in range(height):
            for j in range(width):
                depth += abs(float(pred[2][v, i, j]) - float(gt[2][v, i, j])) / depth_scale
                depth_count += 1
                gt_flow, pred_flow = gt[0][v, i, j, -2:].double(), pred[0][v, i, j, -2:].double()
                weight = float(gt_flow.norm()) + 0.1
                flow += weight * float((pred_flow - gt_flow).abs().sum())
                flow_weight += weight
                if float(gt[2][v, i, j]) <= 0.1:
                    continue
                ce_count += 1
                target = gt[0][v, i, j, :-2].double()  # alpha-accumulated one-hot, not renormalised
                ce += float(-(target * torch.log_softmax(pred[0][v, i, j, :-2].double(), 0)).sum())
    return ce / max(ce_count, 1), depth / depth_count, flow / flow_weight, ce_count


def test_losses_match_a_direct_computation_on_the_renders():
    """Released formulas against a per-pixel loop over the renders (one view, dt = 0 so both
    states render alike and the pooled value equals one state's)."""
    sample = street_sample(1, dt=(0.0,))
    g = torch.Generator().manual_seed(0)
    head = {"occ_logits": torch.randn(1, len(CLASSES), *SMALL_GRID.shape, generator=g) * 2,
            "flow": torch.randn(1, 2, *SMALL_GRID.shape, generator=g)}
    regularizer = make_regularizer(loss_weights={"semantic": 1.0, "depth": 1.0, "flow": 1.0}, depth_scale=2.0)
    losses = regularizer([sample], head, flow_loss_enabled=True)
    r = regularizer.last_renders
    keep = [c for c in range(len(CLASSES)) if c != FREE]
    fields = regularizer.sample_inputs(sample, torch.device("cpu"))
    voxels = {k: gather_voxels(v, torch.zeros(len(fields["indices"]), dtype=torch.long), fields["indices"])
              for k, v in head.items()}
    pred = regularizer.render(regularizer.predicted_gaussians(voxels, fields["indices"]), fields)
    gt = regularizer.render(regularizer.gt_gaussians(sample, fields["indices"]), fields)
    semantic, depth, flow, count = _direct_losses(pred, gt, depth_scale=2.0)
    assert count > 50 and count < 40 * 64  # some pixels have no GT depth
    assert torch.equal(r["gt_alphas"][0], gt[1][0])
    assert float(losses["loss_splat_semantic"]) == pytest.approx(semantic, rel=1e-4)
    assert float(losses["loss_splat_depth"]) == pytest.approx(depth, rel=1e-4)
    assert float(losses["loss_splat_flow"]) == pytest.approx(flow, rel=1e-4)
    assert torch.isinf(r["pred_features"][..., FREE]).all() and torch.isfinite(r["pred_features"][..., keep]).all()


def test_losses_pool_pixels_over_samples_and_states():
    """One division per batch: sum of numerators / sum of denominators over both samples and
    both states (the released code concatenates every render before reducing)."""
    samples = [street_sample(seed, dt=(0.5, -0.5), num_gaussians=300) for seed in (5, 6)]
    g = torch.Generator().manual_seed(1)
    head = {"occ_logits": torch.randn(2, len(CLASSES), *SMALL_GRID.shape, generator=g) * 2,
            "flow": torch.randn(2, 2, *SMALL_GRID.shape, generator=g)}
    regularizer = make_regularizer(loss_weights={"semantic": 1.0, "depth": 1.0, "flow": 1.0})
    losses = regularizer(samples, head, flow_loss_enabled=True)
    numerators = {"semantic": 0.0, "depth": 0.0, "flow": 0.0}
    denominators = dict(numerators)
    for b, sample in enumerate(samples):
        fields = regularizer.sample_inputs(sample, torch.device("cpu"))
        ids = torch.full((len(fields["indices"]),), b, dtype=torch.long)
        pred_g = regularizer.predicted_gaussians({k: gather_voxels(v, ids, fields["indices"]) for k, v in head.items()},
                                                 fields["indices"])
        gt_g = regularizer.gt_gaussians(sample, fields["indices"])
        times = regularizer.propagation_times(fields["time_offsets"])
        for pred_move, gt_move in ((None, None), (regularizer.flow_displacement(pred_g["flow"], times),
                                                  regularizer.flow_displacement(gt_g["flow"], times))):
            pred, gt = regularizer.render(pred_g, fields, pred_move), regularizer.render(gt_g, fields, gt_move)
            k = len(CLASSES) - 1
            fg = gt[2] > 0.1
            numerators["semantic"] += float(-(gt[0][fg][:, :k] * torch.log_softmax(pred[0][fg][:, :k], -1)).sum())
            denominators["semantic"] += int(fg.sum())
            numerators["depth"] += float((pred[2] - gt[2]).abs().sum())
            denominators["depth"] += gt[2].numel()
            w = gt[0][..., k:].norm(dim=-1) + 0.1
            numerators["flow"] += float((w * (pred[0][..., k:] - gt[0][..., k:]).abs().sum(-1)).sum())
            denominators["flow"] += float(w.sum())
    for name in numerators:
        assert float(losses[f"loss_splat_{name}"]) == pytest.approx(numerators[name] / denominators[name], rel=1e-4)


def test_depth_loss_grows_with_the_opacity_of_a_gaussian_where_the_gt_is_empty():
    """One camera, two sampled voxels: a car voxel (GT occupied, predicted right) and a floater
    (GT free, predicted with opacity sigmoid(-free logit)). The released depth term (all
    pixels) grows with the floater's opacity; the semantic term ignores pixels with no GT
    depth; the flow term counts the floater's pixels with weight 0.1."""
    views = ring_views(1, dt=(0.0,), width=80, height=48)
    semantics = torch.full(SMALL_GRID.shape, FREE, dtype=torch.int64)
    car = torch.from_numpy(SMALL_GRID.point_to_index(np.array([8.1, -1.3, 0.5])))
    floater = torch.from_numpy(SMALL_GRID.point_to_index(np.array([6.1, 2.5, 1.3])))
    semantics[tuple(car)] = CLASSES.index("car")
    flow = torch.zeros(*SMALL_GRID.shape, 2)
    sample = dict(sample_token="floater", occ_semantics=semantics, occ_flow=flow,
                  gaussian_voxel_indices=torch.stack([car, floater]), **views)
    regularizer = make_regularizer(loss_weights={"semantic": 1.0, "depth": 1.0, "flow": 1.0})
    previous = None
    for opacity in (0.0, 0.2, 0.5, 0.9):
        head = matching_head_outputs(sample)
        free_logit = 25.0 if opacity == 0.0 else -math.log(opacity / (1 - opacity))  # sigmoid(-l) = opacity
        head["occ_logits"][0, :, floater[0], floater[1], floater[2]] = -25.0
        head["occ_logits"][0, FREE, floater[0], floater[1], floater[2]] = free_logit
        head["flow"][0, :, floater[0], floater[1], floater[2]] = torch.tensor([2.0, 0.0])
        losses = regularizer([sample], head, flow_loss_enabled=False)
        fields = regularizer.sample_inputs(sample, torch.device("cpu"))
        pred_g = regularizer.predicted_gaussians(
            {k: gather_voxels(v, torch.zeros(2, dtype=torch.long), fields["indices"]) for k, v in head.items()},
            fields["indices"])
        assert float(pred_g["opacities"][1]) == pytest.approx(opacity, abs=1e-6)
        pred, gt = regularizer.render(pred_g, fields), regularizer.render(regularizer.gt_gaussians(sample, fields["indices"]), fields)
        semantic, depth, flow_value, _ = _direct_losses(pred, gt)
        assert float(losses["loss_splat_depth"]) == pytest.approx(depth, rel=1e-4, abs=1e-9)
        assert float(losses["loss_splat_semantic"]) == pytest.approx(semantic, rel=1e-4, abs=1e-6)
        if opacity == 0.0:
            assert float(losses["loss_splat_depth"]) < 1e-3
        else:
            assert float(losses["loss_splat_depth"]) > previous * 1.2
            flow_on = regularizer([sample], head, flow_loss_enabled=True)["loss_splat_flow"]
            assert float(flow_on) == pytest.approx(_direct_losses(pred, gt)[2], rel=1e-3)
            assert float(flow_on) > 0
        previous = float(losses["loss_splat_depth"])


def test_alpha_normalised_and_detached_flow_options():
    """normalize_by_alpha compares D / alpha and F / alpha on pixels both renders cover;
    detach_flow_weights keeps the flow loss's gradient off the opacities."""
    sample = street_sample(7, dt=(0.0,))
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(1, len(CLASSES), *SMALL_GRID.shape, generator=g) * 2).requires_grad_(True)
    flow = torch.randn(1, 2, *SMALL_GRID.shape, generator=g).requires_grad_(True)
    head = {"occ_logits": logits, "flow": flow}
    regularizer = make_regularizer(normalize_by_alpha=True, coverage_threshold=0.3,
                                   loss_weights={"semantic": 1.0, "depth": 1.0, "flow": 1.0})
    losses = {k: v.detach() for k, v in regularizer([sample], head, flow_loss_enabled=True).items()}
    fields = regularizer.sample_inputs(sample, torch.device("cpu"))
    ids = torch.zeros(len(fields["indices"]), dtype=torch.long)
    with torch.no_grad():
        pred = regularizer.render(regularizer.predicted_gaussians(
            {k: gather_voxels(v, ids, fields["indices"]) for k, v in head.items()}, fields["indices"]), fields)
        gt = regularizer.render(regularizer.gt_gaussians(sample, fields["indices"]), fields)
    both = (pred[1] > 0.3) & (gt[1] > 0.3)
    assert 20 < int(both.sum()) < both.numel()
    depth = ((pred[2] / pred[1] - gt[2] / gt[1])[both]).abs().mean()
    pf, gf = pred[0][..., -2:][both] / pred[1][both][:, None], gt[0][..., -2:][both] / gt[1][both][:, None]
    w = gf.norm(dim=-1) + 0.1
    assert float(losses["loss_splat_depth"]) == pytest.approx(float(depth), rel=1e-4)
    assert float(losses["loss_splat_flow"]) == pytest.approx(float((w * (pf - gf).abs().sum(-1)).sum() / w.sum()),
                                                             rel=1e-4)
    # the flow term alone: its gradient reaches the opacities (free logit) unless detached
    for detach in (False, True):
        logits.grad, flow.grad = None, None
        regularizer = make_regularizer(detach_flow_weights=detach, loss_weights={"semantic": 0.0, "depth": 0.0,
                                                                                 "flow": 1.0})
        value = regularizer([sample], head, flow_loss_enabled=True)["loss_splat_flow"]
        value.backward()
        assert float(flow.grad.abs().sum()) > 0
        free_grad = 0.0 if logits.grad is None else float(logits.grad[0, FREE].abs().sum())
        assert (free_grad == 0.0) == detach, (detach, free_grad)
        if detach:  # same value: only the gradient path changes
            attached = make_regularizer(loss_weights={"semantic": 0.0, "depth": 0.0, "flow": 1.0})
            assert float(value) == pytest.approx(float(attached([sample], head, flow_loss_enabled=True)[
                "loss_splat_flow"]), rel=1e-5)


def test_gradients_reach_logits_and_flow_and_losses_fall():
    torch.manual_seed(0)
    sample = street_sample(2)
    logits = torch.nn.Parameter(torch.randn(1, len(CLASSES), *SMALL_GRID.shape) * 0.5)
    flow = torch.nn.Parameter(torch.zeros(1, 2, *SMALL_GRID.shape))
    regularizer = make_regularizer()
    optimizer = torch.optim.Adam([logits, flow], lr=0.3)
    history = []
    for step in range(25):
        losses = regularizer([sample], {"occ_logits": logits, "flow": flow}, flow_loss_enabled=True)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        if step == 0:
            idx = sample["gaussian_voxel_indices"]
            assert logits.grad[0, :, idx[:, 0], idx[:, 1], idx[:, 2]].abs().sum() > 0
            assert flow.grad[0, :, idx[:, 0], idx[:, 1], idx[:, 2]].abs().sum() > 0
            # voxels that were not sampled get nothing
            assert float(logits.grad.abs().sum()) == pytest.approx(
                float(logits.grad[0, :, idx[:, 0], idx[:, 1], idx[:, 2]].abs().sum()), rel=1e-5)
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    for name in history[0]:
        assert history[-1][name] < 0.5 * history[0][name], (name, history[0][name], history[-1][name])


def test_flow_loss_switch_and_propagation_flag():
    sample = street_sample(3)
    head = matching_head_outputs(sample)
    head["flow"] = head["flow"] + 1.0
    head["flow"].requires_grad_(True)
    regularizer = make_regularizer()
    off = regularizer([sample], head, flow_loss_enabled=False)
    assert float(off["loss_splat_flow"].detach()) == 0.0
    # without the flow loss, and without the propagated state, nothing reaches the flow
    sum(off.values()).backward()
    assert head["flow"].grad is None or float(head["flow"].grad.abs().sum()) == 0.0
    # with propagation only (flow loss weight 0), the positions carry a gradient to the flow
    regularizer = make_regularizer(loss_weights={"flow": 0.0})
    on = regularizer([sample], head, flow_loss_enabled=True)
    sum(on.values()).backward()
    assert float(head["flow"].grad.abs().sum()) > 0
    no_propagation = make_regularizer(loss_weights={"flow": 0.0}, propagate_by_flow=False)
    head["flow"].grad = None
    sum(no_propagation([sample], head, flow_loss_enabled=True).values()).backward()
    assert head["flow"].grad is None or float(head["flow"].grad.abs().sum()) == 0.0


def test_max_views_and_render_chunk_do_not_change_a_full_render():
    sample = street_sample(4, dt=(0.0, 0.1, 0.1, 0.2, 0.3, 0.0))
    head = matching_head_outputs(sample)
    head["flow"] = head["flow"] * 0.5
    full = make_regularizer()([sample], head, flow_loss_enabled=True)
    chunked = make_regularizer(render_chunk=2)([sample], head, flow_loss_enabled=True)
    for k in full:
        assert float(chunked[k]) == pytest.approx(float(full[k]), rel=1e-5, abs=1e-7)
    torch.manual_seed(0)
    few = make_regularizer(max_views=2, keep_views=6)
    few([sample], head, flow_loss_enabled=True)
    assert few.last_renders["gt_alphas"].shape[0] == 2


def test_decoded_mode_starts_at_voxel_centres_and_trains_its_decoder():
    sample = street_sample(5)
    g = torch.Generator().manual_seed(1)
    head = {"occ_logits": torch.randn(1, len(CLASSES), *SMALL_GRID.shape, generator=g),
            "flow": torch.randn(1, 2, *SMALL_GRID.shape, generator=g),
            "voxel_features": torch.randn(1, 8, *SMALL_GRID.shape, generator=g).requires_grad_(True)}
    regularizer = make_regularizer(mode="decoded", feature_channels=8, hidden_channels=16)
    assert regularizer.needs_voxel_features and not make_regularizer().needs_voxel_features
    idx = sample["gaussian_voxel_indices"]
    # gather_voxels against plain indexing, values and gradients (two samples, a repeated voxel)
    voxels = {k: gather_voxels(v, torch.zeros(len(idx), dtype=torch.long), idx) for k, v in head.items()}
    for k, v in head.items():
        torch.testing.assert_close(voxels[k], v[0][:, idx[:, 0], idx[:, 1], idx[:, 2]].T)
    volume = torch.randn(2, 3, *SMALL_GRID.shape, generator=g, requires_grad=True)
    picks = torch.cat([idx[:20], idx[:5], idx[20:40]])
    batch = torch.tensor([0] * 25 + [1] * 20)
    weights = torch.randn(len(picks), 3, generator=g)
    (grad,) = torch.autograd.grad((gather_voxels(volume, batch, picks) * weights).sum(), volume)
    (want,) = torch.autograd.grad((volume[batch, :, picks[:, 0], picks[:, 1], picks[:, 2]] * weights).sum(), volume)
    torch.testing.assert_close(grad, want)
    assert float(grad.abs().sum()) > 0
    decoded = regularizer.predicted_gaussians(voxels, idx)
    release = make_regularizer().predicted_gaussians(voxels, idx)
    torch.testing.assert_close(decoded["means"], release["means"])
    torch.testing.assert_close(decoded["scales"], release["scales"])
    torch.testing.assert_close(decoded["quats"], release["quats"].contiguous())
    torch.testing.assert_close(decoded["opacities"], torch.full_like(decoded["opacities"], 0.5))
    # The zero-initialised last layer learns first; after one step the gradient reaches the
    # whole decoder and the voxel features.
    optimizer = torch.optim.SGD(regularizer.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        head["voxel_features"].grad = None
        sum(regularizer([sample], head, flow_loss_enabled=True).values()).backward()
        optimizer.step()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in regularizer.parameters())
    assert float(head["voxel_features"].grad.abs().sum()) > 0
    with torch.no_grad():  # bounds hold for any decoder output
        for p in regularizer.parameters():
            p.add_(torch.randn_like(p) * 5)
        decoded = regularizer.predicted_gaussians(voxels, idx)
    offset = decoded["means"] - release["means"]
    assert float(offset.abs().max()) <= SMALL_GRID.voxel_size + 1e-6
    assert float(decoded["scales"].min()) >= 0.04 - 1e-6 and float(decoded["scales"].max()) <= 0.4 + 1e-6
    torch.testing.assert_close(decoded["quats"].norm(dim=-1), torch.ones(len(idx)))


def test_bad_inputs_raise_errors_naming_the_sample_and_field():
    regularizer = make_regularizer()
    sample = street_sample(6)
    head = matching_head_outputs(sample)
    broken = {k: v for k, v in sample.items() if k != "render_viewmats"}
    with pytest.raises(KeyError, match="street6.*render_viewmats"):
        regularizer([broken], head, flow_loss_enabled=False)
    with pytest.raises(ValueError, match="street6.*render_intrinsics"):
        regularizer([dict(sample, render_intrinsics=sample["render_intrinsics"][:2])], head, flow_loss_enabled=False)
    with pytest.raises(ValueError, match="mode"):
        make_regularizer(mode="dense")
    with pytest.raises(ValueError, match="feature_channels"):
        make_regularizer(mode="decoded")
    with pytest.raises(KeyError, match="colour"):
        make_regularizer(loss_weights={"colour": 1.0})


# --------------------------------------------------------------------------------------------- adjacent GT
def random_adjacent_points(seed, offsets, count, grid=SMALL_GRID):
    """``adjacent_gt_*`` fields drawn at random: positions anywhere in the grid's range, any
    class (free and out-of-set ones included, to be dropped), flows in m/s, the given offsets."""
    g = torch.Generator().manual_seed(seed)
    low, high = torch.tensor(grid.range_min).float(), torch.tensor(grid.range_max).float()
    classes = torch.randint(0, len(CLASSES), (count,), generator=g)
    classes[:3] = torch.tensor([FREE, len(CLASSES), -1])
    return dict(adjacent_gt_means=low + (high - low) * torch.rand(count, 3, generator=g),
                adjacent_gt_classes=classes,
                adjacent_gt_flow=torch.randn(count, 2, generator=g) * 3.0,
                adjacent_gt_frame_offsets=torch.tensor(offsets)[torch.randint(0, len(offsets), (count,), generator=g)])


def _direct_render(means, classes, flow, viewmat, K, size, scale=0.12):
    """One view's render of target Gaussians (one-hot non-free class + flow, opacity 1),
    straight through rasterize_gaussians."""
    from voxelsplat.splatting import rasterize_gaussians

    keep = (classes != FREE) & (classes >= 0) & (classes < len(CLASSES))
    channel = classes[keep] - (classes[keep] > FREE).long()
    features = torch.cat([torch.nn.functional.one_hot(channel, len(CLASSES) - 1).float(), flow[keep]], dim=1)
    n = int(keep.sum())
    return rasterize_gaussians(means[keep].float(), torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
                               torch.full((n, 3), scale), torch.ones(n), features, viewmat[None], K[None], *size,
                               near_plane=0.1, far_plane=100.0, backend="torch")


@pytest.mark.parametrize("flip,max_views", [(False, None), (True, None), (False, 4)])
def test_adjacent_gt_target_of_offset_o_views_is_a_render_of_keyframe_t_plus_o(flip, max_views):
    """propagated_targets="adjacent_gt": in the propagated state the target of each view of
    offset o is a direct render of the offset-o points (offset 0: the current GT, unmoved);
    the prediction still moves by flow; the losses pool as before. With flipped cameras and
    with views subsampled (offsets kept aligned with the views)."""
    frame_offsets = torch.tensor([0, 1, -1, 2, 1, 0])
    sample = street_sample(11, dt=(0.05, 0.5, -0.5, 1.0, 0.5, 0.04), num_gaussians=400)
    sample["render_frame_offsets"] = frame_offsets
    sample.update(random_adjacent_points(12, offsets=(1, -1, 2, 3), count=900))  # offset 3: no view shows it
    g = torch.Generator().manual_seed(13)
    head = {"occ_logits": torch.randn(1, len(CLASSES), *SMALL_GRID.shape, generator=g) * 2,
            "flow": torch.randn(1, 2, *SMALL_GRID.shape, generator=g)}
    regularizer = make_regularizer(propagated_targets="adjacent_gt", flip_render_cameras=flip, max_views=max_views,
                                   propagation_seconds=None, loss_weights={"semantic": 1.0, "depth": 1.0, "flow": 1.0})
    torch.manual_seed(0)
    losses = regularizer([sample], head, flow_loss_enabled=True)
    torch.manual_seed(0)  # the same views as the forward pass drew
    fields = regularizer.sample_inputs(sample, torch.device("cpu"))
    all_viewmats = sample["render_viewmats"] * (torch.tensor([1.0, -1.0, -1.0, 1.0])[:, None] if flip else 1.0)
    kept = [int((viewmat == all_viewmats).flatten(1).all(1).nonzero()) for viewmat in fields["viewmats"]]
    assert len(kept) == (max_views or 6)
    assert fields["frame_offsets"].tolist() == frame_offsets[kept].tolist()
    gt = regularizer.gt_gaussians(sample, fields["indices"])
    target = regularizer.target_render(gt, fields, propagated=True)
    moved = regularizer.render(gt, fields, regularizer.flow_displacement(gt["flow"], fields["time_offsets"]))
    index = sample["gaussian_voxel_indices"]
    current = (torch.from_numpy(SMALL_GRID.index_to_center(index.numpy())), sample["occ_semantics"][tuple(index.T)],
               sample["occ_flow"][tuple(index.T)])
    size = sample["render_image_size"]
    references = []
    for v, offset in enumerate(fields["frame_offsets"].tolist()):
        of_offset = sample["adjacent_gt_frame_offsets"] == offset
        points = current if offset == 0 else \
            tuple(sample[f"adjacent_gt_{k}"][of_offset] for k in ("means", "classes", "flow"))
        reference = _direct_render(*points, fields["viewmats"][v], fields["intrinsics"][v], size)
        references.append(reference)
        for got, want in zip(target, reference):
            torch.testing.assert_close(got[v], want[0], rtol=1e-4, atol=1e-5)
        assert float(reference[1].max()) > 0.5  # something in view
        if offset != 0:  # not the released target (the current GT moved by flow)
            assert not torch.allclose(target[2][v], moved[2][v], atol=1e-3)
    # pooled losses: current state against the current GT, propagated state against the references
    ids = torch.zeros(len(fields["indices"]), dtype=torch.long)
    pred_g = regularizer.predicted_gaussians({k: gather_voxels(v, ids, fields["indices"]) for k, v in head.items()},
                                             fields["indices"])
    reference = tuple(torch.cat([r[i] for r in references]) for i in range(3))
    pred_move = regularizer.flow_displacement(pred_g["flow"], fields["time_offsets"])
    states = ((regularizer.render(pred_g, fields), regularizer.render(gt, fields)),
              (regularizer.render(pred_g, fields, pred_move), reference))
    k = len(CLASSES) - 1
    sums = {"semantic": [0.0, 0.0], "depth": [0.0, 0.0], "flow": [0.0, 0.0]}
    for pred, want in states:
        foreground = want[2] > 0.1
        log_p = torch.log_softmax(pred[0][foreground][:, :k], -1)
        sums["semantic"][0] += float(-(want[0][foreground][:, :k] * log_p).sum())
        sums["semantic"][1] += int(foreground.sum())
        sums["depth"][0] += float((pred[2] - want[2]).abs().sum())
        sums["depth"][1] += want[2].numel()
        weight = want[0][..., k:].norm(dim=-1) + 0.1
        sums["flow"][0] += float((weight * (pred[0][..., k:] - want[0][..., k:]).abs().sum(-1)).sum())
        sums["flow"][1] += float(weight.sum())
    for name, (numerator, denominator) in sums.items():
        assert float(losses[f"loss_splat_{name}"]) == pytest.approx(numerator / denominator, rel=1e-4)


def test_adjacent_gt_target_rewards_a_prediction_of_the_adjacent_keyframe():
    """The current GT is empty; keyframe t+1 has a car ahead, seen by the t+1 view. A
    prediction of that car (static) matches the adjacent_gt target in the propagated state
    (depth error ~0 there) and is penalised by the released moved_gt target (the empty
    current GT); the current state is the same for both."""
    views = ring_views(2, dt=(0.5, 0.0), width=80, height=48)  # view 0 looks along +x, view 1 along -x
    views["render_frame_offsets"] = torch.tensor([1, 0])
    semantics = torch.full(SMALL_GRID.shape, FREE, dtype=torch.int64)
    car_low = SMALL_GRID.point_to_index(np.array([7.0, -1.0, 0.2]))
    car = torch.from_numpy(np.stack(np.meshgrid(*[np.arange(a, a + n) for a, n in zip(car_low, (10, 5, 4))],
                                                indexing="ij"), -1).reshape(-1, 3))
    g = torch.Generator().manual_seed(5)
    others = torch.stack([torch.randint(0, n, (200,), generator=g) for n in SMALL_GRID.shape], -1)
    others = others[~((others[:, None] == car[None]).all(-1).any(1))]  # empty voxels only
    sample = dict(sample_token="adjacent_car", occ_semantics=semantics, occ_flow=torch.zeros(*SMALL_GRID.shape, 2),
                  gaussian_voxel_indices=torch.cat([car, others]), **views,
                  adjacent_gt_means=torch.from_numpy(SMALL_GRID.index_to_center(car.numpy())).float(),
                  adjacent_gt_classes=torch.full((len(car),), CLASSES.index("car")),
                  adjacent_gt_flow=torch.zeros(len(car), 2),
                  adjacent_gt_frame_offsets=torch.ones(len(car), dtype=torch.long))
    predicted = semantics.clone()
    predicted[tuple(car.T)] = CLASSES.index("car")
    head = matching_head_outputs(dict(sample, occ_semantics=predicted))
    losses, depth_errors = {}, {}
    for targets in ("moved_gt", "adjacent_gt"):
        regularizer = make_regularizer(propagated_targets=targets, propagation_seconds=None)
        losses[targets] = regularizer([sample], head, flow_loss_enabled=True)
        fields = regularizer.sample_inputs(sample, torch.device("cpu"))
        ids = torch.zeros(len(fields["indices"]), dtype=torch.long)
        pred_g = regularizer.predicted_gaussians(
            {k: gather_voxels(v, ids, fields["indices"]) for k, v in head.items()}, fields["indices"])
        pred = regularizer.render(pred_g, fields, regularizer.flow_displacement(pred_g["flow"], fields["time_offsets"]))
        target = regularizer.target_render(regularizer.gt_gaussians(sample, fields["indices"]), fields, propagated=True)
        depth_errors[targets] = float((pred[2] - target[2]).abs().sum())
    assert float(regularizer.last_renders["pred_alphas"][0].max()) > 0.9  # the car is in view 0
    assert depth_errors["moved_gt"] > 100.0
    assert depth_errors["adjacent_gt"] < 1e-3 * depth_errors["moved_gt"]
    assert float(losses["adjacent_gt"]["loss_splat_depth"]) < 0.55 * float(losses["moved_gt"]["loss_splat_depth"])


def test_adjacent_gt_targets_need_the_mapper_fields():
    sample = street_sample(14, dt=(0.0, 0.5))
    head = matching_head_outputs(sample)
    regularizer = make_regularizer(propagated_targets="adjacent_gt")
    with pytest.raises(KeyError, match="street14.*adjacent_gt_means.*adjacent_gt_gaussians"):
        regularizer([sample], head, flow_loss_enabled=True)
    points = random_adjacent_points(15, offsets=(1,), count=20)
    with pytest.raises(ValueError, match="street14.*adjacent GT fields disagree"):
        regularizer([dict(sample, **dict(points, adjacent_gt_flow=points["adjacent_gt_flow"][:5]))], head,
                    flow_loss_enabled=True)
    with pytest.raises(ValueError, match="propagated_targets"):
        make_regularizer(propagated_targets="next_gt")
    # the released targets need none of it
    assert make_regularizer().propagated_targets == "moved_gt"
    make_regularizer()([sample], head, flow_loss_enabled=True)


# --------------------------------------------------------------------------------------------- model + hook
def model_sample(seed):
    """A mapped training sample (voxelsplat.testing) on the full GT grid with the regularizer's
    fields: 6 outward cameras, render views = the same cameras at 1/2 size."""
    return testing.make_sample(OccupancySpec.for_label_set("openocc_v2"), seed, image_size=(176, 64),
                               with_regularizer=True, num_gaussians=1500, render_scale=0.5)


def test_tiny_voxelsplat_config_regularizer_is_training_only():
    """configs/synthetic/voxelsplat_tiny.py: the regularizer changes no eval output, is not
    called at inference, adds no checkpoint entries, and in training adds its losses."""
    from pathlib import Path

    from detectron2.config import LazyConfig, instantiate

    configs = Path(__file__).resolve().parents[1] / "configs" / "synthetic"
    cfg = LazyConfig.load(str(configs / "voxelsplat_tiny.py"))
    assert cfg.dataloader.train.mapper.regularizer.num_gaussians > 0
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    assert isinstance(model.regularizer, GaussianSplatRegularizer)
    baseline_keys = set(instantiate(LazyConfig.load(str(configs / "fbocc_tiny.py")).model).state_dict())
    assert set(model.state_dict()) == baseline_keys
    sample = model_sample(7)
    with mock.patch.object(GaussianSplatRegularizer, "forward", side_effect=AssertionError("called at inference")):
        with torch.no_grad():
            with_regularizer = model([sample])[0]
    regularizer, model.regularizer = model.regularizer, None
    with torch.no_grad():
        without = model([sample])[0]
    for key in without:
        assert torch.equal(without[key], with_regularizer[key]), key
    # in training it adds its losses, and they reach the head
    model.regularizer = regularizer
    model.train()
    losses = model([sample])
    assert {"loss_splat_semantic", "loss_splat_depth", "loss_splat_flow"} <= set(losses)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    (losses["loss_splat_semantic"] + losses["loss_splat_depth"]).backward()
    assert float(model.head.classifier.weight.grad.abs().sum()) > 0


def test_render_image_hook_puts_prediction_and_gt_renders_into_the_event_storage():
    from detectron2.utils.events import EventStorage

    from voxelsplat.engine.render_image_hook import RenderImageHook

    sample = street_sample(8)
    regularizer = make_regularizer(keep_views=2)
    regularizer([sample], matching_head_outputs(sample), flow_loss_enabled=False)
    model = torch.nn.Module()
    model.regularizer = regularizer
    model.class_names = CLASSES
    trainer = mock.Mock(model=model)
    hook = RenderImageHook(period=5, max_views=2)
    hook.trainer = trainer
    with EventStorage(0) as storage:
        trainer.storage = storage
        for iteration in range(10):
            trainer.iter = iteration
            storage.iter = iteration
            hook.after_step()
        images = storage._vis_data
    assert [name for name, _, _ in images] == [hook.name, hook.name]
    _, image, step = images[0]
    assert step == 4
    assert image.shape[0] == 3 and image.dtype == np.float32 and 0.0 <= image.min() and image.max() <= 1.0
    # two views side by side (prediction | GT): the two columns agree for a matching prediction
    width, height = sample["render_image_size"]
    assert image.shape[1] > 2 * height and image.shape[2] > 2 * width
    left = image[:, 4:4 + height, 4:4 + width]
    right = image[:, 4:4 + height, 8 + width:8 + 2 * width]
    # labels cover the top-left corners; compare the lower halves
    assert np.abs(left[:, height // 2:] - right[:, height // 2:]).mean() < 0.02
    assert left[:, height // 2:].std() > 0.05  # not blank
