"""Data loaders built from registered datasets, callable from a LazyConfig.

Batches are lists of mapped sample dicts (detectron2's ``trivial_batch_collator``), in the
order the samplers of :mod:`voxelsplat.data.samplers` define.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..utils.random_state import rng_states, set_rng_states
from .samplers import (
    BatchItem,
    InferenceSequenceSampler,
    SequentialSceneBatchSampler,
    ShuffledBatchSampler,
    scene_sequences,
)

__all__ = ["SceneSequenceDataset", "get_records", "build_train_loader", "build_test_loader"]

DatasetSpec = Union[str, Sequence[str], Sequence[dict]]


def get_records(dataset: DatasetSpec) -> List[dict]:
    """Records of one registered dataset name, of several (concatenated, each record tagged
    with ``source`` = the name's position), or a list of records given directly."""
    from detectron2.data import DatasetCatalog

    if isinstance(dataset, str):
        dataset = [dataset]
    dataset = list(dataset)
    if not dataset:
        raise ValueError("no dataset given")
    if all(isinstance(d, dict) for d in dataset):
        return dataset
    records: List[dict] = []
    for source, name in enumerate(dataset):
        if not isinstance(name, str):
            raise TypeError(f"dataset must be a name, a list of names or a list of records; got {type(name).__name__}")
        items = DatasetCatalog.get(name)
        if not items:
            raise ValueError(f"dataset {name!r} is empty")
        records += [dict(r, source=source) for r in items] if len(dataset) > 1 else list(items)
    return records


class SceneSequenceDataset(Dataset):
    """Map-style dataset over records that also knows each record's scene.

    Indexed by :class:`~voxelsplat.data.samplers.BatchItem` ``(index, sequence_start, seed)``
    (from the samplers; ``seed`` optional) or plain ints. The record is handed to the mapper
    with ``sequence_start`` set, ``sample_seed`` set to the item's seed when it has one (the
    entropy of the mapper's random draws) and, when the mapper says it
    ``needs_scene_records``, with ``scene_records`` (the records of its scene, in time order).
    Records are held serialized (detectron2's ``DatasetFromList``) so data-loader workers
    share the parent's memory.
    """

    def __init__(self, records: Sequence[dict], mapper: Callable[[dict], dict]):
        from detectron2.data.common import DatasetFromList

        self.mapper = mapper
        self._records = DatasetFromList(list(records), copy=False, serialize=True)
        sequences = scene_sequences(records)
        self._scene_of = np.empty(len(records), dtype=np.int64)
        self._scenes: List[np.ndarray] = []
        for scene_id, indices in enumerate(sequences):
            frames = [int(records[i]["frame_index"]) for i in indices]
            if frames != list(range(len(indices))):
                record = records[indices[0]]
                raise ValueError(f"scene {record.get('scene_name', record['scene_token'])}: keyframes have frame "
                                 f"indices {frames}, expected 0..{len(indices) - 1} (each scene must be complete)")
            self._scene_of[indices] = scene_id
            self._scenes.append(np.asarray(indices, dtype=np.int64))

    def __len__(self) -> int:
        return len(self._records)

    def record(self, index: int, sequence_start: Optional[bool] = None,
               seed: Optional[Sequence[int]] = None) -> dict:
        """The record at ``index`` prepared for the mapper (see the class docstring)."""
        record = self._records[int(index)]
        if sequence_start is not None:
            record["sequence_start"] = bool(sequence_start)
        if seed is not None:
            record["sample_seed"] = tuple(int(s) for s in seed)
        if getattr(self.mapper, "needs_scene_records", False):
            record["scene_records"] = [self._records[int(i)] for i in self._scenes[self._scene_of[int(index)]]]
        return record

    def __getitem__(self, item: Union[int, Tuple[int, bool], BatchItem]) -> dict:
        if not isinstance(item, (tuple, list)):
            return self.mapper(self.record(item))
        if not 2 <= len(item) <= 3:
            raise ValueError(f"SceneSequenceDataset: an item is an index or (index, sequence_start[, seed]); "
                             f"got {item!r}")
        return self.mapper(self.record(*item))


def _cache_dir_of(dataset: DatasetSpec) -> str:
    """The record cache folder of the (first) registered dataset, else the default one."""
    from detectron2.data import MetadataCatalog

    from .datasets import default_cache_dir

    names = [dataset] if isinstance(dataset, str) else [d for d in dataset if isinstance(d, str)]
    cache_dir = MetadataCatalog.get(names[0]).get("record_cache_dir", None) if names else None
    return cache_dir or default_cache_dir()


def _keeping_global_rng(function: Callable) -> Callable:
    """``function`` run with the global random generators (Python, numpy, torch) put back
    afterwards: preparation work that is cached (done by the first run only, e.g. a data
    loader that draws its workers' seed) must not shift what the training draws next."""
    def run(*args, **kwargs):
        states = rng_states()
        try:
            return function(*args, **kwargs)
        finally:
            set_rng_states(states)

    return run


def _prepare_mapper(mapper, records: Sequence[dict], dataset: DatasetSpec, num_workers: int) -> None:
    """Let the mapper do its once-per-run work (e.g. dataset-wide voxel counts) in this
    process, before the workers copy it. With several processes per machine, local rank 0
    goes first and writes the cache that the others then read."""
    prepare = getattr(mapper, "prepare", None)
    if prepare is None:
        return
    from detectron2.utils import comm

    prepare = _keeping_global_rng(prepare)

    cache_dir = _cache_dir_of(dataset)
    if not getattr(mapper, "needs_dataset_voxel_counts", False) or comm.get_world_size() == 1:
        prepare(records, cache_dir=cache_dir, num_workers=num_workers)
        return
    first = comm.get_local_rank() == 0
    if first:
        prepare(records, cache_dir=cache_dir, num_workers=num_workers)
    comm.synchronize()
    if not first:
        prepare(records, cache_dir=cache_dir, num_workers=num_workers)


def _data_loader(dataset: Dataset, batch_sampler, num_workers: int, seed: int = 0) -> DataLoader:
    from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed

    # The loader's own generator seeds the workers: starting an iterator (e.g. when a resumed
    # run starts) does not draw from the global torch RNG that the model's sampling uses.
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=int(num_workers),
                      collate_fn=trivial_batch_collator, worker_init_fn=worker_init_reset_seed,
                      persistent_workers=False, generator=torch.Generator().manual_seed(int(seed)))


