"""VoxelSplat-R50: the FB-Occ R50 baseline (``configs/fbocc_r50.py``, unchanged) trained with
the Gaussian-splatting regularizer at its published settings (100k Gaussians, keyframes
t-2..t+3, 1/4-resolution renders, scale 0.12 m, loss weights 0.5 / 1.0 / 0.5). The
regularizer runs in training only: inference and the checkpoint's model are FB-Occ's.

    python tools/lazyconfig_train_net.py --config-file configs/r50.py --num-gpus 8
    python tools/lazyconfig_train_net.py --config-file configs/r50.py --eval-only train.init_checkpoint=...
"""
from detectron2.config import LazyCall as L

from voxelsplat.engine.render_image_hook import RenderImageHook

from .common.models.voxelsplat import mapper_options as _mapper_options
from .common.models.voxelsplat import regularizer as _regularizer
from .fbocc_r50 import dataloader, lr_multiplier, model, optimizer, train

model.regularizer = _regularizer
dataloader.train.mapper.regularizer = _mapper_options

train.output_dir = "./output/voxelsplat_r50"
train.extra_hooks.append(L(RenderImageHook)(period=500, max_views=3))
