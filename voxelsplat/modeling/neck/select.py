"""A neck that passes one backbone map through (recipes without an image neck)."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn


__all__ = ["SelectFeatureMap"]


class SelectFeatureMap(nn.Module):
    """Pass one backbone map through unchanged (the released EVA recipe has no image neck: the
    ViT's stride-16 map goes straight to the depth net).

    Args:
        name: key of the map in the backbone's output, e.g. ``"stride16"``.
        out_channels: its channels (read by the depth net's config).

    Forward: ``{"stride<s>": (B, C, h, w), ...}`` -> the ``name`` map (B, C, h, w).
    """

    def __init__(self, name: str = "stride16", out_channels: int = 1024):
        super().__init__()
        self.name = str(name)
        self.out_channels = int(out_channels)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        if self.name not in features:
            raise KeyError(f"SelectFeatureMap: backbone gave maps {sorted(features)}, expected {self.name!r}")
        feature = features[self.name]
        if feature.shape[1] != self.out_channels:
            raise ValueError(f"SelectFeatureMap: map {self.name!r} has {feature.shape[1]} channels, configured "
                             f"out_channels is {self.out_channels}")
        return feature
