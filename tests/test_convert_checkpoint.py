"""Converting the release's checkpoints. The release's state-dict names and shapes are written
down here from the release's module definitions (cited file:line), filled with random values,
converted onto configs/fbocc_r50.py's model and checked key by key against a correspondence
written here, then loaded strictly; the 3D parts are run against a direct recomputation of the
release's forward in its own (B, C, Y, X, Z) layout. Also: ImageNet ResNet-50 weights onto the
backbone, the command line, the error cases, and each top-level module's parameter count
against the count derived from the release's definitions."""
import copy
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import LazyConfig, instantiate

from voxelsplat.engine.checkpoint import OccupancyCheckpointer
from voxelsplat.engine.convert_checkpoint import (
    convert_backbone_checkpoint, convert_backbone_state_dict, convert_release_checkpoint,
    convert_release_state_dict, load_checkpoint, source_state_dict,
)
from voxelsplat.modeling.backbone import TimmBackbone
from voxelsplat.modeling.heads import OccFlowHead
from voxelsplat.structures import DEFAULT_GRID

REPO = Path(__file__).resolve().parents[1]

# Release files (ZZY816/VoxelSplat at 279de66):
#   VC   occupancy_configs/voxelsplat/voxelsplat-r50.py (lines 1-250 identical in fbocc-flow.py)
#   DET  mmdet3d/models/fbbev/detectors/fbocc.py
#   NK   mmdet3d/models/necks/fpn.py (CustomFPN)
#   DN   mmdet3d/models/fbbev/modules/depth_net.py
#   VT   mmdet3d/models/fbbev/view_transformation/forward_projection/view_transformer.py
#   BP   mmdet3d/models/fbbev/view_transformation/backward_projection/backward_projection.py
#   BF, PE, CBL, SCA  .../backward_projection/bevformer_utils/{bevformer, positional_encoding,
#        custom_base_transformer_layer, spatial_cross_attention_depth}.py
#   R3D  mmdet3d/models/fbbev/modules/resnet3d.py     F3D  mmdet3d/models/fbbev/modules/fpn3d.py
#   HD   mmdet3d/models/fbbev/heads/occ_flow_head.py  GH   mmdet3d/models/fbbev/gaussian/gaussian_head.py
#   OPS  mmdet3d/models/fbbev/gaussian/ops.py
# Libraries the release builds on (mmdet 2.28 / mmcv 1.6, README install.md): mmdet ResNet / Bottleneck /
# BasicBlock (mmdet/models/backbones/resnet.py) name their layers conv1, bn1 (build_norm_layer(postfix=1)),
# conv2, bn2, conv3, bn3, and the stem conv1 + bn1 (_make_stem_layer); ResLayer's downsample is
# Sequential(conv, norm). mmcv ConvModule (cnn/bricks/conv_module.py) holds ``conv`` and its norm under
# build_norm_layer's name ('bn' for BN / SyncBN), with a conv bias only without a norm (bias='auto').
# mmcv MultiScaleDeformableAttention: sampling_offsets, attention_weights, value_proj, output_proj;
# mmcv FFN: layers = Sequential(Sequential(Linear, act, Dropout), Linear, Dropout).

C = 80            # VC:94 numC_Trans (context channels, volume channels, BEV embed dims)
DIM = 256         # VC:95 _dim_ (FPN width)
MID = 512         # DN:261 mid_channels default (VC:138-148 does not set it)
DEPTH_BINS = 80   # VC:84 depth_categories
CAM = 27          # DN:290 BatchNorm1d(27) over the camera parameters
HISTORY = 16      # VC:33 history_cat_num
VOXEL = (64, 128, 256)   # VC:108 voxel_channels
VOXEL_OUT = 256          # VC:107 voxel_out_channel
CLASSES = 17             # VC:101 num_cls


def _bn(name, channels):
    return {f"{name}.weight": (channels,), f"{name}.bias": (channels,), f"{name}.running_mean": (channels,),
            f"{name}.running_var": (channels,), f"{name}.num_batches_tracked": ()}


def release_backbone():
    """VC:119-129 mmdet ResNet depth 50 (arch_settings 50: Bottleneck, (3, 4, 6, 3)), style pytorch;
    every conv bias-free; out_indices (2, 3) still builds all four stages."""
    keys = {"img_backbone.conv1.weight": (64, 3, 7, 7), **_bn("img_backbone.bn1", 64)}
    inplanes = 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = 64 * 2 ** stage  # base_channels * 2**i, expansion 4
        for block in range(blocks):
            p = f"img_backbone.layer{stage + 1}.{block}."
            cin = inplanes if block == 0 else 4 * planes
            keys[p + "conv1.weight"] = (planes, cin, 1, 1)
            keys.update(_bn(p + "bn1", planes))
            keys[p + "conv2.weight"] = (planes, planes, 3, 3)
            keys.update(_bn(p + "bn2", planes))
            keys[p + "conv3.weight"] = (4 * planes, planes, 1, 1)
            keys.update(_bn(p + "bn3", 4 * planes))
            if block == 0:  # stride != 1 or inplanes != 4 * planes in every stage
                keys[p + "downsample.0.weight"] = (4 * planes, cin, 1, 1)
                keys.update(_bn(p + "downsample.1", 4 * planes))
        inplanes = 4 * planes
    return keys


