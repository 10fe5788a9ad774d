"""Lifting: LSS pooling, what the backward projection sees, depth targets and the
temporal warp, each against a slow, direct float64 reference."""
import math

import numpy as np
import pytest
import torch

from voxelsplat.structures import OccupancyGrid
from voxelsplat.modeling.lifting.backward_projection import DepthAwareBackwardProjection
from voxelsplat.modeling.lifting.depth_net import DepthBins, depth_bce_loss, lidar_depth_to_bins
from voxelsplat.modeling.lifting.forward_projection import LSSForwardProjection, voxel_pooling
from voxelsplat.modeling.lifting.temporal_fusion import TemporalVolumeFusion, current_to_past_transform, warp_volume
from voxelsplat.utils.geometry import bda_matrix, make_transform, quaternion_to_matrix, yaw_to_quaternion


def _random_cameras(rng, batch, num_cams, height, width):
    """Cameras on a ring looking outwards (OpenCV axes), with jittered intrinsics; float64."""
    intrinsics = np.zeros((batch, num_cams, 3, 3))
    cam2ego = np.zeros((batch, num_cams, 4, 4))
    for b in range(batch):
        for n in range(num_cams):
            focal = width * rng.uniform(0.5, 0.9)
            intrinsics[b, n] = [[focal, rng.uniform(-2, 2), width / 2 + rng.uniform(-3, 3)],
                                [0, focal * rng.uniform(0.9, 1.1), height / 2 + rng.uniform(-3, 3)], [0, 0, 1]]
            yaw = 2 * math.pi * n / num_cams + rng.uniform(-0.3, 0.3)
            forward = np.array([math.cos(yaw), math.sin(yaw), rng.uniform(-0.1, 0.1)])
            forward /= np.linalg.norm(forward)
            right = np.cross(forward, [0.0, 0.0, 1.0])
            right /= np.linalg.norm(right)
            down = np.cross(forward, right)
            cam2ego[b, n] = make_transform(np.stack([right, down, forward], axis=1),
                                           [rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.5, 1.5)])
    return torch.from_numpy(intrinsics), torch.from_numpy(cam2ego)


