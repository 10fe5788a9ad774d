"""``OccupancyEvaluator``: RayIoU / mAVE / OccScore (and Occ3D mIoU) as a detectron2
``DatasetEvaluator``; it also exports the OpenOcc challenge submission
(:mod:`voxelsplat.evaluation.submission`).

Per sample only small count arrays are kept (:class:`~voxelsplat.evaluation.ray_metrics.SampleStats`,
about 1 KB), so memory stays flat over the 6019 validation samples; ``evaluate()`` gathers
them from every process, adds them up (in sample-token order, so the sums do not depend on
how the samples were spread over processes) and prints a per-class table. Results are
returned as ``{"occupancy": {"RayIoU": ..., "RayIoU@1": ..., "mAVE": ..., "mAVE_TP": ...,
"OccScore": ..., ...}}`` and written to ``<output_dir>/inference/occupancy_results.json``;
``mAVE`` is the challenge's definition, ``mAVE_TP`` this library's true-positive variant
(see :mod:`voxelsplat.evaluation.ray_metrics`).

Flow floors (``compute_flow_floors=True``, the default, whenever flow is evaluated): two
more flow errors of the same predictions, summed over samples and processes like the
others, which tell what the predicted flow adds:

- ``mAVE_zero_flow`` / ``mAVE_TP_zero_flow``: the predicted occupancy with zero flow
  everywhere - the same rays and true positives, only the flow differs. A model whose
  ``mAVE`` is not below its ``mAVE_zero_flow`` has learnt no useful flow.
- ``mAVE_gt_occupancy`` / ``mAVE_TP_gt_occupancy``: the predicted flow read on the ground
  truth's occupancy (prediction semantics := GT semantics, so every counted ray is a true
  positive at its GT hit, and the ray's flow is the predicted flow at that voxel where the GT
  holds a flow class, zero elsewhere, as a model's own output shows flow only on the voxels
  it classifies as a flow class): flow quality independent of the occupancy. The flow read
  there is the output's
  ``flow_unmasked`` when it has one (the model's flow before it zeroes the voxels it does not
  classify as a flow class), else its ``flow``: otherwise a model that misses a car would
  score zero flow on it, whatever its flow head predicts.

Floors that need no model at all (all free, the training class prior, the previous
keyframe's ground truth) are in :mod:`voxelsplat.engine.floors`.

Submission export (``export_submission=True``): the rays cast for the metrics are spooled per
sample and written to ``<output_dir>/inference/submission.gz`` at the end, in the challenge's
format (see :mod:`voxelsplat.evaluation.submission`).
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from voxelsplat.structures import OccupancyGrid, OccupancySpec
from voxelsplat.utils.io import atomic_write

from .submission import SubmissionSpool, write_submission
from .submission import submission_info as make_submission_info
from .ray_casting import RAY_PRECISIONS
from .statistics import SAMPLE_STATS_FILE, sample_stats_to_arrays
from .ray_metrics import (
    RAY_IOU_THRESHOLDS,
    SampleStats,
    average_velocity_errors,
    cast_sample_rays,
    flow_at_voxels,
    occ3d_confusion,
    ray_iou_table,
    sample_stats,
    summarize,
)

logger = logging.getLogger(__name__)

__all__ = ["OccupancyEvaluator"]

RESULTS_FILE = "occupancy_results.json"
# SAMPLE_STATS_FILE (per-frame ray counts) is written beside it, see statistics.py
# Flow floors of a model's own predictions (see the module docstring), as named in the result keys.
FLOW_FLOORS = ("zero_flow", "gt_occupancy")


class OccupancyEvaluator(DatasetEvaluator):
    """Evaluate occupancy (+ flow) predictions with the ray-based benchmark metrics.

    Inputs of :meth:`process` are mapped samples (see ``voxelsplat.structures.sample_fields``):
    ``sample_token``, ``occ_semantics`` (X, Y, Z), ``lidar_origins`` (K, 3), for flow
    metrics ``occ_flow`` (X, Y, Z, 2), for mIoU ``occ_mask_camera`` (X, Y, Z), and
    optionally ``bda`` (4, 4) (origins are moved into the augmented frame). Outputs are the
    model's per-sample dicts ``{"occ": LongTensor[X, Y, Z], "flow": FloatTensor[X, Y, Z, 2]}``.
    """

    def __init__(
        self,
        dataset_name: Optional[str] = None,
        *,
        spec: Optional[OccupancySpec] = None,
        class_names: Optional[Sequence[str]] = None,
        free_index: Optional[int] = None,
        flow_classes: Optional[Sequence[int]] = None,
        grid: Optional[OccupancyGrid] = None,
        output_dir: Optional[str] = None,
        distributed: bool = True,
        compute_flow: Optional[bool] = None,
        compute_miou: Optional[bool] = None,
        miou_mask: Optional[str] = None,
        export_submission: bool = False,
        submission_info: Optional[Dict[str, object]] = None,
        ray_directions: Optional[torch.Tensor] = None,
        ray_precision: str = "official",
        compute_flow_floors: bool = True,
    ):
        """
        Args:
            dataset_name: a dataset registered in ``MetadataCatalog``; its ``thing_classes``,
                ``free_index``, ``flow_classes``, grid (``point_cloud_range``, ``voxel_size``)
                and ``gt_format`` are the defaults of the arguments below (read when the
                evaluator is first used if the dataset is not registered yet, e.g. before
                the test loader is built). Without it, the OpenOcc v2 label set and the
                default grid are the defaults.
            spec: the label set and grid without a dataset (default: OpenOcc v2 on the default
                grid); the dataset's metadata wins when ``dataset_name`` is given.
            class_names, free_index, flow_classes, grid: override parts of the spec.
            output_dir: where ``inference/occupancy_results.json`` (and the submission) go;
                None writes nothing (``voxelsplat.engine.do_test`` sets it to
                ``train.output_dir`` when the config leaves it None).
            distributed: gather the statistics of every process in :meth:`evaluate`.
            compute_flow: report mAVE and OccScore (default: the ground truth has flow,
                i.e. ``gt_format == "openocc_v2"``).
            compute_miou: also report the voxel mIoU (Occ3D's metric: confusion over the voxels
                of ``miou_mask``, free excluded). Default: for label sets without flow (Occ3D).
            miou_mask: the sample field that selects the voxels of the mIoU:
                ``occ_mask_camera`` (Occ3D), ``occ_mask_lidar`` or ``occ_visible`` (ray-visible
                voxels of OpenOcc v2 labels that carry a ``visible`` mask, e.g. the synthetic
                dataset). None: each sample's ``occ_mask_camera``, else its ``occ_visible``.
            export_submission: write the challenge submission (needs ``output_dir``).
            submission_info: the submission's method/team/authors/... fields.
            ray_directions: (R, 3) override of the LiDAR ray pattern (tests, ablations).
            ray_precision: ``"official"`` (the benchmark's float32 rays, depths and depth
                comparison) or ``"float64"`` (exact geometry); see
                :func:`~voxelsplat.evaluation.cast_rays`.
            compute_flow_floors: when flow is evaluated, also report ``mAVE_zero_flow``,
                ``mAVE_TP_zero_flow`` (the predicted occupancy with zero flow) and
                ``mAVE_gt_occupancy``, ``mAVE_TP_gt_occupancy`` (the predicted flow on the GT
                occupancy); see the module docstring.
        """
        self.dataset_name = dataset_name
        self._overrides = dict(spec=spec, class_names=class_names, free_index=free_index, flow_classes=flow_classes,
                               grid=grid, compute_flow=compute_flow)
        self._resolved = False
        if dataset_name is None or _registered_spec(dataset_name) is not None:
            self._resolve_label_set()
        # else: the dataset is registered later (e.g. when the test loader is built) and the
        # label set is read from its metadata on first use
        self._compute_miou = compute_miou
        if miou_mask not in (None, "occ_mask_camera", "occ_mask_lidar", "occ_visible"):
            raise KeyError(f"OccupancyEvaluator: unknown miou_mask {miou_mask!r}; expected 'occ_mask_camera', "
                           "'occ_mask_lidar' or 'occ_visible'")
        self.miou_mask = miou_mask
        self.output_dir = output_dir
        self.distributed = distributed
        self.export_submission = bool(export_submission)
        try:
            self.submission_info = make_submission_info(submission_info)
        except KeyError as error:
            raise KeyError(f"OccupancyEvaluator: {error.args[0]}") from None
        self.ray_directions = ray_directions
        if ray_precision not in RAY_PRECISIONS:
            raise ValueError(f"OccupancyEvaluator: unknown ray_precision {ray_precision!r}, expected one of "
                             f"{RAY_PRECISIONS}")
        self.ray_precision = ray_precision
        self.compute_flow_floors = bool(compute_flow_floors)
        self._warned_bda = False
        self.reset()

    def _resolve_label_set(self) -> None:
        """The occupancy spec: the dataset's ``MetadataCatalog`` entry (or ``spec``, or OpenOcc v2
        on the default grid), with the constructor's class names / free index / flow classes /
        grid in place of its own where given."""
        if self._resolved:
            return
        given = self._overrides
        if self.dataset_name is not None:
            from detectron2.data import MetadataCatalog

            try:
                spec = OccupancySpec.from_metadata(MetadataCatalog.get(self.dataset_name))
            except KeyError as error:
                raise KeyError(f"OccupancyEvaluator: {error.args[0]}") from None
        else:
            spec = given["spec"] if given["spec"] is not None else OccupancySpec.for_label_set("openocc_v2")
        changes = {key: given[key] for key in ("class_names", "free_index", "flow_classes", "grid")
                   if given[key] is not None}
        try:
            self.spec = replace(spec, **changes)
        except (TypeError, ValueError) as error:
            raise ValueError(f"OccupancyEvaluator: {error}") from error
        compute_flow = given["compute_flow"]
        self._compute_flow = (self.spec.has_flow and bool(self.spec.flow_classes)) if compute_flow is None \
            else bool(compute_flow)
        self._resolved = True

    @property
    def class_names(self) -> List[str]:
        self._resolve_label_set()
        return list(self.spec.class_names)

    @property
    def free_index(self) -> int:
        self._resolve_label_set()
        return self.spec.free_index

    @property
    def flow_classes(self) -> List[int]:
        self._resolve_label_set()
        return list(self.spec.flow_classes)

    @property
    def grid(self) -> OccupancyGrid:
        self._resolve_label_set()
        return self.spec.grid

    @property
    def compute_miou(self) -> bool:
        if self._compute_miou is None:
            self._resolve_label_set()
            return not self.spec.has_flow
        return bool(self._compute_miou)

    @compute_miou.setter
    def compute_miou(self, value: Optional[bool]) -> None:
        self._compute_miou = value

    @property
    def compute_flow(self) -> bool:
        self._resolve_label_set()
        return self._compute_flow

    # ------------------------------------------------------------------ detectron2 API

    def reset(self) -> None:
        self._stats: Dict[str, SampleStats] = {}
        # flow floor name -> sample token -> the sample's counts with that floor's flow
        self._flow_floor_stats: Dict[str, Dict[str, SampleStats]] = {name: {} for name in FLOW_FLOORS}
        self._spool: Optional[SubmissionSpool] = None  # this process's submission parts, from the first sample
        self._spooled: List[Tuple[str, str]] = []  # its (token, file) list

    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        for sample, output in zip(inputs, outputs):
            token = str(sample.get("sample_token", "<no sample_token>"))
            if "occ" not in output:
                raise KeyError(f"OccupancyEvaluator: model output for sample {token} has no 'occ' "
                               f"(keys: {sorted(output)})")
            if "lidar_origins" not in sample:
                raise KeyError(f"OccupancyEvaluator: sample {token} has no 'lidar_origins' (the RayIoU ray origins, "
                               "see voxelsplat.structures.sample_fields)")
            has_gt = "occ_semantics" in sample
            if not has_gt and not self.export_submission:
                raise KeyError(f"OccupancyEvaluator: sample {token} has no 'occ_semantics' ground truth")
            pred_flow = output.get("flow") if (self.compute_flow or self.export_submission) else None
            gt_flow = None
            if self.compute_flow and pred_flow is None:
                raise KeyError(f"OccupancyEvaluator: model output for sample {token} has no 'flow' (set "
                               "compute_flow=False to evaluate occupancy only)")
            if self.compute_flow and has_gt:
                if "occ_flow" not in sample:
                    raise KeyError(f"OccupancyEvaluator: sample {token} has no 'occ_flow' ground truth (set "
                                   "compute_flow=False to evaluate occupancy only)")
                gt_flow = sample["occ_flow"]
            origins = self._origins_in_grid_frame(sample, token)
            with torch.no_grad():
                rays = cast_sample_rays(
                    output["occ"], origins, sample["occ_semantics"] if has_gt else None,
                    pred_flow, gt_flow, num_classes=len(self.class_names), free_index=self.free_index,
                    grid=self.grid, ray_directions=self.ray_directions, token=token,
                    ray_precision=self.ray_precision)
                if has_gt:
                    stats = sample_stats(rays, num_classes=len(self.class_names), voxel_size=self.grid.voxel_size)
                    if self.compute_miou:
                        mask_field = self.miou_mask or next(
                            (f for f in ("occ_mask_camera", "occ_visible") if f in sample), "occ_mask_camera")
                        if mask_field not in sample:
                            raise KeyError(f"OccupancyEvaluator: sample {token} has no {mask_field!r} (needed "
                                           "for the voxel mIoU; set compute_miou=False or another miou_mask)")
                        stats.confusion = occ3d_confusion(output["occ"], sample["occ_semantics"],
                                                          sample[mask_field],
                                                          num_classes=len(self.class_names), token=token,
                                                          grid=self.grid)
                    if token in self._stats:
                        logger.warning("OccupancyEvaluator: sample %s seen twice; counting it once", token)
                    self._stats[token] = stats
                    if self.compute_flow and self.compute_flow_floors:
                        flow_everywhere = output.get("flow_unmasked", pred_flow)
                        for name, floor_stats in self._flow_floor_sample_stats(rays, flow_everywhere,
                                                                               token).items():
                            self._flow_floor_stats[name][token] = floor_stats
            if self.export_submission:
                if self._spool is None:
                    if not self.output_dir:
                        raise ValueError("OccupancyEvaluator: export_submission=True needs an output_dir")
                    self._spool = SubmissionSpool(os.path.join(self.output_dir, "inference"), comm.get_rank())
                    self._spooled = self._spool.parts
                self._spool.add(token, rays.pred_class, rays.pred_depth, rays.pred_flow)

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        stats, spooled, floor_stats = self._stats, self._spooled, self._flow_floor_stats
        if self.distributed and comm.get_world_size() > 1:
            comm.synchronize()
            gathered = comm.gather((stats, spooled, floor_stats), dst=0)
            if not comm.is_main_process():
                return {}
            stats, spooled, floor_stats = {}, [], {name: {} for name in FLOW_FLOORS}
            for part_stats, part_spooled, part_floor_stats in gathered:
                for token, value in part_stats.items():
                    stats.setdefault(token, value)
                for name, part in part_floor_stats.items():
                    for token, value in part.items():
                        floor_stats[name].setdefault(token, value)
                spooled.extend(part_spooled)
        results: Dict[str, float] = {}
        if stats:
            # token order: the float sums are the same however the samples were spread over processes
            total = SampleStats.total(stats[token] for token in sorted(stats))
            results = summarize(total, self.class_names, self.free_index,
                                self.flow_classes if self.compute_flow else None)
            if self.compute_flow:
                for name in FLOW_FLOORS:
                    if floor_stats[name]:
                        floor_total = SampleStats.total(floor_stats[name][t] for t in sorted(floor_stats[name]))
                        floor_results = summarize(floor_total, self.class_names, self.free_index, self.flow_classes)
                        results[f"mAVE_{name}"] = floor_results["mAVE"]
                        results[f"mAVE_TP_{name}"] = floor_results["mAVE_TP"]
            logger.info("Occupancy evaluation on %d samples%s:\n%s", len(stats),
                        f" of {self.dataset_name}" if self.dataset_name else "", self.format_table(total, results))
        elif not spooled:
            logger.warning("OccupancyEvaluator: no samples were processed")
            return {}
        if self.output_dir:
            folder = os.path.join(self.output_dir, "inference")
            os.makedirs(folder, exist_ok=True)
            if results:
                payload = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in results.items()}
                _atomic_write(os.path.join(folder, RESULTS_FILE),
                              lambda f: f.write(json.dumps(dict(payload, num_samples=len(stats)), indent=2).encode()))
                # per-frame counts, for paired statistics across runs (voxelsplat.evaluation.statistics)
                ordered = {token: stats[token] for token in sorted(stats)}
                _atomic_write(os.path.join(folder, SAMPLE_STATS_FILE),
                              lambda f: np.savez(f, **sample_stats_to_arrays(ordered)))
            if self.export_submission:
                path = write_submission(folder, spooled, self.submission_info)
                logger.info("OccupancyEvaluator: challenge submission with %d samples written to %s",
                            len(spooled), path)
        return {"occupancy": results} if results else {}

    # ------------------------------------------------------------------ helpers

    def format_table(self, total: SampleStats, results: Optional[Dict[str, float]] = None) -> str:
        """Per-class table: RayIoU at each threshold, AVE and AVE_TP (flow classes) and Occ3D IoU."""
        from tabulate import tabulate

        results = results if results is not None else summarize(
            total, self.class_names, self.free_index, self.flow_classes if self.compute_flow else None)
        iou = 100 * ray_iou_table(total)
        ave = average_velocity_errors(total)
        ave_tp = average_velocity_errors(total, true_positives_only=True)
        headers = ["class"] + [f"RayIoU@{t:g}" for t in RAY_IOU_THRESHOLDS] + ["RayIoU"]
        if self.compute_flow:
            headers += ["AVE", "AVE_TP"]
        if total.confusion is not None:
            headers.append("IoU")
        rows = []
        for c, name in enumerate(self.class_names):
            if c == self.free_index:
                continue
            row = [name] + [iou[j, c] for j in range(len(RAY_IOU_THRESHOLDS))] + [results[f"RayIoU/{name}"]]
            if self.compute_flow:
                row += [ave[c], ave_tp[c]] if c in self.flow_classes else ["", ""]
            if total.confusion is not None:
                row.append(results[f"IoU/{name}"])
            rows.append(row)
        mean = ["MEAN"] + [results[f"RayIoU@{t:g}"] for t in RAY_IOU_THRESHOLDS] + [results["RayIoU"]]
        if self.compute_flow:
            mean += [results["mAVE"], results["mAVE_TP"]]
        if total.confusion is not None:
            mean.append(results["mIoU"])
        rows.append(mean)
        table = tabulate(rows, headers=headers, floatfmt=".2f", missingval="nan")
        if self.compute_flow:
            table += f"\nOccScore: {results['OccScore']:.2f}"
            for name, meaning in (("zero_flow", "the predicted occupancy with zero flow"),
                                  ("gt_occupancy", "the predicted flow on the GT occupancy")):
                if f"mAVE_{name}" in results:
                    table += (f"\nmAVE of {meaning}: {results[f'mAVE_{name}']:.4f} "
                              f"(mAVE_TP {results[f'mAVE_TP_{name}']:.4f})")
        return table

    def _flow_floor_sample_stats(self, rays, pred_flow, token: str) -> Dict[str, SampleStats]:
        """One sample's counts for each flow floor (see the module docstring); ``rays`` are the
        sample's rays cast through its GT and the model's prediction, ``pred_flow`` the predicted
        flow volume read on the GT occupancy (the unmasked one when the model gives it)."""
        num_classes, voxel_size = len(self.class_names), self.grid.voxel_size
        # the model's rays and true positives, zero flow at every predicted hit
        zero_flow = replace(rays, pred_flow=torch.zeros_like(rays.pred_flow))
        # the GT's own rays as the prediction (every counted ray a true positive), with the
        # predicted flow read at the GT's stop voxel (the cast already walked the GT) where the GT
        # holds a flow class, zero elsewhere: with the GT's occupancy, flow shows only on the GT's
        # flow-class voxels, as a model's output shows it only on its own (the released test code
        # keeps the flow of the voxels it classifies as classes 0-7)
        at_gt_hits = flow_at_voxels(pred_flow, rays.gt_voxel_index, self.grid, token, "predicted flow")
        gt_class = rays.gt_class.to(at_gt_hits.device)
        at_gt_hits = at_gt_hits * torch.isin(gt_class, gt_class.new_tensor(self.flow_classes))[:, None]
        gt_occupancy = replace(rays, pred_class=rays.gt_class, pred_depth=rays.gt_depth,
                               pred_depth_voxels=rays.gt_depth_voxels, pred_flow=at_gt_hits)
        return {name: sample_stats(floor_rays, num_classes=num_classes, voxel_size=voxel_size)
                for name, floor_rays in (("zero_flow", zero_flow), ("gt_occupancy", gt_occupancy))}

    def _origins_in_grid_frame(self, sample: dict, token: str) -> torch.Tensor:
        """The sample's ray origins in the frame of its (possibly BEV-augmented) grid."""
        origins = torch.as_tensor(sample["lidar_origins"], dtype=torch.float64).reshape(-1, 3)
        bda = sample.get("bda")
        if bda is None:
            return origins
        bda = torch.as_tensor(bda, dtype=torch.float64).cpu()
        if tuple(bda.shape) != (4, 4):
            raise ValueError(f"OccupancyEvaluator: sample {token} has 'bda' of shape {tuple(bda.shape)}, "
                             "expected (4, 4)")
        if torch.allclose(bda, torch.eye(4, dtype=torch.float64)):
            return origins
        linear = bda[:3, :3]
        if not self._warned_bda and not torch.allclose(linear.abs(), torch.eye(3, dtype=torch.float64)):
            logger.warning("OccupancyEvaluator: sample %s is BEV-augmented with a rotation or scale; the ray "
                           "pattern then differs from the benchmark's (evaluate without BEV augmentation)", token)
            self._warned_bda = True
        return origins.to(bda.device) @ linear.T + bda[:3, 3]


def _registered_spec(dataset_name: str) -> Optional[OccupancySpec]:
    """The spec in ``dataset_name``'s ``MetadataCatalog`` entry, None while it has none (the
    dataset is registered when its loader is built)."""
    from detectron2.data import MetadataCatalog

    try:
        return OccupancySpec.from_metadata(MetadataCatalog.get(dataset_name))
    except KeyError:
        return None


def _atomic_write(path: str, write) -> None:
    """Write a file through ``write(fileobj)`` to a temporary name, then rename it into place."""
    with atomic_write(path, "wb") as f:
        write(f)
