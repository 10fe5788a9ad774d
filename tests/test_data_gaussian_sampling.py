"""Which voxels become Gaussians: speed-bin rules, dataset-wide counts and weights, the law of
the draws, the candidate domain and the separate ray-visibility mask."""
import itertools
import json
import logging
import os
import pickle
import uuid

import numpy as np
import pytest
import torch

from voxelsplat.data import gaussian_sampling
from voxelsplat.data.build import build_train_loader
from voxelsplat.data.gaussian_sampling import (
    NUSCENES_OPENOCC_V2_CLASS_COUNTS,
    NUSCENES_OPENOCC_V2_SPEED_BIN_COUNTS,
    class_counts_in_label_order,
    count_dataset_voxels,
    gaussian_voxel_weights,
    inverse_frequency_weights,
    sample_gaussian_voxels,
    sample_voxels_by_weight,
    speed_bin_index,
)
from voxelsplat.data.loading import OccupancyLabelError
from voxelsplat.data.mapper import TemporalDatasetMapper
from voxelsplat.structures import DEFAULT_GRID, OPENOCC_V2_CLASSES, occupancy_metadata

NUM_CLASSES = len(OPENOCC_V2_CLASSES)
CAR, PEDESTRIAN, DRIVEABLE, FREE = (OPENOCC_V2_CLASSES.index(n) for n in
                                    ("car", "pedestrian", "driveable_surface", "free"))


# --- speed bins ---------------------------------------------------------------------------------


def test_speed_bin_rules_place_zero_and_the_edges_as_each_rule_says():
    speeds = np.array([0.0, 0.5, 1.0, 1.5, 10.0, 12.0])
    flow = np.stack([speeds, np.zeros_like(speeds)], axis=-1)
    # release: left-open bins (0,1], (1,2], (2,5], (5,10], (10,inf); speed 0 in the last bin
    assert speed_bin_index(flow, rule="release").tolist() == [4, 0, 0, 1, 3, 4]
    # corrected: [0,1), [1,2), [2,5), [5,10), [10,inf)
    assert speed_bin_index(flow, rule="corrected").tolist() == [0, 0, 1, 1, 4, 4]
    with pytest.raises(ValueError, match="unknown rule"):
        speed_bin_index(flow, rule="fastest")


def test_release_speed_bins_match_torch_bucketize_on_random_speeds():
    rng = np.random.default_rng(0)
    speeds = np.concatenate([rng.uniform(0, 15, 500), [0.0, 1.0, 2.0, 5.0, 10.0], rng.choice([0.0, 2.0], 50)])
    angle = rng.uniform(0, 2 * np.pi, len(speeds))
    flow = np.stack([speeds * np.cos(angle), speeds * np.sin(angle)], axis=-1)
    speed = torch.from_numpy(np.hypot(flow[:, 0], flow[:, 1]))
    # the released code's expression; index -1 picks the last entry of a weight table
    reference = torch.bucketize(speed, torch.tensor([0.0, 1.0, 2.0, 5.0, 10.0], dtype=torch.float64)) - 1
    reference = torch.where(reference < 0, 4, reference)
    assert speed_bin_index(flow, rule="release").tolist() == reference.tolist()
    corrected = [sum(s >= e for e in (1.0, 2.0, 5.0, 10.0)) for s in speed.tolist()]
    assert speed_bin_index(flow, rule="corrected").tolist() == corrected


# --- dataset-wide counts and weights on a two-scene toy dataset -----------------------------------

# 3 x 2 x 2 = 12 voxels per sample; per sample: {class: voxels} and the moving voxels' (class, vx, vy)
TOY_GRID = dict(point_cloud_range=[0.0, 0.0, 0.0, 1.2, 0.8, 0.8], voxel_size=0.4)
TOY_SHAPE = (3, 2, 2)
TOY_SCENES = {
    "scene-a": [
        # 2 cars (0.5 m/s, 3 m/s), 4 driveable, 6 free
        [(CAR, (0.5, 0.0)), (CAR, (0.0, 3.0))] + [(DRIVEABLE, (0, 0))] * 4 + [(FREE, (0, 0))] * 6,
        # 1 car at 12 m/s, 3 driveable, 8 free
        [(CAR, (12.0, 0.0))] + [(DRIVEABLE, (0, 0))] * 3 + [(FREE, (0, 0))] * 8,
    ],
    "scene-b": [
        # 1 pedestrian at exactly 1 m/s (0.6, 0.8), 5 driveable, 6 free
        [(PEDESTRIAN, (0.6, 0.8))] + [(DRIVEABLE, (0, 0))] * 5 + [(FREE, (0, 0))] * 6,
        [(FREE, (0, 0))] * 12,
    ],
}
# counted by hand: car 3, pedestrian 1, driveable 4+3+5 = 12, free 6+8+6+12 = 32 (48 voxels);
# speed bins (static in the first): 44 static + 0.5 m/s = 45 | 1 m/s | 3 m/s | none | 12 m/s
TOY_CLASS_COUNTS = {CAR: 3, PEDESTRIAN: 1, DRIVEABLE: 12, FREE: 32}
TOY_SPEED_BIN_COUNTS = [45, 1, 1, 0, 1]


