"""Paired bootstrap of pooled ray metrics, the benchmark gate and their markdown: hand-computed
cases, an exhaustive enumeration of every resample of a tiny experiment, and the slow
reference (``summarize(SampleStats.total(...))`` of each resample's drawn frames, seed by seed)."""
import itertools
import math

import numpy as np
import pytest

from voxelsplat.structures import OPENOCC_V2_CLASSES
from voxelsplat.evaluation.ray_metrics import RAY_IOU_THRESHOLDS, SampleStats, summarize
from voxelsplat.evaluation.statistics import (
    NO_EFFECT,
    UNDEFINED,
    VARIANT_BETTER,
    VARIANT_WORSE,
    benchmark_gate,
    format_markdown,
    higher_is_better,
    paired_bootstrap,
    sample_stats_from_arrays,
    sample_stats_to_arrays,
)

T = len(RAY_IOU_THRESHOLDS)
# a tiny label set: two objects with flow, a road, free
TINY = ("car", "truck", "road", "free")
TINY_FREE, TINY_FLOW = 3, [0, 1]
# the ones of the hand-computed cases
HAND = ("car", "road", "free")
HAND_FREE = 2
OPENOCC_FREE, OPENOCC_FLOW = 16, list(range(8))


def stats(tp, gt, pred, *, flow_sum=None, flow_count=None, flow_tp_sum=None, flow_tp=None, confusion=None):
    """SampleStats from per-class lists; ``tp`` per class (the same at every threshold) or (T, C)."""
    gt = np.asarray(gt, np.int64)
    c = gt.size
    tp = np.asarray(tp, np.int64)
    tp = np.tile(tp, (T, 1)) if tp.ndim == 1 else tp
    zeros_f, zeros_i = np.zeros(c, np.float64), np.zeros(c, np.int64)
    return SampleStats(tp=tp, gt=gt, pred=np.asarray(pred, np.int64),
                       flow_error_sum=zeros_f if flow_tp_sum is None else np.asarray(flow_tp_sum, np.float64),
                       flow_tp=zeros_i if flow_tp is None else np.asarray(flow_tp, np.int64),
                       flow_all_error_sum=zeros_f if flow_sum is None else np.asarray(flow_sum, np.float64),
                       flow_all_count=zeros_i if flow_count is None else np.asarray(flow_count, np.int64),
                       confusion=None if confusion is None else np.asarray(confusion, np.int64))


def random_frame(rng, num_classes, flow_classes, *, with_confusion=False, absent=0.3):
    """Consistent counts of one frame: TP nondecreasing in the threshold and <= min(GT, Pred);
    the challenge's flow sums for the classes with a 2 m TP; some classes absent."""
    gt = rng.integers(0, 30, num_classes) * (rng.random(num_classes) > absent)
    pred = rng.integers(0, 30, num_classes) * (rng.random(num_classes) > absent)
    room = np.minimum(gt, pred)
    tp = np.sort(rng.integers(0, room + 1, size=(T, num_classes)), axis=0)
    flow_tp = np.zeros(num_classes, np.int64)
    flow_tp[flow_classes] = tp[1, flow_classes]
    errors = rng.gamma(2.0, 0.3, size=int(gt.sum()))
    found = flow_tp > 0
    return SampleStats(
        tp=tp.astype(np.int64), gt=gt.astype(np.int64), pred=pred.astype(np.int64),
        flow_error_sum=flow_tp * rng.gamma(2.0, 0.2, num_classes), flow_tp=flow_tp,
        flow_all_error_sum=np.where(found, errors.sum(), 0.0), flow_all_count=np.where(found, errors.size, 0),
        confusion=rng.integers(0, 20, (num_classes, num_classes)) if with_confusion else None)


def random_experiment(rng, seeds, frames, num_classes, flow_classes, **kwargs):
    return [[random_frame(rng, num_classes, flow_classes, **kwargs) for _ in range(frames)] for _ in range(seeds)]