def test_lss_pooling_matches_dense_reference():
    rng = np.random.default_rng(0)
    batch, num_cams, channels, height, width, stride = 2, 3, 5, 32, 48, 8
    h, w = height // stride, width // stride
    bins = DepthBins(1.0, 13.0, 1.5)
    grid = OccupancyGrid((-8.0, -8.0, -2.0, 8.0, 8.0, 2.0), 2.0)
    intrinsics, cam2ego = _random_cameras(rng, batch, num_cams, height, width)
    context = torch.from_numpy(rng.normal(size=(batch, num_cams, channels, h, w)))
    depth = torch.from_numpy(rng.random((batch, num_cams, bins.num_bins, h, w))).softmax(2)
    lss = LSSForwardProjection(grid, (bins.start, bins.stop, bins.step))
    volume = lss(context, depth, intrinsics, cam2ego, (height, width))

    expected = np.zeros((batch, channels, *grid.shape))
    hits = 0
    for b in range(batch):
        for n in range(num_cams):
            k_inv = np.linalg.inv(intrinsics[b, n].numpy())
            rotation, translation = cam2ego[b, n, :3, :3].numpy(), cam2ego[b, n, :3, 3].numpy()
            for d in range(bins.num_bins):
                z = bins.start + d * bins.step  # released: the frustum at the bin starts
                for i in range(h):
                    for j in range(w):
                        pixel = np.array([(j + 0.5) * stride, (i + 0.5) * stride, 1.0])
                        point = rotation @ (z * (k_inv @ pixel)) + translation
                        index = np.floor((point - grid.range_min) / grid.voxel_size).astype(int)
                        if np.all(index >= 0) and np.all(index < grid.shape):
                            hits += 1
                            expected[b, :, index[0], index[1], index[2]] += \
                                depth[b, n, d, i, j].item() * context[b, n, :, i, j].numpy()
    assert hits > 100  # the check covers many frustum points
    assert volume.shape == (batch, channels, *grid.shape)
    np.testing.assert_allclose(volume.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_voxel_pooling_gradients_pass_gradcheck():
    gen = torch.Generator().manual_seed(1)
    context = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    depth = torch.rand(11, dtype=torch.float64, generator=gen, requires_grad=True)
    pixel_index = torch.randint(0, 7, (9,), generator=gen)
    depth_index = torch.randperm(11, generator=gen)[:9]
    voxel_index = torch.randint(0, 4, (9,), generator=gen)
    for chunk in (2, 100):  # several chunks and one
        assert torch.autograd.gradcheck(
            lambda c, d: voxel_pooling(c, d, pixel_index, depth_index, voxel_index, 5, chunk=chunk), (context, depth))


def test_backward_projection_attends_only_where_cameras_see():
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    height, width, stride = 32, 48, 8
    grid = OccupancyGrid((-8.0, -8.0, -2.0, 8.0, 8.0, 2.0), 2.0)
    layer = DepthAwareBackwardProjection(8, grid, (1.0, 13.0, 1.5),
                                         num_heads=2, num_points_in_pillar=3, num_offsets=2).double()
    intrinsics, cam2ego = _random_cameras(rng, 1, 1, height, width)  # one camera: part of the BEV unseen
    volume = torch.randn(1, 8, *grid.shape, dtype=torch.float64, requires_grad=True)
    context = torch.randn(1, 1, 8, height // stride, width // stride, dtype=torch.float64, requires_grad=True)
    depth = torch.rand(1, 1, 8, height // stride, width // stride, dtype=torch.float64).softmax(2)
    out = layer(volume, context, depth, intrinsics, cam2ego, (height, width))
    assert out.shape == volume.shape
    # Context reaches exactly the BEV cells whose pillar (3 heights, centres of equal z slabs)
    # projects into the image.
    heights = grid.range_min[2] + (grid.range_max[2] - grid.range_min[2]) * (np.arange(3) + 0.5) / 3
    centres = grid.voxel_centers()[:, :, :1, :].repeat(3, axis=2)  # (X, Y, 3, 3)
    centres[..., 2] = heights
    world2cam = np.linalg.inv(cam2ego[0, 0].numpy())
    cam = centres @ world2cam[:3, :3].T + world2cam[:3, 3]
    pix = cam @ intrinsics[0, 0].numpy().T
    seen = ((cam[..., 2] > 1e-3) & (pix[..., 0] / cam[..., 2] >= 0) & (pix[..., 0] / cam[..., 2] < width)
            & (pix[..., 1] / cam[..., 2] >= 0) & (pix[..., 1] / cam[..., 2] < height)).any(-1)  # (X, Y)
    assert 0 < seen.sum() < seen.size
    mix = torch.randn(8, dtype=torch.float64)  # a plain channel sum after the final LayerNorm is constant
    for x_index in range(grid.shape[0]):
        for y_index in range(grid.shape[1]):
            cell = (out[0, :, x_index, y_index, 0] * mix).sum()
            (grad,) = torch.autograd.grad(cell, context, retain_graph=True)
            reached = grad.abs().sum().item()
            assert (reached > 1e-9) if seen[x_index, y_index] else (reached == 0), (x_index, y_index)


def test_lidar_depth_targets_take_nearest_in_range_return_per_patch():
    rng = np.random.default_rng(4)
    bins = DepthBins(2.0, 42.0, 0.5)
    depth = rng.uniform(0.5, 50.0, (2, 16, 24)) * (rng.random((2, 16, 24)) < 0.15)
    depth[0, :4, :4] = 0.0  # an empty patch
    depth[1, 0, 0] = np.nan  # non-finite values are no return
    targets = lidar_depth_to_bins(torch.from_numpy(depth), 4, bins)
    for c in range(2):
        for i in range(4):
            for j in range(6):
                patch = depth[c, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
                # returns outside [2, 42) m are dropped before the nearest one is taken
                in_range = patch[np.isfinite(patch) & (patch >= 2.0) & (patch < 42.0)]
                expected = -1
                if in_range.size:
                    expected = math.floor((in_range.min() - 2.0) / 0.5)
                assert targets[c, i, j].item() == expected
    assert targets[0, 0, 0] == -1 and (targets >= 0).any()


def test_depth_bce_matches_direct_formula():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 6, 3, 4))
    target = rng.integers(-1, 6, (2, 3, 4))
    loss = depth_bce_loss(torch.from_numpy(logits), torch.from_numpy(target))
    total, count = 0.0, 0
    for a in range(2):
        for i in range(3):
            for j in range(4):
                if target[a, i, j] < 0:
                    continue
                prob = np.exp(logits[a, :, i, j]) / np.exp(logits[a, :, i, j]).sum()
                one_hot = np.eye(6)[target[a, i, j]]
                total += -(one_hot * np.log(prob) + (1 - one_hot) * np.log(1 - prob)).sum()
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-9)


def _pose(yaw, x, y):
    return torch.from_numpy(make_transform(quaternion_to_matrix(yaw_to_quaternion(yaw)), [x, y, 0.0]))


@pytest.mark.parametrize("with_bda", [False, True])
def test_temporal_warp_aligns_static_world(with_bda):
    """A static world sampled in two ego frames: warping the past volume gives the current one."""
    grid = OccupancyGrid((-8.0, -8.0, -2.0, 8.0, 8.0, 2.0), 0.5)
    rng = np.random.default_rng(6)
    slope = torch.from_numpy(rng.normal(size=(3, 3)))  # 3 channels, each linear in global xyz
    offset = torch.tensor([1000.0, 500.0, 0.0], dtype=torch.float64)

    def world_volume(ego2global, bda):
        centers = torch.from_numpy(grid.voxel_centers())  # augmented ego frame
        unaugmented = centers @ torch.linalg.inv(bda)[:3, :3].T
        world = unaugmented @ ego2global[:3, :3].T + ego2global[:3, 3]
        return ((world - offset) @ slope.T).permute(3, 0, 1, 2)[None]

    past_pose = _pose(0.3, 1003.0, 498.0)
    current_pose = _pose(0.45, 1004.3, 498.9)
    identity = torch.eye(4, dtype=torch.float64)
    past_bda = torch.from_numpy(bda_matrix(17.0, 1.0, flip_x=True)) if with_bda else identity
    current_bda = torch.from_numpy(bda_matrix(-9.0, 1.0, flip_y=True)) if with_bda else identity
    past, current = world_volume(past_pose, past_bda), world_volume(current_pose, current_bda)
    transform = current_to_past_transform(current_pose[None], current_bda[None], past_pose[None], past_bda[None])
    warped = warp_volume(past, transform, grid)[0]

    # Voxels whose source has all 8 trilinear neighbours inside the past grid are exact.
    centers = torch.from_numpy(grid.voxel_centers())
    source = centers @ transform[0, :3, :3].T + transform[0, :3, 3]
    continuous = (source - torch.from_numpy(grid.range_min)) / grid.voxel_size - 0.5
    interior = ((continuous >= 0) & (continuous <= torch.tensor(grid.shape) - 1)).all(-1)
    assert interior.float().mean() > 0.5
    torch.testing.assert_close(warped.permute(1, 2, 3, 0)[interior], current[0].permute(1, 2, 3, 0)[interior],
                               rtol=0, atol=1e-9)
    assert not torch.allclose(past, current)  # the frames really differ


def test_temporal_fusion_resets_per_slot_at_sequence_start():
    torch.manual_seed(7)
    grid = OccupancyGrid((-4.0, -4.0, -1.0, 4.0, 4.0, 1.0), 1.0)
    fusion = TemporalVolumeFusion(3, 4, 2, grid, time_channels=2).double().eval()
    fresh = TemporalVolumeFusion(3, 4, 2, grid, time_channels=2).double().eval()
    fresh.load_state_dict(fusion.state_dict())
    bda = torch.eye(4, dtype=torch.float64)[None].repeat(2, 1, 1)

    def step(module, volumes, frame, starts):
        poses = torch.stack([_pose(0.1 * frame, 2.0 * frame, 0.0)] * volumes.shape[0])
        return module(volumes, poses, bda[:volumes.shape[0]], [500_000 * frame] * volumes.shape[0], starts,
                      ["scene"] * volumes.shape[0])

    frames = [torch.randn(2, 3, *grid.shape, dtype=torch.float64) for _ in range(3)]
    step(fusion, frames[0], 0, [True, True])
    step(fusion, frames[1], 1, [False, False])
    out = step(fusion, frames[2], 2, [True, False])  # slot 0 restarts, slot 1 continues
    alone = step(fresh, frames[2][:1], 2, [True])
    torch.testing.assert_close(out[:1], alone)
    # Slot 1 used its history: the same input without history gives a different result.
    fresh2 = TemporalVolumeFusion(3, 4, 2, grid, 2).double().eval()
    fresh2.load_state_dict(fusion.state_dict())
    assert not torch.allclose(out[1:], step(fresh2, frames[2][1:], 2, [True]))
    # With history switched off every step behaves like a sequence start.
    fusion.history_enabled = False
    fresh3 = TemporalVolumeFusion(3, 4, 2, grid, 2).double().eval()
    fresh3.load_state_dict(fusion.state_dict())
    torch.testing.assert_close(step(fusion, frames[0], 3, [False, False]), step(fresh3, frames[0], 3, [True, True]))
