"""Data for the synthetic nuScenes-format dataset (``tools/make_synthetic_dataset.py``): the
nuScenes data config (``nuscenes_occ.py``) with what differs on a 2-core CPU and on the
synthetic world: OpenOcc v2 labels with flow and ray visibility, official mini_train / mini_val
scene names (``version="v1.0-trainval"`` for more than 10 scenes), 352x128 images, no BEV
rotation and no BEV flips (below), batch 2, whole scenes walked in time order, and the voxel
mIoU over the labels' ray-visible voxels beside RayIoU / mAVE.

Switch the VoxelSplat inputs on with ``dataloader.train.mapper.regularizer = dict(...)``
(keys: voxelsplat.data.mapper.DEFAULT_REGULARIZER_OPTIONS).
"""
from .nuscenes_occ import dataloader

for _split, _name in (("train", "synthetic_occ_train"), ("test", "synthetic_occ_val")):
    _dataset = dataloader[_split].dataset
    _dataset.name = _name
    _dataset.dataroot = "datasets/synthetic"
    _dataset.version = "v1.0-mini"
    _dataset.visible_mask_root = None  # the synthetic labels carry their own ray visibility
    dataloader[_split].num_workers = 2
del _split, _name, _dataset

dataloader.train.mapper.input_size = (352, 128)
dataloader.train.mapper.bda_rotation_range = (0.0, 0.0)
# No BEV flips either (the release flips x and y with p = 0.5). A flip mirrors the voxel grid and
# the velocities but not the image features that say "vehicle here", so at the few hundred
# iterations a CPU run gets, the velocity a vehicle's features imply is +v or -v with equal odds
# and the flow loss's optimum is zero flow everywhere (docs/RESULTS.md, "BEV flips and the flow
# head": a linear read-out of a trained model's features fits the flow without flips and not with).
dataloader.train.mapper.bda_flip_x_prob = 0.0
dataloader.train.mapper.bda_flip_y_prob = 0.0
dataloader.train.total_batch_size = 2
dataloader.train.split_scenes_in_half = False

# RayIoU / mAVE / OccScore, and the voxel mIoU over the ray-visible voxels of the labels
dataloader.evaluator.compute_miou = True
# miou_mask None: each sample's occ_mask_camera (Occ3D labels), else its occ_visible
