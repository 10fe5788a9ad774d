"""Floors (voxelsplat.engine.floors): the per-voxel class prior, the previous keyframe's
ground truth, all free - built from records and labels alone and scored by the evaluator as a
model is scored."""
import math
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from voxelsplat.data.datasets import register_nuscenes_occupancy
from voxelsplat.structures import OPENOCC_V2_CLASSES, OccupancyGrid, grid_from_metadata, occupancy_metadata
from voxelsplat.evaluation import (
    OccupancyEvaluator,
    compute_occ3d_miou,
    compute_ray_metrics,
)
from voxelsplat.engine.floors import (
    FLOOR_NAMES,
    all_free_prediction,
    evaluate_floors,
    evaluation_sample,
    load_record_labels,
    per_voxel_class_mode,
    previous_gt_prediction,
    previous_keyframes,
)

FREE = OPENOCC_V2_CLASSES.index("free")


def reference_mode(volumes, num_classes):
    """Per voxel, by hand: count each class, take the first class with the largest count."""
    stack = np.stack([np.asarray(v).reshape(-1) for v in volumes])
    out = np.empty(stack.shape[1], np.int64)
    for voxel in range(stack.shape[1]):
        counts = [int((stack[:, voxel] == c).sum()) for c in range(num_classes)]
        out[voxel] = counts.index(max(counts))
    return out.reshape(np.asarray(volumes[0]).shape)


def test_class_prior_is_the_per_voxel_mode_with_ties_to_the_lower_class():
    rng = np.random.default_rng(0)
    for trial in range(5):
        num_classes = int(rng.integers(2, 6))
        shape = tuple(int(s) for s in rng.integers(2, 6, size=3))
        volumes = [rng.integers(0, num_classes, size=shape) for _ in range(int(rng.integers(1, 7)))]
        got = per_voxel_class_mode(volumes if trial % 2 else [torch.from_numpy(v) for v in volumes], num_classes)
        assert got.shape == shape and got.dtype == np.int64
        np.testing.assert_array_equal(got, reference_mode(volumes, num_classes))
    # ties: two frames disagreeing everywhere -> the lower class; free (the last class) wins when it is the mode
    a, b = np.array([[[3, 1, 4]]]), np.array([[[1, 3, 4]]])
    np.testing.assert_array_equal(per_voxel_class_mode([a, b], 5), [[[1, 1, 4]]])
    np.testing.assert_array_equal(per_voxel_class_mode([a, b, b], 5), [[[1, 3, 4]]])
    with pytest.raises(ValueError, match="no label volumes"):
        per_voxel_class_mode([], 5)
    with pytest.raises(ValueError, match=r"volume #1 holds classes in \[0, 5\]"):
        per_voxel_class_mode([a, np.array([[[0, 5, 1]]])], 5)


def test_previous_keyframe_is_the_same_scenes_and_none_at_scene_starts():
    records = [dict(sample_token=f"{scene}{frame}", scene_token=scene, frame_index=frame)
               for scene, frames in (("a", 3), ("b", 2)) for frame in range(frames)]
    shuffled = [records[i] for i in (4, 1, 3, 0, 2)]  # order does not matter
    previous = previous_keyframes(shuffled)
    assert [p and p["sample_token"] for p in previous] == ["b0", "a0", None, None, "a1"]
    # a scene start predicts all free, zero flow; otherwise the previous labels as stored
    free = previous_gt_prediction(None, (3, 4, 2), FREE)
    assert free["occ"].dtype == torch.long and bool((free["occ"] == FREE).all())
    assert free["flow"].shape == (3, 4, 2, 2) and not free["flow"].any()
    rng = np.random.default_rng(1)
    labels = dict(semantics=rng.integers(0, 17, (3, 4, 2)).astype(np.uint8),
                  flow=rng.normal(size=(3, 4, 2, 2)).astype(np.float32))
    stored = previous_gt_prediction(labels, (3, 4, 2), FREE)
    np.testing.assert_array_equal(stored["occ"].numpy(), labels["semantics"])
    np.testing.assert_array_equal(stored["flow"].numpy(), labels["flow"])
    no_flow = previous_gt_prediction(dict(labels, flow=None), (3, 4, 2), FREE)  # Occ3D labels: zero flow
    assert not no_flow["flow"].any()


