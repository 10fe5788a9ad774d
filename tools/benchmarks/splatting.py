"""Gaussian rasterization: forward + backward time and peak memory of the "torch" backend
on CPU against the number of Gaussians and of views, on a street-like scene seen by a ring
of 6 outward-looking cameras per frame (the regularizer's workload: Gaussians at voxel
centres, isotropic scale 0.12 m, 16 class + 2 flow channels, accumulated depth).

Figures are ratios against the smallest workload measured in the same run
(``time_ratio``, ``memory_ratio``), plus absolute seconds/MiB for reference. Peak memory
is the peak of the process RSS above its level before the call (sampled by a thread);
on CUDA, ``torch.cuda.max_memory_allocated``.

When CUDA is available, the published workload (100k Gaussians, 36 views, 400x225,
18 channels + depth) is timed with every backend that runs there (torch, gsplat, inria),
as ratios against gsplat.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Dict, List

import torch

CHANNELS = 18  # 16 non-free class logits + 2 flow components
SCALE_M = 0.12
RING_CAMERAS = 6


def street_scene(num_gaussians: int, num_views: int, width: int, height: int, device="cpu", seed: int = 0) -> dict:
    """Gaussians on a ground plane, building walls and car-sized boxes within 40 m of the ego,
    seen by ``num_views`` cameras (rings of 6 at 1.6 m height, 70 degree horizontal field of
    view, successive rings moved 3 m along x as adjacent keyframes would be)."""
    g = torch.Generator().manual_seed(seed)
    voxel = 0.4
    kinds = torch.randint(0, 3, (num_gaussians,), generator=g)
    xy = (torch.rand(num_gaussians, 2, generator=g) * 2 - 1) * 40.0
    z = torch.full((num_gaussians,), -0.8)
    walls = kinds == 1
    xy[walls, 1] = torch.where(xy[walls, 1] > 0, 12.0, -12.0) + torch.rand(int(walls.sum()), generator=g)
    z[walls] = torch.rand(int(walls.sum()), generator=g) * 6.0 - 1.0
    cars = kinds == 2
    xy[cars] = (torch.rand(int(cars.sum()), 2, generator=g) * 2 - 1) * torch.tensor([35.0, 8.0])
    z[cars] = torch.rand(int(cars.sum()), generator=g) * 1.6 - 0.8
    means = torch.cat([torch.floor(xy / voxel) * voxel + voxel / 2, z[:, None]], dim=1)
    fx = 0.5 * width / math.tan(math.radians(35.0))
    K = torch.tensor([[fx, 0, width / 2], [0, fx, height / 2], [0, 0, 1.0]])
    viewmats = []
    for view in range(num_views):
        yaw = 2 * math.pi * (view % RING_CAMERAS) / RING_CAMERAS
        position = torch.tensor([3.0 * (view // RING_CAMERAS - 2), 0.0, 1.6])
        forward = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])
        right = torch.tensor([math.sin(yaw), -math.cos(yaw), 0.0])  # ego: x forward, y left, z up
        down = torch.tensor([0.0, 0.0, -1.0])
        rotation = torch.stack([right, down, forward])
        viewmat = torch.eye(4)
        viewmat[:3, :3] = rotation
        viewmat[:3, 3] = -rotation @ position
        viewmats.append(viewmat)
    scene = dict(
        means=means, quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(num_gaussians, 1),
        scales=torch.full((num_gaussians, 3), SCALE_M), opacities=torch.sigmoid(torch.randn(num_gaussians, generator=g)),
        features=torch.randn(num_gaussians, CHANNELS, generator=g),
        viewmats=torch.stack(viewmats), Ks=K.repeat(num_views, 1, 1),
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
    """Median seconds and peak memory (MiB) of forward + backward."""
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
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            with _PeakRSS() as rss:
                start = time.perf_counter()
                _forward_backward(scene, backend)
                seconds.append(time.perf_counter() - start)
            peaks.append(rss.delta_mib)
    seconds.sort()
    return {"seconds": round(seconds[len(seconds) // 2], 4), "peak_mib": round(max(peaks), 1)}


def run(args) -> dict:
    quick = bool(getattr(args, "quick", False))
    width, height = 100, 56  # the tiny demo's render size
    repeats = 2 if quick else 5
    gaussian_counts: List[int] = [1000, 2500, 5000] if quick else [1000, 2500, 5000, 10000, 20000]
    view_counts: List[int] = [6, 12] if quick else [6, 12, 24, 36]
    results = {"device": "cpu", "image_size": [width, height], "channels": CHANNELS, "threads": torch.get_num_threads(),
               "by_gaussians": [], "by_views": []}
    baseline = None
    for n in gaussian_counts:
        stats = time_forward_backward(street_scene(n, 12, width, height), "torch", repeats)
        baseline = baseline or stats
        results["by_gaussians"].append({"gaussians": n, "views": 12, **stats,
                                        "seconds_per_view": round(stats["seconds"] / 12, 4),
                                        "time_ratio": round(stats["seconds"] / baseline["seconds"], 2),
                                        "memory_ratio": round(stats["peak_mib"] / max(baseline["peak_mib"], 1e-3), 2)})
    baseline = None
    for v in view_counts:
        stats = time_forward_backward(street_scene(5000, v, width, height), "torch", repeats)
        baseline = baseline or stats
        results["by_views"].append({"gaussians": 5000, "views": v, **stats,
                                    "seconds_per_view": round(stats["seconds"] / v, 4),
                                    "time_ratio": round(stats["seconds"] / baseline["seconds"], 2),
                                    "memory_ratio": round(stats["peak_mib"] / max(baseline["peak_mib"], 1e-3), 2)})
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