def release_neck():
    """VC:130-137 CustomFPN([1024, 2048] -> 256, out_ids [0]); NK:113-134: one lateral ConvModule per
    input and an output ConvModule only for level 0, no norm_cfg so each conv has a bias."""
    keys = {}
    for i, cin in enumerate((1024, 2048)):
        keys[f"img_neck.lateral_convs.{i}.conv.weight"] = (DIM, cin, 1, 1)
        keys[f"img_neck.lateral_convs.{i}.conv.bias"] = (DIM,)
    keys["img_neck.fpn_convs.0.conv.weight"] = (DIM, DIM, 3, 3)
    keys["img_neck.fpn_convs.0.conv.bias"] = (DIM,)
    return keys


def release_depth_net():
    """VC:138-148 CM_DepthNet(256, context 80, 80 bins, use_dcn False), DN:279-325."""
    p = "depth_net."
    keys = {p + "reduce_conv.0.weight": (MID, DIM, 3, 3), p + "reduce_conv.0.bias": (MID,),  # DN:279-284
            **_bn(p + "reduce_conv.1", MID),
            p + "context_conv.weight": (C, MID, 1, 1), p + "context_conv.bias": (C,),      # DN:288-289
            **_bn(p + "bn", CAM)}                                                            # DN:290
    for branch in ("depth", "context"):
        # DN:291-294; Mlp DN:219-222 (fc1 27 -> 512, fc2 512 -> 512); SELayer DN:239-241 (1x1 convs, bias)
        keys.update({f"{p}{branch}_mlp.fc1.weight": (MID, CAM), f"{p}{branch}_mlp.fc1.bias": (MID,),
                     f"{p}{branch}_mlp.fc2.weight": (MID, MID), f"{p}{branch}_mlp.fc2.bias": (MID,)})
        for conv in ("conv_reduce", "conv_expand"):
            keys[f"{p}{branch}_se.{conv}.weight"] = (MID, MID, 1, 1)
            keys[f"{p}{branch}_se.{conv}.bias"] = (MID,)
    for block in range(3):  # DN:298-303 three mmdet BasicBlocks, bias-free 3x3 convs
        q = f"{p}depth_conv.{block}."
        keys.update({q + "conv1.weight": (MID, MID, 3, 3), **_bn(q + "bn1", MID),
                     q + "conv2.weight": (MID, MID, 3, 3), **_bn(q + "bn2", MID)})
    q = f"{p}depth_conv.3."  # DN:304-305 ASPP(512, 512); DN:140-177; _ASPPModule DN:104-112
    for k in range(1, 5):
        keys[f"{q}aspp{k}.atrous_conv.weight"] = (MID, MID, 1, 1) if k == 1 else (MID, MID, 3, 3)
        keys.update(_bn(f"{q}aspp{k}.bn", MID))
    keys[q + "global_avg_pool.1.weight"] = (MID, MID, 1, 1)       # DN:169-174 (pool, conv, BN, ReLU)
    keys.update(_bn(q + "global_avg_pool.2", MID))
    keys[q + "conv1.weight"] = (MID, 5 * MID, 1, 1)               # DN:175-177
    keys.update(_bn(q + "bn1", MID))
    keys[p + "depth_conv.4.weight"] = (DEPTH_BINS, MID, 1, 1)     # DN:318-324
    keys[p + "depth_conv.4.bias"] = (DEPTH_BINS,)
    return keys


# VT:16-20, 355-357: nn.Parameters (requires_grad=False) dx, bx, nx of the grid VC:78-83 (0.8 m)
RELEASE_GRID = {"forward_projection.dx": [0.8, 0.8, 0.8], "forward_projection.bx": [-39.6, -39.6, -0.6],
                "forward_projection.nx": [100.0, 100.0, 8.0]}


def release_backward_projection():
    """VC:155-213, bev 100 x 100 (VC:92-93), positional features 40 (VC:96), FFN 320 (VC:97)."""
    p, layer = "backward_projection.", "backward_projection.transformer.encoder.layers.0."
    keys = {p + "bev_embedding.weight": (100 * 100, C),                 # BP:68-69
            p + "positional_encoding.row_embed.weight": (100, 40),      # PE:32-33
            p + "positional_encoding.col_embed.weight": (100, 40),
            p + "transformer.cams_embeds": (6, C)}                      # BF:50-51 (num_cams 6)
    # CBL:123-136: attentions in operation order (self_attn, cross_attn); mmcv MSDeformableAttention with
    # mmcv's 8 heads, 4 points, 1 level (VC:176-180): offsets 8*1*4*2, weights 8*1*4
    for name, out in (("sampling_offsets", 64), ("attention_weights", 32), ("value_proj", C), ("output_proj", C)):
        keys[f"{layer}attentions.0.{name}.weight"] = (out, C)
        keys[f"{layer}attentions.0.{name}.bias"] = (out,)
    # SCA:61-65 deformable_attention + output_proj; SCA:294-298 DA_MSDeformableAttention (8 heads,
    # 8 points VC:189, 1 level), no output_proj of its own (SCA:268)
    for name, out in (("sampling_offsets", 128), ("attention_weights", 64), ("value_proj", C)):
        keys[f"{layer}attentions.1.deformable_attention.{name}.weight"] = (out, C)
        keys[f"{layer}attentions.1.deformable_attention.{name}.bias"] = (out,)
    keys[f"{layer}attentions.1.output_proj.weight"] = (C, C)
    keys[f"{layer}attentions.1.output_proj.bias"] = (C,)
    for i in range(3):  # CBL:158-161 one LayerNorm per 'norm' of the operation order (VC:202-203)
        keys[f"{layer}norms.{i}.weight"] = (C,)
        keys[f"{layer}norms.{i}.bias"] = (C,)
    keys.update({f"{layer}ffns.0.layers.0.0.weight": (4 * C, C), f"{layer}ffns.0.layers.0.0.bias": (4 * C,),
                 f"{layer}ffns.0.layers.1.weight": (C, 4 * C), f"{layer}ffns.0.layers.1.bias": (C,)})  # CBL:155-156
    return keys


