"""Process launching for single- and multi-process training.

``launch`` keeps detectron2's signature and command-line flags. On machines with
CUDA it defers to ``detectron2.engine.launch`` (one process per GPU, NCCL); without
CUDA, ``--num-gpus N`` starts N CPU processes that talk over gloo, which detectron2
v0.6 does not support (its workers assert CUDA and use NCCL).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm

DEFAULT_TIMEOUT = timedelta(minutes=30)
logger = logging.getLogger(__name__)


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    main_func,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
    backend: str = "auto",
):
    """Run ``main_func(*args)`` in ``num_machines * num_processes_per_machine`` processes.

    Args:
        num_processes_per_machine: GPUs per machine with CUDA, CPU processes without.
        dist_url: "tcp://host:port", or "auto" for a free port on this machine.
        backend: "auto" (NCCL on CUDA, gloo otherwise), "nccl" or "gloo".
    """
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"launch: unknown backend {backend!r}; expected 'auto', 'nccl' or 'gloo'")
    world_size = num_machines * num_processes_per_machine
    if backend == "nccl" or world_size <= 1:
        return d2_launch(main_func, num_processes_per_machine, num_machines=num_machines,
                         machine_rank=machine_rank, dist_url=dist_url, args=args, timeout=timeout)
    if dist_url in (None, "auto"):
        if num_machines > 1:
            raise ValueError("launch: dist_url=auto only works on one machine; pass --dist-url tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_free_local_port()}"
    mp.spawn(
        _gloo_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _gloo_worker(local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args, timeout):
    global_rank = machine_rank * per_machine + local_rank
    # Each CPU worker gets its share of the cores instead of all of them.
    torch.set_num_threads(max(1, torch.get_num_threads() // per_machine))
    try:
        dist.init_process_group("gloo", init_method=dist_url, world_size=world_size,
                                rank=global_rank, timeout=timeout)
    except Exception:
        logger.error("Process group URL: %s", dist_url)
        raise
    assert comm._LOCAL_PROCESS_GROUP is None
    for machine in range(world_size // per_machine):
        group = dist.new_group(list(range(machine * per_machine, (machine + 1) * per_machine)))
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
        # Leave together: the main process may still be writing results.
        comm.synchronize()
    except BaseException:
        dist.destroy_process_group()  # a failing process; spawn stops the others
        raise
    # Then end without tearing the gloo group down: a rank whose peer has already closed its
    # sockets can abort inside the teardown ("terminate called without an active exception",
    # SIGABRT), which happened now and then after a barrier too. Everything is written by now;
    # flush what is buffered and leave as the process group's destructor never runs.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
