"""Image augmentation (per camera) and BEV augmentation (per sample) of a keyframe.

Image augmentation is a 3x3 pixel transform ``img_aug`` (resize, crop, horizontal flip,
small rotation; :func:`voxelsplat.utils.geometry.image_aug_matrix`): an original pixel
coordinate ``(u, v)`` lands at ``img_aug @ [u, v, 1]`` and the augmented intrinsics are
``img_aug @ K``. Pixel coordinates follow the library convention (integer ``u`` is the
left edge of column ``u``), so the same matrix serves points and images.

BEV augmentation ``bda`` (:func:`voxelsplat.utils.geometry.bda_matrix`: rotation about z,
isotropic scale, x/y flips) acts on ego-frame points. The GT grid is resampled so that the
voxel at augmented position ``p`` takes the label of the voxel containing ``bda^-1 p``
(nearest neighbour); cameras become ``bda @ cam2ego``; velocities become
``bda[:2, :2] @ v`` -- rotated, flipped *and scaled*, because in the scaled world the
adjacent cameras (``bda @ ...``) and hence every displacement are scaled too, so flow
propagation ``x += v * dt`` stays consistent with the render views.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from voxelsplat.structures import OccupancyGrid
from voxelsplat.utils.geometry import bda_matrix, image_aug_matrix

__all__ = [
    "ImageAugParams",
    "sample_image_aug",
    "warp_image",
    "BevAugParams",
    "sample_bev_aug",
    "resample_voxel_grid",
    "transform_velocity",
]

# Below this resize factor, images are first shrunk by area averaging (anti-aliasing)
# before the exact affine warp.
_PRESHRINK_BELOW = 0.75


@dataclass(frozen=True)
class ImageAugParams:
    """Image augmentation of one camera: ``resize`` (factor), ``crop_xy`` (top-left corner of
    the crop in resized pixels), ``flip`` (horizontal), ``rotate_deg`` (about the output
    centre), ``output_size`` (W, H) of the network input."""

    resize: float
    crop_xy: Tuple[float, float]
    flip: bool
    rotate_deg: float
    output_size: Tuple[int, int]

    def matrix(self) -> np.ndarray:
        """(3, 3) float64 pixel transform original -> augmented."""
        return image_aug_matrix(self.resize, self.crop_xy, self.flip, self.rotate_deg,
                                output_width=self.output_size[0], output_height=self.output_size[1])


def sample_image_aug(original_size: Tuple[int, int], output_size: Tuple[int, int], *, is_train: bool,
                     resize_range: Tuple[float, float] = (0.0, 0.0), crop_bottom_range: Tuple[float, float] = (0.0, 0.0),
                     flip_prob: float = 0.0, rotate_range: Tuple[float, float] = (0.0, 0.0),
                     rng: Optional[np.random.Generator] = None) -> ImageAugParams:
    """Draw the image augmentation of one camera (BEVDet's recipe).

    The base resize maps the original width onto the output width; training adds a random
    offset from ``resize_range`` to it. The crop keeps the output height ending a fraction
    ``crop_bottom_range`` (drawn; its mean at test time) above the bottom of the resized
    image, and is centred horizontally at test time, random in training. Test time has no
    flip or rotation.

    Args:
        original_size, output_size: (W, H) in pixels.
    """
    width, height = original_size
    out_w, out_h = output_size
    base = out_w / width
    if is_train:
        rng = rng if rng is not None else np.random.default_rng()
        resize = base + rng.uniform(*resize_range)
        bottom = rng.uniform(*crop_bottom_range)
    else:
        resize, bottom = base, float(np.mean(crop_bottom_range))
    new_w, new_h = width * resize, height * resize
    crop_y = float(int((1.0 - bottom) * new_h) - out_h)
    if is_train:
        crop_x = float(int(rng.uniform(0.0, max(0.0, new_w - out_w))))
        flip = bool(rng.uniform() < flip_prob)
        rotate = float(rng.uniform(*rotate_range))
    else:
        crop_x, flip, rotate = float(int(max(0.0, new_w - out_w) / 2)), False, 0.0
    return ImageAugParams(float(resize), (crop_x, crop_y), flip, rotate, (int(out_w), int(out_h)))


def _pixel_index_affine(continuous: np.ndarray) -> np.ndarray:
    """Convert a pixel transform in library coordinates (pixel centre at index + 0.5) to one
    in OpenCV's index coordinates (pixel centre at index)."""
    to_continuous = np.array([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1.0]])
    to_index = np.array([[1.0, 0, -0.5], [0, 1.0, -0.5], [0, 0, 1.0]])
    return to_index @ continuous @ to_continuous


