"""Occupancy and flow losses (FB-Occ's set plus the flow term).

- sigmoid focal loss with per-class weights ``1 / log(voxel_count + 1e-3)`` and a
  distance weight ``1 + r / r_max`` (r: horizontal distance of the voxel centre from
  the ego origin) -- far voxels are rarer and count more;
- Lovasz-softmax (Berman et al., CVPR 2018) over the classes present;
- semantic and geometric scene-class affinity losses (MonoScene, CVPR 2022);
- flow L1 weighted by (|gt| + 0.1) on voxels of the flow classes.

The functions take flattened voxels (V, K) so they are easy to test against
direct formulas; :class:`OccupancyFlowLoss` applies them to the head's outputs.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data.occupancy_meta import OccupancyGrid
from ..registry import HEAD_REGISTRY

__all__ = [
    "class_weights_from_frequencies", "distance_weights", "sigmoid_focal_loss", "lovasz_softmax", "sem_scal_loss",
    "geo_scal_loss", "flow_l1_loss", "OccupancyFlowLoss",
]

_SCAL_EPS = 1e-5


def class_weights_from_frequencies(frequencies: Sequence[float]) -> torch.Tensor:
    """(K,) weights ``1 / log(count + 1e-3)`` from per-class voxel counts (each > 1)."""
    counts = np.asarray(frequencies, dtype=np.float64)
    if counts.ndim != 1 or not np.all(counts > 1):
        raise ValueError(f"class_frequencies must be per-class voxel counts > 1, got {frequencies}")
    return torch.as_tensor(1.0 / np.log(counts + 1e-3), dtype=torch.float32)


def distance_weights(grid: OccupancyGrid) -> torch.Tensor:
    """(X, Y) weights ``1 + r / r_max``, r = distance of each BEV cell centre from the ego
    origin (metres, horizontal)."""
    centers = grid.voxel_centers()[:, :, 0, :2]
    radius = np.linalg.norm(centers, axis=-1)
    return torch.as_tensor(1.0 + radius / radius.max(), dtype=torch.float32)


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: Optional[torch.Tensor] = None,
                       voxel_weights: Optional[torch.Tensor] = None, gamma: float = 2.0,
                       alpha: float = 0.25) -> torch.Tensor:
    """Per-class sigmoid focal loss, summed over classes and averaged over voxels.

        loss = mean_v sum_k w_v c_k a_vk (1 - p_t)^gamma BCE(x_vk, t_vk)
    with t one-hot, p_t the probability of the true binary outcome, a = alpha for
    positives and 1 - alpha for negatives.

    Args:
        logits: (V, K); target: (V,) int64 in [0, K).
        class_weights: (K,) or None; voxel_weights: (V,) or None.
    """
    one_hot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    prob = torch.sigmoid(logits)
    p_wrong = (1.0 - prob) * one_hot + prob * (1.0 - one_hot)
    modulation = (alpha * one_hot + (1.0 - alpha) * (1.0 - one_hot)) * p_wrong.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none") * modulation
    if class_weights is not None:
        loss = loss * class_weights.to(loss.dtype)[None, :]
    if voxel_weights is not None:
        loss = loss * voxel_weights.to(loss.dtype)[:, None]
    return loss.sum(-1).mean() if loss.numel() else logits.sum() * 0.0


def lovasz_softmax(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovasz-softmax loss over the classes present in ``target``.

    For class c with foreground f_c and errors e = |f_c - p_c| sorted in decreasing
    order (permutation pi), the loss is the Lovasz extension of the Jaccard loss,
        sum_i e_pi(i) * (J(i) - J(i-1)),  J(i) = 1 - |f \\ M_i| / |f u M_i|,
    M_i the first i voxels of pi; the result is averaged over present classes.

    Args:
        probs: (V, K) class probabilities; target: (V,) int64.
    """
    present = torch.unique(target)
    if present.numel() == 0:
        return probs.sum() * 0.0
    foreground = (target[:, None] == present[None, :]).to(probs.dtype)  # (V, P)
    errors = (foreground - probs[:, present]).abs()
    errors_sorted, order = torch.sort(errors, dim=0, descending=True)
    fg_sorted = torch.gather(foreground, 0, order)
    totals = fg_sorted.sum(0, keepdim=True)
    intersection = totals - fg_sorted.cumsum(0)
    union = totals + (1.0 - fg_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    gradient = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], dim=0)
    return (errors_sorted * gradient).sum(0).mean()


def _neg_log(x: torch.Tensor) -> torch.Tensor:
    # BCE(x, 1) with x clamped away from 0 and 1 as in MonoScene's implementation.
    return -torch.log(x.clamp(_SCAL_EPS, 1.0 - _SCAL_EPS))


