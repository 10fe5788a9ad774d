"""Gaussian rasterization: forward + backward time and peak memory of the CPU backends
("native": C kernels, what "auto" runs on CPU; "torch": pure PyTorch) against the number of
Gaussians and of views, on a street-like scene seen by a ring
of 6 outward-looking cameras per frame (the regularizer's workload: Gaussians at voxel
centres, isotropic scale 0.12 m, the non-free class channels + 2 flow channels, accumulated depth).

Figures are ratios against the smallest workload measured in the same run
(``time_ratio``, ``memory_ratio``, per backend) and between the backends
(``native_speedup`` = torch seconds / native seconds), plus absolute seconds/MiB. Time: median of
repeated calls in this process. Peak memory: growth of the resident set during one call in
a fresh process (sampled by a thread every millisecond); on CUDA,
``torch.cuda.max_memory_allocated`` above the level before the call.

Regularizer overhead (``regularizer_overhead``): one training step (forward, backward,
AdamW) of ``configs/synthetic/voxelsplat_tiny.py`` against the same model and weights without
the regularizer (the tiny FB-Occ baseline), as ``step_time_ratio`` and ``peak_memory_ratio``
(peak RSS of a fresh process per variant; step times interleaved in one process), with the
config's backend ("auto": native on CPU) and, as a baseline, the torch backend
(``step_time_ratio_torch_backend``). Samples are built to the mapper contract
(``voxelsplat/structures/sample_fields.py``) by ``voxelsplat.testing`` at the tiny config's sizes: a
street scene on the model's GT grid, 6 cameras, the config's keyframes of render views and
Gaussian count.

When CUDA is available, the published workload (100k Gaussians, 36 views, 400x225,
18 channels + depth) is timed with every backend that runs there (torch, gsplat, inria),
as ratios against gsplat.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
from typing import Dict, List

import numpy as np
import torch

from voxelsplat.structures import OccupancySpec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = os.path.join(ROOT, "configs", "synthetic", "voxelsplat_tiny.py")
CAMERA_IMAGE_SIZE = (352, 128)  # the demo's synthetic camera images (W, H)
SPEC = OccupancySpec.for_label_set("openocc_v2")  # the released label set and grid
CHANNELS = SPEC.num_classes - 1 + 2  # the non-free class logits + 2 flow components
SCALE_M = 0.12
RING_CAMERAS = 6


def street_scene(num_gaussians: int, num_views: int, width: int, height: int, device="cpu", seed: int = 0) -> dict:
    """Gaussians on a ground plane, building walls and car-sized boxes over the grid of ``SPEC``,
    seen by ``num_views`` cameras (rings of 6 at the ego origin, ``voxelsplat.testing.camera_ring``:
    1.6 m height, 70 degree horizontal field of view; successive rings moved 3 m along x as
    adjacent keyframes would be)."""
    from voxelsplat.testing import camera_ring

    g = torch.Generator().manual_seed(seed)
    grid = SPEC.grid
    low, high = torch.from_numpy(grid.range_min).float(), torch.from_numpy(grid.range_max).float()
    kinds = torch.randint(0, 3, (num_gaussians,), generator=g)
    xy = low[:2] + torch.rand(num_gaussians, 2, generator=g) * (high[:2] - low[:2])
    z = torch.full((num_gaussians,), float(low[2]) + grid.voxel_size / 2)  # the lowest layer
    walls = kinds == 1
    xy[walls, 1] = torch.where(xy[walls, 1] > 0, 12.0, -12.0) + torch.rand(int(walls.sum()), generator=g)
    z[walls] = low[2] + torch.rand(int(walls.sum()), generator=g) * (high[2] - low[2])
    cars = kinds == 2
    xy[cars] = (torch.rand(int(cars.sum()), 2, generator=g) * 2 - 1) * torch.tensor([35.0, 8.0])
    z[cars] = low[2] + torch.rand(int(cars.sum()), generator=g) * 1.6
    voxel_xy = torch.floor((xy - low[:2]) / grid.voxel_size) * grid.voxel_size + low[:2] + grid.voxel_size / 2
    means = torch.cat([voxel_xy, z[:, None]], dim=1)
    rings = [camera_ring(RING_CAMERAS, (width, height), mount_radius=0.0, position=(3.0 * (ring - 2), 0.0))
             for ring in range(math.ceil(num_views / RING_CAMERAS))]
    viewmats = torch.linalg.inv(torch.cat([ring["cam2ego"] for ring in rings])[:num_views])
    scene = dict(
        means=means, quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(num_gaussians, 1),
        scales=torch.full((num_gaussians, 3), SCALE_M), opacities=torch.sigmoid(torch.randn(num_gaussians, generator=g)),
        features=torch.randn(num_gaussians, CHANNELS, generator=g),
        viewmats=viewmats, Ks=rings[0]["intrinsics"][:1].repeat(num_views, 1, 1),
    )
    scene = {k: v.to(device) for k, v in scene.items()}
    scene.update(width=width, height=height)
    return scene


class _PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond by a thread."""

    def __enter__(self):
        import psutil

        self._process = psutil.Process()
        self.base = self._process.memory_info().rss
        self.peak = self.base
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _forward_backward(scene: dict, backend: str) -> None:
    from voxelsplat.splatting import rasterize_gaussians

    leaves = {k: scene[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "features")}
    features, alphas, depths = rasterize_gaussians(
        leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"], leaves["features"],
        scene["viewmats"], scene["Ks"], scene["width"], scene["height"], backend=backend)
    (features.square().mean() + alphas.mean() + depths.mean()).backward()


