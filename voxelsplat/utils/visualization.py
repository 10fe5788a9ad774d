"""Pictures of occupancy, flow, cameras and renders (numpy in, uint8 RGB out).

All functions return ``uint8`` arrays of shape (H, W, 3) so they can be saved as
PNG (``save_png``) or logged to TensorBoard (``to_chw_float``).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np

from voxelsplat.utils.io import atomic_write_bytes

# Colours by class *name*, so both label sets (OpenOcc v2, Occ3D) share them.
CLASS_COLORS: Dict[str, tuple] = {
    "car": (0, 150, 245), "truck": (160, 32, 240), "trailer": (135, 60, 0), "bus": (255, 255, 0),
    "construction_vehicle": (0, 255, 255), "bicycle": (255, 192, 203), "motorcycle": (200, 180, 0),
    "pedestrian": (255, 0, 0), "traffic_cone": (255, 240, 150), "barrier": (255, 120, 50),
    "driveable_surface": (255, 0, 255), "other_flat": (175, 0, 75), "sidewalk": (75, 0, 75),
    "terrain": (150, 240, 80), "manmade": (230, 230, 250), "vegetation": (0, 175, 0),
    "others": (0, 0, 0), "free": (255, 255, 255),
}


def class_palette(class_names: Sequence[str]) -> np.ndarray:
    """(num_classes, 3) uint8 colours for a label set."""
    missing = [n for n in class_names if n not in CLASS_COLORS]
    if missing:
        raise KeyError(f"no colour for classes {missing}")
    return np.array([CLASS_COLORS[n] for n in class_names], dtype=np.uint8)


def bev_semantics(semantics: np.ndarray, class_names: Sequence[str], free_index: int) -> np.ndarray:
    """Top-down view of a [X, Y, Z] class grid: each column shows its highest non-free voxel.

    The image is oriented like a map of the ego frame: ego x (forward) points up,
    ego y (left) points left. Returns (Y, X, 3) uint8 (rows = -x, columns = -y).
    """
    semantics = np.asarray(semantics)
    occupied = semantics != free_index
    z_size = semantics.shape[2]
    top = z_size - 1 - np.argmax(occupied[:, :, ::-1], axis=2)  # highest occupied z per column
    column_class = np.take_along_axis(semantics, top[..., None], axis=2)[..., 0]
    column_class = np.where(occupied.any(axis=2), column_class, free_index)
    image = class_palette(class_names)[column_class]  # (X, Y, 3)
    return np.ascontiguousarray(image[::-1, ::-1])


def flow_to_color(flow_xy: np.ndarray, max_speed: float = 10.0) -> np.ndarray:
    """Colour-code (..., 2) velocities: hue = direction, saturation = speed / max_speed,
    white = still. Returns (..., 3) uint8."""
    vx, vy = flow_xy[..., 0], flow_xy[..., 1]
    speed = np.hypot(vx, vy)
    hue = (np.arctan2(vy, vx) / (2 * np.pi)) % 1.0
    saturation = np.clip(speed / max_speed, 0.0, 1.0)
    h6 = hue * 6.0
    sector = np.floor(h6).astype(int) % 6
    frac = h6 - np.floor(h6)
    p = 1.0 - saturation
    q = 1.0 - saturation * frac
    t = 1.0 - saturation * (1.0 - frac)
    one = np.ones_like(saturation)
    choices = [
        np.stack([one, t, p], -1), np.stack([q, one, p], -1), np.stack([p, one, t], -1),
        np.stack([p, q, one], -1), np.stack([t, p, one], -1), np.stack([one, p, q], -1),
    ]
    rgb = np.select([(sector == i)[..., None] for i in range(6)], choices)
    return (rgb * 255).round().astype(np.uint8)


def bev_flow_columns(semantics: np.ndarray, flow: np.ndarray, free_index: int) -> np.ndarray:
    """(X, Y, 2) velocity of the fastest occupied voxel of each column (0 where empty)."""
    speed = np.linalg.norm(flow, axis=-1)
    speed = np.where(semantics != free_index, speed, -1.0)
    k = np.argmax(speed, axis=2)
    return np.take_along_axis(flow, k[..., None, None], axis=2)[:, :, 0]


GROUND_CLASSES = ("driveable_surface", "other_flat", "sidewalk", "terrain")


def bev_flow(semantics: np.ndarray, flow: np.ndarray, free_index: int, max_speed: float = 10.0,
             class_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """Top-down flow of a [X, Y, Z] grid with [X, Y, Z, 2] velocities: the colour of the
    fastest voxel in each column (hue = direction, saturation = speed); still columns grey
    (light grey where only ground classes are occupied, when ``class_names`` is given),
    empty columns white; oriented like ``bev_semantics``."""
    column_flow = bev_flow_columns(semantics, flow, free_index)
    image = flow_to_color(column_flow, max_speed)
    occupied = semantics != free_index
    if class_names is not None:
        ground = np.isin(semantics, [i for i, n in enumerate(class_names) if n in GROUND_CLASSES])
        standing = (occupied & ~ground).any(axis=2)
    else:
        standing = occupied.any(axis=2)
    still = np.linalg.norm(column_flow, axis=-1) < 0.05 * max_speed
    image[still] = (238, 238, 238)
    image[still & standing] = (170, 170, 170)
    image[~occupied.any(axis=2)] = (255, 255, 255)
    return np.ascontiguousarray(image[::-1, ::-1])


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of an (H, W, 3) image by an integer factor."""
    factor = int(factor)
    if factor <= 1:
        return image
    return np.ascontiguousarray(np.repeat(np.repeat(image, factor, axis=0), factor, axis=1))


