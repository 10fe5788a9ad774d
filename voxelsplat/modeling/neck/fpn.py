"""FPN neck fusing the last backbone stages into one image feature map."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import conv_bn_relu, maybe_checkpoint
from ..registry import NECK_REGISTRY

__all__ = ["FusionFPN"]


@NECK_REGISTRY.register()
class FusionFPN(nn.Module):
    """Top-down FPN that returns a single map at the finest input stride.

    With a ResNet's C4 (stride 16) and C5 (stride 32) this is FB-Occ's neck: a 1x1
    lateral conv per input, the coarser map upsampled (bilinear) and added to the
    finer one, then a 3x3 conv.

    Args:
        in_channels: channels of the input maps, finest first (e.g. ``[1024, 2048]``).
        in_strides: their strides (e.g. ``[16, 32]``); the output has ``in_strides[0]``.
        out_channels: channels of the output map.
        grad_checkpointing: recompute the output conv in the backward pass.

    Forward: ``features`` dict ``{"stride<s>": (B, C_s, H/s, W/s)}`` ->
    ``(B, out_channels, H/in_strides[0], W/in_strides[0])``.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], out_channels: int = 256,
                 grad_checkpointing: bool = False):
        super().__init__()
        if len(in_channels) != len(in_strides) or not in_channels:
            raise ValueError(f"FusionFPN: in_channels {in_channels} and in_strides {in_strides} must be non-empty and match")
        if list(in_strides) != sorted(in_strides):
            raise ValueError(f"FusionFPN: in_strides must be ascending (finest first), got {in_strides}")
        self.in_names = [f"stride{s}" for s in in_strides]
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = conv_bn_relu(out_channels, out_channels, 3)
        self.out_channels = int(out_channels)
        self.out_stride = int(in_strides[0])
        self.grad_checkpointing = grad_checkpointing

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.in_names if n not in features]
        if missing:
            raise KeyError(f"FusionFPN: backbone gave maps {sorted(features)}, expected {self.in_names}")
        fused = self.lateral[-1](features[self.in_names[-1]])
        for name, lateral in zip(reversed(self.in_names[:-1]), reversed(list(self.lateral)[:-1])):
            finer = lateral(features[name])
            fused = finer + F.interpolate(fused, size=finer.shape[-2:], mode="bilinear", align_corners=False)
        return maybe_checkpoint(self.output, fused, enabled=self.grad_checkpointing)
