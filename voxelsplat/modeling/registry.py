"""Registries of model components and their builders.

Every component can be built two ways: a LazyConfig ``LazyCall(SomeClass)(...)``
(instantiated by detectron2) or a registered name, ``{"name": "ResNetBackbone", ...}``
passed to the matching ``build_*`` function.
"""
from __future__ import annotations

from typing import Any

from fvcore.common.registry import Registry
from torch import nn

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = "Image backbones: (B, 3, H, W) -> dict of feature maps."
NECK_REGISTRY = Registry("NECK")
NECK_REGISTRY.__doc__ = "Necks fusing backbone features into one image feature map."
LIFTING_REGISTRY = Registry("LIFTING")
LIFTING_REGISTRY.__doc__ = "View transformers: depth net, forward/backward projection, temporal fusion."
VOXEL_ENCODER_REGISTRY = Registry("VOXEL_ENCODER")
VOXEL_ENCODER_REGISTRY.__doc__ = "3D encoders over the voxel volume."
HEAD_REGISTRY = Registry("HEAD")
HEAD_REGISTRY.__doc__ = "Occupancy / flow heads."
REGULARIZER_REGISTRY = Registry("REGULARIZER")
REGULARIZER_REGISTRY.__doc__ = "Training-only regularizers (e.g. GaussianSplatRegularizer)."
META_ARCH_REGISTRY = Registry("OCC_META_ARCH")
META_ARCH_REGISTRY.__doc__ = "Meta-architectures (whole models)."


def _build(registry: Registry, spec: Any) -> nn.Module:
    """Build a module from a spec: an ``nn.Module`` (returned as is), a registered
    name, or a mapping ``{"name": <registered name>, **kwargs}``."""
    if spec is None or isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        return registry.get(spec)()
    if hasattr(spec, "keys"):
        kwargs = dict(spec)
        if "name" not in kwargs:
            raise KeyError(f"{registry._name} spec {kwargs!r} has no 'name' key")
        name = kwargs.pop("name")
        return registry.get(name)(**kwargs)
    raise TypeError(f"cannot build a {registry._name} from {type(spec).__name__}: {spec!r}")


def build_backbone(spec: Any) -> nn.Module:
    return _build(BACKBONE_REGISTRY, spec)


def build_neck(spec: Any) -> nn.Module:
    return _build(NECK_REGISTRY, spec)


def build_lifting(spec: Any) -> nn.Module:
    return _build(LIFTING_REGISTRY, spec)


def build_voxel_encoder(spec: Any) -> nn.Module:
    return _build(VOXEL_ENCODER_REGISTRY, spec)


def build_head(spec: Any) -> nn.Module:
    return _build(HEAD_REGISTRY, spec)


def build_regularizer(spec: Any) -> nn.Module:
    return _build(REGULARIZER_REGISTRY, spec)


def build_model(spec: Any) -> nn.Module:
    return _build(META_ARCH_REGISTRY, spec)