@pytest.fixture(scope="module")
def synthetic_splits(synthetic_dataset, tmp_path_factory):
    """The synthetic dataset's train and val splits, registered under fresh names."""
    cache = str(tmp_path_factory.mktemp("floor_cache"))
    suffix = uuid.uuid4().hex[:8]
    names = [register_nuscenes_occupancy(f"test_floors_{split}_{suffix}", synthetic_dataset.root,
                                         synthetic_dataset.version, split, cache_dir=cache)
             for split in ("train", "val")]
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_floors_on_the_synthetic_data_equal_their_predictions_scored_directly(synthetic_splits):
    train, val = synthetic_splits
    evaluator = OccupancyEvaluator(val, distributed=False, compute_miou=True, miou_mask="occ_visible",
                                   compute_flow_floors=False)
    results = evaluate_floors(train, val, evaluator=evaluator)
    assert list(results) == list(FLOOR_NAMES)

    meta = MetadataCatalog.get(val)
    shape, num_classes = grid_from_metadata(meta).shape, len(meta.thing_classes)
    records = DatasetCatalog.get(val)
    labels = [load_record_labels(r, shape, num_classes) for r in records]
    assert len(records) >= 2 and len({r["scene_token"] for r in records}) == 1
    # the class prior, counted independently over the training labels
    train_semantics = np.stack([load_record_labels(r, shape, num_classes)["semantics"]
                                for r in DatasetCatalog.get(train)]).astype(np.int64)
    counts = np.stack([(train_semantics == c).sum(0) for c in range(num_classes)])
    prior = counts.argmax(0)
    # previous_gt, by frame index: all free at the scene's first keyframe
    order = {int(r["frame_index"]): i for i, r in enumerate(records)}
    previous = [labels[order[int(r["frame_index"]) - 1]] if int(r["frame_index"]) > 0 else None for r in records]
    zero = np.zeros(shape + (2,), np.float32)
    predictions = {
        "all_free": [(np.full(shape, FREE), zero)] * len(records),
        "class_prior": [(prior, zero)] * len(records),
        "previous_gt": [(np.full(shape, FREE), zero) if p is None else (p["semantics"], p["flow"]) for p in previous],
    }
    for name, preds in predictions.items():
        expected = compute_ray_metrics([p[0] for p in preds], [lab["semantics"] for lab in labels],
                                       [r["lidar_origins"] for r in records], [p[1] for p in preds],
                                       [lab["flow"] for lab in labels])
        expected.update(compute_occ3d_miou([p[0] for p in preds], [lab["semantics"] for lab in labels],
                                           [lab["visible"] for lab in labels]))
        for key, value in expected.items():
            got = results[name][key]
            assert (math.isnan(got) if math.isnan(value) else got == pytest.approx(value, rel=1e-9, abs=1e-9)), \
                (name, key, got, value)
    # all free: nothing is hit, so every IoU is 0 and no flow class is found (mAVE, mAVE_TP, OccScore NaN)
    free = results["all_free"]
    assert free["RayIoU"] == free["RayIoU@1"] == free["RayIoU@2"] == free["RayIoU@4"] == free["mIoU"] == 0.0
    assert math.isnan(free["mAVE"]) and math.isnan(free["mAVE_TP"]) and math.isnan(free["OccScore"])
    assert results["class_prior"]["RayIoU"] > 0 and results["previous_gt"]["RayIoU"] > 0


def _static_scene_dataset(tmp_path, grid):
    """One scene of two identical keyframes (ground, a moving car, a wall) on a small grid,
    registered as a dataset of plain records."""
    X, Y, Z = grid.shape
    semantics = np.full((X, Y, Z), FREE, np.uint8)
    semantics[:, :, :2] = 10
    semantics[25:30, 18:22, 2:6] = 0
    semantics[:, 35:, :10] = 14
    flow = np.zeros((X, Y, Z, 2), np.float32)
    flow[semantics == 0] = (4.0, -1.0)
    records = []
    for frame in range(2):
        path = tmp_path / f"frame{frame}" / "labels.npz"
        path.parent.mkdir()
        np.savez(path, semantics=semantics, flow=flow)
        records.append(dict(sample_token=f"static{frame}", scene_token="static", frame_index=frame,
                            gt_path=str(path), gt_format="openocc_v2", lidar_origins=np.array([[0.0, 0.0, 1.8]])))
    name = f"test_floors_static_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: records)
    entries = {k: v for k, v in occupancy_metadata("openocc_v2", grid).items() if k != "class_names"}
    MetadataCatalog.get(name).set(**entries)
    return name, records