def reference_statistic(baseline, variant, seed_indices, frame_indices, metric, class_names, free_index,
                        flow_classes):
    """One resample the slow way: every drawn seed pooled over the drawn frames with
    SampleStats.total and summarize(); the mean over the drawn seeds (NaN-ignoring)."""
    differences = []
    for s in seed_indices:
        values = [summarize(SampleStats.total([model[s][f] for f in frame_indices]), class_names, free_index,
                            flow_classes)[metric] for model in (baseline, variant)]
        differences.append(values[1] - values[0])
    differences = np.asarray(differences)
    return float(np.nanmean(differences)) if (~np.isnan(differences)).any() else math.nan


def hand_experiment():
    """2 seeds x 2 frames of (car, road, free); TP the same at every threshold."""
    baseline = [
        [stats([1, 2, 0], [2, 2, 0], [2, 2, 0]), stats([1, 0, 0], [2, 2, 0], [2, 2, 0])],
        [stats([2, 2, 0], [2, 2, 0], [2, 2, 0]), stats([0, 2, 0], [2, 2, 0], [2, 2, 0])],
    ]
    variant = [
        [stats([2, 2, 0], [2, 2, 0], [2, 2, 0]), stats([2, 1, 0], [2, 2, 0], [2, 2, 0])],
        [stats([2, 2, 0], [2, 2, 0], [2, 2, 0]), stats([1, 2, 0], [2, 2, 0], [3, 2, 0])],
    ]
    return baseline, variant


# ------------------------------------------------------------------------ paired bootstrap


def test_point_estimate_and_single_resamples_match_hand_computation():
    baseline, variant = hand_experiment()
    # per seed pooled over both frames, IoU = TP / (GT + Pred - TP):
    #   baseline seed 0: car 2/6, road 2/6 -> 33.33; seed 1: car 2/6, road 4/4 -> 66.67
    #   variant  seed 0: car 4/4, road 3/5 -> 80.00; seed 1: car 3/6, road 4/4 -> 75.00
    # resample seeds (0, 1), frames (1, 1):
    #   baseline seed 0: car 2/6, road 0/8 -> 16.67; seed 1: car 0/8, road 4/4 -> 50
    #   variant  seed 0: car 4/4, road 2/6 -> 66.67; seed 1: car 2/8, road 4/4 -> 62.5
    # resample seeds (1, 1), frames (0, 0): both models 100 in seed 1 -> 0
    seed_indices = np.array([[0, 1], [0, 1], [1, 1]])
    frame_indices = np.array([[0, 1], [1, 1], [0, 0]])
    result = paired_bootstrap(baseline, variant, "RayIoU", class_names=HAND, free_index=HAND_FREE,
                              resamples=(seed_indices, frame_indices))["RayIoU"]
    assert result.baseline == pytest.approx(100 * (1 / 3 + 2 / 3) / 2)
    assert result.variant == pytest.approx(100 * (0.8 + 0.75) / 2)
    assert result.difference == pytest.approx(100 * ((0.8 - 1 / 3) + (0.75 - 2 / 3)) / 2)  # 27.5
    expected = [27.5, ((200 / 3 - 50 / 3) + (62.5 - 50)) / 2, 0.0]
    np.testing.assert_allclose(result.samples, expected, rtol=1e-12, atol=1e-12)
    assert result.num_resamples == 3 and result.num_undefined == 0
    assert (result.num_seeds, result.num_frames) == (2, 2)
    # linear interpolation of the sorted (0, 27.5, 31.25) at positions 2 x 0.025 and 2 x 0.975
    assert result.interval == pytest.approx((0.05 * 27.5, 27.5 + 0.95 * 3.75))
    assert result.verdict == VARIANT_BETTER  # the interval starts above 0


