"""metrics.json: MetricsJSONWriter writes detectron2's records, appending each batch whole and
creating the file only with its first record; the readers skip a line a killed run cut."""
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from detectron2.utils.events import EventStorage, JSONWriter

from voxelsplat.engine import defaults
from voxelsplat.engine.json_writer import MetricsJSONWriter
from voxelsplat.evaluation.plots import read_eval_curves
from voxelsplat.utils.io import read_json_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CONFIG = os.path.join(ROOT, "tests", "toy", "toy_config.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))

import run_demo  # noqa: E402

TIMING_KEYS = {"time", "data_time", "eta_seconds", "peak_memory_mb"}


def _log_random_scalars(storage, rng, iteration):
    storage.iter = iteration
    storage.put_scalar("total_loss", float(rng.normal()))  # smoothed (median of the window)
    storage.put_scalar("lr", float(rng.uniform()), smoothing_hint=False)
    if iteration % 3 == 0:
        storage.put_scalars(**{"occupancy/RayIoU": float(rng.uniform())}, smoothing_hint=False)


def test_records_match_detectron2s_json_writer_and_no_file_before_the_first(tmp_path):
    rng = np.random.default_rng(0)
    ours, reference = tmp_path / "ours" / "metrics.json", tmp_path / "d2" / "metrics.json"
    reference.parent.mkdir()
    with EventStorage(0) as storage:
        writer, d2_writer = MetricsJSONWriter(str(ours), window_size=4), JSONWriter(str(reference), window_size=4)
        writer.write()
        writer.close()  # a no-op: the writer keeps no file open
        assert not ours.exists() and reference.exists() and reference.stat().st_size == 0
        for iteration in range(11):
            _log_random_scalars(storage, rng, iteration)
            if iteration % 2 == 1:  # some writes see two iterations, some one
                writer.write()
                d2_writer.write()
        writer.write()
        d2_writer.write()
        written = ours.read_bytes()
        writer.write()  # nothing new: nothing written
        assert ours.read_bytes() == written
        d2_writer.close()
    assert ours.read_bytes() == reference.read_bytes()
    # per write, each scalar's latest value under the iteration it was logged at, in detectron2's order
    records = read_json_lines(str(ours))
    assert [r["iteration"] for r in records] == [1, 0, 3, 5, 7, 6, 9, 10]
    assert [r["iteration"] for r in records if "occupancy/RayIoU" in r] == [0, 3, 6, 9]


def test_a_cut_last_line_is_ended_and_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.json"
    path.write_text('{"iteration": 9, "occupancy/RayIoU": 0.25}\n{"iteration": 14, "total_lo')  # killed mid-record
    with EventStorage(15) as storage:
        storage.put_scalars(**{"occupancy/RayIoU": 0.5, "total_loss": 1.5}, smoothing_hint=False)
        MetricsJSONWriter(str(path)).write()  # the resumed run
    lines = path.read_text().splitlines()
    assert lines[-1] == json.dumps({"iteration": 15, "occupancy/RayIoU": 0.5, "total_loss": 1.5}, sort_keys=True)
    with caplog.at_level(logging.WARNING):
        curves = read_eval_curves(str(path), ["RayIoU"])
    assert curves == {"RayIoU": [(9, 0.25), (15, 0.5)]}
    assert str(path) in caplog.text and "line(s) [2]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        metrics = run_demo.read_run(str(tmp_path))
    assert metrics["RayIoU"] == 0.5
    assert str(path) in caplog.text


def test_an_empty_metrics_file_is_read_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.json"
    path.write_text("")  # what detectron2's JSONWriter leaves when a run dies before its first log
    with caplog.at_level(logging.WARNING):
        assert read_eval_curves(str(path), ["RayIoU", "mAVE"]) == {"RayIoU": [], "mAVE": []}
    assert str(path) in caplog.text and "no records" in caplog.text
    with pytest.raises(SystemExit, match="no evaluation results"):
        run_demo.read_run(str(tmp_path))


def _toy_training_records(output_dir):
    cfg = defaults.load_config(TOY_CONFIG, [f"train.output_dir={output_dir}"])
    torch.manual_seed(cfg.train.seed)
    defaults.do_train(cfg)
    return read_json_lines(os.path.join(output_dir, "metrics.json"))


def test_toy_training_logs_the_records_detectron2s_writer_logs(tmp_path, monkeypatch):
    ours = _toy_training_records(str(tmp_path / "ours"))
    with monkeypatch.context() as patch:
        patch.setattr(defaults, "MetricsJSONWriter", JSONWriter)
        reference = _toy_training_records(str(tmp_path / "d2"))
    assert [r["iteration"] for r in ours] == [r["iteration"] for r in reference] == [4, 9, 14, 19, 20]
    for record, expected in zip(ours, reference):
        assert sorted(record) == sorted(expected), record["iteration"]
        assert {k: v for k, v in record.items() if k not in TIMING_KEYS} == \
            {k: v for k, v in expected.items() if k not in TIMING_KEYS}, record["iteration"]
    assert ours[-1].keys() == {"iteration", "toy/mse", "toy/count"}  # the final evaluation


def test_records_of_the_iterations_run_again_are_dropped_on_resume(tmp_path):
    from voxelsplat.engine.json_writer import drop_records_from

    path = tmp_path / "metrics.json"
    assert drop_records_from(str(path), 3) == 0 and not path.exists()
    lines = [json.dumps({"iteration": i, "loss": 0.5 * i}) for i in range(6)]
    path.write_text("\n".join(lines) + '\n{"iteration": 6, "lo')  # a record cut by a kill
    assert drop_records_from(str(path), 4) == 2  # iterations 4 and 5; the cut line goes too
    assert path.read_text() == "".join(json.dumps({"iteration": i, "loss": 0.5 * i}, sort_keys=True) + "\n"
                                       for i in range(4))
    assert drop_records_from(str(path), 10) == 0
