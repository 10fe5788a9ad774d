"""Dataset registration through the nuScenes devkit: records, splits, cache, errors."""
import os
import shutil
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from voxelsplat.data import datasets as occ_datasets
from voxelsplat.data.datasets import CAMERA_CHANNELS, register_nuscenes_occupancy, split_scene_names
from voxelsplat.data.mapper import TemporalDatasetMapper
from voxelsplat.structures import OPENOCC_V2_CLASSES, DEFAULT_GRID
from voxelsplat.utils.geometry import pose_to_transform, select_lidar_origins


def _unique(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _register(dataset, split, cache_dir, **kwargs):
    return register_nuscenes_occupancy(_unique(f"test_{split}"), dataset.root, dataset.version, split,
                                       cache_dir=str(cache_dir), **kwargs)


@pytest.fixture(scope="module")
def nusc(synthetic_dataset):
    from nuscenes.nuscenes import NuScenes

    return NuScenes(version=synthetic_dataset.version, dataroot=synthetic_dataset.root, verbose=False)


@pytest.fixture(scope="module")
def all_records(synthetic_dataset, tmp_path_factory):
    name = register_nuscenes_occupancy(_unique("test_all"), synthetic_dataset.root, synthetic_dataset.version, "all",
                                       cache_dir=str(tmp_path_factory.mktemp("cache")))
    return DatasetCatalog.get(name)


def test_records_hold_every_keyframe_in_time_order_with_devkit_geometry(synthetic_dataset, all_records, nusc):
    assert len(all_records) == sum(scene["nbr_samples"] for scene in nusc.scene)
    by_scene = {}
    for record in all_records:
        by_scene.setdefault(record["scene_name"], []).append(record)
    assert sorted(by_scene) == sorted(scene["name"] for scene in nusc.scene)
    for scene_records in by_scene.values():
        assert [r["frame_index"] for r in scene_records] == list(range(len(scene_records)))
        assert [r["timestamp"] for r in scene_records] == sorted(r["timestamp"] for r in scene_records)
        assert scene_records[0]["prev_sample_token"] == "" and scene_records[-1]["next_sample_token"] == ""
        for prev, cur in zip(scene_records, scene_records[1:]):
            assert cur["prev_sample_token"] == prev["sample_token"] and prev["next_sample_token"] == cur["sample_token"]
        lidar2global = np.stack([r["lidar"]["ego2global"] @ r["lidar"]["lidar2ego"] for r in scene_records])
        for record in scene_records:
            np.testing.assert_allclose(record["lidar_origins"], select_lidar_origins(lidar2global, record["ego2global"]))

    record = all_records[-1]
    sample = nusc.get("sample", record["sample_token"])
    assert [c["channel"] for c in record["cameras"]] == list(CAMERA_CHANNELS)
    assert record["gt_path"] == os.path.join(synthetic_dataset.root, "openocc_v2", record["scene_name"],
                                             record["sample_token"], "labels.npz")
    assert os.path.isfile(record["gt_path"]) and os.path.isfile(record["lidar"]["path"])
    for camera in record["cameras"]:
        data = nusc.get("sample_data", sample["data"][camera["channel"]])
        calibration = nusc.get("calibrated_sensor", data["calibrated_sensor_token"])
        pose = nusc.get("ego_pose", data["ego_pose_token"])
        assert camera["image_path"] == os.path.join(synthetic_dataset.root, data["filename"])
        assert os.path.isfile(camera["image_path"])
        np.testing.assert_allclose(camera["intrinsics"], calibration["camera_intrinsic"])
        # independent quaternion path: the devkit's pyquaternion
        from pyquaternion import Quaternion

        np.testing.assert_allclose(camera["cam2ego"][:3, :3], Quaternion(calibration["rotation"]).rotation_matrix,
                                   atol=1e-12)
        np.testing.assert_allclose(camera["ego2global"], pose_to_transform(pose["translation"], pose["rotation"]))
        assert camera["timestamp"] == data["timestamp"]
    lidar_data = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    lidar_pose = nusc.get("ego_pose", lidar_data["ego_pose_token"])
    np.testing.assert_allclose(record["ego2global"][:3, 3], lidar_pose["translation"])


def test_official_mini_split_and_metadata(synthetic_dataset, tmp_path):
    from nuscenes.utils.splits import create_splits_scenes

    official = create_splits_scenes()
    train = DatasetCatalog.get(_register(synthetic_dataset, "train", tmp_path))
    name = _register(synthetic_dataset, "val", tmp_path)
    val = DatasetCatalog.get(name)
    scenes = set(synthetic_dataset.scenes)
    assert {r["scene_name"] for r in train} == scenes & set(official["mini_train"])
    assert {r["scene_name"] for r in val} == scenes & set(official["mini_val"])
    metadata = MetadataCatalog.get(name)
    assert metadata.thing_classes == list(OPENOCC_V2_CLASSES)
    assert metadata.free_index == OPENOCC_V2_CLASSES.index("free")
    assert metadata.grid_shape == list(DEFAULT_GRID.shape) and metadata.voxel_size == DEFAULT_GRID.voxel_size
    assert metadata.flow_classes == list(range(8))


def test_deterministic_split_for_scenes_outside_the_official_lists():
    names = [f"my-scene-{i:03d}" for i in range(11)]
    train = split_scene_names("v2.0-custom", "train", names[::-1])
    val = split_scene_names("v2.0-custom", "val", names)
    assert sorted(train + val) == names and not set(train) & set(val)
    assert len(val) == 2 and val == split_scene_names("v2.0-custom", "val", list(reversed(names)))
    assert split_scene_names("v1.0-mini", "val", ["scene-0103", "scene-0061", "scene-0916"]) == ["scene-0103",
                                                                                                  "scene-0916"]
    # a mini-named version with foreign scenes falls back to the deterministic split
    assert split_scene_names("v1.0-mini", "val", names) == val
    with pytest.raises(ValueError, match="selects no scene"):
        split_scene_names("v1.0-mini", "val", ["scene-0061"])
    with pytest.raises(ValueError, match="unknown split"):
        split_scene_names("v1.0-mini", "holdout", ["scene-0061"])


def test_second_registration_reads_the_cache_without_the_devkit(synthetic_dataset, tmp_path, monkeypatch):
    first = DatasetCatalog.get(_register(synthetic_dataset, "all", tmp_path))
    cached = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert len(cached) == 1

    import nuscenes.nuscenes

    def no_devkit(*args, **kwargs):
        raise AssertionError("the devkit was loaded although the cache matches")

    monkeypatch.setattr(nuscenes.nuscenes, "NuScenes", no_devkit)
    second = DatasetCatalog.get(_register(synthetic_dataset, "all", tmp_path))
    assert [r["sample_token"] for r in second] == [r["sample_token"] for r in first]
    np.testing.assert_array_equal(second[0]["cameras"][2]["cam2ego"], first[0]["cameras"][2]["cam2ego"])
    # another split is another cache entry (and needs the devkit)
    with pytest.raises(AssertionError, match="devkit was loaded"):
        DatasetCatalog.get(_register(synthetic_dataset, "train", tmp_path))


def test_cache_key_follows_the_table_contents(synthetic_dataset, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(os.path.join(synthetic_dataset.root, synthetic_dataset.version), root / synthetic_dataset.version)
    key = occ_datasets._cache_path(str(tmp_path), str(root), synthetic_dataset.version, "all", "openocc_v2", "gt")
    assert key == occ_datasets._cache_path(str(tmp_path), str(root), synthetic_dataset.version, "all", "openocc_v2", "gt")
    with open(root / synthetic_dataset.version / "scene.json", "a") as f:
        f.write(" ")
    assert key != occ_datasets._cache_path(str(tmp_path), str(root), synthetic_dataset.version, "all", "openocc_v2",
                                           "gt")


def test_registration_is_idempotent_and_usable_as_a_lazy_call(synthetic_dataset, tmp_path):
    from detectron2.config import LazyCall, instantiate

    name = _unique("test_lazy")
    call = LazyCall(register_nuscenes_occupancy)(name=name, dataroot=synthetic_dataset.root,
                                                 version=synthetic_dataset.version, split="all",
                                                 cache_dir=str(tmp_path))
    assert instantiate(call) == name
    loader = DatasetCatalog[name]
    assert instantiate(call) == name
    assert DatasetCatalog[name] is loader  # same arguments: nothing re-registered


def test_dataroot_without_the_version_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "v1.0-trainval").mkdir()
    with pytest.raises(FileNotFoundError) as error:
        register_nuscenes_occupancy(_unique("test_missing"), str(tmp_path), "v1.0-mini", "train")
    assert "v1.0-mini" in str(error.value) and str(tmp_path) in str(error.value)
    assert "v1.0-trainval" in str(error.value)  # what was found instead


def _mapper_for(record, **kwargs):
    return TemporalDatasetMapper(is_train=False, input_size=(int(record["cameras"][0]["width"]),
                                                            int(record["cameras"][0]["height"])), **kwargs)


def test_missing_image_is_an_error_naming_the_file_and_the_sample(all_records, tmp_path):
    record = dict(all_records[1])
    record["cameras"] = [dict(c) for c in record["cameras"]]
    missing = str(tmp_path / "samples" / "CAM_BACK" / "gone.jpg")
    record["cameras"][3]["image_path"] = missing
    with pytest.raises(FileNotFoundError) as error:
        _mapper_for(record)(record)
    assert missing in str(error.value) and record["sample_token"] in str(error.value)


@pytest.mark.parametrize("damage", ["missing", "not_a_zip", "truncated", "missing_key", "wrong_shape"])
def test_missing_or_corrupt_labels_are_errors_naming_the_file_and_the_sample(all_records, tmp_path, damage):
    record = dict(all_records[2])
    path = tmp_path / "labels.npz"
    if damage == "not_a_zip":
        path.write_bytes(b"this is not an npz archive")
    elif damage == "truncated":
        path.write_bytes(open(record["gt_path"], "rb").read()[:300])
    elif damage == "missing_key":
        with np.load(record["gt_path"]) as labels:
            np.savez(path, semantics=labels["semantics"])
    elif damage == "wrong_shape":
        with np.load(record["gt_path"]) as labels:
            np.savez(path, semantics=labels["semantics"][:, :, :8], flow=labels["flow"][:, :, :8])
    record["gt_path"] = str(path)
    with pytest.raises((FileNotFoundError, ValueError)) as error:
        _mapper_for(record, load_lidar_depth=False)(record)
    assert str(path) in str(error.value) and record["sample_token"] in str(error.value)
    if damage == "missing_key":
        assert "flow" in str(error.value)


def test_occ3d_labels_give_masks_zero_flow_and_camera_mask_sampling(synthetic_dataset, tmp_path):
    from voxelsplat.data.build import SceneSequenceDataset
    from voxelsplat.structures import OCC3D_CLASSES
    from voxelsplat.structures.sample_fields import check_sample

    name = _register(synthetic_dataset, "all", tmp_path, gt_format="occ3d")
    records = DatasetCatalog.get(name)
    assert records[0]["gt_path"] == os.path.join(synthetic_dataset.root, "gts", records[0]["scene_name"],
                                                 records[0]["sample_token"], "labels.npz")
    assert MetadataCatalog.get(name).thing_classes == list(OCC3D_CLASSES)
    mapper = TemporalDatasetMapper(True, (88, 32), load_lidar_depth=False, dataset_name=name,
                                   regularizer=dict(num_gaussians=3000, frame_offsets=(0, 1)))
    np.random.seed(0)
    sample = SceneSequenceDataset(records, mapper)[(0, True)]
    check_sample(sample, with_regularizer=True)
    with np.load(records[0]["gt_path"]) as labels:
        assert int(sample["occ_semantics"].max()) <= len(OCC3D_CLASSES) - 1
        assert sample["occ_mask_camera"].sum() > 0 and sample["occ_mask_lidar"].dtype == torch.bool
        if "visible" not in labels.files:
            index = sample["gaussian_voxel_indices"]
            assert sample["occ_mask_camera"][index[:, 0], index[:, 1], index[:, 2]].all()
    assert float(sample["occ_flow"].abs().max()) == 0.0
