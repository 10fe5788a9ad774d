"""The compiled CPU ray walk behind :func:`voxelsplat.evaluation.cast_rays`.

``csrc/ray_walk.c`` is built on first use and loaded with :mod:`ctypes`
(:class:`voxelsplat.utils.native.NativeLibrary`: cache folder, rebuilds, errors). Where it
cannot be built, :func:`ray_walk_library` returns None (the reason is logged once) and
``cast_rays`` walks with PyTorch instead.
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import torch

from voxelsplat.utils.native import NativeBuildError, NativeLibrary, run_in_threads

__all__ = ["NativeBuildError", "RAY_WALK", "ray_walk_library", "native_ray_walk"]

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
RAY_WALK = NativeLibrary(
    "ray_walk",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "ray_walk.c"),
    {"voxelsplat_ray_walk": ([_ptr, _i64, _i64, _i64, ctypes.c_int32, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64,
                              _ptr, _ptr, _ptr], ctypes.c_int)},
    fallback="RayIoU ray casting falls back to the PyTorch walk (slower)",
)
# rays per task handed to a thread: small enough to balance short (downward) and long rays
_CHUNK = 4096


def ray_walk_library(required: bool = False) -> Optional[ctypes.CDLL]:
    """The loaded C ray walk, built if needed; None where it cannot be built, or
    :class:`NativeBuildError` with ``required``."""
    return RAY_WALK.load(required)


def native_ray_walk(code: torch.Tensor, shape, num_volumes: int, origins: torch.Tensor, directions: torch.Tensor,
                    threads: Optional[int] = None):
    """Walk every ray with the C kernel.

    ``code``: (X+2, Y+2, Z+2) uint8 padded codes (CPU); ``origins``: (K, 3) voxel units;
    ``directions``: (Kd, R, 3) unit vectors, Kd = 1 or K. Returns voxel index (V, K * R)
    int64, depth (V, K * R) float64 in voxel units, hit (V, K * R) bool."""
    library = ray_walk_library(required=True)
    X, Y, Z = (int(n) for n in shape)
    code = code.contiguous()
    origins = origins.to(torch.float64).contiguous()
    directions = directions.to(torch.float64).contiguous()
    K, (Kd, R) = origins.shape[0], directions.shape[:2]
    num_rays = K * R
    out_index = torch.empty((num_volumes, num_rays), dtype=torch.int64)
    out_depth = torch.empty((num_volumes, num_rays), dtype=torch.float64)
    out_hit = torch.empty((num_volumes, num_rays), dtype=torch.uint8)
    pointers = [code.data_ptr(), X, Y, Z, num_volumes, origins.data_ptr(), K, directions.data_ptr(), Kd, R]
    outputs = [out_index.data_ptr(), out_depth.data_ptr(), out_hit.data_ptr()]

    def walk(first: int) -> None:
        library.voxelsplat_ray_walk(*pointers, first, min(first + _CHUNK, num_rays), *outputs)

    threads = max(1, int(threads if threads is not None else torch.get_num_threads()))
    run_in_threads(walk, range(0, num_rays, _CHUNK), threads)
    return out_index, out_depth, out_hit.bool()
