"""What the library reads back from disk: a checkpoint never runs code unless trusted, evaluation
needs every parameter of the model, record caches are data, a truncated camera image is an
error, and writes killed half-way leave nothing behind for long."""
import glob
import json
import logging
import os
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from voxelsplat.engine.checkpoint import IncompatibleCheckpointError, OccupancyCheckpointer, UntrustedCheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CONFIG = os.path.join(ROOT, "tests", "toy", "toy_config.py")
TRAIN_NET = os.path.join(ROOT, "tools", "lazyconfig_train_net.py")
CHECKPOINT_LOGGER = "voxelsplat.engine.checkpoint"


class _CodeOnUnpickle:
    """Unpickling this object creates the file ``marker``: the shape of a checkpoint that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _small_model(seed):
    """16 state entries: 3 Linear layers (6 parameters), 2 BatchNorm1d (5 entries each)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3),
                          nn.Linear(3, 2))
    with torch.no_grad():  # buffers that differ between seeds too
        for module in model:
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(seed)
    return model


def _assert_state_equal(actual: nn.Module, expected: dict):
    state = actual.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], torch.as_tensor(value)), key


def _toy_cfg(*overrides):
    from voxelsplat.engine import load_config

    return load_config(TOY_CONFIG, list(overrides))


def _run_train_net(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, TRAIN_NET, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


# ---------------------------------------------------------------------------- safe checkpoint loading
def test_checkpoint_whose_pickle_runs_code_is_refused_unless_trusted(tmp_path):
    source, target = _small_model(1), _small_model(2)
    initial = {k: v.clone() for k, v in target.state_dict().items()}
    marker = tmp_path / "code_ran"
    path = tmp_path / "model_final.pth"
    torch.save({"model": source.state_dict(), "meta": _CodeOnUnpickle(marker)}, path)

    with pytest.raises(UntrustedCheckpointError) as refused:
        OccupancyCheckpointer(target).load(str(path))
    message = str(refused.value)
    assert str(path) in message and "train.trust_checkpoint=True" in message and "(exec)" in message
    assert not marker.exists()
    _assert_state_equal(target, initial)  # nothing loaded

    OccupancyCheckpointer(target, trust_checkpoint=True).load(str(path))
    assert marker.exists()  # trusted: full unpickling, as asked
    _assert_state_equal(target, source.state_dict())


def test_detectron2_pkl_checkpoint_is_refused_unless_trusted(tmp_path):
    source, target = _small_model(3), _small_model(4)
    initial = {k: v.clone() for k, v in target.state_dict().items()}
    marker = tmp_path / "code_ran"
    path = tmp_path / "model_final.pkl"  # detectron2 model zoo format: a plain pickle of NumPy arrays
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in source.state_dict().items()}, "__author__": "zoo",
                     "meta": _CodeOnUnpickle(marker)}, f)

    with pytest.raises(UntrustedCheckpointError, match=r"model_final\.pkl.*train\.trust_checkpoint=True"):
        OccupancyCheckpointer(target).load(str(path))
    assert not marker.exists()
    _assert_state_equal(target, initial)

    OccupancyCheckpointer(target, trust_checkpoint=True).load(str(path))
    assert marker.exists()
    _assert_state_equal(target, source.state_dict())


def test_eval_only_refuses_a_code_running_checkpoint_unless_the_config_trusts_it(tmp_path):
    from voxelsplat.engine import build_model, do_eval_only

    out, marker = tmp_path / "eval", tmp_path / "code_ran"
    path = tmp_path / "model_final.pth"
    cfg = _toy_cfg(f"train.output_dir={out}", f"train.init_checkpoint={path}")
    assert cfg.train.trust_checkpoint is False  # the shipped default
    torch.save({"model": build_model(cfg).state_dict(), "meta": _CodeOnUnpickle(marker)}, path)
    with pytest.raises(UntrustedCheckpointError, match="model_final.pth"):
        do_eval_only(cfg)
    assert not marker.exists() and not (out / "config_eval.yaml").exists()

    trusted = _toy_cfg(f"train.output_dir={out}", f"train.init_checkpoint={path}", "train.trust_checkpoint=True")
    results = do_eval_only(trusted)
    assert marker.exists() and results["toy"]["count"] == 16
    assert f"init_checkpoint: {path}" in (out / "config_eval.yaml").read_text()


