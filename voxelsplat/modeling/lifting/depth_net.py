"""Camera-aware depth network (BEVDepth / FB-Occ style) and its LiDAR depth loss.

Per image-feature pixel it predicts a categorical distribution over depth bins and a
context feature; both branches are gated (squeeze-and-excitation) by an MLP over the
camera's parameters (intrinsics, image augmentation, BEV augmentation, extrinsics), so
the network can account for the geometry it is looking through.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import BasicBlock2d, conv_bn_relu, maybe_checkpoint
from ..registry import LIFTING_REGISTRY

__all__ = [
    "DepthBins", "camera_parameter_vector", "CAMERA_PARAMETER_DIM", "lidar_depth_to_bins", "depth_bce_loss",
    "CameraAwareDepthNet",
]


@dataclass(frozen=True)
class DepthBins:
    """Uniform depth bins ``[start + i*step, start + (i+1)*step)``, i = 0..num_bins-1, metres
    along the camera's optical axis. Published FB-Occ: (2.0, 42.0, 0.5) -> 80 bins.

    A frustum point of bin ``i`` sits at the bin centre ``start + (i + 0.5) * step``.
    """

    start: float
    stop: float
    step: float

    @classmethod
    def from_config(cls, bounds: Sequence[float]) -> "DepthBins":
        if len(bounds) != 3 or not bounds[2] > 0 or not bounds[1] > bounds[0] > 0:
            raise ValueError(f"depth bins must be (start > 0, stop > start, step > 0) in metres, got {tuple(bounds)}")
        return cls(float(bounds[0]), float(bounds[1]), float(bounds[2]))

    @property
    def num_bins(self) -> int:
        return int(round((self.stop - self.start) / self.step))

    def centers(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """(D,) bin centres in metres."""
        return self.start + self.step * (torch.arange(self.num_bins, device=device, dtype=dtype) + 0.5)

    def index_of(self, depth: torch.Tensor) -> torch.Tensor:
        """Bin index (int64) of each depth; -1 where the depth is outside [start, stop) or not finite."""
        index = torch.floor((depth - self.start) / self.step)
        valid = torch.isfinite(depth) & (index >= 0) & (index < self.num_bins)
        return torch.where(valid, index, torch.full_like(index, -1)).long()


# fx/W, fy/H, cx/W, cy/H (4) + image-aug 2x3 (6) + bda 3x3 (9) + cam2ego 3x4 (12)
CAMERA_PARAMETER_DIM = 31


def camera_parameter_vector(intrinsics: torch.Tensor, img_aug: torch.Tensor, cam2ego: torch.Tensor, bda: torch.Tensor,
                            image_size: Tuple[int, int]) -> torch.Tensor:
    """The camera description fed to the depth net's gating MLP.

    Args:
        intrinsics: (B, N, 3, 3) intrinsics after image augmentation (pixels).
        img_aug: (B, N, 3, 3) image-augmentation pixel transform.
        cam2ego: (B, N, 4, 4) camera-to-(augmented)-ego transforms (metres).
        bda: (B, 4, 4) BEV augmentation.
        image_size: (H, W) of the augmented images; pixel quantities are divided by it
            so every entry is O(1).
    Returns:
        (B, N, CAMERA_PARAMETER_DIM) float tensor.
    """
    height, width = float(image_size[0]), float(image_size[1])
    b, n = intrinsics.shape[:2]
    focal_center = torch.stack([intrinsics[..., 0, 0] / width, intrinsics[..., 1, 1] / height,
                                intrinsics[..., 0, 2] / width, intrinsics[..., 1, 2] / height], dim=-1)
    aug = img_aug[..., :2, :].clone()
    aug[..., 0, 2] = aug[..., 0, 2] / width
    aug[..., 1, 2] = aug[..., 1, 2] / height
    bda_rot = bda[:, None, :3, :3].expand(b, n, 3, 3)
    return torch.cat([focal_center, aug.flatten(-2), bda_rot.flatten(-2), cam2ego[..., :3, :4].flatten(-2)], dim=-1)


def lidar_depth_to_bins(lidar_depth: torch.Tensor, stride: int, bins: DepthBins) -> torch.Tensor:
    """Depth-bin targets at the feature resolution from a LiDAR depth image.

    Each ``stride x stride`` patch takes the *minimum positive* depth among its pixels
    (the nearest surface), which is then binned.

    Args:
        lidar_depth: (..., H, W) metres, 0 (or negative / non-finite) = no return.
        stride: feature stride; H and W must be multiples of it.
    Returns:
        (..., H/stride, W/stride) int64 bin indices, -1 where the patch has no return
        or the depth is outside the bins.
    """
    height, width = lidar_depth.shape[-2:]
    if height % stride or width % stride:
        raise ValueError(f"lidar_depth of size {height}x{width} is not a multiple of the feature stride {stride}")
    valid = torch.isfinite(lidar_depth) & (lidar_depth > 0)
    depth = torch.where(valid, lidar_depth, torch.full_like(lidar_depth, float("inf")))
    lead = depth.shape[:-2]
    depth = depth.reshape(*lead, height // stride, stride, width // stride, stride)
    nearest = depth.amin(dim=(-3, -1))
    return bins.index_of(nearest)


def depth_bce_loss(depth_logits: torch.Tensor, target_bins: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between the softmax depth distribution and one-hot LiDAR bins,
    summed over bins and averaged over foreground (valid) pixels.

    Args:
        depth_logits: (M, D, h, w).
        target_bins: (M, h, w) int64, -1 = no target.
    Returns:
        scalar (0 with a zero gradient when no pixel has a target).
    """
    # At least float32 (mixed precision), float64 kept.
    logits = depth_logits.to(torch.promote_types(depth_logits.dtype, torch.float32)).permute(0, 2, 3, 1).reshape(-1, depth_logits.shape[1])
    target = target_bins.reshape(-1)
    valid = target >= 0
    if not bool(valid.any()):
        return depth_logits.sum() * 0.0
    logits, target = logits[valid], target[valid]
    log_prob = F.log_softmax(logits, dim=-1)
    log_not_prob = torch.log1p(-log_prob.exp().clamp(max=1.0 - 1e-6))
    one_hot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    bce = -(one_hot * log_prob.clamp(min=-100.0) + (1.0 - one_hot) * log_not_prob)
    return bce.sum() / valid.sum().clamp(min=1)


