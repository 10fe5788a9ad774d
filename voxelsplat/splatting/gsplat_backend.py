"""The "gsplat" backend: gsplat's CUDA rasterizer (classic mode, features + accumulated depth)."""
from __future__ import annotations

from typing import Tuple

import torch


def rasterize_gsplat(
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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`gsplat.rasterization` with ``render_mode="RGB+D"`` (the last channel is the
    accumulated depth ``sum_i w_i z_i``), mapped to (features (C, H, W, D), alphas
    (C, H, W), depths (C, H, W)). Runs in float32 (gsplat's kernels); outputs are cast
    back to ``features.dtype``.

    ``means`` (C, N, 3), a position per camera, renders in one call: each camera is its own
    batch element of gsplat's leading dimensions (Gaussians (C, N, ...), one camera each),
    instead of C calls of one camera."""
    from gsplat import rasterization

    dtype = features.dtype
    f32 = [t.float() for t in (means, quats, scales, opacities, features, viewmats, Ks)]
    per_camera = means.dim() == 3
    if per_camera:
        cameras, count = means.shape[:2]
        m, q, s, o, f, v, k = f32
        f32 = [m, q.expand(cameras, count, 4), s.expand(cameras, count, 3), o.expand(cameras, count),
               f if f.dim() == 3 else f.expand(cameras, *f.shape), v[:, None], k[:, None]]
    renders, alphas, _ = rasterization(
        *f32, width=width, height=height, near_plane=near_plane, far_plane=far_plane, eps2d=eps2d,
        sh_degree=None, packed=False, render_mode="RGB+D", rasterize_mode="classic",
    )
    if per_camera:  # (C, 1, H, W, .) -> (C, H, W, .)
        renders, alphas = renders[:, 0], alphas[:, 0]
    channels = features.shape[-1]
    renders = renders.to(dtype)
    return renders[..., :channels], alphas[..., 0].to(dtype), renders[..., channels]
