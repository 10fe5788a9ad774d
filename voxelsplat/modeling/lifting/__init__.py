"""View transformation from images to the voxel volume, and temporal fusion."""
from .backward_projection import DepthAwareBackwardProjection
from .depth_net import CameraAwareDepthNet, DepthBins
from .forward_projection import LSSForwardProjection
from .temporal_fusion import TemporalVolumeFusion

__all__ = ["CameraAwareDepthNet", "DepthBins", "LSSForwardProjection", "DepthAwareBackwardProjection",
           "TemporalVolumeFusion"]
