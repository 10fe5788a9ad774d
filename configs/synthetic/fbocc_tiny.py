"""FB-Occ scaled to train on a 2-core CPU on the synthetic dataset: the baseline of the
synthetic benchmark (docs/RESULTS.md; ``tools/run_experiment.py``).

The modules of ``configs/fbocc_r50.py`` at small widths: a half-width ResNet-18 (random
init, or ``train.init_checkpoint`` from ``configs/synthetic/depth_pretrain_tiny.py``),
256x96 images, image features at stride 8 (the FPN also takes the stride-8 stage, which the
release's 704x256 input does not need: 32x12 cells per camera instead of 16x6), 20 depth bins
of 2 m, internal volume at 4x the GT voxel (1.6 m), 4 history frames, narrow 3D layers. The
head (released structure: deconvolution x2, 3 levels, soft level weights) predicts every GT
voxel of its 0.8 m voxels apart (``subvoxel_factors=(2, 2, 2)``) with linear classifiers, and
the flow with the released MLP (1x1, BN, Softplus, 1x1). Backbone learning rate x1, as the
released baseline; lr 3e-3. The GT grid comes from the dataset (``occupancy_grid.json``).

What differs from the release and why (the pilot runs in docs/RESULTS.md): the flow loss covers
the voxels of the flow classes only, which learns the flow within the run's budget; the per-child-voxel
prediction keeps a one-layer ground apart from the free layer above it, which a 0.8 m voxel
resampled trilinearly cannot; linear classifiers and the higher learning rate learn the
occupancy faster in a CPU budget; stride 8 gives the ground beyond a few metres more than two
or three feature rows.

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
model.backbone.out_indices = (2, 3, 4)  # strides 8, 16, 32
model.neck.in_channels = (64, 128, 256)
model.neck.in_strides = (8, 16, 32)
model.neck.out_channels = 64
model.neck.grad_checkpointing = False
model.depth_net.mid_channels = 64
model.depth_net.context_channels = 32
model.depth_net.depth_bins = (2.0, 42.0, 2.0)
model.depth_net.num_depth_blocks = 1
model.depth_net.grad_checkpointing = False
model.forward_projection.grid.downsample = 4  # 1.6 m internal voxels (50x50x4 on 200x200x16)
model.backward_projection.num_heads = 4
model.backward_projection.num_offsets = 1
model.backward_projection.ffn_channels = 64
model.temporal_fusion.num_history = 4
model.voxel_encoder.stage_channels = (32, 48, 64)
model.voxel_encoder.stage_blocks = (1, 1, 1)
model.voxel_encoder.out_channels = 32
model.voxel_encoder.grad_checkpointing = False
model.head.mid_channels = 16
model.head.hidden_channels = 0  # linear classifiers (and level weights)
model.head.flow_hidden_channels = 8  # the released flow MLP at mid_channels // 2
model.head.subvoxel_factors = (2, 2, 2)  # 0.8 m fusion grid -> the 0.4 m GT grid, each child apart
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
optimizer.lr = 3e-3
optimizer.params.lr_multipliers = {}  # released baseline: backbone x1
lr_multiplier.warmup_iters = 20
# The flow loss over the voxels of the flow classes only (the release: every voxel, static and
# free ones supervised towards zero flow), with the release's weight and normalisation. With the
# released loss, 1600 iterations at batch 2 left the flow head at zero flow in 3 of 5 paired runs
# (baseline seed 1, VoxelSplat seeds 0 and 1); this one learned flow in every run so far (the five
# baseline seeds at 0.38-0.68x zero flow on the GT occupancy; docs/RESULTS.md, "The flow loss of
# the benchmark").
model.loss.flow_voxels = "flow_classes"
# History fusion and the flow loss start after a warm-up (published: 2 epochs; here 1/4 of
# the run, so a demo-length run still trains with both for most of its iterations).
train.extra_hooks = [L(WarmupSwitchHook)(history_start_iter=100, flow_loss_start_iter=100)]
