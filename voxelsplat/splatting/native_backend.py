"""The "native" backend: projection and compositing in C, on CPU threads.

``csrc/rasterize.c`` (float32 or float64, as the inputs) is built on first use
(:class:`voxelsplat.utils.native.NativeLibrary`). It holds the same two stages as the
torch backend, each with a hand-written backward pass:

- **projection** of every (camera, Gaussian) pair (``csrc/project_impl.h``), the
  arithmetic of :func:`~voxelsplat.splatting.projection.project_gaussians` evaluated in
  float64; the kept pairs are then sorted by (camera, depth) with PyTorch;
- **compositing** (``csrc/composite_impl.h``): each camera's projections are visited in
  depth order over their pixel boxes, with a running transmittance per pixel - the same
  per-pixel order and rules as gsplat's classic mode and the torch backend (which sums
  logs of ``1 - alpha`` where this multiplies, so the two agree to rounding); cameras are
  split over threads. The backward pass walks the projections back to front and recovers
  each pixel's transmittance by division, as gsplat's does.

Memory: the renders plus, for the backward pass, per-pixel float64 transmittance, last
contributing projection and a (C, H, W, D + 2) running sum; nothing grows with
the number of Gaussian-pixel pairs.
"""
from __future__ import annotations

import ctypes
import os
from typing import Tuple

import torch

from voxelsplat.utils.native import NativeLibrary, run_in_threads

from .projection import Projections
from .torch_backend import pixel_boxes, projection_source

__all__ = ["RASTERIZE", "rasterize_native"]

_i64, _i32, _f64, _ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_double, ctypes.c_void_p
# argument lists of the kernels in csrc/ (see their comments): sizes, pointers, bounds, ...
_SIGNATURES = {
    "project_forward": [_i64, _i64, _i32] + [_ptr] * 6 + [_i64, _i64, _f64, _f64, _f64] + [_ptr] * 5,
    "project_backward": [_i64, _i64, _i32] + [_ptr] * 5 + [_i64, _i64, _f64] + [_ptr] * 7,
    "composite_forward": [_i64] * 3 + [_ptr] * 6 + [_i64] * 2 + [_ptr] * 3,
    "composite_backward": [_i64] * 3 + [_ptr] * 6 + [_i64] * 2 + [_ptr] * 10,
}
RASTERIZE = NativeLibrary(
    "rasterize",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "rasterize.c"),
    {f"voxelsplat_{name}_{suffix}": (args, ctypes.c_int) for name, args in _SIGNATURES.items()
     for suffix in ("f32", "f64")},
    fallback="rasterization backend 'auto' uses the torch backend on CPU (slower)",
)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _kernel(name: str, dtype: torch.dtype):
    return getattr(RASTERIZE.load(required=True), f"voxelsplat_{name}_{_SUFFIX[dtype]}")


class _Project(torch.autograd.Function):
    """Every (camera, Gaussian) pair c * N + n: means2d (C N, 2), conics (C N, 3), depths
    (C N,), and (no gradient) keep (C N,) bool and radii (C N, 2) int32; zeros where not kept."""

    @staticmethod
    def forward(ctx, means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d):
        dtype = means.dtype
        means, quats, scales, opacities, viewmats, Ks = (t.detach().to(dtype).contiguous() for t in
                                                         (means, quats, scales, opacities, viewmats, Ks))
        num_cameras, num_gaussians = viewmats.shape[0], quats.shape[0]
        pairs = num_cameras * num_gaussians
        keep = torch.empty(pairs, dtype=torch.uint8)
        means2d, conics = torch.empty((pairs, 2), dtype=dtype), torch.empty((pairs, 3), dtype=dtype)
        depths, radii = torch.empty(pairs, dtype=dtype), torch.empty((pairs, 2), dtype=torch.int32)
        per_camera = int(means.dim() == 3)
        _kernel("project_forward", dtype)(
            num_cameras, num_gaussians, per_camera, means.data_ptr(), quats.data_ptr(), scales.data_ptr(),
            opacities.data_ptr(), viewmats.data_ptr(), Ks.data_ptr(), width, height, near_plane, far_plane, eps2d,
            keep.data_ptr(), means2d.data_ptr(), conics.data_ptr(), depths.data_ptr(), radii.data_ptr())
        keep = keep.bool()
        ctx.save_for_backward(means, quats, scales, viewmats, Ks, keep)
        ctx.options = (width, height, eps2d, per_camera)
        ctx.mark_non_differentiable(keep, radii)
        return means2d, conics, depths, keep, radii

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_means2d, grad_conics, grad_depths, _keep, _radii):
        means, quats, scales, viewmats, Ks, keep = ctx.saved_tensors
        width, height, eps2d, per_camera = ctx.options
        dtype, pairs = means.dtype, keep.shape[0]
        grads = [torch.zeros((pairs,) + shape, dtype=dtype) if g is None else g.to(dtype).contiguous()
                 for g, shape in ((grad_means2d, (2,)), (grad_conics, (3,)), (grad_depths, ()))]
        grad_means, grad_quats, grad_scales = torch.zeros_like(means), torch.zeros_like(quats), torch.zeros_like(scales)
        keep_bytes = keep.to(torch.uint8)  # held: the kernel reads it
        _kernel("project_backward", dtype)(
            viewmats.shape[0], quats.shape[0], per_camera, means.data_ptr(), quats.data_ptr(), scales.data_ptr(),
            viewmats.data_ptr(), Ks.data_ptr(), width, height, eps2d, keep_bytes.data_ptr(),
            *(g.data_ptr() for g in grads), grad_means.data_ptr(), grad_quats.data_ptr(), grad_scales.data_ptr())
        return grad_means, grad_quats, grad_scales, None, None, None, None, None, None, None, None


