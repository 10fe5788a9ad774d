"""FPN neck fusing the last backbone stages into one image feature map."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import conv_bn_relu, maybe_checkpoint

__all__ = ["FusionFPN"]


class FusionFPN(nn.Module):
    """Top-down FPN that returns a single map at the finest input stride.

    With a ResNet's C4 (stride 16) and C5 (stride 32) this is FB-Occ's neck: a 1x1
    lateral conv per input, the coarser map upsampled and added to the finer one, then a
    3x3 conv. As released (``CustomFPN``): nearest upsampling and a plain 3x3 conv with a
    bias (no normalisation, no activation), Xavier-uniform initialised convolutions.

    Args:
        in_channels: channels of the input maps, finest first (e.g. ``[1024, 2048]``).
        in_strides: their strides (e.g. ``[16, 32]``); the output has ``in_strides[0]``.
        out_channels: channels of the output map.
        upsample_mode: "nearest" (released) or "bilinear".
        output_norm: "none" (released: a plain 3x3 conv) or "bn_relu" (conv + BatchNorm + ReLU).
        grad_checkpointing: recompute the output conv in the backward pass.

    Forward: ``features`` dict ``{"stride<s>": (B, C_s, H/s, W/s)}`` ->
    ``(B, out_channels, H/in_strides[0], W/in_strides[0])``.
    """

    def __init__(self, in_channels: Sequence[int], in_strides: Sequence[int], out_channels: int = 256,
                 upsample_mode: str = "nearest", output_norm: str = "none", grad_checkpointing: bool = False):
        super().__init__()
        if upsample_mode not in ("nearest", "bilinear"):
            raise ValueError(f"FusionFPN: upsample_mode must be 'nearest' or 'bilinear', got {upsample_mode!r}")
        if output_norm not in ("none", "bn_relu"):
            raise ValueError(f"FusionFPN: output_norm must be 'none' or 'bn_relu', got {output_norm!r}")
        if len(in_channels) != len(in_strides) or not in_channels:
            raise ValueError(f"FusionFPN: in_channels {in_channels} and in_strides {in_strides} must be non-empty and match")
        if list(in_strides) != sorted(in_strides):
            raise ValueError(f"FusionFPN: in_strides must be ascending (finest first), got {in_strides}")
        self.in_names = [f"stride{s}" for s in in_strides]
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        if output_norm == "bn_relu":
            self.output = conv_bn_relu(out_channels, out_channels, 3)
        else:
            self.output = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.upsample_mode = upsample_mode
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
            if self.upsample_mode == "nearest":
                upsampled = F.interpolate(fused, size=finer.shape[-2:], mode="nearest")
            else:
                upsampled = F.interpolate(fused, size=finer.shape[-2:], mode="bilinear", align_corners=False)
            fused = finer + upsampled
        return maybe_checkpoint(self.output, fused, enabled=self.grad_checkpointing)
