"""Backward projection: deformable attention, the depth weight at the reference point, the
released structure and widths, and the query layout, each against a direct float64 loop."""
import math

import numpy as np
import pytest
import torch

from voxelsplat.structures import DEFAULT_GRID, OccupancyGrid
from voxelsplat.modeling.lifting.backward_projection import (
    RELEASE_PARAMETER_NAMES, BEVDeformableSelfAttention, DepthAwareBackwardProjection,
    DepthAwareSpatialCrossAttention, depth_weight_at_reference, multi_scale_deformable_attention,
)
from voxelsplat.modeling.lifting.depth_net import DepthBins
from voxelsplat.utils.geometry import make_transform


def _bilinear(feature, x, y):
    """(C,) bilinear sample of an (h, w, C) map at normalised (x, y) (0 / 1 = map edges), zeros outside."""
    h, w, channels = feature.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = np.zeros(channels)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= xx < w and 0 <= yy < h:
                out += wx * wy * feature[yy, xx]
    return out


def _randomize(module, rng, std=0.5):
    """Every parameter drawn at random, so no init (zeros, uniform softmax) hides a mistake."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(rng.normal(scale=std, size=tuple(p.shape))))
    return module


def _linear(layer, x):
    return x @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_deformable_attention_matches_per_point_bilinear_loop():
    rng = np.random.default_rng(0)
    batch, heads, ch, queries, points = 2, 3, 4, 5, 3
    shapes = [(3, 5), (4, 2)]
    value = rng.normal(size=(batch, sum(h * w for h, w in shapes), heads, ch))
    locations = rng.uniform(-0.3, 1.3, (batch, queries, heads, len(shapes), points, 2))
    weights = rng.random((batch, queries, heads, len(shapes), points))
    out = multi_scale_deformable_attention(torch.from_numpy(value), torch.tensor(shapes),
                                           torch.from_numpy(locations), torch.from_numpy(weights))
    expected = np.zeros((batch, queries, heads * ch))
    for b in range(batch):
        start = 0
        for level, (h, w) in enumerate(shapes):
            maps = value[b, start:start + h * w].reshape(h, w, heads, ch)
            start += h * w
            for q in range(queries):
                for g in range(heads):
                    for p in range(points):
                        x, y = locations[b, q, g, level, p]
                        expected[b, q, g * ch:(g + 1) * ch] += \
                            weights[b, q, g, level, p] * _bilinear(maps[:, :, g], x, y)
    assert out.shape == (batch, queries, heads * ch)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_bev_self_attention_matches_loop_reference():
    rng = np.random.default_rng(1)
    height, width, channels, heads, points = 3, 4, 8, 2, 3
    attention = _randomize(BEVDeformableSelfAttention(channels, heads, points).double(), rng)
    query = rng.normal(size=(2, height * width, channels))
    pos = rng.normal(size=(height * width, channels))
    out = attention(torch.from_numpy(query), torch.from_numpy(pos), (height, width)).detach().numpy()
    ch = channels // heads
    expected = np.zeros_like(query)
    for b in range(2):
        value = _linear(attention.value_proj, query[b]).reshape(height, width, channels)
        for q in range(height * width):
            y, x = divmod(q, width)  # row-major: query y * W + x
            with_pos = query[b, q] + pos[q]
            offsets = _linear(attention.sampling_offsets, with_pos).reshape(heads, points, 2)
            weights = _softmax(_linear(attention.attention_weights, with_pos).reshape(heads, points))
            sampled = np.zeros(channels)
            for g in range(heads):
                for p in range(points):
                    sx = (x + 0.5) / width + offsets[g, p, 0] / width
                    sy = (y + 0.5) / height + offsets[g, p, 1] / height
                    sampled[g * ch:(g + 1) * ch] += weights[g, p] * _bilinear(value[:, :, g * ch:(g + 1) * ch], sx, sy)
            expected[b, q] = query[b, q] + _linear(attention.output_proj, sampled)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)


def _depth_probability(depth_probs, bins, x, y, depth):
    """Probability of the clipped floor bin of ``depth`` at (x, y); 0 at or behind the camera."""
    if depth <= 1e-5:
        return 0.0
    index = min(max(math.floor((depth - bins.start) / bins.step), 0), depth_probs.shape[0] - 1)
    return _bilinear(depth_probs[index][:, :, None], x, y)[0]


def _cross_attention_reference(module, query, pos, context, depth_probs, refs, ref_depth, visible, depth_at):
    """The depth-aware cross-attention by loops; ``depth_at``: 'reference' (the release) or
    'sample' (the depth read at every sampling point instead, to show the test tells them apart)."""
    deform = module.deformable_attention
    heads, anchors, offsets_per_anchor = deform.num_heads, deform.num_anchors, deform.num_offsets
    batch, cams, channels, h, w = context.shape
    ch = channels // heads
    out = np.zeros_like(query)
    for b in range(batch):
        for q in range(query.shape[1]):
            with_pos = query[b, q] + pos[q]
            offsets = _linear(deform.sampling_offsets, with_pos).reshape(heads, offsets_per_anchor, anchors, 2)
            weights = _softmax(_linear(deform.attention_weights, with_pos).reshape(heads, -1))
            weights = weights.reshape(heads, offsets_per_anchor, anchors)
            total, cameras = np.zeros(channels), 0
            for n in range(cams):
                if not visible[b, n, q].any():
                    continue
                cameras += 1
                value = _linear(deform.value_proj, context[b, n].reshape(channels, -1).T).reshape(h, w, channels)
                for a in range(anchors):
                    rx, ry = refs[b, n, q, a]
                    for g in range(heads):
                        for o in range(offsets_per_anchor):
                            sx, sy = rx + offsets[g, o, a, 0] / w, ry + offsets[g, o, a, 1] / h
                            at = (rx, ry) if depth_at == "reference" else (sx, sy)
                            depth_weight = _depth_probability(depth_probs[b, n], module.bins, *at,
                                                              ref_depth[b, n, q, a])
                            total[g * ch:(g + 1) * ch] += weights[g, o, a] * depth_weight * \
                                _bilinear(value[:, :, g * ch:(g + 1) * ch], sx, sy)
            out[b, q] = query[b, q] + _linear(module.output_proj, total / max(cameras, 1))
    return out


def test_cross_attention_reads_the_depth_weight_at_the_reference_point():
    rng = np.random.default_rng(2)
    bins = DepthBins(2.0, 8.0, 1.0)
    batch, cams, channels, h, w, queries, heads, anchors, offsets = 2, 2, 8, 5, 7, 6, 2, 3, 2
    module = _randomize(DepthAwareSpatialCrossAttention(channels, bins, heads, anchors, offsets).double(), rng)
    query = rng.normal(size=(batch, queries, channels))
    pos = rng.normal(size=(queries, channels))
    context = rng.normal(size=(batch, cams, channels, h, w))
    depth_probs = _softmax(rng.normal(scale=2.0, size=(batch, cams, h, w, bins.num_bins))).transpose(0, 1, 4, 2, 3)
    refs = rng.uniform(-0.1, 1.1, (batch, cams, queries, anchors, 2))
    # depths below, inside and beyond the bins (clipped to the end bins), and behind the camera
    ref_depth = rng.uniform(-1.0, 11.0, (batch, cams, queries, anchors))
    visible = rng.random((batch, cams, queries, anchors)) < 0.5
    visible[0, :, 0] = False  # a query no camera sees: the query passes through (plus the projected bias)
    inputs = (query, pos, context, depth_probs, refs, ref_depth, visible)
    out = module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs)).detach().numpy()
    at_reference = _cross_attention_reference(module, *inputs, depth_at="reference")
    at_every_sample = _cross_attention_reference(module, *inputs, depth_at="sample")
    np.testing.assert_allclose(out, at_reference, rtol=1e-10, atol=1e-12)
    assert np.abs(at_every_sample - at_reference).max() > 1e-2  # the reference tells the two apart


def test_depth_weight_is_the_clipped_floor_bin_at_the_reference_point():
    rng = np.random.default_rng(3)
    bins = DepthBins(2.0, 6.0, 0.5)
    m, h, w, queries, anchors = 2, 4, 6, 5, 3
    depth_probs = rng.random((m, bins.num_bins, h, w))
    refs = rng.uniform(-0.2, 1.2, (m, queries, anchors, 2))
    ref_depth = rng.uniform(-1.0, 8.0, (m, queries, anchors))
    out = depth_weight_at_reference(*(torch.from_numpy(a) for a in (depth_probs, refs, ref_depth)), bins).numpy()
    expected = np.array([[[_depth_probability(depth_probs[i], bins, *refs[i, q, a], ref_depth[i, q, a])
                           for a in range(anchors)] for q in range(queries)] for i in range(m)])
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-14)
    assert (ref_depth > 6.0).any() and ((ref_depth < 2.0) & (ref_depth > 0)).any() and (ref_depth < 0).any()


# Release parameter shapes, derived by hand from the release definitions at its widths
# (occupancy_configs/voxelsplat/voxelsplat-r50.py:92-98: bev 100 x 100, numC_Trans = 80, _pos_dim_ = 40,
# FFN 4 x 80 = 320, one level), prefix ``backward_projection.``:
_C, _BEV, _POS, _FFN = 80, 100 * 100, 40, 320
_L = "transformer.encoder.layers.0."
_RELEASE_SHAPES = {
    # backward_projection.py:68-69: nn.Embedding(bev_h * bev_w, embed_dims)
    "bev_embedding.weight": (_BEV, _C),
    # positional_encoding.py:32-33: nn.Embedding(row_num_embed, num_feats), nn.Embedding(col_num_embed, num_feats)
    "positional_encoding.row_embed.weight": (100, _POS),
    "positional_encoding.col_embed.weight": (100, _POS),
    # self_attn = mmcv MultiScaleDeformableAttention (voxelsplat-r50.py:176-180, only embed_dims / num_levels=1
    # set: mmcv defaults 8 heads, 4 points): offsets 8*1*4*2 = 64, weights 8*1*4 = 32
    _L + "attentions.0.sampling_offsets.weight": (64, _C), _L + "attentions.0.sampling_offsets.bias": (64,),
    _L + "attentions.0.attention_weights.weight": (32, _C), _L + "attentions.0.attention_weights.bias": (32,),
    _L + "attentions.0.value_proj.weight": (_C, _C), _L + "attentions.0.value_proj.bias": (_C,),
    _L + "attentions.0.output_proj.weight": (_C, _C), _L + "attentions.0.output_proj.bias": (_C,),
    # spatial_cross_attention_depth.py:294-298 (DA_MSDeformableAttention, 8 heads default, num_points=8 from
    # voxelsplat-r50.py:189, num_levels=1): offsets 8*1*8*2 = 128, weights 8*1*8 = 64, no output_proj (:268)
    _L + "attentions.1.deformable_attention.sampling_offsets.weight": (128, _C),
    _L + "attentions.1.deformable_attention.sampling_offsets.bias": (128,),
    _L + "attentions.1.deformable_attention.attention_weights.weight": (64, _C),
    _L + "attentions.1.deformable_attention.attention_weights.bias": (64,),
    _L + "attentions.1.deformable_attention.value_proj.weight": (_C, _C),
    _L + "attentions.1.deformable_attention.value_proj.bias": (_C,),
    # spatial_cross_attention_depth.py:65: DA_SpatialCrossAttention.output_proj
    _L + "attentions.1.output_proj.weight": (_C, _C), _L + "attentions.1.output_proj.bias": (_C,),
    # custom_base_transformer_layer.py:158-161: one LayerNorm per 'norm' in the operation order (3)
    **{_L + f"norms.{i}.{k}": (_C,) for i in range(3) for k in ("weight", "bias")},
    # mmcv FFN (custom_base_transformer_layer.py:155-156, voxelsplat-r50.py:194-199): Linear 80->320, Linear 320->80
    _L + "ffns.0.layers.0.0.weight": (_FFN, _C), _L + "ffns.0.layers.0.0.bias": (_FFN,),
    _L + "ffns.0.layers.1.weight": (_C, _FFN), _L + "ffns.0.layers.1.bias": (_C,),
}
# bevformer.py:50-51 also holds cams_embeds (num_cams 6 x 80 = 480), multiplied by 0 (:99,
# use_cams_embeds=False at voxelsplat-r50.py:164): never changes the output, not reproduced.
# Sum: 800000 (bev_embedding) + 8000 (positional) + 20736 (self-attn: 5184 + 2592 + 6480 + 6480)
# + 28512 (cross-attn: 10368 + 5184 + 6480 + output_proj 6480) + 480 (3 norms) + 51600 (FFN: 25920 + 25680)
_RELEASE_PARAMETERS_WITHOUT_CAMS_EMBEDS = 909328


def test_parameters_match_the_release_one_to_one_at_released_widths():
    assert sum(math.prod(s) for s in _RELEASE_SHAPES.values()) == _RELEASE_PARAMETERS_WITHOUT_CAMS_EMBEDS
    layer = DepthAwareBackwardProjection(80, DEFAULT_GRID.coarsened(2))  # defaults = release (100 x 100 BEV)
    ours = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert sum(p.numel() for p in layer.parameters()) == _RELEASE_PARAMETERS_WITHOUT_CAMS_EMBEDS
    assert set(RELEASE_PARAMETER_NAMES) == set(_RELEASE_SHAPES)
    assert sorted(RELEASE_PARAMETER_NAMES.values()) == sorted(ours)  # one-to-one onto our parameters
    for release_name, shape in _RELEASE_SHAPES.items():
        assert ours[RELEASE_PARAMETER_NAMES[release_name]] == shape, release_name


def test_positional_encoding_and_anchors_follow_the_release_query_layout():
    grid = OccupancyGrid((-8.0, -4.0, -1.0, 8.0, 7.2, 5.4), 1.6)  # X = 10, Y = 7: a transpose cannot hide
    layer = DepthAwareBackwardProjection(8, grid, num_heads=2,
                                         num_points_in_pillar=4)
    x_size, y_size, _ = grid.shape
    assert layer.bev_shape == (y_size, x_size)
    pos = layer.positional_encoding().detach()
    anchors = layer.reference_points(torch.device("cpu"))
    col = layer.positional_encoding.col_embed.weight.detach()
    row = layer.positional_encoding.row_embed.weight.detach()
    for x, y in ((0, 0), (3, 5), (9, 1), (9, 6)):
        q = y * x_size + x
        torch.testing.assert_close(pos[q], torch.cat([col[x], row[y]]))
        centre = grid.index_to_center(np.array([x, y, 0]))
        np.testing.assert_allclose(anchors[q, :, :2].numpy(), np.tile(centre[:2], (4, 1)))
        # four anchors at the centres of four equal slabs of z (the release's z step 1.6 over 6.4 m)
        np.testing.assert_allclose(anchors[q, :, 2].numpy(), [-0.2, 1.4, 3.0, 4.6], atol=1e-12)


def _cameras(rng, num_cams, height, width):
    """Outward-looking cameras on a ring (OpenCV axes), float64."""
    intrinsics = np.zeros((1, num_cams, 3, 3))
    cam2ego = np.zeros((1, num_cams, 4, 4))
    for n in range(num_cams):
        focal = width * rng.uniform(0.5, 0.8)
        intrinsics[0, n] = [[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]]
        yaw = 2 * math.pi * n / num_cams + rng.uniform(-0.2, 0.2)
        forward = np.array([math.cos(yaw), math.sin(yaw), 0.0])
        right = np.cross(forward, [0.0, 0.0, 1.0])
        cam2ego[0, n] = make_transform(np.stack([right, np.cross(forward, right), forward], axis=1), [0.0, 0.0, 1.5])
    return torch.from_numpy(intrinsics), torch.from_numpy(cam2ego)


def _tiny_layer_and_inputs(rng, grid, channels=32):
    height, width, stride = 48, 96, 16
    bins = (2.0, 42.0, 2.0)
    layer = DepthAwareBackwardProjection(channels, grid, bins, num_heads=4,
                                         num_offsets=1, ffn_channels=64)  # the tiny config's widths
    intrinsics, cam2ego = _cameras(rng, 3, height, width)
    h, w = height // stride, width // stride
    volume = torch.randn(1, channels, *grid.shape, requires_grad=True)
    context = torch.randn(1, 3, channels, h, w, requires_grad=True)
    depth_logits = torch.randn(1, 3, DepthBins.from_config(bins).num_bins, h, w, requires_grad=True)
    return layer, (volume, context, depth_logits, intrinsics.float(), cam2ego.float(), (height, width))


def test_output_shape_and_gradients_reach_embeddings_context_and_depth():
    torch.manual_seed(4)
    grid = OccupancyGrid((-20.0, -20.0, -1.0, 20.0, 20.0, 5.4), 1.6)  # 25 x 25 x 4
    layer, (volume, context, depth_logits, *geometry) = _tiny_layer_and_inputs(np.random.default_rng(4), grid)
    out = layer(volume, context, depth_logits.softmax(2), *geometry)
    assert out.shape == volume.shape and torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    for name, tensor in (("bev_embedding", layer.bev_embedding.weight),
                         ("row_embed", layer.positional_encoding.row_embed.weight),
                         ("col_embed", layer.positional_encoding.col_embed.weight),
                         ("cross offsets", layer.cross_attn.deformable_attention.sampling_offsets.weight),
                         ("self offsets", layer.self_attn.sampling_offsets.weight),
                         ("context", context), ("depth", depth_logits), ("volume", volume)):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0, name
    # every query gets its own embedding's gradient
    assert (layer.bev_embedding.weight.grad.abs().sum(1) > 0).all()


def test_refined_cell_comes_from_its_own_query():
    """With both attentions' output projections zeroed, each cell's output depends only on
    its own query: cell (x, y) must read embedding row y * X + x and the volume's pillar (x, y)."""
    torch.manual_seed(5)
    grid = OccupancyGrid((-8.0, -4.0, -1.0, 8.0, 7.2, 5.4), 1.6)  # X = 10, Y = 7
    layer, (volume, context, depth_logits, *geometry) = _tiny_layer_and_inputs(np.random.default_rng(5), grid)
    with torch.no_grad():
        for projection in (layer.self_attn.output_proj, layer.cross_attn.output_proj):
            projection.weight.zero_()
    out = layer(volume, context, depth_logits.softmax(2), *geometry)
    x_size = grid.shape[0]
    for x, y in ((0, 0), (7, 2), (3, 6)):
        # a random mix of channels: their plain sum after a LayerNorm is constant
        cell = (out[0, :, x, y, 0] * torch.randn(out.shape[1])).sum()
        grad_embedding, grad_volume = torch.autograd.grad(cell, (layer.bev_embedding.weight, volume),
                                                          retain_graph=True)
        assert grad_embedding.abs().sum(1).nonzero().flatten().tolist() == [y * x_size + x]
        pillar = grad_volume[0].abs().sum(0).nonzero().tolist()  # the BEV feature averages the pillar
        assert pillar == [[x, y, z] for z in range(grid.shape[2])]


def test_bad_arguments_name_the_module_and_argument():
    grid = OccupancyGrid((-8.0, -8.0, -1.0, 8.0, 8.0, 5.4), 1.6)  # 10 x 10 x 4
    with pytest.raises(ValueError, match="DepthAwareBackwardProjection: embed_dims 30 not divisible by num_heads"):
        DepthAwareBackwardProjection(30, grid, num_heads=4)
    with pytest.raises(ValueError, match="DepthAwareBackwardProjection: embed_dims must be even"):
        DepthAwareBackwardProjection(9, grid, num_heads=3)
    with pytest.raises(ValueError, match="DepthAwareBackwardProjection: num_offsets"):
        DepthAwareBackwardProjection(8, grid, num_heads=2, num_offsets=0)
    layer = DepthAwareBackwardProjection(8, grid, num_heads=2)
    volume = torch.zeros(1, 8, 10, 10, 4)
    with pytest.raises(ValueError, match="DepthAwareBackwardProjection: depth_probs"):
        layer(volume, torch.zeros(1, 2, 8, 3, 4), torch.zeros(1, 2, 5, 3, 4), torch.eye(3).expand(1, 2, 3, 3),
              torch.eye(4).expand(1, 2, 4, 4), (48, 64))
