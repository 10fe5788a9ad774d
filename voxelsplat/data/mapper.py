"""``TemporalDatasetMapper``: a dataset record -> one model input sample (the contract of
:mod:`voxelsplat.structures.sample_fields`)."""
from __future__ import annotations

import copy
import logging
import os
import zipfile
from collections.abc import Mapping
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from voxelsplat.utils.geometry import transform_points

from .gaussian_sampling import (
    SPEED_BIN_EDGES,
    SPEED_BIN_RULES,
    VoxelCounts,
    class_counts_in_label_order,
    count_dataset_voxels,
    count_voxels,
    inverse_frequency_weights,
    sample_gaussian_voxels,
)
from .lidar_depth import lidar_depth_maps
from .loading import (
    load_image,
    load_lidar_points,
    load_record_labels,
)
from ..structures import IGNORE_LABEL, OccupancyGrid, OccupancySpec
from .render_views import OUT_OF_SCENE_RULES, adjacent_render_views, cameras_to_reference_ego
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

logger = logging.getLogger(__name__)

__all__ = ["TemporalDatasetMapper", "DEFAULT_REGULARIZER_OPTIONS"]

# Where the sampling weights' voxel counts come from (besides explicit counts).
FREQUENCY_SOURCES = ("dataset", "sample")

# Options of the VoxelSplat regularizer inputs (``regularizer=dict(...)`` overrides them);
# the defaults are the released recipe. See voxelsplat.data.gaussian_sampling for the weights.
DEFAULT_REGULARIZER_OPTIONS = dict(
    num_gaussians=100000,               # voxels sampled per sample (without replacement)
    frame_offsets=(-2, -1, 0, 1, 2, 3),  # keyframes rendered, relative to the current one
    render_scale=0.25,                  # render resolution / original image resolution
    speed_bin_edges=SPEED_BIN_EDGES,    # m/s, upper edges of all speed bins but the last
    speed_bin_rule="release",           # "release": speed 0 in the last bin; "corrected": in the first
    class_frequencies="dataset",        # "dataset" | "sample" | {class name: count} | counts in label order
    speed_bin_frequencies="dataset",    # "dataset" | "sample" | counts per speed bin
    out_of_scene_views="current",       # a keyframe beyond the scene: the current one (released) or "nearest"
    adjacent_gt_gaussians=0,            # not released: occupied GT voxels drawn per adjacent keyframe (0: none)
)


