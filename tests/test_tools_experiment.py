"""tools/run_experiment.py's statistics: it reads each seed's per-frame counts, gates the
baseline and compares every other model with it, pairing seeds and frames."""
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from voxelsplat.structures import occupancy_metadata
from voxelsplat.evaluation import SAMPLE_STATS_FILE, SampleStats, sample_stats_to_arrays, summarize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import run_demo  # noqa: E402
import run_experiment  # noqa: E402

META = occupancy_metadata("openocc_v2")
CAR = META["class_names"].index("car")


def _frame(rng, car_tp):
    """One frame's counts: some rays of random classes, ``car_tp`` car TP rays at every threshold."""
    stats = SampleStats.zeros(len(META["class_names"]))
    stats.gt[:] = rng.integers(50, 100, stats.gt.shape)
    stats.pred[:] = rng.integers(50, 100, stats.pred.shape)
    stats.tp[:] = rng.integers(0, 30, stats.tp.shape)
    stats.tp[:, CAR] = car_tp
    stats.flow_tp[:] = stats.tp[1]
    stats.flow_error_sum[:] = stats.tp[1] * 0.5
    stats.flow_all_count[:] = np.where(stats.tp[1] > 0, 400, 0)
    stats.flow_all_error_sum[:] = stats.flow_all_count * 0.4
    stats.num_samples = 1
    return stats


def test_paired_statistics_reads_every_seeds_frames_gates_and_compares(tmp_path):
    rng = np.random.default_rng(0)
    names = [title for title, _, _ in run_demo.MODELS]
    seeds = (0, 1)
    frames = {}
    for title, folder, _ in run_demo.MODELS:
        frames[title] = []
        for seed in seeds:
            # the variant finds 20 more car rays in every frame
            by_token = {f"tok{i}": _frame(rng, 40 + (20 if title != names[0] else 0)) for i in range(3)}
            frames[title].append(by_token)
            out = tmp_path / f"seed{seed}" / folder / "inference"
            out.mkdir(parents=True)
            with open(out / SAMPLE_STATS_FILE, "wb") as f:
                np.savez(f, **sample_stats_to_arrays(by_token))
    per_model = {title: [{"mAVE_gt_occupancy": 0.3}, {"mAVE_gt_occupancy": 0.35}] for title in names}
    floors = {"floor: class prior": {"RayIoU": 5.0}, "floor: GT occupancy, zero flow": {"mAVE": 1.0}}
    args = SimpleNamespace(output_dir=str(tmp_path), seeds=seeds)
    gate, comparisons = run_experiment.paired_statistics(args, names, per_model, floors)
    baseline_ray_iou = np.mean([summarize(SampleStats.total(f.values()), META["class_names"],
                                          META["free_index"])["RayIoU"] for f in frames[names[0]]])
    criteria = gate.criteria
    assert criteria["ray_iou_over_class_prior"].value == pytest.approx(baseline_ray_iou)
    assert criteria["ray_iou_over_class_prior"].threshold == pytest.approx(10.0)
    assert list(criteria["class_true_positive_rays"].per_seed) == [120, 120]  # 3 frames x 40 car TP rays
    assert criteria["flow_vs_zero_flow"].value == pytest.approx(0.325) and criteria["flow_vs_zero_flow"].passed
    assert set(comparisons) == set(names[1:])
    car = comparisons[names[1]]["RayIoU"]
    assert car.difference > 0 and car.num_seeds == 2 and car.num_frames == 3
    assert "mIoU" not in comparisons[names[1]]  # these frames carry no voxel confusion matrix
    # with each frame's confusion matrix, mIoU is compared too (the variant's diagonal is larger)
    num_classes = len(META["class_names"])
    for title, folder, _ in run_demo.MODELS:
        for seed, by_token in zip(seeds, frames[title]):
            for stats in by_token.values():
                stats.confusion = rng.integers(1, 20, (num_classes, num_classes))
                stats.confusion[np.diag_indices(num_classes)] += 40 if title != names[0] else 0
            _write_frames(tmp_path / f"seed{seed}" / folder, by_token, exist_ok=True)
    miou = run_experiment.paired_statistics(args, names, per_model, floors)[1][names[1]]["mIoU"]
    baseline_miou = np.mean([summarize(SampleStats.total(f.values()), META["class_names"],
                                       META["free_index"])["mIoU"] for f in frames[names[0]]])
    assert miou.baseline == pytest.approx(baseline_miou) and miou.difference > 0
    # a seed without counts (a run made before the evaluator wrote them): statistics skipped
    os.remove(tmp_path / "seed1" / run_demo.MODELS[1][1] / "inference" / SAMPLE_STATS_FILE)
    assert run_experiment.paired_statistics(args, names, per_model, floors) == (None, {})


