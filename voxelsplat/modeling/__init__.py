"""Model components, each an ``nn.Module`` built by a LazyConfig (``LazyCall(Class)(...)``); see
docs/configs.md."""
from . import backbone, heads, lifting, meta_arch, neck, regularizers, voxel_encoder  # noqa: F401
from .meta_arch import OccupancyFlowModel

__all__ = ["OccupancyFlowModel"]
