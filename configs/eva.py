"""VoxelSplat-EVA as released (``occupancy_configs/voxelsplat/voxelsplat-eva.py``): the
VoxelSplat-R50 recipe (``configs/r50.py``: FB-Occ + the Gaussian-splatting regularizer at its
released settings and quirks) with

- an EVA-02-L ViT (ViTDet windows: 16x16 in two of every three blocks, 40x40 in the rest;
  RoPE, SwiGLU, stochastic depth 0.3, activation checkpointing) whose last stride-16,
  1024-channel map goes straight to the depth net (no image neck);
- 640x1600 input images (same augmentation ranges);
- AdamW with layer-wise learning-rate decay: 2e-4 outside the ViT, 1e-4 x 0.9^(24 - i) for
  block i, 1e-4 x 0.9^25 for the patch and position embeddings; weight decay 1e-4, none on
  normalization parameters and biases;
- ``model.backbone.init_checkpoint``: the release starts from ``eva02_L_coco_det_sys_o365_remapped.pth``
  (EVA-02-L trained for COCO/Objects365 detection), a local file;
- 24 epochs (the release's README; its config file says ``num_epochs = 48``).

    python tools/lazyconfig_train_net.py --config-file configs/eva.py --num-gpus 8 \\
        model.backbone.init_checkpoint=checkpoints/eva02_L_coco_det_sys_o365_remapped.pth
"""
from detectron2.config import LazyCall as L

from voxelsplat.modeling.backbone import EVA02ViT, vit_layer_decay_lr_multipliers
from voxelsplat.modeling.neck import SelectFeatureMap

from .r50 import dataloader, lr_multiplier, model, optimizer, train

_NUM_TRAIN_KEYFRAMES = 28130  # nuScenes v1.0-trainval train split
_EPOCHS = 24
_iters_per_epoch = _NUM_TRAIN_KEYFRAMES // dataloader.train.total_batch_size  # 1758 at 16

# ---------------------------------------------------------------- model
model.backbone = L(EVA02ViT)(
    embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4 * 2 / 3, patch_size=16,
    window_size=16,
    global_window_size=40,       # 640 / 16: the token rows of the input
    window_block_indexes=None,   # all but 2, 5, ..., 23
    qkv_bias=True, drop_path_rate=0.3, pretrain_img_size=224, pretrain_use_cls_token=True,
    rope_pretrain_grid=16,
    init_checkpoint="",          # released: eva02_L_coco_det_sys_o365_remapped.pth
    grad_checkpointing=True,
)
# released: no image neck, the depth net reads the ViT's map (in_channels 1024)
model.neck = L(SelectFeatureMap)(name="stride16", out_channels="${..backbone.embed_dim}")
model.depth_net.in_channels = "${..neck.out_channels}"

# ---------------------------------------------------------------- data
dataloader.train.mapper.input_size = (1600, 640)  # (W, H)

# ---------------------------------------------------------------- optimisation
# Released: base lr 1e-4 with decay_rate 0.9 over 24 layers and head_decay_rate 2.0 (every
# parameter outside the ViT at 2 x 1e-4). Here the base rate is the non-ViT rate and the
# ViT's rates are multipliers of it: block i at 0.5 x 0.9^(24 - i), embeddings 0.5 x 0.9^25.
optimizer.lr = 2e-4
optimizer.weight_decay = 1e-4
optimizer.params.weight_decay_norm = 0.0
optimizer.params.weight_decay_bias = 0.0
optimizer.params.lr_multipliers = L(vit_layer_decay_lr_multipliers)(
    num_layers="${model.backbone.depth}", decay_rate=0.9, scale=0.5, prefix="backbone",
)

# ---------------------------------------------------------------- schedule
train.max_iter = _EPOCHS * _iters_per_epoch
train.checkpointer.period = _iters_per_epoch
train.eval_period = _EPOCHS * _iters_per_epoch
train.output_dir = "./output/voxelsplat_eva"
# the warm-up switch (2 epochs) and the EMA hook (every 2 epochs) keep r50's settings
