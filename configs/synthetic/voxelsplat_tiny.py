"""VoxelSplat on the tiny synthetic setup: ``configs/synthetic/fbocc_tiny.py`` (unchanged)
plus the Gaussian-splatting regularizer, sized for a 2-core CPU: 3000 Gaussians per sample,
keyframes t-1..t+1 (18 views) of which 6 are rendered per step, renders at 0.3x the camera
images (106x38 for the 352x128 demo images). Same scale, loss weights, states and backbone
learning rate (x0.1) as ``configs/r50.py``.

    python tools/lazyconfig_train_net.py --config-file configs/synthetic/voxelsplat_tiny.py
"""
from detectron2.config import LazyCall as L

from voxelsplat.engine.render_image_hook import RenderImageHook

from ..common.models.voxelsplat import mapper_options as _mapper_options
from ..common.models.voxelsplat import regularizer as _regularizer
from .fbocc_tiny import dataloader, lr_multiplier, model, optimizer, train

model.regularizer = _regularizer
optimizer.params.lr_multipliers = {"backbone": 0.1}  # released VoxelSplat: backbone x0.1 (the baseline x1)
model.regularizer.max_views = 6
dataloader.train.mapper.regularizer = _mapper_options
dataloader.train.mapper.regularizer.num_gaussians = 3000
dataloader.train.mapper.regularizer.frame_offsets = (-1, 0, 1)
dataloader.train.mapper.regularizer.render_scale = 0.3

train.output_dir = "./output/synthetic/voxelsplat_tiny"
train.extra_hooks.append(L(RenderImageHook)(period=50, max_views=3))