def _toy_records(root, visible=False):
    records = []
    for scene, samples in TOY_SCENES.items():
        for frame, voxels in enumerate(samples):
            token = f"{scene}-{frame}"
            semantics = np.array([c for c, _ in voxels], np.uint8).reshape(TOY_SHAPE)
            flow = np.array([v for _, v in voxels], np.float32).reshape(TOY_SHAPE + (2,))
            path = os.path.join(root, scene, token, "labels.npz")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            arrays = dict(semantics=semantics, flow=flow)
            if visible:
                arrays["visible"] = np.ones(TOY_SHAPE, bool)
            np.savez(path, **arrays)
            records.append(dict(sample_token=token, scene_token=scene, scene_name=scene, frame_index=frame,
                                num_frames=len(samples), gt_path=path, gt_format="openocc_v2"))
    return records


def _toy_mapper(**options):
    metadata = occupancy_metadata("openocc_v2")
    metadata.update(TOY_GRID)
    regularizer = dict(num_gaussians=4, frame_offsets=(0,), **options)
    return TemporalDatasetMapper(True, (16, 8), metadata=metadata, regularizer=regularizer,
                                 dataset_name=None)


def test_dataset_counts_and_per_voxel_weights_of_a_two_scene_toy_dataset(tmp_path):
    records = _toy_records(str(tmp_path / "gt"))
    counts = count_dataset_voxels(records, TOY_SHAPE, NUM_CLASSES)
    expected_classes = np.zeros(NUM_CLASSES, np.int64)
    for cls, n in TOY_CLASS_COUNTS.items():
        expected_classes[cls] = n
    assert counts.class_counts.tolist() == expected_classes.tolist()
    assert counts.speed_bin_counts.tolist() == TOY_SPEED_BIN_COUNTS

    # the first sample of scene-a: voxel 0 car 0.5 m/s, voxel 1 car 3 m/s, voxel 2 driveable, voxel 11 free
    with np.load(records[0]["gt_path"]) as labels:
        semantics, flow = labels["semantics"], labels["flow"]
    eps = 1e-6
    # per class 1 / (n^0.5 + eps), normalised over all 17 classes (13 absent: 1 / eps each)
    class_terms = {CAR: 1 / (3 ** 0.5 + eps), PEDESTRIAN: 1 / (1 + eps), DRIVEABLE: 1 / (12 ** 0.5 + eps),
                   FREE: 1 / (32 ** 0.5 + eps)}
    class_norm = sum(class_terms.values()) + 13 / eps
    bin_terms = [1 / (45 ** 0.5 + eps), 1 / (1 + eps), 1 / (1 + eps), 1 / eps, 1 / (1 + eps)]
    bin_norm = sum(bin_terms)
    for rule, (bin_car_slow, bin_car_fast, bin_static) in (("corrected", (0, 2, 0)), ("release", (0, 2, 4))):
        weights = gaussian_voxel_weights(semantics, flow, None, inverse_frequency_weights(counts.class_counts),
                                         inverse_frequency_weights(counts.speed_bin_counts), speed_bin_rule=rule)
        flat = weights.reshape(-1)
        expected = {0: class_terms[CAR] * bin_terms[bin_car_slow], 1: class_terms[CAR] * bin_terms[bin_car_fast],
                    2: class_terms[DRIVEABLE] * bin_terms[bin_static], 11: class_terms[FREE] * bin_terms[bin_static]}
        for voxel, value in expected.items():
            assert flat[voxel] == pytest.approx(value / class_norm / bin_norm, rel=1e-9), (rule, voxel)
    # what the rules mean for a static voxel against the slow car: under "release" it takes the
    # weight of the 12 m/s bin (count 1) instead of the static bin (count 45)
    release = gaussian_voxel_weights(semantics, flow, None, inverse_frequency_weights(counts.class_counts),
                                     inverse_frequency_weights(counts.speed_bin_counts), speed_bin_rule="release")
    corrected = gaussian_voxel_weights(semantics, flow, None, inverse_frequency_weights(counts.class_counts),
                                       inverse_frequency_weights(counts.speed_bin_counts), speed_bin_rule="corrected")
    assert release.reshape(-1)[11] / release.reshape(-1)[0] == pytest.approx((3 / 32) ** 0.5 * 45 ** 0.5, rel=1e-5)
    assert corrected.reshape(-1)[11] / corrected.reshape(-1)[0] == pytest.approx((3 / 32) ** 0.5, rel=1e-5)
    with pytest.raises(ValueError, match="candidate mask"):
        gaussian_voxel_weights(semantics, flow, np.ones((3, 2, 1), bool), inverse_frequency_weights(counts.class_counts),
                               inverse_frequency_weights(counts.speed_bin_counts))


