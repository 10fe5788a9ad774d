"""Occupancy and flow losses (FB-Occ's set plus the flow term).

- sigmoid focal loss with per-class weights ``1 / log(voxel_count + 1e-3)`` and a
  distance weight ``1 + r / r_max`` (r: horizontal distance of the voxel centre from
  the ego origin) -- far voxels are rarer and count more;
- Lovasz-softmax (Berman et al., CVPR 2018) over the classes present;
- semantic and geometric scene-class affinity losses (MonoScene, CVPR 2022);
- flow L1 weighted by (|gt| + 0.1). As released: over every voxel (static and free voxels
  are supervised towards zero flow), normalised by the sum of the weights. Optionally
  (``flow_voxels="flow_classes"``, ``flow_normalization="voxel_count"``) over the voxels
  of the flow classes only, averaged per voxel.

The functions take flattened voxels (V, K) so they are easy to test against
direct formulas; :class:`OccupancyFlowLoss` applies them to the head's outputs.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ...structures import OccupancyGrid, OccupancySpec

__all__ = [
    "class_weights_from_frequencies", "distance_weights", "sigmoid_focal_loss", "lovasz_softmax", "sem_scal_loss",
    "geo_scal_loss", "flow_l1_loss", "OccupancyFlowLoss", "FLOW_VOXELS", "FLOW_NORMALIZATIONS",
]

_SCAL_EPS = 1e-5


def class_weights_from_frequencies(frequencies: Sequence[float]) -> torch.Tensor:
    """(K,) weights ``1 / log(count + 1e-3)`` from per-class voxel counts (each > 1)."""
    counts = np.asarray(frequencies, dtype=np.float64)
    if counts.ndim != 1 or not np.all(counts > 1):
        raise ValueError(f"class_frequencies must be per-class voxel counts > 1, got {frequencies}")
    return torch.as_tensor(1.0 / np.log(counts + 1e-3), dtype=torch.float64)


def distance_weights(grid: OccupancyGrid) -> torch.Tensor:
    """(X, Y) weights ``1 + r / r_max``, r = distance of each BEV cell centre from the ego
    origin (metres, horizontal)."""
    centers = grid.voxel_centers()[:, :, 0, :2]
    radius = np.linalg.norm(centers, axis=-1)
    return torch.as_tensor(1.0 + radius / radius.max(), dtype=torch.float64)


def _focal_chunk(logits, target, class_weights, scale, gamma: float, alpha: float, with_grad: bool):
    """Loss sum and gradient of one chunk of voxels (see :class:`_SigmoidFocalLoss`)."""
    target = target[:, None]
    prob = torch.sigmoid(logits)
    not_prob = torch.sigmoid(-logits)
    # -log(1 - p) = softplus(x), the BCE of a negative (one log; finite for logits < 87 in float32).
    neg_log_q = -torch.log(not_prob.clamp_min(torch.finfo(logits.dtype).tiny))
    prob_gamma = prob.pow(gamma)
    # Every entry as a negative, then the target column replaced by its positive term.
    negative = prob_gamma * neg_log_q * (1.0 - alpha)
    q_t = not_prob.gather(1, target)
    neg_log_p_t = neg_log_q.gather(1, target) - logits.gather(1, target)  # -log(p_t)
    positive_t = alpha * q_t.pow(gamma) * neg_log_p_t
    class_t = class_weights[target]
    per_voxel = (negative * class_weights).sum(1, keepdim=True) + (positive_t - negative.gather(1, target)) * class_t
    loss = (per_voxel * scale).sum()
    grad = None
    if with_grad:
        grad = prob_gamma.mul_(gamma * not_prob * neg_log_q + prob).mul_((1.0 - alpha) * class_weights)
        p_t = prob.gather(1, target)
        grad_t = -alpha * q_t.pow(gamma) * (gamma * p_t * neg_log_p_t + q_t)
        grad.scatter_(1, target, grad_t * class_t).mul_(scale)
    return loss, grad


class _SigmoidFocalLoss(torch.autograd.Function):
    """Fused forward/backward of :func:`sigmoid_focal_loss`: the gradient is computed in
    closed form during the forward pass, chunk by chunk so the temporaries stay in cache
    (a (V, K) autograd graph with a one-hot target costs ~40 passes over memory and
    dominated a CPU training step)."""

    @staticmethod
    def forward(ctx, logits, target, class_weights, voxel_weights, gamma: float, alpha: float, chunk: int):
        num_voxels = logits.shape[0]
        with_grad = ctx.needs_input_grad[0]
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if with_grad else None
        total = logits.new_zeros(())
        for start in range(0, num_voxels, chunk):
            sl = slice(start, start + chunk)
            scale = voxel_weights[sl, None] / num_voxels
            loss, chunk_grad = _focal_chunk(logits[sl], target[sl], class_weights, scale, gamma, alpha, with_grad)
            total = total + loss
            if with_grad:
                grad[sl] = chunk_grad
        if with_grad:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None, None, None


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, class_weights: Optional[torch.Tensor] = None,
                       voxel_weights: Optional[torch.Tensor] = None, gamma: float = 2.0,
                       alpha: float = 0.25, chunk_voxels: Optional[int] = None) -> torch.Tensor:
    """Per-class sigmoid focal loss, summed over classes and averaged over voxels.

        loss = 1/V sum_v sum_k w_v c_k a_vk (1 - p_t)^gamma BCE(x_vk, t_vk)
    with t one-hot, p_t the probability of the true binary outcome, a = alpha for
    positives and 1 - alpha for negatives (FB-Occ's focal loss).

    Args:
        logits: (V, K); target: (V,) int64 in [0, K).
        class_weights: (K,) or None (ones); voxel_weights: (V,) or None (ones).
        chunk_voxels: voxels per processing chunk (default: ~256k logits per chunk).
    Returns:
        scalar; differentiable w.r.t. ``logits`` only.
    """
    num_voxels, num_classes = logits.shape
    if num_voxels == 0:
        return logits.sum() * 0.0
    class_weights = logits.new_ones(num_classes) if class_weights is None else class_weights.to(logits.dtype)
    voxel_weights = logits.new_ones(num_voxels) if voxel_weights is None else voxel_weights.to(logits.dtype)
    chunk = int(chunk_voxels) if chunk_voxels else max(1, (1 << 18) // max(num_classes, 1))
    return _SigmoidFocalLoss.apply(logits, target.long(), class_weights, voxel_weights, float(gamma), float(alpha),
                                   chunk)


def lovasz_softmax(probs: torch.Tensor, target: torch.Tensor, num_buckets: Optional[int] = 16384) -> torch.Tensor:
    """Lovasz-softmax loss over the classes present in ``target``.

    For class c with foreground f_c and errors e = |f_c - p_c| sorted in decreasing
    order (permutation pi), the loss is the Lovasz extension of the Jaccard loss,
        sum_i e_pi(i) * (J(i) - J(i-1)),  J(i) = 1 - |f \\ M_i| / |f u M_i|,
    M_i the first i voxels of pi; the result is averaged over present classes.

    J only grows along pi and goes from 0 to 1, so the loss is a weighted mean of the
    errors. With ``num_buckets`` the errors are ordered by a counting sort into that many
    equal-width levels, and voxels of one level share the level's mean error (ties do not
    change a Lovasz extension): the value is within ``1 / num_buckets`` of the exact one,
    in O(V) per class instead of a comparison sort of V voxels (which cost ~0.5 s per
    step on a CPU at 200x200x16). ``num_buckets=None`` sorts exactly.

    Args:
        probs: (V, K) class probabilities; target: (V,) int64.
    """
    present = (torch.bincount(target, minlength=probs.shape[1]) > 0).nonzero().flatten()
    if present.numel() == 0:
        return probs.sum() * 0.0
    if num_buckets is not None:
        chunk = max(1, (1 << 20) // present.numel())
        return _BucketedLovasz.apply(probs, target, present, int(num_buckets), chunk)
    # Exact: a comparison sort per class, in a (classes, voxels) layout.
    foreground = (present[:, None] == target[None, :]).to(probs.dtype)  # (P, V)
    errors = (foreground - probs.t()[present]).abs()
    errors_sorted, order = torch.sort(errors, dim=1, descending=True)
    fg_sorted = torch.gather(foreground, 1, order)
    totals = fg_sorted.sum(1, keepdim=True)
    intersection = totals - fg_sorted.cumsum(1)
    union = totals + (1.0 - fg_sorted).cumsum(1)
    jaccard = 1.0 - intersection / union
    gradient = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return (errors_sorted * gradient).sum(1).mean()


class _BucketedLovasz(torch.autograd.Function):
    """Bucketed Lovasz-softmax (see :func:`lovasz_softmax`) in two chunked passes over the
    voxels: (1) count voxels and foreground voxels per error level, (2) give every voxel
    its level's share of the Jaccard step, accumulate the loss and its gradient
    d loss / d p_cv = -+ share / P (minus on foreground, plus on background)."""

    @staticmethod
    def _levels(probs_t, target, present, num_buckets):
        foreground = present[:, None] == target[None, :]  # (P, n)
        errors = (foreground.to(probs_t.dtype) - probs_t[present]).abs_()
        level = ((1.0 - errors) * num_buckets).long().clamp_(0, num_buckets - 1)
        level += torch.arange(present.numel(), device=level.device)[:, None] * num_buckets
        return foreground, errors, level

    @staticmethod
    def forward(ctx, probs, target, present, num_buckets: int, chunk: int):
        probs_t = probs.t()  # (K, V)
        num_present, num_voxels = present.numel(), probs.shape[0]
        size = num_present * num_buckets
        count_all = torch.zeros(size, dtype=torch.int64, device=probs.device)
        count_fg = torch.zeros(size, dtype=torch.int64, device=probs.device)
        for start in range(0, num_voxels, chunk):
            sl = slice(start, start + chunk)
            foreground, _, level = _BucketedLovasz._levels(probs_t[:, sl], target[sl], present, num_buckets)
            level = level.flatten()
            count_all += torch.bincount(level, minlength=size)
            count_fg += torch.bincount(level[foreground.flatten()], minlength=size)
        count_all = count_all.view(num_present, -1).to(torch.float64)
        count_fg = count_fg.view(num_present, -1).to(torch.float64)
        totals = count_fg.sum(1, keepdim=True)
        # Level 0 holds the largest errors: cumulative sums run in decreasing-error order.
        jaccard = 1.0 - (totals - count_fg.cumsum(1)) / (totals + (count_all - count_fg).cumsum(1))
        step = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
        share = (step / count_all.clamp(min=1)).flatten().to(probs.dtype) / num_present
        loss = torch.zeros((), dtype=torch.float64, device=probs.device)
        grad_t = torch.zeros_like(probs_t, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        for start in range(0, num_voxels, chunk):
            sl = slice(start, start + chunk)
            foreground, errors, level = _BucketedLovasz._levels(probs_t[:, sl], target[sl], present, num_buckets)
            weight = share[level]
            loss += (errors * weight).sum(dtype=torch.float64)
            if grad_t is not None:
                grad_t[present, sl] = torch.where(foreground, -weight, weight)
        if grad_t is not None:
            ctx.save_for_backward(grad_t)
        return loss.to(probs.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad_t,) = ctx.saved_tensors
        return (grad_t * grad_output).t(), None, None, None, None


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
    num_voxels, num_classes = probs.shape
    # Per-class sums in O(V) with bincount / index_add instead of (C, V) one-hot masks.
    truth_sum = torch.bincount(target, minlength=num_classes).to(probs.dtype)
    prob_target = probs.gather(1, target[:, None]).squeeze(1)
    true_positive = torch.zeros(num_classes, dtype=probs.dtype, device=probs.device).index_add(0, target, prob_target)
    prob_sum = probs.sum(0)
    keep = torch.ones(num_classes, dtype=torch.bool, device=probs.device)
    keep[free_index] = False
    truth_sum, true_positive, prob_sum = truth_sum[keep], true_positive[keep], prob_sum[keep]
    counted = truth_sum > 0
    if not bool(counted.any()):
        return probs.sum() * 0.0
    negatives = num_voxels - truth_sum
    precision = true_positive / (prob_sum + _SCAL_EPS)
    recall = true_positive / (truth_sum + _SCAL_EPS)
    # sum((1 - p)(1 - t)) = V - sum(p) - sum(t) + sum(p t)
    specificity = (num_voxels - prob_sum - truth_sum + true_positive) / (negatives + _SCAL_EPS)
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


FLOW_VOXELS = ("all", "flow_classes")
FLOW_NORMALIZATIONS = ("weight_sum", "voxel_count")


def flow_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 normalization: str = "weight_sum", weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(|gt| + 0.1)``-weighted L1 flow error.

        normalization="weight_sum":  sum_v w_v sum_i |pred_vi - gt_vi| / sum_v w_v
        normalization="voxel_count": sum_v w_v sum_i |pred_vi - gt_vi| / #v

    with ``w_v = |gt_v| + 0.1`` (or ``weight`` when given). The released code uses the
    first (mmdet ``l1_loss(weight=w, avg_factor=sum(w))``) over all voxels, and over all
    pixels of the rendered flow.

    Args:
        pred, target: (V, 2) velocities (m/s).
        mask: (V,) bool voxels to supervise, or None (all). Voxels with a non-finite
            target are left out.
        weight: (V,) per-voxel weights overriding ``|gt| + 0.1`` (e.g. detached).
    """
    if normalization not in FLOW_NORMALIZATIONS:
        raise ValueError(f"flow_l1_loss: normalization must be one of {FLOW_NORMALIZATIONS}, got {normalization!r}")
    finite = torch.isfinite(target).all(-1)
    mask = finite if mask is None else mask & finite
    if not bool(mask.any()):
        return pred.sum() * 0.0
    if not bool(mask.all()):
        pred, target = pred[mask], target[mask]
        weight = None if weight is None else weight[mask]
    if weight is None:
        weight = target.norm(dim=-1) + 0.1
    numerator = (weight * (pred - target).abs().sum(-1)).sum()
    if normalization == "weight_sum":
        return numerator / weight.sum()
    return numerator / target.shape[0]


