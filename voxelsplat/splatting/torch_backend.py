"""Pure-PyTorch differentiable rasterization (CPU and GPU), the reference backend.

Instead of gsplat's per-tile threads, compositing works on a sparse list of
(Gaussian, pixel) pairs:

1. project the Gaussians (:func:`~voxelsplat.splatting.projection.project_gaussians`),
   sorted by (camera, depth);
2. without gradients, enumerate for every projection the pixels inside its
   screen-space box, in chunks of at most ``pair_chunk`` candidates, and keep the
   pairs with ``sigma >= 0`` and ``alpha >= 1/255`` (the only ones that composite);
3. stable-sort the pairs by pixel (so each pixel's list stays front-to-back), find
   each pixel's transmittance before every pair and drop the pairs from the one
   that would bring it to <= 1e-4 onwards;
4. with gradients, recompute alpha for the surviving pairs only, the exclusive
   transmittance as ``exp`` of a per-pixel cumulative sum of ``log(1 - alpha)``
   (float64, so a running sum over millions of pairs stays exact), and composite
   ``sum alpha * T * [features, depth, 1]`` per pixel as a sparse (pixels x
   projections) CSR matrix times the (projections, D + 2) source, which neither pass
   expands to a (pairs, channels) tensor.

Memory grows with the number of surviving pairs (bounded by pixels times the
Gaussians a ray crosses before it saturates), never with cameras x pixels x Gaussians.
"""
from __future__ import annotations

import warnings
from typing import Tuple

import torch

from .projection import ALPHA_THRESHOLD, MAX_ALPHA, TRANSMITTANCE_THRESHOLD, Projections, project_gaussians

DEFAULT_PAIR_CHUNK = 1 << 22


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class _CompositeScatter(torch.autograd.Function):
    """``out[p] = sum_m weights[m] * source[proj[m]]`` over the pairs m of pixel p, as a
    sparse (pixels x projections) CSR matrix times ``source`` (projections, D).

    The pairs arrive sorted by pixel (``pixel_crow`` row pointers, ``proj_cols``); the
    backward pass uses the same matrix transposed, given as ``proj_crow``, ``pixel_cols``
    and ``to_proj_order`` (pixel-order pair index of each pair in projection order).
    Neither pass builds a (pairs, D) tensor.
    """

    @staticmethod
    def forward(ctx, weights, source, pixel_crow, proj_cols, proj_crow, pixel_cols, to_proj_order):
        num_pixels, num_proj = pixel_crow.shape[0] - 1, proj_crow.shape[0] - 1
        ctx.save_for_backward(weights, source, pixel_crow, proj_cols, proj_crow, pixel_cols, to_proj_order)
        if weights.numel() == 0:
            return source.new_zeros((num_pixels, source.shape[1]))
        return _csr(pixel_crow, proj_cols, weights, (num_pixels, num_proj)) @ source

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        weights, source, pixel_crow, proj_cols, proj_crow, pixel_cols, to_proj_order = ctx.saved_tensors
        num_pixels, num_proj = pixel_crow.shape[0] - 1, proj_crow.shape[0] - 1
        grad_out = grad_out.contiguous()
        grad_weights = grad_source = None
        if weights.numel() == 0:
            return torch.zeros_like(weights), torch.zeros_like(source), None, None, None, None, None
        if ctx.needs_input_grad[0]:
            # d out[p] / d weights[m] = source[proj[m]]: grad_out @ source^T sampled at the pairs.
            pattern = _csr(pixel_crow, proj_cols, torch.zeros_like(weights), (num_pixels, num_proj))
            grad_weights = torch.sparse.sampled_addmm(pattern, grad_out, source.T, beta=0.0).values()
        if ctx.needs_input_grad[1]:
            transposed = _csr(proj_crow, pixel_cols, weights[to_proj_order], (num_proj, num_pixels))
            grad_source = transposed @ grad_out
        return grad_weights, grad_source, None, None, None, None, None


