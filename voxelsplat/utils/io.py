"""Writing files so that nothing half-written is ever left under the final name, and reading
back what was written that way.

- :func:`atomic_write` (and ``_bytes`` / ``_text`` / ``_json``): a temporary file beside the
  target, renamed over it once complete. A process killed while writing leaves only its
  temporary (``.<name>.tmp-XXXXXXXX<suffix>``); the next write of the same target, or
  :func:`remove_stale_temporaries` on the folder, removes it.
- :func:`atomic_write_json` / :func:`read_json`: JSON that also holds NumPy arrays (exact:
  dtype, shape and bytes), for caches that must never run code when read (unlike a pickle).
- :func:`append_json_lines` / :func:`read_json_lines`: a JSON-lines log (``metrics.json``)
  whose every record is appended whole, and read back skipping a line a killed writer cut.
- :func:`folder_bytes`: the size of the files under a folder.
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import stat
import tempfile
import time
from typing import IO, Any, Iterable, Iterator, List, Optional

import numpy as np

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "read_json",
           "append_json_lines", "read_json_lines", "remove_stale_temporaries", "folder_bytes"]

logger = logging.getLogger(__name__)

# A temporary of target ``name``: ``.<name>.tmp-`` + tempfile's 8 random characters + the suffix.
_TEMPORARY_INFIX = ".tmp-"
_TEMPORARY_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-[a-z0-9_]{8}(?P<suffix>(\.[A-Za-z0-9_]+)*)$")
# Temporaries last modified before this process imported the module cannot be its own
# writes in progress: they are leftovers of a process that died while writing.
_PROCESS_START = time.time()
# Tag of a NumPy array in the JSON written by atomic_write_json.
_ARRAY_TAG = "__ndarray__"
_ARRAY_KEYS = {_ARRAY_TAG, "dtype", "shape"}
# Array kinds read back: bool, integers, floats, complex (never object or void, which can hold anything).
_ARRAY_KINDS = "biufc"


def remove_stale_temporaries(folder: str, target: Optional[str] = None) -> List[str]:
    """Remove the temporaries that :func:`atomic_write` calls of processes that died while
    writing: files named ``.<name>.tmp-XXXXXXXX<suffix>`` in ``folder`` last modified before
    this process started (a writer still running, here or elsewhere, keeps its file).

    Args:
        folder: where to look (not recursive).
        target: only the temporaries of this file name (a basename); all when None.
    Returns:
        the paths removed.
    """
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        match = _TEMPORARY_NAME.match(name)
        if match is None or (target is not None and match.group("target") != target):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isfile(path) and not os.path.islink(path) and os.stat(path).st_mtime < _PROCESS_START:
                os.remove(path)
                removed.append(path)
        except FileNotFoundError:  # removed meanwhile by another process
            continue
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted write: %s", len(removed), removed)
    return removed


def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: str) -> int:
    """Permissions for the file that replaces ``path``: those of the file it replaces, else what
    ``open`` would give a new file (0o666 less the umask), not the 0o600 of a temporary file,
    which would hide checkpoints and logs from the rest of a group."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", suffix: str = "") -> Iterator[IO]:
    """Open a temporary file beside ``path`` (creating the folder); on a clean exit it is
    flushed, synced and renamed onto ``path`` (an atomic replace, keeping the permissions of the
    file replaced, else those ``open`` would give), on an exception removed, and ``path`` is
    left as it was. Temporaries of ``path`` left by a process killed while writing
    it are removed first (see :func:`remove_stale_temporaries`).

    Args:
        path: the final file.
        mode: ``"wb"`` or ``"w"``.
        suffix: of the temporary name (e.g. ``".pth"``), for tools that look at extensions.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write({path}): mode must be 'wb' or 'w', got {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder, target=os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{_TEMPORARY_INFIX}", suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, _new_file_mode(path))
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


def _to_json(value: Any) -> Any:
    """JSON-ready copy of ``value``: NumPy arrays tagged with dtype, shape and base64 bytes,
    NumPy scalars as Python numbers, tuples as lists."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _ARRAY_KINDS:
            raise TypeError(f"a NumPy array of dtype {value.dtype} cannot be written as JSON "
                            f"(only bool, integer, float and complex arrays)")
        return {_ARRAY_TAG: base64.b64encode(value.tobytes(order="C")).decode("ascii"),
                "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError(f"JSON object keys must be str, got {sorted({type(k).__name__ for k in value})}")
        if _ARRAY_TAG in value:
            raise TypeError(f"a dict with the key {_ARRAY_TAG!r} would read back as a NumPy array")
        return {key: _to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"a {type(value).__name__} cannot be written as JSON")


def _from_json(obj: dict) -> Any:
    """``json`` object hook: a tagged NumPy array back to the array (a writable copy)."""
    if _ARRAY_TAG not in obj:
        return obj
    if set(obj) != _ARRAY_KEYS:
        raise ValueError(f"a tagged array holds the keys {sorted(obj)}, expected {sorted(_ARRAY_KEYS)}")
    dtype = np.dtype(str(obj["dtype"]))
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None:
        raise ValueError(f"a tagged array has dtype {obj['dtype']!r}; only bool, integer, float and complex are read")
    shape = tuple(int(s) for s in obj["shape"])
    data = base64.b64decode(obj[_ARRAY_TAG], validate=True)
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def atomic_write_json(path: str, obj: Any) -> None:
    """Write ``obj`` (dicts with str keys, lists, tuples, str, numbers, bool, None and NumPy
    arrays / scalars) as JSON, atomically. :func:`read_json` gives it back with every array
    exact (dtype, shape, bytes); tuples come back as lists, NumPy scalars as Python numbers.

    Raises:
        TypeError: ``obj`` holds something else (the file is not written).
    """
    try:
        text = json.dumps(_to_json(obj), separators=(",", ":"))
    except TypeError as error:
        raise TypeError(f"cannot write {path!r}: {error}") from error
    atomic_write_text(path, text)


def read_json(path: str) -> Any:
    """Read a file of :func:`atomic_write_json` (or any JSON file). Reading JSON never runs
    code, whatever the file holds.

    Raises:
        OSError: the file cannot be read. ValueError: it is not JSON, or a tagged array in it
        is malformed; the message names the file.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw, object_hook=_from_json)
    except (ValueError, TypeError, KeyError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path!r} is not a readable JSON file ({type(error).__name__}: {error})") from error


def append_json_lines(path: str, records: Iterable[dict]) -> None:
    """Append ``records`` to the JSON-lines file ``path``, one sorted-key JSON object a line, with
    a single ``write`` on a descriptor opened for appending, then ``fsync``: a reader sees each
    batch whole or not at all, and the file is only created once there is a record to hold (a
    process killed before never leaves an empty file). A last line cut by an earlier crash is
    ended first, so the new records start on lines of their own.
    """
    text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
    if not text:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    text = "\n" + text
        data = text.encode()
        while data:
            written = os.write(fd, data)
            data = data[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_lines(path: str) -> List[Any]:
    """The records of a JSON-lines file (such as detectron2's ``metrics.json``), in order.

    Blank lines are skipped, and so are lines that are not JSON (a record cut by a process
    killed while appending, possibly followed on the same line by the next run's first
    record), with one warning naming the file and the lines. An empty file gives ``[]``.

    Raises:
        OSError: the file cannot be read.
    """
    records, unreadable = [], []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                unreadable.append(number)
    if unreadable:
        logger.warning("%s: skipped %d line(s) that are not JSON (a write cut short): line(s) %s", path,
                       len(unreadable), unreadable[:10])
    return records


def folder_bytes(folder: str) -> int:
    """Bytes of the files under ``folder``, recursively (a link counts as itself, not its
    target; a file removed while walking counts 0)."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except FileNotFoundError:
                pass
    return total
