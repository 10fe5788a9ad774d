"""FB-Occ tiny config (configs/synthetic/fbocc_tiny.py) on CPU: training step time, peak
memory and inference latency per sample, at batch size 1, on two label grids: OpenOcc v2's
(200x200x16) and the synthetic benchmark's (128x128x16 around the ego,
``tools/run_experiment.py``), with ``benchmark_grid_step_over_openocc_grid`` the ratio of
their training steps.

Inputs come from the synthetic dataset through the config's mapper when the synthetic
generator is installed, else from samples built to the mapper contract at the same
input size. Ratios against baselines measured in the same run:

- ``loss_speedup_vs_autograd_reference``: the occupancy losses as shipped (fused focal,
  bucketed Lovasz, O(V) scene-class affinity) against a plain autograd formulation
  (one-hot focal, sort-based Lovasz, one-hot affinity) on the model's own output size;
- ``inference_over_train_step``: eval latency relative to one training step;
- ``peak_rss_training_over_setup``: process peak memory while training relative to
  the memory after building the model and inputs (measured in a fresh process).
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import time
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "synthetic", "fbocc_tiny.py")


def _contract_samples(spec, image_size, count: int) -> List[dict]:
    """Consecutive keyframes built to voxelsplat/structures/sample_fields.py by voxelsplat.testing:
    a street with moving vehicles on ``spec``'s grid, random images, sparse LiDAR depth."""
    from voxelsplat.testing import make_sequence

    return make_sequence(spec, 0, num_frames=count, image_size=tuple(image_size), scene_token="bench")


# the synthetic benchmark's label grid (tools/run_experiment.py)
BENCHMARK_POINT_CLOUD_RANGE = (-25.6, -25.6, -1.0, 25.6, 25.6, 5.4)


def _synthetic_samples(cfg, workdir: str, count: int, point_cloud_range=None):
    """Mapped samples of the synthetic dataset (labels on ``point_cloud_range``'s grid, the
    config's model spec pointed at it), or None when its generator is unavailable."""
    try:
        from voxelsplat.synthetic import generate_synthetic_dataset  # noqa: F401
    except ImportError:
        return None
    from detectron2.config import instantiate

    from voxelsplat.data.datasets import register_nuscenes_occupancy

    suffix = "" if point_cloud_range is None else "_" + "_".join(f"{v:g}" for v in point_cloud_range)
    root = os.path.join(workdir, "model_synthetic" + suffix)
    if not os.path.isdir(os.path.join(root, "v1.0-mini")):
        generate_synthetic_dataset(root, version="v1.0-mini", scenes=1, samples_per_scene=count, seed=0,
                                   point_cloud_range=point_cloud_range)
    cfg.dataloader.train.dataset.dataroot = root  # the model spec reads the dataset's grid from here
    cfg.dataloader.train.dataset.version = "v1.0-mini"
    name = register_nuscenes_occupancy("benchmark_model_all" + suffix, root, "v1.0-mini", "all",
                                       cache_dir=os.path.join(workdir, "record_cache" + suffix))
    mapper_cfg = cfg.dataloader.train.mapper
    mapper_cfg.dataset_name = name
    mapper = instantiate(mapper_cfg)
    from detectron2.data import DatasetCatalog

    records = DatasetCatalog.get(name)[:count]
    return [mapper(dict(record, sequence_start=i == 0)) for i, record in enumerate(records)]


