"""Differentiable Gaussian rasterization behind one function, :func:`rasterize_gaussians`.

Backends: "torch" (pure PyTorch, CPU and GPU, the reference), "gsplat" (CUDA),
"inria" (CUDA, where importable) and "auto". This package depends on nothing else
in voxelsplat.
"""
from .rasterize import BACKENDS, BackendUnavailableError, rasterize_gaussians, resolve_backend

__all__ = ["BACKENDS", "BackendUnavailableError", "rasterize_gaussians", "resolve_backend"]
