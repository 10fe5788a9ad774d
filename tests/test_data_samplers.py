"""Batch samplers: scenes in time order per slot, disjoint ranks, resumable at any batch,
per-item seeds, and inference shards of whole scenes."""
import numpy as np
import pytest

from voxelsplat.data.samplers import (
    BatchItem,
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
    for (prev_index, _, _), (index, start, _) in zip(slot_items, slot_items[1:]):
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
                seen += [item.index for item in items]
        # within an epoch no frame is given to two slots (on any rank)
        assert len(seen) == len(set(seen)) == chunk * world_size * batch_size
    # sequence starts: at each scene (or half-scene) start, and nowhere in the middle of a run
    starts_of_sequences = {seq[0] for seq in sequences}
    for batches in per_rank:
        for slot in range(batch_size):
            items = [b[slot] for b in batches]
            for position, (index, start, _) in enumerate(items):
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
    assert all(item.sequence_start for item in items)
    assert sorted(item.index for item in items) == list(range(n))


def test_sequential_sampler_resumed_at_any_batch_continues_the_uninterrupted_order():
    sequences = scene_sequences(_records([5, 3, 6, 2, 4]))
    for world_size, batch_size in ((1, 1), (1, 2), (2, 2)):
        for rank in range(world_size):
            full = _take(SequentialSceneBatchSampler(sequences, batch_size, seed=7, rank=rank, world_size=world_size),
                         40)
            chunk = SequentialSceneBatchSampler(sequences, batch_size, seed=7, rank=rank,
                                                world_size=world_size).chunk_length
            for next_batch in (0, 1, chunk - 1, chunk, chunk + 3, 3 * chunk + 1):
                state = SequentialSceneBatchSampler(sequences, batch_size, seed=7, rank=rank,
                                                    world_size=world_size).state_at(next_batch)
                assert (state["epoch"], state["step"]) == divmod(next_batch, chunk)
                # a sampler built with another seed (e.g. a fresh shared seed) takes the saved one
                resumed = SequentialSceneBatchSampler(sequences, batch_size, seed=99, rank=rank,
                                                      world_size=world_size)
                resumed.load_state_dict(state)
                assert _take(resumed, 40 - next_batch) == full[next_batch:], (world_size, rank, next_batch)


def test_shuffled_sampler_resumed_at_any_batch_continues_the_uninterrupted_order():
    full = _take(ShuffledBatchSampler(11, 3, seed=2, rank=1, world_size=2), 12)
    for next_batch in (0, 1, 2, 5, 11):
        resumed = ShuffledBatchSampler(11, 3, seed=5, rank=1, world_size=2)
        resumed.load_state_dict(ShuffledBatchSampler(11, 3, seed=2, rank=1, world_size=2).state_at(next_batch))
        assert _take(resumed, 12 - next_batch) == full[next_batch:]


def test_sampler_state_of_another_layout_is_refused():
    sequences = scene_sequences(_records([4, 6, 5]))
    state = SequentialSceneBatchSampler(sequences, 2, seed=3, rank=0, world_size=1).state_at(4)
    with pytest.raises(ValueError, match="world_size: saved 1, now 2"):
        SequentialSceneBatchSampler(sequences, 1, seed=3, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="type: saved 'SequentialSceneBatchSampler'"):
        ShuffledBatchSampler(15, 2, seed=3, rank=0, world_size=1).load_state_dict(state)


def test_item_seeds_name_seed_epoch_and_frame_whatever_the_layout():
    """Each item's seed is (sampler seed, epoch, index): unique within an epoch, the same for
    a frame in an epoch whatever the number of ranks and slots, new in the next epoch."""
    lengths = [5, 3, 6, 2, 4]
    sequences = scene_sequences(_records(lengths))
    seeds = {}
    for world_size, batch_size in ((1, 1), (2, 2), (1, 3)):
        samplers = [SequentialSceneBatchSampler(sequences, batch_size, seed=7, rank=r, world_size=world_size)
                    for r in range(world_size)]
        chunk = samplers[0].chunk_length
        for sampler in samplers:
            for batch_number, batch in enumerate(_take(sampler, 2 * chunk)):
                epoch = batch_number // chunk
                for item in batch:
                    assert item.seed == (7, epoch, item.index)
                    seeds.setdefault((world_size, batch_size, epoch), []).append(item.seed)
    for key, epoch_seeds in seeds.items():
        assert len(epoch_seeds) == len(set(epoch_seeds)), key
    items = [item for batch in _take(ShuffledBatchSampler(12, 2, seed=4, rank=0, world_size=1), 12) for item in batch]
    assert [item.seed for item in items] == [(4, position // 12, item.index) for position, item in enumerate(items)]


def _histories(records, world_size, batch_size=2):
    """Per dataset index: the indices a model's temporal history holds when it reaches that
    frame (the frames since the last sequence start on its rank), for every rank's shard."""
    histories = {}
    for rank in range(world_size):
        run = []
        for batch in InferenceSequenceSampler(records, batch_size=batch_size, rank=rank, world_size=world_size):
            for index, start, _ in batch:
                run = [index] if start else run + [index]
                histories[index] = tuple(run)
    return histories


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_inference_sampler_gives_each_rank_whole_scenes_in_time_order(world_size):
    lengths = [3, 7, 2, 5, 4]
    records = _records(lengths, seed=world_size)  # records of a scene need not be adjacent
    scenes = scene_sequences(records)
    shards = [list(InferenceSequenceSampler(records, batch_size=2, rank=r, world_size=world_size))
              for r in range(world_size)]
    per_rank = [[item for batch in shard for item in batch] for shard in shards]
    # every frame once; in rank order the shards are the scenes in their order, each in time order
    assert [item.index for items in per_rank for item in items] == [i for scene in scenes for i in scene]
    for rank, items in enumerate(per_rank):
        tokens = [records[item.index]["scene_token"] for item in items]
        for scene in scenes:  # a scene lies in one shard only
            token = records[scene[0]]["scene_token"]
            assert token not in tokens or tokens.count(token) == len(scene)
        for item in items:
            assert item.sequence_start == (records[item.index]["frame_index"] == 0)
            assert item.seed is None
        assert len(shards[rank]) == len(InferenceSequenceSampler(records, 2, rank=rank, world_size=world_size))
    # shards are balanced up to one scene
    sizes = [len(items) for items in per_rank]
    assert max(abs(size - len(records) / world_size) for size in sizes) <= max(lengths)
    # what the temporal history holds at every frame does not depend on the number of ranks
    assert _histories(records, world_size) == _histories(records, 1)


def test_inference_sampler_with_more_ranks_than_scenes_leaves_ranks_empty():
    records = _records([2, 3])
    shards = [list(InferenceSequenceSampler(records, batch_size=1, rank=r, world_size=4)) for r in range(4)]
    assert sorted(len(shard) for shard in shards) == [0, 0, 2, 3]
    assert _histories(records, 4, batch_size=1) == _histories(records, 1, batch_size=1)


def test_inference_sampler_restarts_the_history_at_a_gap_in_a_scene():
    records = [dict(scene_token="a", frame_index=f) for f in (0, 1, 3, 4)]
    items = [item for batch in InferenceSequenceSampler(records, 1, rank=0, world_size=1) for item in batch]
    assert [item.sequence_start for item in items] == [True, False, True, False]
    assert items[0] == BatchItem(0, True)
