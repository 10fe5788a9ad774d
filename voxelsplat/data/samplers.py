"""Batch samplers that keep scenes in time order, for temporal training and evaluation.

Samplers yield batches as lists of ``(dataset_index, sequence_start)`` pairs; the dataset
(:class:`voxelsplat.data.build.SceneSequenceDataset`) passes ``sequence_start`` on to the
mapper, so a model resets its temporal history exactly where a slot starts a new sequence.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Sampler

__all__ = ["scene_sequences", "SequentialSceneBatchSampler", "ShuffledBatchSampler", "InferenceSequenceSampler"]

BatchItem = Tuple[int, bool]


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


class SequentialSceneBatchSampler(Sampler):
    """Infinite batches in which every batch slot walks whole sequences in time order.

    Each epoch, the sequences are shuffled (seeded by ``seed`` and the epoch number),
    concatenated, and cut into ``world_size * batch_size`` contiguous chunks of equal length,
    one per global slot (``rank * batch_size + slot``); the ``N mod slots`` frames left over
    are skipped this epoch (different ones each epoch). A slot yields its chunk in order;
    ``sequence_start`` is True at the first frame of each sequence and at the first frame of
    the chunk. All slots start epochs together, and the chunks of one epoch are disjoint,
    so ranks and slots never share a frame within an epoch.

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

    def epoch_chunks(self, epoch: int) -> List[List[BatchItem]]:
        """The ``num_slots`` chunks of ``(index, sequence_start)`` of one epoch."""
        order = np.arange(len(self.sequences))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))
        stream: List[BatchItem] = []
        for s in order:
            stream += [(index, position == 0) for position, index in enumerate(self.sequences[s])]
        chunks = []
        for slot in range(self.num_slots):
            chunk = stream[slot * self.chunk_length:(slot + 1) * self.chunk_length]
            chunk[0] = (chunk[0][0], True)
            chunks.append(chunk)
        return chunks

    def __iter__(self) -> Iterator[List[BatchItem]]:
        epoch = 0
        first_slot = self.rank * self.batch_size
        while True:
            chunks = self.epoch_chunks(epoch)[first_slot:first_slot + self.batch_size]
            for step in range(self.chunk_length):
                yield [chunk[step] for chunk in chunks]
            epoch += 1


class ShuffledBatchSampler(Sampler):
    """Infinite batches of independently shuffled frames (non-temporal training): every
    epoch a fresh permutation of all indices, rank ``r`` taking positions ``r::world_size``;
    every item has ``sequence_start=True`` (no temporal history is carried over)."""

    def __init__(self, num_items: int, batch_size: int, seed: Optional[int] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        self.num_items, self.batch_size = int(num_items), int(batch_size)
        self.rank, self.world_size = _distributed(rank, world_size)
        if self.batch_size <= 0 or self.num_items < self.world_size:
            raise ValueError(f"ShuffledBatchSampler: {num_items} frames for {self.world_size} ranks x batch size "
                             f"{batch_size}")
        self.seed = _shared_seed(seed)

    def __iter__(self) -> Iterator[List[BatchItem]]:
        epoch, batch = 0, []
        while True:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            for index in permutation[self.rank::self.world_size]:
                batch.append((int(index), True))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            epoch += 1


class InferenceSequenceSampler(Sampler):
    """Finite, in-order batches over a contiguous shard per rank (like detectron2's
    ``InferenceSampler``: shard sizes differ by at most one). ``sequence_start`` is True
    where a scene starts and at the first frame of a shard.

    Args:
        records: the dataset records, in the loader's index order.
    """

    def __init__(self, records: Sequence[dict], batch_size: int = 1, rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        self.batch_size = int(batch_size)
        if self.batch_size <= 0:
            raise ValueError(f"InferenceSequenceSampler: batch size must be positive, got {batch_size}")
        self.rank, self.world_size = _distributed(rank, world_size)
        total = len(records)
        shard_sizes = [total // self.world_size + int(r < total % self.world_size) for r in range(self.world_size)]
        begin = sum(shard_sizes[:self.rank])
        self.indices = list(range(begin, begin + shard_sizes[self.rank]))
        self.starts = []
        for position, index in enumerate(self.indices):
            record, previous = records[index], records[index - 1] if index > 0 else None
            continues = previous is not None and previous.get("source", 0) == record.get("source", 0) \
                and previous["scene_token"] == record["scene_token"] \
                and int(previous["frame_index"]) + 1 == int(record["frame_index"])
            self.starts.append(position == 0 or not continues)

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[List[BatchItem]]:
        items = list(zip(self.indices, self.starts))
        for begin in range(0, len(items), self.batch_size):
            yield items[begin:begin + self.batch_size]