def test_mave_point_estimate_matches_hand_computation():
    # car is the only flow class; a frame adds its whole error sum and ray count to car
    def frame(error_sum, count):
        return stats([1, 1, 0], [2, 2, 0], [2, 2, 0], flow_sum=[error_sum, 0, 0], flow_count=[count, 0, 0])

    baseline = [[frame(4.0, 4), frame(2.0, 4)], [frame(3.0, 2), frame(1.0, 6)]]  # 6/8, 4/8
    variant = [[frame(2.0, 4), frame(1.0, 4)], [frame(1.0, 2), frame(0.5, 6)]]  # 3/8, 1.5/8: lower in every frame
    result = paired_bootstrap(baseline, variant, "mAVE", class_names=HAND, free_index=HAND_FREE,
                              flow_classes=[0], num_resamples=500)["mAVE"]
    assert result.baseline == pytest.approx((0.75 + 0.5) / 2)
    assert result.variant == pytest.approx((0.375 + 0.1875) / 2)
    assert result.difference == pytest.approx((-0.375 - 0.3125) / 2)
    assert not result.higher_is_better
    assert result.interval[1] < 0 and result.verdict == VARIANT_BETTER


@pytest.mark.parametrize("metric", ["RayIoU", "RayIoU@1", "RayIoU/car", "mAVE", "mAVE_TP", "AVE/truck",
                                    "AVE_TP/car", "OccScore", "mIoU", "IoU/road"])
def test_every_resample_of_a_tiny_experiment_matches_exhaustive_enumeration(metric):
    # this draw gives both verdicts across the metrics, and resamples where a flow metric is undefined
    rng = np.random.default_rng(0)
    baseline = random_experiment(rng, 2, 3, 4, TINY_FLOW, with_confusion=True, absent=0.25)
    variant = random_experiment(rng, 2, 3, 4, TINY_FLOW, with_confusion=True, absent=0.25)
    seed_draws = list(itertools.product(range(2), repeat=2))
    frame_draws = list(itertools.product(range(3), repeat=3))
    draws = list(itertools.product(seed_draws, frame_draws))  # all 4 x 27 equally likely resamples
    reference = np.array([reference_statistic(baseline, variant, s, f, metric, TINY, TINY_FREE, TINY_FLOW)
                          for s, f in draws])
    kwargs = dict(class_names=TINY, free_index=TINY_FREE, flow_classes=TINY_FLOW)
    result = paired_bootstrap(baseline, variant, metric, **kwargs,
                              resamples=(np.array([s for s, _ in draws]), np.array([f for _, f in draws])))[metric]
    np.testing.assert_allclose(result.samples, reference, rtol=1e-10, atol=1e-10, equal_nan=True)
    defined = reference[~np.isnan(reference)]
    assert result.num_undefined == reference.size - defined.size
    low, high = np.quantile(defined, [0.025, 0.975])
    assert result.interval == pytest.approx((low, high), rel=1e-10, abs=1e-10)
    if low <= 0 <= high:
        assert result.verdict == NO_EFFECT
    else:
        assert result.verdict == (VARIANT_BETTER if (low > 0) == higher_is_better(metric) else VARIANT_WORSE)
    # the point estimate is the resample that takes every seed and every frame once
    identity = next(i for i, (s, f) in enumerate(draws) if s == (0, 1) and f == (0, 1, 2))
    assert result.difference == pytest.approx(reference[identity], rel=1e-10, abs=1e-10, nan_ok=True)

    # random draws: only values of the enumerated support, in about the enumerated proportions
    drawn = paired_bootstrap(baseline, variant, metric, **kwargs, num_resamples=3000, rng=1)[metric]
    support = np.unique(np.round(defined, 9))
    values = drawn.samples[~np.isnan(drawn.samples)]
    assert np.isin(np.round(values, 9), support).all()
    assert abs(values.mean() - defined.mean()) < 5 * defined.std() / math.sqrt(values.size) + 1e-9