def _pair_sigma_alpha(proj: Projections, proj_index, pixel_x, pixel_y) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gaussian exponent and alpha of (projection, pixel) pairs (pixel centres at +0.5)."""
    mean = proj.means2d.index_select(0, proj_index)
    conic = proj.conics.index_select(0, proj_index)
    dx = mean[:, 0] - (pixel_x.to(mean.dtype) + 0.5)
    dy = mean[:, 1] - (pixel_y.to(mean.dtype) + 0.5)
    sigma = 0.5 * (conic[:, 0] * dx * dx + conic[:, 2] * dy * dy) + conic[:, 1] * dx * dy
    alpha = torch.clamp(proj.opacities.index_select(0, proj_index) * torch.exp(-sigma), max=MAX_ALPHA)
    return sigma, alpha


@torch.no_grad()
def pixel_boxes(proj: Projections, width: int, height: int):
    """Inclusive pixel ranges x0, x1, y0, y1 (int64, (K,) each, clipped to the image; empty
    where x1 < x0 or y1 < y0) of the pixels whose centres lie within each projection's radii:
    outside them its alpha is below 1/255."""
    u, v = proj.means2d[:, 0], proj.means2d[:, 1]
    radius_x, radius_y = proj.radii[:, 0].to(u.dtype), proj.radii[:, 1].to(u.dtype)
    # Pixel j (centre j + 0.5) lies in [u - r, u + r] for ceil(u - r - 0.5) <= j <= floor(u + r - 0.5).
    x0 = torch.ceil(u - radius_x - 0.5).clamp(min=0).long()
    x1 = torch.floor(u + radius_x - 0.5).clamp(max=width - 1).long()
    y0 = torch.ceil(v - radius_y - 0.5).clamp(min=0).long()
    y1 = torch.floor(v + radius_y - 0.5).clamp(max=height - 1).long()
    return x0, x1, y0, y1


@torch.no_grad()
def _candidate_pairs(proj: Projections, width: int, height: int, pair_chunk: int):
    """(projection index, pixel x, pixel y) of every pair that composites (alpha >= 1/255,
    sigma >= 0), in projection order; enumerated in chunks of ``pair_chunk`` candidates."""
    device = proj.means2d.device
    x0, x1, y0, y1 = pixel_boxes(proj, width, height)
    box_w = (x1 - x0 + 1).clamp(min=0)
    counts = box_w * (y1 - y0 + 1).clamp(min=0)
    ends = torch.cumsum(counts, 0)
    pieces = []
    first = 0
    while first < len(counts):
        # The largest run of projections [first, last) whose candidates fit in one chunk
        # (at least one projection, however large its box).
        base = int(ends[first - 1]) if first > 0 else 0
        last = int(torch.searchsorted(ends, base + pair_chunk, right=True))
        last = max(last, first + 1)
        n = counts[first:last]
        proj_index = torch.repeat_interleave(torch.arange(first, last, device=device), n)
        local = torch.arange(int(n.sum()), device=device) - (ends[first:last] - n - base).repeat_interleave(n)
        row_length = box_w.index_select(0, proj_index)
        pixel_x = x0.index_select(0, proj_index) + local % row_length
        pixel_y = y0.index_select(0, proj_index) + local // row_length
        sigma, alpha = _pair_sigma_alpha(proj, proj_index, pixel_x, pixel_y)
        keep = ((sigma >= 0) & (alpha >= ALPHA_THRESHOLD)).nonzero(as_tuple=True)[0]
        pieces.append((proj_index.index_select(0, keep), pixel_x.index_select(0, keep), pixel_y.index_select(0, keep)))
        first = last
    if not pieces:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty
    return tuple(torch.cat(parts) for parts in zip(*pieces))


def _segment_exclusive_log_transmittance(log_one_minus_alpha: torch.Tensor, is_start: torch.Tensor):
    """Per-segment exclusive and inclusive cumulative sums of ``log(1 - alpha)``.

    ``is_start`` marks the first pair of each pixel in the sorted pair list. Sums run
    in float64: one running sum spans every pixel of the batch.
    """
    logs = log_one_minus_alpha.double()
    inclusive = torch.cumsum(logs, 0)
    exclusive = inclusive - logs
    segment = torch.cumsum(is_start.long(), 0) - 1
    offset = exclusive.index_select(0, is_start.nonzero(as_tuple=True)[0]).index_select(0, segment)
    return exclusive - offset, inclusive - offset


def projection_source(features: torch.Tensor, proj: Projections) -> torch.Tensor:
    """What each projection composites: its Gaussian's features (``features`` (N, D) or
    (C, N, D)), then its depth (-> sum w z) and a one (-> sum w = 1 - final transmittance):
    (K, D + 2)."""
    channels = features.shape[-1]
    if features.dim() == 2:
        per_projection = features.index_select(0, proj.gaussian_ids)
    else:
        per_projection = features.reshape(-1, channels).index_select(0, proj.camera_ids * features.shape[1] + proj.gaussian_ids)
    return torch.cat([per_projection, proj.depths[:, None].to(features.dtype), torch.ones_like(per_projection[:, :1])], -1)


def rasterize_torch(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    features: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    near_plane: float,
    far_plane: float,
    eps2d: float,
    pair_chunk: int = DEFAULT_PAIR_CHUNK,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "torch" backend of :func:`voxelsplat.splatting.rasterize_gaussians` (inputs validated there).

    ``features`` is (N, D) or (C, N, D). Returns features (C, H, W, D), alphas (C, H, W)
    and accumulated depths (C, H, W).
    """
    num_cameras = viewmats.shape[0]
    channels = features.shape[-1]
    proj = project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d)
    num_pixels, num_proj = num_cameras * height * width, proj.depths.shape[0]

    with torch.no_grad():
        proj_index, pixel_x, pixel_y = _candidate_pairs(proj, width, height, pair_chunk)
        pixel = (proj.camera_ids.index_select(0, proj_index) * height + pixel_y) * width + pixel_x
        # Candidates come in (camera, depth) order, so a stable sort by pixel keeps each
        # pixel's pairs front to back.
        pixel, order = torch.sort(pixel, stable=True)
        proj_index = proj_index.index_select(0, order)
        is_start = torch.ones_like(pixel, dtype=torch.bool)
        is_start[1:] = pixel[1:] != pixel[:-1]
        _, alpha = _pair_sigma_alpha(proj, proj_index, pixel_x.index_select(0, order), pixel_y.index_select(0, order))
        exclusive, inclusive = _segment_exclusive_log_transmittance(torch.log1p(-alpha), is_start)
        # A pixel stops before the Gaussian that would take its transmittance to <= 1e-4;
        # transmittance only falls, so the survivors are a prefix of each pixel's list.
        survivors = (torch.exp(inclusive) > TRANSMITTANCE_THRESHOLD).nonzero(as_tuple=True)[0]
        # The survivors' weights; recomputed with gradients below when any input needs them.
        weights = (alpha * torch.exp(exclusive).to(alpha.dtype)).index_select(0, survivors)
        proj_index, pixel = proj_index.index_select(0, survivors), pixel.index_select(0, survivors)
        pixel_x, pixel_y = pixel % width, (pixel // width) % height
        is_start = torch.ones_like(pixel, dtype=torch.bool)
        is_start[1:] = pixel[1:] != pixel[:-1]
        # The same pairs in candidate (= projection) order, for the transposed matrix.
        slot = torch.full_like(order, -1)
        slot[order.index_select(0, survivors)] = torch.arange(len(survivors), device=slot.device)
        to_proj_order = slot[slot >= 0]
        zero = torch.zeros(1, dtype=torch.long, device=pixel.device)
        pixel_crow = torch.cat([zero, torch.cumsum(torch.bincount(pixel, minlength=num_pixels), 0)])
        proj_crow = torch.cat([zero, torch.cumsum(torch.bincount(proj_index, minlength=num_proj), 0)])
        pixel_cols = pixel.index_select(0, to_proj_order)

    if torch.is_grad_enabled() and any(t.requires_grad for t in (means, quats, scales, opacities)):
        _, alpha = _pair_sigma_alpha(proj, proj_index, pixel_x, pixel_y)
        exclusive, _ = _segment_exclusive_log_transmittance(torch.log1p(-alpha), is_start)
        weights = alpha * torch.exp(exclusive).to(alpha.dtype)

    source = projection_source(features, proj)
    image = _CompositeScatter.apply(weights.to(source.dtype), source, pixel_crow, proj_index, proj_crow, pixel_cols,
                                    to_proj_order)
    image = image.reshape(num_cameras, height, width, channels + 2)
    return image[..., :channels], image[..., channels + 1], image[..., channels]