def test_checkpoints_the_trainer_writes_load_with_weights_only_and_resume(tmp_path):
    from detectron2.config import LazyCall as L

    from voxelsplat.engine import build_model, do_train
    from voxelsplat.engine.ema_hook import ModelEMAHook

    out = tmp_path / "run"
    cfg = _toy_cfg(f"train.output_dir={out}", "train.eval_period=0")
    cfg.train.extra_hooks = [L(ModelEMAHook)(decay=0.9, period=10)]
    torch.manual_seed(cfg.train.seed)
    trainer = do_train(cfg)
    written = sorted(os.path.basename(p) for p in glob.glob(str(out / "*.pth")))
    assert "model_final.pth" in written and "model_0000009.pth" in written and len(written) >= 5, written
    for name in written:
        torch.load(out / name, map_location="cpu", weights_only=True)  # raises if anything needs unpickling
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert {"model", "trainer", "iteration"} <= final.keys() and final["iteration"] == 19
    assert final["trainer"]["optimizer"]["state"]  # the optimizer's state, once, inside the trainer's
    hooks = final["trainer"]["hooks"]
    assert hooks["LRScheduler"]["last_epoch"] == 20 and hooks["ModelEMAHook"]["updates"] > 0

    # a resume reads them through the safe loader: model, optimizer and trainer state all come back
    from detectron2.config import instantiate

    model = build_model(cfg)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    checkpointer = OccupancyCheckpointer(model, str(out))
    extra = checkpointer.resume_or_load("", resume=True)
    assert extra["iteration"] == 19
    optimizer.load_state_dict(extra["trainer"]["optimizer"])  # what the trainer's load_state_dict does
    _assert_state_equal(model, trainer.model.state_dict())
    assert optimizer.state_dict()["state"][0]["step"] == 20


class _Stateful:
    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def test_saved_state_is_made_plain_or_refused_naming_the_entry(tmp_path):
    import random
    from datetime import datetime

    model = _small_model(5)
    random.seed(1)
    np.random.seed(2)
    rng = {"python": random.getstate(), "numpy": np.random.get_state()}  # holds a uint32 array
    expected_draws = (random.random(), np.random.random(4))
    plain = _Stateful({"best": np.float64(0.25), "epoch": np.int64(3), "history": [np.float32(1.5), 2],
                       "counts": np.arange(6, dtype=np.int32).reshape(2, 3), "rng": rng})
    OccupancyCheckpointer(model, str(tmp_path), extra=plain).save("model_a")
    saved = torch.load(tmp_path / "model_a.pth", weights_only=True)["extra"]
    assert {k: saved[k] for k in ("best", "epoch", "history")} == {"best": 0.25, "epoch": 3, "history": [1.5, 2]}
    assert type(saved["epoch"]) is int
    assert saved["counts"].dtype == torch.int32 and saved["counts"].tolist() == [[0, 1, 2], [3, 4, 5]]
    random.setstate(saved["rng"]["python"])
    np.random.set_state(saved["rng"]["numpy"])  # the array came back as a tensor, which numpy takes
    assert random.random() == expected_draws[0]
    np.testing.assert_array_equal(np.random.random(4), expected_draws[1])

    # an object that would make the file unloadable without unpickling is refused when saving
    timed = _Stateful({"sampler": {"epochs": [{"started": datetime(2025, 1, 1)}]}})
    with pytest.raises(TypeError, match=r"extra\.sampler\.epochs\[0\]\.started is a datetime\.datetime"):
        OccupancyCheckpointer(model, str(tmp_path), extra=timed).save("model_b")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_a.pth"]


# ---------------------------------------------------------------------------- strict evaluation
def test_strict_load_lists_the_first_missing_and_misshaped_entries_and_their_count(tmp_path):
    source = _small_model(6)
    state = source.state_dict()
    kept = {k: v for k, v in state.items() if not k.startswith(("1.", "4."))}  # drop both BatchNorms
    kept["3.weight"] = torch.zeros(3, 5)
    path = tmp_path / "partial.pth"
    torch.save({"model": kept}, path)
    missing = sorted(k for k in state if k not in kept and not k.endswith("num_batches_tracked"))
    assert len(missing) == 8

    with pytest.raises(IncompatibleCheckpointError) as error:
        OccupancyCheckpointer(_small_model(7), strict=True).load(str(path))
    message = str(error.value)
    assert str(path) in message
    assert f"9 of the model's {len(state)} parameters and buffers cannot be loaded" in message
    assert f"8 missing ({', '.join(missing[:5])}, ... and 3 more)" in message
    assert "3.weight: [3, 5] in the file, [3, 6] in the model" in message

    complete = tmp_path / "complete.pth"
    torch.save({"model": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}}, complete)
    target = _small_model(8)
    OccupancyCheckpointer(target, strict=True).load(str(complete))  # the step counters are not required
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(target.state_dict()[key], value), key