def test_the_same_draw_is_used_for_both_models_and_every_metric_and_a_seed_reproduces_it():
    rng = np.random.default_rng(3)
    baseline = random_experiment(rng, 5, 40, 17, OPENOCC_FLOW)
    variant = random_experiment(rng, 5, 40, 17, OPENOCC_FLOW)
    kwargs = dict(class_names=OPENOCC_V2_CLASSES, free_index=OPENOCC_FREE, flow_classes=OPENOCC_FLOW,
                  num_resamples=300)
    first = paired_bootstrap(baseline, variant, ["RayIoU", "mAVE"], rng=11, **kwargs)
    again = paired_bootstrap(baseline, variant, ["mAVE"], rng=11, **kwargs)
    other = paired_bootstrap(baseline, variant, ["mAVE"], rng=12, **kwargs)
    np.testing.assert_array_equal(first["mAVE"].samples, again["mAVE"].samples)
    assert not np.array_equal(first["mAVE"].samples, other["mAVE"].samples)
    assert list(first) == ["RayIoU", "mAVE"] and first["RayIoU"].num_resamples == 300
    # swapping the models negates every resample: the baseline and variant share each draw
    swapped = paired_bootstrap(variant, baseline, ["RayIoU"], rng=11, **kwargs)["RayIoU"]
    np.testing.assert_allclose(swapped.samples, -first["RayIoU"].samples, atol=1e-9)


def test_fast_resamples_match_the_slow_reference_on_the_openocc_label_set():
    rng = np.random.default_rng(5)
    baseline = random_experiment(rng, 5, 40, 17, OPENOCC_FLOW)
    variant = random_experiment(rng, 5, 40, 17, OPENOCC_FLOW)
    seed_indices = rng.integers(0, 5, (6, 5))
    frame_indices = rng.integers(0, 40, (6, 40))
    metrics = ["RayIoU", "RayIoU@2", "RayIoU/pedestrian", "mAVE", "mAVE_TP", "OccScore"]
    results = paired_bootstrap(baseline, variant, metrics, class_names=OPENOCC_V2_CLASSES, free_index=OPENOCC_FREE,
                               flow_classes=OPENOCC_FLOW, resamples=(seed_indices, frame_indices))
    for metric in metrics:
        reference = [reference_statistic(baseline, variant, s, f, metric, OPENOCC_V2_CLASSES, OPENOCC_FREE,
                                         OPENOCC_FLOW) for s, f in zip(seed_indices, frame_indices)]
        np.testing.assert_allclose(results[metric].samples, reference, rtol=1e-10, atol=1e-10)
        per_seed = [[summarize(SampleStats.total(model[s]), OPENOCC_V2_CLASSES, OPENOCC_FREE, OPENOCC_FLOW)[metric]
                     for s in range(5)] for model in (baseline, variant)]
        assert results[metric].baseline == pytest.approx(np.mean(per_seed[0]))
        assert results[metric].variant == pytest.approx(np.mean(per_seed[1]))
        assert results[metric].difference == pytest.approx(np.mean(np.subtract(per_seed[1], per_seed[0])))


def test_identical_models_give_zero_difference_and_no_effect():
    rng = np.random.default_rng(0)
    runs = random_experiment(rng, 5, 40, 17, OPENOCC_FLOW)
    results = paired_bootstrap(runs, runs, ["RayIoU", "RayIoU@1", "mAVE", "mAVE_TP", "OccScore"],
                               class_names=OPENOCC_V2_CLASSES, free_index=OPENOCC_FREE, flow_classes=OPENOCC_FLOW,
                               num_resamples=1000)
    for result in results.values():
        assert result.difference == 0.0
        assert result.interval == (0.0, 0.0)
        assert result.verdict == NO_EFFECT


def _with_more_true_positives(runs):
    """Every frame, class and threshold with room for it gets one more TP ray (GT and Pred kept)."""
    out = []
    for frames in runs:
        seed = []
        for item in frames:
            room = item.tp < np.minimum(item.gt, item.pred)[None, :]
            seed.append(SampleStats(tp=item.tp + room, gt=item.gt, pred=item.pred, flow_error_sum=item.flow_error_sum,
                                    flow_tp=item.flow_tp, flow_all_error_sum=item.flow_all_error_sum,
                                    flow_all_count=item.flow_all_count))
        out.append(seed)
    return out


