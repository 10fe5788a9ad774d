"""Synthetic dataset generation: samples (keyframes with 6 camera images, a LiDAR sweep and
both label sets) per second and size on disk.

Workload: 2 scenes x 20 keyframes of 704x256 images with every core (``--quick``: 2 x 4),
and the demo's dataset (``tools/run_demo.py`` defaults: 6 scenes x 20 keyframes, 352x128).
Baseline in the same run: one worker on one scene of the first workload's size, so
``parallel_speedup`` is the gain from the worker pool.
"""
from __future__ import annotations

import os
import shutil
import time

from voxelsplat.synthetic import generate_synthetic_dataset


def _generate(root: str, scenes: int, samples: int, image_size, workers: int) -> dict:
    if os.path.exists(root):
        shutil.rmtree(root)
    start = time.perf_counter()
    info = generate_synthetic_dataset(root, version="v1.0-mini", scenes=scenes, samples_per_scene=samples,
                                      image_size=image_size, seed=0, workers=workers)
    seconds = time.perf_counter() - start
    count = scenes * samples
    result = dict(scenes=scenes, samples_per_scene=samples, image_size=list(image_size), workers=workers,
                  seconds=round(seconds, 2), samples_per_s=round(count / seconds, 3),
                  size_mib=round(info["bytes"] / 2**20, 1), mib_per_sample=round(info["bytes"] / 2**20 / count, 2))
    shutil.rmtree(root)
    return result


def run(args) -> dict:
    workers = os.cpu_count() or 1
    samples = 4 if args.quick else 20
    root = os.path.join(args.workdir, "synthetic_benchmark")
    baseline = _generate(root, 1, samples, (704, 256), 1)
    full = _generate(root, 2, samples, (704, 256), workers)
    result = {"one_worker_704x256": baseline, f"{workers}_workers_704x256": full,
              "parallel_speedup": round(full["samples_per_s"] / baseline["samples_per_s"], 2)}
    if not args.quick:
        demo = _generate(root, 6, 20, (352, 128), workers)
        result["demo_dataset_352x128"] = demo
    return result