def test_dataset_counts_are_cached_atomically_and_keyed_by_the_label_files(tmp_path, monkeypatch):
    records = _toy_records(str(tmp_path / "gt"))
    cache = tmp_path / "cache"
    first = count_dataset_voxels(records, TOY_SHAPE, NUM_CLASSES, cache_dir=str(cache))
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("voxel_counts_") and files[0].endswith(".json")

    def no_reading(*args, **kwargs):
        raise AssertionError("labels read although the counts are cached")

    with monkeypatch.context() as patch:
        patch.setattr(gaussian_sampling, "load_occupancy_labels", no_reading)
        second = count_dataset_voxels(records, TOY_SHAPE, NUM_CLASSES, cache_dir=str(cache))
    assert second.class_counts.tolist() == first.class_counts.tolist()
    assert second.speed_bin_counts.tolist() == first.speed_bin_counts.tolist()
    # new content -> a new key, counted again
    with np.load(records[-1]["gt_path"]) as labels:
        semantics, flow = labels["semantics"].copy(), labels["flow"]
    semantics[0, 0, 0] = CAR
    np.savez(records[-1]["gt_path"], semantics=semantics, flow=flow, extra=np.zeros(3))
    third = count_dataset_voxels(records, TOY_SHAPE, NUM_CLASSES, cache_dir=str(cache))
    assert third.class_counts[CAR] == 4 and third.class_counts[FREE] == 31
    assert len(os.listdir(cache)) == 2 and not [f for f in os.listdir(cache) if ".tmp-" in f]
    os.remove(records[1]["gt_path"])
    with pytest.raises(FileNotFoundError, match=records[1]["sample_token"]):
        count_dataset_voxels(records, TOY_SHAPE, NUM_CLASSES, cache_dir=str(cache))


