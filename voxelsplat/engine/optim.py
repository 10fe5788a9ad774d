"""Optimizer parameter groups with per-module learning-rate multipliers."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

_NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)


def get_optimizer_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: Optional[float] = None,
    lr_multipliers: Optional[Dict[str, float]] = None,
    weight_decay_bias: Optional[float] = None,
) -> List[dict]:
    """Parameter groups for a torch optimizer.

    The released recipe decays every parameter alike (AdamW, weight decay 1e-2 on weights,
    biases and normalization parameters: ``weight_decay_norm = weight_decay_bias = None``).
    Exempting normalization parameters and biases (``0.0``) is the common detectron2
    practice, available as a deviation.

    Args:
        base_lr: learning rate before multipliers.
        weight_decay: weight decay of ordinary parameters.
        weight_decay_norm: weight decay of normalization-layer parameters; None: ``weight_decay``.
        weight_decay_bias: weight decay of biases outside normalization layers; None:
            ``weight_decay``.
        lr_multipliers: ``{module-name prefix: factor}``, e.g. ``{"backbone": 0.1}``; the
            longest matching prefix wins. A prefix that matches no parameter is an error
            (it is almost always a typo in the config).
    Returns:
        list of ``{"params", "lr", "weight_decay"}`` dicts, one per distinct setting.
    """
    lr_multipliers = dict(lr_multipliers or {})
    matched = {prefix: False for prefix in lr_multipliers}
    groups: Dict[tuple, dict] = {}
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            factor = 1.0
            best = -1
            for prefix, value in lr_multipliers.items():
                if (full_name == prefix or full_name.startswith(prefix + ".")) and len(prefix) > best:
                    factor, best = value, len(prefix)
                    matched[prefix] = True
            if isinstance(module, _NORM_TYPES):
                decay = weight_decay if weight_decay_norm is None else weight_decay_norm
            elif param_name == "bias":
                decay = weight_decay if weight_decay_bias is None else weight_decay_bias
            else:
                decay = weight_decay
            key = (base_lr * factor, decay)
            groups.setdefault(key, {"params": [], "lr": key[0], "weight_decay": key[1]})["params"].append(param)
    unmatched = [prefix for prefix, hit in matched.items() if not hit]
    if unmatched:
        raise KeyError(f"lr_multipliers: no trainable parameter is named with prefix {unmatched}")
    return list(groups.values())


def build_adamw(params: List[dict], lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