def _with_scaled_flow_errors(runs, factor):
    return [[SampleStats(tp=i.tp, gt=i.gt, pred=i.pred, flow_error_sum=i.flow_error_sum * factor, flow_tp=i.flow_tp,
                         flow_all_error_sum=i.flow_all_error_sum * factor, flow_all_count=i.flow_all_count)
             for i in frames] for frames in runs]


def test_more_true_positives_everywhere_is_better_and_fewer_is_worse():
    rng = np.random.default_rng(1)
    baseline = random_experiment(rng, 5, 40, 17, OPENOCC_FLOW)
    better = _with_more_true_positives(baseline)
    kwargs = dict(class_names=OPENOCC_V2_CLASSES, free_index=OPENOCC_FREE, num_resamples=2000)
    metrics = ["RayIoU", "RayIoU@1", "RayIoU@2", "RayIoU@4"]
    for result in paired_bootstrap(baseline, better, metrics, **kwargs).values():
        assert result.difference > 0 and result.interval[0] > 0
        assert result.verdict == VARIANT_BETTER
    for result in paired_bootstrap(better, baseline, metrics, **kwargs).values():
        assert result.difference < 0 and result.interval[1] < 0
        assert result.verdict == VARIANT_WORSE


def test_mave_lower_is_better():
    rng = np.random.default_rng(2)
    baseline = random_experiment(rng, 5, 40, 17, OPENOCC_FLOW)
    kwargs = dict(class_names=OPENOCC_V2_CLASSES, free_index=OPENOCC_FREE, flow_classes=OPENOCC_FLOW,
                  num_resamples=1000)
    lower = paired_bootstrap(baseline, _with_scaled_flow_errors(baseline, 0.5), ["mAVE", "mAVE_TP", "OccScore"],
                             **kwargs)
    assert lower["mAVE"].interval[1] < 0 and lower["mAVE"].verdict == VARIANT_BETTER
    assert lower["mAVE_TP"].interval[1] < 0 and lower["mAVE_TP"].verdict == VARIANT_BETTER
    assert lower["OccScore"].interval[0] > 0 and lower["OccScore"].verdict == VARIANT_BETTER
    higher = paired_bootstrap(baseline, _with_scaled_flow_errors(baseline, 1.5), ["mAVE"], **kwargs)["mAVE"]
    assert higher.interval[0] > 0 and higher.verdict == VARIANT_WORSE


def test_the_metric_is_pooled_over_frames_not_averaged():
    # per-frame car IoU: baseline 1 and 0 (mean 0.5), variant 0 and 1 (mean 0.5): no difference by frame means;
    # pooled: baseline TP 1 / (10 + 10 - 1) = 1/19, variant TP 9 / (10 + 10 - 9) = 9/11
    baseline = [[stats([1, 0], [1, 0], [1, 0]), stats([0, 0], [9, 0], [9, 0])]]
    variant = [[stats([0, 0], [1, 0], [1, 0]), stats([9, 0], [9, 0], [9, 0])]]
    names, free = ("car", "free"), 1
    frame_means = [np.mean([summarize(f, names, free)["RayIoU"] for f in model[0]]) for model in (baseline, variant)]
    assert frame_means[0] == pytest.approx(frame_means[1])
    result = paired_bootstrap(baseline, variant, "RayIoU", class_names=names, free_index=free,
                              num_resamples=200)["RayIoU"]
    assert result.baseline == pytest.approx(100 / 19)
    assert result.variant == pytest.approx(900 / 11)
    assert result.difference == pytest.approx(100 * (9 / 11 - 1 / 19))


