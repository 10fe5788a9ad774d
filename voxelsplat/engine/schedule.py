"""Learning-rate multiplier schedules expressed in iterations (fvcore param schedulers)."""
from __future__ import annotations

from typing import Sequence

from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import CosineParamScheduler, MultiStepParamScheduler


def _warmup_fraction(warmup_iters: int, max_iter: int) -> float:
    if max_iter <= 0:
        raise ValueError(f"max_iter must be positive, got {max_iter}")
    return min(1.0, max(0, warmup_iters) / max_iter)


def warmup_step_schedule(max_iter: int, steps: Sequence[float] = (0.85,), gamma: float = 0.1,
                         warmup_iters: int = 500, warmup_factor: float = 0.001) -> WarmupParamScheduler:
    """Linear warm-up over ``warmup_iters``, then multiply by ``gamma`` at each fraction of
    training in ``steps`` (a step that rounds to the last iteration or beyond never applies
    and is dropped, so very short runs work)."""
    warmup = _warmup_fraction(warmup_iters, max_iter)  # also rejects max_iter <= 0
    milestones = sorted(m for m in {max(1, int(round(s * max_iter))) for s in steps if 0 < s < 1} if m < max_iter)
    values = [gamma**i for i in range(len(milestones) + 1)]
    scheduler = MultiStepParamScheduler(values=values, milestones=milestones, num_updates=max_iter)
    return WarmupParamScheduler(scheduler, warmup_factor, warmup)


def warmup_cosine_schedule(max_iter: int, warmup_iters: int = 500, warmup_factor: float = 0.001,
                           end_value: float = 1e-3) -> WarmupParamScheduler:
    """Linear warm-up over ``warmup_iters``, then cosine decay to ``end_value``."""
    return WarmupParamScheduler(CosineParamScheduler(1.0, end_value), warmup_factor,
                                _warmup_fraction(warmup_iters, max_iter))