def sem_scal_loss(probs: torch.Tensor, target: torch.Tensor, free_index: int) -> torch.Tensor:
    """Semantic scene-class affinity loss (MonoScene): for each non-free class c present in
    ``target``, -log of its precision, recall and specificity over the scene,

        precision = sum(p t) / sum(p),  recall = sum(p t) / sum(t),
        specificity = sum((1 - p)(1 - t)) / sum(1 - t),   t = [target == c], p = probs[:, c],
    (a term is skipped when its denominator is 0), averaged over the counted classes.

    Args:
        probs: (V, K) class probabilities; target: (V,) int64.
    """
    num_classes = probs.shape[1]
    classes = torch.tensor([c for c in range(num_classes) if c != free_index], device=probs.device)
    truth = (target[:, None] == classes[None, :]).to(probs.dtype)  # (V, C)
    prob = probs[:, classes]
    counted = truth.sum(0) > 0
    if not bool(counted.any()):
        return probs.sum() * 0.0
    true_positive = (prob * truth).sum(0)
    prob_sum, truth_sum, negatives = prob.sum(0), truth.sum(0), (1.0 - truth).sum(0)
    precision = true_positive / (prob_sum + _SCAL_EPS)
    recall = true_positive / (truth_sum + _SCAL_EPS)
    specificity = ((1.0 - prob) * (1.0 - truth)).sum(0) / (negatives + _SCAL_EPS)
    per_class = (_neg_log(precision) * (prob_sum > 0) + _neg_log(recall)
                 + _neg_log(specificity) * (negatives > 0))
    return (per_class * counted).sum() / counted.sum()


def geo_scal_loss(probs: torch.Tensor, target: torch.Tensor, free_index: int) -> torch.Tensor:
    """Geometric scene-class affinity loss (MonoScene): the same three terms for the binary
    occupied / free split, with p = 1 - probs[:, free] and t = [target != free]."""
    free_prob = probs[:, free_index]
    occupied_prob = 1.0 - free_prob
    occupied = (target != free_index).to(probs.dtype)
    intersection = (occupied * occupied_prob).sum()
    precision = intersection / (occupied_prob.sum() + _SCAL_EPS)
    recall = intersection / (occupied.sum() + _SCAL_EPS)
    specificity = ((1.0 - occupied) * free_prob).sum() / ((1.0 - occupied).sum() + _SCAL_EPS)
    return _neg_log(precision) + _neg_log(recall) + _neg_log(specificity)


