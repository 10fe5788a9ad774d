"""A dataset's labels on another grid than OpenOcc v2's: the synthetic generator's
``point_cloud_range``, the ``occupancy_grid.json`` it writes, and everything that reads it
(the dataset's registration, the configs' model spec, the demo tools' dataset markers)."""
import glob
import json
import os
import sys

import numpy as np
import pytest

from voxelsplat.structures import (
    DEFAULT_GRID, GRID_FILE, OccupancyGrid, OccupancySpec, dataset_grid, grid_to_json, occupancy_spec,
)
from voxelsplat.synthetic import generate_synthetic_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_RANGE = (-25.6, -12.8, -1.0, 25.6, 12.8, 5.4)  # 128 x 64 x 16: not square, to catch swapped axes


def test_dataset_grid_reads_the_file_and_names_it_when_it_is_bad(tmp_path):
    assert dataset_grid(None) == DEFAULT_GRID and dataset_grid(str(tmp_path)) == DEFAULT_GRID
    grid = OccupancyGrid(SMALL_RANGE, 0.4)
    (tmp_path / GRID_FILE).write_text(grid_to_json(grid))
    assert dataset_grid(str(tmp_path)) == grid and grid.shape == (128, 64, 16)
    spec = occupancy_spec("openocc_v2", dataroot=str(tmp_path))
    assert spec.grid == grid and spec.num_classes == 17
    # an explicit range wins over the dataset's file; voxel size alone keeps the file's range
    assert occupancy_spec("openocc_v2", point_cloud_range=DEFAULT_GRID.point_cloud_range,
                          dataroot=str(tmp_path)).grid == DEFAULT_GRID
    assert occupancy_spec("openocc_v2", voxel_size=0.8, dataroot=str(tmp_path)).grid.shape == (64, 32, 8)
    bad = {
        "{not json": "JSONDecodeError",
        json.dumps({"voxel_size": 0.4}): "point_cloud_range",
        json.dumps({"point_cloud_range": [0, 0, 0, 1, 1], "voxel_size": 0.4}): "6 values",
        json.dumps({"point_cloud_range": list(SMALL_RANGE), "voxel_size": 0.4, "grid_shape": [64, 128, 16]}):
            "disagrees",
        json.dumps({"point_cloud_range": [-1, -1, -1, 1, 1, 1.1], "voxel_size": 0.4}): "whole number",
    }
    for text, reason in bad.items():
        (tmp_path / GRID_FILE).write_text(text)
        with pytest.raises(ValueError, match=reason) as error:
            dataset_grid(str(tmp_path))
        assert str(tmp_path / GRID_FILE) in str(error.value)


def _labels(root):
    found = {}
    for path in sorted(glob.glob(os.path.join(root, "openocc_v2", "*", "*", "labels.npz"))):
        with np.load(path) as data:
            found[os.path.relpath(path, root)] = {k: data[k] for k in data.files}
    return found


