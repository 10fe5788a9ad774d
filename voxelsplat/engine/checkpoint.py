"""Checkpointing that never leaves a half-written file behind and never runs code from a file
it reads, unless told that the file is trusted.

What :class:`OccupancyCheckpointer` writes (model, optimizer, trainer and hook state, the
iteration) holds only tensors, numbers, strings and plain containers (NumPy arrays and scalars
in a state dict are saved as tensors and Python numbers), so it loads with
``torch.load(weights_only=True)``. A file that needs full unpickling (a detectron2 ``.pkl``, a
``.pth`` holding other Python objects) is refused unless ``trust_checkpoint`` (config:
``train.trust_checkpoint``): unpickling runs whatever code the file names.
"""
from __future__ import annotations

import collections
import logging
import os
import pickle
import re
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _filter_reused_missing_keys

from voxelsplat.utils.io import atomic_write, atomic_write_text, remove_stale_temporaries

__all__ = ["OccupancyCheckpointer", "UntrustedCheckpointError", "IncompatibleCheckpointError", "atomic_torch_save"]

logger = logging.getLogger(__name__)

# The config key that allows full unpickling, named in the refusal.
TRUST_FLAG = "train.trust_checkpoint"
# Model entries named in an error or warning before "... and N more".
_NAMES_SHOWN = 5
# Entries a model may lack in the file even under ``strict``: BatchNorm's step counter, unused
# unless momentum is None, and absent from some converted checkpoints.
_NOT_REQUIRED_SUFFIXES = ("num_batches_tracked",)
# What torch.load(weights_only=True) reads back besides containers.
_PLAIN_VALUES = (torch.Tensor, str, bytes, bool, int, float, complex, type(None), torch.Size, torch.dtype, torch.device)


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint that would need full unpickling (which can run code), refused."""


class IncompatibleCheckpointError(RuntimeError):
    """A checkpoint that lacks or mis-shapes model parameters, where every one is required."""


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    with atomic_write(path, "wb", suffix=".pth") as f:
        torch.save(obj, f)


def _plain_state(value: Any, where: str) -> Any:
    """``value`` with NumPy arrays turned into tensors (same dtype, shape and values; e.g. the
    key of ``np.random.get_state()``, which ``np.random.set_state`` takes back as a tensor) and
    NumPy scalars into Python numbers, checked to hold nothing that
    ``torch.load(weights_only=True)`` refuses.

    Raises:
        TypeError: naming the entry (``where``) that holds something else.
    """
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        return torch.from_numpy(np.array(value, order="C"))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, _PLAIN_VALUES):
        return value
    if isinstance(value, collections.OrderedDict):
        plain = collections.OrderedDict((key, _plain_state(item, f"{where}.{key}")) for key, item in value.items())
        if hasattr(value, "_metadata"):  # a module's state dict: its versions, read by load_state_dict
            plain._metadata = value._metadata
        return plain
    if isinstance(value, dict):
        return {key: _plain_state(item, f"{where}.{key}") for key, item in value.items()}
    if type(value) in (list, tuple, set):
        return type(value)(_plain_state(item, f"{where}[{i}]") for i, item in enumerate(value))
    raise TypeError(f"checkpoint entry {where} is a {type(value).__module__}.{type(value).__qualname__}; a "
                    f"checkpoint holds only tensors, numbers, strings and plain dicts/lists/tuples, so that it "
                    f"loads without unpickling code")


def _shown(names: List[str]) -> str:
    more = f", ... and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
    return ", ".join(names[:_NAMES_SHOWN]) + more


class OccupancyCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer with atomic saves, safe loading and a count of what a load
    skipped.

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        trust_checkpoint: load files that need full unpickling (``.pkl``; ``.pth`` holding
            Python objects besides tensors and plain containers). Unpickling runs code named
            by the file: only for files from a source you trust. Off: such a file is an
            :class:`UntrustedCheckpointError` naming it and ``train.trust_checkpoint``.
        strict: every parameter and buffer of the model must be in the file with the model's
            shape (BatchNorm's ``num_batches_tracked`` excepted), else
            :class:`IncompatibleCheckpointError` (evaluation). Off: a warning says how many were
            not loaded (training from a partial initialisation).

    Temporaries of checkpoints whose writing was killed are removed when a checkpointer that
    saves is created on ``save_dir``.
    """

    def __init__(self, model, save_dir: str = "", *, trust_checkpoint: bool = False, strict: bool = False,
                 save_to_disk: Optional[bool] = None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.trust_checkpoint = bool(trust_checkpoint)
        self.strict = bool(strict)
        self._loading: Optional[str] = None  # the file being loaded, for the incompatible-keys report
        if self.save_dir and self.save_to_disk:
            remove_stale_temporaries(self.save_dir)

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        data = {key: _plain_state(value, key) for key, value in data.items()}
        path = os.path.join(self.save_dir, f"{name}.pth")
        logger.info("Saving checkpoint to %s", path)
        atomic_torch_save(data, path)
        self.tag_last_checkpoint(os.path.basename(path))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    # ------------------------------------------------------------------------ reading
    def _refuse(self, filename: str, why: str) -> UntrustedCheckpointError:
        return UntrustedCheckpointError(
            f"checkpoint {filename!r} {why}; loading it means full unpickling, which runs code named by the file. "
            f"Set {TRUST_FLAG}=True (OccupancyCheckpointer(trust_checkpoint=True)) only for a file from a source "
            f"you trust")

    def _torch_load(self, filename: str):
        if not os.path.isfile(filename):
            raise FileNotFoundError(f"checkpoint {filename} does not exist")
        try:
            return torch.load(filename, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if not str(exc).startswith("Weights only load failed"):
                raise RuntimeError(f"checkpoint {filename} is not a readable torch checkpoint: {exc}") from exc
            if not self.trust_checkpoint:
                found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(exc))
                raise self._refuse(filename, "holds Python objects besides tensors and plain containers"
                                   + (f" ({found.group(1)})" if found else "")) from None
        except Exception as exc:  # zip reader errors, EOF, garbage bytes
            raise RuntimeError(f"checkpoint {filename} is not a readable torch checkpoint: {exc}") from exc
        logger.warning("Loading %s with full unpickling (%s=True)", filename, TRUST_FLAG)
        try:
            return torch.load(filename, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise RuntimeError(f"checkpoint {filename} is not a readable torch checkpoint: {exc}") from exc

    def _load_file(self, filename: str):
        self._loading = filename
        if filename.endswith(".pkl"):
            if not self.trust_checkpoint:
                raise self._refuse(filename, "is a pickle (.pkl: detectron2 / Caffe2 model zoo format)")
            logger.warning("Loading %s with full unpickling (%s=True)", filename, TRUST_FLAG)
            return super()._load_file(filename)
        loaded = self._torch_load(filename)
        if not isinstance(loaded, dict):
            raise RuntimeError(f"checkpoint {filename} holds a {type(loaded).__name__}, expected a dict")
        if filename.endswith(".pyth"):  # pycls, read as detectron2 reads it
            if "model_state" not in loaded:
                raise RuntimeError(f"checkpoint {filename}: a pycls .pyth file holds 'model_state'; keys found: "
                                   f"{sorted(loaded)}")
            model_state = {k: v for k, v in loaded["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": model_state, "__author__": "pycls", "matching_heuristics": True}
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded

    def _log_incompatible_keys(self, incompatible) -> None:
        misshaped: List[Tuple[str, tuple, tuple]] = sorted(incompatible.incorrect_shapes)
        # a mis-shaped entry is dropped from the file's state before loading, so it is "missing" too
        missing = sorted(set(_filter_reused_missing_keys(self.model, incompatible.missing_keys))
                         - {k for k, _, _ in misshaped})
        total = len(self.model.state_dict())
        source = self._loading or "the checkpoint"
        if self.strict:
            missing = [k for k in missing if not k.endswith(_NOT_REQUIRED_SUFFIXES)]
            misshaped = [m for m in misshaped if not m[0].endswith(_NOT_REQUIRED_SUFFIXES)]
            if missing or misshaped:
                parts = []
                if missing:
                    parts.append(f"{len(missing)} missing ({_shown(missing)})")
                if misshaped:
                    parts.append(f"{len(misshaped)} of another shape (" + _shown(
                        [f"{k}: {list(c)} in the file, {list(m)} in the model" for k, c, m in misshaped]) + ")")
                raise IncompatibleCheckpointError(
                    f"checkpoint {source!r} does not fit the model: {len(missing) + len(misshaped)} of the model's "
                    f"{total} parameters and buffers cannot be loaded: " + "; ".join(parts))
        super()._log_incompatible_keys(incompatible)
        skipped = sorted(set(missing) | {k for k, _, _ in misshaped})
        if skipped or incompatible.unexpected_keys:
            logger.warning("%s: %d of the model's %d parameters and buffers were not loaded and keep their initial "
                           "values (%d missing from the file, %d of another shape)%s; %d entries of the file are "
                           "unused", source, len(skipped), total, len(missing), len(misshaped),
                           f": {_shown(skipped)}" if skipped else "", len(incompatible.unexpected_keys))
