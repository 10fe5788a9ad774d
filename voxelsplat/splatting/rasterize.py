"""One public entry point, :func:`rasterize_gaussians`, with interchangeable backends."""
from __future__ import annotations

import logging
from typing import Dict, Tuple

import importlib

import torch

from .errors import BackendUnavailableError

BACKENDS = ("auto", "torch", "native", "gsplat", "inria")
# backend -> (module, function) of its rasterizer, imported when first used
_RASTERIZERS = {
    "torch": (".torch_backend", "rasterize_torch"),
    "native": (".native_backend", "rasterize_native"),
    "gsplat": (".gsplat_backend", "rasterize_gsplat"),
    "inria": (".inria_backend", "rasterize_inria"),
}

logger = logging.getLogger(__name__)
# device string -> whether gsplat rasterized a probe scene there (checked once per process).
_GSPLAT_WORKS: Dict[str, bool] = {}


def _check_inputs(means, quats, scales, opacities, features, viewmats, Ks, width, height) -> None:
    if means.dim() not in (2, 3) or means.shape[-1] != 3:
        raise ValueError(f"rasterize_gaussians: means must be (N, 3) or (C, N, 3), got {tuple(means.shape)}")
    n = means.shape[-2]
    expected = {"quats": (quats, (n, 4)), "scales": (scales, (n, 3)), "opacities": (opacities, (n,))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"rasterize_gaussians: {name} must be {shape} for N={n} Gaussians, got {tuple(tensor.shape)}")
    if viewmats.dim() != 3 or viewmats.shape[1:] != (4, 4):
        raise ValueError(f"rasterize_gaussians: viewmats must be (C, 4, 4), got {tuple(viewmats.shape)}")
    c = viewmats.shape[0]
    if means.dim() == 3 and means.shape[0] != c:
        raise ValueError(f"rasterize_gaussians: per-camera means must be ({c}, N, 3) for C={c} cameras, "
                         f"got {tuple(means.shape)}")
    if tuple(Ks.shape) != (c, 3, 3):
        raise ValueError(f"rasterize_gaussians: Ks must be ({c}, 3, 3) for C={c} cameras, got {tuple(Ks.shape)}")
    if not ((features.dim() == 2 and features.shape[0] == n) or (features.dim() == 3 and features.shape[:2] == (c, n))):
        raise ValueError(
            f"rasterize_gaussians: features must be (N, D) or (C, N, D) with N={n}, C={c}, got {tuple(features.shape)}")
    if features.shape[-1] < 1:
        raise ValueError("rasterize_gaussians: features need at least one channel")
    if int(width) != width or int(height) != height or width < 1 or height < 1:
        raise ValueError(f"rasterize_gaussians: width and height must be positive integers, got {width} x {height}")
    tensors = {"means": means, "quats": quats, "scales": scales, "opacities": opacities, "features": features,
               "viewmats": viewmats, "Ks": Ks}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise TypeError(f"rasterize_gaussians: {name} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.device != means.device:
            raise ValueError(f"rasterize_gaussians: {name} is on {tensor.device} but means are on {means.device}")


def _gsplat_works(device: torch.device) -> bool:
    """Whether gsplat's CUDA rasterizer runs on ``device`` (probed once with a tiny scene)."""
    key = str(device)
    if key not in _GSPLAT_WORKS:
        try:
            from .gsplat_backend import rasterize_gsplat

            eye = torch.eye(4, device=device)[None]
            K = torch.tensor([[[8.0, 0, 4], [0, 8.0, 4], [0, 0, 1]]], device=device)
            one = torch.ones(1, device=device)
            rasterize_gsplat(torch.tensor([[0.0, 0, 2]], device=device), torch.tensor([[1.0, 0, 0, 0]], device=device),
                             torch.full((1, 3), 0.1, device=device), one * 0.5, torch.ones(1, 1, device=device),
                             eye, K, 8, 8, 0.01, 1e10, 0.3)
            _GSPLAT_WORKS[key] = True
        except Exception as error:  # noqa: BLE001  (any failure means: fall back to torch)
            logger.warning("gsplat rasterization does not work on %s (%s: %s); backend='auto' uses the torch backend",
                           device, type(error).__name__, error)
            _GSPLAT_WORKS[key] = False
    return _GSPLAT_WORKS[key]


def _native_works() -> bool:
    """Whether the native CPU rasterizer kernels build here (tried once per process)."""
    from .native_backend import RASTERIZE

    return RASTERIZE.load() is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that :func:`rasterize_gaussians` will run for ``backend`` on ``device``.

    Raises :class:`BackendUnavailableError` (with install instructions) when a named
    backend cannot run here; ``"auto"`` never raises.
    """
    if backend not in BACKENDS:
        raise ValueError(f"rasterize_gaussians: unknown backend {backend!r}; expected one of {BACKENDS}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            return "gsplat" if _gsplat_works(device) else "torch"
        return "native" if device.type == "cpu" and _native_works() else "torch"
    if backend == "native":
        if device.type != "cpu":
            raise BackendUnavailableError(
                f"backend='native' runs on CPU tensors only (got tensors on {device}); use backend='gsplat' or "
                "'torch' on a GPU")
        from .native_backend import RASTERIZE
        from voxelsplat.utils.native import NativeBuildError

        try:
            RASTERIZE.load(required=True)
        except NativeBuildError as error:
            raise BackendUnavailableError(
                f"backend='native' needs a C compiler to build its kernel (apt install gcc, or set $CC): {error}"
            ) from error
    if backend == "gsplat":
        try:
            import gsplat  # noqa: F401
        except ImportError as error:
            raise BackendUnavailableError(
                "backend='gsplat' needs the gsplat package and a CUDA GPU: pip install gsplat==1.5.3 "
                f"(import failed: {error})") from error
        if device.type != "cuda":
            raise BackendUnavailableError(
                f"backend='gsplat' runs on CUDA tensors only (got tensors on {device}); move the inputs to a CUDA GPU "
                "or use backend='torch' (pip install gsplat==1.5.3 on a machine with a CUDA GPU)")
    if backend == "inria":
        from .inria_backend import import_inria_rasterizer

        import_inria_rasterizer()  # raises BackendUnavailableError with install instructions
        if device.type != "cuda":
            raise BackendUnavailableError(
                f"backend='inria' runs on CUDA tensors only (got tensors on {device}); use backend='torch' on CPU")
    return backend


def rasterize_gaussians(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    features: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render 3D Gaussians with arbitrary feature channels into C pinhole cameras.

    Differentiable with respect to ``means``, ``quats``, ``scales``, ``opacities`` and
    ``features`` (not the cameras). The semantics are those of gsplat 1.5.3's
    ``rasterization(..., sh_degree=None, packed=False, rasterize_mode="classic",
    render_mode="RGB+D")``:

    - EWA splatting: the 3D covariance ``(R S)(R S)^T`` is projected with the
      Jacobian of the pinhole projection at the camera-frame mean (its ``x/z``,
      ``y/z`` clamped to 1.3x the field of view) and ``eps2d`` is added to the
      diagonal of the 2D covariance, without antialiasing compensation;
    - a pixel (j, i) is sampled at its centre ``(j + 0.5, i + 0.5)``; a Gaussian's
      alpha there is ``min(0.999, opacity * exp(-sigma))`` with
      ``sigma = 0.5 d^T Sigma2d^-1 d``, and it is skipped where ``sigma < 0`` or
      ``alpha < 1/255``;
    - Gaussians are composited front to back by camera-frame depth z with weights
      ``w_i = alpha_i * T_i``, ``T_i = prod_{j<i} (1 - alpha_j)``; a pixel stops before
      the Gaussian that would bring its transmittance to ``<= 1e-4``;
    - Gaussians with ``z < near_plane`` or ``z > far_plane``, opacity below 1/255, or a
      screen-space box (``min(3.33, sqrt(2 ln(255 opacity)))`` standard deviations) fully
      off-screen are culled — the box bounds every pixel where alpha could reach 1/255,
      so culling never changes an image.

    Args:
        means: (N, 3) Gaussian centres in the world frame, metres; or (C, N, 3), a position
            per camera (e.g. Gaussians moved to each view's time).
        quats: (N, 4) rotations as quaternions (w, x, y, z); normalised internally.
        scales: (N, 3) standard deviations along the Gaussian's local axes, metres.
        opacities: (N,) opacities in [0, 1].
        features: (N, D) per-Gaussian features, or (C, N, D) per camera; any D >= 1.
        viewmats: (C, 4, 4) world -> camera transforms, OpenCV camera frame
            (x right, y down, z forward).
        Ks: (C, 3, 3) pinhole intrinsics in pixels (fx, fy, cx, cy), for images of
            ``width`` x ``height`` pixels.
        width, height: image size in pixels.
        near_plane, far_plane: depth range (metres, camera z) of the Gaussians kept.
        eps2d: added to the diagonal of each projected 2D covariance (pixels^2).
        backend: "torch" (pure PyTorch, CPU or GPU, the reference), "native" (projection
            and compositing in C on CPU threads; CPU tensors, float32/float64; built on
            first use with the system C compiler), "gsplat"
            (gsplat's CUDA kernels), "inria" (the Inria CUDA rasterizer, 3 channels per
            pass; hard-coded eps2d 0.3, near plane 0.2 m and alpha cap 0.99 of its own),
            or "auto" (gsplat on CUDA when it works, native on CPU when it builds, else
            torch).

    Returns:
        A tuple:

        - **features**: (C, H, W, D) ``sum_i w_i f_i`` (no background).
        - **alphas**: (C, H, W) ``1 - T`` after the last composited Gaussian.
        - **depths**: (C, H, W) accumulated depth ``sum_i w_i z_i`` (gsplat's "D";
          divide by ``alphas`` for the expected depth).

    Raises:
        BackendUnavailableError: the requested backend cannot run here (the message
            says how to install it).
    """
    _check_inputs(means, quats, scales, opacities, features, viewmats, Ks, width, height)
    width, height = int(width), int(height)
    chosen = resolve_backend(backend, means.device)
    if chosen == "native" and means.dtype not in (torch.float32, torch.float64):
        if backend == "native":
            raise ValueError(f"rasterize_gaussians: backend='native' takes float32 or float64 inputs, got {means.dtype}")
        chosen = "torch"
    module, function = _RASTERIZERS[chosen]
    rasterize = getattr(importlib.import_module(module, __package__), function)
    options = (width, height, near_plane, far_plane, eps2d)
    if means.dim() == 3 and chosen == "inria":
        # The Inria rasterizer takes one position per Gaussian: one call per camera (gsplat
        # renders the (C, N, 3) form in one call, a camera per batch element).
        per_camera = [rasterize(means[c], quats, scales, opacities, features[c] if features.dim() == 3 else features,
                                viewmats[c:c + 1], Ks[c:c + 1], *options) for c in range(viewmats.shape[0])]
        return tuple(torch.cat(parts) for parts in zip(*per_camera))
    return rasterize(means, quats, scales, opacities, features, viewmats, Ks, *options)
