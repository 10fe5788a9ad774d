"""The tiny VoxelSplat config trains on the synthetic dataset on CPU, through the config's
loader and mapper, and the regularizer's render losses fall."""
import os

import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_voxelsplat_config_trains_on_synthetic_data_and_splat_losses_fall(synthetic_dataset, tmp_path):
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "synthetic", "voxelsplat_tiny.py"))
    cfg.dataloader.train.dataset.dataroot = synthetic_dataset.root
    cfg.dataloader.train.dataset.cache_dir = str(tmp_path)
    cfg.dataloader.train.mapper.image_size = tuple(synthetic_dataset.image_size)
    cfg.dataloader.train.num_workers = 0
    cfg.dataloader.train.total_batch_size = 1
    cfg.dataloader.train.seed = 0
    cfg.dataloader.train.mapper.regularizer.num_gaussians = 1500
    cfg.model.regularizer.max_views = None  # every view every step: the same targets each iteration
    torch.manual_seed(0)
    np.random.seed(0)
    model = instantiate(cfg.model).train()
    model.set_training_phase(history_enabled=False, flow_loss_enabled=True)
    loader = iter(instantiate(cfg.dataloader.train))
    batch = next(loader)  # fit one keyframe: the losses must fall
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = {"loss_splat_semantic": [], "loss_splat_depth": [], "total": []}
    for iteration in range(14):
        losses = model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        for key in ("loss_splat_semantic", "loss_splat_depth"):
            history[key].append(float(losses[key].detach()))
        history["total"].append(float(total.detach()))
    # the soft-target cross-entropy of the renders falls more slowly than depth and the total:
    # its released target (the unnormalised accumulated one-hot) keeps a floor at faint pixels
    report = {k: " ".join(f"{v:.4f}" for v in values) for k, values in history.items()}
    for key, factor in (("loss_splat_semantic", 0.98), ("loss_splat_depth", 0.97), ("total", 0.9)):
        values = history[key]
        first, last = np.mean(values[:4]), np.mean(values[-4:])
        assert last < factor * first, (key, report)
        assert values[-1] < values[0], (key, values)
