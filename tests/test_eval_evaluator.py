"""OccupancyEvaluator on mapped samples: numbers, processes, results files, submission, configs, do_test."""
import glob
import gzip
import json
import math
import os
import pickle
import re

import numpy as np
import pytest
import torch

from voxelsplat import testing
from voxelsplat.structures import OccupancySpec, occupancy_metadata
from voxelsplat.evaluation import (
    OccupancyEvaluator,
    cast_sample_rays,
    compute_occ3d_miou,
    compute_ray_metrics,
    lidar_ray_directions,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = OccupancySpec.for_label_set("openocc_v2")
FREE = SPEC.free_index
NUM_KEYFRAMES = 40  # keyframes per scene (about 20 s at 2 Hz, as in nuScenes)
FEW_RAYS = lidar_ray_directions(num_azimuths=24)  # 39 x 24 rays: the pattern's pitches, fewer azimuths


def make_sample(seed, *, with_gt=True, num_origins=None):
    """A mapped sample (voxelsplat.testing: a street with moving vehicles, seen from a random
    keyframe of its scene) with its camera mask, and a model output that gets most of it right:
    5% of the voxels relabelled at random, the grid shifted by up to 3 voxels along x, noisy flow."""
    rng = np.random.default_rng(seed)
    num_origins = int(rng.integers(1, 9)) if num_origins is None else num_origins
    sample = testing.make_sample(SPEC, seed, sample_token=f"token{seed:04d}", scene_token="scene0",
                                 frame_index=int(rng.integers(0, NUM_KEYFRAMES)), num_keyframes=NUM_KEYFRAMES,
                                 num_lidar_origins=num_origins, with_camera_mask=True, image_size=(88, 32),
                                 lidar_points=0)
    sem, flow = sample["occ_semantics"].numpy(), sample["occ_flow"].numpy()
    pred = sem.copy()
    flip = rng.random(sem.shape) < 0.05
    pred[flip] = rng.integers(0, SPEC.num_classes, size=int(flip.sum()))
    pred = np.roll(pred, int(rng.integers(-3, 4)), axis=0)
    pred_flow = flow + rng.normal(0, 0.3, size=flow.shape).astype(np.float32)
    if not with_gt:  # a test-split sample: no labels
        for key in ("occ_semantics", "occ_flow", "occ_mask_camera"):
            del sample[key]
    output = {"occ": torch.from_numpy(pred), "flow": torch.from_numpy(pred_flow)}
    return sample, output


def seed_of(sample):
    """The seed make_sample drew ``sample`` from (its token's number)."""
    return int(sample["sample_token"][len("token"):])


def reference_results(samples, outputs, ray_directions=None):
    return compute_ray_metrics([o["occ"] for o in outputs], [s["occ_semantics"] for s in samples],
                               [s["lidar_origins"] for s in samples], [o["flow"] for o in outputs],
                               [s["occ_flow"] for s in samples], ray_directions=ray_directions)


def on_gt_flow_classes(sample, flow):
    """``flow`` kept where the sample's GT holds a flow class, zero elsewhere (the flow the
    GT-occupancy floor reads)."""
    keep = np.isin(np.asarray(sample["occ_semantics"]), SPEC.flow_classes)
    return torch.as_tensor(flow) * torch.from_numpy(keep)[..., None]


def assert_same_numbers(got, expected, exact=False):
    assert set(expected) <= set(got)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        elif exact:
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_results_equal_compute_ray_metrics_and_json_is_written(tmp_path):
    pairs = [make_sample(seed, num_origins=n) for seed, n in ((0, 2), (1, 1), (2, 3))]
    samples, outputs = [p[0] for p in pairs], [p[1] for p in pairs]
    evaluator = OccupancyEvaluator(output_dir=str(tmp_path), compute_miou=True, distributed=False)
    evaluator.reset()
    evaluator.process(samples[:2], outputs[:2])
    evaluator.process(samples[2:], outputs[2:])
    results = evaluator.evaluate()["occupancy"]
    expected = reference_results(samples, outputs)  # the full 39 x 360 pattern
    assert 0 < expected["RayIoU"] < 100 and 0 < expected["mAVE"]
    assert_same_numbers(results, expected)
    # both flow errors: the challenge's mAVE (drives OccScore) and the true-positive variant
    assert 0 < results["mAVE_TP"] and results["mAVE_TP"] != pytest.approx(results["mAVE"])
    assert {"AVE/car", "AVE_TP/car"} <= set(results)
    miou = compute_occ3d_miou([o["occ"] for o in outputs], [s["occ_semantics"] for s in samples],
                              [s["occ_mask_camera"] for s in samples])
    assert_same_numbers(results, miou)

    with open(tmp_path / "inference" / "occupancy_results.json") as f:
        written = json.load(f)
    assert written["num_samples"] == 3
    for key, value in results.items():
        assert (written[key] is None) if math.isnan(value) else written[key] == pytest.approx(value), key
    assert not glob.glob(str(tmp_path / "inference" / ".tmp-*"))

    # reset() forgets the samples
    evaluator.reset()
    evaluator.process(samples[:1], outputs[:1])
    assert_same_numbers(evaluator.evaluate()["occupancy"], reference_results(samples[:1], outputs[:1]))


def test_exact_geometry_option_and_the_table_shows_both_flow_errors(caplog):
    pairs = [make_sample(seed, num_origins=2) for seed in (61, 62)]
    samples, outputs = [p[0] for p in pairs], [p[1] for p in pairs]
    evaluator = OccupancyEvaluator(distributed=False, ray_directions=FEW_RAYS, ray_precision="float64")
    evaluator.process(samples, outputs)
    with caplog.at_level("INFO", logger="voxelsplat.evaluation.evaluator"):
        results = evaluator.evaluate()["occupancy"]
    expected = compute_ray_metrics([o["occ"] for o in outputs], [s["occ_semantics"] for s in samples],
                                   [s["lidar_origins"] for s in samples], [o["flow"] for o in outputs],
                                   [s["occ_flow"] for s in samples], ray_directions=FEW_RAYS, ray_precision="float64")
    assert_same_numbers(results, expected)
    header = next(line for line in caplog.text.splitlines() if "RayIoU@1" in line)
    assert header.split()[-2:] == ["AVE", "AVE_TP"]
    with pytest.raises(ValueError, match="unknown ray_precision 'half'"):
        OccupancyEvaluator(ray_precision="half")


def test_bev_augmented_sample_moves_its_origins():
    sample, output = make_sample(5)
    flip = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0]))  # BEV flip of x, applied to the grids by the mapper
    sample["bda"] = flip
    evaluator = OccupancyEvaluator(distributed=False, ray_directions=FEW_RAYS)
    evaluator.process([sample], [output])
    flipped = dict(sample, lidar_origins=sample["lidar_origins"] * torch.tensor([-1.0, 1.0, 1.0]))
    assert_same_numbers(evaluator.evaluate()["occupancy"], reference_results([flipped], [output], FEW_RAYS))


