"""Checkpointing that never leaves a half-written file behind."""
from __future__ import annotations

import logging
import os
import pickle

import torch
from detectron2.checkpoint import DetectionCheckpointer

from voxelsplat.utils.io import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    with atomic_write(path, "wb", suffix=".pth") as f:
        torch.save(obj, f)


class OccupancyCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer with atomic saves and checkpoint loading under torch >= 2.6
    (which defaults to ``weights_only=True``)."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        path = os.path.join(self.save_dir, f"{name}.pth")
        logger.info("Saving checkpoint to %s", path)
        atomic_torch_save(data, path)
        self.tag_last_checkpoint(os.path.basename(path))

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def _load_file(self, filename: str):
        if filename.endswith((".pkl", ".pyth")):
            return super()._load_file(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f"checkpoint {filename} does not exist")
        try:
            loaded = torch.load(filename, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Trainer state (scheduler/hook state) may hold plain Python objects; the
            # checkpoint is a local file the user chose to load.
            logger.info("Loading %s with weights_only=False (it holds non-tensor state)", filename)
            try:
                loaded = torch.load(filename, map_location="cpu", weights_only=False)
            except Exception as exc:
                raise RuntimeError(f"checkpoint {filename} is not a readable torch checkpoint: {exc}") from exc
        except Exception as exc:
            raise RuntimeError(f"checkpoint {filename} is not a readable torch checkpoint: {exc}") from exc
        if not isinstance(loaded, dict):
            raise RuntimeError(f"checkpoint {filename} holds a {type(loaded).__name__}, expected a dict")
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded
