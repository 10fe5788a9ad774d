"""Floors: predictors that need no model and no images, scored like a model.

A result on the benchmark means little without the score of predicting nothing useful.
Each floor here is a prediction ``{"occ": LongTensor[X, Y, Z], "flow": FloatTensor[X, Y, Z, 2]}``
per validation keyframe, built from the dataset's records and labels alone, and
:func:`evaluate_floors` feeds it to an :class:`~voxelsplat.evaluation.OccupancyEvaluator`
on the validation split exactly as a model's outputs are fed (same rays, origins, label
set, grid and metrics: RayIoU, RayIoU@1/2/4, per class, mAVE, mAVE_TP, OccScore, mIoU):

- ``all_free``: every voxel free, zero flow. No ray of the prediction hits anything, so
  every RayIoU is 0 and no flow class has a true positive: mAVE, mAVE_TP and OccScore are
  NaN (the metrics' definition when nothing is found), mIoU is 0.
- ``class_prior``: the image-free per-voxel class prior of the *training* labels: each
  voxel (x, y, z) gets the class it holds most often over the training keyframes (ties
  go to the lower class index; free is a class like any other), zero flow. What a model
  can score by learning the layout of the grid (ground below, the ego vehicle's
  surroundings) and nothing of the scene.
- ``previous_gt``: the ground truth of the previous keyframe of the same scene (0.5 s
  earlier in nuScenes), semantics and flow as stored, **without ego-motion
  compensation**: the previous labels sit in the previous keyframe's ego frame and are
  used in the current one as they are. The first keyframe of a scene has no previous
  one and gets the ``all_free`` prediction. The score of repeating the last labelled
  frame: what a temporal model must beat to show it predicts the present.

- ``gt_occupancy_zero_flow``: the keyframe's own ground-truth occupancy with zero flow. Its
  RayIoU is 100 by construction; its mAVE is the flow floor on GT occupancy, the reference
  for a model's ``mAVE_gt_occupancy`` (the benchmark gate asks for less than 0.7 x this).

Floor predictions carry flow (zero, or the previous keyframe's), so the evaluator's flow
metrics apply to them unchanged. The flow floors of a model's own predictions
(``mAVE_zero_flow``, ``mAVE_gt_occupancy``) are computed by the evaluator itself
(``compute_flow_floors``); the floors here are evaluated without them.

Only the registered datasets' records (``DatasetCatalog.get(name)``: ``sample_token``,
``scene_token``, ``frame_index``, ``gt_path``, ``gt_format``, ``lidar_origins`` and the
optional ``visible_mask_path``) and their ``labels.npz`` files are read; no images.
"""
from __future__ import annotations

import copy
import logging
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data.loading import load_record_labels
from ..structures import grid_from_metadata

from ..evaluation.evaluator import OccupancyEvaluator

logger = logging.getLogger(__name__)

__all__ = [
    "FLOOR_NAMES",
    "per_voxel_class_mode",
    "training_class_prior",
    "previous_keyframes",
    "load_record_labels",
    "evaluation_sample",
    "all_free_prediction",
    "class_prior_prediction",
    "previous_gt_prediction",
    "evaluate_floors",
    "motion_statistics",
]

FLOOR_NAMES: Tuple[str, ...] = ("all_free", "class_prior", "previous_gt", "gt_occupancy_zero_flow")

ArrayLike = Union[np.ndarray, torch.Tensor]
# label field -> mapped sample field (as TemporalDatasetMapper names them)
_MASK_FIELDS = (("mask_camera", "occ_mask_camera"), ("mask_lidar", "occ_mask_lidar"), ("visible", "occ_visible"))


def per_voxel_class_mode(semantics: Iterable[ArrayLike], num_classes: int) -> np.ndarray:
    """The most frequent class of each voxel over a set of label volumes.

    Args:
        semantics: label volumes, each (X, Y, Z) integer classes in [0, num_classes), all of
            one shape.
        num_classes: the size of the label set (free included).
    Returns:
        (X, Y, Z) int64: per voxel the class with the highest count; ties go to the lower
        class index.
    Raises:
        ValueError: no volumes, volumes of different shapes or classes out of range.
    """
    counts: Optional[np.ndarray] = None
    shape = None
    for i, volume in enumerate(semantics):
        volume = volume.cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
        if shape is None:
            shape = volume.shape
            counts = np.zeros((volume.size, num_classes), np.int32)
            voxels = np.arange(volume.size)
        elif volume.shape != shape:
            raise ValueError(f"per_voxel_class_mode: volume #{i} has shape {volume.shape}, expected {shape}")
        flat = volume.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= num_classes):
            raise ValueError(f"per_voxel_class_mode: volume #{i} holds classes in [{flat.min()}, {flat.max()}], "
                             f"expected [0, {num_classes - 1}]")
        counts[voxels, flat] += 1  # one (voxel, class) pair per voxel: no repeated index in one update
    if counts is None:
        raise ValueError("per_voxel_class_mode: no label volumes")
    return counts.argmax(axis=1).reshape(shape).astype(np.int64)  # argmax: the first (lowest) of equal counts


