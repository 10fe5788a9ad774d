"""Learning-rate multipliers over training (fvcore param schedulers with linear warm-up)."""
from detectron2.config import LazyCall as L

from voxelsplat.engine.schedule import warmup_cosine_schedule, warmup_step_schedule

# Warm-up over 500 iterations, then x0.1 at 85% of training.
step_lr_multiplier = L(warmup_step_schedule)(
    max_iter="${train.max_iter}", steps=(0.85,), gamma=0.1, warmup_iters=500, warmup_factor=0.001
)

# Warm-up then cosine decay to 1e-3 of the base learning rate.
cosine_lr_multiplier = L(warmup_cosine_schedule)(
    max_iter="${train.max_iter}", warmup_iters=500, warmup_factor=0.001, end_value=1e-3
)
