"""Differentiable Gaussian rasterization behind one function, :func:`rasterize_gaussians`.

Backends: "torch" (pure PyTorch, CPU and GPU, the reference), "native" (C kernels on
CPU, built on first use), "gsplat" (CUDA), "inria" (CUDA, where importable) and "auto".
Within voxelsplat this package uses only ``voxelsplat.utils.native`` (building the C
kernels).
"""
from .rasterize import BACKENDS, BackendUnavailableError, rasterize_gaussians, resolve_backend

__all__ = ["BACKENDS", "BackendUnavailableError", "rasterize_gaussians", "resolve_backend"]