def _evaluate_in_processes(result_file, seeds, output_dir):
    """Worker: each process evaluates its share of the samples; the main process saves the results."""
    from detectron2.utils import comm

    rank, world = comm.get_rank(), comm.get_world_size()
    evaluator = OccupancyEvaluator(output_dir=output_dir, ray_directions=FEW_RAYS, compute_miou=True,
                                   export_submission=True)
    evaluator.reset()
    for seed in seeds[rank::world]:
        sample, output = make_sample(seed)
        evaluator.process([sample], [output])
    results = evaluator.evaluate()
    if comm.is_main_process():
        with open(result_file, "wb") as f:
            pickle.dump(results, f)
    else:
        assert results == {}


def read_submission(path):
    with gzip.open(path, "rb") as f:
        return pickle.load(f)


def test_one_process_and_two_processes_give_the_same_numbers(tmp_path):
    from voxelsplat.engine import launch

    seeds = [11, 12, 13]
    one_dir, two_dir = str(tmp_path / "one"), str(tmp_path / "two")
    _evaluate_in_processes(str(tmp_path / "one.pkl"), seeds, one_dir)
    launch(_evaluate_in_processes, 2, dist_url="auto", backend="gloo",
           args=(str(tmp_path / "two.pkl"), seeds, two_dir))
    with open(tmp_path / "one.pkl", "rb") as f:
        one = pickle.load(f)["occupancy"]
    with open(tmp_path / "two.pkl", "rb") as f:
        two = pickle.load(f)["occupancy"]
    assert_same_numbers(two, one, exact=True)
    assert "mIoU" in one and "OccScore" in one
    sub_one = read_submission(os.path.join(one_dir, "inference", "submission.gz"))
    sub_two = read_submission(os.path.join(two_dir, "inference", "submission.gz"))
    assert sorted(sub_one["results"]) == sorted(sub_two["results"]) == [f"token{s:04d}" for s in seeds]
    for token, arrays in sub_one["results"].items():
        for key, value in arrays.items():
            np.testing.assert_array_equal(sub_two["results"][token][key], value, err_msg=f"{token} {key}")
    assert not os.path.exists(os.path.join(two_dir, "inference", ".submission_parts"))


