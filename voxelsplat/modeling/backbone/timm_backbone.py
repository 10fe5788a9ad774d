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

from ..registry import BACKBONE_REGISTRY

__all__ = ["TimmBackbone", "EVA02Backbone", "check_local_checkpoint"]


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


@BACKBONE_REGISTRY.register()
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
        grad_checkpointing: recompute stage activations in the backward pass.
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


class _SimplePyramidLevel(nn.Sequential):
    """ViTDet-style: rescale a stride-``patch`` map to stride ``stride``, then 1x1 + 3x3 convs."""

    def __init__(self, embed_dim: int, out_channels: int, patch: int, stride: int):
        layers: List[nn.Module] = []
        scale = patch / stride
        if scale == 4.0:
            layers += [nn.ConvTranspose2d(embed_dim, embed_dim // 2, 2, 2), nn.GroupNorm(1, embed_dim // 2), nn.GELU(),
                       nn.ConvTranspose2d(embed_dim // 2, embed_dim // 4, 2, 2)]
            dim = embed_dim // 4
        elif scale == 2.0:
            layers += [nn.ConvTranspose2d(embed_dim, embed_dim // 2, 2, 2)]
            dim = embed_dim // 2
        elif scale == 1.0:
            dim = embed_dim
        elif scale == 0.5:
            layers += [nn.MaxPool2d(2, 2)]
            dim = embed_dim
        else:
            raise ValueError(f"EVA02Backbone: cannot build stride {stride} from patch size {patch}")
        layers += [nn.Conv2d(dim, out_channels, 1, bias=False), nn.GroupNorm(1, out_channels),
                   nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.GroupNorm(1, out_channels)]
        super().__init__(*layers)


@BACKBONE_REGISTRY.register()
class EVA02Backbone(nn.Module):
    """An EVA-02 ViT (timm ``eva02_*``) with a ViTDet simple feature pyramid.

    The ViT runs at a fixed input size ``img_size`` = (H, W) with ``patch_size`` 16 (timm
    resamples the pretrained 14-pixel patch embedding and position embedding when
    loading ``init_checkpoint``), and the last block's tokens become stride-16 maps that
    are upsampled/pooled to ``out_strides``.

    Args:
        model_name: timm name, e.g. ``"eva02_large_patch14_clip_224"``.
        img_size: (H, W) of the input images.
        out_strides: strides of the returned maps (from {4, 8, 16, 32}).
        out_channels: channels of every returned map.
        init_checkpoint: local weights file ("" = random init).
        grad_checkpointing: checkpoint the transformer blocks.
        drop_path_rate: stochastic depth of the ViT.
        model_kwargs: extra ``timm.create_model`` arguments.

    Forward: ``images`` (B, 3, H, W) -> ``{"stride<s>": (B, out_channels, H/s, W/s)}``.
    """

    def __init__(
        self,
        model_name: str = "eva02_large_patch14_clip_224",
        img_size: Sequence[int] = (256, 704),
        patch_size: int = 16,
        out_strides: Sequence[int] = (16, 32),
        out_channels: int = 256,
        init_checkpoint: str = "",
        grad_checkpointing: bool = False,
        drop_path_rate: float = 0.0,
        model_kwargs: Optional[dict] = None,
    ):
        super().__init__()
        self.vit = _create_timm_model(
            model_name, init_checkpoint, f"EVA02Backbone({model_name})",
            num_classes=0, img_size=tuple(img_size), patch_size=patch_size, drop_path_rate=drop_path_rate,
            **dict(model_kwargs or {}),
        )
        if grad_checkpointing:
            self.vit.set_grad_checkpointing(True)
        self.patch_size = patch_size
        self.img_size = tuple(int(v) for v in img_size)
        embed_dim = self.vit.embed_dim
        self.levels = nn.ModuleList(_SimplePyramidLevel(embed_dim, out_channels, patch_size, s) for s in out_strides)
        self.out_strides = [int(s) for s in out_strides]
        self.out_channels = [int(out_channels)] * len(self.out_strides)
        self.out_names = [f"stride{s}" for s in self.out_strides]

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if tuple(images.shape[-2:]) != self.img_size:
            raise ValueError(f"EVA02Backbone: images are {tuple(images.shape[-2:])}, configured img_size is {self.img_size}")
        tokens = self.vit.forward_intermediates(images, indices=[len(self.vit.blocks) - 1], intermediates_only=True)[-1]
        return {name: level(tokens) for name, level in zip(self.out_names, self.levels)}
