"""Small building blocks shared by the model components (conv-norm-activation units,
residual blocks, optional activation checkpointing)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["conv_bn_relu", "BasicBlock2d", "BasicBlock3d", "maybe_checkpoint"]


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, dims: int = 2) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU, 2D or 3D, "same" padding for odd kernels."""
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        norm(out_channels),
        nn.ReLU(inplace=True),
    )


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and an identity/projection shortcut."""

    dims = 2

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        conv = nn.Conv2d if self.dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if self.dims == 2 else nn.BatchNorm3d
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(conv(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class BasicBlock2d(_BasicBlock):
    dims = 2


class BasicBlock3d(_BasicBlock):
    dims = 3


def maybe_checkpoint(module: nn.Module, *inputs: torch.Tensor, enabled: bool = False) -> torch.Tensor:
    """``module(*inputs)``; with ``enabled`` (and in training, with inputs that need
    gradients) the activations are recomputed in the backward pass to save memory."""
    if enabled and module.training and any(t.requires_grad for t in inputs):
        return checkpoint(module, *inputs, use_reentrant=False)
    return module(*inputs)
