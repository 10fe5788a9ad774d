"""Ablation ladder, step 1: ``configs/synthetic/voxelsplat_tiny.py`` with the semantic render
loss alone (depth and flow render losses off, no flow-propagated state).

Steps: semantic only -> ``voxelsplat_tiny_semantic_depth.py`` (+ depth) ->
``voxelsplat_tiny_no_propagation.py`` (+ flow) -> ``voxelsplat_tiny.py`` (+ propagated state).
``tools/run_experiment.py`` trains the ladder at one seed beside the paired experiment.
"""
from .voxelsplat_tiny import dataloader, lr_multiplier, model, optimizer, train

model.regularizer.loss_weights = dict(semantic=0.5, depth=0.0, flow=0.0)
model.regularizer.propagate_by_flow = False

train.output_dir = "./output/synthetic/voxelsplat_tiny_semantic_only"
