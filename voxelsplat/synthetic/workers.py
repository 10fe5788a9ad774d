"""Worker processes that end with the process that started them.

A ``ProcessPoolExecutor`` worker whose parent is killed (``kill -9``, the OOM killer) would
wait on its task queue forever under PID 1: it holds a write end of that queue's pipe itself,
so it never reads end-of-file. Each worker here asks Linux to send it SIGTERM when its parent
dies (``PR_SET_PDEATHSIG``) and, on every system, watches its parent's id from a thread; its
SIGTERM and SIGHUP do what they do by default (a forked worker would otherwise inherit its
parent's handlers, or an ignored SIGTERM). SIGINT is left to the parent, which ends its
workers itself.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, List, Optional, TypeVar

__all__ = ["ordered_map"]

PARENT_POLL_SECONDS = 0.5
# how long ended workers get to exit on SIGTERM before SIGKILL
TERMINATE_TIMEOUT_SECONDS = 5.0

_PR_SET_PDEATHSIG = 1

Item = TypeVar("Item")
Result = TypeVar("Result")


def _set_parent_death_signal(signum: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the watchdog thread still ends the worker


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)


def _start_worker(parent_pid: int) -> None:
    """Initializer of every worker; ``parent_pid`` is the pool owner's pid."""
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the death signal was set
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def _end_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the running workers now (SIGTERM, then SIGKILL):
    ``shutdown()`` alone would let every running task finish, and keep writing, first."""
    processes = list((pool._processes or {}).values())  # no public accessor before Python 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(TERMINATE_TIMEOUT_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()


def ordered_map(fn: Callable[[Item], Result], items: Iterable[Item], workers: int,
                on_result: Optional[Callable[[Result], None]] = None) -> List[Result]:
    """``[fn(item) for item in items]`` computed by ``workers`` processes (forked where the
    system can), in order; ``on_result`` is called with each result as it arrives.

    The workers end when this process dies, however it dies. When a task raises, or this
    process is interrupted (``KeyboardInterrupt``, ``SystemExit`` from a signal handler), the
    workers are ended before the exception propagates, so nothing of theirs runs afterwards.

    Raises:
        RuntimeError: a worker died (killed, out of memory) before its task was done.
    """
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    # every worker starts from this thread (at the first submit): a parent death signal fires
    # when the thread that started the worker ends, and this one outlives the pool
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_worker,
                               initargs=(os.getpid(),))
    results = []
    try:
        for result in pool.map(fn, items, chunksize=1):
            results.append(result)
            if on_result is not None:
                on_result(result)
    except BrokenProcessPool as error:
        _end_workers(pool)
        raise RuntimeError(f"a worker process ended before its task was done (killed, or out of memory?): "
                           f"{error}") from error
    except BaseException:
        _end_workers(pool)
        raise
    pool.shutdown()
    return results
