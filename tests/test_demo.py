"""The demo pipeline end to end at a tiny size, through the same code path as `make demo`:
dataset generation, training and evaluation of both models, the floors, the table, TensorBoard
logs and pictures."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_demo_writes_metrics_table_tensorboard_and_pictures(tmp_path):
    import cv2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, data = tmp_path / "demo", tmp_path / "data"
    command = [sys.executable, os.path.join(ROOT, "tools", "run_demo.py"), "--quick", "--iters", "3",
               "--pretrain-iters", "2", "--output-dir", str(out), "--data-dir", str(data)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    floors = ["floor: all free", "floor: class prior", "floor: previous GT", "floor: GT occupancy, zero flow"]
    assert list(results) == ["FB-Occ (baseline)", "VoxelSplat", *floors]
    for name, metrics in results.items():
        for key in ("RayIoU", "RayIoU@1", "RayIoU@2", "RayIoU@4", "mIoU"):
            assert 0.0 <= metrics[key] <= 100.0, (name, key, metrics[key])
        assert "mAVE" in metrics and "OccScore" in metrics and "mAVE_TP" in metrics
        if name in floors:
            assert metrics["kind"] == "floor" and "train_time_s" not in metrics
            continue
        assert metrics["kind"] == "model" and {"mAVE_zero_flow", "mAVE_gt_occupancy"} <= set(metrics)
        assert metrics["train_time_s"] > 0 and metrics["step_time_s"] > 0 and metrics["peak_memory_mb"] > 0
    assert results["floor: all free"]["RayIoU"] == 0.0 and results["floor: previous GT"]["RayIoU"] > 0.0
    table = (out / "results.md").read_text()
    assert "| VoxelSplat |" in table and "RayIoU@4" in table and "mIoU" in table and "mAVE_zero_flow" in table
    assert "| floor: class prior |" in table and "| floor: previous GT |" in table
    cached = json.loads((out / "floors.json").read_text())
    assert set(cached["floors"]) == {"all_free", "class_prior", "previous_gt", "gt_occupancy_zero_flow",
                                     "split_motion"} and "key" in cached
    motion = cached["floors"]["split_motion"]
    assert motion["train_keyframes"] == 4 and motion["val_keyframes"] == 4  # --quick: 2 scenes x 4 keyframes
    assert 0.0 <= motion["train_moving_share"] <= 1.0 and motion["train_flow_class_voxels"] > 0
    gt_zero_flow = results["floor: GT occupancy, zero flow"]
    assert gt_zero_flow["RayIoU"] == 100.0 and gt_zero_flow["mAVE"] > 0
    for run in ("fbocc_tiny", "voxelsplat_tiny"):
        run_dir = out / run
        assert (run_dir / "model_final.pth").is_file()
        assert (run_dir / "inference" / "occupancy_results.json").is_file()
        pictures = sorted(p for p in os.listdir(run_dir / "pictures") if p.endswith(".png"))
        kinds = {p.split("_", 1)[1] for p in pictures}
        assert {"bev_occupancy.png", "bev_flow.png", "cameras.png"} <= kinds
        if run == "voxelsplat_tiny":
            assert "regularizer_renders.png" in pictures
        for picture in pictures:
            image = cv2.imread(str(run_dir / "pictures" / picture))
            assert image is not None and image.shape[0] >= 100 and image.shape[1] >= 200, picture
            assert image.std() > 5, f"{picture} is blank"
        events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        tags = events.Tags()
        assert any(t.startswith("occupancy/") for t in tags["scalars"]), tags["scalars"]
        assert any("bev_occupancy" in t for t in tags["images"]), tags["images"]
    # both models start from the shared depth pretraining, which trained the image branch only
    pretrained = out / "depth_pretrain" / "model_final.pth"
    assert json.loads((out / "depth_pretrain" / "depth_pretrain.json").read_text())["iters"] == 2
    import torch

    weights = torch.load(pretrained, map_location="cpu", weights_only=True)["model"]
    for run in ("fbocc_tiny", "voxelsplat_tiny"):
        assert f"init_checkpoint: {pretrained}" in (out / run / "config.yaml").read_text()
    log = (out / "depth_pretrain" / "log.txt").read_text()
    # one loss: detectron2 logs it as total_loss alone
    assert "total_loss" in log and "loss_occ" not in log and "loss_flow" not in log
    assert any(k.startswith("depth_net.") for k in weights) and any(k.startswith("head.") for k in weights)
    # A second run with the same settings reuses the dataset, the depth pretraining, the floors and
    # the finished model runs (read from their folders): nothing is regenerated or retrained, and
    # the same weights give the same metrics.
    files = [p for p in data.rglob("*") if p.is_file() and p.suffix in (".npz", ".jpg", ".json")]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    pretrain_stamp = pretrained.stat().st_mtime_ns
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for reused in ("synthetic dataset already in", "depth-pretrained checkpoint already in", "floors already in"):
        assert reused in again.stdout, (reused, again.stdout[-3000:])
    assert "generating the synthetic dataset" not in again.stdout
    assert again.stdout.count("read instead of trained again") == len(results) - len(run_demo_floors(results))
    assert "Starting training" not in again.stdout
    assert len(files) > 20 and {p: p.stat().st_mtime_ns for p in files} == stamps
    assert pretrained.stat().st_mtime_ns == pretrain_stamp
    second = json.loads((out / "results.json").read_text())
    assert list(second) == list(results)
    for name in results:
        for key in ("RayIoU", "mIoU", "mAVE"):
            assert second[name][key] == results[name][key] or (math.isnan(second[name][key])
                                                                and math.isnan(results[name][key])), (name, key)
    marker = json.loads((data / "demo_dataset.json").read_text())
    assert marker["scenes"] == 2 and marker["samples_per_scene"] == 4


def run_demo_floors(results):
    """The rows of a demo's results.json that are floors (no training run of their own)."""
    return [name for name, metrics in results.items() if metrics.get("kind") != "model"]
