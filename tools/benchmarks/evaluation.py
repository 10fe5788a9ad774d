"""RayIoU evaluation speed: seconds per sample for the benchmark's rays (up to 8 origins x
39 x 360 = 14040 rays each), cast through the prediction and the ground truth, counted into
the per-sample statistics - what ``OccupancyEvaluator.process`` does for each of the 6019
nuScenes validation samples (target: < 0.1 s per sample on 2 CPU cores, the whole set in
under 10 minutes).

Scenes are street-like on the benchmark grid (200 x 200 x 16, 0.4 m): a ground plane of
road / sidewalk / terrain, building and vegetation rows along both sides, cars, trucks and
pedestrians, free space above; 8 origins along the ego trajectory. The prediction is the
ground truth with objects moved, voxels relabelled and a noisy flow.

The shipped CPU path is the compiled per-ray walk (``cast_rays(..., backend="auto")``, see
``voxelsplat/evaluation/native.py``). Baselines measured in the same run (``speedup_vs_*``
= baseline time / shipped time):

- ``speedup_vs_torch_walk``: the vectorised PyTorch walk with empty-space jumps
  (``backend="torch"``: the CUDA path, and the CPU fallback without a C compiler);
- ``speedup_vs_plain_walk``: the same vectorised walk without the empty-space jumps
  (``backend="torch", skip_empty_space=False``), on the same samples;
- ``speedup_vs_per_ray_python``: a straightforward per-ray DDA in Python on a random
  subset of the rays, scaled to the full ray count.

With CUDA, the shipped path is also timed on the GPU.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List

import numpy as np
import torch

TARGET_SECONDS_PER_SAMPLE = 0.1
VAL_SAMPLES = 6019


def street_scene(seed: int):
    """(semantics int64 (X, Y, Z) on the OpenOcc v2 spec's grid, flow float32 (..., 2), origins float64
    (8, 3)) and a prediction of it."""
    from voxelsplat.structures import occupancy_spec

    spec = occupancy_spec("openocc_v2")
    label = {name: i for i, name in enumerate(spec.class_names)}
    free = spec.free_index
    rng = np.random.default_rng(seed)
    X, Y, Z = spec.grid.shape
    sem = np.full((X, Y, Z), free, np.int64)
    ground = np.full((X, Y), label["terrain"])
    ground[:, 80:120] = label["driveable_surface"]  # along x
    ground[:, 70:80] = ground[:, 120:130] = label["sidewalk"]
    sem[:, :, 0:2] = ground[:, :, None]
    for side in (slice(40, 70), slice(130, 160)):
        x = 0
        while x < X:  # buildings and trees with gaps
            width = int(rng.integers(8, 30))
            kind = rng.choice([label["manmade"], label["vegetation"], free], p=[0.55, 0.3, 0.15])
            if kind != free:
                start = side.start + int(rng.integers(0, 10))
                sem[x:x + width, start:side.stop, 2:int(rng.integers(6, Z))] = kind
            x += width + int(rng.integers(0, 6))
    flow = np.zeros((X, Y, Z, 2), np.float32)
    sizes = {"car": (11, 5, 4), "truck": (20, 6, 8), "pedestrian": (2, 2, 5), "barrier": (6, 1, 3)}
    for _ in range(25):  # vehicles and pedestrians on and near the road
        name = str(rng.choice(["car", "car", "car", "truck", "pedestrian", "pedestrian", "barrier"]))
        length, width, height = sizes[name]
        x0, y0 = int(rng.integers(0, X - length)), int(rng.integers(72, 128 - width))
        sem[x0:x0 + length, y0:y0 + width, 2:2 + height] = label[name]
        if label[name] in spec.flow_classes:
            flow[x0:x0 + length, y0:y0 + width, 2:2 + height] = rng.normal(0, 4, 2)
    pred = np.roll(sem, int(rng.integers(-2, 3)), axis=0)
    relabel = rng.random(sem.shape) < 0.03
    pred[relabel] = rng.integers(0, spec.num_classes, int(relabel.sum()))
    pred_flow = flow + rng.normal(0, 0.5, flow.shape).astype(np.float32)
    origins = np.stack([np.linspace(-24, 24, 8) + rng.normal(0, 0.5, 8), rng.normal(0, 1.0, 8),
                        np.full(8, 1.84)], 1)
    return sem, flow, pred, pred_flow, origins


def _time_samples(scenes, device, **walk) -> List[float]:
    """Seconds per sample; ``walk``: keyword arguments for ``cast_rays`` (backend, skip_empty_space)."""
    from voxelsplat.evaluation import ray_casting
    from voxelsplat.evaluation.ray_metrics import cast_sample_rays, sample_stats
    from voxelsplat.structures import occupancy_spec

    spec = occupancy_spec("openocc_v2")

    original = ray_casting.cast_rays
    times = []
    try:
        if walk:
            import voxelsplat.evaluation.ray_metrics as ray_metrics

            ray_metrics.cast_rays = lambda *a, **k: original(*a, **walk, **k)
        for sem, flow, pred, pred_flow, origins in scenes:
            tensors = [torch.from_numpy(a).to(device) for a in (pred, sem, pred_flow, flow)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            rays = cast_sample_rays(tensors[0], origins, tensors[1], tensors[2], tensors[3],
                                    num_classes=spec.num_classes, free_index=spec.free_index, grid=spec.grid)
            sample_stats(rays, num_classes=spec.num_classes, voxel_size=spec.grid.voxel_size)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    finally:
        import voxelsplat.evaluation.ray_metrics as ray_metrics

        ray_metrics.cast_rays = original
    return times


def _python_walk(occupied, shape, origin_vox, direction) -> float:
    """One ray, one volume (nested lists), plain Python 3D-DDA (the per-ray baseline).
    Returns the exit distance."""
    v = [math.floor(c) for c in origin_vox]
    step = [1 if d >= 0 else -1 for d in direction]
    t_max = [((v[a] + (step[a] > 0)) - origin_vox[a]) / direction[a] if direction[a] else math.inf for a in range(3)]
    t_delta = [abs(1 / direction[a]) if direction[a] else math.inf for a in range(3)]
    last = 0.0
    while all(0 <= v[a] < shape[a] for a in range(3)):
        if t_max[0] < t_max[1]:
            axis = 0 if t_max[0] < t_max[2] else 2
        else:
            axis = 1 if t_max[1] < t_max[2] else 2
        last = t_max[axis]
        if occupied[v[0]][v[1]][v[2]]:
            return last
        v[axis] += step[axis]
        t_max[axis] += t_delta[axis]
    return last


def _python_seconds_per_sample(scene, num_rays: int, seed: int = 0) -> float:
    from voxelsplat.structures import DEFAULT_GRID
    from voxelsplat.evaluation import lidar_ray_directions

    sem, _, pred, _, origins = scene
    directions = lidar_ray_directions().numpy()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(origins) * len(directions), num_rays)
    volumes = [(sem != 16).tolist(), (pred != 16).tolist()]  # nested lists: fair to pure Python
    start = time.perf_counter()
    for ray in picks:
        k, r = divmod(int(ray), len(directions))
        o = ((origins[k] - DEFAULT_GRID.range_min) / DEFAULT_GRID.voxel_size).tolist()
        d = directions[r].tolist()
        for occupied in volumes:
            _python_walk(occupied, sem.shape, o, d)
    return (time.perf_counter() - start) / num_rays * len(origins) * len(directions)


def run(args) -> Dict[str, object]:
    quick = bool(getattr(args, "quick", False))
    threads = torch.get_num_threads()
    num_samples = 3 if quick else 8
    scenes = [street_scene(seed) for seed in range(num_samples)]
    cpu = torch.device("cpu")
    from voxelsplat.evaluation.native import ray_walk_library

    _time_samples(scenes[:1], cpu)  # warm-up (and the build of the C walk, where needed)
    shipped = _time_samples(scenes, cpu)
    torch_walk = _time_samples(scenes, cpu, backend="torch")
    plain = _time_samples(scenes[: max(2, num_samples // 2)], cpu, backend="torch", skip_empty_space=False)
    python = _python_seconds_per_sample(scenes[0], 300 if quick else 1500)
    seconds = float(np.median(shipped))
    results: Dict[str, object] = {
        "device": "cpu",
        "walk": "native" if ray_walk_library() is not None else "torch (no C compiler)",
        "threads": threads,
        "samples": num_samples,
        "rays_per_sample": 8 * 14040,
        "seconds_per_sample": round(seconds, 4),
        "seconds_per_sample_max": round(float(np.max(shipped)), 4),
        "target_seconds_per_sample": TARGET_SECONDS_PER_SAMPLE,
        "meets_target": seconds < TARGET_SECONDS_PER_SAMPLE,
        "val_set_minutes": round(seconds * VAL_SAMPLES / 60, 1),
        "torch_walk_seconds_per_sample": round(float(np.median(torch_walk)), 4),
        "speedup_vs_torch_walk": round(float(np.median(torch_walk)) / seconds, 2),
        "plain_walk_seconds_per_sample": round(float(np.median(plain)), 4),
        "speedup_vs_plain_walk": round(float(np.median(plain)) / seconds, 2),
        "per_ray_python_seconds_per_sample": round(python, 2),
        "speedup_vs_per_ray_python": round(python / seconds, 1),
    }
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        _time_samples(scenes[:1], gpu)
        gpu_times = _time_samples(scenes, gpu)
        results["gpu"] = {"device_name": torch.cuda.get_device_name(),
                          "seconds_per_sample": round(float(np.median(gpu_times)), 4),
                          "speedup_vs_cpu": round(seconds / float(np.median(gpu_times)), 2)}
    else:
        results["gpu"] = "skipped: no CUDA device"
    return results
