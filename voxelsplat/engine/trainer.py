"""The training step: detectron2's SimpleTrainer with finite-loss checks, gradient
clipping, automatic mixed precision on CUDA, and a data position that a checkpoint carries."""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch
from detectron2.engine import SimpleTrainer

logger = logging.getLogger(__name__)


class OccupancyTrainer(SimpleTrainer):
    """One optimisation step per iteration; everything around it lives in hooks.

    Args:
        model, data_loader, optimizer: as in ``SimpleTrainer``.
        clip_grad_norm: max gradient norm (``None`` or <= 0: no clipping).
        amp: use ``torch.autocast`` + a ``GradScaler``; requires CUDA.

    The loader's iterator starts at the first step, not here, so that a checkpoint loaded in
    between can set where the data resumes: when the loader's batch sampler is resumable
    (``state_at(next_batch)`` / ``load_state_dict``, as the samplers of
    :mod:`voxelsplat.data.samplers`), the trainer's state holds the sampler's state at the
    number of batches taken so far (``data_batches``), and a resumed run takes the batches
    the uninterrupted run would have taken next.
    """

    def __init__(self, model, data_loader, optimizer, clip_grad_norm: Optional[float] = None,
                 clip_grad_norm_type: float = 2.0, amp: bool = False):
        super().__init__(model, (), optimizer)
        self.data_loader = data_loader
        self._data_loader_iter_obj = None
        self.data_batches = 0  # batches taken from the loader so far
        self.clip_grad_norm = clip_grad_norm if clip_grad_norm and clip_grad_norm > 0 else None
        self.clip_grad_norm_type = clip_grad_norm_type
        self.amp = amp
        if amp and not torch.cuda.is_available():
            raise RuntimeError("train.amp.enabled=True needs CUDA; set train.amp.enabled=False on CPU")
        self.grad_scaler = torch.amp.GradScaler("cuda") if amp else None

    def run_step(self):
        assert self.model.training, "[OccupancyTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        self.data_batches += 1
        data_time = time.perf_counter() - start

        with torch.autocast("cuda", enabled=self.amp):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        self._check_finite(loss_dict)
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(losses).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            losses.backward()
        if self.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm,
                                                  self.clip_grad_norm_type)
            self.storage.put_scalar("grad_norm", float(norm), smoothing_hint=True)
        self._write_metrics(loss_dict, data_time)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()

    @property
    def _data_loader_iter(self):
        if self._data_loader_iter_obj is None:
            self._data_loader_iter_obj = iter(self.data_loader)
        return self._data_loader_iter_obj

    @_data_loader_iter.setter
    def _data_loader_iter(self, iterator) -> None:
        self._data_loader_iter_obj = iterator

    @property
    def batch_sampler(self):
        """The loader's batch sampler when it can be resumed (else None)."""
        sampler = getattr(self.data_loader, "batch_sampler", None)
        resumable = callable(getattr(sampler, "state_at", None)) and callable(getattr(sampler, "load_state_dict", None))
        return sampler if resumable else None

    def _check_finite(self, loss_dict) -> None:
        for name, value in loss_dict.items():
            if not torch.isfinite(value).all():
                raise FloatingPointError(
                    f"loss term '{name}' is {value.detach().float().cpu().tolist()} at iteration {self.iter}; "
                    f"all terms: { {k: float(v.detach()) for k, v in loss_dict.items()} }"
                )

    def state_dict(self):
        state = super().state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        if self.batch_sampler is not None:
            state["data"] = self.batch_sampler.state_at(self.data_batches)
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        if self.batch_sampler is None:
            return
        if "data" not in state_dict:
            logger.warning("the checkpoint holds no data position: the data order restarts from its beginning")
            return
        self.batch_sampler.load_state_dict(state_dict["data"])
        self.data_batches = int(state_dict["data"]["next_batch"])
        self._data_loader_iter_obj = None  # a new iterator starts where the sampler now starts