class TemporalDatasetMapper:
    """Load and augment one keyframe for temporal occupancy + flow training and evaluation.

    Input: a record of :mod:`voxelsplat.data.datasets` (optionally with ``sequence_start``
    set by the sampler, and ``scene_records`` -- the records of its scene in time order --
    attached by :class:`voxelsplat.data.build.SceneSequenceDataset` when the regularizer is on).

    Output: a dict with exactly the fields of ``MAPPER_FIELDS`` (plus ``OPTIONAL_FIELDS`` the
    GT provides, plus ``REGULARIZER_FIELDS`` in training when ``regularizer`` is set, plus
    ``ADJACENT_GT_FIELDS`` when its ``adjacent_gt_gaussians`` is above 0); see
    :mod:`voxelsplat.structures.sample_fields` for shapes and frames. Cameras are expressed in the
    LiDAR keyframe's ego frame (per-camera ego poses applied), then BEV-augmented.

    Randomness comes from a generator seeded with the record's ``sample_seed`` (a tuple of
    ints the training samplers derive from their seed, the epoch and the frame), else from
    numpy's global RNG, which detectron2 seeds per data-loader worker.

    Args:
        is_train: draw augmentations and attach regularizer inputs. At test time images only
            get the deterministic resize + crop to ``input_size`` and there is no BEV augmentation.
        input_size: (W, H) of the network input images (cameras of any resolution are resized
            and cropped to it).
        resize_range: training offset added to the base resize factor ``W / W_original``.
        crop_bottom_range: fraction of the resized height discarded at the bottom (drawn in
            training; its mean at test time).
        flip_prob: probability of a horizontal flip per camera (training).
        rotate_range: image rotation range in degrees (training).
        bda_rotation_range: BEV rotation range in degrees (training).
        bda_scale_range: BEV scale range (training).
        bda_flip_x_prob, bda_flip_y_prob: probabilities of the BEV flips x -> -x, y -> -y.
        bda_outside_label: the label of voxels a BEV rotation brings in from outside the
            original grid: "ignore" (``IGNORE_LABEL``, no occupancy loss and no Gaussian there,
            as released) or "free".
        load_lidar_depth: attach ``lidar_depth``; when False it is all zeros.
        regularizer: None, or options of the VoxelSplat inputs (keys of
            ``DEFAULT_REGULARIZER_OPTIONS``); used in training only. The Gaussians' voxels are
            drawn among the ray-visible ones (the dataset's separate mask, see
            ``register_nuscenes_occupancy(visible_mask_root=...)``, else the labels' ``visible``
            key, else Occ3D's ``mask_camera``, else -- with a warning -- every voxel inside the
            augmented grid), weighted by inverse square-root voxel frequencies of their class
            and speed bin (:mod:`voxelsplat.data.gaussian_sampling`):

            - ``class_frequencies`` / ``speed_bin_frequencies``: ``"dataset"`` (every voxel of
              the training split, counted once by :meth:`prepare` -- which
              ``build_train_loader`` calls in the main process -- and cached next to the
              record cache), ``"sample"`` (the sample's own candidates), or explicit counts:
              per class as ``{class name: count}`` or a list in label order, per speed bin as
              a list (e.g. the release's ``NUSCENES_OPENOCC_V2_CLASS_COUNTS`` /
              ``NUSCENES_OPENOCC_V2_SPEED_BIN_COUNTS``, every voxel of nuScenes trainval).
            - ``speed_bin_rule``: ``"release"`` reproduces the released code, which puts a speed
              of exactly 0 (static voxels) in the last, fastest bin and uses left-open bins;
              the published numbers were trained so. ``"corrected"`` puts static voxels in the
              first bin (half-open ``[lo, hi)`` bins), which is what the weighting intends.
            - ``adjacent_gt_gaussians`` (not released; 0 = off): for each adjacent keyframe
              among the render views' effective offsets (not 0), up to this many of its own
              occupied GT voxels (ray-visible ones when its labels have a mask, same sources
              as above), drawn uniformly without replacement among those whose centre lands
              inside the current grid's x-y range once expressed in the current augmented ego
              frame. They become the ``ADJACENT_GT_FIELDS`` of
              :mod:`voxelsplat.structures.sample_fields`, the propagated-state targets of
              ``GaussianSplatRegularizer(propagated_targets="adjacent_gt")``.
        dataset_name: a registered dataset, for its :class:`~voxelsplat.structures.OccupancySpec`
            (``MetadataCatalog``; read here when the dataset is registered already, so loader
            worker processes need no registration).
        metadata: the same entries as a dict, instead of ``dataset_name``. With neither, the
            default grid and the label set named by each record's ``gt_format``.
    """

    def __init__(self, is_train: bool, input_size: Tuple[int, int], *,
                 resize_range: Tuple[float, float] = (-0.06, 0.11),
                 crop_bottom_range: Tuple[float, float] = (0.0, 0.0),
                 flip_prob: float = 0.5,
                 rotate_range: Tuple[float, float] = (-5.4, 5.4),
                 bda_rotation_range: Tuple[float, float] = (0.0, 0.0),
                 bda_scale_range: Tuple[float, float] = (1.0, 1.0),
                 bda_flip_x_prob: float = 0.5,
                 bda_flip_y_prob: float = 0.5,
                 bda_outside_label: str = "ignore",
                 load_lidar_depth: bool = True,
                 regularizer: Optional[dict] = None,
                 dataset_name: Optional[str] = None,
                 metadata: Optional[dict] = None):
        self.is_train = bool(is_train)
        if len(input_size) != 2 or min(int(s) for s in input_size) <= 0:
            raise ValueError(f"TemporalDatasetMapper: input_size must be (W, H) with positive ints, got {input_size!r}")
        self.input_size = (int(input_size[0]), int(input_size[1]))
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
        if bda_outside_label not in ("ignore", "free"):
            raise ValueError(f"bda_outside_label must be 'ignore' or 'free', got {bda_outside_label!r}")
        self.bda_outside_label = bda_outside_label
        self.load_lidar_depth = bool(load_lidar_depth)
        self.regularizer = self._regularizer_options(regularizer)
        self.dataset_name = dataset_name
        self._spec: Optional[OccupancySpec] = OccupancySpec.from_metadata(metadata) if metadata is not None else None
        if self._spec is None and dataset_name is not None:
            from detectron2.data import MetadataCatalog

            if dataset_name in MetadataCatalog.list():
                self._spec = OccupancySpec.from_metadata(MetadataCatalog.get(dataset_name))
        self._dataset_voxel_counts: Optional[VoxelCounts] = None
        self._warned_no_visibility = False

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
        edges = options["speed_bin_edges"] = tuple(float(e) for e in options["speed_bin_edges"])
        if int(options["num_gaussians"]) <= 0 or float(options["render_scale"]) <= 0 or not options["frame_offsets"]:
            raise ValueError(f"TemporalDatasetMapper: regularizer options need num_gaussians > 0, render_scale > 0 "
                             f"and at least one frame offset, got {options}")
        if not edges or edges[0] <= 0 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"TemporalDatasetMapper: regularizer speed_bin_edges must be positive and increasing, got "
                             f"{edges}")
        if options["out_of_scene_views"] not in OUT_OF_SCENE_RULES:
            raise ValueError(f"TemporalDatasetMapper: regularizer out_of_scene_views must be one of "
                             f"{OUT_OF_SCENE_RULES}, got {options['out_of_scene_views']!r}")
        if int(options["adjacent_gt_gaussians"]) < 0:
            raise ValueError(f"TemporalDatasetMapper: regularizer adjacent_gt_gaussians must be >= 0 (0: off), got "
                             f"{options['adjacent_gt_gaussians']!r}")
        options["adjacent_gt_gaussians"] = int(options["adjacent_gt_gaussians"])
        if options["speed_bin_rule"] not in SPEED_BIN_RULES:
            raise ValueError(f"TemporalDatasetMapper: regularizer speed_bin_rule must be one of {SPEED_BIN_RULES}, got "
                             f"{options['speed_bin_rule']!r}")
        for key in ("class_frequencies", "speed_bin_frequencies"):
            value = options[key]
            if isinstance(value, str):
                if value not in FREQUENCY_SOURCES:
                    raise ValueError(f"TemporalDatasetMapper: regularizer {key} must be one of {FREQUENCY_SOURCES} or "
                                     f"explicit counts, got {value!r}")
            elif isinstance(value, Mapping):
                if key == "speed_bin_frequencies":
                    raise ValueError(f"TemporalDatasetMapper: regularizer {key} takes a list of counts per speed bin, "
                                     f"not a mapping")
                options[key] = {str(k): float(v) for k, v in value.items()}
            else:
                options[key] = tuple(float(v) for v in value)
        if not isinstance(options["speed_bin_frequencies"], str):
            # validated now; class counts need the label set, known when the first sample comes
            if len(options["speed_bin_frequencies"]) != len(edges) + 1:
                raise ValueError(f"TemporalDatasetMapper: regularizer speed_bin_frequencies has "
                                 f"{len(options['speed_bin_frequencies'])} counts for {len(edges) + 1} speed bins "
                                 f"(edges {edges})")
            inverse_frequency_weights(options["speed_bin_frequencies"])
        return options

    @property
    def needs_scene_records(self) -> bool:
        """Whether records must carry ``scene_records`` (render views of adjacent keyframes)."""
        return self.is_train and self.regularizer is not None

    @property
    def needs_dataset_voxel_counts(self) -> bool:
        """Whether the sampling weights wait for dataset-wide counts (see :meth:`prepare`)."""
        return (self.needs_scene_records and self._dataset_voxel_counts is None
                and "dataset" in (self.regularizer["class_frequencies"], self.regularizer["speed_bin_frequencies"]))

    def prepare(self, records: Sequence[dict], *, cache_dir: Optional[str] = None, num_workers: int = 0) -> None:
        """Work done once per training run, in the main process before data-loader workers
        start (``build_train_loader`` calls it): count the voxels of ``records`` (the whole
        training split) when the sampling weights use dataset-wide counts, and warn once when
        the records offer no visibility mask to sample from. Workers inherit the result.

        Args:
            records: the training records.
            cache_dir: where the counts are cached (see
                :func:`~voxelsplat.data.gaussian_sampling.count_dataset_voxels`); None: no cache.
            num_workers: processes reading label files.
        """
        if not self.needs_scene_records or not records:
            return
        if self.needs_dataset_voxel_counts:
            formats = sorted({r["gt_format"] for r in records})
            if len(formats) != 1:
                raise ValueError(f"TemporalDatasetMapper: dataset-wide voxel counts need one label format, the records "
                                 f"mix {formats}")
            spec = self.spec_for(formats[0])
            self._dataset_voxel_counts = count_dataset_voxels(records, spec.grid.shape, spec.num_classes,
                                                              self.regularizer["speed_bin_edges"], cache_dir,
                                                              num_workers)
        first = records[0]
        if not first.get("visible_mask_path") and os.path.isfile(first["gt_path"]):
            # a missing or corrupt file is reported, naming it, when its sample is loaded
            try:
                with np.load(first["gt_path"], allow_pickle=False) as labels:
                    keys = set(labels.files)
            except (OSError, ValueError, zipfile.BadZipFile):
                keys = None
            if keys is not None and not {"visible", "mask_camera"} & keys:
                self._warn_no_visibility_mask()

    def _warn_no_visibility_mask(self) -> None:
        if not self._warned_no_visibility:
            logger.warning("dataset %s has no ray-visibility mask (no visible_mask_root, and its labels.npz have no "
                           "'visible' or 'mask_camera' key): the regularizer's Gaussians are sampled among all voxels",
                           self.dataset_name or "(records given to the mapper directly)")
            self._warned_no_visibility = True

    def spec_for(self, gt_format: str) -> OccupancySpec:
        """The occupancy spec of records of ``gt_format``: the dataset's, which must be of that
        label set (without a dataset: the label set's spec on the default grid)."""
        if self._spec is None and self.dataset_name is not None:
            from detectron2.data import MetadataCatalog

            self._spec = OccupancySpec.from_metadata(MetadataCatalog.get(self.dataset_name))
        if self._spec is None:
            return OccupancySpec.for_label_set(gt_format)
        if self._spec.label_set != gt_format:
            raise ValueError(f"record has gt_format {gt_format!r} but the mapper's dataset "
                             f"{self.dataset_name or '(metadata)'} is {self._spec.describe()}")
        return self._spec

    def __call__(self, record: dict) -> Dict[str, object]:
        record = copy.copy(record)
        token = record["sample_token"]
        # Training samplers give each item its own seed, so the draws do not depend on which
        # loader worker maps the item or on what it mapped before (a resumed run redraws them).
        seed = record.get("sample_seed")
        rng = np.random.default_rng(np.random.randint(0, 2**31 - 1, size=4) if seed is None else list(seed))
        spec = self.spec_for(record["gt_format"])
        grid, class_names, free_index = spec.grid, spec.class_names, spec.free_index

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
                (width, height), self.input_size, is_train=self.is_train, resize_range=self.resize_range,
                crop_bottom_range=self.crop_bottom_range, flip_prob=self.flip_prob, rotate_range=self.rotate_range,
                rng=rng)
            matrix = params.matrix()
            images.append(warp_image(image, matrix, self.input_size))
            img_aug.append(matrix)
            intrinsics.append(matrix @ np.asarray(camera["intrinsics"], dtype=np.float64))
        img_aug, intrinsics = np.stack(img_aug), np.stack(intrinsics)

        # --- BEV augmentation ---------------------------------------------------------
        bev = sample_bev_aug(is_train=self.is_train, rotation_range=self.bda_rotation_range,
                             scale_range=self.bda_scale_range, flip_x_prob=self.bda_flip_x_prob,
                             flip_y_prob=self.bda_flip_y_prob, rng=rng)
        bda = bev.matrix()
        labels = self._augment_labels(load_record_labels(record, grid.shape, spec.num_classes), bda, grid,
                                      IGNORE_LABEL if self.bda_outside_label == "ignore" else free_index)

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
            gt_format=record["gt_format"],
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
            sample.update(self._regularizer_inputs(record, labels, bda, grid, class_names, free_index, rng))
        return sample

    @staticmethod
    def _augment_labels(labels: dict, bda: np.ndarray, grid: OccupancyGrid, outside_label: int) -> dict:
        """BEV-augment semantics (outside -> ``outside_label``), flow (outside -> 0, vectors transformed)
        and masks (outside -> False); Occ3D's missing flow becomes zeros. ``in_grid``: bool
        (X, Y, Z), the augmented voxels whose source lies inside the original grid (None
        without augmentation)."""
        flow = labels["flow"] if labels["flow"] is not None else np.zeros(labels["semantics"].shape + (2,), np.float32)
        if np.allclose(bda, np.eye(4)):
            return dict(labels, flow=flow, in_grid=None)
        source = bev_source_indices(bda, grid)
        out = dict(in_grid=source[1],
                   semantics=resample_voxel_grid(labels["semantics"], bda, grid, outside_label, source),
                   flow=transform_velocity(resample_voxel_grid(flow, bda, grid, 0.0, source), bda).astype(np.float32))
        for key in ("visible", "mask_camera", "mask_lidar"):
            out[key] = None if labels[key] is None else resample_voxel_grid(labels[key], bda, grid, False, source)
        return out

    def _lidar_depth(self, record: dict, cam2ego: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
        """(C, H, W) float32 depth of the keyframe's LiDAR points in the augmented images."""
        if not self.load_lidar_depth:
            return np.zeros((len(cam2ego), self.input_size[1], self.input_size[0]), dtype=np.float32)
        lidar = record["lidar"]
        points = load_lidar_points(lidar["path"], record["sample_token"])
        # LiDAR -> its ego pose -> the keyframe ego (the same pose for the keyframe's own LiDAR)
        lidar2keyego = np.linalg.inv(np.asarray(record["ego2global"], dtype=np.float64)) \
            @ np.asarray(lidar["ego2global"], dtype=np.float64) @ np.asarray(lidar["lidar2ego"], dtype=np.float64)
        return lidar_depth_maps(transform_points(lidar2keyego, points.astype(np.float64)), cam2ego, intrinsics,
                                self.input_size)

    def _frequency_counts(self, class_names: Sequence[str], labels: dict,
                          candidates: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """(class counts in label order, speed-bin counts) behind the sampling weights."""
        options = self.regularizer
        wanted = (options["class_frequencies"], options["speed_bin_frequencies"])
        dataset_counts = sample_counts = None
        if "dataset" in wanted:
            if self._dataset_voxel_counts is None:
                self._count_dataset_voxels_here()
            dataset_counts = self._dataset_voxel_counts
        if "sample" in wanted:
            sample_counts = count_voxels(labels["semantics"], labels["flow"], len(class_names),
                                         options["speed_bin_edges"], candidates)
        counts = []
        for position, value in enumerate(wanted):
            if value == "dataset":
                counts.append(np.asarray(dataset_counts[position], np.float64))
            elif value == "sample":
                counts.append(np.asarray(sample_counts[position], np.float64))
            elif position == 0:
                counts.append(class_counts_in_label_order(value, class_names))
            else:
                counts.append(np.asarray(value, np.float64))
        if len(counts[0]) != len(class_names):
            raise ValueError(f"TemporalDatasetMapper: {len(counts[0])} class counts for the {len(class_names)} classes "
                             f"of the label set")
        return counts[0], counts[1]

    def _count_dataset_voxels_here(self) -> None:
        """Fallback when :meth:`prepare` was not called (a mapper used on its own): count the
        registered dataset ``dataset_name`` in this process."""
        if self.dataset_name is None:
            raise ValueError("TemporalDatasetMapper: regularizer class_frequencies / speed_bin_frequencies='dataset' "
                             "needs the dataset-wide voxel counts: build the loader with build_train_loader (it calls "
                             "mapper.prepare(records) once), call mapper.prepare(records), or give dataset_name")
        from detectron2.data import DatasetCatalog, MetadataCatalog

        from .datasets import default_cache_dir

        logger.info("counting the voxels of dataset %s in this process (build_train_loader counts them once, before "
                    "its workers start)", self.dataset_name)
        cache_dir = MetadataCatalog.get(self.dataset_name).get("record_cache_dir", None) or default_cache_dir()
        self.prepare(DatasetCatalog.get(self.dataset_name), cache_dir=cache_dir)

    def _regularizer_inputs(self, record: dict, labels: dict, bda: np.ndarray, grid: OccupancyGrid,
                            class_names: Sequence[str], free_index: int,
                            rng: np.random.Generator) -> Dict[str, object]:
        options = self.regularizer
        scene_records = record.get("scene_records")
        if scene_records is None:
            raise KeyError(f"sample {record['sample_token']}: the regularizer needs the record's 'scene_records' (its "
                           "scene's records in time order); load through build_train_loader / SceneSequenceDataset")
        # ray-visible voxels (separate mask or the labels' own); Occ3D's camera mask otherwise; else every voxel
        # inside the augmented grid (the release gives voxels rotated in from outside weight 0, too)
        candidates = labels["visible"] if labels["visible"] is not None else labels.get("mask_camera")
        if candidates is None:
            self._warn_no_visibility_mask()
            candidates = labels.get("in_grid")
        class_counts, speed_bin_counts = self._frequency_counts(class_names, labels, candidates)
        # the BEV-augmented GT flow decides the speed bin, as in the release
        indices = sample_gaussian_voxels(labels["semantics"], labels["flow"], candidates, int(options["num_gaussians"]),
                                         rng, class_counts, speed_bin_counts, options["speed_bin_edges"],
                                         options["speed_bin_rule"])
        views = adjacent_render_views(record, scene_records, options["frame_offsets"], bda,
                                      float(options["render_scale"]), options["out_of_scene_views"])
        inputs = dict(
            gaussian_voxel_indices=torch.from_numpy(indices),
            render_viewmats=torch.from_numpy(views["render_viewmats"].astype(np.float32)),
            render_intrinsics=torch.from_numpy(views["render_intrinsics"].astype(np.float32)),
            render_image_size=tuple(int(s) for s in views["render_image_size"]),
            render_frame_offsets=torch.from_numpy(views["render_frame_offsets"]),
            render_time_offsets=torch.from_numpy(views["render_time_offsets"].astype(np.float32)),
        )
        if options["adjacent_gt_gaussians"] > 0:
            inputs.update(self._adjacent_gt_points(record, scene_records, views["render_frame_offsets"], bda, grid,
                                                   len(class_names), free_index, rng))
        return inputs

    def _adjacent_gt_points(self, record: dict, scene_records: Sequence[dict], frame_offsets: np.ndarray,
                            bda: np.ndarray, grid: OccupancyGrid, num_classes: int, free_index: int,
                            rng: np.random.Generator) -> Dict[str, torch.Tensor]:
        """The ``ADJACENT_GT_FIELDS``: occupied GT voxels of each adjacent keyframe the views
        show (each distinct effective offset but 0, its labels loaded once), in the current
        keyframe's augmented ego frame.

        A voxel centre ``p`` of keyframe t+o goes to ``bda @ inv(ego2global_t) @ ego2global_{t+o} @ p``;
        its flow (vx, vy) is rotated by the ego-to-ego rotation, then by ``bda[:2, :2]`` as
        :func:`transform_velocity` does for the current GT. Candidates: voxels not free, ray-visible
        when the keyframe has a mask (its dataset mask, labels' ``visible``, else Occ3D's
        ``mask_camera``), whose transformed centre lies inside the grid's x-y range (the
        prediction has no Gaussian beyond it; z is not cut so that ego height changes between
        keyframes keep the ground). Up to ``adjacent_gt_gaussians`` per keyframe are drawn
        uniformly without replacement from ``rng``.
        """
        limit = self.regularizer["adjacent_gt_gaussians"]
        frame_index = int(record["frame_index"])
        global2current = np.linalg.inv(np.asarray(record["ego2global"], dtype=np.float64))
        bda = np.asarray(bda, dtype=np.float64)
        means, classes, flows, offsets = [], [], [], []
        for offset in sorted({int(o) for o in frame_offsets} - {0}):
            adjacent = scene_records[frame_index + offset]
            labels = load_record_labels(adjacent, grid.shape, num_classes)
            candidates = labels["semantics"] != free_index
            seen = labels["visible"] if labels["visible"] is not None else labels["mask_camera"]
            if seen is not None:
                candidates &= seen
            voxels = np.argwhere(candidates)
            ego2ego = global2current @ np.asarray(adjacent["ego2global"], dtype=np.float64)
            points = transform_points(bda @ ego2ego, grid.index_to_center(voxels))
            inside = np.all((points[:, :2] >= grid.range_min[:2]) & (points[:, :2] < grid.range_max[:2]), axis=1)
            voxels, points = voxels[inside], points[inside]
            pick = np.sort(rng.choice(len(voxels), size=min(limit, len(voxels)), replace=False))
            voxels, points = voxels[pick], points[pick]
            flow = np.zeros((len(voxels), 2), np.float32) if labels["flow"] is None else \
                labels["flow"][tuple(voxels.T)]
            means.append(points.astype(np.float32))
            classes.append(labels["semantics"][tuple(voxels.T)].astype(np.int64))
            flows.append(transform_velocity(transform_velocity(flow.astype(np.float64), ego2ego), bda)
                         .astype(np.float32))
            offsets.append(np.full(len(voxels), offset, dtype=np.int64))
        return dict(
            adjacent_gt_means=torch.from_numpy(np.concatenate(means) if means else np.zeros((0, 3), np.float32)),
            adjacent_gt_classes=torch.from_numpy(np.concatenate(classes) if classes else np.zeros(0, np.int64)),
            adjacent_gt_flow=torch.from_numpy(np.concatenate(flows) if flows else np.zeros((0, 2), np.float32)),
            adjacent_gt_frame_offsets=torch.from_numpy(np.concatenate(offsets) if offsets else np.zeros(0, np.int64)),
        )
