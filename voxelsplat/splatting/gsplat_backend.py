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
    back to ``features.dtype``."""
    from gsplat import rasterization

    dtype = features.dtype
    f32 = [t.float() for t in (means, quats, scales, opacities, features, viewmats, Ks)]
    renders, alphas, _ = rasterization(
        *f32, width=width, height=height, near_plane=near_plane, far_plane=far_plane, eps2d=eps2d,
        sh_degree=None, packed=False, render_mode="RGB+D", rasterize_mode="classic",
    )
    channels = features.shape[-1]
    renders = renders.to(dtype)
    return renders[..., :channels], alphas[..., 0].to(dtype), renders[..., channels]