def warp_image(image: np.ndarray, aug_matrix: np.ndarray, output_size: Tuple[int, int]) -> np.ndarray:
    """Apply a pixel transform to an image.

    Args:
        image: (H, W, C) uint8.
        aug_matrix: (3, 3) affine pixel transform original -> output (last row 0, 0, 1).
        output_size: (W, H) of the output.
    Returns:
        (H_out, W_out, C) uint8; pixels that come from outside the image are 0. Strong
        shrinking is anti-aliased by area averaging first (the overall mapping stays exact).
    """
    import cv2

    height, width = image.shape[:2]
    matrix = np.asarray(aug_matrix, dtype=np.float64)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    if scale < _PRESHRINK_BELOW:
        small_w, small_h = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
        image = cv2.resize(image, (small_w, small_h), interpolation=cv2.INTER_AREA)
        # cv2.resize maps continuous coordinates by exactly (small_w / width, small_h / height).
        matrix = matrix @ np.diag([width / small_w, height / small_h, 1.0])
    affine = _pixel_index_affine(matrix)[:2]
    warped = cv2.warpAffine(image, affine, (int(output_size[0]), int(output_size[1])), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return warped.reshape(int(output_size[1]), int(output_size[0]), *image.shape[2:])


@dataclass(frozen=True)
class BevAugParams:
    """BEV augmentation of one sample (see :func:`voxelsplat.utils.geometry.bda_matrix`)."""

    rotation_deg: float = 0.0
    scale: float = 1.0
    flip_x: bool = False
    flip_y: bool = False

    def matrix(self) -> np.ndarray:
        """(4, 4) float64 ``bda`` acting on ego-frame points."""
        return bda_matrix(self.rotation_deg, self.scale, self.flip_x, self.flip_y)


def sample_bev_aug(*, is_train: bool, rotation_range: Tuple[float, float] = (0.0, 0.0),
                   scale_range: Tuple[float, float] = (1.0, 1.0), flip_x_prob: float = 0.0, flip_y_prob: float = 0.0,
                   rng: Optional[np.random.Generator] = None) -> BevAugParams:
    """Draw a BEV augmentation (rotation in degrees, scale factor, flips); identity at test time."""
    if not is_train:
        return BevAugParams()
    rng = rng if rng is not None else np.random.default_rng()
    return BevAugParams(float(rng.uniform(*rotation_range)), float(rng.uniform(*scale_range)),
                        bool(rng.uniform() < flip_x_prob), bool(rng.uniform() < flip_y_prob))


def bev_source_indices(bda: np.ndarray, grid: OccupancyGrid) -> Tuple[np.ndarray, np.ndarray]:
    """For every voxel of the augmented grid, the original voxel containing ``bda^-1 @ centre``.

    Returns:
        ``(source, inside)``: int64 (X, Y, Z) flat indices into the original grid (clamped into
        the grid) and a bool (X, Y, Z) mask, False where the source point lies outside the grid.
    """
    shape = np.asarray(grid.shape)
    inverse = np.linalg.inv(np.asarray(bda, dtype=np.float64))
    if np.allclose(inverse[:2, 2], 0) and np.allclose(inverse[2, :2], 0):
        # planar transform + vertical scale (every bda_matrix): solve the xy plane and the
        # z column separately instead of all X*Y*Z centres
        axes = [grid.range_min[a] + grid.voxel_size * (np.arange(n) + 0.5) for a, n in enumerate(grid.shape)]
        plane = np.stack(np.meshgrid(axes[0], axes[1], indexing="ij"), axis=-1) @ inverse[:2, :2].T + inverse[:2, 3]
        column = axes[2] * inverse[2, 2] + inverse[2, 3]
        source_xy = np.floor((plane - grid.range_min[:2]) / grid.voxel_size).astype(np.int64)
        source_z = np.floor((column - grid.range_min[2]) / grid.voxel_size).astype(np.int64)
        inside = (np.all((source_xy >= 0) & (source_xy < shape[:2]), axis=-1)[:, :, None]
                  & ((source_z >= 0) & (source_z < shape[2]))[None, None, :])
        source_xy = np.clip(source_xy, 0, shape[:2] - 1)
        source_z = np.clip(source_z, 0, shape[2] - 1)
        flat = (source_xy[..., 0] * shape[1] + source_xy[..., 1])[:, :, None] * shape[2] + source_z[None, None, :]
        return flat, inside
    centres = grid.voxel_centers().reshape(-1, 3)
    source = grid.point_to_index(centres @ inverse[:3, :3].T + inverse[:3, 3])
    inside = grid.contains_index(source)
    source = np.clip(source, 0, shape - 1)
    flat = np.ravel_multi_index(tuple(source.T), grid.shape)
    return flat.reshape(grid.shape), inside.reshape(grid.shape)


def resample_voxel_grid(volume: np.ndarray, bda: np.ndarray, grid: OccupancyGrid, fill_value=0,
                        source: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> np.ndarray:
    """Nearest-neighbour resampling of a voxel array under BEV augmentation.

    Args:
        volume: (X, Y, Z, ...) array over ``grid`` (any trailing channel dims, any dtype).
        bda: (4, 4) BEV augmentation.
        fill_value: value of augmented voxels whose source lies outside the grid.
        source: precomputed :func:`bev_source_indices` (to reuse it for several arrays).
    Returns:
        (X, Y, Z, ...) array of the same dtype, ``out[v] = volume[index(bda^-1 centre(v))]``.
        Channels are copied, not transformed (use :func:`transform_velocity` for vectors).
    """
    if tuple(volume.shape[:3]) != tuple(grid.shape):
        raise ValueError(f"resample_voxel_grid: volume of shape {volume.shape} does not match grid {grid.shape}")
    flat, inside = source if source is not None else bev_source_indices(bda, grid)
    values = volume.reshape(-1, *volume.shape[3:])
    out = np.take(values, flat.reshape(-1), axis=0).reshape(volume.shape)
    out[~inside] = fill_value
    return out


def transform_velocity(velocity: np.ndarray, bda: np.ndarray) -> np.ndarray:
    """(..., 2) planar velocities (vx, vy) in m/s -> their BEV-augmented values
    ``bda[:2, :2] @ v`` (rotated, flipped and scaled; see the module docstring)."""
    velocity = np.asarray(velocity)
    linear = np.asarray(bda, dtype=np.float64)[:2, :2].astype(velocity.dtype)
    out = np.empty_like(velocity)
    out[..., 0] = linear[0, 0] * velocity[..., 0] + linear[0, 1] * velocity[..., 1]
    out[..., 1] = linear[1, 0] * velocity[..., 0] + linear[1, 1] * velocity[..., 1]
    return out


def transform_cameras(cam2ego: np.ndarray, bda: np.ndarray) -> np.ndarray:
    """(C, 4, 4) camera->ego transforms -> camera->augmented ego: ``bda @ cam2ego``."""
    return np.asarray(bda, dtype=np.float64) @ np.asarray(cam2ego, dtype=np.float64)


def validate_range(name: str, value: Sequence[float]) -> Tuple[float, float]:
    """A (low, high) config range as floats; raises naming the option when malformed."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if low > high:
        raise ValueError(f"{name} must satisfy low <= high, got {value!r}")
    return low, high