def test_partial_initialisation_warns_how_many_entries_were_skipped(tmp_path, caplog):
    source = _small_model(9)
    state = source.state_dict()
    skipped = ["4.bias", "4.running_mean", "4.running_var", "4.weight", "5.bias"]
    kept = {k: v for k, v in state.items() if k not in skipped}
    kept["5.bias"] = torch.zeros(7)
    kept["extra_head.weight"] = torch.ones(1)
    path = tmp_path / "init.pth"
    torch.save({"model": kept}, path)
    target = _small_model(10)
    initial = {k: v.clone() for k, v in target.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger=CHECKPOINT_LOGGER):
        OccupancyCheckpointer(target).load(str(path))
    assert (f"{path}: 5 of the model's {len(state)} parameters and buffers were not loaded and keep their initial "
            f"values (4 missing from the file, 1 of another shape): {', '.join(skipped)}; 1 entries of the file are "
            f"unused") in caplog.text
    for key, value in target.state_dict().items():
        assert torch.equal(value, initial[key] if key in skipped else state[key]), key


def test_training_from_a_partial_checkpoint_warns_with_the_count(tmp_path, caplog):
    from voxelsplat.engine import build_model, do_train

    path = tmp_path / "init.pth"
    cfg = _toy_cfg(f"train.output_dir={tmp_path / 'run'}", f"train.init_checkpoint={path}", "train.max_iter=2",
                   "train.eval_period=null")
    state = build_model(cfg).state_dict()
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("norm.")}}, path)
    with caplog.at_level(logging.WARNING, logger=CHECKPOINT_LOGGER):
        do_train(cfg)
    assert f"2 of the model's {len(state)} parameters and buffers were not loaded" in caplog.text
    assert "norm.bias, norm.weight" in caplog.text


def test_eval_only_on_a_training_folder_keeps_its_config_yaml(tmp_path):
    from voxelsplat.engine import build_model

    run = tmp_path / "run"
    cfg = _toy_cfg(f"train.output_dir={run}")
    model = build_model(cfg)
    OccupancyCheckpointer(model, str(run)).save("model_final")
    training_config = "# the config of the training run\ntrain:\n  max_iter: 20\n"
    (run / "config.yaml").write_text(training_config)
    state = model.state_dict()
    partial = tmp_path / "partial.pth"
    torch.save({"model": {k: v for k, v in state.items() if k != "norm.bias"}}, partial)

    failed = _run_train_net("--config-file", TOY_CONFIG, "--eval-only", f"train.init_checkpoint={partial}",
                            f"train.output_dir={run}")
    assert failed.returncode != 0
    assert "IncompatibleCheckpointError" in failed.stderr and "partial.pth" in failed.stderr
    assert "1 missing (norm.bias)" in failed.stderr
    assert (run / "config.yaml").read_text() == training_config
    assert not (run / "config_eval.yaml").exists()

    ok = _run_train_net("--config-file", TOY_CONFIG, "--eval-only", f"train.init_checkpoint={run}/model_final.pth",
                        f"train.output_dir={run}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (run / "config.yaml").read_text() == training_config
    assert f"init_checkpoint: {run}/model_final.pth" in (run / "config_eval.yaml").read_text()


# ---------------------------------------------------------------------------- record cache
def _assert_records_equal(actual, expected, where="records"):
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray) and actual.dtype == expected.dtype, where
        np.testing.assert_array_equal(actual, expected, err_msg=where)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            _assert_records_equal(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_records_equal(a, e, f"{where}[{i}]")
    else:
        assert type(actual) is type(expected) and actual == expected, where


def test_record_cache_is_data_and_a_tampered_cache_is_rebuilt_never_run(synthetic_dataset, tmp_path, monkeypatch,
                                                                        caplog):
    import nuscenes.nuscenes

    from voxelsplat.data.datasets import load_nuscenes_occupancy_records

    devkit_loads = []
    devkit = nuscenes.nuscenes.NuScenes

    def counting_devkit(*args, **kwargs):
        devkit_loads.append(1)
        return devkit(*args, **kwargs)

    monkeypatch.setattr(nuscenes.nuscenes, "NuScenes", counting_devkit)
    cache_dir = tmp_path / "cache"

    def load():
        return load_nuscenes_occupancy_records(synthetic_dataset.root, synthetic_dataset.version, "all",
                                               cache_dir=str(cache_dir))

    built = load()
    assert len(devkit_loads) == 1 and len(built) == synthetic_dataset.samples_per_scene * len(synthetic_dataset.scenes)
    [name] = os.listdir(cache_dir)
    cache = cache_dir / name
    assert name.endswith(".json")
    json.loads(cache.read_text())  # plain JSON: reading it cannot run code
    cached = load()
    assert len(devkit_loads) == 1  # served by the cache
    _assert_records_equal(cached, built)  # every array exact, every type kept

    marker = tmp_path / "code_ran"
    for tampered in (pickle.dumps([_CodeOnUnpickle(marker)]), b'{"records": "not a list"}', b'[{"sample": 1}]'):
        cache.write_bytes(tampered)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="voxelsplat.data.datasets"):
            rebuilt = load()
        assert str(cache) in caplog.text and "rebuilding" in caplog.text
        assert not marker.exists()
        _assert_records_equal(rebuilt, built)
        _assert_records_equal(load(), built)  # and the cache written again is whole
    assert len(devkit_loads) == 4


