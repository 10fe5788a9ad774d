"""Small C kernels built on first use and loaded with :mod:`ctypes`.

A kernel is plain C (no Python or PyTorch headers) in a ``csrc/`` folder next to the
module that uses it; :class:`NativeLibrary` compiles it with the system C compiler
(``$CC``, else ``cc``) into a cache folder, in well under a second. The folder is
``$VOXELSPLAT_NATIVE_DIR``, else ``$XDG_CACHE_HOME/voxelsplat/native``
(``~/.cache/voxelsplat/native``). The library's file name carries a hash of the sources,
the compiler and the flags, so an edited source is rebuilt; a build goes to a temporary
file that is renamed into place, so concurrent processes never load a half-written
library, and a damaged cached file is rebuilt.

Where no compiler is found or the build fails, :meth:`NativeLibrary.load` returns None
and logs, once, why and what runs instead; callers keep a PyTorch fallback.
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
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["NativeBuildError", "NativeLibrary", "native_cache_dir", "run_in_threads"]

logger = logging.getLogger(__name__)

_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC"]


class NativeBuildError(RuntimeError):
    """A C kernel could not be built or loaded (no compiler, compiler error, bad file)."""


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


class NativeLibrary:
    """One C source file (plus the headers beside it) built into a shared library.

    Args:
        name: file-name stem of the built library.
        source: path of the ``.c`` file; every ``.h`` in its folder is part of the build key.
        functions: exported function name -> (argtypes, restype).
        fallback: what runs instead when the library cannot be built (for the log).
    """

    def __init__(self, name: str, source: str, functions: Dict[str, Tuple[Sequence, object]], fallback: str):
        self.name = name
        self.source = source
        self.functions = functions
        self.fallback = fallback
        self._lock = threading.Lock()
        self._library: Optional[ctypes.CDLL] = None
        self._failure: Optional[str] = None

    def _sources(self) -> List[str]:
        folder = os.path.dirname(self.source)
        headers = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".h")) \
            if os.path.isdir(folder) else []
        return [self.source] + headers

    def path(self) -> str:
        """Where the library built from the current sources with the current compiler lives."""
        compiler = _compiler()
        parts = []
        for path in self._sources():
            try:
                with open(path, "rb") as f:
                    parts.append(f.read())
            except OSError as e:
                raise NativeBuildError(f"a C source of {self.name} is missing: {path} ({e})") from e
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        parts += [" ".join(_FLAGS).encode(), version.encode(), sys.platform.encode()]
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
        return os.path.join(native_cache_dir(), f"{self.name}_{key}.so")

    def _build(self, target: str) -> None:
        compiler = _compiler()
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".partial",
                                       dir=os.path.dirname(target))
        os.close(fd)
        try:
            command = [compiler, *_FLAGS, "-o", partial, self.source, "-lm"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise NativeBuildError(f"building {self.source} failed ({' '.join(command)}):\n{done.stderr.strip()}")
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    def _open(self, rebuild: bool = False) -> ctypes.CDLL:
        target = self.path()
        if rebuild or not os.path.exists(target):
            self._build(target)
        try:
            library = ctypes.CDLL(target)
        except OSError as e:
            if rebuild:
                raise NativeBuildError(f"cannot load the built library {target}: {e}") from e
            return self._open(rebuild=True)  # a damaged cache file: build it again
        for function_name, (argtypes, restype) in self.functions.items():
            function = getattr(library, function_name)
            function.argtypes = list(argtypes)
            function.restype = restype
        return library

    def load(self, required: bool = False) -> Optional[ctypes.CDLL]:
        """The loaded library, built if needed; None where it cannot be built (the reason
        is logged once), or :class:`NativeBuildError` with ``required``."""
        with self._lock:
            if self._library is None and self._failure is None:
                try:
                    self._library = self._open()
                except (NativeBuildError, OSError) as e:
                    self._failure = str(e)
                    logger.warning("%s: %s", self.fallback, self._failure)
        if self._library is None and required:
            raise NativeBuildError(self._failure)
        return self._library


def run_in_threads(task: Callable[[int], None], items: Iterable[int], threads: int) -> None:
    """``task(item)`` for every item, on up to ``threads`` threads (ctypes calls release the GIL)."""
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        for item in items:
            task(item)
        return
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        list(pool.map(task, items))