def _write_frames(run_dir, by_token, exist_ok=False):
    out = run_dir / "inference"
    out.mkdir(parents=True, exist_ok=exist_ok)
    with open(out / SAMPLE_STATS_FILE, "wb") as f:
        np.savez(f, **sample_stats_to_arrays(by_token))


def test_ablation_ladder_rows_in_order_with_frame_bootstrap_against_the_same_seeds_baseline(tmp_path):
    rng = np.random.default_rng(1)
    names = [title for title, _, _ in run_demo.MODELS]
    seed = 3
    car_rays = {names[0]: 40, names[1]: 70}
    car_rays.update({title: 40 + 10 * step for step, (title, _, _) in enumerate(run_demo.ABLATION_MODELS)})
    frames = {}
    for title, folder, _ in run_demo.ALL_MODELS:
        if title == names[2]:
            continue
        frames[title] = {f"tok{i}": _frame(rng, car_rays[title]) for i in range(4)}
        where = "ablation_seed3" if (title, folder, _) in run_demo.ABLATION_MODELS else "seed3"
        _write_frames(tmp_path / where / folder, frames[title])
    # the seeds' runs: metrics of seeds 1 and 3 (the ladder reads the entry of seed 3)
    per_model = {title: [{"RayIoU": 1.0, "mAVE": 0.1}, {"RayIoU": 3.0 + i, "mAVE": 0.3, "step_time_s": 0.7}]
                 for i, title in enumerate(names[:2])}
    ladder = {title: {"RayIoU": 10.0 + i, "mAVE": 0.5} for i, (title, _, _) in enumerate(run_demo.ABLATION_MODELS)}
    args = SimpleNamespace(output_dir=str(tmp_path), seeds=(1, 3), ablation_seed=seed)
    rows = run_experiment.ablation_ladder(args, names, per_model, ladder)
    titles = list(rows)
    assert titles == [names[0], *(t for t, _, _ in run_demo.ABLATION_MODELS), "VoxelSplat (+ propagated state)"]
    assert rows[names[0]]["metrics"]["RayIoU"] == 3.0 and rows[titles[-1]]["metrics"]["RayIoU"] == 4.0
    assert rows[titles[2]]["metrics"]["RayIoU"] == 11.0 and rows[names[0]]["differences"] == {}
    label_set = dict(class_names=META["class_names"], free_index=META["free_index"])
    for title, folder_title in zip(titles[1:], [t for t, _, _ in run_demo.ABLATION_MODELS] + [names[1]]):
        # the difference is the pooled RayIoU over the seed's frames, variant - baseline
        expected = (summarize(SampleStats.total(frames[folder_title].values()), **label_set)["RayIoU"]
                    - summarize(SampleStats.total(frames[names[0]].values()), **label_set)["RayIoU"])
        difference = rows[title]["differences"]["RayIoU"]
        assert difference["difference"] == pytest.approx(expected)
        assert difference["interval"][0] <= expected <= difference["interval"][1]
    assert rows[titles[-1]]["differences"]["RayIoU"]["difference"] > 0
    table = "\n".join(run_experiment.ablation_lines(seed, rows, names[0]))
    assert "Ablation ladder (seed 3" in table and table.count("\n| ") == len(titles) + 1
    # behind a failed gate: the rows without differences, and the table says so
    withheld = run_experiment.ablation_ladder(args, names, per_model, ladder, with_differences=False)
    assert all(row["differences"] == {} for row in withheld.values())
    assert "differences withheld" in "\n".join(run_experiment.ablation_lines(seed, withheld, names[0]))