def project_native(means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane,
                   eps2d) -> Projections:
    """:func:`~voxelsplat.splatting.projection.project_gaussians` with the C kernel: the
    kept pairs, sorted by (camera, depth, Gaussian index)."""
    num_gaussians = quats.shape[0]
    means2d, conics, depths, keep, radii = _Project.apply(means, quats, scales, opacities, viewmats, Ks, int(width),
                                                          int(height), float(near_plane), float(far_plane),
                                                          float(eps2d))
    with torch.no_grad():
        kept = keep.nonzero().squeeze(1)  # camera-major, then Gaussian index
        order = torch.sort(depths.index_select(0, kept), stable=True).indices
        order = order.index_select(0, torch.sort(kept.index_select(0, order) // num_gaussians, stable=True).indices)
        kept = kept.index_select(0, order)
        camera_ids, gaussian_ids = kept // num_gaussians, kept % num_gaussians
    return Projections(camera_ids, gaussian_ids, means2d.index_select(0, kept), conics.index_select(0, kept),
                       depths.index_select(0, kept), opacities.index_select(0, gaussian_ids),
                       radii.index_select(0, kept).long())


# Below this many box pixels (Gaussian-pixel candidates) a second thread costs more than it saves.
_PIXELS_PER_THREAD = 250_000


def _threads(num_cameras: int, box_pixels: int):
    """Camera ranges, one per thread."""
    threads = max(1, min(torch.get_num_threads(), num_cameras, box_pixels // _PIXELS_PER_THREAD))
    bounds = [round(num_cameras * k / threads) for k in range(threads + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(threads) if bounds[k + 1] > bounds[k]]


class _Composite(torch.autograd.Function):
    """(C, H, W, D) = front-to-back composite of ``source`` (K, D) over each projection's
    Gaussian footprint (``means2d`` (K, 2), ``conics`` (K, 3), ``opacities`` (K,))."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, source, cam_start, boxes, num_cameras, height, width):
        dtype = source.dtype
        means2d, conics, opacities, source = (t.detach().to(dtype).contiguous()
                                              for t in (means2d, conics, opacities, source))
        channels = source.shape[1]
        image = torch.empty((num_cameras, height, width, channels), dtype=dtype)
        transmittance = torch.empty((num_cameras, height, width), dtype=torch.float64)
        last = torch.empty((num_cameras, height, width), dtype=torch.int64)
        function = _kernel("composite_forward", dtype)
        common = [height, width, channels, cam_start.data_ptr(), means2d.data_ptr(), conics.data_ptr(),
                  opacities.data_ptr(), source.data_ptr(), boxes.data_ptr()]

        def run(cameras):
            function(*common, cameras[0], cameras[1], image.data_ptr(), transmittance.data_ptr(), last.data_ptr())

        box_pixels = int(((boxes[:, 1] - boxes[:, 0] + 1).clamp(min=0) * (boxes[:, 3] - boxes[:, 2] + 1).clamp(min=0)).sum())
        cameras = _threads(num_cameras, box_pixels)
        run_in_threads(run, cameras, len(cameras))
        ctx.save_for_backward(means2d, conics, opacities, source, cam_start, boxes, transmittance, last)
        ctx.shape = (num_cameras, height, width, channels)
        ctx.cameras = cameras
        return image

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_image):
        means2d, conics, opacities, source, cam_start, boxes, transmittance, last = ctx.saved_tensors
        num_cameras, height, width, channels = ctx.shape
        dtype = source.dtype
        grad_image = grad_image.to(dtype).contiguous()
        grad_means2d, grad_conics = torch.empty_like(means2d), torch.empty_like(conics)
        grad_opacities, grad_source = torch.empty_like(opacities), torch.zeros_like(source)
        scratch_T = torch.empty((num_cameras, height, width), dtype=torch.float64)
        scratch_sum = torch.empty((num_cameras, height, width, channels), dtype=dtype)
        scratch_stop = torch.empty((num_cameras, height, width), dtype=torch.int64)
        function = _kernel("composite_backward", dtype)
        common = [height, width, channels, cam_start.data_ptr(), means2d.data_ptr(), conics.data_ptr(),
                  opacities.data_ptr(), source.data_ptr(), boxes.data_ptr()]

        def run(cameras):
            function(*common, cameras[0], cameras[1], transmittance.data_ptr(), last.data_ptr(),
                     grad_image.data_ptr(), scratch_T.data_ptr(), scratch_sum.data_ptr(), scratch_stop.data_ptr(),
                     grad_means2d.data_ptr(),
                     grad_conics.data_ptr(), grad_opacities.data_ptr(), grad_source.data_ptr())

        run_in_threads(run, ctx.cameras, len(ctx.cameras))
        return grad_means2d, grad_conics, grad_opacities, grad_source, None, None, None, None, None


def rasterize_native(
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
    """The "native" backend of :func:`voxelsplat.splatting.rasterize_gaussians` (CPU tensors,
    float32 or float64; inputs validated there). Returns features (C, H, W, D), alphas
    (C, H, W) and accumulated depths (C, H, W)."""
    num_cameras = viewmats.shape[0]
    channels = features.shape[-1]
    proj = project_native(means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d)
    with torch.no_grad():
        boxes = torch.stack(pixel_boxes(proj, width, height), dim=-1).to(torch.int32).contiguous()
        counts = torch.bincount(proj.camera_ids, minlength=num_cameras)
        cam_start = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(torch.int64).contiguous()
    source = projection_source(features, proj)
    image = _Composite.apply(proj.means2d, proj.conics, proj.opacities, source, cam_start, boxes, num_cameras,
                             height, width)
    return image[..., :channels], image[..., channels + 1], image[..., channels]
