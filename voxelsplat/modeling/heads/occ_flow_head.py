"""Occupancy + flow head: upsample the encoder's volume to the ground-truth grid and
predict per-voxel class logits and a 2D velocity."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import conv_bn_relu
from ..registry import HEAD_REGISTRY

__all__ = ["OccFlowHead"]


@HEAD_REGISTRY.register()
class OccFlowHead(nn.Module):
    """A 3x3x3 conv at the internal resolution, trilinear upsampling to ``output_shape``
    (the GT grid, e.g. 200x200x16 from the dataset metadata), then per-voxel MLPs.

    Args:
        in_channels: channels of the encoder's volume.
        mid_channels: channels of the upsampled feature volume (``voxel_features``).
        num_classes: class logits per voxel (17 for OpenOcc v2, 18 for Occ3D).
        output_shape: (X, Y, Z) of the GT grid.
        hidden_channels: hidden width of the per-voxel MLPs (0: linear classifiers).
        flow_dims: velocity components (2: vx, vy).
        grad_checkpointing: recompute the full-resolution part in the backward pass.

    Forward: (B, in_channels, X', Y', Z') [, return_features] -> dict with
        ``occ_logits`` (B, num_classes, X, Y, Z), ``flow`` (B, flow_dims, X, Y, Z) in m/s,
        ``voxel_features`` (B, F, X, Y, Z): the full-resolution features the classifiers read.
    """

    def __init__(self, in_channels: int, mid_channels: int, num_classes: int, output_shape: Sequence[int],
                 hidden_channels: int = 0, flow_dims: int = 2, grad_checkpointing: bool = False):
        super().__init__()
        if len(output_shape) != 3:
            raise ValueError(f"OccFlowHead: output_shape must be (X, Y, Z), got {output_shape}")
        self.output_shape = tuple(int(v) for v in output_shape)
        self.num_classes = int(num_classes)
        self.reduce = conv_bn_relu(in_channels, mid_channels, kernel_size=3, dims=3)
        if hidden_channels:
            self.hidden = nn.Sequential(nn.Conv3d(mid_channels, hidden_channels, 1), nn.Softplus())
            feature_channels = hidden_channels
        else:
            self.hidden = nn.Identity()
            feature_channels = mid_channels
        self.classifier = nn.Conv3d(feature_channels, num_classes, 1)
        self.flow = nn.Conv3d(feature_channels, flow_dims, 1)
        nn.init.zeros_(self.flow.weight)
        nn.init.zeros_(self.flow.bias)
        self.feature_channels = feature_channels
        self.grad_checkpointing = grad_checkpointing

    def _upsample(self, volume: torch.Tensor) -> torch.Tensor:
        return F.interpolate(volume, size=self.output_shape, mode="trilinear", align_corners=False)

    def _full_resolution(self, reduced: torch.Tensor):
        features = self.hidden(self._upsample(reduced))
        return features, self.classifier(features), self.flow(features)

    def forward(self, volume: torch.Tensor, return_features: bool = True) -> Dict[str, torch.Tensor]:
        """``return_features=False`` may leave ``voxel_features`` out (saves a full-resolution
        upsampling when nothing reads it)."""
        reduced = self.reduce(volume)
        if isinstance(self.hidden, nn.Identity):
            # Trilinear upsampling is linear with weights summing to 1, so it commutes with the
            # 1x1 affine classifiers: classify at the internal resolution, upsample the logits
            # (same result, ~3x cheaper than classifying 640k voxels on a CPU).
            logits, flow = self._upsample(torch.cat([self.classifier(reduced), self.flow(reduced)], dim=1)).split(
                [self.num_classes, self.flow.out_channels], dim=1)
            outputs = {"occ_logits": logits, "flow": flow}
            if return_features:
                outputs["voxel_features"] = self._upsample(reduced)
            return outputs
        if self.grad_checkpointing and self.training and reduced.requires_grad:
            features, logits, flow = checkpoint(self._full_resolution, reduced, use_reentrant=False)
        else:
            features, logits, flow = self._full_resolution(reduced)
        return {"occ_logits": logits, "flow": flow, "voxel_features": features}
