"""Image necks."""
from .fpn import FusionFPN

__all__ = ["FusionFPN"]
