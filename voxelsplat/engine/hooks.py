"""Project hooks around the training step (detectron2 ``HookBase`` subclasses)."""
from __future__ import annotations

import logging
import resource
import sys
from typing import Dict, List, Optional

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..utils.random_state import rng_states, set_rng_states

logger = logging.getLogger(__name__)


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


def _to_cpu_copy(value):
    """``value`` with every tensor in it (dicts, lists, tuples) copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu_copy(v) for v in value)
    return value


def temporal_modules(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """The modules of ``model`` that carry a history from step to step (they have
    ``history_state()`` and ``load_history_state(state)``), by name."""
    return {name: module for name, module in unwrap_model(model).named_modules()
            if callable(getattr(module, "history_state", None))
            and callable(getattr(module, "load_history_state", None))}


class TrainingStateHook(HookBase):
    """Puts into the trainer's checkpoint what the next step depends on beyond the weights,
    optimizer, schedule and data position, so that a run resumed from a checkpoint continues
    bit for bit as the uninterrupted run:

    - per process: the global random generators (model-side sampling, dropout) and the
      history of every temporal module (:func:`temporal_modules`; e.g. the volume queue of
      ``TemporalVolumeFusion``). With several processes, they are gathered into the main
      process at the iterations where ``PeriodicCheckpointer`` saves (every
      ``checkpoint_period`` and the last one); a checkpoint saved at any other iteration
      resumes with a warning and without them;
    - the last ``metric_window`` values of every scalar of the event storage, so the
      median-smoothed metrics that writers log after a resume are those of the
      uninterrupted run (detectron2's writers smooth over 20 values).

    The temporal histories are also put back before every step as the previous step left
    them: an evaluation between steps (which runs the model in eval mode and so restarts its
    history) does not change what the next training step sees.

    Register it before the ``PeriodicCheckpointer`` (its ``after_step`` must run first).

    Args:
        checkpoint_period: the ``PeriodicCheckpointer``'s period.
        metric_window: scalar values kept per metric.
        checkpoint_history: save the temporal histories (False: a resumed run restarts them,
            as at a scene start, and is not bitwise the uninterrupted run; for full-size
            configs, whose 16-frame queue is about 410 MB per batch slot).
    """

    def __init__(self, checkpoint_period: int, metric_window: int = 20, checkpoint_history: bool = True):
        if int(checkpoint_period) < 1:
            raise ValueError(f"TrainingStateHook: checkpoint_period must be >= 1, got {checkpoint_period}")
        self.checkpoint_period = int(checkpoint_period)
        self.metric_window = int(metric_window)
        self.checkpoint_history = bool(checkpoint_history)
        self._histories: Optional[Dict[str, dict]] = None  # each temporal module's history after the last step
        self._gathered: Optional[List[dict]] = None  # every process's state at this checkpoint (main process)
        self._loaded: Optional[dict] = None  # this process's state from a loaded checkpoint
        self._loaded_metrics: Optional[dict] = None

    def _process_state(self) -> dict:
        temporal = {}
        if self.checkpoint_history:
            temporal = {name: _to_cpu_copy(module.history_state())
                        for name, module in temporal_modules(self.trainer.model).items()}
        return {"rng": rng_states(), "temporal": temporal}

    def _checkpoint_due(self, iteration: int) -> bool:
        # the iterations where detectron2's PeriodicCheckpointer saves
        return (iteration + 1) % self.checkpoint_period == 0 or iteration >= self.trainer.max_iter - 1

    def before_train(self):
        if self._loaded is not None:
            set_rng_states(self._loaded["rng"])
            self._histories = dict(self._loaded["temporal"])
            modules = temporal_modules(self.trainer.model)
            if set(self._histories) != set(modules) and self.checkpoint_history:
                logger.warning("TrainingStateHook: the checkpoint holds the history of %s, the model has temporal "
                               "modules %s; the others start empty", sorted(self._histories), sorted(modules))
            self._loaded = None
        if self._loaded_metrics:
            histories, hints = self.trainer.storage.histories(), self.trainer.storage.smoothing_hints()
            for name, saved in self._loaded_metrics.items():
                for value, iteration in saved["values"]:
                    histories[name].update(value, iteration)
                hints[name] = saved["smoothing_hint"]
            self._loaded_metrics = None

    def before_step(self):
        self._gathered = None
        if self._histories is None:
            return
        for name, module in temporal_modules(self.trainer.model).items():
            if name in self._histories:
                module.load_history_state(self._histories[name])

    def after_step(self):
        modules = temporal_modules(self.trainer.model)
        self._histories = {name: module.history_state() for name, module in modules.items()}
        if comm.get_world_size() > 1 and self._checkpoint_due(self.trainer.iter):
            gathered = comm.gather(self._process_state(), dst=0)
            self._gathered = gathered if comm.is_main_process() else None

    def state_dict(self) -> dict:
        state = {"metrics": {}}
        storage = getattr(self.trainer, "storage", None)  # there is none before training starts
        if storage is not None:
            hints = storage.smoothing_hints()
            state["metrics"] = {name: {"values": [tuple(v) for v in buffer.values()[-self.metric_window:]],
                                       "smoothing_hint": bool(hints.get(name, True))}
                                for name, buffer in storage.histories().items()}
        if comm.get_world_size() == 1:
            state["processes"] = [self._process_state()]
        elif self._gathered is not None:
            state["processes"] = self._gathered
        else:
            logger.warning("TrainingStateHook: checkpoint at iteration %d, outside the checkpoint period %d: it "
                           "holds no per-process random state or temporal history", self.trainer.iter,
                           self.checkpoint_period)
        return state

    def load_state_dict(self, state: dict) -> None:
        processes = state.get("processes")
        world_size = comm.get_world_size()
        if processes is None or len(processes) != world_size:
            logger.warning("TrainingStateHook: the checkpoint holds the random state and temporal history of %s "
                           "processes, this run has %d: they start afresh (the run will not repeat the "
                           "uninterrupted one exactly)", "no" if processes is None else len(processes), world_size)
            self._loaded = None
        else:
            self._loaded = processes[comm.get_rank()]
        self._loaded_metrics = state.get("metrics")