def test_run_seed_pairs_initialisation_and_data_order_and_reuses_finished_seeds(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(run_demo, "main", lambda argv: calls.append(argv) or {"m": {"kind": "model"}})
    out = tmp_path / "seed4"
    results = run_experiment.run_seed(str(out), 4, ["fbocc_tiny", "voxelsplat_tiny"], ["--iters", "8"],
                                      ["train.num_threads=2"])
    assert results == {"m": {"kind": "model"}}
    argv = calls[0]
    assert argv[argv.index("--models") + 1:argv.index("--iters")] == ["fbocc_tiny", "voxelsplat_tiny"]
    # the same initialisation and the same data order and augmentation for every model of the seed
    assert "train.seed=4" in argv and "dataloader.train.seed=4" in argv and argv[-1] == "train.num_threads=2"
    run_demo.parse_args(argv)  # run_demo accepts it: the models are not swallowed by the overrides
    out.mkdir()
    finished = {"FB-Occ (baseline)": {"kind": "model", "RayIoU": 1.0}}
    (out / "results.json").write_text(json.dumps(finished))
    assert run_experiment.run_seed(str(out), 4, ["fbocc_tiny"], [], []) == finished
    assert len(calls) == 1
    # a seed whose results lack a model asked for (its baseline trained alone first) runs again:
    # run_demo reads the finished baseline back and trains the rest
    assert run_experiment.run_seed(str(out), 4, ["fbocc_tiny", "voxelsplat_tiny"], [], []) == {"m": {"kind": "model"}}
    assert len(calls) == 2 and calls[1][calls[1].index("--models") + 1:][:2] == ["fbocc_tiny", "voxelsplat_tiny"]


def test_finished_run_is_read_only_with_the_same_config_and_overrides(tmp_path):
    run_dir = tmp_path / "fbocc_tiny"
    run_dir.mkdir()
    config, overrides = "configs/synthetic/fbocc_tiny.py", ["train.max_iter=8", "train.seed=1"]
    assert run_demo.finished_run(str(run_dir), config, overrides) is None  # nothing there
    run_demo.write_json(str(run_dir / run_demo.RUN_MARKER),
                        {"config": config, "overrides": overrides, "train_time_s": 12.5})
    assert run_demo.finished_run(str(run_dir), config, overrides) is None  # no metrics.json yet
    (run_dir / "metrics.json").write_text('{"iteration": 7}\n')
    # the record is enough: the weights need not be kept
    assert run_demo.finished_run(str(run_dir), config, overrides) == (12.5, False)
    run_demo.write_json(str(run_dir / run_demo.RUN_MARKER),
                        {"config": config, "overrides": overrides, "train_time_s": 7.0, "resumed": True})
    assert run_demo.finished_run(str(run_dir), config, overrides) == (7.0, True)
    assert run_demo.finished_run(str(run_dir), config, ["train.max_iter=16", "train.seed=1"]) is None
    assert run_demo.finished_run(str(run_dir), "configs/synthetic/voxelsplat_tiny.py", overrides) is None


def test_finished_run_matches_its_paths_in_another_checkout(tmp_path):
    """A run's marker names the repository's paths relative to it: a record kept with the
    repository is read back in a checkout elsewhere; a path outside the repository stays as it is."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"iteration": 7}\n')
    config = "configs/synthetic/fbocc_tiny.py"
    here = [f"train.init_checkpoint={os.path.join(ROOT, 'output', 'p', 'model_final.pth')}", "train.seed=1",
            f"dataloader.train.dataset.dataroot={tmp_path / 'data'}"]
    assert run_demo.portable_overrides(here) == [os.path.join("train.init_checkpoint=output", "p", "model_final.pth"),
                                                 "train.seed=1", f"dataloader.train.dataset.dataroot={tmp_path / 'data'}"]
    # nested records (the floors' cache key): each string converted
    assert run_demo.portable_path({"train": {"dataroot": os.path.join(ROOT, "datasets", "b")}, "split": ["val", 3],
                                   "other": "/elsewhere/datasets/b"}) == {
        "train": {"dataroot": os.path.join("datasets", "b")}, "split": ["val", 3], "other": "/elsewhere/datasets/b"}
    elsewhere = ["train.init_checkpoint=/elsewhere/checkout/output/p/model_final.pth", "train.seed=1",
                 f"dataloader.train.dataset.dataroot={tmp_path / 'data'}"]
    run_demo.write_json(str(run_dir / run_demo.RUN_MARKER),
                        {"config": config, "overrides": ["train.init_checkpoint=output/p/model_final.pth",
                                                         "train.seed=1",
                                                         f"dataloader.train.dataset.dataroot={tmp_path / 'data'}"],
                         "train_time_s": 3.0})
    assert run_demo.finished_run(str(run_dir), config, here) == (3.0, False)
    assert run_demo.finished_run(str(run_dir), config, elsewhere) is None


def test_ablation_ladder_configs_switch_the_render_losses_on_one_by_one():
    from voxelsplat.engine import load_config

    steps = [config for _, _, config in run_demo.ABLATION_MODELS] + ["configs/synthetic/voxelsplat_tiny.py"]
    found = []
    for config in steps:
        regularizer = load_config(os.path.join(ROOT, config)).model.regularizer
        weights = regularizer.loss_weights
        found.append((weights["semantic"] > 0, weights["depth"] > 0, weights["flow"] > 0,
                      regularizer.propagate_by_flow))
    assert found == [(True, False, False, False), (True, True, False, False), (True, True, True, False),
                     (True, True, True, True)]
    full = load_config(os.path.join(ROOT, steps[-1]))
    for config in steps[:-1]:  # otherwise the VoxelSplat config: weights of the losses that are on, and the rest
        cfg = load_config(os.path.join(ROOT, config))
        for name, weight in cfg.model.regularizer.loss_weights.items():
            assert weight in (0.0, full.model.regularizer.loss_weights[name])
        assert cfg.optimizer.params.lr_multipliers == full.optimizer.params.lr_multipliers
        assert cfg.dataloader.train.mapper.regularizer == full.dataloader.train.mapper.regularizer


def _finished_run(folder, config, overrides, iteration):
    """A finished run as run_demo leaves it: marker, metrics, per-frame counts and weights."""
    (folder / "inference").mkdir(parents=True)
    run_demo.write_json(str(folder / run_demo.RUN_MARKER), {"config": config, "overrides": overrides,
                                                             "train_time_s": 1.0})
    (folder / "metrics.json").write_text(json.dumps({"iteration": iteration, "occupancy/RayIoU": 20.0 + iteration})
                                         + "\n")
    (folder / "config.yaml").write_text("train: {}\n")
    (folder / "inference" / SAMPLE_STATS_FILE).write_bytes(b"counts %d" % iteration)
    (folder / "model_final.pth").write_bytes(b"weights")
    (folder / "last_checkpoint").write_text("model_final.pth")


def test_records_keep_finished_runs_without_weights_and_are_read_back(tmp_path):
    """--records: the record of each finished run (not its weights, nor a run part-way) is kept;
    restored into an empty output folder, the runs read back as finished; a run already in the
    output folder, finished or part-way, is not overwritten."""
    out, records = tmp_path / "out", tmp_path / "records"
    config, overrides = "configs/synthetic/fbocc_tiny.py", ["train.seed=0"]
    _finished_run(out / "seed0" / "fbocc_tiny", config, overrides, 7)
    _finished_run(out / "seed0" / "voxelsplat_tiny", "configs/synthetic/voxelsplat_tiny.py", overrides, 9)
    part_way = out / "seed1" / "fbocc_tiny"
    part_way.mkdir(parents=True)
    (part_way / "metrics.json").write_text('{"iteration": 3}\n')
    (part_way / "last_checkpoint").write_text("model_0000199.pth")
    (out / "floors.json").write_text("{}")
    # the shared pretraining: kept with its weights alone, once
    import torch

    weights = {"conv.weight": torch.randn(4, 3, generator=torch.Generator().manual_seed(0))}
    (out / "depth_pretrain").mkdir()
    (out / "depth_pretrain" / "depth_pretrain.json").write_text('{"iters": 10}')
    torch.save({"model": weights, "trainer": {"iteration": 9}, "iteration": 9}, out / "depth_pretrain" / "model_final.pth")
    saved = run_experiment.save_records(str(out), str(records))
    assert "floors.json" in saved
    kept = sorted(os.path.relpath(os.path.join(r, f), records) for r, _, fs in os.walk(records) for f in fs)
    pretraining = [os.path.join("depth_pretrain", "depth_pretrain.json"), os.path.join("depth_pretrain", "model_final.pth")]
    assert kept == sorted(["floors.json"] + pretraining
                          + [os.path.join("seed0", run, name) for run in ("fbocc_tiny", "voxelsplat_tiny")
                             for name in (run_demo.RUN_MARKER, "metrics.json", "config.yaml",
                                          os.path.join("inference", SAMPLE_STATS_FILE))])
    kept_weights = torch.load(records / "depth_pretrain" / "model_final.pth", weights_only=True)
    assert list(kept_weights) == ["model"] and torch.equal(kept_weights["model"]["conv.weight"], weights["conv.weight"])
    # a pretraining repeated later (here: other weights) does not replace the one the runs started from
    torch.save({"model": {"conv.weight": weights["conv.weight"] + 1}}, out / "depth_pretrain" / "model_final.pth")
    assert not set(pretraining) & set(run_experiment.save_records(str(out), str(records)))
    assert torch.equal(torch.load(records / "depth_pretrain" / "model_final.pth", weights_only=True)["model"]["conv.weight"],
                       weights["conv.weight"])
    # a fresh output folder: every record comes back and reads as a finished run
    fresh = tmp_path / "fresh"
    restored = run_experiment.restore_records(str(records), str(fresh))
    assert sorted(restored) == kept
    assert run_demo.finished_run(str(fresh / "seed0" / "fbocc_tiny"), config, overrides) == (1.0, False)
    assert (fresh / "seed0" / "voxelsplat_tiny" / "inference" / SAMPLE_STATS_FILE).read_bytes() == b"counts 9"
    # a run already there is left as it is: here part-way (a checkpoint, no marker)
    (fresh / "seed0" / "fbocc_tiny" / run_demo.RUN_MARKER).unlink()
    (fresh / "seed0" / "fbocc_tiny" / "metrics.json").write_text('{"iteration": 2}\n')
    (fresh / "seed0" / "fbocc_tiny" / "last_checkpoint").write_text("model_0000199.pth")
    assert run_experiment.restore_records(str(records), str(fresh)) == []
    assert (fresh / "seed0" / "fbocc_tiny" / "metrics.json").read_text() == '{"iteration": 2}\n'
    assert not (fresh / "seed0" / "fbocc_tiny" / run_demo.RUN_MARKER).exists()
    assert run_experiment.restore_records(str(tmp_path / "missing"), str(fresh)) == []


def test_records_name_the_output_folder_their_runs_were_trained_under(tmp_path):
    """A run's settings name its folder, so records restored under another --output-dir do not
    read back as finished: the tool finds the folder they were recorded under, to say so."""
    trained, other = tmp_path / "experiment", tmp_path / "elsewhere"
    for seed, run in ((0, "fbocc_tiny"), (3, "voxelsplat_tiny")):
        run_dir = trained / f"seed{seed}" / run
        overrides = [f"train.output_dir={run_dir}", f"train.seed={seed}"]
        _finished_run(run_dir, "configs/synthetic/fbocc_tiny.py", overrides, 5)
    (trained / "ablation_seed0" / "voxelsplat_tiny_semantic").mkdir(parents=True)
    run_demo.write_json(str(trained / "ablation_seed0" / "voxelsplat_tiny_semantic" / run_demo.RUN_MARKER),
                        {"config": "c.py", "overrides": ["train.seed=0"], "train_time_s": 1.0})  # no folder named
    recorded = run_experiment._comparable_path(str(trained))
    assert run_experiment.recorded_output_dirs(str(trained)) == {recorded}
    run_experiment.restore_records(str(trained), str(other))
    assert run_experiment.recorded_output_dirs(str(other)) == {recorded}
    assert recorded != run_experiment._comparable_path(str(other))
    overrides = [f"train.output_dir={other / 'seed0' / 'fbocc_tiny'}", "train.seed=0"]
    assert run_demo.finished_run(str(other / "seed0" / "fbocc_tiny"), "configs/synthetic/fbocc_tiny.py",
                                 overrides) is None
    # inside the repository the folders are written relative to it, as the markers write them
    assert run_experiment._comparable_path(os.path.join(run_demo.ROOT, "output", "experiment", ".")) == \
        os.path.join("output", "experiment")
