"""Forward projection (Lift-Splat-Shoot): image context x depth distribution -> voxel volume.

Every image-feature pixel is lifted to one frustum point per depth bin (at the bin
centre, along the pixel-centre ray); the point carries ``depth_prob * context`` and is
summed into the voxel that contains it. The sum is done by :class:`VoxelPooling`, an
autograd function over index lists (``index_add``) that never materialises the
(points x channels) product for the backward pass, so memory stays at the size of the
index lists (the role the reference's CUDA ``bev_pool`` kernel plays).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from ...structures import OccupancyGrid, check_grid
from .depth_net import DepthBins

__all__ = ["frustum_points", "voxel_pooling", "VoxelPooling", "LSSForwardProjection"]


def pixel_centers(feature_size: Tuple[int, int], input_hw: Tuple[int, int], device=None, dtype=torch.float32):
    """Pixel coordinates (u, v) of the centres of an (h, w) feature map's cells in an
    (H, W) image (integer u = left edge of column u), as two (h, w) tensors."""
    (h, w), (height, width) = feature_size, input_hw
    u = (torch.arange(w, device=device, dtype=dtype) + 0.5) * (width / w)
    v = (torch.arange(h, device=device, dtype=dtype) + 0.5) * (height / h)
    return u[None, :].expand(h, w), v[:, None].expand(h, w)


def frustum_points(intrinsics: torch.Tensor, cam2ego: torch.Tensor, feature_size: Tuple[int, int],
                   input_hw: Tuple[int, int], bins: DepthBins) -> torch.Tensor:
    """Ego-frame positions of the frustum points.

    Args:
        intrinsics: (B, N, 3, 3) intrinsics of the augmented images (``img_aug @ K``; any
            invertible 3x3 pixel map works, including rotations).
        cam2ego: (B, N, 4, 4) camera (OpenCV) -> augmented ego.
        feature_size: (h, w) of the depth map; input_hw: (H, W) of the network input images.
    Returns:
        (B, N, D, h, w, 3) metres in the augmented ego frame, computed in float64 and
        returned in the dtype of ``cam2ego``.
    """
    dtype = torch.float64
    u, v = pixel_centers(feature_size, input_hw, device=intrinsics.device, dtype=dtype)
    pixels = torch.stack([u, v, torch.ones_like(u)], dim=-1)  # (h, w, 3)
    rays = torch.einsum("bnij,hwj->bnhwi", torch.linalg.inv(intrinsics.to(dtype)), pixels)  # z = 1
    depths = bins.starts(device=intrinsics.device, dtype=dtype)  # released: the frustum at the bin starts
    cam_points = depths[None, None, :, None, None, None] * rays[:, :, None]  # (B, N, D, h, w, 3)
    rotation, translation = cam2ego[..., :3, :3].to(dtype), cam2ego[..., :3, 3].to(dtype)
    ego = torch.einsum("bnij,bndhwj->bndhwi", rotation, cam_points) + translation[:, :, None, None, None, :]
    return ego.to(cam2ego.dtype)


class VoxelPooling(torch.autograd.Function):
    """``out[voxel[m]] += depth[depth_index[m]] * context[pixel_index[m]]`` over points m.

    Args (forward):
        context: (P, C) features per image pixel.
        depth: (Q,) depth probability per (pixel, bin) point.
        pixel_index, depth_index, voxel_index: (M,) int64 per kept point.
        num_voxels: rows of the output.
        chunk: points processed at once (bounds the (chunk, C) temporaries).
    Returns:
        (num_voxels, C).
    """

    @staticmethod
    def forward(ctx, context, depth, pixel_index, depth_index, voxel_index, num_voxels: int, chunk: int):
        out = context.new_zeros(num_voxels, context.shape[1])
        for start in range(0, pixel_index.numel(), chunk):
            sl = slice(start, start + chunk)
            out.index_add_(0, voxel_index[sl], context[pixel_index[sl]] * depth[depth_index[sl], None])
        ctx.save_for_backward(context, depth, pixel_index, depth_index, voxel_index)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        context, depth, pixel_index, depth_index, voxel_index = ctx.saved_tensors
        grad_context = grad_depth = None
        if ctx.needs_input_grad[0]:
            grad_context = torch.zeros_like(context)
        if ctx.needs_input_grad[1]:
            grad_depth = torch.zeros_like(depth)
        for start in range(0, pixel_index.numel(), ctx.chunk):
            sl = slice(start, start + ctx.chunk)
            upstream = grad_out[voxel_index[sl]]
            if grad_context is not None:
                grad_context.index_add_(0, pixel_index[sl], upstream * depth[depth_index[sl], None])
            if grad_depth is not None:
                grad_depth.index_add_(0, depth_index[sl], (upstream * context[pixel_index[sl]]).sum(-1))
        return grad_context, grad_depth, None, None, None, None, None


def voxel_pooling(context, depth, pixel_index, depth_index, voxel_index, num_voxels: int, chunk: int = 1 << 16):
    """Functional form of :class:`VoxelPooling`."""
    chunk = max(1, int(chunk))
    return VoxelPooling.apply(context, depth, pixel_index, depth_index, voxel_index, int(num_voxels), chunk)


class LSSForwardProjection(nn.Module):
    """Lift context features with their depth distribution into a voxel volume.

    Args:
        grid: the volume's grid in the augmented ego frame (published: the GT grid at 0.8 m,
            100x100x8: ``volume_grid(spec, 2)``).
        depth_bins: (start, stop, step) metres; must match the depth net's.
        chunk_channels_budget: (points x channels) processed per pooling chunk.

    Forward:
        context: (B, N, C, h, w); depth_probs: (B, N, D, h, w) (softmax over D);
        intrinsics: (B, N, 3, 3); cam2ego: (B, N, 4, 4); input_hw: (H, W) of the network input images.
    Returns:
        (B, C, X, Y, Z) volume indexed [x, y, z].
    """

    def __init__(self, grid: OccupancyGrid, depth_bins: Sequence[float] = (2.0, 42.0, 0.5),
                 chunk_channels_budget: int = 1 << 24):
        super().__init__()
        self.grid = check_grid(grid, type(self).__name__)
        self.bins = DepthBins.from_config(depth_bins)
        self.chunk_channels_budget = int(chunk_channels_budget)

    @property
    def volume_shape(self) -> Tuple[int, int, int]:
        return self.grid.shape

    def point_indices(self, intrinsics: torch.Tensor, cam2ego: torch.Tensor, feature_size: Tuple[int, int],
                      input_hw: Tuple[int, int]):
        """Index lists of the frustum points that fall inside the volume.

        Returns:
            pixel_index into context flattened as (B*N*h*w), depth_index into depth
            flattened as (B*N*D*h*w), voxel_index into the volume flattened as
            (B*X*Y*Z) with [x, y, z] order; all (M,) int64.
        """
        b, n = intrinsics.shape[:2]
        d, (h, w) = self.bins.num_bins, feature_size
        points = frustum_points(intrinsics, cam2ego, feature_size, input_hw, self.bins)
        lo = torch.as_tensor(self.grid.range_min, device=points.device, dtype=points.dtype)
        coords = torch.floor((points - lo) / self.grid.voxel_size).long()  # (B, N, D, h, w, 3)
        shape = torch.as_tensor(self.grid.shape, device=points.device)
        inside = ((coords >= 0) & (coords < shape)).all(-1) & torch.isfinite(points).all(-1)
        flat = inside.reshape(-1).nonzero().squeeze(1)
        # decompose the flat (b, n, bin, i, j) index of each kept point
        j = flat % w
        i = (flat // w) % h
        bn = flat // (w * h * d)
        pixel_index = (bn * h + i) * w + j
        depth_index = flat  # the depth tensor is laid out (B, N, D, h, w) as well
        xyz = coords.reshape(-1, 3)[flat]
        batch = bn // n
        x_size, y_size, z_size = self.grid.shape
        voxel_index = ((batch * x_size + xyz[:, 0]) * y_size + xyz[:, 1]) * z_size + xyz[:, 2]
        return pixel_index, depth_index, voxel_index

    def forward(self, context: torch.Tensor, depth_probs: torch.Tensor, intrinsics: torch.Tensor,
                cam2ego: torch.Tensor, input_hw: Tuple[int, int]) -> torch.Tensor:
        b, n, c, h, w = context.shape
        if depth_probs.shape != (b, n, self.bins.num_bins, h, w):
            raise ValueError(f"LSSForwardProjection: depth_probs {tuple(depth_probs.shape)} does not match context "
                             f"{tuple(context.shape)} with {self.bins.num_bins} depth bins")
        pixel_index, depth_index, voxel_index = self.point_indices(intrinsics, cam2ego, (h, w), input_hw)
        x_size, y_size, z_size = self.grid.shape
        context_flat = context.permute(0, 1, 3, 4, 2).reshape(b * n * h * w, c)
        pooled = voxel_pooling(context_flat, depth_probs.reshape(-1).to(context.dtype), pixel_index, depth_index,
                               voxel_index, b * x_size * y_size * z_size, chunk=self.chunk_channels_budget // max(c, 1))
        return pooled.view(b, x_size, y_size, z_size, c).permute(0, 4, 1, 2, 3).contiguous()
