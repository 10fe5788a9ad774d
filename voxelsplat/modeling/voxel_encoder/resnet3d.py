"""FB-Occ's voxel encoder: an input 1x1x1 projection, a 3D ResNet and a 3D FPN that
returns every level."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import BasicBlock3d, conv_bn_relu, maybe_checkpoint

__all__ = ["ResNet3D", "FPN3D", "ResNet3DFPN"]


def _check_widths(module: str, **widths: Sequence[int]) -> None:
    lengths = {name: len(values) for name, values in widths.items()}
    if len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
        raise ValueError(f"{module}: {', '.join(widths)} must be non-empty and of the same length, got "
                         + ", ".join(f"{name}={tuple(values)}" for name, values in widths.items()))
    for name, values in widths.items():
        if any(int(v) != v or v < 1 for v in values):
            raise ValueError(f"{module}: {name} must be positive integers, got {tuple(values)}")


def _init_msra(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) conv weights and unit BatchNorms, as the released 3D
    encoder initialises them; conv biases keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _BiasedBasicBlock3d(BasicBlock3d):
    """:class:`BasicBlock3d` whose convolutions (shortcut included) carry a bias, as in the
    released 3D ResNet. A bias before a BatchNorm changes nothing in training, but it is part
    of the released parameter set."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__(in_channels, out_channels, stride)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        if not isinstance(self.shortcut, nn.Identity):
            self.shortcut[0] = nn.Conv3d(in_channels, out_channels, 1, stride=stride)


class ResNet3D(nn.Module):
    """1x1x1 projection (conv without bias + BN + ReLU) to ``stage_channels[0]``, then stages
    of 3D basic blocks (released: ResNet-18 style, 2 blocks per stage).

    Args:
        in_channels: channels of the input volume (released: 80).
        stage_channels: output channels of each stage (released: 64, 128, 256).
        stage_blocks: blocks per stage (released: 2, 2, 2).
        stage_strides: stride of each stage's first block (released: 1, 2, 2).
        grad_checkpointing: recompute each stage in the backward pass.

    Forward: (B, C, X, Y, Z) -> list of per-stage volumes, finest first;
        level i is (B, stage_channels[i], X / s_i, Y / s_i, Z / s_i) with s_i the product of the
        strides up to stage i (rounded up).
    """

    def __init__(self, in_channels: int, stage_channels: Sequence[int] = (64, 128, 256),
                 stage_blocks: Sequence[int] = (2, 2, 2), stage_strides: Sequence[int] = (1, 2, 2),
                 grad_checkpointing: bool = False):
        super().__init__()
        _check_widths("ResNet3D", stage_channels=stage_channels, stage_blocks=stage_blocks,
                      stage_strides=stage_strides)
        if int(in_channels) != in_channels or in_channels < 1:
            raise ValueError(f"ResNet3D: in_channels must be a positive integer, got {in_channels!r}")
        self.input_proj = conv_bn_relu(in_channels, stage_channels[0], kernel_size=1, dims=3)
        self.stages = nn.ModuleList()
        channels = stage_channels[0]
        for out_channels, blocks, stride in zip(stage_channels, stage_blocks, stage_strides):
            layers = [_BiasedBasicBlock3d(channels, out_channels, stride)]
            layers += [_BiasedBasicBlock3d(out_channels, out_channels) for _ in range(blocks - 1)]
            self.stages.append(nn.Sequential(*layers))
            channels = out_channels
        self.out_channels = [int(c) for c in stage_channels]
        self.grad_checkpointing = grad_checkpointing
        _init_msra(self)

    def forward(self, volume: torch.Tensor) -> List[torch.Tensor]:
        volume = self.input_proj(volume)
        outputs = []
        for stage in self.stages:
            volume = maybe_checkpoint(stage, volume, enabled=self.grad_checkpointing)
            outputs.append(volume)
        return outputs


class FPN3D(nn.Module):
    """Top-down 3D FPN with one output per level: lateral 1x1x1 conv + BN + ReLU per level,
    each coarser (already merged) level trilinearly upsampled and added to the next finer
    one, then a 3x3x3 conv + BN + ReLU per level (convs without bias, Kaiming-normal init).

    Args:
        in_channels: channels of each input level, finest first (released: 64, 128, 256).
        out_channels: channels of every output level (released: 256).
        grad_checkpointing: recompute each lateral and output conv in the backward pass.

    Forward: list of (B, C_i, X_i, Y_i, Z_i), finest first -> list of
        (B, out_channels, X_i, Y_i, Z_i), finest first.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, grad_checkpointing: bool = False):
        super().__init__()
        _check_widths("FPN3D", in_channels=in_channels)
        if int(out_channels) != out_channels or out_channels < 1:
            raise ValueError(f"FPN3D: out_channels must be a positive integer, got {out_channels!r}")
        self.lateral = nn.ModuleList(conv_bn_relu(c, out_channels, kernel_size=1, dims=3) for c in in_channels)
        self.output = nn.ModuleList(conv_bn_relu(out_channels, out_channels, kernel_size=3, dims=3)
                                    for _ in in_channels)
        self.grad_checkpointing = grad_checkpointing
        _init_msra(self)

    def forward(self, volumes: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(volumes) != len(self.lateral):
            raise ValueError(f"FPN3D: expected {len(self.lateral)} levels, got {len(volumes)}")
        merged = [maybe_checkpoint(lateral, volume, enabled=self.grad_checkpointing)
                  for lateral, volume in zip(self.lateral, volumes)]
        for level in range(len(merged) - 1, 0, -1):
            finer = merged[level - 1]
            merged[level - 1] = finer + F.interpolate(merged[level], size=finer.shape[2:], mode="trilinear",
                                                      align_corners=False)
        return [maybe_checkpoint(output, volume, enabled=self.grad_checkpointing)
                for output, volume in zip(self.output, merged)]


class ResNet3DFPN(nn.Module):
    """:class:`ResNet3D` then :class:`FPN3D` (FB-Occ's ``CustomResNet3D`` + ``FPN3D``).

    Args: as in the two parts; ``out_channels`` is the width of every FPN level.

    Forward: (B, in_channels, X, Y, Z) -> list of ``num_levels`` volumes
        (B, out_channels, X_i, Y_i, Z_i), finest first (with a stride-1 first stage the finest
        is at the input's resolution).
    """

    def __init__(self, in_channels: int, stage_channels: Sequence[int] = (64, 128, 256),
                 stage_blocks: Sequence[int] = (2, 2, 2), stage_strides: Sequence[int] = (1, 2, 2),
                 out_channels: int = 256, grad_checkpointing: bool = False):
        super().__init__()
        self.backbone = ResNet3D(in_channels, stage_channels, stage_blocks, stage_strides, grad_checkpointing)
        self.fpn = FPN3D(stage_channels, out_channels, grad_checkpointing)
        self.out_channels = int(out_channels)
        self.num_levels = len(stage_channels)

    def forward(self, volume: torch.Tensor) -> List[torch.Tensor]:
        return self.fpn(self.backbone(volume))
