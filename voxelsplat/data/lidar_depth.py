"""LiDAR depth targets for the depth net: the keyframe's LiDAR points projected into each
augmented camera image, nearest return per pixel."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from voxelsplat.utils.geometry import invert_transform, project_points

__all__ = ["lidar_depth_maps"]

# Points closer than this to the image plane (m) are ignored (behind or on the camera).
MIN_DEPTH = 1e-3


def lidar_depth_maps(points_ego: np.ndarray, cam2ego: np.ndarray, intrinsics: np.ndarray,
                     image_size: Tuple[int, int]) -> np.ndarray:
    """Sparse depth images from LiDAR points.

    Args:
        points_ego: (P, 3) points in the ego frame (m).
        cam2ego: (C, 4, 4) OpenCV camera -> the same ego frame.
        intrinsics: (C, 3, 3) intrinsics of the (augmented) images.
        image_size: (W, H) of the images.
    Returns:
        (C, H, W) float32 depth (z along the optical axis, m) of the nearest point falling in
        each pixel (pixel ``(u, v)`` covers ``[u, u+1) x [v, v+1)``); 0 where no point falls.
    """
    width, height = int(image_size[0]), int(image_size[1])
    points = np.asarray(points_ego, dtype=np.float64)
    num_cameras = len(cam2ego)
    depth_maps = np.zeros((num_cameras, height, width), dtype=np.float32)
    for camera in range(num_cameras):
        world2cam = invert_transform(np.asarray(cam2ego[camera], dtype=np.float64))
        uv, depth = project_points(np.asarray(intrinsics[camera], dtype=np.float64), world2cam, points)
        column, row = np.floor(uv[:, 0]), np.floor(uv[:, 1])
        keep = (depth > MIN_DEPTH) & (column >= 0) & (column < width) & (row >= 0) & (row < height)
        pixel = row[keep].astype(np.int64) * width + column[keep].astype(np.int64)
        depth = depth[keep]
        # nearest point per pixel: sort by (pixel, depth) and keep the first of each pixel
        order = np.lexsort((depth, pixel))
        pixel, depth = pixel[order], depth[order]
        first = np.ones(len(pixel), dtype=bool)
        first[1:] = pixel[1:] != pixel[:-1]
        depth_maps[camera].reshape(-1)[pixel[first]] = depth[first]
    return depth_maps
