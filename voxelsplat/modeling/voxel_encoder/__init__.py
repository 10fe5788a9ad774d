"""3D encoders over the voxel volume."""
from .resnet3d import FPN3D, ResNet3D, ResNet3DFPN

__all__ = ["ResNet3D", "FPN3D", "ResNet3DFPN"]
