"""The "inria" backend: the original 3D Gaussian Splatting CUDA rasterizer.

Importable as ``diff_gaussian_rasterization`` (built from graphdeco-inria's repository)
or ``gaussian_splatting.diff_gaussian_rasterization`` (bundled, prebuilt, in the
``gaussian-splatting`` wheel). Its licence is non-commercial.

It renders one camera and 3 colour channels per call, so D feature channels plus
the depth and a constant-one channel (which gives the alpha) take ``ceil((D + 2) / 3)``
passes per camera. Its own constants differ slightly from gsplat's (hard-coded
``eps2d = 0.3``, Gaussians nearer than 0.2 m culled, alpha capped at 0.99 instead of
0.999, tiles from a 3-sigma radius of the largest eigenvalue), so it matches the
other backends closely but not bit for bit. Its pixel (j, i) is sampled at
``(j, i)`` in its own coordinates, which the projection matrix built here maps to
``(j + 0.5, i + 0.5)`` in ours, with any principal point.
"""
from __future__ import annotations

import importlib
from typing import Tuple

import torch
import torch.nn.functional as F

from .errors import BackendUnavailableError

MODULE_NAMES = ("diff_gaussian_rasterization", "gaussian_splatting.diff_gaussian_rasterization")


def import_inria_rasterizer():
    """The Inria rasterizer module; raises ``BackendUnavailableError`` naming how to install it."""
    errors = []
    for name in MODULE_NAMES:
        try:
            return importlib.import_module(name)
        except Exception as error:  # noqa: BLE001  (a broken CUDA extension raises OSError etc.)
            errors.append(f"{name}: {type(error).__name__}: {error}")
    raise BackendUnavailableError(
        "backend='inria' needs the Inria CUDA rasterizer and a CUDA GPU: pip install gaussian-splatting==2.11.0 "
        "(bundles gaussian_splatting.diff_gaussian_rasterization, prebuilt for CUDA; non-commercial licence) or build "
        "graphdeco-inria/diff-gaussian-rasterization. Import attempts: " + "; ".join(errors))


def _projection_matrix(K: torch.Tensor, width: int, height: int, near: float, far: float) -> torch.Tensor:
    """Row-major 4x4 camera -> clip matrix whose NDC maps to Inria pixel coordinates
    ``u - 0.5``, ``v - 0.5`` (``u = fx x/z + cx``), i.e. ndc = 2 (fx x/z + cx) / W - 1."""
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    proj = torch.zeros(4, 4, dtype=K.dtype, device=K.device)
    proj[0, 0], proj[0, 2] = 2 * fx / width, 2 * cx / width - 1
    proj[1, 1], proj[1, 2] = 2 * fy / height, 2 * cy / height - 1
    proj[2, 2], proj[2, 3] = far / (far - near), -far * near / (far - near)
    proj[3, 2] = 1.0
    return proj


def rasterize_inria(
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
    """Render with the Inria rasterizer; same arguments and outputs as the torch backend.

    ``eps2d`` must be 0.3 (compiled into the rasterizer); ``near_plane`` below 0.2 m
    acts as 0.2 m; ``far_plane`` culls here before the call.
    """
    if abs(eps2d - 0.3) > 1e-12:
        raise ValueError(f"backend='inria' has eps2d = 0.3 compiled in; got eps2d={eps2d}")
    module = import_inria_rasterizer()
    dtype = features.dtype
    num_cameras, channels = viewmats.shape[0], features.shape[-1]
    means, scales, opacities, features = means.float(), scales.float(), opacities.float(), features.float()
    rotations = F.normalize(quats.float(), dim=-1)  # the CUDA code does not normalise
    viewmats, Ks = viewmats.float(), Ks.float()
    ones = torch.ones_like(means[:, :1])
    renders, alphas, depths = [], [], []
    for cam in range(num_cameras):
        viewmat = viewmats[cam]
        depth = means @ viewmat[2, :3] + viewmat[2, 3]
        in_range = ((depth >= near_plane) & (depth <= far_plane)).float()
        cam_features = features[cam] if features.dim() == 3 else features
        # Constant channel -> alpha = sum_i w_i; depth channel -> sum_i w_i z_i.
        stacked = torch.cat([cam_features, depth[:, None], ones], dim=-1)
        pad = (-stacked.shape[1]) % 3
        stacked = F.pad(stacked, (0, pad))
        fields = {
            "image_height": height, "image_width": width,
            "tanfovx": float(0.5 * width / Ks[cam, 0, 0]), "tanfovy": float(0.5 * height / Ks[cam, 1, 1]),
            "bg": torch.zeros(3, device=means.device), "scale_modifier": 1.0,
            "viewmatrix": viewmat.T.contiguous(),
            "projmatrix": (_projection_matrix(Ks[cam], width, height, near_plane, far_plane) @ viewmat).T.contiguous(),
            "sh_degree": 0, "campos": torch.linalg.inv(viewmat)[:3, 3].contiguous(),
            "prefiltered": False, "debug": False, "antialiasing": False,
        }
        settings_type = module.GaussianRasterizationSettings
        settings = settings_type(**{k: v for k, v in fields.items() if k in settings_type._fields})
        rasterizer = module.GaussianRasterizer(raster_settings=settings)
        passes = []
        for start in range(0, stacked.shape[1], 3):
            screen_points = torch.zeros_like(means, requires_grad=means.requires_grad)
            out = rasterizer(
                means3D=means, means2D=screen_points, opacities=(opacities * in_range)[:, None],
                colors_precomp=stacked[:, start:start + 3].contiguous(), scales=scales, rotations=rotations,
            )
            passes.append(out[0] if isinstance(out, (tuple, list)) else out)
        image = torch.cat(passes, dim=0).permute(1, 2, 0)  # (H, W, channels + 2 + pad)
        renders.append(image[..., :channels])
        depths.append(image[..., channels])
        alphas.append(image[..., channels + 1])
    return (torch.stack(renders).to(dtype), torch.stack(alphas).to(dtype), torch.stack(depths).to(dtype))