def test_submission_holds_every_ray_of_every_sample(tmp_path):
    with_gt, output_a = make_sample(21, num_origins=2)
    without_gt, output_b = make_sample(22, with_gt=False, num_origins=1)  # a test-split sample: exported, not scored
    info = {"method": "VoxelSplat-R50", "team": "t"}
    evaluator = OccupancyEvaluator(output_dir=str(tmp_path), export_submission=True, submission_info=info,
                                   distributed=False)
    evaluator.reset()
    evaluator.process([with_gt, without_gt], [output_a, output_b])
    results = evaluator.evaluate()
    assert results["occupancy"]["RayIoU"] > 0
    submission = read_submission(tmp_path / "inference" / "submission.gz")
    assert submission["method"] == "VoxelSplat-R50" and submission["team"] == "t" and "authors" in submission
    assert sorted(submission["results"]) == ["token0021", "token0022"]
    for sample, output in ((with_gt, output_a), (without_gt, output_b)):
        arrays = submission["results"][sample["sample_token"]]
        num_rays = len(sample["lidar_origins"]) * len(lidar_ray_directions())
        assert arrays["pcd_cls"].dtype == np.uint8 and arrays["pcd_cls"].shape == (num_rays,)
        assert arrays["pcd_dist"].dtype == np.float16 and arrays["pcd_dist"].shape == (num_rays,)
        assert arrays["pcd_flow"].dtype == np.float16 and arrays["pcd_flow"].shape == (num_rays, 2)
        rays = cast_sample_rays(output["occ"], sample["lidar_origins"], pred_flow=output["flow"],
                                num_classes=SPEC.num_classes, free_index=FREE)
        np.testing.assert_array_equal(arrays["pcd_cls"], rays.pred_class.numpy())
        np.testing.assert_array_equal(arrays["pcd_dist"], rays.pred_depth.numpy().astype(np.float16))
        np.testing.assert_array_equal(arrays["pcd_flow"], rays.pred_flow.numpy().astype(np.float16))
        assert 0 < arrays["pcd_dist"].max() < 120 and np.isin(arrays["pcd_cls"], np.arange(SPEC.num_classes)).all()
    leftovers = [p for p in os.listdir(tmp_path / "inference")
                 if p not in ("submission.gz", "occupancy_results.json", "occupancy_sample_stats.npz")]
    assert leftovers == []
    # the per-frame counts add up to the reported numbers
    from voxelsplat.evaluation import sample_stats_from_arrays

    with np.load(tmp_path / "inference" / "occupancy_sample_stats.npz") as arrays:
        frames = sample_stats_from_arrays(arrays)
    assert len(frames) == json.loads((tmp_path / "inference" / "occupancy_results.json").read_text())["num_samples"]
    assert list(frames) == sorted(frames)


def test_nothing_half_written_when_the_export_fails(tmp_path):
    evaluator = OccupancyEvaluator(output_dir=str(tmp_path), export_submission=True, distributed=False,
                                   ray_directions=FEW_RAYS)
    evaluator.reset()
    for seed in (31, 32):
        evaluator.process(*map(lambda x: [x], make_sample(seed)))
    os.unlink(evaluator._spooled[1][1])  # a spooled part disappears before the export
    with pytest.raises(FileNotFoundError):
        evaluator.evaluate()
    folder = tmp_path / "inference"
    assert not (folder / "submission.gz").exists()
    assert not glob.glob(str(folder / ".tmp-*")) and not glob.glob(str(folder / "*.tmp"))


