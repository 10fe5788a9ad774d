"""Image backbones built with timm: CNNs through ``features_only`` and EVA-02 ViTs
with a simple feature pyramid.

Both return a ``dict`` of feature maps keyed ``"stride<s>"`` (e.g. ``"stride16"``)
and describe themselves with ``out_channels``/``out_strides`` (like timm's
``feature_info``), so the neck can be built from plain values.

Pretrained weights never come from the network: ``init_checkpoint`` is a local file
(a timm/torchvision state dict, ``.pth``/``.bin``/``.safetensors``) loaded through
timm's own pretrained-loading path, which drops classifier weights and adapts the
patch embedding / position embedding of ViTs to the configured size.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import timm
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn


__all__ = ["TimmBackbone", "check_local_checkpoint"]


def check_local_checkpoint(path: str, owner: str) -> Optional[str]:
    """Return ``path`` if set (raising if it does not exist), else ``None``."""
    if not path:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{owner}: init_checkpoint {path!r} does not exist; pretrained weights are only read from a local file"
        )
    return path


def _create_timm_model(model_name: str, init_checkpoint: str, owner: str, **kwargs) -> nn.Module:
    path = check_local_checkpoint(init_checkpoint, owner)
    if path is None:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    # timm's pretrained path with a local ``file`` never touches the network.
    return timm.create_model(
        model_name, pretrained=True, pretrained_cfg_overlay=dict(file=path, url="", hf_hub_id=None), **kwargs
    )


def _freeze_module(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad_(False)


def _disable_inplace(model: nn.Module) -> None:
    """Make in-place activations out-of-place. timm's feature extractors before 1.0.31 checkpoint
    every child module apart, the stem's ``ReLU(inplace=True)`` too, which then overwrites the
    tensor saved for its recomputation, and the backward pass fails ("modified by an inplace
    operation"); seen on CUDA with timm 1.0.29. Out-of-place activations give the same values."""
    for module in model.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False


class TimmBackbone(nn.Module):
    """A timm CNN (e.g. ``resnet18``/``resnet50``) as a multi-stage feature extractor.

    Args:
        model_name: timm model name.
        out_indices: stages to return, timm numbering (``(3, 4)`` = C4, C5 of a ResNet).
        init_checkpoint: local weights file ("" = random initialisation).
        norm: ``"FrozenBN"`` (BatchNorm statistics and affine frozen, detectron2 style) or
            ``"BN"`` (trainable BatchNorm).
        frozen_stages: freeze the stem and the first ``frozen_stages`` stages (-1: none,
            0: stem only).
        grad_checkpointing: recompute stage activations in the backward pass (activations then
            run out of place: see ``_disable_inplace``).
        model_kwargs: extra ``timm.create_model`` arguments, e.g. ``{"channels": (32, 64, 128, 256)}``
            for a slimmer ResNet.

    Forward: ``images`` (B, 3, H, W) normalised float -> ``{"stride<s>": (B, C_s, H/s, W/s)}``.
    """

    def __init__(
        self,
        model_name: str = "resnet50",
        out_indices: Sequence[int] = (3, 4),
        init_checkpoint: str = "",
        norm: str = "FrozenBN",
        frozen_stages: int = -1,
        grad_checkpointing: bool = False,
        model_kwargs: Optional[dict] = None,
    ):
        super().__init__()
        if norm not in ("FrozenBN", "BN"):
            raise ValueError(f"TimmBackbone: norm must be 'FrozenBN' or 'BN', got {norm!r}")
        self.model = _create_timm_model(
            model_name, init_checkpoint, f"TimmBackbone({model_name})",
            features_only=True, out_indices=tuple(out_indices), **dict(model_kwargs or {}),
        )
        if norm == "FrozenBN":
            self.model = FrozenBatchNorm2d.convert_frozen_batchnorm(self.model)
        self._freeze_stages(frozen_stages)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
            _disable_inplace(self.model)
        self.out_channels: List[int] = list(self.model.feature_info.channels())
        self.out_strides: List[int] = list(self.model.feature_info.reduction())
        self.out_names: List[str] = [f"stride{s}" for s in self.out_strides]

    def _freeze_stages(self, frozen_stages: int) -> None:
        """Freeze every module up to and including timm feature level ``frozen_stages``
        (ResNet: 0 = stem, k = ``layer<k>``)."""
        if frozen_stages < 0:
            return
        level_of = {info["module"].replace(".", "_"): info["index"] for info in self.model.feature_info.info}
        pending: List[nn.Module] = []
        for name, module in self.model.named_children():
            pending.append(module)
            if name in level_of:
                if level_of[name] <= frozen_stages:
                    for frozen in pending:
                        _freeze_module(frozen)
                pending = []

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.model(images)
        return dict(zip(self.out_names, features))