def flow_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked voxels of ``(|gt| + 0.1) * sum_i |pred_i - gt_i|``.

    Args:
        pred, target: (V, 2) velocities (m/s); mask: (V,) bool (flow-class voxels). Voxels
        with a non-finite target are left out.
    """
    mask = mask & torch.isfinite(target).all(-1)
    if not bool(mask.any()):
        return pred.sum() * 0.0
    pred, target = pred[mask], target[mask]
    weight = target.norm(dim=-1) + 0.1
    return (weight * (pred - target).abs().sum(-1)).sum() / mask.sum()


@HEAD_REGISTRY.register()
class OccupancyFlowLoss(nn.Module):
    """All occupancy and flow losses with their weights.

    Args:
        num_classes, free_index, flow_classes: the label set (from dataset metadata).
        point_cloud_range, voxel_size: the GT grid (for the distance weights).
        class_frequencies: per-class voxel counts for the focal class weights (None: 1).
        focal_gamma, focal_alpha: focal loss parameters.
        distance_weighting: use ``1 + r / r_max`` voxel weights in the focal loss.
        ignore_index: label value of voxels without ground truth.
        focal_weight, lovasz_weight, sem_scal_weight, geo_scal_weight, flow_weight: loss weights
            (a weight of 0 skips the term).

    Forward:
        occ_logits (B, K, X, Y, Z), flow (B, 2, X, Y, Z), occ_target (B, X, Y, Z) int64,
        flow_target (B, X, Y, Z, 2), valid_mask (B, X, Y, Z) bool or None, flow_loss_enabled.
    Returns:
        dict of weighted scalar losses.
    """

    def __init__(
        self,
        num_classes: int,
        free_index: int,
        flow_classes: Sequence[int],
        point_cloud_range: Sequence[float],
        voxel_size: float,
        class_frequencies: Optional[Sequence[float]] = None,
        focal_gamma: float = 2.0,
        focal_alpha: float = 0.25,
        distance_weighting: bool = True,
        ignore_index: int = 255,
        focal_weight: float = 1.0,
        lovasz_weight: float = 1.0,
        sem_scal_weight: float = 1.0,
        geo_scal_weight: float = 1.0,
        flow_weight: float = 1.0,
    ):
        super().__init__()
        if not 0 <= free_index < num_classes:
            raise ValueError(f"OccupancyFlowLoss: free_index {free_index} outside [0, {num_classes})")
        self.num_classes, self.free_index, self.ignore_index = int(num_classes), int(free_index), int(ignore_index)
        grid = OccupancyGrid(tuple(float(v) for v in point_cloud_range), float(voxel_size))
        if class_frequencies is not None and len(class_frequencies) != num_classes:
            raise ValueError(f"OccupancyFlowLoss: {len(class_frequencies)} class_frequencies for {num_classes} classes")
        weights = class_weights_from_frequencies(class_frequencies) if class_frequencies is not None \
            else torch.ones(num_classes)
        self.register_buffer("class_weights", weights, persistent=False)
        self.register_buffer("distance_weight_map", distance_weights(grid), persistent=False)
        flow_lut = torch.zeros(max(num_classes, self.ignore_index + 1), dtype=torch.bool)
        flow_lut[list(flow_classes)] = True
        self.register_buffer("flow_class_lut", flow_lut, persistent=False)
        self.distance_weighting = distance_weighting
        self.focal_gamma, self.focal_alpha = float(focal_gamma), float(focal_alpha)
        self.weights = dict(focal=focal_weight, lovasz=lovasz_weight, sem_scal=sem_scal_weight,
                            geo_scal=geo_scal_weight, flow=flow_weight)

    def forward(self, occ_logits: torch.Tensor, flow: torch.Tensor, occ_target: torch.Tensor,
                flow_target: torch.Tensor, valid_mask: Optional[torch.Tensor] = None,
                flow_loss_enabled: bool = True) -> Dict[str, torch.Tensor]:
        b, k = occ_logits.shape[:2]
        spatial = tuple(occ_logits.shape[2:])
        if tuple(occ_target.shape) != (b, *spatial):
            raise ValueError(f"occ_semantics has shape {tuple(occ_target.shape)}, the head predicts {(b, *spatial)}")
        logits = occ_logits.float().permute(0, 2, 3, 4, 1).reshape(-1, k)
        target = occ_target.reshape(-1).long()
        valid = (target != self.ignore_index) & (target >= 0) & (target < k)
        if valid_mask is not None:
            valid = valid & valid_mask.reshape(-1).bool()
        # Non-finite logits (should not happen) must not poison the batch.
        logits = torch.nan_to_num(logits, nan=0.0, posinf=30.0, neginf=-30.0)
        logits_v, target_v = logits[valid], target[valid]
        losses: Dict[str, torch.Tensor] = {}
        w = self.weights
        if not bool(valid.any()):  # nothing to supervise: zeros that keep the graph connected
            zero = occ_logits.sum() * 0.0 + flow.sum() * 0.0
            names = {"focal": "loss_occ_focal", "lovasz": "loss_occ_lovasz", "sem_scal": "loss_occ_sem_scal",
                     "geo_scal": "loss_occ_geo_scal", "flow": "loss_flow"}
            return {names[key]: zero for key, weight in w.items() if weight}
        if w["focal"]:
            voxel_weights = None
            if self.distance_weighting:
                if tuple(self.distance_weight_map.shape) != spatial[:2]:
                    raise ValueError(f"OccupancyFlowLoss: grid {tuple(self.distance_weight_map.shape)} does not "
                                     f"match predictions {spatial}")
                voxel_weights = self.distance_weight_map[None, :, :, None].expand(b, *spatial).reshape(-1)[valid]
            losses["loss_occ_focal"] = w["focal"] * sigmoid_focal_loss(
                logits_v, target_v, self.class_weights, voxel_weights, self.focal_gamma, self.focal_alpha)
        if w["lovasz"] or w["sem_scal"] or w["geo_scal"]:
            probs_v = logits_v.softmax(-1)
            if w["lovasz"]:
                losses["loss_occ_lovasz"] = w["lovasz"] * lovasz_softmax(probs_v, target_v)
            if w["sem_scal"]:
                losses["loss_occ_sem_scal"] = w["sem_scal"] * sem_scal_loss(probs_v, target_v, self.free_index)
            if w["geo_scal"]:
                losses["loss_occ_geo_scal"] = w["geo_scal"] * geo_scal_loss(probs_v, target_v, self.free_index)
        if w["flow"]:
            flow_flat = flow.float().permute(0, 2, 3, 4, 1).reshape(-1, flow.shape[1])
            if flow_loss_enabled:
                mask = valid & self.flow_class_lut[target.clamp(0, self.flow_class_lut.numel() - 1)]
                losses["loss_flow"] = w["flow"] * flow_l1_loss(flow_flat, flow_target.reshape(-1, flow.shape[1]).float(),
                                                               mask)
            else:
                # Keep the flow branch in the graph (DDP without find_unused_parameters).
                losses["loss_flow"] = flow_flat.sum() * 0.0
        return losses
