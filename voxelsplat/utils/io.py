"""Writing files so that nothing half-written is ever left under the final name."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text"]


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", suffix: str = "") -> Iterator[IO]:
    """Open a temporary file beside ``path`` (creating the folder); on a clean exit it is
    flushed, synced and renamed onto ``path`` (an atomic replace), on an exception removed, and
    ``path`` is left as it was.

    Args:
        path: the final file.
        mode: ``"wb"`` or ``"w"``.
        suffix: of the temporary name (e.g. ``".pth"``), for tools that look at extensions.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write({path}): mode must be 'wb' or 'w', got {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)
