"""Reading the files a record names: camera images, LiDAR sweeps and occupancy ground truth.

Every reader raises an error naming the file and the sample token when the file is
missing, unreadable or not what is expected.
"""
from __future__ import annotations

import os
import zipfile
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["load_image", "load_lidar_points", "load_occupancy_labels", "load_visibility_mask", "load_record_labels",
           "OccupancyLabelError"]

# nuScenes .pcd.bin: float32 (x, y, z, intensity, ring index) per point, sensor frame.
LIDAR_POINT_DIMS = 5
# Optional boolean masks in a labels.npz -> name in the loaded dict.
MASK_KEYS = {"visible": "visible", "mask_camera": "mask_camera", "mask_lidar": "mask_lidar"}
# Key of the ray-visibility mask in the separate files of the released code
# (``<root>/<scene_name>/<sample_token>/labels.npz``, e.g. ``openocc_v2_ray_mask``).
DEFAULT_VISIBLE_MASK_KEY = "ray_mask2"
# How JPEG and PNG files start and end (a file that does not end so was cut short).
_JPEG_START, _JPEG_END, _JPEG_PADDING = b"\xff\xd8", b"\xff\xd9", b"\x00\r\n\t "
_PNG_SIGNATURE, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


class OccupancyLabelError(ValueError):
    """A labels.npz that exists but cannot be used (corrupt, missing key, wrong shape)."""


def _image_truncation(data: bytes) -> Optional[str]:
    """Why the JPEG or PNG file ``data`` is cut short, or None. libjpeg decodes a truncated JPEG
    without an error, filling the missing rows with grey, so its end is checked here: a JPEG
    ends with the end-of-image marker (padding bytes may follow), a PNG with its IEND chunk."""
    if data.startswith(_JPEG_START):
        if not data.rstrip(_JPEG_PADDING).endswith(_JPEG_END):
            return "is truncated (no JPEG end-of-image marker at its end)"
    elif data.startswith(_PNG_SIGNATURE) and not data.endswith(_PNG_END):
        return "is truncated (no PNG IEND chunk at its end)"
    return None


