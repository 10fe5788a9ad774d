"""The training engine end to end on a toy LazyConfig (tests/toy/)."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from voxelsplat.utils.io import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CONFIG = os.path.join(ROOT, "tests", "toy", "toy_config.py")
TRAIN_NET = os.path.join(ROOT, "tools", "lazyconfig_train_net.py")


def run_train_net(*args, expect_ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, TRAIN_NET, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"train_net failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def final_weights(output_dir):
    state = torch.load(os.path.join(output_dir, "model_final.pth"), map_location="cpu", weights_only=False)
    return state["model"]


def test_toy_training_writes_checkpoints_metrics_and_tensorboard(tmp_path):
    out = str(tmp_path / "run")
    run_train_net("--config-file", TOY_CONFIG, f"train.output_dir={out}", "train.num_threads=1",
                  "train.deterministic=True")
    with open(os.path.join(out, "log.txt")) as f:  # the tool applied the pinned settings
        assert "Threads per process: 1; deterministic algorithms: True" in f.read()
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert os.path.isfile(os.path.join(out, "model_0000009.pth"))
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    # the library's temporaries are ".<name>.tmp-XXXXXXXX<suffix>"; the pattern finds one while a write is open
    temporaries = ".*.tmp-*"
    probe = str(tmp_path / "probe")
    with atomic_write(os.path.join(probe, "model_final.pth"), "wb", suffix=".pth"):
        assert len(glob.glob(os.path.join(probe, temporaries))) == 1
    assert not glob.glob(os.path.join(out, temporaries)), "temporary checkpoint files left behind"

    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    assert any("toy/mse" in r for r in records), "EvalHook results missing from metrics.json"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = glob.glob(os.path.join(out, "events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(out)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("total_loss", "lr", "time", "loss_mse", "peak_memory_mb"):
        assert tag in tags, (tag, tags)
    lr_values = [e.value for e in acc.Scalars("lr")]
    assert lr_values[-1] < lr_values[0]  # the step schedule decays at 85% of training
    assert acc.Scalars("total_loss")[-1].value == pytest.approx(losses[-1], rel=1e-5)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    from detectron2.engine import HookBase

    from voxelsplat.engine import do_train, load_config

    class StopAt(HookBase):
        def after_step(self):
            if self.trainer.iter == 12:
                raise _Interrupt()

    full = str(tmp_path / "full")
    run_train_net("--config-file", TOY_CONFIG, f"train.output_dir={full}")

    broken = str(tmp_path / "broken")
    cfg = load_config(TOY_CONFIG, [f"train.output_dir={broken}"])
    torch.manual_seed(cfg.train.seed)
    with pytest.raises(_Interrupt):
        do_train(cfg, resume=False, extra_hooks=[StopAt()])
    with open(os.path.join(broken, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000009.pth"
    assert not os.path.exists(os.path.join(broken, "model_final.pth"))

    proc = run_train_net("--config-file", TOY_CONFIG, "--resume", f"train.output_dir={broken}")
    assert "Starting training from iteration 10" in proc.stdout + proc.stderr
    expected, resumed = final_weights(full), final_weights(broken)
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # the optimizer state was restored, not rebuilt: a fresh Adam at iteration 10 would diverge
    state = torch.load(os.path.join(broken, "model_final.pth"), map_location="cpu", weights_only=False)
    assert state["iteration"] == 19
    assert any(s.get("step", 0) == 20 or float(s.get("step", 0)) == 20.0
               for s in state["trainer"]["optimizer"]["state"].values())
    assert "optimizer" not in state  # saved once, inside the trainer's state


def test_two_process_gloo_training_matches_one_process(tmp_path):
    single, double = str(tmp_path / "one"), str(tmp_path / "two")
    run_train_net("--config-file", TOY_CONFIG, f"train.output_dir={single}", "train.eval_period=0")
    run_train_net("--num-gpus", "2", "--config-file", TOY_CONFIG, f"train.output_dir={double}",
                  "train.eval_period=0")
    one, two = final_weights(single), final_weights(double)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)


def test_eval_only_loads_checkpoint_and_evaluates(tmp_path):
    out = str(tmp_path / "run")
    run_train_net("--config-file", TOY_CONFIG, f"train.output_dir={out}", "train.eval_period=0")
    proc = run_train_net("--config-file", TOY_CONFIG, "--eval-only",
                         f"train.init_checkpoint={out}/model_final.pth", f"train.output_dir={tmp_path / 'eval'}")
    assert "copypaste: mse,count" in proc.stdout + proc.stderr
    with open(tmp_path / "eval" / "log.txt") as f:  # the library's loggers reach log.txt
        assert "Evaluation results" in f.read()
    missing = run_train_net("--config-file", TOY_CONFIG, "--eval-only",
                            f"train.init_checkpoint={tmp_path}/nope.pth", f"train.output_dir={tmp_path / 'e2'}",
                            expect_ok=False)
    assert missing.returncode != 0 and "nope.pth" in missing.stderr


def test_non_finite_loss_names_iteration_and_term(tmp_path):
    from voxelsplat.engine import do_train, load_config

    cfg = load_config(TOY_CONFIG, [f"train.output_dir={tmp_path}", "+model.nan_at_call=7"])
    with pytest.raises(FloatingPointError, match=r"loss term 'loss_weight_l2' is \[?nan\]? at iteration 7"):
        do_train(cfg)


def test_unknown_override_key_and_missing_config_file_fail_clearly(tmp_path):
    from voxelsplat.engine import load_config

    with pytest.raises(KeyError, match=r"no key 'train\.max_iters'.*max_iter"):
        load_config(TOY_CONFIG, ["train.max_iters=5"])
    cfg = load_config(TOY_CONFIG, ["+train.new_key=5", "train.max_iter=7"])
    assert cfg.train.new_key == 5 and cfg.train.max_iter == 7
    with pytest.raises(FileNotFoundError, match="no_such_config.py"):
        load_config(str(tmp_path / "no_such_config.py"))
    proc = run_train_net("--config-file", TOY_CONFIG, "train.bogus=1", f"train.output_dir={tmp_path}",
                         expect_ok=False)
    assert proc.returncode != 0 and "train.bogus" in proc.stderr


def test_detectron2_installed_by_setup_script_imports():
    import detectron2
    import detectron2.config
    import detectron2.data
    import detectron2.engine
    import detectron2.evaluation  # noqa: F401

    assert detectron2.__version__ == "0.6"
    from detectron2 import _C

    with pytest.raises(NotImplementedError, match="pure Python"):
        _C.nms_rotated  # noqa: B018
