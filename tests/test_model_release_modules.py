"""FB-Occ's temporal fusion, 3D voxel encoder and occupancy/flow head at the released
structure: parameter counts derived by hand from the released definitions, and each
module against a direct recomputation on random inputs (float64)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from voxelsplat.structures import DEFAULT_GRID, OccupancyGrid, OccupancySpec
from voxelsplat.modeling.heads import OccFlowHead
from voxelsplat.modeling.lifting.temporal_fusion import TemporalVolumeFusion, current_to_past_transform, warp_volume
from voxelsplat.modeling.voxel_encoder import FPN3D, ResNet3D, ResNet3DFPN
from voxelsplat.utils.geometry import bda_matrix, make_transform, quaternion_to_matrix, yaw_to_quaternion

# Release files (ZZY816/VoxelSplat): VC = occupancy_configs/voxelsplat/voxelsplat-r50.py,
# DET = mmdet3d/models/fbbev/detectors/fbocc.py, R3D = mmdet3d/models/fbbev/modules/resnet3d.py,
# FPN = mmdet3d/models/fbbev/modules/fpn3d.py, HD = mmdet3d/models/fbbev/heads/occ_flow_head.py.
RELEASE_VOLUME = DEFAULT_GRID.coarsened(2)  # the release's 100 x 100 x 8 volume at 0.8 m
OPENOCC = OccupancySpec.for_label_set("openocc_v2")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bn(channels: int) -> int:
    return 2 * channels  # weight + bias


def _randomize_norms(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            shape = m.running_mean.shape
            with torch.no_grad():
                m.weight.copy_(torch.rand(shape, generator=generator, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(shape, generator=generator, dtype=torch.float64) * 0.3)
                m.running_mean.copy_(torch.randn(shape, generator=generator, dtype=torch.float64) * 0.3)
                m.running_var.copy_(torch.rand(shape, generator=generator, dtype=torch.float64) + 0.5)


def _norm(x, bn: nn.BatchNorm3d, training: bool):
    if training:  # batch statistics over every dimension but the channels, biased variance
        dims = [0] + list(range(2, x.dim()))
        mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    else:
        mean, var = bn.running_mean.view(1, -1, 1, 1, 1), bn.running_var.view(1, -1, 1, 1, 1)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1, 1) + bn.bias.view(1, -1, 1, 1, 1)


# ---------------------------------------------------------------------------- parameter counts
def test_release_widths_have_the_released_parameter_counts():
    c, frames = 80, 16 + 1  # VC:94 numC_Trans = 80; VC:33 history_cat_num = 16, plus the current frame
    fusion = TemporalVolumeFusion(c, c, 16, RELEASE_VOLUME)
    expected_fusion = (
        (c + 1) * c + c + _bn(c)          # DET:110-117 conv (bias: nn.Conv3d default) 81->80 + SyncBN (+ReLU)
        + frames * c * c + c + _bn(c)     # DET:119-126 conv 1360->80 (VC:111-118 never passes
    )                                     # history_cat_conv_out_channels, so DET:105-107 gives 80) + SyncBN
    assert _count(fusion) == expected_fusion == 115_760

    def block(cin, cout, stride):  # R3D:46-99 BasicBlock; R3D:18-30 every 3x3x3 conv has a bias (BIAS = True)
        params = cin * cout * 27 + cout + _bn(cout) + cout * cout * 27 + cout + _bn(cout)
        if stride != 1 or cin != cout:  # R3D:224-233 downsample: 1x1x1 conv (bias, R3D:33-43) + norm
            params += cin * cout + cout + _bn(cout)
        return params

    backbone = ResNet3D(c)  # VC:214-223 depth 18 -> [2, 2, 2] (R3D:160), block_inplanes (64, 128, 256), strides 1, 2, 2
    expected_backbone = (
        c * 64 + _bn(64)                                   # R3D:188-193 input_proj: 1x1x1 conv, no bias, + norm + ReLU
        + block(64, 64, 1) + block(64, 64, 1)              # stage 1 (R3D:236-245)
        + block(64, 128, 2) + block(128, 128, 1)           # stage 2
        + block(128, 256, 2) + block(256, 256, 1)          # stage 3
    )
    assert _count(backbone) == expected_backbone == 8_236_544

    fpn = FPN3D((64, 128, 256), 256)  # VC:224-230
    expected_fpn = sum(cin * 256 + _bn(256) for cin in (64, 128, 256))  # FPN:51-57 lateral 1x1x1, bias=False
    expected_fpn += 3 * (256 * 256 * 27 + _bn(256))                      # FPN:59-65 one 3x3x3 output conv per level
    assert _count(fpn) == expected_fpn == 5_426_176
    assert _count(ResNet3DFPN(c)) == expected_backbone + expected_fpn

    head = OccFlowHead(256, spec=OPENOCC)  # VC:231-242: 3 levels of 256, 17 classes
    mid, hidden, parts = 128, 64, 3 + 1  # HD:81 in // 2; HD:93 mid // 2; HD:108 levels + the deconvolution
    expected_head = (
        256 * mid * 8 + _bn(mid)                     # HD:134-146 deconv 2x2x2 stride 2, bias=False + norm + ReLU
        + 3 * (256 * mid * 27 + _bn(mid))            # HD:79-87 one 3x3x3 conv per level (conv_cfg bias=False, HD:26)
        + mid * hidden + _bn(hidden) + hidden * 17   # HD:91-97 occupancy 1x1x1 -> norm -> ReLU -> 1x1x1
        + mid * hidden + _bn(hidden) + hidden * 2    # HD:99-105 flow 1x1x1 -> norm -> Softplus -> 1x1x1
        + mid * hidden + _bn(hidden) + hidden * parts  # HD:109-117 soft weights 1x1x1 -> norm -> ReLU -> 1x1x1
    )
    assert _count(head) == expected_head == 2_943_808
    assert head.feature_channels == mid and head.num_levels == 3

    # Initialisation: Kaiming-normal (fan_out, ReLU) in the encoder (R3D:200-208; mmcv ConvModule
    # for FPN:51-65), PyTorch's defaults in the head (no init_weights there).
    for conv, fan_out in ((backbone.stages[2][1].conv2, 256 * 27), (fpn.output[2][0], 256 * 27)):
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.02)
    default_bound = 1.0 / math.sqrt(hidden)  # kaiming_uniform(a=sqrt(5)) bound for fan_in = 64
    flow_out = head.flow_mlp[-1].weight
    assert flow_out.abs().max().item() <= default_bound and flow_out.std().item() > 0.3 * default_bound


# ---------------------------------------------------------------------------- temporal fusion
def _pose(yaw, x, y, z=0.0):
    return torch.from_numpy(make_transform(quaternion_to_matrix(yaw_to_quaternion(yaw)), [x, y, z]))


def _fusion_reference(module, volumes, poses, bdas, times, starts, slot, step):
    """Direct FB-Occ fusion for one slot at ``step``: the queue holds each past volume carried
    frame to frame by ego-motion (warped once per step), the first frame of the sequence
    repeated where the sequence is shorter than the queue; the time channel is each frame's
    age; the shared 1x1x1 conv runs on the explicit concatenation [volume; age]."""
    start = max(s for s in range(step + 1) if starts[s][slot])
    frames, ages = [volumes[step][slot]], [0.0]
    for t in range(1, module.num_history + 1):
        source = max(step - t, start)
        carried = volumes[source][slot][None]
        for m in range(source + 1, step + 1):
            transform = current_to_past_transform(poses[m][slot], bdas[m][slot], poses[m - 1][slot],
                                                  bdas[m - 1][slot])
            carried = warp_volume(carried, transform[None], module.grid)
        frames.append(carried[0])
        ages.append(times[step][slot] - times[source][slot])
    return frames, ages


def _fused_reference(module, frames, ages, training):
    """frames: per slot, a list of (C, X, Y, Z); ages: per slot, a list of seconds."""
    conv, bn, _ = module.time_conv
    embedded = []
    for slot_frames, slot_ages in zip(frames, ages):
        for frame, age in zip(slot_frames, slot_ages):
            with_time = torch.cat([frame, torch.full_like(frame[:1], age)])[None]
            embedded.append(F.conv3d(with_time, conv.weight, conv.bias))
    embedded = torch.relu(_norm(torch.cat(embedded), bn, training))  # (B * T, C, ...)
    stacked = embedded.view(len(frames), -1, *embedded.shape[2:])     # frames concatenated, current first
    cat_conv, cat_bn, _ = module.cat_conv
    return torch.relu(_norm(F.conv3d(stacked, cat_conv.weight, cat_conv.bias), cat_bn, training))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("frame_interval", [0.5, None])
def test_temporal_fusion_matches_direct_recomputation_with_rewarping_each_step(training, frame_interval):
    grid = OccupancyGrid((-4.0, -4.0, -2.0, 4.0, 4.0, 2.0), 1.0)
    gen = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    module = TemporalVolumeFusion(3, 5, 3, grid,
                                  frame_interval=frame_interval).double()
    _randomize_norms(module, gen)
    module.train(training)
    steps, batch = 6, 2
    # slot 0: one sequence; slot 1 restarts at step 3 (shorter than the queue at steps 3-4)
    starts = [[s == 0, s in (0, 3)] for s in range(steps)]
    volumes = [torch.randn(batch, 3, *grid.shape, generator=gen, dtype=torch.float64) for _ in range(steps)]
    poses = [[_pose(0.09 * s + 0.05 * b + rng.normal(0, 0.02), 0.7 * s + rng.normal(0, 0.2), 0.3 * s * (b - 0.5))
              for b in range(batch)] for s in range(steps)]
    bdas = [[torch.from_numpy(bda_matrix(rng.uniform(-20, 20), 1.0, bool(rng.random() < 0.5), bool(rng.random() < 0.5)))
             for _ in range(batch)] for _ in range(steps)]
    # irregular timestamps: ages from timestamps differ from steps x 0.5 s
    stamps = [[int(1e6 * (0.5 * s + 0.13 * s * s + 0.07 * b)) for b in range(batch)] for s in range(steps)]
    for step in range(steps):
        out = module(volumes[step], torch.stack(poses[step]), torch.stack(bdas[step]), stamps[step],
                     starts[step], ["scene0", "scene1"])
        times = [[(0.5 * s if frame_interval else stamps[s][b] * 1e-6) for b in range(batch)] for s in range(steps)]
        per_slot = [_fusion_reference(module, volumes, poses, bdas, times, starts, b, step) for b in range(batch)]
        expected = _fused_reference(module, [f for f, _ in per_slot], [a for _, a in per_slot], training)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
        if step == 4 and frame_interval:
            # ages in steps x 0.5 s; slot 1 is 1 step into its sequence: its first frame fills the queue
            assert per_slot[0][1] == [0.0, 0.5, 1.0, 1.5] and per_slot[1][1] == [0.0, 0.5, 0.5, 0.5]

    # The discriminating case: warping each stored volume once from its own frame differs.
    step, slot = steps - 1, 0
    frames, ages = _fusion_reference(module, volumes, poses, bdas, times, starts, slot, step)
    once = [volumes[step][slot]] + [
        warp_volume(volumes[step - t][slot][None], current_to_past_transform(
            poses[step][slot], bdas[step][slot], poses[step - t][slot], bdas[step - t][slot])[None], module.grid)[0]
        for t in range(1, 4)]
    assert (frames[3] - once[3]).abs().max() > 0.1
    if not training:
        warped_once = _fused_reference(module, [once], [ages], training)
        assert (warped_once - out[slot:slot + 1]).abs().max() > 1e-3


def test_temporal_fusion_rejects_bad_arguments():
    with pytest.raises(ValueError, match="TemporalVolumeFusion: num_history"):
        TemporalVolumeFusion(8, 8, -1, RELEASE_VOLUME)
    with pytest.raises(ValueError, match="TemporalVolumeFusion: frame_interval"):
        TemporalVolumeFusion(8, 8, 2, RELEASE_VOLUME, frame_interval=0.0)
    module = TemporalVolumeFusion(4, None, 1, OccupancyGrid((-2.0, -2.0, -1.0, 2.0, 2.0, 1.0), 1.0))
    assert module.out_channels == 4
    with pytest.raises(ValueError, match="TemporalVolumeFusion: volume"):
        module(torch.zeros(1, 3, 4, 4, 2), torch.eye(4)[None].double(), torch.eye(4)[None], [0], [True])


# ---------------------------------------------------------------------------- voxel encoder
def _conv_norm_relu(x, seq, training, padding=0):
    conv, bn, _ = seq
    return torch.relu(_norm(F.conv3d(x, conv.weight, conv.bias, padding=padding), bn, training))


@pytest.mark.parametrize("shape", [(12, 12, 4), (13, 11, 5)])
def test_voxel_encoder_returns_three_fpn_levels_against_a_direct_formula(shape):
    gen = torch.Generator().manual_seed(5)
    encoder = ResNet3DFPN(6, stage_channels=(4, 6, 8), stage_blocks=(2, 1, 1), out_channels=5).double()
    _randomize_norms(encoder, gen)
    encoder.eval()
    volume = torch.randn(2, 6, *shape, generator=gen, dtype=torch.float64)
    levels = encoder(volume)

    sizes = [tuple(shape)]
    for _ in range(2):
        sizes.append(tuple((s + 1) // 2 for s in sizes[-1]))  # 3x3x3, stride 2, padding 1
    assert [tuple(level.shape) for level in levels] == [(2, 5, *s) for s in sizes]

    # ResNet: input projection, then basic blocks out = ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x)).
    backbone = encoder.backbone
    x = _conv_norm_relu(volume, backbone.input_proj, False)
    stage_outputs = []
    for stage in backbone.stages:
        for block in stage:
            stride = block.conv1.stride
            hidden = torch.relu(_norm(F.conv3d(x, block.conv1.weight, block.conv1.bias, stride, 1), block.bn1, False))
            out = _norm(F.conv3d(hidden, block.conv2.weight, block.conv2.bias, 1, 1), block.bn2, False)
            if isinstance(block.shortcut, nn.Identity):
                shortcut = x
            else:
                conv, bn = block.shortcut
                shortcut = _norm(F.conv3d(x, conv.weight, conv.bias, stride), bn, False)
            x = torch.relu(out + shortcut)
        stage_outputs.append(x)
    # FPN: laterals, coarse-to-fine trilinear sums of the merged levels, one 3x3x3 output per level.
    fpn = encoder.fpn
    merged = [_conv_norm_relu(s, lateral, False) for s, lateral in zip(stage_outputs, fpn.lateral)]
    merged[1] = merged[1] + F.interpolate(merged[2], size=merged[1].shape[2:], mode="trilinear", align_corners=False)
    merged[0] = merged[0] + F.interpolate(merged[1], size=merged[0].shape[2:], mode="trilinear", align_corners=False)
    expected = [_conv_norm_relu(m, output, False, padding=1) for m, output in zip(merged, fpn.output)]
    for level, reference in zip(levels, expected):
        torch.testing.assert_close(level, reference, rtol=1e-10, atol=1e-10)


def test_voxel_encoder_checkpointing_changes_nothing_and_bad_widths_are_rejected():
    torch.manual_seed(2)
    plain = ResNet3DFPN(4, (4, 6, 8), (1, 1, 1), out_channels=4).double().train()
    checkpointed = ResNet3DFPN(4, (4, 6, 8), (1, 1, 1), out_channels=4, grad_checkpointing=True).double().train()
    checkpointed.load_state_dict(plain.state_dict())
    volume = torch.randn(2, 4, 8, 8, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for module in (plain, checkpointed):
        outputs = module(volume)
        sum((o * torch.linspace(0, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outputs).backward()
        grads.append((outputs, volume.grad.clone(), module.backbone.stages[1][0].conv1.weight.grad.clone()))
        volume.grad = None
    for a, b in zip(grads[0][0], grads[1][0]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(grads[0][1], grads[1][1])
    torch.testing.assert_close(grads[0][2], grads[1][2])
    with pytest.raises(ValueError, match="ResNet3D: stage_channels"):
        ResNet3D(4, (4, 6), (1, 1, 1))
    with pytest.raises(ValueError, match="FPN3D: expected 3 levels"):
        FPN3D((4, 6, 8), 4)([volume])


# ---------------------------------------------------------------------------- head
def _head_reference(head, levels, training):
    """The released head written out: deconvolution of the finest level, one 3x3x3 conv per
    level, softmax weights from the deconvolved volume, weighted sum of trilinear upsamplings,
    then the occupancy (ReLU) and flow (Softplus) MLPs."""
    deconv, deconv_bn, _ = head.deblock
    deblocked = torch.relu(_norm(F.conv_transpose3d(levels[0], deconv.weight, stride=2), deconv_bn, training))
    parts = [deblocked] + [_conv_norm_relu(v, conv, training, padding=1) for v, conv in zip(levels, head.level_convs)]

    def mlp(x, seq, activation):
        first, bn, _, last = seq
        return F.conv3d(activation(_norm(F.conv3d(x, first.weight), bn, training)), last.weight)

    weights = torch.softmax(mlp(deblocked, head.level_weights, torch.relu), dim=1)
    size = deblocked.shape[2:]
    fused = sum(weights[:, k:k + 1] * F.interpolate(p, size=size, mode="trilinear", align_corners=False)
                for k, p in enumerate(parts))
    return weights, fused, mlp(fused, head.occ_mlp, torch.relu), mlp(fused, head.flow_mlp, F.softplus)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("hidden", [3, 1])  # 2 x 1 < 4 mid channels: the first layers run before the fusion
def test_head_soft_weights_sum_to_one_and_outputs_match_direct_recomputation(training, hidden):
    gen = torch.Generator().manual_seed(11)
    head = OccFlowHead(6, 4, num_classes=5, output_shape=(8, 6, 4), hidden_channels=hidden).double()
    _randomize_norms(head, gen)
    head.train(training)
    levels = [torch.randn(2, 6, *s, generator=gen, dtype=torch.float64) for s in ((4, 3, 2), (2, 2, 1), (1, 1, 1))]
    weights, fused, occ, flow = _head_reference(head, levels, training)
    deblocked = torch.relu(_norm(F.conv_transpose3d(levels[0], head.deblock[0].weight, stride=2), head.deblock[1],
                                 training))
    torch.testing.assert_close(head.soft_weights(deblocked), weights)
    torch.testing.assert_close(weights.sum(1), torch.ones_like(weights[:, 0]), rtol=0, atol=1e-12)
    assert weights.shape[1] == 4 and weights.min() > 0
    for return_features in (True, False):
        outputs = head(levels, return_features=return_features)
        torch.testing.assert_close(outputs["occ_logits"], occ, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(outputs["flow"], flow, rtol=1e-9, atol=1e-9)
        if return_features:
            torch.testing.assert_close(outputs["voxel_features"], fused, rtol=1e-9, atol=1e-9)
        else:
            assert "voxel_features" not in outputs


def test_head_resamples_predictions_to_a_finer_gt_grid_and_keeps_single_layer_classifiers():
    gen = torch.Generator().manual_seed(12)
    levels = [torch.randn(1, 4, *s, generator=gen, dtype=torch.float64) for s in ((3, 3, 2), (2, 2, 1), (1, 1, 1))]
    head = OccFlowHead(4, 6, num_classes=3, output_shape=(12, 12, 8), hidden_channels=2).double().eval()
    _randomize_norms(head, gen)
    _, fused, occ, flow = _head_reference(head, levels, False)
    up = lambda x: F.interpolate(x, size=(12, 12, 8), mode="trilinear", align_corners=False)  # noqa: E731
    outputs = head(levels)
    torch.testing.assert_close(outputs["occ_logits"], up(occ))
    torch.testing.assert_close(outputs["flow"], up(flow))
    torch.testing.assert_close(outputs["voxel_features"], up(fused))
    # hidden_channels=0: each MLP is one 1x1x1 conv with a bias (not released)
    linear = OccFlowHead(4, 6, num_classes=3, output_shape=(6, 6, 4), hidden_channels=0).double().eval()
    _randomize_norms(linear, gen)
    deblocked = linear.deblock(levels[0])
    parts = [deblocked] + [conv(v) for conv, v in zip(linear.level_convs, levels)]
    weights = torch.softmax(linear.level_weights(deblocked), dim=1)
    fused = sum(weights[:, k:k + 1] * F.interpolate(p, size=(6, 6, 4), mode="trilinear", align_corners=False)
                for k, p in enumerate(parts))
    outputs = linear(levels, return_features=False)
    torch.testing.assert_close(outputs["occ_logits"], linear.occ_mlp(fused))
    torch.testing.assert_close(outputs["flow"], linear.flow_mlp(fused))


@pytest.mark.parametrize("hidden, flow_hidden", [(0, 3), (3, 0), (1, 2)])
def test_head_flow_mlp_may_have_its_own_hidden_width(hidden, flow_hidden):
    gen = torch.Generator().manual_seed(13)
    levels = [torch.randn(2, 4, *s, generator=gen, dtype=torch.float64) for s in ((3, 3, 2), (2, 2, 1), (1, 1, 1))]
    head = OccFlowHead(4, 6, num_classes=3, output_shape=(6, 6, 4), hidden_channels=hidden,
                       flow_hidden_channels=flow_hidden).double().eval()
    _randomize_norms(head, gen)
    assert len(head.occ_mlp) == (4 if hidden else 1) and len(head.flow_mlp) == (4 if flow_hidden else 1)
    assert head.flow_mlp[0].out_channels == (flow_hidden or 2) and head.occ_mlp[0].out_channels == (hidden or 3)
    # the modules applied one after the other, in eval mode
    deblocked = head.deblock(levels[0])
    parts = [deblocked] + [conv(v) for conv, v in zip(head.level_convs, levels)]
    weights = torch.softmax(head.level_weights(deblocked), dim=1)
    fused = sum(weights[:, k:k + 1] * F.interpolate(p, size=(6, 6, 4), mode="trilinear", align_corners=False)
                for k, p in enumerate(parts))
    for return_features in (False, True):
        outputs = head(levels, return_features=return_features)
        torch.testing.assert_close(outputs["occ_logits"], head.occ_mlp(fused), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(outputs["flow"], head.flow_mlp(fused), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="flow_hidden_channels must be >= 0"):
        OccFlowHead(4, 6, num_classes=3, output_shape=(6, 6, 4), flow_hidden_channels=-1)


def test_flow_head_ends_in_softplus_then_linear_as_released():
    head = OccFlowHead(256, spec=OPENOCC)
    kinds = lambda seq: [type(m) for m in seq]  # noqa: E731
    assert kinds(head.flow_mlp) == [nn.Conv3d, nn.BatchNorm3d, nn.Softplus, nn.Conv3d]
    assert kinds(head.occ_mlp) == [nn.Conv3d, nn.BatchNorm3d, nn.ReLU, nn.Conv3d]
    assert kinds(head.level_weights) == [nn.Conv3d, nn.BatchNorm3d, nn.ReLU, nn.Conv3d]
    assert [m.bias for m in head.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))] == [None] * 10
    assert (head.flow_mlp[0].in_channels, head.flow_mlp[0].out_channels, head.flow_mlp[-1].out_channels) == (128, 64, 2)
    deconv = head.deblock[0]
    assert isinstance(deconv, nn.ConvTranspose3d) and deconv.kernel_size == deconv.stride == (2, 2, 2)
    assert (deconv.in_channels, deconv.out_channels) == (256, 128)
    # On the features the head returns: flow = W2 Softplus(BN(W1 f)), which a ReLU would change.
    gen = torch.Generator().manual_seed(13)
    small = OccFlowHead(4, 4, num_classes=3, output_shape=(4, 4, 2), hidden_channels=2).double().eval()
    _randomize_norms(small, gen)
    levels = [torch.randn(1, 4, *s, generator=gen, dtype=torch.float64) for s in ((2, 2, 1), (1, 1, 1), (1, 1, 1))]
    outputs = small(levels)
    first, bn, _, last = small.flow_mlp
    pre_activation = _norm(F.conv3d(outputs["voxel_features"], first.weight), bn, False)
    torch.testing.assert_close(outputs["flow"], F.conv3d(F.softplus(pre_activation), last.weight))
    assert (pre_activation < 0).any()
    assert (outputs["flow"] - F.conv3d(torch.relu(pre_activation), last.weight)).abs().max() > 1e-3


def test_head_checkpointing_changes_nothing_and_bad_levels_are_rejected():
    torch.manual_seed(4)
    levels = [torch.randn(2, 4, *s, dtype=torch.float64, requires_grad=True) for s in ((3, 3, 2), (2, 2, 1), (1, 1, 1))]
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        head = OccFlowHead(4, 4, num_classes=3, output_shape=(6, 6, 4), grad_checkpointing=checkpointing)
        head = head.double().train()
        outputs = head(levels)
        total = sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v)).sum() for v in outputs.values())
        grads = torch.autograd.grad(total, levels + [head.level_weights[0].weight])
        results.append((outputs, grads))
    for key in results[0][0]:
        torch.testing.assert_close(results[0][0][key], results[1][0][key])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="OccFlowHead: expected 3 encoder levels"):
        head(levels[:2])
    with pytest.raises(ValueError, match="OccFlowHead: output_shape"):
        OccFlowHead(4, num_classes=3, output_shape=(6, 6))


@pytest.mark.parametrize("hidden", [2, 0])
def test_subvoxel_head_predicts_each_child_voxel_from_its_own_outputs(hidden):
    gen = torch.Generator().manual_seed(15)
    levels = [torch.randn(2, 4, *s, generator=gen, dtype=torch.float64) for s in ((3, 2, 2), (2, 1, 1), (1, 1, 1))]
    factors = (2, 3, 1)  # D is (6, 4, 4): children of (2, 3, 1) reach (12, 12, 4)
    head = OccFlowHead(4, 6, num_classes=3, output_shape=(12, 12, 4), hidden_channels=hidden,
                       subvoxel_factors=factors).double().eval()
    _randomize_norms(head, gen)
    assert head.classifier.out_channels == 3 * 6 and head.flow_mlp[-1].out_channels == 2 * 6
    if hidden:
        _, fused, occ, flow = _head_reference(head, levels, False)
    else:  # one linear layer with a bias per MLP
        deblocked = head.deblock(levels[0])
        parts = [deblocked] + [conv(v) for conv, v in zip(head.level_convs, levels)]
        weights = torch.softmax(head.level_weights(deblocked), dim=1)
        fused = sum(weights[:, k:k + 1] * F.interpolate(p, size=(6, 4, 4), mode="trilinear", align_corners=False)
                    for k, p in enumerate(parts))
        occ, flow = head.occ_mlp(fused), head.flow_mlp(fused)
    outputs = head(levels)
    assert outputs["occ_logits"].shape == (2, 3, 12, 12, 4) and outputs["flow"].shape == (2, 2, 12, 12, 4)
    for a in range(2):
        for b in range(3):
            child = a * 3 + b  # channel c * 6 + child of the D voxel's outputs
            torch.testing.assert_close(outputs["occ_logits"][:, :, a::2, b::3], occ[:, child::6], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(outputs["flow"][:, :, a::2, b::3], flow[:, child::6], rtol=1e-9, atol=1e-9)
    # the features stay one vector per D voxel, resampled as without sub-voxels
    torch.testing.assert_close(outputs["voxel_features"],
                               F.interpolate(fused, size=(12, 12, 4), mode="trilinear", align_corners=False))
    without_features = head(levels, return_features=False)
    torch.testing.assert_close(without_features["occ_logits"], outputs["occ_logits"], rtol=1e-9, atol=1e-9)
    # two children of one voxel can be of different classes (trilinear upsampling would blend them)
    assert (outputs["occ_logits"].argmax(1)[:, 0::2] != outputs["occ_logits"].argmax(1)[:, 1::2]).any()

    with pytest.raises(ValueError, match=r"subvoxel_factors \(2, 3, 1\) take the fusion grid \(6, 4, 2\)"):
        head([torch.randn(2, 4, 3, 2, 1, dtype=torch.float64)] + levels[1:])
    for bad in ((2, 2), (2, 0, 1), (2.5, 2, 2)):
        with pytest.raises(ValueError, match="subvoxel_factors must be three positive integers"):
            OccFlowHead(4, num_classes=3, output_shape=(12, 12, 4), subvoxel_factors=bad)