def draw_flow_arrows(image: np.ndarray, column_flow: np.ndarray, voxel_size: float, scale: int, step: int = 6,
                     min_speed: float = 0.5, seconds: float = 1.0) -> np.ndarray:
    """Arrows on an upscaled BEV image (made by ``bev_*`` then ``upscale(., scale)``) every
    ``step`` columns where the speed exceeds ``min_speed``: each arrow shows where the voxel
    goes in ``seconds`` (ego x up, ego y left)."""
    import cv2

    out = np.ascontiguousarray(image.copy())
    size_x, size_y = column_flow.shape[:2]
    for i in range(step // 2, size_x, step):
        for j in range(step // 2, size_y, step):
            vx, vy = (float(v) for v in column_flow[i, j])
            if np.hypot(vx, vy) < min_speed:
                continue
            # image row = X-1-i (x up), column = Y-1-j (y left)
            row, col = (size_x - 1 - i + 0.5) * scale, (size_y - 1 - j + 0.5) * scale
            d_row, d_col = -vx * seconds / voxel_size * scale, -vy * seconds / voxel_size * scale
            cv2.arrowedLine(out, (int(col), int(row)), (int(col + d_col), int(row + d_row)), (0, 0, 0), 1,
                            cv2.LINE_AA, tipLength=0.3)
    return out


def caption(image: np.ndarray, text: str, height: int = 18) -> np.ndarray:
    """``image`` with a white band on top holding ``text`` (the image itself stays visible)."""
    import cv2

    band = np.full((height, image.shape[1], 3), 255, np.uint8)
    cv2.putText(band, text, (3, height - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, image], axis=0)


def overlay_occupancy_on_image(
    image: np.ndarray,
    semantics: np.ndarray,
    voxel_centers: np.ndarray,
    intrinsics: np.ndarray,
    cam2ego: np.ndarray,
    class_names: Sequence[str],
    free_index: int,
    alpha: float = 0.5,
    max_depth: float = 60.0,
) -> np.ndarray:
    """Blend the class colour of the nearest occupied voxel into each pixel of ``image``.

    Args:
        image: (H, W, 3) uint8 camera image.
        semantics: (X, Y, Z) class grid; voxel_centers: (X, Y, Z, 3) ego-frame metres.
        intrinsics: (3, 3) pixel intrinsics of ``image``; cam2ego: (4, 4) OpenCV camera pose.
    """
    height, width = image.shape[:2]
    occupied = semantics != free_index
    points = voxel_centers[occupied]
    classes = semantics[occupied]
    ego2cam = np.linalg.inv(cam2ego)
    cam = points @ ego2cam[:3, :3].T + ego2cam[:3, 3]
    keep = (cam[:, 2] > 0.1) & (cam[:, 2] < max_depth)
    cam, classes = cam[keep], classes[keep]
    uv = cam @ np.asarray(intrinsics).T
    u = np.floor(uv[:, 0] / uv[:, 2]).astype(np.int64)
    v = np.floor(uv[:, 1] / uv[:, 2]).astype(np.int64)
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)
    u, v, depth, classes = u[inside], v[inside], cam[inside, 2], classes[inside]
    # Splat each voxel as a small square whose size shrinks with depth; nearest wins.
    depth_buffer = np.full((height, width), np.inf)
    class_buffer = np.full((height, width), -1, dtype=np.int64)
    focal = float(intrinsics[0, 0])
    voxel = float(np.linalg.norm(voxel_centers[1, 0, 0] - voxel_centers[0, 0, 0]))
    half = np.clip((focal * voxel / depth / 2).astype(np.int64), 0, 8)
    order = np.argsort(-depth)  # far first, near overwrite
    for du in range(-8, 9):
        for dv in range(-8, 9):
            sel = order[(np.abs(du) <= half[order]) & (np.abs(dv) <= half[order])]
            if not len(sel):
                continue
            uu = np.clip(u[sel] + du, 0, width - 1)
            vv = np.clip(v[sel] + dv, 0, height - 1)
            closer = depth[sel] < depth_buffer[vv, uu]
            sel, uu, vv = sel[closer], uu[closer], vv[closer]
            # later (nearer) entries of the same pixel win, as numpy assignment keeps the last write
            depth_buffer[vv, uu] = depth[sel]
            class_buffer[vv, uu] = classes[sel]
    palette = class_palette(class_names)
    out = image.astype(np.float32).copy()
    mask = class_buffer >= 0
    out[mask] = (1 - alpha) * out[mask] + alpha * palette[class_buffer[mask]]
    return out.round().clip(0, 255).astype(np.uint8)


def render_to_color(class_scores: np.ndarray, alpha: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """Colour a rendered class map: (H, W, K) scores over the first K classes of ``class_names``
    and (H, W) opacity -> (H, W, 3) uint8, blended over white by opacity."""
    palette = class_palette(class_names)[: class_scores.shape[-1]].astype(np.float32)
    color = palette[np.argmax(class_scores, axis=-1)]
    a = np.clip(alpha, 0.0, 1.0)[..., None]
    return (a * color + (1 - a) * 255.0).round().astype(np.uint8)


def tile_images(images: Sequence[np.ndarray], columns: int, pad: int = 4, background=255) -> np.ndarray:
    """Arrange equally sized (H, W, 3) images in a grid."""
    if not images:
        raise ValueError("tile_images: no images")
    height, width = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    canvas = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, 3), background, np.uint8)
    for i, image in enumerate(images):
        if image.shape[:2] != (height, width):
            raise ValueError(f"tile_images: image {i} is {image.shape[:2]}, expected {(height, width)}")
        r, c = divmod(i, columns)
        y, x = pad + r * (height + pad), pad + c * (width + pad)
        canvas[y:y + height, x:x + width] = image
    return canvas


