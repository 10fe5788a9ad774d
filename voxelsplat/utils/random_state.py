"""The process's global random generators, saved and restored together."""
from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["rng_states", "set_rng_states"]


def rng_states() -> dict:
    """This process's global random generators: Python's, numpy's, torch's (and CUDA's when
    in use), as :func:`set_rng_states` takes them."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore the generators of :func:`rng_states`."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
