"""Engine building blocks: optimizer groups, schedules, model zoo, checkpoints."""
import os

import pytest
import torch
from torch import nn


def test_lr_multipliers_use_longest_prefix_and_norm_weight_decay():
    from voxelsplat.engine.optim import get_optimizer_param_groups

    model = nn.Sequential()
    model.add_module("backbone", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.add_module("head", nn.Linear(4, 2))
    groups = get_optimizer_param_groups(model, base_lr=1.0, weight_decay=0.1, weight_decay_norm=0.0,
                                        weight_decay_bias=0.0, lr_multipliers={"backbone": 0.1, "backbone.1": 0.5})
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    conv, bn, head = model.backbone[0], model.backbone[1], model.head
    assert by_param[id(conv.weight)] == (pytest.approx(0.1), 0.1)
    assert by_param[id(conv.bias)] == (pytest.approx(0.1), 0.0)
    assert by_param[id(bn.weight)] == (pytest.approx(0.5), 0.0)
    assert by_param[id(head.weight)] == (1.0, 0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(KeyError, match="backbonee"):
        get_optimizer_param_groups(model, 1.0, 0.1, lr_multipliers={"backbonee": 0.1})


def test_weight_decay_groups_of_the_released_recipe_decay_every_parameter():
    """Released: AdamW wd 1e-2 on weights, biases and norm parameters alike; the backbone's
    lr x0.1 for VoxelSplat-R50 and x1 for the FB-Occ baseline."""
    from detectron2.config import LazyConfig, instantiate

    from voxelsplat.engine.optim import get_optimizer_param_groups

    model = nn.Sequential()
    model.add_module("backbone", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.add_module("head", nn.Sequential(nn.Linear(4, 2), nn.LayerNorm(2)))
    for config, backbone_lr in (("configs/r50.py", 2e-5), ("configs/fbocc_r50.py", 2e-4)):
        cfg = LazyConfig.load(os.path.join(os.path.dirname(__file__), "..", config))
        cfg.optimizer.params.model = model
        optimizer = instantiate(cfg.optimizer)
        assert isinstance(optimizer, torch.optim.AdamW)
        by_param = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
        for name, param in model.named_parameters():
            lr, decay = by_param[id(param)]
            assert decay == pytest.approx(1e-2), (config, name)
            assert lr == pytest.approx(backbone_lr if name.startswith("backbone") else 2e-4), (config, name)
    # the deviation: no decay on norms and biases
    groups = get_optimizer_param_groups(model, 1.0, 0.1, weight_decay_norm=0.0, weight_decay_bias=0.0)
    by_param = {name: g["weight_decay"] for g in groups for p in g["params"] for name, q in model.named_parameters()
                if q is p}
    assert by_param == {"backbone.0.weight": 0.1, "backbone.0.bias": 0.0, "backbone.1.weight": 0.0,
                        "backbone.1.bias": 0.0, "head.0.weight": 0.1, "head.0.bias": 0.0, "head.1.weight": 0.0,
                        "head.1.bias": 0.0}


def test_warmup_step_schedule_values():
    from voxelsplat.engine.schedule import warmup_cosine_schedule, warmup_step_schedule

    sched = warmup_step_schedule(max_iter=100, steps=(0.5, 0.75), gamma=0.1, warmup_iters=10, warmup_factor=0.01)
    assert sched(0.0) == pytest.approx(0.01)
    assert sched(0.05) == pytest.approx(0.01 + (1 - 0.01) * 0.5)
    assert sched(0.2) == pytest.approx(1.0)
    assert sched(0.6) == pytest.approx(0.1)
    assert sched(0.9) == pytest.approx(0.01)
    cos = warmup_cosine_schedule(max_iter=100, warmup_iters=0, end_value=0.0)
    assert cos(0.5) == pytest.approx(0.5, abs=1e-6)
    # very short runs: a step that rounds to the end never applies and is dropped
    short = warmup_step_schedule(max_iter=3, steps=(0.85,), warmup_iters=0)
    assert [short(i / 3) for i in range(3)] == [1.0, 1.0, 1.0]
    assert warmup_step_schedule(max_iter=1, steps=(0.5,), warmup_iters=0)(0.0) == 1.0


def test_model_zoo_finds_shipped_configs():
    from voxelsplat import model_zoo

    path = model_zoo.get_config_file("common/train.py")
    assert os.path.isfile(path)
    cfg = model_zoo.get_config("common/train.py")
    assert cfg.train.clip_grad.max_norm == 5.0
    with pytest.raises(FileNotFoundError, match="nope.py"):
        model_zoo.get_config_file("nope.py")


def test_checkpointer_save_is_atomic_and_corrupt_file_is_reported(tmp_path, monkeypatch):
    from voxelsplat.engine.checkpoint import OccupancyCheckpointer

    model = nn.Linear(3, 2)
    ckpt = OccupancyCheckpointer(model, str(tmp_path))
    ckpt.save("model_a")
    original = torch.load(tmp_path / "model_a.pth", weights_only=False)["model"]

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save("model_a")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_a.pth"]
    reloaded = torch.load(tmp_path / "model_a.pth", weights_only=False)["model"]
    torch.testing.assert_close(reloaded["weight"], original["weight"])

    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt.pth"):
        OccupancyCheckpointer(nn.Linear(3, 2)).load(str(tmp_path / "corrupt.pth"))


def test_override_of_lazy_call_default_argument_is_accepted(tmp_path):
    from voxelsplat.engine import load_config

    cfg = load_config(os.path.join(os.path.dirname(__file__), "toy", "toy_config.py"),
                      ["dataloader.test.seed=3", "optimizer.betas=[0.8,0.9]"])
    assert cfg.dataloader.test.seed == 3
    with pytest.raises(KeyError, match="dataloader.train.sed"):
        load_config(os.path.join(os.path.dirname(__file__), "toy", "toy_config.py"), ["dataloader.train.sed=3"])


def test_model_ema_follows_the_released_ramped_decay_and_resumes(tmp_path):
    """EMA_n = d_n EMA_{n-1} + (1 - d_n) theta_n with d_n = 0.999 (1 - exp(-n / 2000)),
    n counted from init_updates; float buffers averaged, integer buffers copied."""
    import math
    from types import SimpleNamespace

    from voxelsplat.engine.ema_hook import ModelEMAHook, ema_decay

    assert ema_decay(10561, 0.999, 2000) == pytest.approx(0.999 * (1 - math.exp(-10561 / 2000)))
    assert ema_decay(0, 0.999, 2000) == 0.0 and ema_decay(5, 0.9, 0) == 0.9
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    trainer = SimpleNamespace(model=model, iter=0, max_iter=4, output_dir=str(tmp_path))
    hook = ModelEMAHook(decay=0.9, init_updates=3, ramp_iters=2.0, period=2)
    hook.trainer = trainer
    hook.before_train()
    expected = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
        trainer.iter = step
        hook.after_step()
        d = 0.9 * (1 - math.exp(-(3 + step + 1) / 2.0))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v
        for k in expected:
            torch.testing.assert_close(hook.ema_state[k], expected[k])
    hook.after_train()
    assert sorted(os.listdir(tmp_path)) == ["model_ema_0000001.pth", "model_ema_final.pth"]
    saved = torch.load(tmp_path / "model_ema_final.pth", weights_only=True)
    assert saved["ema_updates"] == 7 and "1.num_batches_tracked" in saved["model"]
    torch.testing.assert_close(saved["model"]["0.weight"], expected["0.weight"])
    # resume: the trainer checkpoint's hook state restores the average and the counter
    resumed = ModelEMAHook(decay=0.9, init_updates=3, ramp_iters=2.0)
    resumed.trainer = trainer
    resumed.load_state_dict(hook.state_dict())
    resumed.before_train()
    assert resumed.updates == 7
    torch.testing.assert_close(resumed.ema_state["1.running_mean"], expected["1.running_mean"])


def test_unwrap_model_opens_data_parallel_wrappers_only():
    from torch import nn

    from voxelsplat.engine import unwrap_model

    class HasModuleAttribute(nn.Module):  # a model whose submodule happens to be called "module"
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)

    inner = HasModuleAttribute()
    assert unwrap_model(inner) is inner
    assert unwrap_model(nn.DataParallel(inner)) is inner
    assert unwrap_model(nn.DataParallel(nn.DataParallel(inner))) is inner


def test_train_net_accepts_resume_and_eval_only_after_the_overrides():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lazyconfig_train_net", os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools",
                                             "lazyconfig_train_net.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = tool.parse_args(["--config-file", "c.py", "train.max_iter=4", "--resume", "train.seed=1"])
    assert args.resume and not args.eval_only and args.opts == ["train.max_iter=4", "train.seed=1"]
    args = tool.parse_args(["--config-file", "c.py", "--eval-only", "train.init_checkpoint=x.pth"])
    assert args.eval_only and args.opts == ["train.init_checkpoint=x.pth"]
    assert tool.parse_args(["--config-file", "c.py", "a=1", "--eval-only"]).eval_only
    with pytest.raises(SystemExit):
        tool.parse_args(["--config-file", "c.py", "a=1", "--num-gpus", "2"])


def test_configure_reproducibility_pins_threads_and_deterministic_algorithms():
    from omegaconf import OmegaConf

    from voxelsplat.engine import configure_reproducibility

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cudnn_deterministic = torch.backends.cudnn.deterministic
    try:
        configure_reproducibility(OmegaConf.create({"train": {"num_threads": 1, "deterministic": True}}))
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and os.environ["CUBLAS_WORKSPACE_CONFIG"]
        configure_reproducibility(OmegaConf.create({"train": {"num_threads": None, "deterministic": False}}))
        assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()
        for bad, match in (({"num_threads": 0}, "num_threads"), ({"num_threads": 1.5}, "num_threads"),
                           ({"deterministic": "yes"}, "deterministic"),
                           ({"deterministic": True, "cudnn_benchmark": True}, "cudnn_benchmark")):
            with pytest.raises(ValueError, match=match):
                configure_reproducibility(OmegaConf.create({"train": bad}))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.deterministic = cudnn_deterministic
