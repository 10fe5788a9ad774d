"""The compiled CPU ray walk behind :func:`voxelsplat.evaluation.cast_rays`.

``csrc/ray_walk.c`` is plain C (no Python or PyTorch headers), built on first use with the
system C compiler (``$CC``, else ``cc``) into a cache folder and loaded with :mod:`ctypes`;
a build takes well under a second. The folder is ``$VOXELSPLAT_NATIVE_DIR``, else
``$XDG_CACHE_HOME/voxelsplat/native`` (``~/.cache/voxelsplat/native``); the library's file
name carries a hash of the source, the compiler and the flags, so an edited source is
rebuilt and concurrent processes never see a half-written file (build in a temporary
file, then rename).

Where no compiler is found or the build fails, :func:`ray_walk_library` returns None
(and says why once in the log) and ``cast_rays`` walks with PyTorch instead.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

__all__ = ["NativeBuildError", "library_path", "native_cache_dir", "ray_walk_library", "native_ray_walk"]

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "ray_walk.c")
_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC"]
_LOCK = threading.Lock()
_LIBRARY: Optional[ctypes.CDLL] = None
_FAILURE: Optional[str] = None
# rays per task handed to a thread: small enough to balance short (downward) and long rays
_CHUNK = 4096


class NativeBuildError(RuntimeError):
    """The C ray walk could not be built or loaded (no compiler, compiler error, bad file)."""


def native_cache_dir() -> str:
    """Folder holding the built libraries (see the module docstring)."""
    if os.environ.get("VOXELSPLAT_NATIVE_DIR"):
        return os.environ["VOXELSPLAT_NATIVE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "voxelsplat", "native")


def _compiler() -> str:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise NativeBuildError(f"no C compiler: '{compiler}' is not on PATH (set $CC, or install gcc)")
    return compiler


def _build(compiler: str, target: str) -> None:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".partial",
                                   dir=os.path.dirname(target))
    os.close(fd)
    try:
        command = [compiler, *_FLAGS, "-o", partial, _SOURCE, "-lm"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeBuildError(f"building {_SOURCE} failed ({' '.join(command)}):\n{done.stderr.strip()}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def library_path() -> str:
    """Where the library built from the current source with the current compiler lives."""
    compiler = _compiler()
    try:
        with open(_SOURCE, "rb") as f:
            source = f.read()
    except OSError as e:
        raise NativeBuildError(f"the C source of the ray walk is missing: {_SOURCE} ({e})") from e
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), version.encode(),
                                     sys.platform.encode()])).hexdigest()[:16]
    return os.path.join(native_cache_dir(), f"ray_walk_{key}.so")


def _load(rebuild: bool = False) -> ctypes.CDLL:
    compiler = _compiler()
    target = library_path()
    if rebuild or not os.path.exists(target):
        _build(compiler, target)
    try:
        library = ctypes.CDLL(target)
    except OSError as e:
        if rebuild:
            raise NativeBuildError(f"cannot load the built ray walk {target}: {e}") from e
        return _load(rebuild=True)  # a damaged cache file: build it again
    function = library.voxelsplat_ray_walk
    i64, p = ctypes.c_int64, ctypes.c_void_p
    function.argtypes = [p, i64, i64, i64, ctypes.c_int32, p, i64, p, i64, i64, i64, i64, p, p, p]
    function.restype = ctypes.c_int
    return library


def ray_walk_library(required: bool = False) -> Optional[ctypes.CDLL]:
    """The loaded C ray walk, built if needed; None where it cannot be built (the reason
    is logged once), or :class:`NativeBuildError` with ``required``."""
    global _LIBRARY, _FAILURE
    with _LOCK:
        if _LIBRARY is None and _FAILURE is None:
            try:
                _LIBRARY = _load()
            except (NativeBuildError, OSError) as e:
                _FAILURE = str(e)
                logger.warning("RayIoU ray casting falls back to the PyTorch walk (slower): %s", _FAILURE)
    if _LIBRARY is None and required:
        raise NativeBuildError(_FAILURE)
    return _LIBRARY


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

    def walk(first: int) -> None:  # ctypes releases the GIL for the call: threads run in parallel
        library.voxelsplat_ray_walk(*pointers, first, min(first + _CHUNK, num_rays), *outputs)

    threads = max(1, int(threads if threads is not None else torch.get_num_threads()))
    starts = range(0, num_rays, _CHUNK)
    if threads == 1 or len(starts) == 1:
        for first in starts:
            walk(first)
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(starts))) as pool:
            list(pool.map(walk, starts))
    return out_index, out_depth, out_hit.bool()
