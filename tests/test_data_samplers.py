"""Batch samplers: scenes in time order per slot, disjoint ranks, in-order inference shards."""
import numpy as np
import pytest

from voxelsplat.data.samplers import (
    InferenceSequenceSampler,
    SequentialSceneBatchSampler,
    ShuffledBatchSampler,
    scene_sequences,
)


def _records(scene_lengths, seed=0):
    """Fake records of scenes with the given keyframe counts, shuffled like a dataset could be."""
    records = [dict(scene_token=f"scene{s}", frame_index=f, sample_token=f"s{s}_{f}")
               for s, n in enumerate(scene_lengths) for f in range(n)]
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in order]


def _take(sampler, steps):
    iterator = iter(sampler)
    return [next(iterator) for _ in range(steps)]


def _check_time_order(records, slot_items):
    """Within a slot, every item that does not start a sequence is the next keyframe of the
    previous item's scene."""
    for (prev_index, _), (index, start) in zip(slot_items, slot_items[1:]):
        if not start:
            prev, cur = records[prev_index], records[index]
            assert cur["scene_token"] == prev["scene_token"]
            assert cur["frame_index"] == prev["frame_index"] + 1


def test_scene_sequences_are_in_time_order_and_split_in_halves():
    records = _records([5, 3, 1])
    sequences = scene_sequences(records)
    assert sorted(len(s) for s in sequences) == [1, 3, 5]
    for sequence in sequences:
        assert [records[i]["frame_index"] for i in sequence] == list(range(len(sequence)))
        assert len({records[i]["scene_token"] for i in sequence}) == 1
    halves = scene_sequences(records, split_scenes_in_half=True)
    assert sorted(len(s) for s in halves) == [1, 1, 2, 2, 3]
    assert sorted(i for s in halves for i in s) == list(range(len(records)))


@pytest.mark.parametrize("world_size,batch_size,split", [(1, 1, False), (2, 3, False), (3, 2, True)])
def test_each_slot_walks_scenes_in_time_order_and_ranks_do_not_overlap(world_size, batch_size, split):
    lengths = [7, 4, 9, 3, 6, 5, 8, 2]
    records = _records(lengths, seed=world_size)
    sequences = scene_sequences(records, split_scenes_in_half=split)
    samplers = [SequentialSceneBatchSampler(sequences, batch_size, seed=11, rank=r, world_size=world_size)
                for r in range(world_size)]
    chunk = samplers[0].chunk_length
    assert chunk == sum(lengths) // (world_size * batch_size)
    epochs = 3
    per_rank = [_take(s, chunk * epochs) for s in samplers]
    for epoch in range(epochs):
        seen = []
        for rank in range(world_size):
            batches = per_rank[rank][epoch * chunk:(epoch + 1) * chunk]
            assert all(len(b) == batch_size for b in batches)
            for slot in range(batch_size):
                items = [b[slot] for b in batches]
                assert items[0][1]  # a slot's chunk always starts a sequence
                _check_time_order(records, items)
                seen += [index for index, _ in items]
        # within an epoch no frame is given to two slots (on any rank)
        assert len(seen) == len(set(seen)) == chunk * world_size * batch_size
    # sequence starts: at each scene (or half-scene) start, and nowhere in the middle of a run
    starts_of_sequences = {seq[0] for seq in sequences}
    for batches in per_rank:
        for slot in range(batch_size):
            items = [b[slot] for b in batches]
            for position, (index, start) in enumerate(items):
                if index in starts_of_sequences:
                    assert start
                elif start:
                    assert position % chunk == 0  # only the chunk start may cut a sequence
    # the scene order is reshuffled between epochs
    first = [b[0][0] for b in per_rank[0][:chunk]]
    second = [b[0][0] for b in per_rank[0][chunk:2 * chunk]]
    third = [b[0][0] for b in per_rank[0][2 * chunk:3 * chunk]]
    assert first != second or second != third


def test_sequential_sampler_is_reproducible_for_a_seed_and_rejects_too_few_frames():
    sequences = scene_sequences(_records([4, 6, 5]))
    a = _take(SequentialSceneBatchSampler(sequences, 2, seed=3, rank=0, world_size=1), 20)
    b = _take(SequentialSceneBatchSampler(sequences, 2, seed=3, rank=0, world_size=1), 20)
    c = _take(SequentialSceneBatchSampler(sequences, 2, seed=4, rank=0, world_size=1), 20)
    assert a == b and a != c
    with pytest.raises(ValueError, match="cannot fill"):
        SequentialSceneBatchSampler(sequences, 8, seed=0, rank=0, world_size=2)


def test_shuffled_sampler_covers_every_frame_once_per_epoch_across_ranks():
    n, world_size, batch = 30, 3, 2
    per_rank = [_take(ShuffledBatchSampler(n, batch, seed=5, rank=r, world_size=world_size), 5) for r in range(3)]
    items = [item for batches in per_rank for batch_items in batches for item in batch_items]
    assert all(start for _, start in items)
    assert sorted(index for index, _ in items) == list(range(n))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_inference_sampler_shards_in_order_and_flags_sequence_starts(world_size):
    lengths = [3, 4, 2, 5]
    records = [dict(scene_token=f"scene{s}", frame_index=f) for s, n in enumerate(lengths) for f in range(n)]
    shards = [list(InferenceSequenceSampler(records, batch_size=2, rank=r, world_size=world_size))
              for r in range(world_size)]
    flat = [item for shard in shards for batch in shard for item in batch]
    assert [index for index, _ in flat] == list(range(len(records)))  # contiguous shards, in order
    sizes = [sum(len(b) for b in shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
    for shard in shards:
        items = [item for batch in shard for item in batch]
        for position, (index, start) in enumerate(items):
            assert start == (position == 0 or records[index]["frame_index"] == 0)
        assert len(shard) == len(InferenceSequenceSampler(records, 2, rank=shards.index(shard), world_size=world_size))