def training_class_prior(dataset_name: str) -> np.ndarray:
    """The ``class_prior`` floor's volume: :func:`per_voxel_class_mode` over the labels of every
    keyframe of the registered dataset ``dataset_name`` (the training split).

    Returns:
        (X, Y, Z) int64 classes of the dataset's label set, on its grid.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    records = DatasetCatalog.get(dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    grid_shape, num_classes = grid_from_metadata(meta).shape, len(meta.thing_classes)
    if not records:
        raise ValueError(f"training_class_prior: dataset {dataset_name!r} has no records")
    return per_voxel_class_mode(
        (load_record_labels(record, grid_shape, num_classes)["semantics"] for record in records), num_classes)


def previous_keyframes(records: Sequence[dict]) -> List[Optional[dict]]:
    """For each record, the record of the previous keyframe of its scene (same
    ``scene_token``, ``frame_index`` one less) among ``records``, or None when there is none
    (the first keyframe of a scene, or a previous keyframe outside these records)."""
    by_frame = {(record["scene_token"], int(record["frame_index"])): record for record in records}
    return [by_frame.get((record["scene_token"], int(record["frame_index"]) - 1)) for record in records]


def evaluation_sample(record: dict, labels: dict) -> dict:
    """The fields of a mapped test sample that :meth:`OccupancyEvaluator.process` reads, built
    from a record and its labels without images: ``sample_token``, ``lidar_origins`` (K, 3)
    float32 (as the mapper gives them), ``occ_semantics`` (X, Y, Z) int64, ``occ_flow``
    (X, Y, Z, 2) float32 (zeros for labels without flow) and the masks the labels have
    (``occ_mask_camera``, ``occ_mask_lidar``, ``occ_visible``). No BEV augmentation."""
    semantics = np.asarray(labels["semantics"], dtype=np.int64)
    flow = labels.get("flow")
    flow = np.zeros(semantics.shape + (2,), np.float32) if flow is None else np.asarray(flow, dtype=np.float32)
    sample = dict(
        sample_token=record["sample_token"],
        lidar_origins=torch.from_numpy(np.asarray(record["lidar_origins"], dtype=np.float32).reshape(-1, 3)),
        occ_semantics=torch.from_numpy(semantics),
        occ_flow=torch.from_numpy(flow),
    )
    for source_key, field in _MASK_FIELDS:
        if labels.get(source_key) is not None:
            sample[field] = torch.from_numpy(np.asarray(labels[source_key], dtype=bool))
    return sample


def all_free_prediction(grid_shape: Sequence[int], free_index: int) -> Dict[str, torch.Tensor]:
    """The ``all_free`` floor: every voxel ``free_index``, zero flow."""
    grid_shape = tuple(int(s) for s in grid_shape)
    return {"occ": torch.full(grid_shape, int(free_index), dtype=torch.long),
            "flow": torch.zeros(grid_shape + (2,), dtype=torch.float32)}


def class_prior_prediction(prior: ArrayLike) -> Dict[str, torch.Tensor]:
    """The ``class_prior`` floor: the prior volume (X, Y, Z) (see :func:`training_class_prior`),
    zero flow."""
    occ = torch.as_tensor(np.asarray(prior) if not isinstance(prior, torch.Tensor) else prior).long()
    return {"occ": occ, "flow": torch.zeros(tuple(occ.shape) + (2,), dtype=torch.float32)}


def previous_gt_prediction(previous_labels: Optional[dict], grid_shape: Sequence[int],
                           free_index: int) -> Dict[str, torch.Tensor]:
    """The ``previous_gt`` floor: the previous keyframe's labels (semantics and flow as stored,
    in the *previous* ego frame - no ego-motion compensation; labels without flow give zero
    flow), or :func:`all_free_prediction` when there is no previous keyframe (None)."""
    if previous_labels is None:
        return all_free_prediction(grid_shape, free_index)
    semantics = np.asarray(previous_labels["semantics"], dtype=np.int64)
    flow = previous_labels.get("flow")
    flow = np.zeros(semantics.shape + (2,), np.float32) if flow is None else np.asarray(flow, dtype=np.float32)
    return {"occ": torch.from_numpy(semantics), "flow": torch.from_numpy(flow)}


def evaluate_floors(
    train_dataset_name: str,
    val_dataset_name: str,
    floors: Sequence[str] = FLOOR_NAMES,
    *,
    evaluator: Optional[OccupancyEvaluator] = None,
) -> Dict[str, Dict[str, float]]:
    """Score the floors on the validation split with the project's evaluator.

    Args:
        train_dataset_name: registered training dataset (``class_prior`` is its labels' per-voxel
            mode; unused by the other floors).
        val_dataset_name: registered validation dataset: the floors predict each of its
            keyframes, in record order, and are scored against its labels.
        floors: which of :data:`FLOOR_NAMES` to evaluate, in this order.
        evaluator: the evaluator to score them with, as a model's predictions are scored (e.g.
            built from a config's ``dataloader.evaluator``); each floor gets a fresh copy. It
            must write nothing (``output_dir=None``, no submission). Default:
            ``OccupancyEvaluator(val_dataset_name, distributed=False, compute_flow_floors=False)``.
    Returns:
        ``{floor name: results}``, each results dict as ``OccupancyEvaluator.evaluate()["occupancy"]``
        gives it (``RayIoU``, ``RayIoU@1``, ..., ``RayIoU/<class>``, ``mAVE``, ``mAVE_TP``,
        ``OccScore``, ``mIoU`` as the evaluator is set up), in the order of ``floors``.
    Raises:
        KeyError: an unknown floor name, or a dataset that is not registered.
        ValueError: an evaluator that writes files, or a training grid unlike the validation one.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    unknown = [name for name in floors if name not in FLOOR_NAMES]
    if unknown:
        raise KeyError(f"evaluate_floors: unknown floors {unknown}; expected some of {list(FLOOR_NAMES)}")
    if evaluator is None:
        evaluator = OccupancyEvaluator(val_dataset_name, distributed=False, compute_flow_floors=False)
    if evaluator.output_dir or evaluator.export_submission:
        raise ValueError("evaluate_floors: the evaluator must write nothing (output_dir=None, "
                         "export_submission=False); it is run once per floor")
    records = DatasetCatalog.get(val_dataset_name)
    grid_shape, free_index, num_classes = evaluator.grid.shape, evaluator.free_index, len(evaluator.class_names)
    prior = None
    if "class_prior" in floors:
        train_grid = grid_from_metadata(MetadataCatalog.get(train_dataset_name))
        if train_grid != evaluator.grid:
            raise ValueError(f"evaluate_floors: training dataset {train_dataset_name!r} is on grid {train_grid}, "
                             f"the evaluation on {evaluator.grid}")
        prior = class_prior_prediction(training_class_prior(train_dataset_name))
    all_free = all_free_prediction(grid_shape, free_index)
    evaluators = {name: copy.deepcopy(evaluator) for name in floors}
    for floor_evaluator in evaluators.values():
        floor_evaluator.reset()
    previous = previous_keyframes(records)
    last: Tuple[Optional[str], Optional[dict]] = (None, None)  # the labels loaded last: the previous keyframe's
    for record, previous_record in zip(records, previous):
        labels = load_record_labels(record, grid_shape, num_classes)
        sample = evaluation_sample(record, labels)
        for name, floor_evaluator in evaluators.items():
            if name == "all_free":
                output = all_free
            elif name == "gt_occupancy_zero_flow":
                output = {"occ": sample["occ_semantics"].long(), "flow": torch.zeros(tuple(grid_shape) + (2,))}
            elif name == "class_prior":
                output = prior
            else:
                previous_labels = None
                if previous_record is not None:
                    previous_token = previous_record["sample_token"]
                    previous_labels = last[1] if last[0] == previous_token else \
                        load_record_labels(previous_record, grid_shape, num_classes)
                output = previous_gt_prediction(previous_labels, grid_shape, free_index)
            floor_evaluator.process([sample], [output])
        last = (record["sample_token"], labels)
    results = {}
    for name, floor_evaluator in evaluators.items():
        results[name] = floor_evaluator.evaluate().get("occupancy", {})
        logger.info("floor %s on %s: RayIoU %.2f", name, val_dataset_name, results[name].get("RayIoU", float("nan")))
    return results


