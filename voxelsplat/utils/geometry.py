"""Rigid transforms, camera projection and augmentation matrices shared by every module.

Conventions (see docs): ego frame x forward, y left, z up; cameras OpenCV (x right,
y down, z forward); quaternions (w, x, y, z); 4x4 homogeneous matrices named
``<from>2<to>`` map points of frame ``from`` to frame ``to``.

Functions accept numpy arrays or torch tensors where noted ("array-agnostic"):
they only use ``@``, slicing and elementwise math so both work.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np


def quaternion_to_matrix(quaternion_wxyz: Sequence[float]) -> np.ndarray:
    """(w, x, y, z) quaternion (need not be unit) -> 3x3 rotation matrix, float64."""
    w, x, y, z = np.asarray(quaternion_wxyz, dtype=np.float64) / np.linalg.norm(quaternion_wxyz)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """3x3 rotation matrix -> unit (w, x, y, z) quaternion with w >= 0, float64."""
    from pyquaternion import Quaternion

    q = Quaternion(matrix=np.asarray(rotation, dtype=np.float64), atol=1e-6, rtol=1e-6).normalised
    q = np.array([q.w, q.x, q.y, q.z])
    return q if q[0] >= 0 else -q


def make_transform(rotation: np.ndarray, translation: Sequence[float]) -> np.ndarray:
    """3x3 rotation and (3,) translation -> 4x4 homogeneous transform, float64."""
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = translation
    return transform


def pose_to_transform(translation: Sequence[float], rotation_wxyz: Sequence[float]) -> np.ndarray:
    """A nuScenes record's ``translation`` + ``rotation`` (w,x,y,z) -> 4x4 ``child2parent``."""
    return make_transform(quaternion_to_matrix(rotation_wxyz), translation)


def invert_transform(transform):
    """Inverse of a rigid (or rotation*scale) 4x4 transform; array-agnostic, batched (..., 4, 4)."""
    if isinstance(transform, np.ndarray):
        return np.linalg.inv(transform)
    import torch

    return torch.linalg.inv(transform)


def transform_points(transform, points):
    """Apply (..., 4, 4) transform to (..., N, 3) points; array-agnostic."""
    return points @ transform[..., :3, :3].swapaxes(-1, -2) + transform[..., None, :3, 3] \
        if isinstance(points, np.ndarray) else \
        points @ transform[..., :3, :3].transpose(-1, -2) + transform[..., None, :3, 3]


def project_points(intrinsics, world2cam, points):
    """Project (..., N, 3) points with (..., 4, 4) ``world2cam`` and (..., 3, 3) intrinsics.

    Returns ``(uv, depth)``: pixel coordinates (..., N, 2) where integer ``u`` is the
    left edge of pixel column ``u`` (centre at ``u + 0.5``), and camera-frame depth
    (..., N) in metres (z along the optical axis; <= 0 means behind the camera).
    Array-agnostic.
    """
    cam_points = transform_points(world2cam, points)
    depth = cam_points[..., 2]
    pixels = cam_points @ (intrinsics.swapaxes(-1, -2) if isinstance(points, np.ndarray) else intrinsics.transpose(-1, -2))
    safe = depth + (depth == 0) * 1e-12 if isinstance(points, np.ndarray) else depth.masked_fill(depth == 0, 1e-12)
    uv = pixels[..., :2] / safe[..., None]
    return uv, depth


def bda_matrix(rotation_deg: float = 0.0, scale: float = 1.0, flip_x: bool = False, flip_y: bool = False) -> np.ndarray:
    """BEV data augmentation as a 4x4 matrix acting on ego-frame points: rotate about z by
    ``rotation_deg``, scale by ``scale``, then flip x (x -> -x) and/or y (y -> -y).

    The same matrix maps points, voxels and cameras: an augmented camera is
    ``bda @ cam2ego``; an augmented velocity is ``bda[:2, :2] @ v / scale``.
    """
    angle = math.radians(rotation_deg)
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]]) * scale
    flip = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, 1.0])
    return make_transform(flip @ rotation, np.zeros(3))


def image_aug_matrix(
    resize: float = 1.0,
    crop_xy: Tuple[float, float] = (0.0, 0.0),
    flip: bool = False,
    rotate_deg: float = 0.0,
    output_width: int | None = None,
    output_height: int | None = None,
) -> np.ndarray:
    """3x3 homogeneous pixel transform of image augmentation: resize, then crop at
    ``crop_xy`` (top-left corner in resized pixels), then horizontal flip about the
    output width, then rotation by ``rotate_deg`` about the output image centre.

    ``uv_aug = A @ [u, v, 1]``; the augmented intrinsics are ``A @ K``.
    """
    matrix = np.diag([resize, resize, 1.0])
    matrix = np.array([[1.0, 0, -crop_xy[0]], [0, 1.0, -crop_xy[1]], [0, 0, 1.0]]) @ matrix
    if flip or rotate_deg:
        if output_width is None or output_height is None:
            raise ValueError("image_aug_matrix: flip/rotation need output_width and output_height")
    if flip:
        matrix = np.array([[-1.0, 0, output_width], [0, 1.0, 0], [0, 0, 1.0]]) @ matrix
    if rotate_deg:
        cx, cy = output_width / 2.0, output_height / 2.0
        a = math.radians(rotate_deg)
        rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1.0]])
        shift = np.array([[1.0, 0, cx], [0, 1.0, cy], [0, 0, 1.0]])
        unshift = np.array([[1.0, 0, -cx], [0, 1.0, -cy], [0, 0, 1.0]])
        matrix = shift @ rot @ unshift @ matrix
    return matrix


def yaw_to_quaternion(yaw: float) -> np.ndarray:
    """Rotation about +z by ``yaw`` radians as a (w, x, y, z) quaternion."""
    return np.array([math.cos(yaw / 2.0), 0.0, 0.0, math.sin(yaw / 2.0)])


def select_lidar_origins(
    keyframe_lidar2global: np.ndarray,
    current_ego2global: np.ndarray,
    max_origins: int = 8,
    max_abs_xy: float = 39.0,
) -> np.ndarray:
    """RayIoU ray origins of one sample: the LiDAR positions of its scene's keyframes
    (in time order), expressed in the current ego frame, kept where |x| and |y| are
    below ``max_abs_xy`` metres; if more than ``max_origins`` remain, ``max_origins`` of
    them are picked at ``round(linspace(0, n - 1, max_origins))``.

    Args:
        keyframe_lidar2global: (T, 4, 4) LiDAR-to-global poses of the scene's keyframes.
        current_ego2global: (4, 4) ego-to-global pose of the evaluated keyframe.
    Returns:
        (K, 3) float64 origins in metres, K <= max_origins.
    """
    global2ego = np.linalg.inv(np.asarray(current_ego2global, dtype=np.float64))
    positions = np.asarray(keyframe_lidar2global, dtype=np.float64)[:, :3, 3]
    origins = positions @ global2ego[:3, :3].T + global2ego[:3, 3]
    keep = (np.abs(origins[:, 0]) < max_abs_xy) & (np.abs(origins[:, 1]) < max_abs_xy)
    origins = origins[keep]
    if len(origins) > max_origins:
        origins = origins[np.round(np.linspace(0, len(origins) - 1, max_origins)).astype(np.int64)]
    return origins
