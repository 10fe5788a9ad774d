"""Batch samplers that keep scenes in time order, for temporal training and evaluation.

Samplers yield batches as lists of :class:`BatchItem` ``(index, sequence_start, seed)``; the
dataset (:class:`voxelsplat.data.build.SceneSequenceDataset`) passes ``sequence_start`` and
``seed`` on to the mapper, so a model resets its temporal history exactly where a slot starts
a new sequence, and the mapper's random draws for an item are a function of the item alone
(not of the loader worker that maps it, nor of what that worker mapped before).

The training samplers are pure functions of ``(seed, batch number)``: :meth:`state_at`
says where batch ``n`` is, and :meth:`load_state_dict` makes the next iteration start
there, so a run resumed from a checkpoint sees the same batches as one never stopped.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Sampler

__all__ = ["BatchItem", "scene_sequences", "SequentialSceneBatchSampler", "ShuffledBatchSampler",
           "InferenceSequenceSampler"]


class BatchItem(NamedTuple):
    """One sample of a batch: the dataset ``index``, whether it starts a sequence (the model
    resets its temporal history there), and ``seed``, the entropy of the mapper's random
    draws for it (``np.random.default_rng(seed)``; None: no randomness is asked for)."""

    index: int
    sequence_start: bool
    seed: Optional[Tuple[int, ...]] = None


def _distributed(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    from detectron2.utils import comm

    rank = comm.get_rank() if rank is None else int(rank)
    world_size = comm.get_world_size() if world_size is None else int(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    return rank, world_size


def _shared_seed(seed: Optional[int]) -> int:
    if seed is not None:
        return int(seed)
    from detectron2.utils import comm

    return int(comm.shared_random_seed())


def _item_seed(seed: int, epoch: int, index: int) -> Tuple[int, int, int]:
    # A frame appears at most once per epoch, so (seed, epoch, index) names one draw; it does
    # not depend on the number of ranks, slots or workers.
    return (int(seed), int(epoch), int(index))


class _ResumableBatchSampler(Sampler):
    """An infinite batch sampler whose batch ``n`` is a function of ``(seed, n)``; iteration
    starts at batch ``start_batch``. Subclasses define ``_layout`` and ``_batches_from``."""

    seed: int
    start_batch: int = 0

    def _layout(self) -> dict:
        raise NotImplementedError

    def _batches_from(self, batch: int) -> Iterator[List[BatchItem]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[List[BatchItem]]:
        return self._batches_from(self.start_batch)

    def state_at(self, next_batch: int) -> dict:
        """What resumes this sampler at batch ``next_batch`` (0-based; the number of batches
        consumed so far): its seed, its layout (checked on load) and the position."""
        if int(next_batch) < 0:
            raise ValueError(f"{type(self).__name__}: batch number must be >= 0, got {next_batch}")
        return dict(type=type(self).__name__, seed=self.seed, next_batch=int(next_batch), **self._layout(),
                    **self._position(int(next_batch)))

    def _position(self, batch: int) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Start the next iteration at ``state["next_batch"]`` with the saved seed. The layout
        (sampler type, batch size, world size, data) must match the saved one."""
        saved = {key: state.get(key) for key in ("type", *self._layout())}
        expected = dict(type=type(self).__name__, **self._layout())
        if saved != expected:
            differ = ", ".join(f"{k}: saved {saved[k]!r}, now {expected[k]!r}"
                               for k in expected if saved[k] != expected[k])
            raise ValueError(f"cannot resume the data order: the checkpoint's sampler differs ({differ})")
        self.seed = int(state["seed"])
        self.start_batch = int(state["next_batch"])


