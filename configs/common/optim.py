"""AdamW with per-module learning-rate multipliers."""
from detectron2.config import LazyCall as L

from voxelsplat.engine.optim import build_adamw, get_optimizer_param_groups

AdamW = L(build_adamw)(
    params=L(get_optimizer_param_groups)(
        # model is filled in by the trainer
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        weight_decay_norm=0.0,
        lr_multipliers={},  # e.g. {"backbone": 0.1}
    ),
    lr=2e-4,
    weight_decay=1e-2,
    betas=(0.9, 0.999),
)