def time_forward_backward(scene: dict, backend: str, repeats: int) -> Dict[str, float]:
    """Median seconds of forward + backward (after a warm-up call); on CUDA also the peak
    of allocated memory above the level before the call (MiB)."""
    cuda = scene["means"].is_cuda
    _forward_backward(scene, backend)  # warm-up
    seconds, peaks = [], []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        _forward_backward(scene, backend)
        if cuda:
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        seconds.append(time.perf_counter() - start)
    result = {"seconds": round(float(np.median(seconds)), 4)}
    if cuda:
        result["peak_mib"] = round(max(peaks), 1)
    return result


def _cpu_peak_worker(num_gaussians: int, num_views: int, width: int, height: int, backend: str) -> float:
    """Peak RSS growth (MiB) of one forward + backward in a fresh process (after a small
    warm-up), so that memory the allocator kept from earlier work does not hide it."""
    small = street_scene(200, 1, width, height)
    _forward_backward(small, backend)
    scene = street_scene(num_gaussians, num_views, width, height)
    with _PeakRSS() as rss:
        _forward_backward(scene, backend)
    return rss.delta_mib


def cpu_peak_memory_mib(num_gaussians: int, num_views: int, width: int, height: int, backend: str = "torch") -> float:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return round(pool.apply(_cpu_peak_worker, (num_gaussians, num_views, width, height, backend)), 1)


def run(args) -> dict:
    quick = bool(getattr(args, "quick", False))
    width, height = 100, 56  # the tiny demo's render size
    repeats = 2 if quick else 5
    gaussian_counts: List[int] = [1000, 2500, 5000] if quick else [1000, 2500, 5000, 10000, 20000]
    view_counts: List[int] = [6, 12] if quick else [6, 12, 24, 36]
    results = {"device": "cpu", "image_size": [width, height], "channels": CHANNELS, "threads": torch.get_num_threads(),
               "by_gaussians": [], "by_views": []}
    from voxelsplat.splatting import resolve_backend

    backends = ["native", "torch"] if resolve_backend("auto", torch.device("cpu")) == "native" else ["torch"]
    results["backends"] = backends
    for key, workloads in (("by_gaussians", [(n, 12) for n in gaussian_counts]),
                           ("by_views", [(5000, v) for v in view_counts])):
        baselines = {}
        for n, v in workloads:
            scene = street_scene(n, v, width, height)
            row = {"gaussians": n, "views": v}
            for backend in backends:
                stats = time_forward_backward(scene, backend, repeats)
                stats["peak_mib"] = cpu_peak_memory_mib(n, v, width, height, backend)
                base = baselines.setdefault(backend, stats)
                row[backend] = {**stats, "seconds_per_view": round(stats["seconds"] / v, 4),
                                "time_ratio": round(stats["seconds"] / base["seconds"], 2),
                                "memory_ratio": round(stats["peak_mib"] / max(base["peak_mib"], 1e-3), 2)}
            if "native" in row:
                row["native_speedup"] = round(row["torch"]["seconds"] / row["native"]["seconds"], 2)
            results[key].append(row)
    results["regularizer_overhead"] = regularizer_overhead(steps=2 if quick else 6)
    if torch.cuda.is_available():
        results["gpu"] = _gpu_comparison(quick)
    else:
        results["gpu"] = "skipped: no CUDA device"
    return results


