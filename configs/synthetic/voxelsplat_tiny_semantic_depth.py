"""Ablation ladder, step 2: the semantic and depth render losses of
``configs/synthetic/voxelsplat_tiny.py`` (flow render loss off, no flow-propagated state).
"""
from .voxelsplat_tiny import dataloader, lr_multiplier, model, optimizer, train

model.regularizer.loss_weights = dict(semantic=0.5, depth=1.0, flow=0.0)
model.regularizer.propagate_by_flow = False

train.output_dir = "./output/synthetic/voxelsplat_tiny_semantic_depth"
