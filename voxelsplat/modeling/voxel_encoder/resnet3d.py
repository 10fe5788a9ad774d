"""3D ResNet over the voxel volume followed by a 3D FPN (FB-Occ's voxel encoder)."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import BasicBlock3d, conv_bn_relu, maybe_checkpoint
from ..registry import VOXEL_ENCODER_REGISTRY

__all__ = ["ResNet3D", "FPN3D", "ResNet3DFPN"]


class ResNet3D(nn.Module):
    """Stages of 3D basic blocks (ResNet-18 style: 2 blocks per stage).

    Args:
        in_channels: channels of the input volume.
        stage_channels: output channels of each stage (published: 64, 128, 256).
        stage_blocks: blocks per stage (published: 2, 2, 2).
        stage_strides: stride of each stage's first block (published: 1, 2, 2).
        grad_checkpointing: recompute each stage in the backward pass.

    Forward: (B, C, X, Y, Z) -> list of per-stage volumes, finest first.
    """

    def __init__(self, in_channels: int, stage_channels: Sequence[int] = (64, 128, 256),
                 stage_blocks: Sequence[int] = (2, 2, 2), stage_strides: Sequence[int] = (1, 2, 2),
                 grad_checkpointing: bool = False):
        super().__init__()
        if not (len(stage_channels) == len(stage_blocks) == len(stage_strides)):
            raise ValueError(f"ResNet3D: stage_channels {stage_channels}, stage_blocks {stage_blocks} and "
                             f"stage_strides {stage_strides} must have the same length")
        self.stages = nn.ModuleList()
        channels = in_channels
        for out_channels, blocks, stride in zip(stage_channels, stage_blocks, stage_strides):
            layers = [BasicBlock3d(channels, out_channels, stride)]
            layers += [BasicBlock3d(out_channels, out_channels) for _ in range(blocks - 1)]
            self.stages.append(nn.Sequential(*layers))
            channels = out_channels
        self.out_channels = list(stage_channels)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, volume: torch.Tensor) -> List[torch.Tensor]:
        outputs = []
        for stage in self.stages:
            volume = maybe_checkpoint(stage, volume, enabled=self.grad_checkpointing)
            outputs.append(volume)
        return outputs


class FPN3D(nn.Module):
    """Top-down 3D FPN returning the finest level: lateral 1x1x1 convs, trilinear
    upsampling + sum, one 3x3x3 output conv.

    Forward: list of (B, C_i, X_i, Y_i, Z_i), finest first -> (B, out_channels, X_0, Y_0, Z_0).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(conv_bn_relu(c, out_channels, kernel_size=1, dims=3) for c in in_channels)
        self.output = conv_bn_relu(out_channels, out_channels, kernel_size=3, dims=3)

    def forward(self, volumes: Sequence[torch.Tensor]) -> torch.Tensor:
        fused = self.lateral[-1](volumes[-1])
        for volume, lateral in zip(reversed(volumes[:-1]), reversed(list(self.lateral)[:-1])):
            finer = lateral(volume)
            fused = finer + F.interpolate(fused, size=finer.shape[2:], mode="trilinear", align_corners=False)
        return self.output(fused)


@VOXEL_ENCODER_REGISTRY.register()
class ResNet3DFPN(nn.Module):
    """:class:`ResNet3D` then :class:`FPN3D`; (B, C, X, Y, Z) -> (B, out_channels, X, Y, Z)
    (for stride-1 first stage). Arguments as in the two parts."""

    def __init__(self, in_channels: int, stage_channels: Sequence[int] = (64, 128, 256),
                 stage_blocks: Sequence[int] = (2, 2, 2), stage_strides: Sequence[int] = (1, 2, 2),
                 out_channels: int = 256, grad_checkpointing: bool = False):
        super().__init__()
        self.backbone = ResNet3D(in_channels, stage_channels, stage_blocks, stage_strides, grad_checkpointing)
        self.fpn = FPN3D(stage_channels, out_channels)
        self.out_channels = int(out_channels)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.fpn(self.backbone(volume))