def _gpu_comparison(quick: bool) -> dict:
    """torch vs gsplat vs inria at the published workload, ratios against gsplat."""
    from voxelsplat.splatting import BackendUnavailableError, resolve_backend

    num_gaussians, num_views = (20000, 12) if quick else (100000, 36)
    scene = street_scene(num_gaussians, num_views, 400, 225, device="cuda")
    out = {"gaussians": num_gaussians, "views": num_views, "image_size": [400, 225], "channels": CHANNELS,
           "device_name": torch.cuda.get_device_name()}
    for backend in ("gsplat", "inria", "torch"):
        try:
            resolve_backend(backend, torch.device("cuda"))
            out[backend] = time_forward_backward(scene, backend, 3)
        except BackendUnavailableError as error:
            out[backend] = f"unavailable: {error}"
        except torch.cuda.OutOfMemoryError as error:  # the torch backend at 100k x 36 views may not fit
            out[backend] = f"out of memory: {str(error).splitlines()[0]}"
            torch.cuda.empty_cache()
    reference = out.get("gsplat")
    if isinstance(reference, dict):
        for backend in ("inria", "torch"):
            if isinstance(out.get(backend), dict):
                out[backend]["time_ratio_vs_gsplat"] = round(out[backend]["seconds"] / reference["seconds"], 2)
                out[backend]["memory_ratio_vs_gsplat"] = round(out[backend]["peak_mib"] / max(reference["peak_mib"], 1e-3), 2)
    return out


# ------------------------------------------------------------------------------ regularizer overhead
def tiny_training_sample(cfg, spec, seed: int) -> dict:
    """A mapped training sample (``voxelsplat.testing``: a street with 8 moving vehicles on
    ``spec``'s grid) at the tiny config's sizes, with the regularizer's fields: input images at
    the mapper's size from cameras of the demo's size, the config's Gaussian count, render scale
    and keyframe offsets (the ego at 3 m/s)."""
    from voxelsplat.testing import make_sample

    options = cfg.dataloader.train.mapper.regularizer
    return make_sample(spec, seed, image_size=tuple(int(v) for v in cfg.dataloader.train.mapper.input_size),
                       camera_image_size=CAMERA_IMAGE_SIZE, with_regularizer=True,
                       num_gaussians=int(options.num_gaussians), render_scale=float(options.render_scale),
                       render_frame_offsets=[int(o) for o in options.frame_offsets], ego_speed=3.0,
                       num_vehicles=8, sample_token=f"bench{seed}", scene_token="bench")


def _tiny_model_and_batches(steps: int):
    from detectron2.config import LazyConfig, instantiate

    torch.manual_seed(0)
    cfg = LazyConfig.load(TINY_CONFIG)
    model = instantiate(cfg.model).train()
    model.set_training_phase(history_enabled=True, flow_loss_enabled=True)  # both states rendered
    batches = [[tiny_training_sample(cfg, model.spec, seed)] for seed in range(steps + 1)]
    return cfg, model, batches


def _training_step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    losses = model(batch)
    total = sum(losses.values())
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return time.perf_counter() - start


