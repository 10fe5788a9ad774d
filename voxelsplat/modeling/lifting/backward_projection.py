"""Backward projection: one BEV encoder layer whose queries look back into the images.

FB-Occ's backward projection, structure and widths as released. Every BEV cell (a
pillar of the volume) holds one query: a learned embedding plus the forward-projected
volume averaged over height. One post-norm encoder layer refines the queries:

    deformable self-attention over the BEV map -> LayerNorm
    -> depth-aware spatial cross-attention into the cameras -> LayerNorm
    -> FFN -> LayerNorm

with a learned row/column positional encoding added to the queries (not to the values)
of both attentions. In the cross-attention, ``num_points_in_pillar`` reference points
along the pillar are projected into every camera; around each projection the query
samples the image context at ``num_offsets`` learned offsets (deformable attention), and
the attention weights of all samples that belong to a reference point are multiplied by
the depth net's probability of the reference point's depth bin (the floor bin), read at
the reference point's pixel (as the release's CUDA path computes it; its CPU fallback
leaves the depth weight out). Cameras that see the pillar are averaged. The refined BEV
features are added to every height of the forward-projected volume.

Queries are laid out as the release lays them out, row-major over (y, x): query
``y * X + x`` is cell ``(x, y)``. ``bev_embedding`` and the positional encoding therefore
take the release's weights unchanged (:data:`RELEASE_PARAMETER_NAMES`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ...structures import OccupancyGrid, check_grid
from ...utils.geometry import invert_transform, transform_points
from .depth_net import DepthBins

__all__ = [
    "multi_scale_deformable_attention", "depth_weight_at_reference", "LearnedBEVPositionalEncoding",
    "BEVDeformableSelfAttention", "DepthAwareDeformableAttention", "DepthAwareSpatialCrossAttention",
    "DepthAwareBackwardProjection", "RELEASE_PARAMETER_NAMES",
]

# A reference point counts as seen when it lies this far in front of the camera and inside
# the image by this fraction of the image size (the release's tolerance).
_PROJECTION_EPS = 1e-5
# Image positions are clamped to +-this many image sizes: far beyond any learned offset.
_FAR_AWAY = 1e3

# Release state-dict name (relative to the released ``BackwardProjection`` module) -> ours.
# The release's ``transformer.cams_embeds`` (6 x C) has no counterpart: it is multiplied by
# zero (``use_cams_embeds=False``), so it never changes the output.
_RELEASE_LAYER = "transformer.encoder.layers.0."
RELEASE_PARAMETER_NAMES = {
    "bev_embedding.weight": "bev_embedding.weight",
    "positional_encoding.row_embed.weight": "positional_encoding.row_embed.weight",
    "positional_encoding.col_embed.weight": "positional_encoding.col_embed.weight",
    **{f"{_RELEASE_LAYER}attentions.0.{name}.{kind}": f"self_attn.{name}.{kind}"
       for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
       for kind in ("weight", "bias")},
    **{f"{_RELEASE_LAYER}attentions.1.deformable_attention.{name}.{kind}":
       f"cross_attn.deformable_attention.{name}.{kind}"
       for name in ("sampling_offsets", "attention_weights", "value_proj") for kind in ("weight", "bias")},
    **{f"{_RELEASE_LAYER}attentions.1.output_proj.{kind}": f"cross_attn.output_proj.{kind}"
       for kind in ("weight", "bias")},
    **{f"{_RELEASE_LAYER}norms.{i}.{kind}": f"norm{i + 1}.{kind}" for i in range(3) for kind in ("weight", "bias")},
    **{f"{_RELEASE_LAYER}ffns.0.layers.0.0.{kind}": f"ffn.0.{kind}" for kind in ("weight", "bias")},
    **{f"{_RELEASE_LAYER}ffns.0.layers.1.{kind}": f"ffn.3.{kind}" for kind in ("weight", "bias")},
}


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: Union[torch.Tensor, Sequence[Tuple[int, int]]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable attention: attention-weighted sum of bilinear samples of feature maps.

    For batch b, query q, head g:
        out[b, q, g] = sum_{l, p} attention_weights[b, q, g, l, p] * V_{b, l, g}(sampling_locations[b, q, g, l, p])
    where ``V_{b, l, g}(x, y)`` interpolates level l's map of head g bilinearly. Locations are
    normalised: x = 0 / 1 is the left / right edge of the map, y = 0 / 1 the top / bottom
    edge, so cell (i, j) of an (h, w) map is centred at ((j + 0.5) / w, (i + 0.5) / h).
    Outside the map the features are zero.

    Args:
        value: (B, S, G, Ch) the L levels' maps, each flattened row-major (h_l rows of w_l),
            concatenated along S = sum_l h_l * w_l.
        spatial_shapes: (L, 2) the levels' (h_l, w_l).
        sampling_locations: (B, Q, G, L, P, 2) normalised (x, y).
        attention_weights: (B, Q, G, L, P).
    Returns:
        (B, Q, G * Ch), heads concatenated.
    """
    shapes = [(int(h), int(w)) for h, w in (spatial_shapes.tolist() if torch.is_tensor(spatial_shapes)
                                           else spatial_shapes)]
    b, s, g, ch = value.shape
    q, num_levels, p = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    if num_levels != len(shapes) or sum(h * w for h, w in shapes) != s:
        raise ValueError(f"multi_scale_deformable_attention: spatial_shapes {shapes} do not match value "
                         f"{tuple(value.shape)} and sampling_locations {tuple(sampling_locations.shape)}")
    grids = 2.0 * sampling_locations - 1.0  # grid_sample's [-1, 1], align_corners=False: -1 = map edge
    sampled = []
    for level, value_level in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[level]
        maps = value_level.permute(0, 2, 3, 1).reshape(b * g, ch, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(b * g, q, p, 2)
        sampled.append(F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(sampled, dim=-2)  # (B*G, Ch, Q, L, P)
    weights = attention_weights.transpose(1, 2).reshape(b * g, 1, q, num_levels, p)
    out = (sampled * weights).sum((-1, -2))  # (B*G, Ch, Q)
    return out.view(b, g * ch, q).transpose(1, 2)


def depth_weight_at_reference(depth_probs: torch.Tensor, reference_points: torch.Tensor,
                              reference_depth: torch.Tensor, bins: DepthBins) -> torch.Tensor:
    """Probability of each reference point's depth bin, read at the reference point's pixel.

    The bin is the floor bin ``floor((depth - start) / step)`` clipped to [0, D - 1]; its
    probability is interpolated bilinearly at the reference point (zero outside the map,
    as :func:`multi_scale_deformable_attention` samples). Points at or behind the camera
    (depth <= 1e-5 m) get weight zero.

    Args:
        depth_probs: (M, D, h, w) depth distributions (softmax over D).
        reference_points: (M, Q, A, 2) normalised (x, y) image positions.
        reference_depth: (M, Q, A) camera depth (m).
    Returns:
        (M, Q, A).
    """
    m, d, h, w = depth_probs.shape
    q, a = reference_points.shape[1:3]
    distribution = multi_scale_deformable_attention(
        depth_probs.flatten(2).transpose(1, 2)[:, :, None], [(h, w)],
        reference_points.reshape(m, q * a, 1, 1, 1, 2), reference_points.new_ones(m, q * a, 1, 1, 1),
    )  # (M, Q*A, D)
    index = torch.floor((reference_depth - bins.start) / bins.step).clamp(0, d - 1).long()
    weight = distribution.gather(-1, index.reshape(m, q * a, 1)).view(m, q, a)
    return weight * (reference_depth > _PROJECTION_EPS).to(weight.dtype)


def _ring_offsets(num_heads: int, radii: torch.Tensor) -> torch.Tensor:
    """(G, *radii.shape, 2) initial sampling offsets in feature cells: head g points along
    angle 2 pi g / G, scaled so the larger coordinate is 1, times each radius."""
    theta = torch.arange(num_heads, dtype=torch.float32) * (2.0 * math.pi / num_heads)
    direction = torch.stack([theta.cos(), theta.sin()], -1)
    direction = direction / direction.abs().max(-1, keepdim=True)[0]
    return direction.view(num_heads, *([1] * radii.dim()), 2) * radii[..., None]


class LearnedBEVPositionalEncoding(nn.Module):
    """Learned positional encoding of an (H rows = y, W columns = x) BEV map:
    ``pos[y * W + x] = concat(col_embed[x], row_embed[y])`` of width ``2 * num_feats``."""

    def __init__(self, num_feats: int, num_rows: int, num_cols: int):
        super().__init__()
        self.row_embed = nn.Embedding(num_rows, num_feats)
        self.col_embed = nn.Embedding(num_cols, num_feats)

    def forward(self) -> torch.Tensor:
        """(H * W, 2 * num_feats)."""
        rows, cols = self.row_embed.num_embeddings, self.col_embed.num_embeddings
        return torch.cat([self.col_embed.weight[None].expand(rows, cols, -1),
                          self.row_embed.weight[:, None].expand(rows, cols, -1)], dim=-1).flatten(0, 1)


class BEVDeformableSelfAttention(nn.Module):
    """Deformable self-attention over one BEV map (one level): each query samples the
    value-projected queries at ``num_points`` learned offsets per head around its own cell.

    Args:
        embed_dims: query width; num_heads: heads (divide ``embed_dims``);
        num_points: samples per head; dropout: on the attention output.

    Forward:
        query: (B, H*W, C) row-major over the (H, W) map; query_pos: (H*W, C) or (B, H*W, C),
        added to the query that predicts offsets and weights (not to the values);
        bev_shape: (H, W).
    Returns:
        (B, H*W, C): ``query`` + attention output.
    """

    def __init__(self, embed_dims: int, num_heads: int = 8, num_points: int = 4, dropout: float = 0.0):
        super().__init__()
        self.embed_dims, self.num_heads, self.num_points = embed_dims, num_heads, num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As initialised in the release: offsets start on a ring per head (radius 1..P
        # cells); the release's transformer-wide Xavier pass then also re-draws the offset and
        # weight matrices of this attention (not of the cross-attention, which is re-initialised
        # after it), so offsets start query-dependent.
        radii = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(_ring_offsets(self.num_heads, radii).reshape(-1))
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.sampling_offsets, self.attention_weights, self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor, bev_shape: Tuple[int, int]) -> torch.Tensor:
        b, num_queries, c = query.shape
        height, width = bev_shape
        heads, points = self.num_heads, self.num_points
        value = self.value_proj(query).view(b, num_queries, heads, c // heads)
        query_with_pos = query + query_pos
        offsets = self.sampling_offsets(query_with_pos).view(b, num_queries, heads, 1, points, 2)
        weights = self.attention_weights(query_with_pos).view(b, num_queries, heads, points).softmax(-1)
        ys, xs = torch.meshgrid(torch.arange(height, device=query.device, dtype=query.dtype),
                                torch.arange(width, device=query.device, dtype=query.dtype), indexing="ij")
        reference = torch.stack([(xs.flatten() + 0.5) / width, (ys.flatten() + 0.5) / height], -1)  # (H*W, 2)
        locations = reference[None, :, None, None, None, :] + offsets / offsets.new_tensor([width, height])
        out = multi_scale_deformable_attention(value, [(height, width)], locations,
                                               weights.view(b, num_queries, heads, 1, points))
        return query + self.dropout(self.output_proj(out))


class DepthAwareDeformableAttention(nn.Module):
    """Deformable attention from BEV queries into every camera's features: per head,
    ``num_offsets`` samples around each of the ``num_anchors`` reference projections
    (``num_offsets * num_anchors`` points, anchor index fastest, as the release orders its
    offset and weight outputs), one softmax over them, each weight then multiplied by its
    anchor's depth weight (not renormalised).

    Forward:
        query: (B, Q, C) queries with the positional encoding added.
        value: (B, N, h*w, C) image features, row-major.
        feature_shape: (h, w).
        reference_points: (B, N, Q, A, 2) normalised (x, y) projections of the anchors.
        depth_weights: (B, N, Q, A) from :func:`depth_weight_at_reference`.
    Returns:
        (B, N, Q, C) per camera (no output projection).
    """

    def __init__(self, embed_dims: int, num_heads: int = 8, num_anchors: int = 4, num_offsets: int = 2):
        super().__init__()
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.num_anchors, self.num_offsets = num_anchors, num_offsets
        num_points = num_offsets * num_anchors
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start on a ring per head, the k-th offset of every anchor at radius k
        # (feature cells); uniform attention.
        radii = torch.arange(1, self.num_offsets + 1, dtype=torch.float32)[:, None].expand(-1, self.num_anchors)
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(_ring_offsets(self.num_heads, radii).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)

    def forward(self, query: torch.Tensor, value: torch.Tensor, feature_shape: Tuple[int, int],
                reference_points: torch.Tensor, depth_weights: torch.Tensor) -> torch.Tensor:
        b, n, num_values, c = value.shape
        num_queries = query.shape[1]
        h, w = feature_shape
        heads, anchors, offsets_per_anchor = self.num_heads, self.num_anchors, self.num_offsets
        points = anchors * offsets_per_anchor
        value = self.value_proj(value).view(b * n, num_values, heads, c // heads)
        offsets = self.sampling_offsets(query).view(b, 1, num_queries, heads, offsets_per_anchor, anchors, 2)
        offsets = offsets / offsets.new_tensor([w, h])
        locations = reference_points[:, :, :, None, None] + offsets  # (B, N, Q, G, O, A, 2)
        weights = self.attention_weights(query).view(b, 1, num_queries, heads, points).softmax(-1)
        weights = weights.view(b, 1, num_queries, heads, offsets_per_anchor, anchors) \
            * depth_weights[:, :, :, None, None, :]  # (B, N, Q, G, O, A)
        out = multi_scale_deformable_attention(
            value, [(h, w)], locations.reshape(b * n, num_queries, heads, 1, points, 2),
            weights.reshape(b * n, num_queries, heads, 1, points),
        )
        return out.view(b, n, num_queries, c)


class DepthAwareSpatialCrossAttention(nn.Module):
    """Depth-aware spatial cross-attention: each query attends, in every camera that sees at
    least one of its anchors, through :class:`DepthAwareDeformableAttention`; the cameras'
    results are averaged over those cameras, projected and added to the query.

    Forward:
        query: (B, Q, C); query_pos: (Q, C) or (B, Q, C).
        context: (B, N, C, h, w) image features; depth_probs: (B, N, D, h, w).
        reference_points: (B, N, Q, A, 2) normalised (x, y); reference_depth: (B, N, Q, A) m;
        visible: (B, N, Q, A) bool, anchor in front of the camera and inside the image.
    Returns:
        (B, Q, C).
    """

    def __init__(self, embed_dims: int, bins: DepthBins, num_heads: int = 8, num_anchors: int = 4,
                 num_offsets: int = 2, dropout: float = 0.0):
        super().__init__()
        self.bins = bins
        self.deformable_attention = DepthAwareDeformableAttention(embed_dims, num_heads, num_anchors, num_offsets)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor, context: torch.Tensor, depth_probs: torch.Tensor,
                reference_points: torch.Tensor, reference_depth: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        b, n, c, h, w = context.shape
        num_queries, anchors = reference_points.shape[2:4]
        depth_weights = depth_weight_at_reference(
            depth_probs.flatten(0, 1).to(query.dtype), reference_points.flatten(0, 1),
            reference_depth.flatten(0, 1), self.bins,
        ).view(b, n, num_queries, anchors)
        value = context.flatten(3).transpose(2, 3)  # (B, N, h*w, C)
        per_camera = self.deformable_attention(query + query_pos, value, (h, w), reference_points, depth_weights)
        seen = visible.any(-1)  # (B, N, Q): the camera attends for this query
        per_camera = per_camera * seen[..., None].to(per_camera.dtype)
        cameras = seen.sum(1).clamp(min=1).to(per_camera.dtype)  # (B, Q)
        return query + self.dropout(self.output_proj(per_camera.sum(1) / cameras[..., None]))


class DepthAwareBackwardProjection(nn.Module):
    """FB-Occ's backward projection: one BEV encoder layer (deformable self-attention ->
    norm -> depth-aware spatial cross-attention -> norm -> FFN -> norm) over learned queries
    plus the forward-projected volume, added back to the volume.

    Args:
        embed_dims: query/value width (= the volume's and the context's channels); even
            (the positional encoding gives half to x, half to y).
        grid: the volume's grid (the forward projection's); its X x Y cells are the queries.
        depth_bins: (start, stop, step) of the depth net.
        num_heads: heads of the cross-attention (divide ``embed_dims``).
        num_points_in_pillar: reference heights per query (anchors), at the centres of
            equal slabs of the z range.
        num_offsets: learned samples around each anchor's projection, per head.
        ffn_channels: hidden width of the FFN (None or 0: 4 x ``embed_dims``).
        dropout: on both attention outputs and in the FFN.
        self_attn_heads: heads of the self-attention (None: ``num_heads``).
        self_attn_points: samples per head of the self-attention.

    Defaults are the released ones (``embed_dims=80`` on a 100 x 100 BEV at 0.8 m): 8 heads,
    4 anchors x 2 offsets, FFN 320, self-attention 8 heads x 4 points.

    Forward:
        volume: (B, C, X, Y, Z) forward-projected features (augmented ego frame).
        context: (B, N, C, h, w) image features (the depth net's context).
        depth_probs: (B, N, D, h, w).
        intrinsics: (B, N, 3, 3) of the augmented images; cam2ego: (B, N, 4, 4) camera ->
        augmented ego; input_hw: (H, W) of the network input images.
    Returns:
        (B, C, X, Y, Z): ``volume`` plus the refined BEV features at every height.
    """

    def __init__(
        self,
        embed_dims: int,
        grid: OccupancyGrid,
        depth_bins: Sequence[float] = (2.0, 42.0, 0.5),
        num_heads: int = 8,
        num_points_in_pillar: int = 4,
        num_offsets: int = 2,
        ffn_channels: Optional[int] = None,
        dropout: float = 0.0,
        self_attn_heads: Optional[int] = None,
        self_attn_points: int = 4,
    ):
        super().__init__()
        name = type(self).__name__
        self_attn_heads = num_heads if self_attn_heads is None else self_attn_heads
        ffn_channels = ffn_channels or 4 * embed_dims
        for key, value in (("embed_dims", embed_dims), ("num_heads", num_heads),
                           ("num_points_in_pillar", num_points_in_pillar), ("num_offsets", num_offsets),
                           ("ffn_channels", ffn_channels), ("self_attn_heads", self_attn_heads),
                           ("self_attn_points", self_attn_points)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name}: {key} must be a positive integer, got {value!r}")
        if embed_dims % 2:
            raise ValueError(f"{name}: embed_dims must be even (half x, half y positional encoding), got {embed_dims}")
        for key, heads in (("num_heads", num_heads), ("self_attn_heads", self_attn_heads)):
            if embed_dims % heads:
                raise ValueError(f"{name}: embed_dims {embed_dims} not divisible by {key} {heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
        self.grid = check_grid(grid, name)
        self.bins = DepthBins.from_config(depth_bins)
        self.embed_dims = int(embed_dims)
        self.num_points_in_pillar = int(num_points_in_pillar)
        x_size, y_size, _ = self.grid.shape
        if x_size < 1 or y_size < 1:
            raise ValueError(f"{name}: grid gives an empty BEV {self.grid.shape[:2]}")

        self.bev_embedding = nn.Embedding(y_size * x_size, embed_dims)
        self.positional_encoding = LearnedBEVPositionalEncoding(embed_dims // 2, y_size, x_size)
        self.self_attn = BEVDeformableSelfAttention(embed_dims, self_attn_heads, self_attn_points, dropout)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.cross_attn = DepthAwareSpatialCrossAttention(embed_dims, self.bins, num_heads, num_points_in_pillar,
                                                          num_offsets, dropout)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.ffn = nn.Sequential(nn.Linear(embed_dims, ffn_channels), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_channels, embed_dims), nn.Dropout(dropout))
        self.norm3 = nn.LayerNorm(embed_dims)
        # The release's transformer-wide Xavier pass covers the FFN matrices too (biases keep
        # the default init); the embeddings keep nn.Embedding's N(0, 1).
        nn.init.xavier_uniform_(self.ffn[0].weight)
        nn.init.xavier_uniform_(self.ffn[3].weight)

    @property
    def bev_shape(self) -> Tuple[int, int]:
        """(H, W) = (Y, X) of the query map."""
        x_size, y_size, _ = self.grid.shape
        return y_size, x_size

    def reference_points(self, device, dtype=torch.float64) -> torch.Tensor:
        """(Y*X, P, 3) anchors in the augmented ego frame, in query order (query ``y * X + x``
        is cell (x, y)): the cell's centre at P heights, the centres of P equal slabs of z."""
        lo, hi = self.grid.range_min, self.grid.range_max
        x_size, y_size, _ = self.grid.shape
        size, pillar = self.grid.voxel_size, self.num_points_in_pillar
        xs = lo[0] + size * (torch.arange(x_size, device=device, dtype=dtype) + 0.5)
        ys = lo[1] + size * (torch.arange(y_size, device=device, dtype=dtype) + 0.5)
        zs = lo[2] + (hi[2] - lo[2]) * (torch.arange(pillar, device=device, dtype=dtype) + 0.5) / pillar
        gy, gx, gz = torch.meshgrid(ys, xs, zs, indexing="ij")
        return torch.stack([gx, gy, gz], dim=-1).reshape(y_size * x_size, pillar, 3)

    def project_reference_points(self, intrinsics: torch.Tensor, cam2ego: torch.Tensor,
                                 input_hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Anchors in every camera, computed in float64.

        Returns:
            reference_points (B, N, Q, P, 2) normalised (x, y) = (u / W, v / H);
            reference_depth (B, N, Q, P) m along the optical axis;
            visible (B, N, Q, P) bool: depth > 1e-5 and strictly inside the image by 1e-5 of its size.
        """
        b, n = intrinsics.shape[:2]
        height, width = input_hw
        anchors = self.reference_points(intrinsics.device).reshape(1, 1, -1, 3)
        cam_points = transform_points(invert_transform(cam2ego.to(torch.float64)), anchors)  # (B, N, Q*P, 3)
        pixels = cam_points @ intrinsics.to(torch.float64).transpose(-1, -2)
        depth = pixels[..., 2]
        # Points at or behind the camera get far-away finite coordinates (their depth weight is
        # zero); the clamp keeps grid_sample's integer cell indices in range.
        uv = pixels[..., :2] / depth.clamp(min=_PROJECTION_EPS)[..., None]
        normalized = (uv / uv.new_tensor([width, height])).clamp(-_FAR_AWAY, _FAR_AWAY)
        inside = ((normalized > _PROJECTION_EPS) & (normalized < 1 - _PROJECTION_EPS)).all(-1)
        visible = (depth > _PROJECTION_EPS) & inside
        shape = (b, n, -1, self.num_points_in_pillar)
        return normalized.view(*shape, 2), depth.view(shape), visible.view(shape)

    def forward(self, volume: torch.Tensor, context: torch.Tensor, depth_probs: torch.Tensor,
                intrinsics: torch.Tensor, cam2ego: torch.Tensor, input_hw: Tuple[int, int]) -> torch.Tensor:
        name = type(self).__name__
        b, c, x_size, y_size, _ = volume.shape
        if (x_size, y_size) != tuple(self.grid.shape[:2]) or c != self.embed_dims:
            raise ValueError(f"{name}: volume {tuple(volume.shape)} does not match grid {self.grid.shape} "
                             f"with {self.embed_dims} channels")
        if context.dim() != 5 or context.shape[:3] != (b, context.shape[1], c):
            raise ValueError(f"{name}: context must be (B={b}, N, C={c}, h, w), got {tuple(context.shape)}")
        n, h, w = context.shape[1], context.shape[3], context.shape[4]
        if depth_probs.shape != (b, n, self.bins.num_bins, h, w):
            raise ValueError(f"{name}: depth_probs {tuple(depth_probs.shape)} does not match context "
                             f"{tuple(context.shape)} with {self.bins.num_bins} depth bins")

        bev = volume.mean(-1).transpose(2, 3).flatten(2).transpose(1, 2)  # (B, Y*X, C), query y * X + x
        query = bev + self.bev_embedding.weight.to(bev.dtype)
        pos = self.positional_encoding().to(bev.dtype)
        reference_points, reference_depth, visible = self.project_reference_points(intrinsics, cam2ego, input_hw)

        query = self.norm1(self.self_attn(query, pos, self.bev_shape))
        query = self.norm2(self.cross_attn(query, pos, context, depth_probs, reference_points.to(query.dtype),
                                           reference_depth.to(query.dtype), visible))
        query = self.norm3(query + self.ffn(query))
        refined = query.transpose(1, 2).reshape(b, c, y_size, x_size).transpose(2, 3)  # (B, C, X, Y)
        return volume + refined[..., None]
