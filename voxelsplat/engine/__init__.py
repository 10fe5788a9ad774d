"""Training and evaluation built from LazyConfigs."""
from .checkpoint import OccupancyCheckpointer, atomic_torch_save
from .defaults import (
    apply_overrides, build_model, configure_reproducibility, create_ddp_model, do_eval_only, do_test, do_train,
    load_config,
)
from .ema_hook import ModelEMAHook
from .hooks import PeakMemoryHook, peak_memory_mb, unwrap_model
from .launch import launch
from .optim import build_adamw, get_optimizer_param_groups
from .trainer import OccupancyTrainer

__all__ = [
    "ModelEMAHook",
    "OccupancyCheckpointer", "atomic_torch_save", "apply_overrides", "build_model", "configure_reproducibility",
    "create_ddp_model",
    "do_eval_only", "do_test", "do_train", "load_config", "PeakMemoryHook", "peak_memory_mb",
    "unwrap_model", "launch", "build_adamw", "get_optimizer_param_groups", "OccupancyTrainer",
]