def load_image(path: str, sample_token: str) -> np.ndarray:
    """Read a camera image as an RGB uint8 array of shape (H, W, 3).

    Raises:
        FileNotFoundError: missing file. ValueError: a file that is empty, truncated (a JPEG or
        PNG that does not end as the format ends) or that cannot be decoded; the message names
        the sample and the file.
    """
    import cv2

    if not os.path.isfile(path):
        raise FileNotFoundError(f"sample {sample_token}: camera image {path!r} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    problem = "is empty" if not data else _image_truncation(data)
    if problem is None:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        problem = "could not be decoded" if image is None else None
    if problem is not None:
        raise ValueError(f"sample {sample_token}: camera image {path!r} {problem}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def load_lidar_points(path: str, sample_token: str) -> np.ndarray:
    """Read a nuScenes LiDAR sweep: float32 array (P, 3) of x, y, z in the sensor frame (m)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sample {sample_token}: LiDAR file {path!r} does not exist")
    values = np.fromfile(path, dtype=np.float32)
    if values.size % LIDAR_POINT_DIMS:
        raise ValueError(f"sample {sample_token}: LiDAR file {path!r} holds {values.size} float32 values, not a multiple "
                         f"of {LIDAR_POINT_DIMS} (x, y, z, intensity, ring)")
    return values.reshape(-1, LIDAR_POINT_DIMS)[:, :3]


def load_occupancy_labels(path: str, sample_token: str, gt_format: str, grid_shape: Sequence[int],
                          num_classes: int) -> Dict[str, Optional[np.ndarray]]:
    """Read one ``labels.npz`` of OpenOcc v2 or Occ3D.

    Args:
        path: the file, ``<gt_root>/<scene_name>/<sample_token>/labels.npz``.
        sample_token: for error messages.
        gt_format: "openocc_v2" (needs ``semantics`` and ``flow``) or "occ3d" (needs
            ``semantics``, ``mask_lidar``, ``mask_camera``; flow is absent).
        grid_shape: expected (X, Y, Z).
        num_classes: semantics must lie in [0, num_classes).
    Returns:
        dict with ``semantics`` uint8 (X, Y, Z); ``flow`` float32 (X, Y, Z, 2) in m/s or None;
        ``visible``, ``mask_camera``, ``mask_lidar`` bool (X, Y, Z) or None when absent.
    Raises:
        FileNotFoundError: missing file. OccupancyLabelError: corrupt file or bad content.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sample {sample_token}: occupancy labels {path!r} do not exist")
    grid_shape = tuple(int(s) for s in grid_shape)
    required = ("semantics", "flow") if gt_format == "openocc_v2" else ("semantics", "mask_lidar", "mask_camera")

    def fail(reason: str):
        return OccupancyLabelError(f"sample {sample_token}: occupancy labels {path!r} {reason}")

    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in required if k not in archive.files]
            if missing:
                raise fail(f"lack {missing} (keys found: {archive.files}; {gt_format} needs {list(required)})")
            arrays = {k: archive[k] for k in ("semantics", "flow", *MASK_KEYS) if k in archive.files}
    except OccupancyLabelError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as error:
        raise fail(f"are corrupt or not an .npz archive ({type(error).__name__}: {error})") from error

    semantics = arrays["semantics"]
    if semantics.shape != grid_shape or not np.issubdtype(semantics.dtype, np.integer):
        raise fail(f"have semantics {semantics.dtype}{list(semantics.shape)}, expected integer {list(grid_shape)}")
    if semantics.size and (semantics.min() < 0 or semantics.max() >= num_classes):
        raise fail(f"have class ids in [{semantics.min()}, {semantics.max()}], expected [0, {num_classes - 1}]")
    labels: Dict[str, Optional[np.ndarray]] = {"semantics": semantics.astype(np.uint8, copy=False), "flow": None}
    if "flow" in arrays:
        flow = arrays["flow"]
        if flow.shape != grid_shape + (2,):
            raise fail(f"have flow of shape {list(flow.shape)}, expected {list(grid_shape) + [2]}")
        flow = flow.astype(np.float32, copy=False)
        if not np.isfinite(flow).all():
            raise fail("have non-finite flow values")
        labels["flow"] = flow
    for key, name in MASK_KEYS.items():
        mask = arrays.get(key)
        if mask is not None and mask.shape != grid_shape:
            raise fail(f"have {key} of shape {list(mask.shape)}, expected {list(grid_shape)}")
        labels[name] = None if mask is None else mask.astype(bool, copy=False)
    return labels


def load_visibility_mask(path: str, sample_token: str, key: str, grid_shape: Sequence[int]) -> np.ndarray:
    """Read a ray-visibility mask kept apart from the labels (the released code's
    ``<visible_mask_root>/<scene_name>/<sample_token>/labels.npz``).

    Args:
        path: the file.
        sample_token: for error messages.
        key: the array's key in the archive (the release's files: ``ray_mask2``).
        grid_shape: expected (X, Y, Z).
    Returns:
        bool (X, Y, Z), True for voxels seen by the rays.
    Raises:
        FileNotFoundError: missing file. OccupancyLabelError: corrupt file, missing key, wrong
        shape or a non-boolean, non-integer array.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sample {sample_token}: ray-visibility mask {path!r} does not exist (the dataset's "
                                f"visible_mask_root holds <scene_name>/<sample_token>/labels.npz)")
    grid_shape = tuple(int(s) for s in grid_shape)

    def fail(reason: str):
        return OccupancyLabelError(f"sample {sample_token}: ray-visibility mask {path!r} {reason}")

    try:
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise fail(f"lacks {key!r} (keys found: {archive.files})")
            mask = archive[key]
    except OccupancyLabelError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as error:
        raise fail(f"is corrupt or not an .npz archive ({type(error).__name__}: {error})") from error
    if mask.shape != grid_shape:
        raise fail(f"has {key} of shape {list(mask.shape)}, expected {list(grid_shape)}")
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        raise fail(f"has {key} of dtype {mask.dtype}, expected bool (or integer 0/1)")
    return mask.astype(bool, copy=False) if mask.dtype == bool else mask != 0


def load_record_labels(record: dict, grid_shape: Sequence[int], num_classes: int) -> Dict[str, Optional[np.ndarray]]:
    """A dataset record's labels (:func:`load_occupancy_labels`, not augmented), with the
    dataset's separate ray-visibility mask (``visible_mask_path``, key ``visible_mask_key``),
    when it has one, replacing the labels' own ``visible``."""
    token = record["sample_token"]
    labels = load_occupancy_labels(record["gt_path"], token, record["gt_format"], grid_shape, num_classes)
    if record.get("visible_mask_path"):
        labels["visible"] = load_visibility_mask(record["visible_mask_path"], token,
                                                 record.get("visible_mask_key", DEFAULT_VISIBLE_MASK_KEY), grid_shape)
    return labels
