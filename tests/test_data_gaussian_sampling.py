"""Which voxels become Gaussians: weights, distribution, candidate domain, speed bins."""
import itertools

import numpy as np
import pytest

from voxelsplat.data.gaussian_sampling import (
    SPEED_BIN_EDGES,
    gaussian_sampling_weights,
    sample_gaussian_voxels,
    speed_bin_index,
)
from voxelsplat.data.occupancy_meta import OPENOCC_V2_CLASSES

NUM_CLASSES = len(OPENOCC_V2_CLASSES)


def _speed_bin_reference(speed):
    # written out from the bin definition [0,1), [1,2), [2,5), [5,10), [10,inf)
    if speed < 1:
        return 0
    if speed < 2:
        return 1
    if speed < 5:
        return 2
    if speed < 10:
        return 3
    return 4


def _random_world(rng, shape=(40, 40, 8)):
    """Skewed class and speed distributions, a random visibility mask."""
    class_probs = rng.dirichlet(np.full(NUM_CLASSES, 0.5))
    semantics = rng.choice(NUM_CLASSES, size=shape, p=class_probs).astype(np.uint8)
    speeds = rng.choice([0.0, 0.5, 1.5, 3.0, 7.0, 15.0], size=shape, p=[0.6, 0.15, 0.1, 0.07, 0.05, 0.03])
    angle = rng.uniform(0, 2 * np.pi, size=shape)
    flow = np.stack([speeds * np.cos(angle), speeds * np.sin(angle)], axis=-1).astype(np.float32)
    visible = rng.uniform(size=shape) < 0.6
    return semantics, flow, visible


def test_zero_speed_falls_in_the_first_bin_and_edges_are_half_open():
    speeds = np.array([0.0, 0.3, 0.999, 1.0, 1.7, 2.0, 4.99, 5.0, 9.9, 10.0, 55.0])
    flow = np.stack([speeds * 0.6, speeds * 0.8], axis=-1)  # |(0.6, 0.8)| = 1
    expected = [_speed_bin_reference(s) for s in np.hypot(flow[:, 0], flow[:, 1])]
    assert speed_bin_index(flow).tolist() == expected
    assert speed_bin_index(np.zeros((3, 2)))[0] == 0  # static voxels: bin 0, not the last bin
    assert expected[0] == 0 and expected[-1] == len(SPEED_BIN_EDGES)


def test_weights_are_inverse_sqrt_class_times_inverse_sqrt_speed_bin_frequency():
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 5, size=300)
    bins = rng.integers(0, 5, size=300)
    weights = gaussian_sampling_weights(classes, bins, num_classes=5)
    for i in range(len(classes)):
        n_class = sum(1 for c in classes if c == classes[i])
        n_bin = sum(1 for b in bins if b == bins[i])
        assert weights[i] == pytest.approx(1.0 / np.sqrt(n_class) / np.sqrt(n_bin), rel=1e-12)


def test_sampled_class_and_speed_distribution_follows_the_weights():
    rng = np.random.default_rng(2)
    semantics, flow, visible = _random_world(rng)
    classes = semantics[visible].astype(np.int64)
    bins = speed_bin_index(flow[visible])
    weights = gaussian_sampling_weights(classes, bins, NUM_CLASSES)
    expected_class = np.bincount(classes, weights=weights, minlength=NUM_CLASSES) / weights.sum()
    expected_bin = np.bincount(bins, weights=weights, minlength=5) / weights.sum()

    num_samples, draws = 300, 40  # few samples per draw: without replacement ~ with replacement
    class_counts = np.zeros(NUM_CLASSES)
    bin_counts = np.zeros(5)
    sample_rng = np.random.default_rng(3)
    for _ in range(draws):
        index = sample_gaussian_voxels(semantics, flow, visible, num_samples, NUM_CLASSES, sample_rng)
        assert len(np.unique(np.ravel_multi_index(index.T, semantics.shape))) == num_samples  # no repeats
        assert visible[tuple(index.T)].all()  # invisible voxels are never drawn
        class_counts += np.bincount(semantics[tuple(index.T)], minlength=NUM_CLASSES)
        bin_counts += np.bincount(speed_bin_index(flow[tuple(index.T)]), minlength=5)
    total = num_samples * draws
    for counts, expected in ((class_counts, expected_class), (bin_counts, expected_bin)):
        present = expected > 0
        chi2 = ((counts[present] - total * expected[present]) ** 2 / (total * expected[present])).sum()
        # 99.9 % quantile of chi-square with <= 16 degrees of freedom is < 40
        assert chi2 < 40.0, (counts / total, expected)
        assert counts[~present].sum() == 0
    # the weighting does what it is for: rare classes are drawn far above their share
    share = np.bincount(classes, minlength=NUM_CLASSES) / len(classes)
    rarest = np.argmin(np.where(share > 0, share, np.inf))
    assert class_counts[rarest] / total > 2 * share[rarest]


def test_draws_without_replacement_match_successive_sampling_probabilities():
    # exact law of successive weighted sampling without replacement, 2 of 4 candidates
    semantics = np.array([0, 1, 1, 2], dtype=np.uint8).reshape(4, 1, 1)
    flow = np.zeros((4, 1, 1, 2), np.float32)
    flow[3, 0, 0] = (12.0, 0.0)  # last voxel in the top speed bin
    weights = gaussian_sampling_weights(semantics.reshape(-1), speed_bin_index(flow.reshape(-1, 2)), 3)
    p = weights / weights.sum()
    expected = {}
    for a, b in itertools.permutations(range(4), 2):
        key = tuple(sorted((a, b)))
        expected[key] = expected.get(key, 0.0) + p[a] * p[b] / (1 - p[a])
    rng = np.random.default_rng(4)
    trials = 4000
    counts = {key: 0 for key in expected}
    for _ in range(trials):
        picked = sample_gaussian_voxels(semantics, flow, None, 2, 3, rng)[:, 0]
        counts[tuple(picked.tolist())] += 1
    for key, probability in expected.items():
        standard_error = np.sqrt(probability * (1 - probability) / trials)
        assert abs(counts[key] / trials - probability) < 4 * standard_error, (key, counts[key] / trials, probability)


def test_fewer_candidates_than_requested_returns_all_of_them_and_respects_the_mask():
    rng = np.random.default_rng(5)
    semantics, flow, _ = _random_world(rng, shape=(10, 12, 4))
    visible = np.zeros(semantics.shape, bool)
    chosen = rng.choice(semantics.size, size=37, replace=False)
    visible.reshape(-1)[chosen] = True
    index = sample_gaussian_voxels(semantics, flow, visible, 100, NUM_CLASSES, rng)
    assert index.dtype == np.int64 and index.shape == (37, 3)
    assert sorted(np.ravel_multi_index(index.T, semantics.shape).tolist()) == sorted(chosen.tolist())
    # no mask: every voxel is a candidate
    assert len(sample_gaussian_voxels(semantics, None, None, 10**6, NUM_CLASSES, rng)) == semantics.size
    with pytest.raises(ValueError, match="candidate mask"):
        sample_gaussian_voxels(semantics, flow, visible[:-1], 10, NUM_CLASSES, rng)
