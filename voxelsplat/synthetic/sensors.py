"""Sensor rig of the synthetic car, laid out like nuScenes': six cameras (OpenCV frames,
``cam2ego``), the LIDAR_TOP mount and its beam pattern, and per-channel time offsets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

__all__ = ["CameraSpec", "camera_rig", "LIDAR2EGO", "lidar_beam_directions", "CAMERA_TIME_OFFSETS_US"]

# nuScenes' full image size; intrinsics are given for it and scaled to the generated size.
NUSCENES_IMAGE_SIZE = (1600, 900)


@dataclass(frozen=True)
class CameraSpec:
    channel: str
    translation: Tuple[float, float, float]  # camera centre in the ego frame (m)
    yaw_deg: float  # optical axis heading in the ego frame (0 = forward, + = left)
    focal: float  # focal length in pixels at 1600 px width


# Mounting positions, headings and focal lengths close to the nuScenes rig.
_CAMERAS = (
    CameraSpec("CAM_FRONT", (1.70, 0.02, 1.51), 0.0, 1266.0),
    CameraSpec("CAM_FRONT_RIGHT", (1.55, -0.49, 1.50), -55.0, 1260.0),
    CameraSpec("CAM_FRONT_LEFT", (1.52, 0.49, 1.51), 55.0, 1272.0),
    CameraSpec("CAM_BACK", (0.03, 0.01, 1.58), 180.0, 809.0),
    CameraSpec("CAM_BACK_LEFT", (1.04, 0.81, 1.56), 110.0, 1256.0),
    CameraSpec("CAM_BACK_RIGHT", (1.04, -0.81, 1.56), -110.0, 1259.0),
)
# Capture time of each camera relative to the LIDAR_TOP keyframe (the cameras fire as the
# LiDAR sweeps past them), microseconds.
CAMERA_TIME_OFFSETS_US: Dict[str, int] = {
    "CAM_FRONT": 12_000, "CAM_FRONT_RIGHT": 20_000, "CAM_FRONT_LEFT": 4_000,
    "CAM_BACK": 37_000, "CAM_BACK_LEFT": 45_500, "CAM_BACK_RIGHT": 29_000,
}

# OpenCV camera axes (x right, y down, z forward) in an ego frame (x forward, y left, z up)
# for a camera looking along +x.
_OPENCV_TO_FORWARD = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def camera_rig(width: int, height: int) -> List[dict]:
    """The six cameras for images of ``width`` x ``height`` pixels: dicts with ``channel``,
    ``cam2ego`` (4, 4) and ``intrinsics`` (3, 3) (square pixels, principal point at the
    image centre, focal length scaled with the width)."""
    scale = width / NUSCENES_IMAGE_SIZE[0]
    cameras = []
    for spec in _CAMERAS:
        cam2ego = np.eye(4)
        cam2ego[:3, :3] = _yaw_matrix(np.deg2rad(spec.yaw_deg)) @ _OPENCV_TO_FORWARD
        cam2ego[:3, 3] = spec.translation
        f = spec.focal * scale
        intrinsics = np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])
        cameras.append(dict(channel=spec.channel, cam2ego=cam2ego, intrinsics=intrinsics))
    return cameras


# LIDAR_TOP: mounted on the roof, x axis pointing to the right of the car (as in nuScenes).
LIDAR2EGO = np.eye(4)
LIDAR2EGO[:3, :3] = _yaw_matrix(-np.pi / 2)
LIDAR2EGO[:3, 3] = (0.94, 0.0, 1.84)
LIDAR_BEAMS = 32
LIDAR_ELEVATION_DEG = (-30.67, 10.67)
LIDAR_MAX_RANGE = 70.0


def lidar_beam_directions(azimuth_steps: int = 1080) -> Tuple[np.ndarray, np.ndarray]:
    """Unit ray directions (B * A, 3) in the LiDAR frame for B = 32 beams and A azimuth
    steps, and the beam (ring) index of each ray."""
    elevation = np.deg2rad(np.linspace(LIDAR_ELEVATION_DEG[0], LIDAR_ELEVATION_DEG[1], LIDAR_BEAMS))
    azimuth = np.linspace(-np.pi, np.pi, azimuth_steps, endpoint=False)
    e, a = np.meshgrid(elevation, azimuth, indexing="ij")
    directions = np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], axis=-1).reshape(-1, 3)
    ring = np.repeat(np.arange(LIDAR_BEAMS), azimuth_steps)
    return directions, ring