def test_previous_gt_on_a_static_scene_is_perfect_after_the_first_keyframe(tmp_path):
    grid = OccupancyGrid((-8.0, -8.0, -1.0, 8.0, 8.0, 5.4), 0.4)  # 40 x 40 x 16
    name, records = _static_scene_dataset(tmp_path, grid)
    try:
        # the second keyframe alone, predicted by the first's labels: perfect
        evaluator = OccupancyEvaluator(name, distributed=False, compute_flow_floors=False)
        first, second = (load_record_labels(r, grid.shape, 17) for r in records)
        evaluator.process([evaluation_sample(records[1], second)], [previous_gt_prediction(first, grid.shape, FREE)])
        alone = evaluator.evaluate()["occupancy"]
        assert alone["RayIoU"] == alone["RayIoU@1"] == alone["RayIoU@4"] == 100.0
        assert alone["mAVE"] == 0.0 and alone["OccScore"] == 100.0

        # both keyframes through evaluate_floors: the first is all free (TP 0, Pred 0), the second
        # perfect (TP = GT = Pred), so every present class has IoU GT / 2GT = 1/2
        results = evaluate_floors(name, name, floors=("previous_gt", "all_free"))
        assert results["previous_gt"]["RayIoU"] == pytest.approx(50.0, abs=1e-12)
        assert results["previous_gt"]["mAVE"] == 0.0  # the all-free keyframe finds no flow class
        assert results["all_free"]["RayIoU"] == 0.0 and math.isnan(results["all_free"]["mAVE"])
        with pytest.raises(KeyError, match="unknown floors"):
            evaluate_floors(name, name, floors=("oracle",))
        with pytest.raises(ValueError, match="must write nothing"):
            evaluate_floors(name, name, evaluator=OccupancyEvaluator(name, output_dir=str(tmp_path)))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_all_free_prediction_is_free_with_zero_flow():
    pred = all_free_prediction((5, 6, 7), FREE)
    assert pred["occ"].shape == (5, 6, 7) and bool((pred["occ"] == FREE).all()) and pred["occ"].dtype == torch.long
    assert pred["flow"].shape == (5, 6, 7, 2) and pred["flow"].dtype == torch.float32 and not pred["flow"].any()


def test_motion_statistics_count_the_moving_voxels_of_the_flow_classes(synthetic_splits):
    from voxelsplat.data.loading import load_record_labels
    from voxelsplat.engine.floors import motion_statistics

    train, _ = synthetic_splits
    stats = motion_statistics(train)
    meta = MetadataCatalog.get(train)
    records = DatasetCatalog.get(train)
    # independent count: voxel by voxel over the labels
    total = moving = 0
    speeds = []
    for record in records:
        labels = load_record_labels(record, grid_from_metadata(meta).shape, len(meta.thing_classes))
        for cls in meta.flow_classes:
            where = labels["semantics"] == cls
            speed = np.hypot(labels["flow"][..., 0][where], labels["flow"][..., 1][where])
            total += int(where.sum())
            moving += int((speed > 0.5).sum())
            speeds += list(speed[speed > 0.5])
    assert stats["keyframes"] == len(records) and stats["flow_class_voxels"] == total > 0
    assert stats["moving_voxels"] == moving > 0
    assert stats["moving_share"] == pytest.approx(moving / total)
    assert stats["mean_moving_speed"] == pytest.approx(np.mean(speeds), rel=1e-6)
    assert motion_statistics(train, moving_speed=1e9)["moving_voxels"] == 0
    with pytest.raises(ValueError, match="moving_speed"):
        motion_statistics(train, moving_speed=-1.0)