def _measure(config_path: str, workdir: str, steps: int, queue, point_cloud_range=None) -> None:
    """Child process: build, train ``steps`` iterations, time inference; report via ``queue``."""
    import torch
    from detectron2.config import LazyConfig, instantiate

    torch.manual_seed(0)
    cfg = LazyConfig.load(config_path)
    width, height = cfg.dataloader.train.mapper.input_size
    samples, source = None, "mapper contract"
    try:
        samples = _synthetic_samples(cfg, workdir, steps + 2, point_cloud_range)
        source = "synthetic dataset" if samples else source
    except Exception as error:  # the data pipeline is not this benchmark's subject
        source = f"mapper contract (synthetic dataset failed: {type(error).__name__}: {error})"
    model = instantiate(cfg.model).train()
    if not samples:
        samples = _contract_samples(model.spec, (width, height), steps + 2)
    model.set_training_phase(history_enabled=True, flow_loss_enabled=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    forward_times, step_times = [], []
    for index in range(steps + 1):
        batch = [samples[index % len(samples)]]
        start = time.perf_counter()
        losses = model(batch)
        middle = time.perf_counter()
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        end = time.perf_counter()
        if index:  # the first step allocates and warms up
            forward_times.append(middle - start)
            step_times.append(end - start)
    rss_training = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    model.eval()
    inference = []
    with torch.no_grad():
        for index in range(steps + 1):
            start = time.perf_counter()
            model([samples[index % len(samples)]])
            inference.append(time.perf_counter() - start)

    # Losses as shipped vs a plain autograd formulation, on the model's output size.
    from voxelsplat.modeling.heads import losses as occ_losses

    logits = torch.randn(1, model.head.num_classes, *model.grid_shape)
    target = batch[0]["occ_semantics"][None].long()
    shipped = _time_losses(lambda x: _shipped_losses(occ_losses, model, x, target), logits)
    reference = _time_losses(lambda x: _reference_losses(occ_losses, model, x, target), logits)
    queue.put(dict(
        input_source=source, grid_shape=[int(v) for v in model.grid_shape],
        image_size_wh=[int(width), int(height)], cameras=int(batch[0]["img"].shape[0]),
        batch_size=1, steps_timed=steps, threads=torch.get_num_threads(),
        parameters=int(sum(p.numel() for p in model.parameters())),
        train_step_s_median=round(float(np.median(step_times)), 3),
        train_forward_s_median=round(float(np.median(forward_times)), 3),
        inference_s_per_sample_median=round(float(np.median(inference[1:])), 3),
        inference_over_train_step=round(float(np.median(inference[1:]) / np.median(step_times)), 3),
        rss_after_setup_mb=round(rss_setup, 1), peak_rss_training_mb=round(rss_training, 1),
        peak_rss_training_over_setup=round(rss_training / rss_setup, 3),
        occupancy_losses_s=round(shipped, 3), occupancy_losses_autograd_reference_s=round(reference, 3),
        loss_speedup_vs_autograd_reference=round(reference / shipped, 2),
    ))


def _shipped_losses(occ_losses, model, logits, target):
    k = logits.shape[1]
    flat = logits.flatten(2).transpose(0, 1).reshape(k, -1).t()
    flat_target = target.reshape(-1)
    probs = flat.t().softmax(0).t()
    loss = model.loss
    weights = loss.distance_weight_map[None, :, :, None].expand(target.shape).reshape(-1)
    return (occ_losses.sigmoid_focal_loss(flat, flat_target, loss.class_weights, weights)
            + occ_losses.lovasz_softmax(probs, flat_target)
            + occ_losses.sem_scal_loss(probs, flat_target, model.free_index)
            + occ_losses.geo_scal_loss(probs, flat_target, model.free_index))


def _reference_losses(occ_losses, model, logits, target):
    import torch
    import torch.nn.functional as F

    k = logits.shape[1]
    flat = logits.permute(0, 2, 3, 4, 1).reshape(-1, k)
    flat_target = target.reshape(-1)
    loss = model.loss
    one_hot = F.one_hot(flat_target, k).float()
    prob = flat.sigmoid()
    p_true = prob * one_hot + (1 - prob) * (1 - one_hot)
    alpha = 0.25 * one_hot + 0.75 * (1 - one_hot)
    weights = loss.distance_weight_map[None, :, :, None].expand(target.shape).reshape(-1).float()
    focal = (F.binary_cross_entropy_with_logits(flat, one_hot, reduction="none") * alpha * (1 - p_true) ** 2
             * loss.class_weights.float()[None] * weights[:, None]).sum(1).mean()
    probs = flat.softmax(-1)
    free = model.free_index
    classes = [c for c in range(k) if c != free]
    truth = one_hot[:, classes]
    p = probs[:, classes]
    counted = truth.sum(0) > 0
    terms = (-torch.log(((p * truth).sum(0) / (p.sum(0) + 1e-5)).clamp(1e-5, 1 - 1e-5))
             - torch.log(((p * truth).sum(0) / (truth.sum(0) + 1e-5)).clamp(1e-5, 1 - 1e-5))
             - torch.log((((1 - p) * (1 - truth)).sum(0) / ((1 - truth).sum(0) + 1e-5)).clamp(1e-5, 1 - 1e-5)))
    sem = (terms * counted).sum() / counted.sum()
    return (focal + occ_losses.lovasz_softmax(probs, flat_target, num_buckets=None) + sem
            + occ_losses.geo_scal_loss(probs, flat_target, free))


def _time_losses(function, logits, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        x = logits.clone().requires_grad_()
        start = time.perf_counter()
        function(x).backward()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run(args) -> Dict[str, object]:
    quick = bool(getattr(args, "quick", False))
    workdir = os.path.abspath(getattr(args, "workdir", os.path.join(ROOT, "output", "benchmark")))
    os.makedirs(workdir, exist_ok=True)
    openocc = _measure_in_fresh_process(workdir, 2 if quick else 8, None)
    benchmark = _measure_in_fresh_process(workdir, 2 if quick else 8, BENCHMARK_POINT_CLOUD_RANGE)
    result = dict(config=os.path.relpath(CONFIG, ROOT), **openocc)
    if benchmark["grid_shape"] != openocc["grid_shape"]:  # the contract samples have no grid of their own
        result["benchmark_grid"] = benchmark
        result["benchmark_grid_step_over_openocc_grid"] = round(
            benchmark["train_step_s_median"] / openocc["train_step_s_median"], 3)
    return result


def _measure_in_fresh_process(workdir: str, steps: int, point_cloud_range) -> Dict[str, object]:
    context = multiprocessing.get_context("spawn")  # a fresh process: clean peak-memory figures
    queue = context.Queue()
    process = context.Process(target=_measure, args=(CONFIG, workdir, steps, queue, point_cloud_range))
    process.start()
    try:
        return queue.get(timeout=1800)
    finally:
        process.join(timeout=60)
