"""FB-Occ baseline, ResNet-50, nuScenes + OpenOcc v2 (occupancy + flow), as published:
256x704 input, 16 history frames, AdamW 2e-4 with the backbone at x0.1, gradient
clipping at 5, 48 epochs; history fusion and the flow loss switch on after 2 epochs.

    python tools/lazyconfig_train_net.py --config-file configs/fbocc_r50.py --num-gpus 8

Epoch lengths are computed here from the train split size and the total batch size:
when overriding ``dataloader.train.total_batch_size`` on the command line, also set
``train.max_iter`` and the warm-up hook's iterations.
"""
from detectron2.config import LazyCall as L

from voxelsplat.engine.warmup_hook import WarmupSwitchHook

from .common.data.nuscenes_occ import dataloader
from .common.models.fbocc import model
from .common.optim import AdamW as optimizer
from .common.schedule import step_lr_multiplier as lr_multiplier
from .common.train import train

_NUM_TRAIN_KEYFRAMES = 28130  # nuScenes v1.0-trainval train split
_EPOCHS = 48
_WARMUP_EPOCHS = 2
_iters_per_epoch = _NUM_TRAIN_KEYFRAMES // dataloader.train.total_batch_size

model.backbone.init_checkpoint = ""  # e.g. a local ImageNet or depth-pretrained ResNet-50 .pth

optimizer.lr = 2e-4
optimizer.weight_decay = 1e-2
optimizer.params.lr_multipliers = {"backbone": 0.1}

train.max_iter = _EPOCHS * _iters_per_epoch
train.clip_grad = dict(enabled=True, max_norm=5.0, norm_type=2.0)
train.checkpointer = dict(period=_iters_per_epoch, max_to_keep=3)
train.eval_period = _EPOCHS * _iters_per_epoch
train.output_dir = "./output/fbocc_r50"
train.extra_hooks = [
    L(WarmupSwitchHook)(history_start_iter=_WARMUP_EPOCHS * _iters_per_epoch,
                        flow_loss_start_iter=_WARMUP_EPOCHS * _iters_per_epoch),
]

# Linear warm-up over 200 iterations and a constant rate afterwards (the reference's step
# schedule never reaches its step).
lr_multiplier.warmup_iters = 200
lr_multiplier.steps = ()