class _CreatesFolderWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize("tampering", ["pickle", "cut_json", "wrong_lengths", "negative_count"])
def test_tampered_count_cache_is_counted_again_never_executed(tmp_path, caplog, tampering):
    records = _toy_records(str(tmp_path / "gt"))
    cache = tmp_path / "cache"
    count_dataset_voxels(records, TOY_SHAPE, NUM_CLASSES, cache_dir=str(cache))
    (cache_file,) = cache.iterdir()
    good = cache_file.read_text()
    marker = tmp_path / "code_ran"
    if tampering == "pickle":
        cache_file.write_bytes(pickle.dumps({"class_counts": _CreatesFolderWhenUnpickled(str(marker))}))
    elif tampering == "cut_json":
        cache_file.write_text(good[: len(good) // 2])
    elif tampering == "wrong_lengths":
        cache_file.write_text(json.dumps({"class_counts": [1, 2], "speed_bin_counts": [3]}))
    else:
        cached = json.loads(good)
        cached["class_counts"][CAR] = -5
        cache_file.write_text(json.dumps(cached))

    with caplog.at_level(logging.WARNING, logger=gaussian_sampling.__name__):
        counts = count_dataset_voxels(records, TOY_SHAPE, NUM_CLASSES, cache_dir=str(cache))
    assert not marker.exists()
    assert str(cache_file) in caplog.text and "counting again" in caplog.text
    expected_classes = np.zeros(NUM_CLASSES, np.int64)
    for cls, n in TOY_CLASS_COUNTS.items():
        expected_classes[cls] = n
    assert counts.class_counts.tolist() == expected_classes.tolist()
    assert counts.speed_bin_counts.tolist() == TOY_SPEED_BIN_COUNTS
    # rewritten: the next start reads the counts again
    assert json.loads(cache_file.read_text())["class_counts"] == expected_classes.tolist()
    assert [f.name for f in cache.iterdir()] == [cache_file.name]


def test_loader_counts_the_training_split_once_in_the_main_process(tmp_path, monkeypatch):
    monkeypatch.setenv("VOXELSPLAT_CACHE_DIR", str(tmp_path / "cache"))
    records = _toy_records(str(tmp_path / "gt"), visible=True)
    mapper = _toy_mapper()
    assert mapper.regularizer["class_frequencies"] == "dataset" and mapper.needs_dataset_voxel_counts
    build_train_loader(records, mapper, total_batch_size=1, num_workers=0, seed=0)
    assert not mapper.needs_dataset_voxel_counts
    class_counts, speed_bin_counts = mapper._dataset_voxel_counts
    assert [class_counts[c] for c in TOY_CLASS_COUNTS] == list(TOY_CLASS_COUNTS.values())
    assert speed_bin_counts.tolist() == TOY_SPEED_BIN_COUNTS
    assert any(f.startswith("voxel_counts_") for f in os.listdir(tmp_path / "cache"))


def test_regularizer_frequency_options_are_validated():
    mapper = _toy_mapper(class_frequencies=NUSCENES_OPENOCC_V2_CLASS_COUNTS,
                         speed_bin_frequencies=NUSCENES_OPENOCC_V2_SPEED_BIN_COUNTS, speed_bin_rule="corrected")
    assert not mapper.needs_dataset_voxel_counts
    assert class_counts_in_label_order(mapper.regularizer["class_frequencies"], OPENOCC_V2_CLASSES)[CAR] == 89275612
    # the release's constants count the same 34149 x 200 x 200 x 16 voxels per class and per speed bin
    assert sum(NUSCENES_OPENOCC_V2_CLASS_COUNTS.values()) == sum(NUSCENES_OPENOCC_V2_SPEED_BIN_COUNTS) \
        == 34149 * 200 * 200 * 16
    assert list(NUSCENES_OPENOCC_V2_CLASS_COUNTS) == list(OPENOCC_V2_CLASSES)
    with pytest.raises(ValueError, match="missing classes"):
        class_counts_in_label_order({"car": 1}, OPENOCC_V2_CLASSES)
    with pytest.raises(ValueError, match="speed_bin_rule"):
        _toy_mapper(speed_bin_rule="fast")
    with pytest.raises(ValueError, match="5 speed bins"):
        _toy_mapper(speed_bin_frequencies=(1, 2, 3))
    with pytest.raises(ValueError, match="class_frequencies"):
        _toy_mapper(class_frequencies="global")


class _Messages(logging.Handler):
    """Collects the messages of one logger (independent of propagation to the root logger)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_missing_visibility_mask_is_reported_once_naming_the_dataset(tmp_path):
    records = _toy_records(str(tmp_path / "gt"))
    visible = _toy_records(str(tmp_path / "gt_visible"), visible=True)
    mapper = _toy_mapper(class_frequencies="sample", speed_bin_frequencies="sample")
    mapper.dataset_name = "toy_occ_train"
    handler = _Messages()
    logger = logging.getLogger("voxelsplat.data.mapper")
    logger.addHandler(handler)
    try:
        mapper.prepare(records)
        mapper.prepare(records)
        mapper._warn_no_visibility_mask()
        _toy_mapper(class_frequencies="sample", speed_bin_frequencies="sample").prepare(visible)
    finally:
        logger.removeHandler(handler)
    warnings = [m for m in handler.messages if "ray-visibility" in m]
    assert len(warnings) == 1 and "toy_occ_train" in warnings[0]


# --- the draws ----------------------------------------------------------------------------------


def test_first_draw_follows_the_weights_and_non_candidates_are_never_drawn():
    rng = np.random.default_rng(1)
    weights = rng.uniform(0.2, 3.0, size=(2, 2, 2))
    weights[0, 1, 1] = 0.0  # a candidate of weight 0 (e.g. non-visible): never drawn
    candidates = np.ones(weights.shape, bool)
    candidates[1, 0, 0] = False
    domain = np.where(candidates, weights, 0.0).reshape(-1)
    probability = domain / domain.sum()
    trials = 6000
    first = np.zeros(8)
    for seed in range(trials):
        picked = sample_voxels_by_weight(np.where(candidates, weights, 0.0), 1, np.random.default_rng(seed))
        first[np.ravel_multi_index(picked.T, weights.shape)] += 1
    assert first[np.ravel_multi_index((1, 0, 0), weights.shape)] == 0
    assert first[np.ravel_multi_index((0, 1, 1), weights.shape)] == 0
    standard_error = np.sqrt(probability * (1 - probability) / trials)
    np.testing.assert_array_less(np.abs(first / trials - probability), 4 * standard_error + 1e-12)
    # all positive-weight candidates when fewer than asked, never a repeat
    everything = sample_voxels_by_weight(np.where(candidates, weights, 0.0), 100, rng)
    assert sorted(np.ravel_multi_index(everything.T, weights.shape).tolist()) == np.flatnonzero(domain).tolist()


def test_draws_without_replacement_match_successive_sampling_probabilities():
    # exact law of torch.multinomial(p, 2, replacement=False): p_a * p_b / (1 - p_a), both orders
    weights = np.array([0.1, 0.5, 0.25, 1.0]).reshape(4, 1, 1)
    p = weights.reshape(-1) / weights.sum()
    expected = {}
    for a, b in itertools.permutations(range(4), 2):
        key = tuple(sorted((a, b)))
        expected[key] = expected.get(key, 0.0) + p[a] * p[b] / (1 - p[a])
    rng = np.random.default_rng(4)
    trials = 4000
    counts = {key: 0 for key in expected}
    for _ in range(trials):
        counts[tuple(sample_voxels_by_weight(weights, 2, rng)[:, 0].tolist())] += 1
    for key, probability in expected.items():
        standard_error = np.sqrt(probability * (1 - probability) / trials)
        assert abs(counts[key] / trials - probability) < 4 * standard_error, (key, counts[key] / trials, probability)


def test_sampled_classes_follow_dataset_weights_inside_the_candidates():
    rng = np.random.default_rng(2)
    shape = (30, 30, 6)
    semantics = rng.choice(NUM_CLASSES, size=shape, p=rng.dirichlet(np.full(NUM_CLASSES, 0.5))).astype(np.uint8)
    speeds = rng.choice([0.0, 0.5, 1.5, 3.0, 7.0, 15.0], size=shape, p=[0.6, 0.15, 0.1, 0.07, 0.05, 0.03])
    flow = np.stack([speeds, np.zeros(shape)], axis=-1).astype(np.float32)
    visible = rng.uniform(size=shape) < 0.6
    class_counts = rng.integers(1, 10**6, NUM_CLASSES)
    bin_counts = rng.integers(1, 10**6, 5)
    w_class, w_bin = inverse_frequency_weights(class_counts), inverse_frequency_weights(bin_counts)
    bins = speed_bin_index(flow, rule="release")
    weight = (w_class[semantics] * w_bin[bins])[visible]
    expected = np.bincount(semantics[visible], weights=weight, minlength=NUM_CLASSES) / weight.sum()
    num_samples, draws = 200, 30  # few samples per draw: without replacement ~ with replacement
    drawn = np.zeros(NUM_CLASSES)
    for _ in range(draws):
        index = sample_gaussian_voxels(semantics, flow, visible, num_samples, rng, class_counts, bin_counts,
                                       speed_bin_rule="release")
        assert len(np.unique(np.ravel_multi_index(index.T, shape))) == num_samples
        assert visible[tuple(index.T)].all()
        drawn += np.bincount(semantics[tuple(index.T)], minlength=NUM_CLASSES)
    total = num_samples * draws
    present = expected > 0
    chi2 = ((drawn[present] - total * expected[present]) ** 2 / (total * expected[present])).sum()
    assert chi2 < 40.0, (drawn / total, expected)  # 99.9 % quantile of chi-square, <= 16 dof, is < 40


# --- the ray-visibility mask from a separate root -----------------------------------------------


@pytest.fixture(scope="module")
def ray_mask_dataset(synthetic_dataset, tmp_path_factory):
    """The synthetic dataset registered with a separate ray-mask root whose ``ray_mask2`` is a
    function of each voxel's class (so it can be checked after any BEV augmentation)."""
    from detectron2.data import DatasetCatalog

    from voxelsplat.data.datasets import register_nuscenes_occupancy

    mask_root = tmp_path_factory.mktemp("ray_mask")
    name = register_nuscenes_occupancy(f"test_ray_mask_{uuid.uuid4().hex[:8]}", synthetic_dataset.root,
                                       synthetic_dataset.version, "all", cache_dir=str(tmp_path_factory.mktemp("c")),
                                       visible_mask_root=str(mask_root))
    records = DatasetCatalog.get(name)
    for record in records:
        with np.load(record["gt_path"]) as labels:
            mask = _ray_mask_of(labels["semantics"])
        path = mask_root / record["scene_name"] / record["sample_token"] / "labels.npz"
        path.parent.mkdir(parents=True)
        np.savez_compressed(path, ray_mask2=mask)
    return name, records


def _ray_mask_of(semantics):
    # free -> False, like the voxels a BEV rotation brings in from outside the grid
    return (semantics != FREE) & (semantics % 2 == 0)


def _mask_mapper(name, **kwargs):
    return TemporalDatasetMapper(True, (88, 32), load_lidar_depth=False, dataset_name=name, flip_prob=0.0,
                                 regularizer=dict(num_gaussians=3000, frame_offsets=(0,)), **kwargs)


def test_separate_ray_mask_is_loaded_and_bev_augmented_with_the_labels(ray_mask_dataset):
    from voxelsplat.data.build import SceneSequenceDataset

    name, records = ray_mask_dataset
    record = records[1]
    assert record["visible_mask_path"].endswith(os.path.join(record["scene_name"], record["sample_token"],
                                                             "labels.npz"))
    assert record["visible_mask_key"] == "ray_mask2"
    with np.load(record["gt_path"]) as labels:
        raw_mask = _ray_mask_of(labels["semantics"])
        assert not np.array_equal(raw_mask, labels["visible"])  # the labels' own mask is not the one used
    np.random.seed(0)
    flipped = SceneSequenceDataset(records, _mask_mapper(name, bda_flip_x_prob=1.0, bda_flip_y_prob=0.0))[1]
    np.testing.assert_array_equal(flipped["occ_visible"].numpy(), np.flip(raw_mask, axis=0))
    np.random.seed(1)
    rotated = SceneSequenceDataset(records, _mask_mapper(name, bda_rotation_range=(25.0, 35.0)))[1]
    assert not np.array_equal(rotated["occ_visible"].numpy(), raw_mask)
    np.testing.assert_array_equal(rotated["occ_visible"].numpy(), _ray_mask_of(rotated["occ_semantics"].numpy()))
    index = rotated["gaussian_voxel_indices"].numpy()
    assert len(index) == 3000 and rotated["occ_visible"].numpy()[tuple(index.T)].all()


def test_missing_or_damaged_ray_mask_is_reported_naming_the_file_and_sample(ray_mask_dataset, tmp_path):
    name, records = ray_mask_dataset
    mapper = _mask_mapper(name)
    for damage in ("missing", "corrupt", "missing_key"):
        record = dict(records[0], scene_records=[records[0]])
        path = tmp_path / damage / "labels.npz"
        path.parent.mkdir()
        if damage == "corrupt":
            path.write_bytes(b"not a zip archive")
        elif damage == "missing_key":
            np.savez(path, ray_mask=np.ones(DEFAULT_GRID.shape, bool))
        record["visible_mask_path"] = str(path)
        expected = FileNotFoundError if damage == "missing" else OccupancyLabelError
        with pytest.raises(expected) as error:
            mapper(record)
        assert str(path) in str(error.value) and record["sample_token"] in str(error.value)
        if damage == "missing_key":
            assert "ray_mask2" in str(error.value)


def test_voxels_without_ground_truth_get_no_weight_and_are_not_counted():
    """The ignore label (corners a BEV rotation brings in, as released) has weight 0."""
    from voxelsplat.data.gaussian_sampling import count_voxels, gaussian_voxel_weights

    semantics = np.array([[[0, 1], [255, 2]]])
    flow = np.zeros(semantics.shape + (2,))
    weights = gaussian_voxel_weights(semantics, flow, None, np.array([1.0, 2.0, 4.0]), np.ones(5))
    np.testing.assert_array_equal(weights, [[[1.0, 2.0], [0.0, 4.0]]])
    counts = count_voxels(semantics, flow, 3)
    np.testing.assert_array_equal(counts[0], [1, 1, 1])
    assert counts[1].sum() == 3
    with pytest.raises(ValueError, match="class 7 has no weight"):
        gaussian_voxel_weights(np.array([[[7]]]), None, None, np.ones(3), np.ones(5))
