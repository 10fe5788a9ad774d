"""``configs/synthetic/voxelsplat_tiny.py`` with the release's quirks fixed, as
``configs/r50_corrected.py`` fixes them for nuScenes: forward-looking render cameras,
propagation by flow x each view's time offset, static voxels in the slowest speed bin,
render weights detached inside the flow render loss.

    python tools/lazyconfig_train_net.py --config-file configs/synthetic/voxelsplat_tiny_corrected.py
"""
from .voxelsplat_tiny import dataloader, lr_multiplier, model, optimizer, train

model.regularizer.flip_render_cameras = False
model.regularizer.propagation_seconds = None
model.regularizer.detach_flow_weights = True
dataloader.train.mapper.regularizer.speed_bin_rule = "corrected"

train.output_dir = "./output/synthetic/voxelsplat_tiny_corrected"
