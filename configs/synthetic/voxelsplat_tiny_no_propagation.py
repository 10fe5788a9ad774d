"""Ablation ladder, step 3: every render loss of ``configs/synthetic/voxelsplat_tiny.py``
(semantic, depth, flow) on the current state only: the flow-propagated state, the last step
of the ladder, is off.
"""
from .voxelsplat_tiny import dataloader, lr_multiplier, model, optimizer, train

model.regularizer.propagate_by_flow = False

train.output_dir = "./output/synthetic/voxelsplat_tiny_no_propagation"