class OccupancyFlowLoss(nn.Module):
    """All occupancy and flow losses with their weights.

    Args:
        spec: the dataset's :class:`~voxelsplat.structures.OccupancySpec`: the label set
            (classes, free index, flow classes) and the GT grid (for the distance weights).
        class_frequencies: per-class voxel counts for the focal class weights (None: 1).
        focal_gamma, focal_alpha: focal loss parameters.
        distance_weighting: use ``1 + r / r_max`` voxel weights in the focal loss.
        ignore_index: label value of voxels without ground truth.
        focal_weight, lovasz_weight, sem_scal_weight, geo_scal_weight, flow_weight: loss weights
            (a weight of 0 skips the term). Released: 100 (focal), 1, 1, 1 and 0.5 (flow).
        flow_voxels: "all" (released: every labelled voxel, so static and free voxels learn
            zero flow) or "flow_classes" (only voxels of the flow classes).
        flow_normalization: "weight_sum" (released: divide by the sum of the ``|gt| + 0.1``
            weights) or "voxel_count" (divide by the number of supervised voxels; with
            ``flow_voxels="flow_classes"`` about 29x stronger than released on nuScenes).

    Forward:
        occ_logits (B, K, X, Y, Z), flow (B, 2, X, Y, Z), occ_target (B, X, Y, Z) int64,
        flow_target (B, X, Y, Z, 2), valid_mask (B, X, Y, Z) bool or None, flow_loss_enabled.
    Returns:
        dict of weighted scalar losses.
    """

    def __init__(
        self,
        spec: OccupancySpec,
        class_frequencies: Optional[Sequence[float]] = None,
        focal_gamma: float = 2.0,
        focal_alpha: float = 0.25,
        distance_weighting: bool = True,
        ignore_index: int = 255,
        focal_weight: float = 1.0,
        lovasz_weight: float = 1.0,
        sem_scal_weight: float = 1.0,
        geo_scal_weight: float = 1.0,
        flow_weight: float = 0.5,
        flow_voxels: str = "all",
        flow_normalization: str = "weight_sum",
    ):
        super().__init__()
        if not isinstance(spec, OccupancySpec):
            raise TypeError(f"OccupancyFlowLoss: spec must be an OccupancySpec, got {type(spec).__name__}")
        num_classes, free_index, grid = spec.num_classes, spec.free_index, spec.grid
        if flow_voxels not in FLOW_VOXELS:
            raise ValueError(f"OccupancyFlowLoss: flow_voxels must be one of {FLOW_VOXELS}, got {flow_voxels!r}")
        if flow_normalization not in FLOW_NORMALIZATIONS:
            raise ValueError(f"OccupancyFlowLoss: flow_normalization must be one of {FLOW_NORMALIZATIONS}, got "
                             f"{flow_normalization!r}")
        self.flow_voxels, self.flow_normalization = flow_voxels, flow_normalization
        self.num_classes, self.free_index, self.ignore_index = int(num_classes), int(free_index), int(ignore_index)
        if class_frequencies is not None and len(class_frequencies) != num_classes:
            raise ValueError(f"OccupancyFlowLoss: {len(class_frequencies)} class_frequencies for the {num_classes} "
                             f"classes of {spec.describe()}")
        weights = class_weights_from_frequencies(class_frequencies) if class_frequencies is not None \
            else torch.ones(num_classes, dtype=torch.float64)
        self.register_buffer("class_weights", weights, persistent=False)
        self.register_buffer("distance_weight_map", distance_weights(grid), persistent=False)
        flow_lut = torch.zeros(max(num_classes, self.ignore_index + 1), dtype=torch.bool)
        flow_lut[list(spec.flow_classes)] = True
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
        # (V, K) views over a (K, V) layout: no copy for batch size 1.
        dtype = torch.promote_types(occ_logits.dtype, torch.float32)  # float32 under mixed precision
        logits = occ_logits.to(dtype).flatten(2).transpose(0, 1).reshape(k, -1).t()
        target = occ_target.reshape(-1).long()
        labelled = target != self.ignore_index
        out_of_range = labelled & ((target < 0) | (target >= k))
        if bool(out_of_range.any()):
            bad = int(target[out_of_range][0])
            raise ValueError(f"occ_semantics holds class id {bad} but the head predicts {k} classes (0..{k - 1}): the "
                             "label set of the data (gt_format) and the model's num_classes disagree")
        valid = labelled
        if valid_mask is not None:
            valid = valid & valid_mask.reshape(-1).bool()
        all_valid = bool(valid.all())
        logits_v = logits if all_valid else logits[valid]
        target_v = target if all_valid else target[valid]
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
                voxel_weights = self.distance_weight_map[None, :, :, None].expand(b, *spatial).reshape(-1)
                voxel_weights = voxel_weights if all_valid else voxel_weights[valid]
            losses["loss_occ_focal"] = w["focal"] * sigmoid_focal_loss(
                logits_v, target_v, self.class_weights, voxel_weights, self.focal_gamma, self.focal_alpha)
        if w["lovasz"] or w["sem_scal"] or w["geo_scal"]:
            probs_v = logits_v.t().softmax(0).t()
            if w["lovasz"]:
                losses["loss_occ_lovasz"] = w["lovasz"] * lovasz_softmax(probs_v, target_v)
            if w["sem_scal"]:
                losses["loss_occ_sem_scal"] = w["sem_scal"] * sem_scal_loss(probs_v, target_v, self.free_index)
            if w["geo_scal"]:
                losses["loss_occ_geo_scal"] = w["geo_scal"] * geo_scal_loss(probs_v, target_v, self.free_index)
        if w["flow"]:
            flow_flat = flow.to(dtype).flatten(2).transpose(0, 1).reshape(flow.shape[1], -1).t()
            if flow_loss_enabled:
                mask = valid
                if self.flow_voxels == "flow_classes":
                    mask = mask & self.flow_class_lut[target.clamp(0, self.flow_class_lut.numel() - 1)]
                losses["loss_flow"] = w["flow"] * flow_l1_loss(
                    flow_flat, flow_target.reshape(-1, flow.shape[1]).to(dtype), mask, self.flow_normalization)
            else:
                # Keep the flow branch in the graph (DDP without find_unused_parameters).
                losses["loss_flow"] = flow_flat.sum() * 0.0
        return losses
