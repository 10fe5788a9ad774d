"""``TemporalDatasetMapper``: a dataset record -> one model input sample (the contract of
:mod:`voxelsplat.data.sample_fields`)."""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from voxelsplat.utils.geometry import transform_points

from .gaussian_sampling import SPEED_BIN_EDGES, sample_gaussian_voxels
from .lidar_depth import lidar_depth_maps
from .loading import load_image, load_lidar_points, load_occupancy_labels
from .occupancy_meta import OccupancyGrid, grid_from_metadata, occupancy_metadata
from .render_views import adjacent_render_views, cameras_to_reference_ego
from .transforms import (
    ImageAugParams,
    bev_source_indices,
    resample_voxel_grid,
    sample_bev_aug,
    sample_image_aug,
    transform_cameras,
    transform_velocity,
    validate_range,
    warp_image,
)

__all__ = ["TemporalDatasetMapper", "DEFAULT_REGULARIZER_OPTIONS"]

# Options of the VoxelSplat regularizer inputs (``regularizer=dict(...)`` overrides them).
DEFAULT_REGULARIZER_OPTIONS = dict(
    num_gaussians=100000,               # voxels sampled per sample
    frame_offsets=(-2, -1, 0, 1, 2, 3),  # keyframes rendered, relative to the current one
    render_scale=0.25,                  # render resolution / original image resolution
    speed_bin_edges=SPEED_BIN_EDGES,    # m/s, see gaussian_sampling
)