def test_bad_samples_and_outputs_are_named():
    sample, output = make_sample(41, with_gt=True)
    evaluator = OccupancyEvaluator(distributed=False, ray_directions=FEW_RAYS)
    with pytest.raises(KeyError, match="sample token0041 has no 'lidar_origins'"):
        evaluator.process([{k: v for k, v in sample.items() if k != "lidar_origins"}], [output])
    with pytest.raises(KeyError, match="model output for sample token0041 has no 'occ'"):
        evaluator.process([sample], [{"flow": output["flow"]}])
    with pytest.raises(KeyError, match="model output for sample token0041 has no 'flow'"):
        evaluator.process([sample], [{"occ": output["occ"]}])
    with pytest.raises(KeyError, match="sample token0041 has no 'occ_flow'"):
        evaluator.process([{k: v for k, v in sample.items() if k != "occ_flow"}], [output])
    with pytest.raises(ValueError, match=re.escape(f"sample token0041: prediction has shape {SPEC.grid.shape[:2]}")):
        evaluator.process([sample], [dict(output, occ=output["occ"][..., 0])])
    with pytest.raises(ValueError, match="sample token0041: predicted flow has .* non-finite"):
        evaluator.process([sample], [dict(output, flow=output["flow"] * float("nan"))])
    with pytest.raises(KeyError, match="sample token0041 has no 'occ_semantics'"):
        evaluator.process([make_sample(41, with_gt=False)[0]], [output])
    with pytest.raises(ValueError, match="export_submission=True needs an output_dir"):
        OccupancyEvaluator(export_submission=True, distributed=False).process([sample], [output])
    # occupancy only
    plain = OccupancyEvaluator(distributed=False, compute_flow=False, ray_directions=FEW_RAYS)
    plain.process([sample], [{"occ": output["occ"]}])
    assert "mAVE" not in plain.evaluate()["occupancy"]


@pytest.mark.parametrize("config", ["synthetic_occ", "nuscenes_occ"])
def test_evaluator_from_the_data_config_without_a_dataset_on_disk(config):
    from detectron2.config import LazyConfig, instantiate
    from detectron2.data import MetadataCatalog

    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "common", "data", f"{config}.py"))
    name = cfg.dataloader.test.dataset.name
    evaluator = instantiate(cfg.dataloader.evaluator)
    assert isinstance(evaluator, OccupancyEvaluator) and evaluator.dataset_name == name
    assert evaluator.output_dir is None  # do_test fills it with train.output_dir
    registered = hasattr(MetadataCatalog.get(name), "free_index")
    if not registered:  # what registering the test dataset (building the test loader) sets
        with pytest.raises(KeyError, match=f"{name}.*lacks"):
            _ = evaluator.class_names
        entries = {k: v for k, v in occupancy_metadata("openocc_v2").items() if k != "class_names"}
        MetadataCatalog.get(name).set(**entries)
    try:
        assert evaluator.class_names == list(SPEC.class_names) and evaluator.free_index == FREE
        assert evaluator.grid == SPEC.grid and evaluator.compute_flow
    finally:
        if not registered:
            MetadataCatalog.remove(name)


