"""Project hooks around the training step (detectron2 ``HookBase`` subclasses)."""
from __future__ import annotations

import resource
import sys

import torch
from detectron2.engine import HookBase


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MiB (CUDA: peak allocated on the device)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class PeakMemoryHook(HookBase):
    """Writes ``peak_memory_mb`` (host RSS on CPU, device memory on CUDA) every ``period`` iterations."""

    def __init__(self, period: int = 20):
        self.period = period

    def after_step(self):
        iteration = self.trainer.iter + 1
        if iteration % self.period == 0 or iteration == self.trainer.max_iter:
            self.trainer.storage.put_scalar("peak_memory_mb", peak_memory_mb(), smoothing_hint=False)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside (Distributed)DataParallel wrappers (nested ones too), or the model itself.
    Only those wrappers are opened: a model with a submodule named ``module`` is returned as is."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model
