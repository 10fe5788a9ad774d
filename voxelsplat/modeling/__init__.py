"""Model components, each an ``nn.Module`` built by a LazyConfig (``LazyCall(Class)(...)``); see
docs/configs.md."""
from .meta_arch import OccupancyFlowModel

__all__ = ["OccupancyFlowModel"]
