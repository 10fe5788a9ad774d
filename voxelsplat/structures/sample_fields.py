"""The contract between the data pipeline and the models: what one mapped sample holds.

``TemporalDatasetMapper`` returns one ``dict`` per keyframe with the fields below
(torch tensors unless noted); models read them from ``batched_inputs`` (a list of
such dicts). Shapes use N_cam cameras, images H x W after image augmentation, the
GT grid X x Y x Z (from the dataset's metadata), N sampled Gaussians and V render
views. All geometry is in the *current* keyframe's ego frame *after* BEV
augmentation (``bda``) unless a field says otherwise.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

# name -> (shape, dtype, meaning). Shape letters: C=N_cam, H/W image, X/Y/Z grid,
# N Gaussians, V render views, K ray origins, P LiDAR points, M adjacent GT points.
MAPPER_FIELDS: Dict[str, Tuple[str, str, str]] = {
    "img": ("C,3,H,W", "uint8", "camera images (RGB) after image augmentation, CAM_FRONT first in nuScenes order"),
    "intrinsics": ("C,3,3", "float32", "camera intrinsics after image augmentation (= img_aug @ K)"),
    "cam2ego": ("C,4,4", "float32", "camera (OpenCV) to ego transform, BEV augmentation applied (= bda @ cam2ego)"),
    "ego2global": ("4,4", "float64", "ego-to-global pose of this keyframe (not augmented)"),
    "img_aug": ("C,3,3", "float32", "pixel transform of the image augmentation (original pixels -> augmented)"),
    "bda": ("4,4", "float32", "BEV augmentation acting on ego-frame points"),
    "lidar_depth": ("C,H,W", "float32", "LiDAR depth (m) projected into each augmented image; 0 = no return"),
    "occ_semantics": ("X,Y,Z", "int64", "GT class per voxel (dataset's label set), BEV-augmented"),
    "occ_flow": ("X,Y,Z,2", "float32", "GT velocity (vx, vy) in m/s in the augmented ego frame"),
    "gt_format": ("", "str", "label set of occ_semantics (the dataset's OccupancySpec.label_set)"),
    "sample_token": ("", "str", "nuScenes sample token"),
    "scene_token": ("", "str", "nuScenes scene token"),
    "timestamp": ("", "int", "keyframe timestamp, microseconds"),
    "frame_index": ("", "int", "index of the keyframe in its scene"),
    "sequence_start": ("", "bool", "True when temporal history must be reset before this sample"),
    "prev_sample_token": ("", "str", "previous keyframe's token ('' at the first keyframe of a scene)"),
    "lidar_origins": ("K,3", "float32", "RayIoU ray origins in the (un-augmented) ego frame, see select_lidar_origins"),
}

# Present when the ground truth provides them.
OPTIONAL_FIELDS: Dict[str, Tuple[str, str, str]] = {
    "occ_mask_camera": ("X,Y,Z", "bool", "Occ3D camera-visibility mask"),
    "occ_mask_lidar": ("X,Y,Z", "bool", "Occ3D LiDAR-visibility mask"),
    "occ_visible": ("X,Y,Z", "bool", "voxels crossed or hit by LiDAR rays (Gaussian sampling domain)"),
}

# Attached in training when the mapper is configured for the VoxelSplat regularizer.
REGULARIZER_FIELDS: Dict[str, Tuple[str, str, str]] = {
    "gaussian_voxel_indices": ("N,3", "int64", "sampled voxel indices [x, y, z] into the GT grid"),
    "render_viewmats": ("V,4,4", "float32", "world(current augmented ego)->camera (OpenCV) of each render view"),
    "render_intrinsics": ("V,3,3", "float32", "intrinsics at the render resolution"),
    "render_image_size": ("2", "int", "(width, height) of the renders, a tuple of ints"),
    "render_frame_offsets": ("V", "int64", "keyframe offset of each view relative to the current one (e.g. -2..3)"),
    "render_time_offsets": ("V", "float32", "view time minus current time, seconds (for flow propagation)"),
}

# Attached with the regularizer fields when the mapper's ``adjacent_gt_gaussians`` option is
# above 0 (not in the release): occupied GT voxels of the adjacent keyframes the render views
# show, each keyframe's own labels (not the current GT moved by flow). M points in all, up to
# ``adjacent_gt_gaussians`` per keyframe; none of offset 0 (those views use the current GT).
ADJACENT_GT_FIELDS: Dict[str, Tuple[str, str, str]] = {
    "adjacent_gt_means": ("M,3", "float32", "voxel centres of the adjacent keyframe's GT, metres, moved into the "
                                            "current augmented ego frame (= bda @ inv(ego2global_t) @ ego2global_t+o)"),
    "adjacent_gt_classes": ("M", "int64", "GT class of each point (dataset's label set, never free)"),
    "adjacent_gt_flow": ("M,2", "float32", "GT velocity (vx, vy) in m/s, rotated into the current augmented ego "
                                           "frame (ego-to-ego rotation, then bda[:2, :2])"),
    "adjacent_gt_frame_offsets": ("M", "int64", "effective keyframe offset of each point's keyframe, one of the "
                                                "non-zero render_frame_offsets values"),
}


def check_sample(sample: dict, *, with_regularizer: bool = False, with_adjacent_gt: bool = False) -> None:
    """Raise ``KeyError``/``ValueError`` naming the field when ``sample`` breaks the contract
    (``with_adjacent_gt``: the ``ADJACENT_GT_FIELDS`` too, with one M for all of them)."""
    required = dict(MAPPER_FIELDS)
    if with_regularizer:
        required.update(REGULARIZER_FIELDS)
    if with_adjacent_gt:
        required.update(ADJACENT_GT_FIELDS)
    token = sample.get("sample_token", "<unknown>")
    for name, (shape, _, _) in required.items():
        if name not in sample:
            raise KeyError(f"mapped sample {token}: missing field {name!r} ({required[name][2]})")
        if not shape or not isinstance(sample[name], torch.Tensor):
            continue
        dims = shape.split(",")
        value = sample[name]
        if value.dim() != len(dims):
            raise ValueError(f"mapped sample {token}: field {name!r} has shape {tuple(value.shape)}, expected ({shape})")
        for dim, expected in zip(value.shape, dims):
            if expected.isdigit() and dim != int(expected):
                raise ValueError(f"mapped sample {token}: field {name!r} has shape {tuple(value.shape)}, expected ({shape})")
    if with_adjacent_gt:
        counts = {name: int(sample[name].shape[0]) for name in ADJACENT_GT_FIELDS}
        if len(set(counts.values())) != 1:
            raise ValueError(f"mapped sample {token}: the adjacent GT fields disagree on M: {counts}")
