"""Depth pretraining of the tiny synthetic models' image branch: the backbone, neck and depth
net of ``configs/synthetic/fbocc_tiny.py`` trained on the synthetic LiDAR depth alone (the
depth net's BCE on 16x16 patch depths); nothing behind the depth net runs.

The released models start from a depth-pretrained checkpoint (``load_from``); this config
makes the synthetic equivalent, once, for every tiny model to start from with
``train.init_checkpoint=<output_dir>/model_final.pth`` (the keys it does not train are left to
the models' own initialisation). ``tools/run_demo.py --pretrain-iters N`` runs it and shares
the result between runs and seeds.

    python tools/lazyconfig_train_net.py --config-file configs/synthetic/depth_pretrain_tiny.py
"""
from .fbocc_tiny import dataloader, lr_multiplier, model, optimizer, train

model.depth_only = True
model.history_enabled = False
model.flow_loss_enabled = False

# keyframes in random order (no temporal state to carry), two per step
dataloader.train.sequential = False
dataloader.train.total_batch_size = 2

optimizer.params.lr_multipliers = {}
optimizer.lr = 1e-3  # the benchmark's models train at 3e-3; its pretraining was validated at 1e-3
lr_multiplier.warmup_iters = 20

train.output_dir = "./output/synthetic/depth_pretrain_tiny"
train.max_iter = 600
train.checkpointer.period = 150
train.eval_period = None  # nothing to evaluate: the occupancy head is not trained
train.extra_hooks = []