def test_generator_labels_on_a_smaller_grid_are_the_crop_of_the_default_ones_and_everything_reads_the_grid(tmp_path):
    from detectron2.config import LazyConfig, instantiate
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from voxelsplat.data.datasets import register_nuscenes_occupancy

    kwargs = dict(version="v1.0-mini", scenes=1, samples_per_scene=2, image_size=(64, 32), seed=0, workers=1)
    small = generate_synthetic_dataset(str(tmp_path / "small"), point_cloud_range=SMALL_RANGE, **kwargs)["root"]
    full = generate_synthetic_dataset(str(tmp_path / "full"), **kwargs)["root"]
    grid = OccupancyGrid(SMALL_RANGE, 0.4)
    assert dataset_grid(small) == grid and dataset_grid(full) == DEFAULT_GRID
    # the same world: images and LiDAR byte for byte, labels the crop of the default grid's
    for pattern in ("samples/CAM_FRONT/*.jpg", "samples/LIDAR_TOP/*.bin"):
        files = sorted(glob.glob(os.path.join(small, pattern)))
        assert files
        for path in files:
            with open(path, "rb") as a, open(os.path.join(full, os.path.relpath(path, small)), "rb") as b:
                assert a.read() == b.read()
    offset = np.round((grid.range_min - DEFAULT_GRID.range_min) / 0.4).astype(int)
    crop = tuple(slice(o, o + n) for o, n in zip(offset, grid.shape))
    small_labels, full_labels = _labels(small), _labels(full)
    assert sorted(small_labels) == sorted(full_labels) and len(small_labels) == 2
    for key, labels in small_labels.items():
        assert labels["semantics"].shape == grid.shape and labels["flow"].shape == (*grid.shape, 2)
        np.testing.assert_array_equal(labels["semantics"], full_labels[key]["semantics"][crop])
        np.testing.assert_array_equal(labels["flow"], full_labels[key]["flow"][crop])
        assert len(np.unique(labels["semantics"])) > 3  # not an empty crop
    for path in glob.glob(os.path.join(small, "gts", "*", "*", "labels.npz")):
        with np.load(path) as data:
            assert data["semantics"].shape == data["mask_camera"].shape == grid.shape
    with pytest.raises(ValueError, match="ego"):
        generate_synthetic_dataset(str(tmp_path / "x"), point_cloud_range=(1.0, -8, -1, 12.6, 8, 5.4), **kwargs)
    with pytest.raises(ValueError, match="point_cloud_range"):
        generate_synthetic_dataset(str(tmp_path / "x"), point_cloud_range=(-1.0, -1.0, 1.0), **kwargs)
    assert not os.path.exists(tmp_path / "x")

    # the registration's metadata, the mapper's labels and the config's model take the dataset's grid
    name = register_nuscenes_occupancy("grid_test_small", small, "v1.0-mini", "all")
    assert OccupancySpec.from_metadata(MetadataCatalog.get(name)).grid == grid
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "synthetic", "fbocc_tiny.py"))
    cfg = LazyConfig.apply_overrides(cfg, [f"dataloader.train.dataset.dataroot={small}",
                                           "dataloader.train.mapper.input_size=[128,48]",
                                           "model.head.subvoxel_factors=[2,2,2]"])
    cfg.dataloader.train.mapper.dataset_name = name
    mapper = instantiate(cfg.dataloader.train.mapper)
    sample = mapper(dict(DatasetCatalog.get(name)[0], sequence_start=True))
    assert tuple(sample["occ_semantics"].shape) == grid.shape
    model = instantiate(cfg.model).train()
    assert model.spec.grid == grid and tuple(model.grid_shape) == grid.shape
    losses = model([sample])
    total = sum(losses.values())
    assert np.isfinite(float(total.detach()))
    total.backward()
    output = model.eval()([sample])[0]
    assert tuple(output["occ"].shape) == grid.shape and tuple(output["flow"].shape) == (*grid.shape, 2)


def test_demo_tools_mark_the_grid_only_when_given_and_the_depth_pretraining_ignores_it(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import run_demo

    plain = run_demo.parse_args(["--data-dir", str(tmp_path / "x")])
    assert "point_cloud_range" not in run_demo.dataset_settings(plain)  # older markers stay valid
    ranged = run_demo.parse_args(["--data-dir", str(tmp_path / "x"), "--point-cloud-range", *map(str, SMALL_RANGE),
                                  "--pretrain-iters", "5", "--pretrain-dir", str(tmp_path / "p")])
    assert run_demo.dataset_settings(ranged)["point_cloud_range"] == list(SMALL_RANGE)
    # a pretraining made for the default grid is the one a smaller grid wants (same images and LiDAR)
    plain_pretrain = run_demo.parse_args(["--data-dir", str(tmp_path / "x"), "--pretrain-iters", "5",
                                          "--pretrain-dir", str(tmp_path / "p")])
    os.makedirs(tmp_path / "p")
    (tmp_path / "p" / "model_final.pth").write_bytes(b"")
    marker = {"config": run_demo.PRETRAIN_CONFIG, "iters": 5, "dataset": run_demo.dataset_settings(plain_pretrain),
              "overrides": []}
    (tmp_path / "p" / "depth_pretrain.json").write_text(json.dumps(marker))
    assert run_demo.ensure_depth_pretraining(ranged) == str(tmp_path / "p" / "model_final.pth")
