"""Data for nuScenes with OpenOcc v2 occupancy + flow labels (see datasets/README.md for
the layout): 704x256 inputs, the released augmentation (image: resize, crop, flip, rotation
+-5.4 deg; BEV: rotation +-22.5 deg, x/y flips), 8 GPUs x 2 samples, scenes split in half
and walked in time order for temporal fusion.

Occ3D instead: ``dataloader.train.dataset.gt_format=occ3d`` (labels under
``datasets/nuscenes/gts``); the test dataset and the model's ``spec`` follow that key. Switch the
VoxelSplat inputs on with ``dataloader.train.mapper.regularizer = dict(...)``.
"""
from detectron2.config import LazyCall as L
from omegaconf import OmegaConf

from voxelsplat.data.build import build_test_loader, build_train_loader
from voxelsplat.data.datasets import register_nuscenes_occupancy
from voxelsplat.data.mapper import TemporalDatasetMapper
from voxelsplat.evaluation import OccupancyEvaluator

dataloader = OmegaConf.create()

dataloader.train = L(build_train_loader)(
    dataset=L(register_nuscenes_occupancy)(
        name="nuscenes_occ_train", dataroot="datasets/nuscenes", version="v1.0-trainval", split="train",
        gt_format="openocc_v2", gt_root=None, cache_dir=None,
        # the released recipe samples Gaussians among ray-visible voxels from a separate mask
        # (<root>/<scene>/<token>/labels.npz, key "ray_mask2"); set by configs/r50.py
        visible_mask_root=None, visible_mask_key="ray_mask2",
    ),
    mapper=L(TemporalDatasetMapper)(
        is_train=True,
        input_size=(704, 256),  # (W, H) of the network input
        resize_range=(-0.06, 0.11),
        crop_bottom_range=(0.0, 0.0),
        flip_prob=0.5,
        rotate_range=(-5.4, 5.4),
        bda_rotation_range=(-22.5, 22.5),
        bda_scale_range=(1.0, 1.0),
        bda_flip_x_prob=0.5,
        bda_flip_y_prob=0.5,
        bda_outside_label="ignore",  # released: voxels rotated in from outside carry no label
        load_lidar_depth=True,
        regularizer=None,
        dataset_name="${..dataset.name}",
    ),
    total_batch_size=16,
    num_workers=4,
    sequential=True,
    split_scenes_in_half=True,
    seed=None,
)

dataloader.test = L(build_test_loader)(
    dataset=L(register_nuscenes_occupancy)(
        name="nuscenes_occ_val", dataroot="${...train.dataset.dataroot}", version="${...train.dataset.version}",
        split="val", gt_format="${...train.dataset.gt_format}", gt_root=None, cache_dir=None,
    ),
    mapper=L(TemporalDatasetMapper)(
        is_train=False,
        input_size="${...train.mapper.input_size}",
        load_lidar_depth=False,
        dataset_name="${..dataset.name}",
    ),
    num_workers=4,
    batch_size=1,
)

# output_dir=None: do_test writes to train.output_dir/inference/
dataloader.evaluator = L(OccupancyEvaluator)(dataset_name="${..test.dataset.name}", output_dir=None)
