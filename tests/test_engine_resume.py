"""Exact resume: a training run of configs/synthetic/voxelsplat_tiny.py killed with SIGKILL at
any iteration and continued with ``tools/lazyconfig_train_net.py --resume`` ends with the
weights, optimizer state and logged metrics of the uninterrupted run, bit for bit (sequential
scene sampler, temporal history, warm-up switch, regularizer and a loader worker all on)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from detectron2.engine import HookBase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "tools", "lazyconfig_train_net.py")
CONFIG = os.path.join(ROOT, "configs", "synthetic", "voxelsplat_tiny.py")
# logged values that measure the machine, not the training
TIMING_KEYS = {"time", "data_time", "eta_seconds", "peak_memory_mb"}

MAX_ITER, CHECKPOINT_PERIOD, WARMUP_ITER = 8, 3, 4


class KillAfterIteration(HookBase):
    """Test-only hook: SIGKILL its own process right after the step of iteration ``iteration``
    (-1: never). Building it switches deterministic algorithms on in that process."""

    def __init__(self, iteration: int = -1):
        torch.use_deterministic_algorithms(True)
        self.iteration = int(iteration)

    def after_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)


def _overrides(dataset, output_dir, cache_dir, kill_at=-1):
    hooks = (f"train.extra_hooks=[{{_target_: voxelsplat.engine.warmup_hook.WarmupSwitchHook, "
             f"history_start_iter: {WARMUP_ITER}, flow_loss_start_iter: {WARMUP_ITER}}}, "
             f"{{_target_: test_engine_resume.KillAfterIteration, iteration: {kill_at}}}]")
    return [
        f"train.output_dir={output_dir}",
        f"dataloader.train.dataset.dataroot={dataset.root}",
        f"dataloader.train.dataset.cache_dir={cache_dir}",
        "dataloader.train.dataset.split=all",  # both scenes: the shuffled scene order matters
        f"dataloader.train.mapper.image_size=[{dataset.image_size[0]},{dataset.image_size[1]}]",
        "dataloader.train.mapper.regularizer.num_gaussians=400",
        "dataloader.train.num_workers=1",
        "model.regularizer.max_views=2",  # drawn from torch's global generator each step
        f"train.max_iter={MAX_ITER}",
        f"train.checkpointer.period={CHECKPOINT_PERIOD}",
        "train.eval_period=null",
        "train.log_period=1",
        hooks,
    ]


def _train(overrides, *extra_args, expect_kill=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, TRAIN_NET, "--config-file", CONFIG, *extra_args, *overrides],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    log = proc.stdout + proc.stderr
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, f"expected SIGKILL, got {proc.returncode}:\n{log[-4000:]}"
    elif proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{log[-4000:]}")
    return log


def _last_checkpoint(output_dir):
    with open(os.path.join(output_dir, "last_checkpoint")) as f:
        return f.read().strip()


def _metrics(output_dir):
    """Every line of metrics.json without the timing keys, in file order."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def _assert_bitwise_equal(actual, expected, where):
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where}: max |diff| {(actual.double() - expected.double()).abs().max()}"
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            _assert_bitwise_equal(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_bitwise_equal(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.slow
def test_training_killed_twice_and_resumed_matches_the_uninterrupted_run_bitwise(synthetic_dataset, tmp_path):
    """Checkpoints after iterations 2 and 5 (period 3), history + flow loss switched on at 4.
    First kill after iteration 4, inside the warm-up switch (resumes at 3, before it); second
    after iteration 6, off the checkpoint period (resumes at 6 with a restored history queue
    of the second scene)."""
    cache, full, broken = tmp_path / "cache", tmp_path / "full", tmp_path / "broken"
    _train(_overrides(synthetic_dataset, full, cache))

    _train(_overrides(synthetic_dataset, broken, cache, kill_at=4), expect_kill=True)
    assert _last_checkpoint(broken) == "model_0000002.pth"
    log = _train(_overrides(synthetic_dataset, broken, cache, kill_at=6), "--resume", expect_kill=True)
    assert "Starting training from iteration 3" in log
    assert _last_checkpoint(broken) == "model_0000005.pth"
    log = _train(_overrides(synthetic_dataset, broken, cache), "--resume")
    assert "Starting training from iteration 6" in log

    expected = torch.load(full / "model_final.pth", map_location="cpu", weights_only=False)
    resumed = torch.load(broken / "model_final.pth", map_location="cpu", weights_only=False)
    _assert_bitwise_equal(resumed["model"], expected["model"], "model")
    _assert_bitwise_equal(resumed["trainer"]["optimizer"], expected["trainer"]["optimizer"], "optimizer")
    _assert_bitwise_equal(resumed["trainer"]["data"], expected["trainer"]["data"], "data position")
    assert resumed["trainer"]["data"]["next_batch"] == MAX_ITER
    final_state = expected["trainer"]["hooks"]["TrainingStateHook"]["processes"][0]["temporal"]
    assert final_state["temporal_fusion"]["slots"][0]["volumes"] is not None  # the history was on at the end
    _assert_bitwise_equal(resumed["trainer"]["hooks"]["TrainingStateHook"]["processes"][0]["temporal"], final_state,
                          "temporal history")

    # every line logged by the three processes (the killed ones logged some iterations twice)
    # is the uninterrupted run's line of that iteration, median-smoothed losses included
    reference = {row["iteration"]: row for row in _metrics(full)}
    assert sorted(reference) == list(range(MAX_ITER))
    logged = _metrics(broken)
    assert {row["iteration"] for row in logged} == set(reference)
    for row in logged:
        assert row == reference[row["iteration"]], row["iteration"]
    assert logged[-1] == reference[MAX_ITER - 1]