def release_temporal_fusion():
    """DET:109-126: Conv3d (nx[-1] = 8 != 1) 81 -> 80 + SyncBN, Conv3d 17 * 80 -> 80 + SyncBN
    (history_cat_conv_out_channels not passed by VC:111-118, so DET:105-107 gives 80)."""
    keys = {"history_keyframe_time_conv.0.weight": (C, C + 1, 1, 1, 1), "history_keyframe_time_conv.0.bias": (C,),
            **_bn("history_keyframe_time_conv.1", C),
            "history_keyframe_cat_conv.0.weight": (C, C * (HISTORY + 1), 1, 1, 1),
            "history_keyframe_cat_conv.0.bias": (C,), **_bn("history_keyframe_cat_conv.1", C)}
    return keys


def release_voxel_encoder():
    """VC:214-230: CustomResNet3D depth 18 ([2, 2, 2, 2] R3D:160, three stages from block_inplanes), strides
    (1, 2, 2), input 80; FPN3D (64, 128, 256) -> 256, SyncBN."""
    p = "img_bev_encoder_backbone."
    keys = {p + "input_proj.0.weight": (VOXEL[0], C, 1, 1, 1), **_bn(p + "input_proj.1", VOXEL[0])}  # R3D:188-193
    in_planes = VOXEL[0]
    for stage, (planes, stride) in enumerate(zip(VOXEL, (1, 2, 2))):
        for block in range(2):
            q = f"{p}layers.{stage}.{block}."
            cin = in_planes if block == 0 else planes
            # R3D:68-72 BasicBlock; R3D:18-30 3x3x3 convs with bias (BIAS = True)
            keys.update({q + "conv1.weight": (planes, cin, 3, 3, 3), q + "conv1.bias": (planes,),
                         **_bn(q + "bn1", planes),
                         q + "conv2.weight": (planes, planes, 3, 3, 3), q + "conv2.bias": (planes,),
                         **_bn(q + "bn2", planes)})
            if block == 0 and (stride != 1 or cin != planes):  # R3D:224-233: 1x1x1 conv (bias, R3D:33-43) + norm
                keys.update({q + "downsample.0.weight": (planes, cin, 1, 1, 1), q + "downsample.0.bias": (planes,),
                             **_bn(q + "downsample.1", planes)})
        in_planes = planes
    for i, cin in enumerate(VOXEL):  # F3D:49-68 Sequential(ConvModule(bias=False, SyncBN, ReLU))
        keys[f"img_bev_encoder_neck.lateral_convs.{i}.0.conv.weight"] = (VOXEL_OUT, cin, 1, 1, 1)
        keys.update(_bn(f"img_bev_encoder_neck.lateral_convs.{i}.0.bn", VOXEL_OUT))
        keys[f"img_bev_encoder_neck.fpn_convs.{i}.0.conv.weight"] = (VOXEL_OUT, VOXEL_OUT, 3, 3, 3)
        keys.update(_bn(f"img_bev_encoder_neck.fpn_convs.{i}.0.bn", VOXEL_OUT))
    return keys


def release_head(voxelsplat=False):
    """VC:231-250 OccFlowHead(3 levels of 256, 17 classes, soft weights, SyncBN); conv_cfg bias=False (HD:26)."""
    p, mid, hidden = "occupancy_head.", VOXEL_OUT // 2, VOXEL_OUT // 4  # HD:81 in // 2; HD:93 mid // 2
    keys = {}
    for i in range(3):  # HD:79-87
        keys[f"{p}occ_convs.{i}.0.weight"] = (mid, VOXEL_OUT, 3, 3, 3)
        keys.update(_bn(f"{p}occ_convs.{i}.1", mid))
    for name, out in (("occ_pred_conv", CLASSES), ("flow_pred_conv", 2), ("voxel_soft_weights", 3 + 1)):
        # HD:91-97, 99-105, 109-117 (the soft weights cover the 3 levels + the deconvolution, HD:108)
        keys[f"{p}{name}.0.weight"] = (hidden, mid, 1, 1, 1)
        keys.update(_bn(f"{p}{name}.1", hidden))
        keys[f"{p}{name}.3.weight"] = (out, hidden, 1, 1, 1)
    keys[p + "deblock.0.weight"] = (VOXEL_OUT, mid, 2, 2, 2)  # HD:134-146 ConvTranspose3d: (in, out, k, k, k)
    keys.update(_bn(p + "deblock.1", mid))
    if voxelsplat:  # VC:251-264 GaussianHead: buffers only (GH:33-35, 85-86; OPS:188-194 gives (X, Y, Z, 3))
        g = p + "gaussian_render."
        points = (*DEFAULT_GRID.shape, 3)  # the release's GT grid
        keys.update({g + "query_points": points, g + "normalized_points": points,
                     g + "feat2gau.opacity": (1, 1), g + "feat2gau.rotation": (1, 4), g + "feat2gau.scaling": (1, 3)})
    return keys