class TemporalDatasetMapper:
    """Load and augment one keyframe for temporal occupancy + flow training and evaluation.

    Input: a record of :mod:`voxelsplat.data.datasets` (optionally with ``sequence_start``
    set by the sampler, and ``scene_records`` -- the records of its scene in time order --
    attached by :class:`voxelsplat.data.build.SceneSequenceDataset` when the regularizer is on).

    Output: a dict with exactly the fields of ``MAPPER_FIELDS`` (plus ``OPTIONAL_FIELDS`` the
    GT provides, plus ``REGULARIZER_FIELDS`` in training when ``regularizer`` is set); see
    :mod:`voxelsplat.data.sample_fields` for shapes and frames. Cameras are expressed in the
    LiDAR keyframe's ego frame (per-camera ego poses applied), then BEV-augmented.

    Randomness comes from a generator seeded from numpy's global RNG, which detectron2 seeds
    per data-loader worker, so runs are reproducible for a fixed seed.

    Args:
        is_train: draw augmentations and attach regularizer inputs. At test time images only
            get the deterministic resize + crop to ``image_size`` and there is no BEV augmentation.
        image_size: (W, H) of the network input.
        resize_range: training offset added to the base resize factor ``W / W_original``.
        crop_bottom_range: fraction of the resized height discarded at the bottom (drawn in
            training; its mean at test time).
        flip_prob: probability of a horizontal flip per camera (training).
        rotate_range: image rotation range in degrees (training).
        bda_rotation_range: BEV rotation range in degrees (training).
        bda_scale_range: BEV scale range (training).
        bda_flip_x_prob, bda_flip_y_prob: probabilities of the BEV flips x -> -x, y -> -y.
        load_lidar_depth: attach ``lidar_depth``; when False it is all zeros.
        regularizer: None, or options of the VoxelSplat inputs (keys of
            ``DEFAULT_REGULARIZER_OPTIONS``); used in training only.
        dataset_name: a registered dataset, for the grid and label set (``MetadataCatalog``).
        metadata: the same entries as a dict, instead of ``dataset_name``. With neither, the
            default grid and the label set named by each record's ``gt_format``.
    """

    def __init__(self, is_train: bool, image_size: Tuple[int, int], *,
                 resize_range: Tuple[float, float] = (-0.06, 0.11),
                 crop_bottom_range: Tuple[float, float] = (0.0, 0.0),
                 flip_prob: float = 0.5,
                 rotate_range: Tuple[float, float] = (-5.4, 5.4),
                 bda_rotation_range: Tuple[float, float] = (0.0, 0.0),
                 bda_scale_range: Tuple[float, float] = (1.0, 1.0),
                 bda_flip_x_prob: float = 0.5,
                 bda_flip_y_prob: float = 0.5,
                 load_lidar_depth: bool = True,
                 regularizer: Optional[dict] = None,
                 dataset_name: Optional[str] = None,
                 metadata: Optional[dict] = None):
        self.is_train = bool(is_train)
        if len(image_size) != 2 or min(int(s) for s in image_size) <= 0:
            raise ValueError(f"image_size must be (W, H) with positive ints, got {image_size!r}")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.resize_range = validate_range("resize_range", resize_range)
        self.crop_bottom_range = validate_range("crop_bottom_range", crop_bottom_range)
        self.rotate_range = validate_range("rotate_range", rotate_range)
        self.bda_rotation_range = validate_range("bda_rotation_range", bda_rotation_range)
        self.bda_scale_range = validate_range("bda_scale_range", bda_scale_range)
        if self.bda_scale_range[0] <= 0:
            raise ValueError(f"bda_scale_range must be positive, got {bda_scale_range!r}")
        for name, prob in (("flip_prob", flip_prob), ("bda_flip_x_prob", bda_flip_x_prob),
                           ("bda_flip_y_prob", bda_flip_y_prob)):
            if not 0.0 <= float(prob) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {prob!r}")
        self.flip_prob, self.bda_flip_x_prob, self.bda_flip_y_prob = float(flip_prob), float(bda_flip_x_prob), \
            float(bda_flip_y_prob)
        self.load_lidar_depth = bool(load_lidar_depth)
        self.regularizer = self._regularizer_options(regularizer)
        self.dataset_name = dataset_name
        self._metadata = dict(metadata) if metadata is not None else None

    @staticmethod
    def _regularizer_options(regularizer: Optional[dict]) -> Optional[dict]:
        if regularizer is None:
            return None
        unknown = sorted(set(regularizer) - set(DEFAULT_REGULARIZER_OPTIONS))
        if unknown:
            raise KeyError(f"TemporalDatasetMapper: unknown regularizer options {unknown}; known: "
                           f"{sorted(DEFAULT_REGULARIZER_OPTIONS)}")
        options = dict(DEFAULT_REGULARIZER_OPTIONS)
        options.update(regularizer)
        options["frame_offsets"] = tuple(int(o) for o in options["frame_offsets"])
        options["speed_bin_edges"] = tuple(float(e) for e in options["speed_bin_edges"])
        if int(options["num_gaussians"]) <= 0 or float(options["render_scale"]) <= 0 or not options["frame_offsets"]:
            raise ValueError(f"TemporalDatasetMapper: regularizer options need num_gaussians > 0, render_scale > 0 "
                             f"and at least one frame offset, got {options}")
        return options

    @property
    def needs_scene_records(self) -> bool:
        """Whether records must carry ``scene_records`` (render views of adjacent keyframes)."""
        return self.is_train and self.regularizer is not None

    def _label_space(self, gt_format: str) -> Tuple[OccupancyGrid, int, int]:
        """(grid, number of classes, free index) for records of ``gt_format``."""
        metadata = self._metadata
        if metadata is None and self.dataset_name is not None:
            from detectron2.data import MetadataCatalog

            metadata = MetadataCatalog.get(self.dataset_name).as_dict()
            self._metadata = metadata
        if metadata is None:
            metadata = occupancy_metadata(gt_format)
        if metadata.get("gt_format", gt_format) != gt_format:
            raise ValueError(f"record has gt_format {gt_format!r} but the mapper's metadata is for "
                             f"{metadata['gt_format']!r}")
        # detectron2's Metadata stores "class_names" under its renamed key "thing_classes"
        class_names = metadata.get("thing_classes") or metadata.get("class_names")
        return grid_from_metadata(metadata), len(class_names), int(metadata["free_index"])

    def __call__(self, record: dict) -> Dict[str, object]:
        record = copy.copy(record)
        token = record["sample_token"]
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1, size=4))
        grid, num_classes, free_index = self._label_space(record["gt_format"])

        # --- cameras and images -------------------------------------------------------
        cameras = record["cameras"]
        cam2ego = cameras_to_reference_ego(cameras, record["ego2global"])  # (C, 4, 4), un-augmented
        images, img_aug, intrinsics = [], [], []
        for camera in cameras:
            image = load_image(camera["image_path"], token)
            height, width = image.shape[:2]
            if (width, height) != (int(camera["width"]), int(camera["height"])):
                raise ValueError(f"sample {token}: image {camera['image_path']!r} is {width}x{height}, the dataset says "
                                 f"{camera['width']}x{camera['height']}")
            params: ImageAugParams = sample_image_aug(
                (width, height), self.image_size, is_train=self.is_train, resize_range=self.resize_range,
                crop_bottom_range=self.crop_bottom_range, flip_prob=self.flip_prob, rotate_range=self.rotate_range,
                rng=rng)
            matrix = params.matrix()
            images.append(warp_image(image, matrix, self.image_size))
            img_aug.append(matrix)
            intrinsics.append(matrix @ np.asarray(camera["intrinsics"], dtype=np.float64))
        img_aug, intrinsics = np.stack(img_aug), np.stack(intrinsics)

        # --- BEV augmentation ---------------------------------------------------------
        bev = sample_bev_aug(is_train=self.is_train, rotation_range=self.bda_rotation_range,
                             scale_range=self.bda_scale_range, flip_x_prob=self.bda_flip_x_prob,
                             flip_y_prob=self.bda_flip_y_prob, rng=rng)
        bda = bev.matrix()
        labels = load_occupancy_labels(record["gt_path"], token, record["gt_format"], grid.shape, num_classes)
        labels = self._augment_labels(labels, bda, grid, free_index)

        sample: Dict[str, object] = dict(
            img=torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))),
            intrinsics=torch.from_numpy(intrinsics.astype(np.float32)),
            cam2ego=torch.from_numpy(transform_cameras(cam2ego, bda).astype(np.float32)),
            ego2global=torch.from_numpy(np.asarray(record["ego2global"], dtype=np.float64)),
            img_aug=torch.from_numpy(img_aug.astype(np.float32)),
            bda=torch.from_numpy(bda.astype(np.float32)),
            lidar_depth=torch.from_numpy(self._lidar_depth(record, cam2ego, intrinsics)),
            occ_semantics=torch.from_numpy(labels["semantics"].astype(np.int64)),
            occ_flow=torch.from_numpy(labels["flow"]),
            sample_token=token,
            scene_token=record["scene_token"],
            timestamp=int(record["timestamp"]),
            frame_index=int(record["frame_index"]),
            sequence_start=bool(record.get("sequence_start", int(record["frame_index"]) == 0)),
            prev_sample_token=record["prev_sample_token"] or "",
            lidar_origins=torch.from_numpy(np.asarray(record["lidar_origins"], dtype=np.float32).reshape(-1, 3)),
        )
        for source_key, field in (("mask_camera", "occ_mask_camera"), ("mask_lidar", "occ_mask_lidar"),
                                  ("visible", "occ_visible")):
            if labels[source_key] is not None:
                sample[field] = torch.from_numpy(labels[source_key])
        if self.needs_scene_records:
            sample.update(self._regularizer_inputs(record, labels, bda, num_classes, rng))
        return sample

    @staticmethod
    def _augment_labels(labels: dict, bda: np.ndarray, grid: OccupancyGrid, free_index: int) -> dict:
        """BEV-augment semantics (outside -> free), flow (outside -> 0, vectors transformed)
        and masks (outside -> False); Occ3D's missing flow becomes zeros."""
        flow = labels["flow"] if labels["flow"] is not None else np.zeros(labels["semantics"].shape + (2,), np.float32)
        if np.allclose(bda, np.eye(4)):
            return dict(labels, flow=flow)
        source = bev_source_indices(bda, grid)
        out = dict(semantics=resample_voxel_grid(labels["semantics"], bda, grid, free_index, source),
                   flow=transform_velocity(resample_voxel_grid(flow, bda, grid, 0.0, source), bda).astype(np.float32))
        for key in ("visible", "mask_camera", "mask_lidar"):
            out[key] = None if labels[key] is None else resample_voxel_grid(labels[key], bda, grid, False, source)
        return out

    def _lidar_depth(self, record: dict, cam2ego: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
        """(C, H, W) float32 depth of the keyframe's LiDAR points in the augmented images."""
        if not self.load_lidar_depth:
            return np.zeros((len(cam2ego), self.image_size[1], self.image_size[0]), dtype=np.float32)
        lidar = record["lidar"]
        points = load_lidar_points(lidar["path"], record["sample_token"])
        # LiDAR -> its ego pose -> the keyframe ego (the same pose for the keyframe's own LiDAR)
        lidar2keyego = np.linalg.inv(np.asarray(record["ego2global"], dtype=np.float64)) \
            @ np.asarray(lidar["ego2global"], dtype=np.float64) @ np.asarray(lidar["lidar2ego"], dtype=np.float64)
        return lidar_depth_maps(transform_points(lidar2keyego, points.astype(np.float64)), cam2ego, intrinsics,
                                self.image_size)

    def _regularizer_inputs(self, record: dict, labels: dict, bda: np.ndarray, num_classes: int,
                            rng: np.random.Generator) -> Dict[str, object]:
        options = self.regularizer
        scene_records = record.get("scene_records")
        if scene_records is None:
            raise KeyError(f"sample {record['sample_token']}: the regularizer needs the record's 'scene_records' (its "
                           "scene's records in time order); load through build_train_loader / SceneSequenceDataset")
        # ray-visible voxels when the GT has them; Occ3D's camera mask otherwise; else every voxel
        candidates = labels["visible"] if labels["visible"] is not None else labels.get("mask_camera")
        indices = sample_gaussian_voxels(labels["semantics"], labels["flow"], candidates, int(options["num_gaussians"]),
                                         num_classes, rng, options["speed_bin_edges"])
        views = adjacent_render_views(record, scene_records, options["frame_offsets"], bda,
                                      float(options["render_scale"]))
        return dict(
            gaussian_voxel_indices=torch.from_numpy(indices),
            render_viewmats=torch.from_numpy(views["render_viewmats"].astype(np.float32)),
            render_intrinsics=torch.from_numpy(views["render_intrinsics"].astype(np.float32)),
            render_image_size=tuple(int(s) for s in views["render_image_size"]),
            render_frame_offsets=torch.from_numpy(views["render_frame_offsets"]),
            render_time_offsets=torch.from_numpy(views["render_time_offsets"].astype(np.float32)),
        )