def scene_sequences(records: Sequence[dict], split_scenes_in_half: bool = False) -> List[List[int]]:
    """Indices of ``records`` grouped into sequences: one per scene (or two, its first and
    second halves), each in time order (``frame_index``). Scenes keep their first-seen order.

    Records are grouped by ``scene_token`` and the ``source`` key when present (the position
    of the dataset a record came from, so concatenated datasets never merge sequences).
    """
    scenes: "OrderedDict[tuple, List[int]]" = OrderedDict()
    for index, record in enumerate(records):
        scenes.setdefault((record.get("source", 0), record["scene_token"]), []).append(index)
    sequences = []
    for indices in scenes.values():
        indices = sorted(indices, key=lambda i: int(records[i]["frame_index"]))
        if split_scenes_in_half and len(indices) > 1:
            middle = (len(indices) + 1) // 2
            sequences += [indices[:middle], indices[middle:]]
        else:
            sequences.append(indices)
    return sequences


class SequentialSceneBatchSampler(_ResumableBatchSampler):
    """Infinite batches in which every batch slot walks whole sequences in time order.

    Each epoch, the sequences are shuffled (seeded by ``seed`` and the epoch number),
    concatenated, and cut into ``world_size * batch_size`` contiguous chunks of equal length,
    one per global slot (``rank * batch_size + slot``); the ``N mod slots`` frames left over
    are skipped this epoch (different ones each epoch). A slot yields its chunk in order;
    ``sequence_start`` is True at the first frame of each sequence and at the first frame of
    the chunk. All slots start epochs together, and the chunks of one epoch are disjoint,
    so ranks and slots never share a frame within an epoch. Batch ``n`` is step
    ``n mod chunk_length`` of epoch ``n // chunk_length``.

    Args:
        sequences: lists of dataset indices in time order (:func:`scene_sequences`).
        batch_size: slots per rank (the per-rank batch size).
        seed: shared by all ranks; None draws one shared seed through detectron2's ``comm``.
        shuffle: shuffle the sequence order each epoch (else keep it).
        rank, world_size: default from ``detectron2.utils.comm``.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], batch_size: int, seed: Optional[int] = None,
                 shuffle: bool = True, rank: Optional[int] = None, world_size: Optional[int] = None):
        self.sequences = [list(map(int, s)) for s in sequences if len(s)]
        self.batch_size = int(batch_size)
        self.rank, self.world_size = _distributed(rank, world_size)
        self.num_slots = self.world_size * self.batch_size
        total = sum(len(s) for s in self.sequences)
        if self.batch_size <= 0 or total < self.num_slots:
            raise ValueError(f"SequentialSceneBatchSampler: {total} frames cannot fill {self.num_slots} batch slots "
                             f"(world size {self.world_size} x batch size {self.batch_size})")
        self.chunk_length = total // self.num_slots
        self.seed = _shared_seed(seed)
        self.shuffle = bool(shuffle)
        self.start_batch = 0

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` walks the sequences (positions in ``sequences``)."""
        if not self.shuffle:
            return np.arange(len(self.sequences))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))

    def epoch_chunks(self, epoch: int) -> List[List[BatchItem]]:
        """The ``num_slots`` chunks of :class:`BatchItem` of one epoch."""
        stream: List[BatchItem] = []
        for s in self.epoch_order(epoch):
            stream += [BatchItem(index, position == 0, _item_seed(self.seed, epoch, index))
                       for position, index in enumerate(self.sequences[s])]
        chunks = []
        for slot in range(self.num_slots):
            chunk = stream[slot * self.chunk_length:(slot + 1) * self.chunk_length]
            chunk[0] = chunk[0]._replace(sequence_start=True)
            chunks.append(chunk)
        return chunks

    def _layout(self) -> dict:
        return dict(world_size=self.world_size, batch_size=self.batch_size, chunk_length=self.chunk_length,
                    num_sequences=len(self.sequences), shuffle=self.shuffle)

    def _position(self, batch: int) -> dict:
        epoch, step = divmod(batch, self.chunk_length)
        return dict(epoch=epoch, step=step, sequence_order=[int(s) for s in self.epoch_order(epoch)])

    def _batches_from(self, batch: int) -> Iterator[List[BatchItem]]:
        epoch, first_step = divmod(batch, self.chunk_length)
        first_slot = self.rank * self.batch_size
        while True:
            chunks = self.epoch_chunks(epoch)[first_slot:first_slot + self.batch_size]
            for step in range(first_step, self.chunk_length):
                yield [chunk[step] for chunk in chunks]
            epoch, first_step = epoch + 1, 0


