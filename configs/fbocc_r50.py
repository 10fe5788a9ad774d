"""FB-Occ baseline, ResNet-50, nuScenes + OpenOcc v2 (occupancy + flow): the released
recipe's losses, data, optimisation and schedule (``fbocc-flow.py`` of the VoxelSplat
release; setting by setting, with the release files, in docs/reproducing.md):

- 256x704 input; BEV augmentation: rotation +-22.5 deg, x/y flips; 8 GPUs x 2 samples,
  scenes split in half and walked in time order;
- focal (x100, OpenOcc v2 class weights, distance weight) + Lovasz + scene-class affinity;
  3D flow loss 0.5 x sum over all voxels (|g| + 0.1)|d|_1 / sum (|g| + 0.1);
- AdamW 2e-4, weight decay 1e-2 on every parameter, backbone at x1; gradient clipping 5;
  200 warm-up iterations then a constant rate; 48 epochs = 84,384 iterations;
- SyncBN, fp16 with a dynamic loss scale, EMA 0.999 written beside the checkpoints;
- history fusion and the flow loss switch on after 2 epochs.

The network modules' structure is that of ``configs/common/models/fbocc.py``; where it still
differs from the release is listed in docs/reproducing.md.

    python tools/lazyconfig_train_net.py --config-file configs/fbocc_r50.py --num-gpus 8

Epoch lengths are computed here from the train split size and the total batch size:
when overriding ``dataloader.train.total_batch_size`` on the command line, also set
``train.max_iter`` and the warm-up hook's iterations.
"""
from detectron2.config import LazyCall as L

from voxelsplat.engine.ema_hook import ModelEMAHook
from voxelsplat.engine.warmup_hook import WarmupSwitchHook

from .common.data.nuscenes_occ import dataloader
from .common.models.fbocc import model
from .common.optim import AdamW as optimizer
from .common.schedule import step_lr_multiplier as lr_multiplier
from .common.train import train

_NUM_TRAIN_KEYFRAMES = 28130  # nuScenes v1.0-trainval train split
_EPOCHS = 48
_WARMUP_EPOCHS = 2
_iters_per_epoch = _NUM_TRAIN_KEYFRAMES // dataloader.train.total_batch_size  # 1758 at 16

# released: train.init_checkpoint = the depth-pretrained whole model (load_from), converted with
# tools/convert_checkpoint.py (docs/reproducing.md); or an ImageNet ResNet-50 for the backbone alone
model.backbone.init_checkpoint = ""

optimizer.lr = 2e-4
optimizer.weight_decay = 1e-2
optimizer.params.lr_multipliers = {}  # the baseline trains its backbone at the full rate

train.max_iter = _EPOCHS * _iters_per_epoch
train.clip_grad = dict(enabled=True, max_norm=5.0, norm_type=2.0)
train.amp.enabled = True   # fp16 autocast + dynamic loss scale
train.sync_bn = True
train.checkpointer = dict(period=_iters_per_epoch, max_to_keep=3)
# The 16-frame history queue is about 410 MB per batch slot (6.5 GB for 8 GPUs x 2): checkpoints
# leave it out, so --resume restarts the history (as at a scene start) instead of continuing bit
# for bit. Set True to resume exactly at that cost.
train.checkpoint_history = False
train.eval_period = _EPOCHS * _iters_per_epoch
train.output_dir = "./output/fbocc_r50"
train.extra_hooks = [
    L(WarmupSwitchHook)(history_start_iter=_WARMUP_EPOCHS * _iters_per_epoch,
                        flow_loss_start_iter=_WARMUP_EPOCHS * _iters_per_epoch),
    # released: MEGVIIEMAHook(init_updates=10560, decay 0.999, saved every 2 epochs)
    L(ModelEMAHook)(decay=0.999, init_updates=10560, ramp_iters=2000, period=2 * _iters_per_epoch),
]

# Linear warm-up over 200 iterations from 0.001 and a constant rate afterwards (the
# release's step schedule puts its only step at the last iteration).
lr_multiplier.warmup_iters = 200
lr_multiplier.steps = ()