def motion_statistics(dataset_name: str, moving_speed: float = 0.5) -> Dict[str, float]:
    """How much of a registered split moves: over every keyframe's labels, the voxels of the
    flow classes (the dataset metadata's ``flow_classes``: vehicles, cyclists, pedestrians)
    and the share of them whose ground-truth speed exceeds ``moving_speed`` (m/s).

    A benchmark whose validation split moves much less than its training split rewards
    predicting no motion; compare ``moving_share`` of the two splits before comparing flow.

    Returns:
        ``{"keyframes", "flow_class_voxels", "moving_voxels", "moving_share", "mean_moving_speed"}``
        (share in [0, 1]; NaN where no flow-class voxel exists).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if moving_speed < 0:
        raise ValueError(f"motion_statistics: moving_speed must be >= 0, got {moving_speed}")
    records = DatasetCatalog.get(dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    grid_shape, num_classes = grid_from_metadata(meta).shape, len(meta.thing_classes)
    flow_classes = np.asarray(list(meta.flow_classes), np.int64)
    total = moving = 0
    speed_sum = 0.0
    for record in records:
        labels = load_record_labels(record, grid_shape, num_classes)
        in_flow_class = np.isin(labels["semantics"], flow_classes)
        speed = np.linalg.norm(np.asarray(labels["flow"], np.float64)[in_flow_class], axis=-1)
        total += int(in_flow_class.sum())
        is_moving = speed > moving_speed
        moving += int(is_moving.sum())
        speed_sum += float(speed[is_moving].sum())
    return {"keyframes": len(records), "flow_class_voxels": total, "moving_voxels": moving,
            "moving_share": moving / total if total else float("nan"),
            "mean_moving_speed": speed_sum / moving if moving else float("nan")}