class _NoisyModel(torch.nn.Module):
    """Predicts each sample's stored output (see make_sample)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, batched_inputs):
        return [make_sample(seed_of(sample))[1] for sample in batched_inputs]


def _test_batches(seeds):
    return [[make_sample(seed)[0]] for seed in seeds]


def test_do_test_runs_the_configured_evaluator_and_reports_occupancy_metrics(tmp_path):
    from detectron2.config import LazyCall as L
    from detectron2.evaluation.testing import flatten_results_dict
    from omegaconf import OmegaConf

    from voxelsplat.engine.defaults import do_test

    cfg = OmegaConf.create()
    cfg.dataloader = OmegaConf.create()
    cfg.dataloader.test = L(_test_batches)(seeds=[51, 52])
    cfg.dataloader.evaluator = L(OccupancyEvaluator)(
        output_dir=None, ray_directions=L(lidar_ray_directions)(num_azimuths=24))
    cfg.train = OmegaConf.create({"output_dir": str(tmp_path)})
    results = do_test(cfg, _NoisyModel())
    flat = flatten_results_dict(results)
    samples = [make_sample(s) for s in (51, 52)]
    expected = reference_results([s for s, _ in samples], [o for _, o in samples], FEW_RAYS)
    for key in ("RayIoU", "RayIoU@1", "RayIoU@2", "RayIoU@4", "mAVE", "OccScore", "RayIoU/car"):
        assert flat[f"occupancy/{key}"] == pytest.approx(expected[key], rel=1e-12), key
    assert os.path.isfile(tmp_path / "inference" / "occupancy_results.json")


def test_miou_over_another_voxel_mask():
    pairs = [make_sample(seed, num_origins=1) for seed in (5, 6)]
    samples, outputs = [p[0] for p in pairs], [p[1] for p in pairs]
    rng = np.random.default_rng(7)
    for sample in samples:
        sample["occ_visible"] = torch.from_numpy(rng.random(SPEC.grid.shape) < 0.3)
    evaluator = OccupancyEvaluator(compute_miou=True, miou_mask="occ_visible", distributed=False,
                                   ray_directions=FEW_RAYS)
    evaluator.reset()
    evaluator.process(samples, outputs)
    results = evaluator.evaluate()["occupancy"]
    by_visible = compute_occ3d_miou([o["occ"] for o in outputs], [s["occ_semantics"] for s in samples],
                                    [s["occ_visible"] for s in samples])
    by_camera = compute_occ3d_miou([o["occ"] for o in outputs], [s["occ_semantics"] for s in samples],
                                   [s["occ_mask_camera"] for s in samples])
    assert results["mIoU"] == pytest.approx(by_visible["mIoU"]) and by_visible["mIoU"] != by_camera["mIoU"]
    with pytest.raises(KeyError, match="miou_mask"):
        OccupancyEvaluator(compute_miou=True, miou_mask="mask")
    del samples[0]["occ_visible"]
    evaluator.reset()
    with pytest.raises(KeyError, match="occ_visible"):
        evaluator.process(samples[:1], outputs[:1])


def test_flow_floors_equal_the_reference_with_zero_flow_and_with_gt_occupancy(caplog):
    pairs = [make_sample(seed, num_origins=n) for seed, n in ((71, 2), (72, 1), (73, 3))]
    samples, outputs = [p[0] for p in pairs], [p[1] for p in pairs]
    evaluator = OccupancyEvaluator(distributed=False, ray_directions=FEW_RAYS)
    evaluator.process(samples, outputs)
    with caplog.at_level("INFO", logger="voxelsplat.evaluation.evaluator"):
        results = evaluator.evaluate()["occupancy"]
    zero = [dict(o, flow=torch.zeros_like(o["flow"])) for o in outputs]
    on_gt = [dict(o, occ=s["occ_semantics"], flow=on_gt_flow_classes(s, o["flow"])) for s, o in zip(samples, outputs)]
    reference = {"zero_flow": reference_results(samples, zero, FEW_RAYS),
                 "gt_occupancy": reference_results(samples, on_gt, FEW_RAYS)}
    for name, expected in reference.items():
        for key in ("mAVE", "mAVE_TP"):
            got = results[f"{key}_{name}"]
            assert 0 < expected[key] and got == pytest.approx(expected[key], rel=1e-12), (name, key)
    # zero flow: the model's own rays, so occupancy is unchanged and only the flow error moves
    assert reference["zero_flow"]["RayIoU"] == results["RayIoU"]
    assert results["mAVE_zero_flow"] != pytest.approx(results["mAVE"])
    assert results["mAVE_gt_occupancy"] != pytest.approx(results["mAVE"])
    assert "mAVE of the predicted occupancy with zero flow" in caplog.text
    assert "mAVE of the predicted flow on the GT occupancy" in caplog.text
    # off on request, and never without flow
    for options in (dict(compute_flow_floors=False), dict(compute_flow=False)):
        plain = OccupancyEvaluator(distributed=False, ray_directions=FEW_RAYS, **options)
        plain.process(samples[:1], outputs[:1])
        assert not any(k.endswith(("_zero_flow", "_gt_occupancy")) for k in plain.evaluate()["occupancy"]), options


def test_gt_occupancy_flow_floor_reads_the_unmasked_flow_when_the_model_gives_it():
    """A model that zeroes its flow where it does not predict a flow class would otherwise score
    the zero-flow floor on the GT occupancy, whatever its flow head says."""
    pairs = [make_sample(seed, num_origins=2) for seed in (81, 82)]
    samples, outputs = [p[0] for p in pairs], [p[1] for p in pairs]
    rng = np.random.default_rng(3)
    unmasked = [torch.from_numpy(rng.normal(0, 3, tuple(o["flow"].shape))).float() for o in outputs]
    masked = [dict(o, flow=torch.zeros_like(o["flow"]), flow_unmasked=u) for o, u in zip(outputs, unmasked)]
    evaluator = OccupancyEvaluator(distributed=False, ray_directions=FEW_RAYS)
    evaluator.process(samples, masked)
    results = evaluator.evaluate()["occupancy"]
    on_gt = [dict(o, occ=s["occ_semantics"], flow=on_gt_flow_classes(s, u)) for s, o, u in zip(samples, outputs, unmasked)]
    expected = reference_results(samples, on_gt, FEW_RAYS)
    assert results["mAVE_gt_occupancy"] == pytest.approx(expected["mAVE"], rel=1e-12)
    assert results["mAVE_TP_gt_occupancy"] == pytest.approx(expected["mAVE_TP"], rel=1e-12)
    # only the GT's flow-class voxels count: the flow the head puts on the road and buildings does
    # not (a model's output never shows it there either), so the unmasked flow read everywhere differs
    everywhere = reference_results(samples, [dict(o, occ=s["occ_semantics"], flow=u)
                                             for s, o, u in zip(samples, outputs, unmasked)], FEW_RAYS)
    assert everywhere["mAVE"] != pytest.approx(expected["mAVE"])
    loud = [dict(m, flow_unmasked=torch.where(on_gt_flow_classes(s, torch.ones_like(u)) > 0, u, 50 * u))
            for s, m, u in zip(samples, masked, unmasked)]
    again = OccupancyEvaluator(distributed=False, ray_directions=FEW_RAYS)
    again.process(samples, loud)
    assert again.evaluate()["occupancy"]["mAVE_gt_occupancy"] == pytest.approx(results["mAVE_gt_occupancy"],
                                                                               rel=1e-12)
    # the submitted (masked) flow still decides mAVE itself: zero here, so it equals its zero-flow floor
    assert results["mAVE"] == pytest.approx(results["mAVE_zero_flow"])
    assert results["mAVE_gt_occupancy"] != pytest.approx(results["mAVE_zero_flow"])


def test_flow_floors_are_gathered_from_every_process(monkeypatch):
    """evaluate() on the main process of two: the other process's flow-floor counts are added in
    (real processes: test_one_process_and_two_processes_give_the_same_numbers, which compares every key)."""
    from detectron2.utils import comm

    seeds = [81, 82, 83]
    single = OccupancyEvaluator(distributed=False, ray_directions=FEW_RAYS)
    for seed in seeds:
        single.process(*map(lambda x: [x], make_sample(seed)))
    expected = single.evaluate()["occupancy"]
    ranks = [OccupancyEvaluator(ray_directions=FEW_RAYS) for _ in range(2)]
    for rank, evaluator in enumerate(ranks):
        for seed in seeds[rank::2]:
            evaluator.process(*map(lambda x: [x], make_sample(seed)))
    handed_over = []
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "synchronize", lambda: None)
    monkeypatch.setattr(comm, "is_main_process", lambda: True)
    monkeypatch.setattr(comm, "gather", lambda data, dst=0: handed_over.append(data) or [data])
    ranks[1].evaluate()  # what rank 1 sends to the main process
    monkeypatch.setattr(comm, "gather", lambda data, dst=0: [data] + handed_over)
    gathered = ranks[0].evaluate()["occupancy"]
    for key in [f"{m}_{name}" for m in ("mAVE", "mAVE_TP") for name in ("zero_flow", "gt_occupancy")]:
        assert not math.isnan(expected[key]) and gathered[key] == expected[key], key
