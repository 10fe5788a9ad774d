"""Image necks."""
from .fpn import FusionFPN
from .select import SelectFeatureMap

__all__ = ["FusionFPN", "SelectFeatureMap"]
