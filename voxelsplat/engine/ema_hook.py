"""Exponential moving average (EMA) of the model weights, as the released recipe keeps it.

The released training keeps an EMA of every floating-point entry of the model's state
dict (parameters and normalization statistics) with a decay that ramps up,

    decay(n) = decay * (1 - exp(-n / ramp_iters)),   n = init_updates + updates so far,

updated after every iteration (BEVDepth's EMA: ``decay=0.999``, ``ramp_iters=2000``,
``init_updates=10560``). It writes the averaged weights to their own checkpoint files; the
released test script evaluates the ordinary (non-EMA) weights, so the EMA is a by-product
of training, which is how this hook treats it too: evaluate an EMA file with
``--eval-only train.init_checkpoint=<output_dir>/model_ema_final.pth``.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Dict, Optional

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from .checkpoint import atomic_torch_save
from .hooks import unwrap_model

__all__ = ["ModelEMAHook", "ema_decay"]

logger = logging.getLogger(__name__)


def ema_decay(updates: int, decay: float, ramp_iters: float) -> float:
    """``decay * (1 - exp(-updates / ramp_iters))``; ``ramp_iters <= 0``: the constant ``decay``."""
    if ramp_iters <= 0:
        return float(decay)
    return float(decay) * (1.0 - math.exp(-float(updates) / float(ramp_iters)))


class ModelEMAHook(HookBase):
    """Keeps an EMA of the model's floating-point state after every training step.

    Args:
        decay: the decay the ramp approaches (released: 0.999).
        init_updates: the update counter at the start of training (released: 10560, which
            puts the ramp at 1 - exp(-5.28) from the first step).
        ramp_iters: time constant of the ramp in updates (released: 2000); 0: no ramp.
        period: also write ``model_ema_<iter>.pth`` every ``period`` iterations (0: only
            ``model_ema_final.pth`` at the end of training).
        output_dir: where to write (default: ``train.output_dir``, which the trainer carries).

    The EMA state is part of the trainer's checkpoint (``--resume`` continues it exactly).
    """

    def __init__(self, decay: float = 0.999, init_updates: int = 0, ramp_iters: float = 2000.0, period: int = 0,
                 output_dir: Optional[str] = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ModelEMAHook: decay must be in [0, 1), got {decay}")
        if init_updates < 0 or period < 0:
            raise ValueError(f"ModelEMAHook: init_updates and period must be >= 0, got {init_updates}, {period}")
        self.decay, self.init_updates, self.ramp_iters = float(decay), int(init_updates), float(ramp_iters)
        self.period, self.output_dir = int(period), output_dir
        self.updates = self.init_updates
        self.ema_state: Optional[Dict[str, torch.Tensor]] = None
        self._pending: Optional[dict] = None

    def _model_state(self) -> Dict[str, torch.Tensor]:
        return unwrap_model(self.trainer.model).state_dict()

    def before_train(self):
        state = self._model_state()
        self.ema_state = {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}
        if self._pending is not None:
            missing = sorted(set(self.ema_state) - set(self._pending["ema_state"]))
            if missing:
                raise KeyError(f"ModelEMAHook: the checkpoint's EMA lacks {missing[:5]} (of {len(missing)}); it was "
                               "written for another model")
            for key, value in self.ema_state.items():
                value.copy_(self._pending["ema_state"][key])
            self.updates = int(self._pending["updates"])
            self._pending = None

    @torch.no_grad()
    def update(self, state: Dict[str, torch.Tensor]) -> None:
        """One EMA step towards ``state`` (the model's current state dict)."""
        self.updates += 1
        d = ema_decay(self.updates, self.decay, self.ramp_iters)
        for key, average in self.ema_state.items():
            average.mul_(d).add_(state[key].detach().to(average.dtype), alpha=1.0 - d)

    def after_step(self):
        self.update(self._model_state())
        iteration = self.trainer.iter + 1
        if self.period and iteration % self.period == 0 and iteration < self.trainer.max_iter:
            self.save(f"model_ema_{iteration - 1:07d}.pth")

    def after_train(self):
        if self.ema_state is not None and self.trainer.iter + 1 >= self.trainer.max_iter:
            self.save("model_ema_final.pth")

    def save(self, filename: str) -> Optional[str]:
        if not comm.is_main_process():
            return None
        folder = self.output_dir or getattr(self.trainer, "output_dir", None) or "."
        path = os.path.join(folder, filename)
        # integer buffers (e.g. BatchNorm's num_batches_tracked) are not averaged: current values
        model = {k: (self.ema_state[k] if k in self.ema_state else v).detach().cpu()
                 for k, v in self._model_state().items()}
        atomic_torch_save({"model": model, "ema_updates": self.updates}, path)
        logger.info("Saved EMA weights (%d updates) to %s", self.updates, path)
        return path

    def state_dict(self) -> dict:
        if self.ema_state is None:
            return {}
        return {"ema_state": {k: v.cpu() for k, v in self.ema_state.items()}, "updates": self.updates}

    def load_state_dict(self, state_dict: dict) -> None:
        # Called by the trainer's checkpoint before training starts; applied in before_train.
        if state_dict:
            self._pending = state_dict
