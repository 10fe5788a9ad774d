"""Exact resume: a training run of configs/synthetic/voxelsplat_tiny.py killed with SIGKILL at
any iteration and continued with ``tools/lazyconfig_train_net.py --resume`` ends with the
weights, optimizer state and logged metrics of the uninterrupted run, bit for bit (sequential
scene sampler, temporal history, warm-up switch, regularizer and a loader worker all on)."""
import io
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.engine import HookBase

from voxelsplat.utils.io import read_json_lines

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


def _pose(yaw, x):
    pose = torch.eye(4, dtype=torch.float64)
    pose[:2, :2] = torch.tensor([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
    pose[0, 3] = x
    return pose


def test_temporal_history_saved_and_loaded_into_a_fresh_module_continues_bitwise():
    """The queue restored from a checkpoint (a copy to CPU through torch.save) gives the next
    steps exactly what the module that kept it gives; starting afresh gives something else."""
    from voxelsplat.engine.hooks import _to_cpu_copy
    from voxelsplat.modeling.lifting.temporal_fusion import TemporalVolumeFusion
    from voxelsplat.structures import OccupancyGrid

    torch.manual_seed(3)
    grid = OccupancyGrid((-4.0, -4.0, -1.0, 4.0, 4.0, 1.0), 1.0)
    kept = TemporalVolumeFusion(3, 4, 3, grid, time_channels=2).train()
    restored = TemporalVolumeFusion(3, 4, 3, grid, time_channels=2).train()
    restored.load_state_dict(kept.state_dict())
    bda = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    frames = [torch.randn(2, 3, *grid.shape) for _ in range(5)]

    def step(module, frame, starts):
        poses = torch.stack([_pose(0.1 * frame, 2.0 * frame)] * 2)
        return module(frames[frame], poses, bda, [500_000 * frame] * 2, starts, ["a", "b"]).detach()

    for frame, starts in enumerate([[True, True], [False, False], [False, True]]):
        step(kept, frame, starts)
    buffer = io.BytesIO()
    torch.save(_to_cpu_copy(kept.history_state()), buffer)
    buffer.seek(0)
    restored.load_history_state(torch.load(buffer, weights_only=False))
    for frame in (3, 4):
        assert torch.equal(step(restored, frame, [False, False]), step(kept, frame, [False, False]))
    fresh = TemporalVolumeFusion(3, 4, 3, grid, time_channels=2).train()
    fresh.load_state_dict(kept.state_dict())
    assert not torch.allclose(step(fresh, 4, [False, False]), step(kept, 4, [False, False]))
    wrong = TemporalVolumeFusion(3, 4, 2, grid, time_channels=2)
    with pytest.raises(ValueError, match="history slot 0 holds volumes of shape"):
        wrong.load_history_state(kept.history_state())


def test_mapper_draws_are_a_function_of_the_item_seed(synthetic_dataset, tmp_path):
    """Augmentation and Gaussian sampling of an item depend on its sampler seed only, not on
    the global generators of the process (a loader worker's) that maps it."""
    from detectron2.config import LazyConfig, instantiate

    from voxelsplat.data.samplers import BatchItem

    cfg = LazyConfig.load(CONFIG)
    train = cfg.dataloader.train
    train.dataset.dataroot, train.dataset.cache_dir = synthetic_dataset.root, str(tmp_path)
    train.mapper.input_size = tuple(synthetic_dataset.image_size)
    train.mapper.regularizer.num_gaussians = 300
    train.num_workers, train.seed = 0, 0
    dataset = instantiate(train).dataset
    keys = ("img_aug", "bda", "gaussian_voxel_indices")

    def mapped(item, global_seed):
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        return {key: dataset[item][key] for key in keys}

    first = mapped(BatchItem(1, False, (5, 0, 1)), 10)
    again = mapped(BatchItem(1, False, (5, 0, 1)), 11)
    for key in keys:
        assert torch.equal(first[key], again[key]), key
    next_epoch = mapped(BatchItem(1, False, (5, 1, 1)), 10)
    assert not torch.equal(first["gaussian_voxel_indices"], next_epoch["gaussian_voxel_indices"])
    assert not torch.equal(first["img_aug"], next_epoch["img_aug"])
    # without an item seed the draws follow the global generator (a standalone mapper)
    unseeded = [mapped(BatchItem(1, False), s)["gaussian_voxel_indices"] for s in (10, 11)]
    assert not torch.equal(*unseeded)


def _overrides(dataset, output_dir, cache_dir, kill_at=-1, max_iter=MAX_ITER, warmup_iter=WARMUP_ITER):
    hooks = (f"train.extra_hooks=[{{_target_: voxelsplat.engine.warmup_hook.WarmupSwitchHook, "
             f"history_start_iter: {warmup_iter}, flow_loss_start_iter: {warmup_iter}}}, "
             f"{{_target_: test_engine_resume.KillAfterIteration, iteration: {kill_at}}}]")
    return [
        f"train.output_dir={output_dir}",
        f"dataloader.train.dataset.dataroot={dataset.root}",
        f"dataloader.train.dataset.cache_dir={cache_dir}",
        "dataloader.train.dataset.split=all",  # both scenes: the shuffled scene order matters
        f"dataloader.train.mapper.input_size=[{dataset.image_size[0]},{dataset.image_size[1]}]",
        "dataloader.train.mapper.regularizer.num_gaussians=400",
        "dataloader.train.num_workers=1",
        "model.regularizer.max_views=2",  # drawn from torch's global generator each step
        f"train.max_iter={max_iter}",
        f"train.checkpointer.period={CHECKPOINT_PERIOD}",
        "train.checkpointer.max_to_keep=1",  # resuming needs only the newest one; keeps the test's disk use small
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
    if expect_kill:  # one process dies by the signal; with several, the launcher reports it
        killed = proc.returncode == -signal.SIGKILL or (proc.returncode == 1 and "with signal SIGKILL" in log)
        assert killed, f"expected SIGKILL, got {proc.returncode}:\n{log[-4000:]}"
    elif proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{log[-4000:]}")
    return log


def _last_checkpoint(output_dir):
    with open(os.path.join(output_dir, "last_checkpoint")) as f:
        return f.read().strip()


def _metrics(output_dir):
    """Every line of metrics.json without the timing keys, in file order."""
    rows = read_json_lines(os.path.join(output_dir, "metrics.json"))
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

    _assert_same_final_state(full, broken, MAX_ITER, num_processes=1)


def _assert_same_final_state(full, broken, max_iter, num_processes):
    expected = torch.load(full / "model_final.pth", map_location="cpu", weights_only=False)
    resumed = torch.load(broken / "model_final.pth", map_location="cpu", weights_only=False)
    _assert_bitwise_equal(resumed["model"], expected["model"], "model")
    _assert_bitwise_equal(resumed["trainer"]["optimizer"], expected["trainer"]["optimizer"], "optimizer")
    _assert_bitwise_equal(resumed["trainer"]["data"], expected["trainer"]["data"], "data position")
    assert resumed["trainer"]["data"]["next_batch"] == max_iter
    processes = expected["trainer"]["hooks"]["TrainingStateHook"]["processes"]
    assert len(processes) == num_processes
    for rank, process in enumerate(processes):
        # the history was on at the end: the comparison below is not of empty queues
        assert process["temporal"]["temporal_fusion"]["slots"][0]["volumes"] is not None
        _assert_bitwise_equal(resumed["trainer"]["hooks"]["TrainingStateHook"]["processes"][rank]["temporal"],
                              process["temporal"], f"temporal history of process {rank}")

    # metrics.json holds the uninterrupted run's lines, median-smoothed losses included, once
    # each: a resumed run drops the records of the iterations it runs again
    reference = _metrics(full)
    assert [row["iteration"] for row in reference] == list(range(max_iter))
    assert _metrics(broken) == reference


@pytest.mark.slow
def test_two_process_gloo_training_killed_and_resumed_matches_the_uninterrupted_run_bitwise(
        synthetic_dataset, tmp_path):
    """``--num-gpus 2`` on CPU: each process's random state and history queue (gathered into
    the checkpoint) comes back in its own process. History on from iteration 1, checkpoint
    after iteration 2, both processes killed after iteration 3."""
    cache, full, broken = tmp_path / "cache", tmp_path / "full", tmp_path / "broken"
    two = ("--num-gpus", "2")
    settings = dict(max_iter=4, warmup_iter=1)
    batch = ["dataloader.train.total_batch_size=2"]  # one sample per process
    _train(_overrides(synthetic_dataset, full, cache, **settings) + batch, *two)
    _train(_overrides(synthetic_dataset, broken, cache, kill_at=3, **settings) + batch, *two, expect_kill=True)
    assert _last_checkpoint(broken) == "model_0000002.pth"
    log = _train(_overrides(synthetic_dataset, broken, cache, **settings) + batch, *two, "--resume")
    assert "Starting training from iteration 3" in log and "TrainingStateHook" not in log  # no warning
    _assert_same_final_state(full, broken, 4, num_processes=2)
