"""Backward projection: depth-aware spatial cross-attention from BEV queries to images.

Each BEV cell (a pillar of the volume) holds one query. A few reference points along
the pillar are projected into every camera; around each projection the query samples
the image context at learned offsets (deformable attention, ``grid_sample``), and every
sample's attention weight is multiplied by the depth net's probability that the
surface seen at that pixel lies at the reference point's depth (FB-Occ's depth-aware
attention). Cameras that see the pillar are averaged. One encoder layer:
cross-attention -> residual + LayerNorm -> FFN -> residual + LayerNorm. The refined
BEV features are added to every height of the forward-projected volume.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...data.occupancy_meta import OccupancyGrid
from ...utils.geometry import invert_transform, project_points
from ..registry import LIFTING_REGISTRY
from .depth_net import DepthBins

__all__ = ["normalized_image_coords", "depth_aware_sampling", "DepthAwareBackwardProjection"]


def normalized_image_coords(uv: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    """Pixel coordinates (integer u = left edge of column u) -> ``grid_sample`` coordinates
    in [-1, 1] for ``align_corners=False`` (-1 = left/top image edge)."""
    height, width = image_size
    scale = uv.new_tensor([2.0 / width, 2.0 / height])
    return uv * scale - 1.0


def depth_aware_sampling(
    value: torch.Tensor,
    depth_probs: torch.Tensor,
    sampling_uv: torch.Tensor,
    sample_depth: torch.Tensor,
    attention: torch.Tensor,
    valid: torch.Tensor,
    image_size: Tuple[int, int],
    bins: DepthBins,
) -> torch.Tensor:
    """Weighted sum of bilinearly sampled image features, weights x depth probability.

    For camera-image m, query q, head g and sample s:
        out[m, q, g] = sum_s attention[m,q,g,s] * valid[m,q,s] * P_m(sample_depth[m,q,s] | uv)
                       * value_m,g(uv),   uv = sampling_uv[m,q,g,s]
    where ``value_m,g(uv)`` is the bilinear interpolation of the feature map at pixel
    ``uv`` (feature cell centres at (j + 0.5) * stride, zero outside the image) and
    ``P_m(d | uv)`` interpolates the depth distribution bilinearly in ``uv`` and linearly
    in depth between bin centres (zero beyond the first/last centre's half bin).

    Args:
        value: (M, G, Ch, h, w) per-head image features.
        depth_probs: (M, D, h, w) depth distribution (softmax over D).
        sampling_uv: (M, Q, G, S, 2) pixel coordinates in the (H, W) image.
        sample_depth: (M, Q, S) camera depth (m) of each sample's reference point.
        attention: (M, Q, G, S) attention weights.
        valid: (M, Q, S) bool, reference point in front of the camera and inside the image.
        image_size: (H, W).
    Returns:
        (M, Q, G * Ch).
    """
    m, g, ch, h, w = value.shape
    q, s = sampling_uv.shape[1], sampling_uv.shape[3]
    grid = normalized_image_coords(sampling_uv, image_size)  # (M, Q, G, S, 2)
    grid_per_head = grid.permute(0, 2, 1, 3, 4).reshape(m * g, q, s, 2)
    sampled = F.grid_sample(value.reshape(m * g, ch, h, w), grid_per_head, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # (M*G, Ch, Q, S)
    depth_coord = (sample_depth - bins.start) / (bins.stop - bins.start) * 2.0 - 1.0  # (M, Q, S)
    grid_3d = torch.cat([grid, depth_coord[:, :, None, :, None].expand(m, q, g, s, 1)], dim=-1)
    depth_weight = F.grid_sample(depth_probs[:, None], grid_3d.permute(0, 2, 1, 3, 4), mode="bilinear",
                                 padding_mode="zeros", align_corners=False)[:, 0]  # (M, G, Q, S)
    weight = attention.permute(0, 2, 1, 3) * depth_weight * valid[:, None].to(attention.dtype)  # (M, G, Q, S)
    out = (sampled * weight.reshape(m * g, 1, q, s)).sum(-1)  # (M*G, Ch, Q)
    return out.view(m, g * ch, q).permute(0, 2, 1)


@LIFTING_REGISTRY.register()
class DepthAwareBackwardProjection(nn.Module):
    """One depth-aware spatial cross-attention encoder layer over the volume's BEV cells.

    Args:
        embed_dims: query/value width (= the volume's channels).
        point_cloud_range, voxel_size: the volume's grid (its X x Y cells are the queries).
        depth_bins: (start, stop, step) of the depth net.
        num_heads: attention heads (embed_dims must be divisible by it).
        num_points_in_pillar: reference heights per query, evenly spread over z.
        num_offsets: learned sampling points around each reference projection.
        ffn_channels: hidden width of the feed-forward block.
        dropout: dropout on the attention output and in the FFN.

    Forward:
        volume: (B, C, X, Y, Z) forward-projected features.
        context: (B, N, C, h, w) image features (the depth net's context).
        depth_probs: (B, N, D, h, w).
        intrinsics: (B, N, 3, 3); cam2ego: (B, N, 4, 4); image_size: (H, W).
    Returns:
        (B, C, X, Y, Z): ``volume`` plus the refined BEV features at every height.
    """

    def __init__(
        self,
        embed_dims: int,
        point_cloud_range: Sequence[float],
        voxel_size: float,
        depth_bins: Sequence[float] = (2.0, 42.0, 0.5),
        num_heads: int = 8,
        num_points_in_pillar: int = 4,
        num_offsets: int = 2,
        ffn_channels: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"DepthAwareBackwardProjection: embed_dims {embed_dims} not divisible by num_heads {num_heads}")
        self.grid = OccupancyGrid(tuple(float(v) for v in point_cloud_range), float(voxel_size))
        self.bins = DepthBins.from_config(depth_bins)
        self.embed_dims, self.num_heads = int(embed_dims), int(num_heads)
        self.num_points_in_pillar, self.num_offsets = int(num_points_in_pillar), int(num_offsets)
        x_size, y_size, _ = self.grid.shape
        self.row_embed = nn.Parameter(torch.randn(x_size, embed_dims - embed_dims // 2) * 0.02)
        self.col_embed = nn.Parameter(torch.randn(y_size, embed_dims // 2) * 0.02)
        samples = num_heads * num_points_in_pillar * num_offsets
        self.sampling_offsets = nn.Linear(embed_dims, samples * 2)
        self.attention_weights = nn.Linear(embed_dims, samples)
        self.value_proj = nn.Conv2d(embed_dims, embed_dims, 1)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dims)
        ffn_channels = ffn_channels or 4 * embed_dims
        self.ffn = nn.Sequential(nn.Linear(embed_dims, ffn_channels), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_channels, embed_dims))
        self.norm2 = nn.LayerNorm(embed_dims)
        self._init_weights()

    def _init_weights(self) -> None:
        # Offsets start on a ring per head (radius 1, 2, ... feature pixels), weights uniform.
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        ring = torch.stack([theta.cos(), theta.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True)[0]
        radius = torch.arange(1, self.num_offsets + 1, dtype=torch.float32)
        bias = ring[:, None, None, :] * radius[None, None, :, None]
        bias = bias.expand(self.num_heads, self.num_points_in_pillar, self.num_offsets, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def reference_points(self, device, dtype=torch.float64) -> torch.Tensor:
        """(X*Y, P, 3) reference points in the augmented ego frame: each BEV cell's centre at
        ``num_points_in_pillar`` heights evenly spread over the z range."""
        lo, hi = self.grid.range_min, self.grid.range_max
        x_size, y_size, _ = self.grid.shape
        size = self.grid.voxel_size
        xs = lo[0] + size * (torch.arange(x_size, device=device, dtype=dtype) + 0.5)
        ys = lo[1] + size * (torch.arange(y_size, device=device, dtype=dtype) + 0.5)
        zs = lo[2] + (hi[2] - lo[2]) * (torch.arange(self.num_points_in_pillar, device=device, dtype=dtype) + 0.5) \
            / self.num_points_in_pillar
        gx, gy, gz = torch.meshgrid(xs, ys, zs, indexing="ij")
        return torch.stack([gx, gy, gz], dim=-1).reshape(x_size * y_size, self.num_points_in_pillar, 3)

    def forward(self, volume: torch.Tensor, context: torch.Tensor, depth_probs: torch.Tensor,
                intrinsics: torch.Tensor, cam2ego: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        b, c, x_size, y_size, _ = volume.shape
        n, h, w = context.shape[1], context.shape[-2], context.shape[-1]
        heads, pillar, offsets = self.num_heads, self.num_points_in_pillar, self.num_offsets
        num_queries = x_size * y_size
        if (x_size, y_size) != tuple(self.grid.shape[:2]) or c != self.embed_dims:
            raise ValueError(f"DepthAwareBackwardProjection: volume {tuple(volume.shape)} does not match grid "
                             f"{self.grid.shape} with {self.embed_dims} channels")
        pos = torch.cat([self.row_embed[:, None].expand(x_size, y_size, -1),
                         self.col_embed[None].expand(x_size, y_size, -1)], dim=-1).reshape(num_queries, c)
        bev = volume.mean(-1).flatten(2).transpose(1, 2)  # (B, Q, C), queries in [x, y] order
        query = bev + pos

        # Reference projections (float64 geometry), shared by all heads and offsets.
        refs = self.reference_points(volume.device).reshape(1, 1, num_queries * pillar, 3)
        world2cam = invert_transform(cam2ego.to(torch.float64))
        uv, depth = project_points(intrinsics.to(torch.float64), world2cam, refs)
        height, width = image_size
        valid = (depth > 1e-3) & (uv[..., 0] >= 0) & (uv[..., 0] < width) & (uv[..., 1] >= 0) & (uv[..., 1] < height)
        uv = uv.to(volume.dtype).reshape(b, n, num_queries, 1, pillar, 1, 2)
        depth = depth.to(volume.dtype).reshape(b, n, num_queries, pillar)
        valid = valid.reshape(b, n, num_queries, pillar)

        stride = uv.new_tensor([width / w, height / h])
        offset = self.sampling_offsets(query).view(b, 1, num_queries, heads, pillar, offsets, 2) * stride
        sampling_uv = (uv + offset).reshape(b * n, num_queries, heads, pillar * offsets, 2)
        attention = self.attention_weights(query).view(b, num_queries, heads, pillar * offsets).softmax(-1)
        attention = attention[:, None].expand(b, n, num_queries, heads, pillar * offsets)
        sample_depth = depth[..., None].expand(b, n, num_queries, pillar, offsets).reshape(b * n, num_queries, -1)
        sample_valid = valid[..., None].expand(b, n, num_queries, pillar, offsets).reshape(b * n, num_queries, -1)

        value = self.value_proj(context.flatten(0, 1)).view(b * n, heads, c // heads, h, w)
        per_camera = depth_aware_sampling(
            value, depth_probs.flatten(0, 1).to(value.dtype), sampling_uv,
            sample_depth, attention.reshape(b * n, num_queries, heads, -1), sample_valid, image_size, self.bins,
        ).view(b, n, num_queries, c)
        cameras_hit = valid.any(-1).sum(1).clamp(min=1).to(per_camera.dtype)  # (B, Q)
        attended = per_camera.sum(1) / cameras_hit[..., None]

        out = self.norm1(bev + self.dropout(self.output_proj(attended)))
        out = self.norm2(out + self.dropout(self.ffn(out)))
        refined = out.transpose(1, 2).reshape(b, c, x_size, y_size)
        return volume + refined[..., None]
