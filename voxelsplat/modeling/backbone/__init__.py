"""Image backbones."""
from .timm_backbone import EVA02Backbone, TimmBackbone

__all__ = ["TimmBackbone", "EVA02Backbone"]
