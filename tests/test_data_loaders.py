"""Loaders built from the LazyConfig pieces: batches of contract-abiding samples, scenes in
time order, test samples in dataset order."""
import os

import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog

from voxelsplat.data.build import build_test_loader, build_train_loader
from voxelsplat.data.datasets import register_nuscenes_occupancy
from voxelsplat.data.mapper import TemporalDatasetMapper
from voxelsplat.structures.sample_fields import MAPPER_FIELDS, OPTIONAL_FIELDS, REGULARIZER_FIELDS, check_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(synthetic_dataset, cache_dir):
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "common", "data", "synthetic_occ.py"))
    for part in (cfg.dataloader.train, cfg.dataloader.test):
        part.dataset.dataroot = synthetic_dataset.root
        part.dataset.version = synthetic_dataset.version
        part.dataset.cache_dir = str(cache_dir)
    cfg.dataloader.train.mapper.input_size = (176, 64)
    return cfg


def test_train_loader_from_config_walks_scenes_in_order_with_workers(synthetic_dataset, tmp_path):
    cfg = _config(synthetic_dataset, tmp_path)
    cfg.dataloader.train.dataset.split = "all"
    cfg.dataloader.train.num_workers = 2
    cfg.dataloader.train.seed = 0
    cfg.dataloader.train.mapper.regularizer = dict(num_gaussians=500, frame_offsets=(-1, 0, 1))
    loader = instantiate(cfg.dataloader.train)
    records = {r["sample_token"]: r for r in DatasetCatalog.get(cfg.dataloader.train.dataset.name)}
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(2 * synthetic_dataset.samples_per_scene)]
    del iterator
    for batch in batches:
        assert isinstance(batch, list) and len(batch) == cfg.dataloader.train.total_batch_size
        for sample in batch:
            check_sample(sample, with_regularizer=True)
            assert set(sample) <= set(MAPPER_FIELDS) | set(OPTIONAL_FIELDS) | set(REGULARIZER_FIELDS)
            assert sample["img"].shape[-2:] == (64, 176) and sample["img"].dtype == torch.uint8
            assert sample["gaussian_voxel_indices"].shape == (500, 3)
            assert sample["render_viewmats"].shape[0] == 3 * len(records[sample["sample_token"]]["cameras"])
            # the synthetic config neither rotates nor flips the BEV frame: velocities keep the
            # direction the images show (with the release's flips, half the samples would differ)
            np.testing.assert_array_equal(sample["bda"].numpy(), np.eye(4))
    chunk = len(records) // cfg.dataloader.train.total_batch_size  # steps per slot and epoch
    for slot in range(cfg.dataloader.train.total_batch_size):
        walk = [batch[slot] for batch in batches]
        assert walk[0]["sequence_start"]
        for position in range(1, len(walk)):
            prev, cur = walk[position - 1], walk[position]
            if not cur["sequence_start"]:
                assert cur["scene_token"] == prev["scene_token"]
                assert cur["frame_index"] == prev["frame_index"] + 1
                assert cur["prev_sample_token"] == prev["sample_token"]
            else:  # a new scene, or the start of the slot's next chunk
                assert cur["frame_index"] == 0 or position % chunk == 0


def test_test_loader_from_config_yields_the_split_in_order(synthetic_dataset, tmp_path):
    cfg = _config(synthetic_dataset, tmp_path)
    loader = instantiate(cfg.dataloader.test)
    records = DatasetCatalog.get(cfg.dataloader.test.dataset.name)
    samples = [sample for batch in loader for sample in batch]
    assert [s["sample_token"] for s in samples] == [r["sample_token"] for r in records]
    assert [s["sequence_start"] for s in samples] == [r["frame_index"] == 0 for r in records]
    for sample, record in zip(samples, records):
        check_sample(sample)
        assert "gaussian_voxel_indices" not in sample
        np.testing.assert_array_equal(sample["bda"].numpy(), np.eye(4))
        np.testing.assert_allclose(sample["lidar_origins"].numpy(), record["lidar_origins"], rtol=1e-6)
        assert sample["img"].shape[-2:] == (64, 176)  # the test mapper follows the train image size


def test_non_sequential_loader_marks_every_sample_as_a_sequence_start(synthetic_dataset, tmp_path):
    name = register_nuscenes_occupancy("test_loader_shuffled", synthetic_dataset.root, synthetic_dataset.version, "all",
                                       cache_dir=str(tmp_path))
    mapper = TemporalDatasetMapper(True, (88, 32), load_lidar_depth=False, dataset_name=name)
    loader = build_train_loader([name], mapper, total_batch_size=3, num_workers=0, sequential=False, seed=1)
    iterator = iter(loader)
    samples = [s for _ in range(2) for s in next(iterator)]
    assert all(s["sequence_start"] for s in samples)
    assert len({s["sample_token"] for s in samples}) == len(samples)
    assert len(build_test_loader(name, mapper, batch_size=3)) == -(-len(DatasetCatalog.get(name)) // 3)