def release_shapes(voxelsplat=False):
    shapes = {}
    for part in (release_backbone(), release_neck(), release_depth_net(), {k: (3,) for k in RELEASE_GRID},
                 release_backward_projection(), release_temporal_fusion(), release_voxel_encoder(),
                 release_head(voxelsplat)):
        assert not set(part) & set(shapes)
        shapes.update(part)
    return shapes


# Keys of the release with no counterpart of ours, on purpose.
RELEASE_DROPPED = {*RELEASE_GRID, "backward_projection.transformer.cams_embeds"}
GAUSSIAN_BUFFERS = {"occupancy_head.gaussian_render." + k for k in (
    "query_points", "normalized_points", "feat2gau.opacity", "feat2gau.rotation", "feat2gau.scaling")}

# Which module of ours takes each part of the release (read off both definitions): release prefix
# -> our prefix; the longest matching release prefix wins.
_LAYER = "backward_projection.transformer.encoder.layers.0."
CORRESPONDENCE = {
    "img_backbone.": "backbone.model.",
    **{f"img_neck.lateral_convs.{i}.conv.": f"neck.lateral.{i}." for i in (0, 1)},
    "img_neck.fpn_convs.0.conv.": "neck.output.",
    "depth_net.bn.": "depth_net.camera_norm.",
    "depth_net.reduce_conv.": "depth_net.reduce.",
    "depth_net.context_conv.": "depth_net.context_out.",
    "depth_net.context_mlp.": "depth_net.context_mlp.",
    "depth_net.depth_mlp.": "depth_net.depth_mlp.",
    **{f"depth_net.{b}_se.conv_{c}.": f"depth_net.{b}_se.{c}." for b in ("depth", "context")
       for c in ("reduce", "expand")},
    **{f"depth_net.depth_conv.{i}.": f"depth_net.depth_branch.{i}." for i in (0, 1, 2, 4)},
    **{f"depth_net.depth_conv.3.aspp{k}.atrous_conv.": f"depth_net.depth_branch.3.branches.{k - 1}.0."
       for k in range(1, 5)},
    **{f"depth_net.depth_conv.3.aspp{k}.bn.": f"depth_net.depth_branch.3.branches.{k - 1}.1." for k in range(1, 5)},
    "depth_net.depth_conv.3.global_avg_pool.1.": "depth_net.depth_branch.3.image_pool.0.",
    "depth_net.depth_conv.3.global_avg_pool.2.": "depth_net.depth_branch.3.image_pool.1.",
    "depth_net.depth_conv.3.conv1.": "depth_net.depth_branch.3.fuse.0.",
    "depth_net.depth_conv.3.bn1.": "depth_net.depth_branch.3.fuse.1.",
    "backward_projection.bev_embedding.": "backward_projection.bev_embedding.",
    "backward_projection.positional_encoding.": "backward_projection.positional_encoding.",
    _LAYER + "attentions.0.": "backward_projection.self_attn.",
    _LAYER + "attentions.1.": "backward_projection.cross_attn.",
    **{f"{_LAYER}norms.{i}.": f"backward_projection.norm{i + 1}." for i in range(3)},
    _LAYER + "ffns.0.layers.0.0.": "backward_projection.ffn.0.",
    _LAYER + "ffns.0.layers.1.": "backward_projection.ffn.3.",
    "history_keyframe_time_conv.": "temporal_fusion.time_conv.",
    "history_keyframe_cat_conv.": "temporal_fusion.cat_conv.",
    "img_bev_encoder_backbone.input_proj.": "voxel_encoder.backbone.input_proj.",
    **{f"img_bev_encoder_backbone.layers.{i}.{j}.": f"voxel_encoder.backbone.stages.{i}.{j}."
       for i in range(3) for j in range(2)},
    **{f"img_bev_encoder_backbone.layers.{i}.0.downsample.": f"voxel_encoder.backbone.stages.{i}.0.shortcut."
       for i in (1, 2)},
    **{f"img_bev_encoder_neck.{rel}_convs.{i}.0.{part}.": f"voxel_encoder.fpn.{ours}.{i}.{idx}."
       for rel, ours in (("lateral", "lateral"), ("fpn", "output")) for i in range(3)
       for part, idx in (("conv", 0), ("bn", 1))},
    "occupancy_head.deblock.": "head.deblock.",
    "occupancy_head.occ_convs.": "head.level_convs.",
    "occupancy_head.voxel_soft_weights.": "head.level_weights.",
    "occupancy_head.occ_pred_conv.": "head.occ_mlp.",
    "occupancy_head.flow_pred_conv.": "head.flow_mlp.",
}


def our_key_of(release_key):
    prefix = max((p for p in CORRESPONDENCE if release_key.startswith(p)), key=len)
    return CORRESPONDENCE[prefix] + release_key[len(prefix):]


def in_our_layout(our_key, value):
    """The release's volumes are (B, C, Y, X, Z) (VT:542, DET:180/316, HD:189-196), ours (B, C, X, Y, Z)."""
    if our_key.split(".")[0] in ("temporal_fusion", "voxel_encoder", "head") and value.dim() == 5:
        return value.transpose(2, 3)
    return value


