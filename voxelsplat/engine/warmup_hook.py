"""Warm-up switches of the occupancy model: long-term history fusion and the flow loss
start at configured iterations (published FB-Occ / VoxelSplat: after 2 epochs)."""
from __future__ import annotations

from detectron2.engine import HookBase

from .hooks import unwrap_model

__all__ = ["WarmupSwitchHook"]


class WarmupSwitchHook(HookBase):
    """Calls ``model.set_training_phase(history_enabled, flow_loss_enabled)`` with
    ``history_enabled = iter >= history_start_iter`` and
    ``flow_loss_enabled = iter >= flow_loss_start_iter``.

    The phase is set in ``before_train`` from the trainer's current iteration (so a run
    resumed after the switch point starts in the right phase) and updated before every
    step when it changes.
    """

    def __init__(self, history_start_iter: int = 0, flow_loss_start_iter: int = 0):
        self.history_start_iter = int(history_start_iter)
        self.flow_loss_start_iter = int(flow_loss_start_iter)
        self._phase = None

    def _apply(self, iteration: int) -> None:
        phase = (iteration >= self.history_start_iter, iteration >= self.flow_loss_start_iter)
        if phase == self._phase:
            return
        model = unwrap_model(self.trainer.model)
        if not hasattr(model, "set_training_phase"):
            raise TypeError(f"WarmupSwitchHook: {type(model).__name__} has no set_training_phase(history_enabled, "
                            f"flow_loss_enabled)")
        model.set_training_phase(*phase)
        self._phase = phase

    def before_train(self):
        self._phase = None
        self._apply(self.trainer.iter)

    def before_step(self):
        self._apply(self.trainer.iter)