def test_token_mappings_are_aligned_by_token():
    rng = np.random.default_rng(4)
    baseline = random_experiment(rng, 2, 4, 4, TINY_FLOW)
    variant = random_experiment(rng, 2, 4, 4, TINY_FLOW)
    tokens = ["d", "a", "c", "b"]
    as_maps = [[dict(reversed(list(zip(tokens, frames)))) for frames in model] for model in (baseline, variant)]
    in_token_order = [[[frames[tokens.index(t)] for t in sorted(tokens)] for frames in model]
                      for model in (baseline, variant)]
    kwargs = dict(class_names=TINY, free_index=TINY_FREE, flow_classes=TINY_FLOW, num_resamples=200, rng=3)
    from_maps = paired_bootstrap(*as_maps, ["RayIoU", "mAVE"], **kwargs)
    from_lists = paired_bootstrap(*in_token_order, ["RayIoU", "mAVE"], **kwargs)
    for metric in from_maps:
        np.testing.assert_array_equal(from_maps[metric].samples, from_lists[metric].samples)
    broken = [dict(m) for m in as_maps[1]]
    broken[1]["e"] = broken[1].pop("a")
    with pytest.raises(ValueError, match="seed #1: frames differ"):
        paired_bootstrap(as_maps[0], broken, "RayIoU", **kwargs)


def test_saved_per_frame_counts_load_back_in_token_order(tmp_path):
    rng = np.random.default_rng(8)
    frames = random_experiment(rng, 1, 3, 4, TINY_FLOW, with_confusion=True)[0]
    stats_by_token = {"tok-c": frames[0], "tok-a": frames[1], "tok-b": frames[2]}
    path = tmp_path / "stats.npz"
    np.savez(path, **sample_stats_to_arrays(stats_by_token))
    with np.load(path) as arrays:  # no pickle needed
        loaded = sample_stats_from_arrays(arrays)
    assert list(loaded) == ["tok-a", "tok-b", "tok-c"]
    for token, item in stats_by_token.items():
        for name in ("tp", "gt", "pred", "flow_error_sum", "flow_tp", "flow_all_error_sum", "flow_all_count",
                     "confusion"):
            np.testing.assert_array_equal(getattr(loaded[token], name), getattr(item, name))
    without_confusion = sample_stats_to_arrays({"a": stats([1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0])})
    assert "confusion" not in without_confusion
    assert sample_stats_from_arrays(without_confusion)["a"].confusion is None
    with pytest.raises(KeyError, match="missing \\['flow_tp'\\]"):
        sample_stats_from_arrays({k: v for k, v in without_confusion.items() if k != "flow_tp"})


def test_bad_inputs_are_named():
    rng = np.random.default_rng(6)
    baseline = random_experiment(rng, 2, 3, 4, TINY_FLOW)
    kwargs = dict(class_names=TINY, free_index=TINY_FREE, flow_classes=TINY_FLOW, num_resamples=10)
    with pytest.raises(ValueError, match="variant seed #1: 2 frames, seed #0 has 3"):
        paired_bootstrap(baseline, [baseline[0], baseline[1][:2]], "RayIoU", **kwargs)
    with pytest.raises(ValueError, match="same seeds and frames"):
        paired_bootstrap(baseline, baseline[:1], "RayIoU", **kwargs)
    with pytest.raises(ValueError, match="unknown metric 'RayIoU@3'"):
        paired_bootstrap(baseline, baseline, "RayIoU@3", **kwargs)
    with pytest.raises(ValueError, match="unknown metric 'RayIoU/free'"):
        paired_bootstrap(baseline, baseline, "RayIoU/free", **kwargs)
    with pytest.raises(ValueError, match="'AVE/road'.*not a flow class"):
        paired_bootstrap(baseline, baseline, "AVE/road", **kwargs)
    with pytest.raises(ValueError, match="confusion"):
        paired_bootstrap(baseline, baseline, "mIoU", **kwargs)
    with pytest.raises(ValueError, match=r"baseline seed #0 frame #0: tp has shape \(3, 4\), expected \(3, 3\)"):
        paired_bootstrap(baseline, baseline, "RayIoU", **dict(kwargs, class_names=HAND, free_index=HAND_FREE))


