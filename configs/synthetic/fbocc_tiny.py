"""FB-Occ scaled to train on a 2-core CPU on the synthetic dataset.

The modules of ``configs/fbocc_r50.py`` at small widths: a half-width ResNet-18 (random
init, or ``train.init_checkpoint`` from ``configs/synthetic/depth_pretrain_tiny.py``),
256x96 images, 20 depth bins of 2 m, a 50x50x4 internal volume (1.6 m), 4 history frames,
narrow 3D layers; the head's deconvolution predicts at 100x100x8 (0.8 m) with the released
occupancy and flow MLPs (1x1, BN, ReLU / Softplus, 1x1), resampled to the GT grid
(200x200x16, from the dataset metadata). Backbone learning rate x1, as the released
baseline.

    python tools/lazyconfig_train_net.py --config-file configs/synthetic/fbocc_tiny.py
"""
from detectron2.config import LazyCall as L

from voxelsplat.engine.warmup_hook import WarmupSwitchHook

from ..common.data.synthetic_occ import dataloader
from ..common.models.fbocc import model
from ..common.optim import AdamW as optimizer
from ..common.schedule import step_lr_multiplier as lr_multiplier
from ..common.train import train

# ---------------------------------------------------------------- model
model.backbone.model_name = "resnet18"
model.backbone.model_kwargs = dict(channels=(32, 64, 128, 256), stem_width=32)
model.backbone.norm = "BN"
model.backbone.grad_checkpointing = False
model.neck.in_channels = (128, 256)
model.neck.out_channels = 64
model.neck.grad_checkpointing = False
model.depth_net.mid_channels = 64
model.depth_net.context_channels = 32
model.depth_net.depth_bins = (2.0, 42.0, 2.0)
model.depth_net.num_depth_blocks = 1
model.depth_net.grad_checkpointing = False
model.forward_projection.grid.downsample = 4  # 1.6 m internal voxels, 50x50x4
model.backward_projection.num_heads = 4
model.backward_projection.num_offsets = 1
model.backward_projection.ffn_channels = 64
model.temporal_fusion.num_history = 4
model.voxel_encoder.stage_channels = (32, 48, 64)
model.voxel_encoder.stage_blocks = (1, 1, 1)
model.voxel_encoder.out_channels = 32
model.voxel_encoder.grad_checkpointing = False
model.head.mid_channels = 16
model.head.hidden_channels = 8
model.head.grad_checkpointing = False

# ---------------------------------------------------------------- data
dataloader.train.mapper.input_size = (256, 96)
dataloader.train.total_batch_size = 1
dataloader.train.num_workers = 1
dataloader.test.num_workers = 1

# ---------------------------------------------------------------- schedule
train.device = "cpu"
train.output_dir = "./output/synthetic/fbocc_tiny"
train.max_iter = 400
train.eval_period = 400
train.checkpointer.period = 200
train.log_period = 20
optimizer.lr = 1e-3
optimizer.params.lr_multipliers = {}  # released baseline: backbone x1
lr_multiplier.warmup_iters = 20
# History fusion and the flow loss start after a warm-up (published: 2 epochs; here 1/4 of
# the run, so a demo-length run still trains with both for most of its iterations).
train.extra_hooks = [L(WarmupSwitchHook)(history_start_iter=100, flow_loss_start_iter=100)]
