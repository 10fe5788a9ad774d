"""Model components; importing this package registers them (see ``registry``)."""
from . import backbone, heads, lifting, meta_arch, neck, voxel_encoder  # noqa: F401  (registration)
from . import regularizers  # noqa: F401  (registration; after the components it may build on)
from .meta_arch import OccupancyFlowModel

__all__ = ["OccupancyFlowModel"]