def label_image(image: np.ndarray, text: str) -> np.ndarray:
    """A copy of ``image`` with ``text`` drawn in its top-left corner."""
    import cv2

    out = np.ascontiguousarray(image.copy())
    scale = max(0.35, min(out.shape[:2]) / 400)
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    cv2.rectangle(out, (0, 0), (tw + 6, th + 8), (255, 255, 255), -1)
    cv2.putText(out, text, (3, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def legend(class_names: Sequence[str], skip: Sequence[str] = ("free",), width: int = 200, row: int = 18) -> np.ndarray:
    """A colour legend for a label set, (rows*row, width, 3) uint8."""
    import cv2

    names = [n for n in class_names if n not in skip]
    out = np.full((row * len(names) + 4, width, 3), 255, np.uint8)
    for i, name in enumerate(names):
        y = 2 + i * row
        cv2.rectangle(out, (4, y + 2), (4 + row - 4, y + row - 2), tuple(int(c) for c in CLASS_COLORS[name]), -1)
        cv2.rectangle(out, (4, y + 2), (4 + row - 4, y + row - 2), (0, 0, 0), 1)
        cv2.putText(out, name, (row + 6, y + row - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def save_png(path: str, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 RGB image atomically as PNG."""
    import cv2

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"save_png({path}): expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    ok, encoded = cv2.imencode(".png", image[..., ::-1])
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    atomic_write_bytes(path, encoded.tobytes())


def to_chw_float(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1], as ``EventStorage.put_image`` expects."""
    return np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32) / 255.0