class _CameraGate(nn.Module):
    """Squeeze-and-excitation gate from the camera MLP embedding onto a feature map."""

    def __init__(self, embed_dim: int, channels: int):
        super().__init__()
        self.reduce = nn.Linear(embed_dim, channels)
        self.expand = nn.Linear(channels, channels)

    def forward(self, features: torch.Tensor, camera_embedding: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(camera_embedding))))
        return features * gate[:, :, None, None]


@LIFTING_REGISTRY.register()
class CameraAwareDepthNet(nn.Module):
    """Depth distribution + context features per image-feature pixel.

    Args:
        in_channels: channels of the neck's image map.
        mid_channels: width of the shared trunk and the depth branch.
        context_channels: channels of the context output (= the voxel feature width).
        depth_bins: (start, stop, step) metres, see :class:`DepthBins`.
        num_depth_blocks: residual blocks in the depth branch.
        camera_embed_dim: hidden width of the camera-parameter MLP.
        grad_checkpointing: recompute the depth branch in the backward pass.

    Forward:
        features: (B*N, in_channels, h, w) image features.
        camera_params: (B*N, CAMERA_PARAMETER_DIM), see :func:`camera_parameter_vector`.
    Returns:
        depth_logits (B*N, D, h, w) and context (B*N, context_channels, h, w).
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        context_channels: int,
        depth_bins: Sequence[float] = (2.0, 42.0, 0.5),
        num_depth_blocks: int = 3,
        camera_embed_dim: int = 0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.bins = DepthBins.from_config(depth_bins)
        self.context_channels = int(context_channels)
        camera_embed_dim = camera_embed_dim or mid_channels
        self.reduce = conv_bn_relu(in_channels, mid_channels, 3)
        self.camera_mlp = nn.Sequential(
            nn.Linear(CAMERA_PARAMETER_DIM, camera_embed_dim), nn.ReLU(inplace=True),
            nn.Linear(camera_embed_dim, camera_embed_dim), nn.ReLU(inplace=True),
        )
        self.context_gate = _CameraGate(camera_embed_dim, mid_channels)
        self.depth_gate = _CameraGate(camera_embed_dim, mid_channels)
        self.context_out = nn.Conv2d(mid_channels, context_channels, 1)
        self.depth_branch = nn.Sequential(
            *[BasicBlock2d(mid_channels, mid_channels) for _ in range(num_depth_blocks)],
            nn.Conv2d(mid_channels, self.bins.num_bins, 1),
        )
        self.grad_checkpointing = grad_checkpointing

    @property
    def num_bins(self) -> int:
        return self.bins.num_bins

    def forward(self, features: torch.Tensor, camera_params: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        trunk = self.reduce(features)
        embedding = self.camera_mlp(camera_params.to(trunk.dtype))
        context = self.context_out(self.context_gate(trunk, embedding))
        depth_logits = maybe_checkpoint(self.depth_branch, self.depth_gate(trunk, embedding),
                                        enabled=self.grad_checkpointing)
        return depth_logits, context

    def loss(self, depth_logits: torch.Tensor, lidar_depth: torch.Tensor) -> torch.Tensor:
        """Depth BCE of ``depth_logits`` (B*N, D, h, w) against ``lidar_depth`` (B*N, H, W)."""
        stride = lidar_depth.shape[-1] // depth_logits.shape[-1]
        if stride * depth_logits.shape[-1] != lidar_depth.shape[-1] or stride * depth_logits.shape[-2] != lidar_depth.shape[-2]:
            raise ValueError(f"lidar_depth {tuple(lidar_depth.shape[-2:])} is not an integer multiple of the "
                             f"depth map {tuple(depth_logits.shape[-2:])}")
        return depth_bce_loss(depth_logits, lidar_depth_to_bins(lidar_depth, stride, self.bins))