def test_a_metric_undefined_in_every_resample_is_undefined():
    # truck never appears: its AVE is NaN everywhere
    frame = stats([1, 0, 1, 0], [2, 0, 2, 0], [2, 0, 2, 0], flow_sum=[1.0, 0, 0, 0], flow_count=[4, 0, 0, 0])
    runs = [[frame, frame], [frame, frame]]
    result = paired_bootstrap(runs, runs, "AVE/truck", class_names=TINY, free_index=TINY_FREE,
                              flow_classes=TINY_FLOW, num_resamples=20)["AVE/truck"]
    assert math.isnan(result.difference) and result.num_undefined == 20 and result.verdict == UNDEFINED


# ------------------------------------------------------------------------------------- gate


def seed_stats(car_tp_by_threshold, car_gt=100, car_pred=100):
    """Pooled counts of one seed over (car, road, free): road TP 80 of 100 at every threshold."""
    tp = np.array([[t, 80, 0] for t in car_tp_by_threshold])
    return stats(tp, [car_gt, 100, 0], [car_pred, 100, 0])


def gate(per_seed, class_prior=10.0, gt_occupancy_mave=(0.3, 0.4, 0.35), zero_flow_mave=1.0, **kwargs):
    return benchmark_gate(per_seed, class_prior, gt_occupancy_mave, zero_flow_mave, class_names=HAND,
                          free_index=HAND_FREE, **kwargs)


PASSING = [seed_stats((30, 60, 90)), seed_stats((40, 70, 90)), seed_stats((35, 55, 80))]


def test_gate_passes_when_every_criterion_holds():
    result = gate(PASSING)
    assert result.passed and result.failed == []
    assert list(result.criteria) == ["ray_iou_over_class_prior", "class_ray_iou", "class_true_positive_rays",
                                     "flow_vs_zero_flow"]
    ray_iou = [summarize(s, HAND, HAND_FREE)["RayIoU"] for s in PASSING]
    a = result.criteria["ray_iou_over_class_prior"]
    assert a.value == pytest.approx(np.mean(ray_iou)) and a.threshold == pytest.approx(20.0) and a.passed
    assert result.criteria["class_true_positive_rays"].value == 55  # the lowest 2 m car TP count of the seeds
    assert result.criteria["class_true_positive_rays"].per_seed == (60, 70, 55)
    c = result.criteria["flow_vs_zero_flow"]
    assert c.value == pytest.approx(0.35) and c.threshold == pytest.approx(0.7)
    for name, criterion in result.criteria.items():
        assert criterion.reason.startswith(name)


def test_gate_fails_a_baseline_not_above_twice_the_class_prior():
    floor = np.mean([summarize(s, HAND, HAND_FREE)["RayIoU"] for s in PASSING]) / 2
    result = gate(PASSING, class_prior=floor + 0.01)
    assert not result.passed and result.failed == ["ray_iou_over_class_prior"]
    assert "ray_iou_over_class_prior (a)" in result.criteria["ray_iou_over_class_prior"].reason
    assert "<=" in result.criteria["ray_iou_over_class_prior"].reason
    assert gate(PASSING, class_prior=floor - 0.01).passed
    assert not gate(PASSING, class_prior=floor - 0.01, prior_factor=3.0).passed


def test_gate_fails_a_seed_without_the_class():
    per_seed = [PASSING[0], seed_stats((0, 0, 0)), PASSING[2]]
    result = gate(per_seed)
    assert result.failed == ["class_ray_iou", "class_true_positive_rays"]
    reason = result.criteria["class_ray_iou"].reason
    assert reason.startswith("class_ray_iou (b): car RayIoU not > 0 in seed(s) #1")
    assert result.criteria["class_ray_iou"].value == 0.0