# ---------------------------------------------------------------------------- camera images
def _photo(height=225, width=400, seed=0):
    """An RGB uint8 picture with texture at every scale (JPEG has something to encode)."""
    rng = np.random.default_rng(seed)
    picture = np.zeros((height, width, 3), np.float32)
    for cells in (4, 16, 64):
        noise = rng.random((cells * height // width + 1, cells, 3)).astype(np.float32)
        picture += cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC) * 85
    return np.clip(picture, 0, 255).astype(np.uint8)


def test_truncated_or_undecodable_camera_image_is_an_error_naming_sample_and_file(tmp_path):
    from voxelsplat.data.loading import load_image

    photo = _photo()
    ok, encoded = cv2.imencode(".jpg", photo[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    jpeg = encoded.tobytes()
    whole = tmp_path / "n015__CAM_FRONT__1.jpg"
    whole.write_bytes(jpeg)
    loaded = load_image(str(whole), "token-a")
    np.testing.assert_array_equal(loaded, cv2.imread(str(whole))[:, :, ::-1])  # the reference decoder's pixels
    assert loaded.shape == photo.shape and np.abs(loaded.astype(int) - photo).mean() < 4
    padded = tmp_path / "padded.jpg"  # bytes after the end-of-image marker are allowed
    padded.write_bytes(jpeg + b"\x00" * 16)
    np.testing.assert_array_equal(load_image(str(padded), "token-a"), loaded)

    cut = tmp_path / "n015__CAM_BACK__1.jpg"
    cut.write_bytes(jpeg[:len(jpeg) // 3])
    grey = cv2.imread(str(cut))  # what libjpeg alone makes of it: no error, the lost rows grey
    assert grey is not None and (grey[-20:] == 128).all()
    with pytest.raises(ValueError, match=r"sample token-b: camera image .*n015__CAM_BACK__1\.jpg.* truncated"):
        load_image(str(cut), "token-b")

    ok, png = cv2.imencode(".png", photo)
    cut_png = tmp_path / "cut.png"
    cut_png.write_bytes(png.tobytes()[:len(png) // 3])
    with pytest.raises(ValueError, match=r"sample token-c: .*cut\.png.* truncated"):
        load_image(str(cut_png), "token-c")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"sample token-d: .*garbage\.jpg.* could not be decoded"):
        load_image(str(garbage), "token-d")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"sample token-e: .*empty\.jpg.* is empty"):
        load_image(str(empty), "token-e")


# ---------------------------------------------------------------------------- interrupted writes
def test_checkpointer_removes_temporaries_of_killed_saves_when_it_starts(tmp_path):
    stale = tmp_path / ".model_0004999.pth.tmp-abcd_123.pth"
    live = tmp_path / ".model_0005000.pth.tmp-zzzz9999.pth"
    for path in (stale, live):
        path.write_bytes(b"")
    when = os.stat(stale).st_mtime - 3600
    os.utime(stale, (when, when))
    OccupancyCheckpointer(nn.Linear(2, 2), str(tmp_path), save_to_disk=False)  # a process that does not save
    assert stale.exists()
    OccupancyCheckpointer(nn.Linear(2, 2), str(tmp_path))
    assert not stale.exists() and live.exists()