def random_state(shapes, seed):
    """Random values that keep a network finite: BN weights and variances positive, weights
    scaled by 1/sqrt(fan-in); the grid vectors hold the release's values."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(1, 10 ** 6, shape, generator=gen)
        elif key in RELEASE_GRID:
            state[key] = torch.tensor(RELEASE_GRID[key])
        elif key.endswith("running_var") or (len(shape) == 1 and key.endswith("weight")):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) == 1:
            state[key] = torch.randn(shape, generator=gen) * 0.1
        else:
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    return state


def in_one_storage(state, seed, keep=()):
    """The same keys, shapes and dtypes, every floating tensor a view at its own offset into one
    random buffer: torch.save writes the buffer once (about the largest tensor) instead of every
    tensor, which keeps the files of the file tests small. The offsets differ, so tensors of one
    shape hold different values and a swapped mapping still shows. ``keep``: keys left as they are."""
    floating = [key for key, value in state.items() if value.is_floating_point() and key not in keep]
    stride = 97
    buffer = torch.randn(max(state[k].numel() for k in floating) + stride * len(floating),
                         generator=torch.Generator().manual_seed(seed))
    shared = dict(state)
    for i, key in enumerate(floating):
        shared[key] = buffer[i * stride:i * stride + state[key].numel()].view(state[key].shape)
    return shared


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model():
    cfg = LazyConfig.load(str(REPO / "configs" / "fbocc_r50.py"))
    cfg.model.backbone.init_checkpoint = ""
    return instantiate(cfg.model).eval()


@pytest.fixture(scope="module")
def release_state():
    return random_state(release_shapes(voxelsplat=True), seed=0)


@pytest.fixture(scope="module")
def converted(model, release_state):
    with torch.no_grad():
        return convert_release_state_dict(release_state, model.state_dict(), grid=model.forward_projection.grid)


# ---------------------------------------------------------------------------- whole model
def test_release_keys_map_one_to_one_onto_the_model(model, release_state, converted):
    state, report = converted
    assert report.unmapped == [] and report.unfilled == []
    assert set(report.dropped) == RELEASE_DROPPED | GAUSSIAN_BUFFERS
    expected = {our_key_of(k): k for k in release_state if k not in report.dropped}
    assert len(expected) == len(release_state) - len(report.dropped)  # no two release keys on one of ours
    assert set(state) == set(expected) == set(model.state_dict())
    for our_key, release_key in expected.items():
        assert report.mapped[release_key] == our_key
        want = in_our_layout(our_key, release_state[release_key])
        assert torch.equal(state[our_key], want), (release_key, our_key)
    model.load_state_dict(state, strict=True)


def _release_bn(x, w, name):
    return F.batch_norm(x, w[name + ".running_mean"], w[name + ".running_var"], w[name + ".weight"],
                        w[name + ".bias"], training=False, eps=1e-5)


def release_voxel_encoder_forward(x, w):
    """The release's CustomResNet3D + FPN3D in eval, on (B, C, Y, X, Z) with release names
    (R3D:76-99 BasicBlock, R3D:250-274 forward; F3D:71-110)."""
    p = "img_bev_encoder_backbone."
    x = F.relu(_release_bn(F.conv3d(x, w[p + "input_proj.0.weight"]), w, p + "input_proj.1"))
    levels = []
    for stage, stride in enumerate((1, 2, 2)):
        for block in range(2):
            q, s = f"{p}layers.{stage}.{block}.", stride if block == 0 else 1
            out = F.relu(_release_bn(F.conv3d(x, w[q + "conv1.weight"], w[q + "conv1.bias"], s, 1), w, q + "bn1"))
            out = _release_bn(F.conv3d(out, w[q + "conv2.weight"], w[q + "conv2.bias"], 1, 1), w, q + "bn2")
            if q + "downsample.0.weight" in w:
                x = _release_bn(F.conv3d(x, w[q + "downsample.0.weight"], w[q + "downsample.0.bias"], s), w,
                                q + "downsample.1")
            x = F.relu(out + x)
        levels.append(x)
    n = "img_bev_encoder_neck."
    lateral = [F.relu(_release_bn(F.conv3d(v, w[f"{n}lateral_convs.{i}.0.conv.weight"]), w,
                                  f"{n}lateral_convs.{i}.0.bn")) for i, v in enumerate(levels)]
    for i in range(len(lateral) - 1, 0, -1):
        lateral[i - 1] = lateral[i - 1] + F.interpolate(lateral[i], size=lateral[i - 1].shape[2:],
                                                        mode="trilinear", align_corners=False)
    return [F.relu(_release_bn(F.conv3d(v, w[f"{n}fpn_convs.{i}.0.conv.weight"], padding=1), w,
                               f"{n}fpn_convs.{i}.0.bn")) for i, v in enumerate(lateral)]


def release_head_forward(volumes, w):
    """The release's OccFlowHead in eval on (B, C, Y, X, Z) levels (HD:158-199): outputs permuted
    to (B, K, X, Y, Z) by the head itself (HD:189-196)."""
    p = "occupancy_head."
    deblocked = F.relu(_release_bn(F.conv_transpose3d(volumes[0], w[p + "deblock.0.weight"], stride=2), w,
                                   p + "deblock.1"))
    parts = [deblocked] + [F.relu(_release_bn(F.conv3d(v, w[f"{p}occ_convs.{i}.0.weight"], padding=1), w,
                                              f"{p}occ_convs.{i}.1")) for i, v in enumerate(volumes)]

    def mlp(x, name, act):
        return F.conv3d(act(_release_bn(F.conv3d(x, w[f"{p}{name}.0.weight"]), w, f"{p}{name}.1")),
                        w[f"{p}{name}.3.weight"])

    weights = torch.softmax(mlp(deblocked, "voxel_soft_weights", F.relu), dim=1)
    fused = sum(F.interpolate(part, size=deblocked.shape[2:], mode="trilinear", align_corners=False)
                * weights[:, k:k + 1] for k, part in enumerate(parts))
    return (mlp(fused, "occ_pred_conv", F.relu).permute(0, 1, 3, 2, 4),
            mlp(fused, "flow_pred_conv", F.softplus).permute(0, 1, 3, 2, 4))


def test_converted_volume_modules_compute_the_release_forward_in_our_layout(model, release_state, converted):
    """Our voxel encoder and head with the converted weights, on a (B, C, X, Y, Z) volume with X != Y,
    equal the release's forward on the same volume in its (B, C, Y, X, Z) layout: the x/y swap of
    the 3D kernels is what makes them equal."""
    state, _ = converted
    w = {k: v.double() for k, v in release_state.items()
         if k.startswith(("img_bev_encoder", "occupancy_head.")) and v.is_floating_point()}
    encoder = copy.deepcopy(model.voxel_encoder).double().eval()
    encoder.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("voxel_encoder.")})
    gen = torch.Generator().manual_seed(1)
    volume = torch.randn(1, C, 6, 4, 4, generator=gen, dtype=torch.float64)  # (B, C, X, Y, Z)
    with torch.no_grad():
        ours = encoder(volume)
        release = release_voxel_encoder_forward(volume.transpose(2, 3), w)
    assert [tuple(v.shape[2:]) for v in ours] == [(6, 4, 4), (3, 2, 2), (2, 1, 1)]
    for mine, theirs in zip(ours, release):
        torch.testing.assert_close(mine, theirs.transpose(2, 3), rtol=1e-9, atol=1e-9)
    # the release's kernels as they are (not transposed) would not do: the input tells the layouts apart
    untransposed = copy.deepcopy(encoder)
    untransposed.load_state_dict({k: v.transpose(2, 3) if v.dim() == 5 else v
                                  for k, v in encoder.state_dict().items()})
    with torch.no_grad():
        assert not torch.allclose(untransposed(volume)[0], ours[0], rtol=1e-3, atol=1e-3)

    head = OccFlowHead(VOXEL_OUT, num_classes=CLASSES, output_shape=(12, 8, 8)).double().eval()
    head.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("head.")})
    levels = [torch.randn(1, VOXEL_OUT, *shape, generator=gen, dtype=torch.float64) * 0.5
              for shape in ((6, 4, 4), (3, 2, 2), (2, 1, 1))]
    with torch.no_grad():
        out = head(levels)
        occ, flow = release_head_forward([v.transpose(2, 3) for v in levels], w)
    torch.testing.assert_close(out["occ_logits"], occ, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["flow"], flow, rtol=1e-9, atol=1e-9)


def test_release_checkpoint_file_converts_and_loads_through_our_checkpointer(model, release_state, tmp_path):
    """An mmcv file (state_dict + meta + optimizer) -> {"model", "conversion"}, read back with
    weights_only and loaded by the checkpointer train.init_checkpoint goes through."""
    src, dst = tmp_path / "release.pth", tmp_path / "out" / "ours.pth"
    fbocc = in_one_storage({k: v for k, v in release_state.items() if k not in GAUSSIAN_BUFFERS},  # the baseline's
                           seed=1, keep=RELEASE_GRID)
    torch.save({"meta": {"epoch": 48, "config": "..."}, "state_dict": fbocc,
                "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]}}, src)
    report = convert_release_checkpoint(str(src), str(dst), model.state_dict(), grid=model.forward_projection.grid,
                                        strict=True)
    assert report.complete and set(report.dropped) == RELEASE_DROPPED
    saved = torch.load(dst, map_location="cpu", weights_only=True)
    assert saved["conversion"]["unmapped"] == [] and saved["conversion"]["dropped"].keys() == RELEASE_DROPPED
    target = copy.deepcopy(model)
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    OccupancyCheckpointer(target).load(str(dst))
    key = "img_bev_encoder_neck.fpn_convs.1.0.conv.weight"
    torch.testing.assert_close(target.voxel_encoder.fpn.output[1][0].weight, fbocc[key].transpose(2, 3))
    torch.testing.assert_close(target.depth_net.depth_branch[3].fuse[0].weight,
                               fbocc["depth_net.depth_conv.3.conv1.weight"])
    assert sorted(os.listdir(dst.parent)) == ["ours.pth"]  # no temporary file left


def test_release_backbone_alone_becomes_a_timm_state_dict(model, release_state):
    state, report = convert_backbone_state_dict(release_state, model.backbone.model.state_dict())
    backbone_keys = {k for k in release_state if k.startswith("img_backbone.")}
    assert report.unmapped == [] and report.unfilled == []
    assert set(report.mapped) == backbone_keys and set(report.dropped) == set(release_state) - backbone_keys
    for key in backbone_keys:
        assert torch.equal(state[key[len("img_backbone."):]], release_state[key])


# ---------------------------------------------------------------------------- ImageNet ResNet-50
def _torchvision_resnet50_state(seed):
    import torchvision

    state = torchvision.models.resnet50(weights=None).state_dict()  # torchvision's own names, with fc
    gen = torch.Generator().manual_seed(seed)
    ints = {k: torch.randint(0, 99, v.shape, generator=gen) for k, v in state.items() if not v.is_floating_point()}
    return in_one_storage({**state, **ints}, seed)


def test_imagenet_resnet50_round_trip_through_the_backbone_init_checkpoint(model, tmp_path):
    imagenet = _torchvision_resnet50_state(seed=2)
    # torchvision's names are mmdet's (the release's backbone) plus the classifier
    assert set(imagenet) - {"fc.weight", "fc.bias"} == {k[len("img_backbone."):] for k in release_backbone()}
    src, dst = tmp_path / "resnet50.pth", tmp_path / "resnet50_backbone.pth"
    torch.save(imagenet, src)
    report = convert_backbone_checkpoint(str(src), str(dst), model.backbone.model.state_dict(), strict=True)
    assert set(report.dropped) == {"fc.weight", "fc.bias"} and report.complete
    backbone = TimmBackbone("resnet50", out_indices=(3, 4), init_checkpoint=str(dst), norm="BN")
    loaded = backbone.model.state_dict()
    assert set(loaded) == set(imagenet) - {"fc.weight", "fc.bias"}
    for key, value in loaded.items():
        assert torch.equal(value, imagenet[key]), key


def _load_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", REPO / "tools" / "convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_command_line_converts_a_backbone_and_reports_errors(tmp_path, capsys):
    tool = _load_tool()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in _torchvision_resnet50_state(seed=3).items()}}
    src, dst = tmp_path / "in.pth", tmp_path / "out.pth"
    torch.save(wrapped, src)
    assert tool.main(["backbone", str(src), str(dst), "--config-file", str(REPO / "configs/fbocc_r50.py")]) == 0
    out = capsys.readouterr().out
    assert "0 unmapped" in out and "0 unfilled" in out and "fc.weight" in out
    assert torch.equal(torch.load(dst, weights_only=True)["layer4.2.conv3.weight"],
                       wrapped["state_dict"]["module.layer4.2.conv3.weight"])
    missing = tmp_path / "nope.pth"
    assert tool.main(["backbone", str(missing), str(tmp_path / "x.pth")]) == 1
    assert str(missing) in capsys.readouterr().err and not (tmp_path / "x.pth").exists()


# ---------------------------------------------------------------------------- errors and edge cases
def test_missing_corrupt_and_pickled_files_are_refused_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(str(tmp_path / "nope.pth"))
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"a": torch.ones(2)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:100])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for path in (truncated, garbage, empty):
        with pytest.raises(ValueError, match=str(path.name)):
            load_checkpoint(str(path))
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.ones(1)], not_a_dict)
    with pytest.raises(ValueError, match="list"):
        load_checkpoint(str(not_a_dict))
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_checkpoint(str(bad_safetensors))

    pickled = tmp_path / "meta_with_numpy.pth"  # mmcv metas can hold NumPy scalars
    torch.save({"state_dict": {"a": torch.ones(2)}, "meta": {"best": np.float64(0.3)}}, pickled)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_checkpoint(str(pickled))
    assert torch.equal(source_state_dict(load_checkpoint(str(pickled), allow_pickle=True))["a"], torch.ones(2))
    with pytest.raises(ValueError, match="'meta'"):
        source_state_dict({"meta": {"x": 1}, "weights": torch.ones(1)}, "f.pth")


def test_shape_mismatch_names_both_keys_and_shapes(model, release_state):
    source = {k: v for k, v in release_state.items() if k.startswith("img_neck.")}
    source["img_neck.lateral_convs.1.conv.weight"] = torch.zeros(128, 2048, 1, 1)
    with pytest.raises(ValueError) as err:
        convert_release_state_dict(source, model.state_dict())
    message = str(err.value)
    for part in ("img_neck.lateral_convs.1.conv.weight", "(128, 2048, 1, 1)", "neck.lateral.1.weight",
                 "(256, 2048, 1, 1)"):
        assert part in message
    # skipped on request (what the release's non-strict load_from does), and reported
    state, report = convert_release_state_dict(source, model.state_dict(), skip_mismatched=True)
    assert "neck.lateral.1.weight" in report.unfilled and "neck.lateral.1.weight" not in state
    assert "(128, 2048, 1, 1)" in report.dropped["img_neck.lateral_convs.1.conv.weight"]
    assert torch.equal(state["neck.lateral.0.weight"], source["img_neck.lateral_convs.0.conv.weight"])


def test_unknown_keys_and_unfilled_keys_are_all_reported(model, release_state):
    source = {k: v for k, v in release_state.items() if k.startswith(("img_neck.", "forward_projection."))}
    source["img_view_transformer.depth_net.reduce_conv.0.weight"] = torch.zeros(1)
    source["pts_bbox_head.task_heads.0.reg.weight"] = torch.zeros(1)
    state, report = convert_release_state_dict(source, model.state_dict())
    assert report.unmapped == ["img_view_transformer.depth_net.reduce_conv.0.weight",
                               "pts_bbox_head.task_heads.0.reg.weight"]
    assert set(state) == {"neck.lateral.0.weight", "neck.lateral.0.bias", "neck.lateral.1.weight",
                          "neck.lateral.1.bias", "neck.output.weight", "neck.output.bias"}
    assert report.unfilled == sorted(set(model.state_dict()) - set(state))
    assert "img_view_transformer.depth_net.reduce_conv.0.weight" in report.summary()
    assert set(report.dropped) == set(RELEASE_GRID)


def test_grid_of_another_volume_is_refused(model, release_state):
    source = dict(release_state)
    source["forward_projection.dx"] = torch.tensor([0.4, 0.4, 0.4])
    with pytest.raises(ValueError, match="forward_projection.dx"):
        convert_release_state_dict(source, model.state_dict(), grid=model.forward_projection.grid)


def test_mmcv_ema_copies_are_dropped_or_converted_on_request(model, release_state):
    live = {k: release_state[k] for k in ("img_neck.fpn_convs.0.conv.weight", "img_neck.fpn_convs.0.conv.bias")}
    ema = {"ema_img_neck_fpn_convs_0_conv_weight": live["img_neck.fpn_convs.0.conv.weight"] + 1.0,
           "ema_img_neck_fpn_convs_0_conv_bias": live["img_neck.fpn_convs.0.conv.bias"] + 1.0}
    state, report = convert_release_state_dict({**live, **ema}, model.state_dict())
    assert torch.equal(state["neck.output.weight"], live["img_neck.fpn_convs.0.conv.weight"])
    assert set(report.dropped) == set(ema) and report.unmapped == []
    state, report = convert_release_state_dict({**live, **ema}, model.state_dict(), use_ema=True)
    assert torch.equal(state["neck.output.weight"], ema["ema_img_neck_fpn_convs_0_conv_weight"])
    assert torch.equal(state["neck.output.bias"], ema["ema_img_neck_fpn_convs_0_conv_bias"])
    with pytest.raises(ValueError, match="epoch_N_ema.pth"):
        convert_release_state_dict(live, model.state_dict(), use_ema=True)


def test_nothing_half_written_on_failure_or_strict_refusal(model, release_state, tmp_path, monkeypatch):
    src, dst = tmp_path / "release.pth", tmp_path / "converted.pth"
    torch.save({"state_dict": {k: v for k, v in release_state.items() if k.startswith("img_neck.")}}, src)
    dst.write_bytes(b"previous")
    with pytest.raises(ValueError, match="strict"):
        convert_release_checkpoint(str(src), str(dst), model.state_dict(), strict=True)
    assert dst.read_bytes() == b"previous"

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_release_checkpoint(str(src), str(dst), model.state_dict())
    assert dst.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["converted.pth", "release.pth"]
    with pytest.raises(ValueError, match="is the input"):
        convert_release_checkpoint(str(src), str(src), model.state_dict())


# ---------------------------------------------------------------------------- parameter counts
def _count(module):
    return sum(p.numel() for p in module.parameters())


def _bn_params(c):
    return 2 * c


def test_release_parameter_counts(model):
    # Backbone: mmdet ResNet-50 (VC:119-129), bias-free convs; stem 7x7 conv + BN; per stage of planes p
    # (64 * 2**i, blocks 3/4/6/3): 1x1 (cin -> p), 3x3 (p -> p), 1x1 (p -> 4p), three BNs, and in the
    # first block a 1x1 downsample (cin -> 4p) + BN. No classifier (out_indices (2, 3), features only).
    backbone, cin = 64 * 3 * 49 + _bn_params(64), 64
    for stage, blocks in enumerate((3, 4, 6, 3)):
        p = 64 * 2 ** stage
        for block in range(blocks):
            fan = cin if block == 0 else 4 * p
            backbone += fan * p + p * p * 9 + p * 4 * p + _bn_params(p) * 2 + _bn_params(4 * p)
            if block == 0:
                backbone += fan * 4 * p + _bn_params(4 * p)
        cin = 4 * p
    assert backbone == 23_508_032
    # Neck: CustomFPN (VC:130-137, NK:113-134): 1x1 1024->256 and 2048->256, one 3x3 256->256, all with bias
    neck = (1024 * DIM + DIM) + (2048 * DIM + DIM) + (DIM * DIM * 9 + DIM)
    assert neck == 1_377_024
    # Depth net: tests/test_model_depth_net.py derives it from DN:279-325 at these widths
    depth_net = 25_948_886
    # Backward projection: tests/test_model_backward_projection.py (BP:68-69, PE:32-33, SCA:61-65/294-298,
    # CBL:155-161); the release's 6 x 80 cams_embeds (BF:50-51) is multiplied by 0 and not kept
    backward_projection = 909_808 - 6 * C
    # Temporal fusion: DET:110-126 (tests/test_model_release_modules.py)
    temporal_fusion = ((C + 1) * C + C + _bn_params(C)) + ((HISTORY + 1) * C * C + C + _bn_params(C))
    # Voxel encoder: R3D:188-247 + F3D:49-68 (tests/test_model_release_modules.py: 8,236,544 + 5,426,176)
    voxel_encoder = 8_236_544 + 5_426_176
    # Head: HD:79-146 (tests/test_model_release_modules.py)
    head = 2_943_808
    expected = {"backbone": backbone, "neck": neck, "depth_net": depth_net,
                "backward_projection": backward_projection, "temporal_fusion": temporal_fusion,
                "voxel_encoder": voxel_encoder, "head": head}
    assert {name: _count(getattr(model, name)) for name in expected} == expected
    # the release's LSS holds no weights either, only the fixed dx / bx / nx (VT:355-357, requires_grad=False)
    assert _count(model.forward_projection) == 0
    # and the release key list above agrees with every count: trainable release tensors per module
    shapes = release_shapes()
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    trainable = {k: s for k, s in shapes.items() if not k.endswith(buffers) and k not in RELEASE_DROPPED}
    per_module = {}
    for key, shape in trainable.items():
        ours = our_key_of(key).split(".")[0]
        per_module[ours] = per_module.get(ours, 0) + math.prod(shape)
    assert per_module == expected
    assert sum(expected.values()) == _count(model)