def test_gate_fails_a_seed_with_too_few_true_positive_rays_at_two_metres():
    per_seed = [PASSING[0], seed_stats((10, 49, 90)), PASSING[2]]
    result = gate(per_seed)
    assert result.failed == ["class_true_positive_rays"]  # the class is found, but too rarely
    reason = result.criteria["class_true_positive_rays"].reason
    assert "class_true_positive_rays (b)" in reason and "at 2 m" in reason and "seed(s) #1 (49)" in reason
    assert gate(per_seed, min_true_positive_rays=49).passed
    # at the 1 m threshold every seed has too few
    one_metre = gate(PASSING, tp_threshold=1.0).criteria["class_true_positive_rays"]
    assert not one_metre.passed and "at 1 m" in one_metre.reason and one_metre.value == 30
    # another class
    assert gate(PASSING, class_name="road").passed


def test_gate_fails_flow_not_clearly_better_than_zero_flow():
    result = gate(PASSING, gt_occupancy_mave=[0.8, 0.7, 0.75], zero_flow_mave=[1.0, 1.1, 0.9])
    assert result.failed == ["flow_vs_zero_flow"]
    c = result.criteria["flow_vs_zero_flow"]
    assert c.value == pytest.approx(0.75) and c.threshold == pytest.approx(0.7)
    assert c.reason.startswith("flow_vs_zero_flow (c)") and ">=" in c.reason
    assert not gate(PASSING, gt_occupancy_mave=0.7, zero_flow_mave=1.0).passed  # strictly below
    assert gate(PASSING, gt_occupancy_mave=0.75, zero_flow_mave=1.0, flow_factor=0.8).passed
    assert not gate(PASSING, gt_occupancy_mave=math.nan).passed


def test_gate_rejects_unknown_class_and_threshold():
    with pytest.raises(ValueError, match="'bus' is not in"):
        gate(PASSING, class_name="bus")
    with pytest.raises(ValueError, match="tp_threshold 3"):
        gate(PASSING, tp_threshold=3.0)


# ---------------------------------------------------------------------------------- markdown


def test_markdown_reports_comparisons_only_after_a_passed_gate():
    baseline, variant = hand_experiment()
    comparisons = {"corrected": paired_bootstrap(baseline, variant, ["RayIoU", "RayIoU@1"], class_names=HAND,
                                                 free_index=HAND_FREE, num_resamples=100)}
    lines = format_markdown(gate(PASSING), comparisons, baseline_name="FB-Occ")
    text = "\n".join(lines)
    assert lines[0] == "Benchmark gate: passed"
    assert "| ray_iou_over_class_prior |" in text and "| FB-Occ | variant |" in text
    row = next(line for line in lines if line.startswith("| corrected | RayIoU |"))
    result = comparisons["corrected"]["RayIoU"]
    assert f"{result.difference:+.2f}" in row and result.verdict in row
    assert "2 seeds x 2 frames" in text and "100 resamples" in text

    failed = format_markdown(gate(PASSING, class_prior=50.0), comparisons)
    assert failed[0] == "Benchmark gate: FAILED"
    assert failed[-1] == "Comparisons withheld: the baseline failed ray_iou_over_class_prior."
    assert not any(line.startswith("| corrected |") for line in failed)


def test_gate_checks_that_train_and_val_move_alike_only_when_given_the_shares():
    assert "split_motion_match" not in gate(PASSING).criteria
    matched = gate(PASSING, moving_shares=(0.555, 0.575))
    assert matched.passed and list(matched.criteria)[-1] == "split_motion_match"
    d = matched.criteria["split_motion_match"]
    assert d.value == pytest.approx(0.02) and d.threshold == pytest.approx(0.10)
    assert d.reason.startswith("split_motion_match (d)") and "55.5% (train)" in d.reason and "57.5% (val)" in d.reason
    apart = gate(PASSING, moving_shares=(0.60, 0.38))  # the old one-scene validation split
    assert not apart.passed and apart.failed == ["split_motion_match"]
    assert apart.criteria["split_motion_match"].value == pytest.approx(0.22) and "> 10" in apart.criteria[
        "split_motion_match"].reason
    assert gate(PASSING, moving_shares=(0.60, 0.38), max_moving_share_gap=0.25).passed
    assert not gate(PASSING, moving_shares=(0.5, float("nan"))).passed
