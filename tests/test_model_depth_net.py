"""Camera-aware depth net: the released CM_DepthNet structure and widths, the camera-parameter
vector, depth-bin placement and the LiDAR depth loss, each against an independent reference."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from voxelsplat.modeling.lifting.depth_net import (
    CAMERA_PARAMETER_DIM, CameraAwareDepthNet, DepthBins, camera_parameter_vector, depth_bin_values,
    lidar_depth_to_bins,
)

# Release R50 recipe widths: in_channels = _dim_ = 256 (voxelsplat-r50.py:95,140), context_channels =
# numC_Trans = 80 (voxelsplat-r50.py:94,141), depth_channels = 80 (voxelsplat-r50.py:84,144), mid_channels
# left at its default 512 (depth_net.py:261), use_dcn=False (voxelsplat-r50.py:147), use_aspp default True
# (depth_net.py:271). Files: occupancy_configs/voxelsplat/voxelsplat-r50.py and
# mmdet3d/models/fbbev/modules/depth_net.py of ZZY816/VoxelSplat.
IN, MID, CTX, D, CAM = 256, 512, 80, 80, 27
# depth_net.py:279-284  reduce_conv: Conv2d(IN, MID, 3) with bias + BatchNorm2d(MID)
REDUCE = IN * MID * 9 + MID + 2 * MID                                  # 1,181,184
# depth_net.py:288-289  context_conv: Conv2d(MID, CTX, 1) with bias
CONTEXT_CONV = MID * CTX + CTX                                         # 41,040
# depth_net.py:290      bn: BatchNorm1d(27)
CAMERA_BN = 2 * CAM                                                    # 54
# depth_net.py:291,293 with Mlp at 208-232: Linear(27, MID) + Linear(MID, MID), one per branch
MLP = (CAM * MID + MID) + (MID * MID + MID)                            # 276,992
# depth_net.py:292,294 with SELayer at 235-249: two Conv2d(MID, MID, 1) with bias, one per branch
SE = 2 * (MID * MID + MID)                                             # 525,312
# depth_net.py:298-303  three mmdet BasicBlocks (MID -> MID, no downsample): two bias-free 3x3 convs + 2 BN
BASIC_BLOCK = 2 * (MID * MID * 9) + 2 * (2 * MID)                      # 4,720,640
# depth_net.py:304-305 with ASPP at 133-205 (_ASPPModule at 99-130): ASPP(MID, MID), all convs bias-free:
# 1x1 branch + three dilated 3x3 branches + pooled 1x1 branch, each with BN; 5*MID -> MID 1x1 + BN
ASPP = (MID * MID + 2 * MID) + 3 * (MID * MID * 9 + 2 * MID) + (MID * MID + 2 * MID) \
    + (5 * MID * MID + 2 * MID)                                        # 8,919,040
# depth_net.py:318-324  final Conv2d(MID, D, 1) with bias
DEPTH_CONV = MID * D + D                                               # 41,040
RELEASE_PARAMETERS = REDUCE + CONTEXT_CONV + CAMERA_BN + 2 * MLP + 2 * SE + 3 * BASIC_BLOCK + ASPP + DEPTH_CONV
assert RELEASE_PARAMETERS == 25_948_886


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_release_widths_match_the_hand_derived_parameter_count():
    net = CameraAwareDepthNet(IN)
    assert _count(net) == RELEASE_PARAMETERS
    # the parts, so a mismatch names its place
    assert _count(net.reduce) == REDUCE and _count(net.context_out) == CONTEXT_CONV
    assert _count(net.camera_norm) == CAMERA_BN
    assert _count(net.depth_mlp) == _count(net.context_mlp) == MLP
    assert _count(net.depth_se) == _count(net.context_se) == SE
    assert [_count(m) for m in net.depth_branch] == [BASIC_BLOCK] * 3 + [ASPP, DEPTH_CONV]
    assert net.num_bins == D and net.context_channels == CTX


def test_release_widths_forward_shapes():
    net = CameraAwareDepthNet(IN).eval()
    features = torch.randn(3, IN, 4, 11)
    camera = torch.randn(3, CAMERA_PARAMETER_DIM)
    with torch.no_grad():
        depth_logits, context = net(features, camera)
    assert depth_logits.shape == (3, D, 4, 11) and context.shape == (3, CTX, 4, 11)
    assert torch.isfinite(depth_logits).all() and torch.isfinite(context).all()


def test_small_widths_and_aspp_width_key():
    # the tiny synthetic config's keys: the ASPP follows mid_channels unless aspp_channels is given
    net = CameraAwareDepthNet(64, mid_channels=64, context_channels=32, depth_bins=(2.0, 42.0, 2.0), num_depth_blocks=1)
    aspp = net.depth_branch[1]
    assert aspp.fuse[0].out_channels == 64 and net.depth_branch[2].in_channels == 64
    net = CameraAwareDepthNet(64, mid_channels=64, context_channels=32, depth_bins=(2.0, 42.0, 2.0),
                              num_depth_blocks=1, aspp_channels=16)
    assert net.depth_branch[1].fuse[0].out_channels == 16 and net.depth_branch[2].in_channels == 16
    depth_logits, context = net(torch.randn(2, 64, 3, 5), torch.randn(2, CAMERA_PARAMETER_DIM))
    assert depth_logits.shape == (2, 20, 3, 5) and context.shape == (2, 32, 3, 5)
    net = CameraAwareDepthNet(8, mid_channels=8, context_channels=4, num_depth_blocks=0, use_aspp=False)
    assert len(net.depth_branch) == 1


def _randomize_norms(net, gen):
    for module in net.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen, dtype=torch.float64))
            module.running_var.copy_(torch.rand(module.num_features, generator=gen, dtype=torch.float64) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=gen, dtype=torch.float64) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=gen, dtype=torch.float64) * 0.1)


def _release_reference(net, x, camera_params):
    """CM_DepthNet.forward (depth_net.py:329-360, eval mode) written out with functional ops."""
    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    def mlp(m, v):
        return F.linear(F.relu(F.linear(v, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)

    def se(m, t, v):
        v = F.relu(F.conv2d(v[..., None, None], m.reduce.weight, m.reduce.bias))
        v = F.conv2d(v, m.expand.weight, m.expand.bias)
        return t * torch.sigmoid(v)

    camera = bn(camera_params, net.camera_norm)
    conv, norm = net.reduce[0], net.reduce[1]
    trunk = F.relu(bn(F.conv2d(x, conv.weight, conv.bias, padding=1), norm))
    context = F.conv2d(se(net.context_se, trunk, mlp(net.context_mlp, camera)), net.context_out.weight,
                       net.context_out.bias)
    depth = se(net.depth_se, trunk, mlp(net.depth_mlp, camera))
    *blocks, aspp, classifier = list(net.depth_branch)
    for block in blocks:
        out = F.relu(bn(F.conv2d(depth, block.conv1.weight, padding=1), block.bn1))
        depth = F.relu(bn(F.conv2d(out, block.conv2.weight, padding=1), block.bn2) + depth)
    pyramid = []
    for branch, dilation in zip(aspp.branches, (1, 6, 12, 18)):
        pad = 0 if dilation == 1 else dilation
        pyramid.append(F.relu(bn(F.conv2d(depth, branch[0].weight, padding=pad, dilation=dilation), branch[1])))
    pooled = F.adaptive_avg_pool2d(depth, 1)
    pooled = F.relu(bn(F.conv2d(pooled, aspp.image_pool[0].weight), aspp.image_pool[1]))
    pyramid.append(F.interpolate(pooled, size=depth.shape[-2:], mode="bilinear", align_corners=True))
    depth = F.relu(bn(F.conv2d(torch.cat(pyramid, 1), aspp.fuse[0].weight), aspp.fuse[1]))
    depth = F.conv2d(depth, classifier.weight, classifier.bias)
    return depth, context


def test_forward_matches_release_definition_written_out():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = CameraAwareDepthNet(16, mid_channels=24, context_channels=8, depth_bins=(2.0, 42.0, 4.0)).double()
    with torch.no_grad():
        _randomize_norms(net, gen)
    net.eval()
    x = torch.randn(4, 16, 7, 9, generator=gen, dtype=torch.float64)
    camera = torch.randn(4, CAMERA_PARAMETER_DIM, generator=gen, dtype=torch.float64) * 3.0
    depth_logits, context = net(x, camera)
    ref_depth, ref_context = _release_reference(net, x, camera)
    torch.testing.assert_close(depth_logits, ref_depth, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(context, ref_context, rtol=1e-10, atol=1e-10)
    # the two gates come from separate MLPs: changing the depth MLP leaves the context unchanged
    with torch.no_grad():
        net.depth_mlp.fc2.bias.add_(1.0)
    depth_changed, context_same = net(x, camera)
    torch.testing.assert_close(context_same, context)
    assert not torch.allclose(depth_changed, depth_logits)


def test_camera_batch_norm_makes_training_output_independent_of_parameter_units():
    torch.manual_seed(1)
    net = CameraAwareDepthNet(8, mid_channels=8, context_channels=4, depth_bins=(2.0, 42.0, 4.0), num_depth_blocks=1,
                              aspp_dropout=0.0).double().train()
    x = torch.randn(6, 8, 4, 5, dtype=torch.float64)
    camera = torch.randn(6, CAMERA_PARAMETER_DIM, dtype=torch.float64)
    scale = torch.rand(CAMERA_PARAMETER_DIM, dtype=torch.float64) * 100 + 0.01
    shift = torch.randn(CAMERA_PARAMETER_DIM, dtype=torch.float64) * 50
    out_a = net(x, camera)
    out_b = net(x, camera * scale + shift)
    for a, b in zip(out_a, out_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(2)
    x = torch.randn(4, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    camera = torch.randn(4, CAMERA_PARAMETER_DIM, dtype=torch.float64)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(3)
        net = CameraAwareDepthNet(8, mid_channels=8, context_channels=4, depth_bins=(2.0, 42.0, 4.0),
                                  grad_checkpointing=checkpointing).double().train()
        torch.manual_seed(4)  # the same ASPP dropout mask
        depth_logits, context = net(x, camera)
        (depth_logits.square().sum() + context.sum()).backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in net.parameters()])
        x.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def _rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_camera_parameter_vector_matches_release_formula():
    """The release's get_mlp_input (depth_net.py:363-387) on the un-augmented inputs of its
    loader (loading.py get_inputs: raw intrinsics, post_rot/post_tran, sensor2keyego, bda)."""
    rng = np.random.default_rng(6)
    b, n = 2, 3
    raw_k = np.zeros((b, n, 3, 3))
    raw_k[..., 0, 0], raw_k[..., 1, 1] = rng.uniform(800, 1600, (b, n)), rng.uniform(800, 1600, (b, n))
    raw_k[..., 0, 2], raw_k[..., 1, 2] = rng.uniform(700, 900, (b, n)), rng.uniform(400, 500, (b, n))
    raw_k[..., 2, 2] = 1.0
    post_rot = np.zeros((b, n, 2, 2))
    post_tran = rng.uniform(-300, 300, (b, n, 2))
    sensor2ego = np.tile(np.eye(4), (b, n, 1, 1))
    for i in range(b):
        for j in range(n):
            angle, scale = rng.uniform(-0.1, 0.1), rng.uniform(0.4, 0.5)
            flip = np.diag([rng.choice([-1.0, 1.0]), 1.0])
            rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            post_rot[i, j] = flip @ (scale * rotation)
            sensor2ego[i, j, :3, :3] = _rotation(rng)
            sensor2ego[i, j, :3, 3] = rng.normal(size=3)
    bda = np.tile(np.eye(4), (b, 1, 1))
    for i in range(b):
        angle = rng.uniform(-0.4, 0.4)
        rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        bda[i, :3, :3] = np.diag([rng.choice([-1.0, 1.0]), rng.choice([-1.0, 1.0]), 1.0]) @ rot
    img_aug = np.tile(np.eye(3), (b, n, 1, 1))
    img_aug[..., :2, :2], img_aug[..., :2, 2] = post_rot, post_tran
    # our sample fields: intrinsics = img_aug @ K, cam2ego = bda @ sensor2ego
    intrinsics = img_aug @ raw_k
    cam2ego = bda[:, None] @ sensor2ego
    vector = camera_parameter_vector(*(torch.from_numpy(a) for a in (intrinsics, img_aug, cam2ego, bda)))
    assert vector.shape == (b, n, CAMERA_PARAMETER_DIM) == (b, n, 27) and vector.dtype == torch.float64
    for i in range(b):
        for j in range(n):
            k, pr, pt, r = raw_k[i, j], post_rot[i, j], post_tran[i, j], bda[i, :3, :3]
            expected = [k[0, 0], k[1, 1], k[0, 2], k[1, 2],
                        pr[0, 0], pr[0, 1], pt[0], pr[1, 0], pr[1, 1], pt[1],
                        r[0, 0], r[0, 1], r[1, 0], r[1, 1], r[2, 2]]
            expected += [sensor2ego[i, j, row, col] for row in range(3) for col in range(4)]
            np.testing.assert_allclose(vector[i, j].numpy(), expected, rtol=1e-9, atol=1e-9)
    # float32 inputs keep their dtype; the (B, N) layout flattens to the net's (M, 27)
    vector32 = camera_parameter_vector(*(torch.from_numpy(a).float() for a in (intrinsics, img_aug, cam2ego, bda)))
    assert vector32.dtype == torch.float32
    torch.testing.assert_close(vector32.double(), vector, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="camera_parameter_vector: bda"):
        camera_parameter_vector(*(torch.from_numpy(a) for a in (intrinsics, img_aug, cam2ego, bda[:, :3, :3])))


def test_frustum_depths_sit_at_bin_starts():
    bins = DepthBins.from_config((2.0, 42.0, 0.5))
    # the release's frustum: torch.arange(*grid_config['depth']) (forward_projection/view_transformer.py:100)
    release = torch.arange(2.0, 42.0, 0.5, dtype=torch.float64)
    torch.testing.assert_close(depth_bin_values((2.0, 42.0, 0.5), dtype=torch.float64), release)
    torch.testing.assert_close(depth_bin_values(bins, "start", dtype=torch.float64), release)
    torch.testing.assert_close(bins.starts(dtype=torch.float64), release)
    torch.testing.assert_close(depth_bin_values(bins, "center", dtype=torch.float64), release + 0.25)
    assert bins.num_bins == 80
    with pytest.raises(ValueError, match="bin_position"):
        depth_bin_values(bins, "middle")
    # the release's depth lookup at a backward-projection reference point:
    # clip(floor((d - start) / step), 0, D - 1) (spatial_cross_attention_depth.py:191-192)
    depth = torch.from_numpy(np.random.default_rng(7).uniform(-5.0, 60.0, 1000))
    expected = torch.clip(torch.floor((depth - 2.0) / 0.5), 0, 79).long()
    assert torch.equal(bins.clamped_index(depth), expected)


def _release_depth_loss(depth_logits, lidar_depth, stride, bounds):
    """The release: the loader keeps returns with start <= d < stop (loading.py:1046-1070), then
    get_downsampled_gt_depth + get_depth_loss (depth_net.py:390-444) on softmax probabilities."""
    start, stop, step = bounds
    num_bins = depth_logits.shape[1]
    depth = torch.where((lidar_depth >= start) & (lidar_depth < stop), lidar_depth, torch.zeros_like(lidar_depth))
    m, height, width = depth.shape
    patches = depth.view(m, height // stride, stride, width // stride, stride, 1).permute(0, 1, 3, 5, 2, 4)
    patches = patches.reshape(-1, stride * stride)
    nearest = torch.where(patches == 0.0, torch.full_like(patches, 1e5), patches).min(-1).values
    label = (nearest - (start - step)) / step
    label = torch.where((label < num_bins + 1) & (label >= 0.0), label, torch.zeros_like(label))
    one_hot = F.one_hot(label.long(), num_bins + 1)[:, 1:].double()
    probs = depth_logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, num_bins)
    foreground = one_hot.max(1).values > 0
    bce = F.binary_cross_entropy(probs[foreground], one_hot[foreground], reduction="none").sum()
    return bce / max(1.0, float(foreground.sum()))


def test_depth_loss_matches_release_targets_and_bce():
    rng = np.random.default_rng(8)
    bounds = (2.0, 42.0, 0.5)
    net = CameraAwareDepthNet(8, mid_channels=8, context_channels=4, depth_bins=bounds, num_depth_blocks=0,
                              use_aspp=False)
    m, stride, h, w = 3, 16, 4, 6
    lidar = rng.uniform(0.5, 50.0, (m, h * stride, w * stride)) * (rng.random((m, h * stride, w * stride)) < 0.02)
    # a near return (< 2 m) and a far one (>= 42 m) beside an in-range one: the in-range one is the target
    lidar[0, :stride, :stride] = 0.0
    lidar[0, 1, 1], lidar[0, 5, 7], lidar[0, 9, 2] = 1.2, 17.3, 45.0
    lidar[1, :stride, :stride] = 0.0  # an empty patch
    lidar = torch.from_numpy(lidar)
    logits = torch.from_numpy(rng.normal(size=(m, 80, h, w)))
    loss = net.loss(logits, lidar)
    torch.testing.assert_close(loss, _release_depth_loss(logits, lidar, stride, bounds).to(loss.dtype))
    targets = lidar_depth_to_bins(lidar, stride, net.bins)
    assert targets[0, 0, 0] == math.floor((17.3 - 2.0) / 0.5) and targets[1, 0, 0] == -1
    with pytest.raises(ValueError, match="CameraAwareDepthNet: lidar_depth"):
        net.loss(logits, lidar[..., :-3])


def test_bad_arguments_name_the_module_and_argument():
    with pytest.raises(ValueError, match="CameraAwareDepthNet: mid_channels"):
        CameraAwareDepthNet(8, mid_channels=0)
    with pytest.raises(ValueError, match="CameraAwareDepthNet: aspp_dropout"):
        CameraAwareDepthNet(8, mid_channels=8, aspp_dropout=1.0)
    with pytest.raises(ValueError, match="CameraAwareDepthNet: num_depth_blocks"):
        CameraAwareDepthNet(8, mid_channels=8, num_depth_blocks=-1)
    with pytest.raises(ValueError, match="DepthBins: depth_bins"):
        CameraAwareDepthNet(8, mid_channels=8, depth_bins=(42.0, 2.0, 0.5))
    net = CameraAwareDepthNet(8, mid_channels=8, context_channels=4)
    with pytest.raises(ValueError, match="CameraAwareDepthNet: camera_params"):
        net(torch.randn(2, 8, 3, 3), torch.randn(2, 31))
    with pytest.raises(ValueError, match="CameraAwareDepthNet: features"):
        net(torch.randn(2, 6, 3, 3), torch.randn(2, CAMERA_PARAMETER_DIM))
    with pytest.raises(ValueError, match="CameraAwareDepthNet: camera_params needs more than one camera"):
        net(torch.randn(1, 8, 3, 3), torch.randn(1, CAMERA_PARAMETER_DIM))