def build_train_loader(dataset: DatasetSpec, mapper: Callable[[dict], dict], total_batch_size: int,
                       num_workers: int = 0, sequential: bool = True, split_scenes_in_half: bool = False,
                       seed: Optional[int] = None) -> DataLoader:
    """Infinite training loader yielding lists of ``total_batch_size / world_size`` mapped samples.

    Args:
        dataset: a registered name, a list of names, or a list of records.
        mapper: e.g. ``TemporalDatasetMapper(is_train=True, ...)``. Its ``prepare(records,
            cache_dir=, num_workers=)``, when it has one, runs here once before the workers
            start (the mapper's dataset-wide voxel counts over these records).
        total_batch_size: samples per iteration over all ranks (must divide by the world size).
        num_workers: data-loader worker processes per rank.
        sequential: each batch slot walks scenes in time order (temporal training,
            :class:`SequentialSceneBatchSampler`); else independent shuffled frames with
            ``sequence_start=True`` everywhere (:class:`ShuffledBatchSampler`).
        split_scenes_in_half: with ``sequential``, walk the two halves of each scene as
            separate sequences (more, shorter sequences to spread over the slots).
        seed: sampler seed shared by all ranks (None: one drawn and shared through comm).
    """
    from detectron2.utils import comm

    world_size = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world_size:
        raise ValueError(f"total_batch_size {total_batch_size} must be a positive multiple of the world size {world_size}")
    batch_size = total_batch_size // world_size
    records = get_records(dataset)
    _prepare_mapper(mapper, records, dataset, num_workers)
    if sequential:
        sampler = SequentialSceneBatchSampler(scene_sequences(records, split_scenes_in_half), batch_size, seed=seed)
    else:
        sampler = ShuffledBatchSampler(len(records), batch_size, seed=seed)
    return _data_loader(SceneSequenceDataset(records, mapper), sampler, num_workers, seed=sampler.seed)


def build_test_loader(dataset: DatasetSpec, mapper: Callable[[dict], dict], num_workers: int = 0,
                      batch_size: int = 1) -> DataLoader:
    """Finite loader over the dataset's scenes, each in time order, each rank taking a shard
    of whole scenes (:class:`InferenceSequenceSampler`), ``batch_size`` samples per batch (per rank)."""
    records = get_records(dataset)
    sampler = InferenceSequenceSampler(records, batch_size)
    return _data_loader(SceneSequenceDataset(records, mapper), sampler, num_workers)
