"""The OpenOcc occupancy-and-flow challenge submission.

For every sample token the predicted class (``pcd_cls``, uint8), depth (``pcd_dist``, float16,
metres) and flow (``pcd_flow``, float16 (N, 2), m/s) of every ray, N = K origins x 14040 rays,
origin-major then pitch-major, in one gzip pickle with the team's fields beside
(``method``, ``team``, ...; :data:`SUBMISSION_INFO_KEYS`).

:class:`SubmissionSpool` writes one small file per sample while the rays are cast (so the rays of
thousands of samples never sit in memory) and :func:`write_submission` streams them into the pickle
at the end. With several processes the spool folder must be on a file system they all see.
"""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tempfile
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch

from voxelsplat.utils.io import atomic_write

__all__ = ["SUBMISSION_FILE", "SUBMISSION_INFO_KEYS", "SubmissionSpool", "submission_info", "write_submission"]

SUBMISSION_FILE = "submission.gz"
SUBMISSION_INFO_KEYS = ("method", "team", "authors", "e-mail", "institution / company", "country / region")
SPOOL_FOLDER = ".submission_parts"
PART_KEYS = ("pcd_cls", "pcd_dist", "pcd_flow")


def submission_info(info: Optional[Mapping[str, object]]) -> Dict[str, object]:
    """The submission's fields: every key of :data:`SUBMISSION_INFO_KEYS` ("" where not given);
    an unknown key is an error."""
    unknown = sorted(set(info or {}) - set(SUBMISSION_INFO_KEYS))
    if unknown:
        raise KeyError(f"unknown submission_info keys {unknown}; expected {list(SUBMISSION_INFO_KEYS)}")
    fields: Dict[str, object] = {key: "" for key in SUBMISSION_INFO_KEYS}
    fields.update(info or {})
    return fields


class SubmissionSpool:
    """One process's spooled submission parts under ``<folder>/.submission_parts/rank<r>-*/``.

    Args:
        folder: the submission's folder (e.g. ``<output_dir>/inference``).
        rank: this process's rank (names its spool folder).
    """

    def __init__(self, folder: str, rank: int = 0):
        self.folder = folder
        self.rank = int(rank)
        self.parts: List[Tuple[str, str]] = []  # (sample token, part file), in processing order
        self._dir: Optional[str] = None  # created with the first part

    def add(self, token: str, pred_class: torch.Tensor, pred_depth: torch.Tensor,
            pred_flow: Optional[torch.Tensor]) -> None:
        """Spool one sample's rays: (N,) classes, (N,) depths in metres, (N, 2) flow or None (zeros)."""
        if self._dir is None:
            parts = os.path.join(self.folder, SPOOL_FOLDER)
            os.makedirs(parts, exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix=f"rank{self.rank}-", dir=parts)
        flow = pred_flow if pred_flow is not None else torch.zeros(pred_class.numel(), 2)
        arrays = dict(pcd_cls=pred_class.cpu().numpy().astype(np.uint8),
                      pcd_dist=pred_depth.cpu().numpy().astype(np.float16),
                      pcd_flow=flow.cpu().numpy().astype(np.float16))
        path = os.path.join(self._dir, f"{len(self.parts):06d}.npz")
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)
        self.parts.append((token, path))


def write_submission(folder: str, parts: List[Tuple[str, str]], info: Mapping[str, object]) -> str:
    """Stream the spooled ``parts`` (every process's, each token once: the first part wins) into
    ``<folder>/submission.gz`` with the fields ``info``; the spool folder is removed afterwards.
    Returns the file's path."""
    seen, unique = set(), []
    for token, path in parts:
        if token not in seen:
            seen.add(token)
            unique.append((token, path))
    missing = [path for _, path in unique if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"submission: {len(missing)} spooled part(s) are gone, e.g. {missing[0]!r} (was "
                                f"{os.path.join(folder, SPOOL_FOLDER)} cleaned up while evaluating?)")
    submission = dict(info, results=_StreamedDict(_load_parts(unique)))
    path = os.path.join(folder, SUBMISSION_FILE)
    with atomic_write(path, "wb") as f:
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6, mtime=0) as zipped:
            pickle.dump(submission, zipped, protocol=pickle.HIGHEST_PROTOCOL)
    shutil.rmtree(os.path.join(folder, SPOOL_FOLDER), ignore_errors=True)
    return path


def _load_parts(parts: List[Tuple[str, str]]) -> Iterator[Tuple[str, Dict[str, np.ndarray]]]:
    for token, path in parts:
        with np.load(path) as arrays:
            yield token, {key: arrays[key] for key in PART_KEYS}


class _StreamedDict:
    """Pickles as a plain ``dict`` whose items are produced one at a time, so a submission
    of thousands of samples never sits in memory whole."""

    def __init__(self, items: Iterator[Tuple[str, dict]]):
        self.items = items

    def __reduce__(self):
        return dict, (), None, None, self.items
