"""Data-pipeline throughput: the training mapper (image + BEV augmentation, LiDAR depth,
Gaussian voxel sampling and render views on) on the synthetic dataset the demo uses (352x128
camera images, the tiny config's network input size), in the main process (baseline) and
through the loader with 2 workers; next to it, when a tiny model config is present, the time
of one training step of that model, so the figure to read is
``loader_seconds_per_batch / model_step_seconds`` (< 1: data is not the bottleneck).
"""
from __future__ import annotations

import os
import time
from typing import Dict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAMERA_IMAGE_SIZE = (352, 128)  # the demo's synthetic camera images (W, H)
TINY_MODEL_CONFIGS = [os.path.join(ROOT, "configs", "synthetic", f) for f in ("voxelsplat_tiny.py", "fbocc_tiny.py")]


def _tiny_config():
    from detectron2.config import LazyConfig

    for path in TINY_MODEL_CONFIGS:
        if os.path.isfile(path):
            return path, LazyConfig.load(path)
    return None, None


def _dataset(workdir: str, quick: bool) -> str:
    from voxelsplat.synthetic import generate_synthetic_dataset

    root = os.path.join(workdir, "data_synthetic_quick" if quick else "data_synthetic")
    if not os.path.isdir(os.path.join(root, "v1.0-mini")):
        generate_synthetic_dataset(root, version="v1.0-mini", scenes=2, samples_per_scene=4 if quick else 8,
                                   image_size=CAMERA_IMAGE_SIZE, seed=0)
    return root


def _samples_per_second(loader, batches: int, warmup: int = 1) -> float:
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    count = sum(len(next(iterator)) for _ in range(batches))
    elapsed = time.perf_counter() - start
    del iterator
    return count / elapsed


def _model_step_seconds(cfg, loader, steps: int) -> float:
    """Median seconds of forward + backward + optimizer step of the tiny model on CPU."""
    import torch
    from detectron2.config import instantiate

    model = instantiate(cfg.model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(steps + 1)]
    del iterator
    times = []
    for batch in batches:
        start = time.perf_counter()
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def run(args) -> Dict[str, object]:
    from voxelsplat.data.build import build_train_loader
    from voxelsplat.data.datasets import register_nuscenes_occupancy
    from voxelsplat.data.mapper import TemporalDatasetMapper

    quick = bool(getattr(args, "quick", False))
    workdir = os.path.abspath(getattr(args, "workdir", os.path.join(ROOT, "output", "benchmark")))
    root = _dataset(workdir, quick)
    name = register_nuscenes_occupancy("benchmark_data_all", root, "v1.0-mini", "all",
                                       cache_dir=os.path.join(workdir, "record_cache"))
    config_path, cfg = _tiny_config()
    image_size = tuple(cfg.dataloader.train.mapper.input_size) if cfg is not None else CAMERA_IMAGE_SIZE
    mapper = TemporalDatasetMapper(True, image_size, bda_rotation_range=(-10, 10), dataset_name=name,
                                   regularizer=dict(num_gaussians=100000))
    batch_size, batches = 2, (3 if quick else 12)
    results: Dict[str, object] = dict(camera_image_size=list(CAMERA_IMAGE_SIZE), input_image_size=list(image_size),
                                      total_batch_size=batch_size, num_gaussians=100000, batches_timed=batches)
    single = _samples_per_second(build_train_loader(name, mapper, batch_size, num_workers=0, seed=0), batches)
    workers = _samples_per_second(build_train_loader(name, mapper, batch_size, num_workers=2, seed=0), batches)
    results.update(mapper_samples_per_s_main_process=round(single, 2), loader_samples_per_s_2_workers=round(workers, 2),
                   speedup_2_workers_vs_main_process=round(workers / single, 2))
    if cfg is not None and not quick:
        try:
            step = _model_step_seconds(cfg, build_train_loader(name, mapper, batch_size, num_workers=0, seed=0), steps=3)
            results.update(tiny_model_config=os.path.relpath(config_path, ROOT), tiny_model_step_s=round(step, 3),
                           loader_s_per_batch_over_model_step=round(batch_size / workers / step, 3))
        except Exception as error:  # the model is not this benchmark's subject: report, don't fail
            results["tiny_model_step_error"] = f"{type(error).__name__}: {error}"
    return results
