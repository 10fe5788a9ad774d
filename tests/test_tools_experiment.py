"""tools/run_experiment.py's statistics: it reads each seed's per-frame counts, gates the
baseline and compares every other model with it, pairing seeds and frames."""
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
    # a seed without counts (a run made before the evaluator wrote them): statistics skipped
    os.remove(tmp_path / "seed1" / run_demo.MODELS[1][1] / "inference" / SAMPLE_STATS_FILE)
    assert run_experiment.paired_statistics(args, names, per_model, floors) == (None, {})
