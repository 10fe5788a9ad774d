"""AdamW with per-module learning-rate multipliers, weight decay on every parameter (the
released recipe; set ``weight_decay_norm`` / ``weight_decay_bias`` to 0.0 to exempt
normalization parameters and biases)."""
from detectron2.config import LazyCall as L

from voxelsplat.engine.optim import build_adamw, get_optimizer_param_groups

AdamW = L(build_adamw)(
    params=L(get_optimizer_param_groups)(
        # model is filled in by the trainer
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        weight_decay_norm=None,  # None: the same decay as the weights (released)
        weight_decay_bias=None,
        lr_multipliers={},  # e.g. {"backbone": 0.1}
    ),
    lr=2e-4,
    weight_decay=1e-2,
    betas=(0.9, 0.999),
)
