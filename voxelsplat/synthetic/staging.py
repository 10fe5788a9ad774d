"""Building a folder beside its final place and swapping it in, so that the final folder is
always either the previous complete version or the new complete one.

The staging folder is ``<output>.partial-<pid>-<random>`` and, where the previous version
cannot be exchanged with the new one in one step, the previous version waits in
``<output>.old-<pid>-<random>/`` until the new one is in place. Both names are created here
with ``mkdir``, so no folder of anyone else is ever used or removed. Such folders that a killed
run left behind are reported, never removed.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import logging
import os
import secrets
import shutil
import sys
from typing import Iterator, List, Optional

logger = logging.getLogger(__name__)

__all__ = ["staged_folder", "stale_folders"]

STAGE_TAG = ".partial"
PREVIOUS_TAG = ".old"

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _refuse_existing(output: str, overwrite: bool) -> None:
    if not os.path.lexists(output):
        return
    if not os.path.isdir(output):
        raise FileExistsError(f"output {output!r} exists and is not a folder")
    if not overwrite and os.listdir(output):
        raise FileExistsError(f"output folder {output!r} exists and is not empty; pass overwrite=True "
                              f"(--overwrite) to replace it")


def _new_folder(prefix: str) -> str:
    """Create ``<prefix>-<pid>-<random>`` (never an existing folder) and return its path."""
    while True:
        path = f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return False  # no harmless probe: report the folder, which is at worst a false alarm
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_folders(output: str) -> List[str]:
    """Staging and previous-version folders of ``output`` that no running process owns:
    left by a run that was killed (also the plain ``<output>.partial`` of older versions)."""
    output = os.path.abspath(output).rstrip(os.sep)
    found = [output + STAGE_TAG] if os.path.isdir(output + STAGE_TAG) else []
    for tag in (STAGE_TAG, PREVIOUS_TAG):
        for path in sorted(glob.glob(glob.escape(output + tag) + "-*-*")):
            pid = path[len(output + tag) + 1:].split("-")[0]
            if not os.path.isdir(path) or not pid.isdigit():
                continue
            if int(pid) == os.getpid() or not _pid_alive(int(pid)):
                found.append(path)
    return found


def _report_stale(output: str) -> None:
    for path in stale_folders(output):
        if os.path.basename(path).startswith(os.path.basename(output) + PREVIOUS_TAG):
            what = f"holds the previous version of {output} from a run that was killed while replacing it"
        else:
            what = f"looks left behind by a run that was killed while writing {output}"
        logger.warning("%s %s; it is neither used nor removed. Remove it when it is not needed: rm -rf '%s'",
                       path, what, path)


def _renameat2(source: str, target: str, flags: int) -> bool:
    """Linux's renameat2(2); False where the system or the file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), source, None, target)


def _remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _restore(output: str, stage: str, previous: Optional[str]) -> None:
    """After an interruption at any step of :func:`_swap`: put the previous version back where
    it was moved aside, and remove what this run created."""
    waiting = os.path.join(previous, os.path.basename(output)) if previous else None
    if waiting and os.path.lexists(waiting) and not os.path.lexists(output):
        os.rename(waiting, output)
    _remove(stage)  # the new version, or the previous one after an exchange
    if previous:
        _remove(previous)


def _swap(stage: str, output: str, overwrite: bool) -> None:
    if not os.path.lexists(output):
        try:
            if not _renameat2(stage, output, _RENAME_NOREPLACE):
                os.rename(stage, output)
            return
        except FileExistsError:
            pass  # it appeared while the dataset was built
    _refuse_existing(output, overwrite)  # it may have been filled while the dataset was built
    if _renameat2(stage, output, _RENAME_EXCHANGE):
        _remove(stage)  # now the previous version
        return
    # no atomic exchange: the previous version waits in a folder of its own for a moment
    previous = None
    try:
        previous = _new_folder(output + PREVIOUS_TAG)
        os.rename(output, os.path.join(previous, os.path.basename(output)))
        os.rename(stage, output)
        _remove(previous)
    except BaseException:
        _restore(output, stage, previous)
        raise


@contextlib.contextmanager
def staged_folder(output: str, overwrite: bool = False) -> Iterator[str]:
    """A new empty folder beside ``output`` to build into. On a clean exit it takes the place of
    ``output`` (replacing an existing folder only with ``overwrite``; an empty one always); on
    any exception, ``KeyboardInterrupt`` and ``SystemExit`` included, it is removed and
    ``output`` is left as it was.

    Where Linux's ``renameat2(RENAME_EXCHANGE)`` is available the swap is one atomic step;
    elsewhere the previous version is moved aside and back should the swap fail, so only a
    process killed between two renames leaves ``output`` missing (the previous version then
    waits in ``<output>.old-<pid>-<random>/`` and the next run names it).

    Args:
        output: the final folder (its parent is created).
        overwrite: replace an existing non-empty ``output``.
    Yields:
        the absolute path of the staging folder, ``<output>.partial-<pid>-<random>``.
    """
    output = os.path.abspath(output).rstrip(os.sep)
    _refuse_existing(output, overwrite)
    _report_stale(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    stage = None
    try:
        stage = _new_folder(output + STAGE_TAG)
        yield stage
        _swap(stage, output, overwrite)
    except BaseException:
        if stage is not None:
            _remove(stage)
        raise