def _peak_memory_worker(with_regularizer: bool, steps: int) -> float:
    """Peak RSS (MiB) of a fresh process that trains the tiny model with or without its regularizer."""
    import resource

    _, model, batches = _tiny_model_and_batches(steps)
    if not with_regularizer:
        model.regularizer = None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for batch in batches:
        _training_step(model, optimizer, batch)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step_time_worker(steps: int) -> dict:
    """Median training-step seconds of the tiny model without and with its regularizer, steps
    interleaved (same weights, same batches) so that a changing machine load hits both alike;
    and the regularizer alone (forward + backward from detached head outputs)."""
    cfg, model, batches = _tiny_model_and_batches(steps)
    regularizer = model.regularizer
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)  # weights stay put
    times = {"baseline": [], "voxelsplat": [], "voxelsplat_torch_backend": [], "regularizer": []}
    configured = regularizer.backend
    for i, batch in enumerate(batches):
        model.regularizer = None
        baseline = _training_step(model, optimizer, batch)
        model.regularizer = regularizer
        voxelsplat = _training_step(model, optimizer, batch)
        regularizer.backend = "torch"
        voxelsplat_torch = _training_step(model, optimizer, batch)
        regularizer.backend = configured
        with torch.no_grad():
            volume, _ = model.extract_volume(batch)
            head = model.head(volume, return_features=regularizer.needs_voxel_features)
        head = {k: v.detach().requires_grad_(True) for k, v in head.items()}
        start = time.perf_counter()
        sum(regularizer(batch, head, flow_loss_enabled=True).values()).backward()
        if i:  # the first step warms up
            times["baseline"].append(baseline)
            times["voxelsplat"].append(voxelsplat)
            times["voxelsplat_torch_backend"].append(voxelsplat_torch)
            times["regularizer"].append(time.perf_counter() - start)
    result = {}
    for k, values in times.items():
        name = "regularizer" if k == "regularizer" else f"{k}_step"
        result[f"{name}_seconds"] = round(float(np.median(values)), 3)
        result[f"{name}_seconds_min"] = round(min(values), 3)
    result["renders_per_step"] = {
        "views": min(regularizer.max_views or 10**9, len(batches[0][0]["render_viewmats"])), "states": 2,
        "gaussians": int(cfg.dataloader.train.mapper.regularizer.num_gaussians),
        "image_size": list(batches[0][0]["render_image_size"])}
    from voxelsplat.splatting import resolve_backend

    result["backend"] = f"{configured} -> {resolve_backend(configured, torch.device('cpu'))}"
    result["torch_threads"] = torch.get_num_threads()
    return result


def regularizer_overhead(steps: int) -> dict:
    """Training step time and peak memory of the tiny VoxelSplat config over the same model
    without the regularizer (the tiny FB-Occ baseline)."""
    if not os.path.isfile(TINY_CONFIG):
        return {"skipped": f"{TINY_CONFIG} not found"}
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        results = pool.apply(_step_time_worker, (steps,))
    for name, flag in (("baseline", False), ("voxelsplat", True)):
        with context.Pool(1) as pool:
            results[f"{name}_peak_rss_mib"] = round(pool.apply(_peak_memory_worker, (flag, 1)), 1)
    results["step_time_ratio"] = round(results["voxelsplat_step_seconds"] / results["baseline_step_seconds"], 3)
    results["step_time_ratio_torch_backend"] = round(results["voxelsplat_torch_backend_step_seconds"]
                                                     / results["baseline_step_seconds"], 3)
    results["step_time_ratio_of_minima"] = round(results["voxelsplat_step_seconds_min"]
                                                 / results["baseline_step_seconds_min"], 3)
    results["peak_memory_ratio"] = round(results["voxelsplat_peak_rss_mib"] / results["baseline_peak_rss_mib"], 3)
    results["regularizer_share_of_baseline_step"] = round(results["regularizer_seconds"] / results["baseline_step_seconds"], 3)
    results["config"] = os.path.relpath(TINY_CONFIG, ROOT)
    return results
