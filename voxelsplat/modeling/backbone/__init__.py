"""Image backbones."""
from .timm_backbone import TimmBackbone
from .vit_backbone import EVA02ViT, vit_layer_decay_lr_multipliers

__all__ = ["TimmBackbone", "EVA02ViT", "vit_layer_decay_lr_multipliers"]
