"""VoxelSplat: camera-based 3D semantic occupancy and scene-flow prediction."""

__version__ = "0.1.0"