class ShuffledBatchSampler(_ResumableBatchSampler):
    """Infinite batches of independently shuffled frames (non-temporal training): every
    epoch a fresh permutation of all indices, rank ``r`` taking positions ``r::world_size``;
    every item has ``sequence_start=True`` (no temporal history is carried over). An epoch
    is ``len(indices of a rank) // batch_size`` batches; the rest of a rank's share waits
    for the next epoch's first batch."""

    def __init__(self, num_items: int, batch_size: int, seed: Optional[int] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        self.num_items, self.batch_size = int(num_items), int(batch_size)
        self.rank, self.world_size = _distributed(rank, world_size)
        if self.batch_size <= 0 or self.num_items < self.world_size:
            raise ValueError(f"ShuffledBatchSampler: {num_items} frames for {self.world_size} ranks x batch size "
                             f"{batch_size}")
        self.seed = _shared_seed(seed)
        self.start_batch = 0

    def _layout(self) -> dict:
        return dict(world_size=self.world_size, batch_size=self.batch_size, num_items=self.num_items)

    def _stream(self) -> Iterator[BatchItem]:
        epoch = 0
        while True:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            for index in permutation[self.rank::self.world_size]:
                yield BatchItem(int(index), True, _item_seed(self.seed, epoch, int(index)))
            epoch += 1

    def _batches_from(self, batch: int) -> Iterator[List[BatchItem]]:
        # Batches run across epoch boundaries, so batch n starts at item n * batch_size of the stream.
        items = self._stream()
        for _ in range(batch * self.batch_size):
            next(items)
        while True:
            yield [next(items) for _ in range(self.batch_size)]


class InferenceSequenceSampler(Sampler):
    """Finite, in-order batches over one shard of whole scenes per rank.

    The records are grouped into scenes (:func:`scene_sequences`: each scene's keyframes in
    time order, scenes in first-seen order); each scene goes whole to one rank, the ranks
    taking contiguous runs of scenes of about ``len(records) / world_size`` frames each (a
    scene goes to the rank whose share holds its middle frame), so every sample has the same
    temporal history whatever the number of ranks. ``sequence_start`` is True at the first
    frame of a scene and after a gap in its frame indices. A rank may get no scene when
    there are fewer scenes than ranks.

    Args:
        records: the dataset records, in the loader's index order.
        batch_size: samples per batch; a batch may hold frames of consecutive scenes.
        rank, world_size: default from ``detectron2.utils.comm``.
    """

    def __init__(self, records: Sequence[dict], batch_size: int = 1, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        self.batch_size = int(batch_size)
        if self.batch_size <= 0:
            raise ValueError(f"InferenceSequenceSampler: batch size must be positive, got {batch_size}")
        self.rank, self.world_size = _distributed(rank, world_size)
        scenes = scene_sequences(records)
        self.shards = self.shard_scenes([len(s) for s in scenes], self.world_size)
        self.indices: List[int] = []
        self.starts: List[bool] = []
        for scene in self.shards[self.rank]:
            frames = [int(records[i]["frame_index"]) for i in scenes[scene]]
            self.indices += scenes[scene]
            self.starts += [p == 0 or frames[p] != frames[p - 1] + 1 for p in range(len(frames))]

    @staticmethod
    def shard_scenes(scene_lengths: Sequence[int], world_size: int) -> List[List[int]]:
        """Scene positions per rank: contiguous runs, each scene to the rank whose equal share
        of all frames holds the scene's middle frame."""
        total = sum(scene_lengths)
        shards: List[List[int]] = [[] for _ in range(world_size)]
        begin = 0
        for scene, length in enumerate(scene_lengths):
            middle = begin + (length - 1) / 2.0
            shards[min(world_size - 1, int(middle * world_size // total))].append(scene)
            begin += length
        return shards

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[List[BatchItem]]:
        items = [BatchItem(index, start) for index, start in zip(self.indices, self.starts)]
        for begin in range(0, len(items), self.batch_size):
            yield items[begin:begin + self.batch_size]
