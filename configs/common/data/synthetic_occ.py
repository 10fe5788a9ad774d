"""Data for the synthetic nuScenes-format dataset (``tools/make_synthetic_dataset.py``):
OpenOcc v2 labels with flow and ray visibility, official mini_train / mini_val scenes.

Switch the VoxelSplat inputs on with ``dataloader.train.mapper.regularizer = dict(...)``
(keys: voxelsplat.data.mapper.DEFAULT_REGULARIZER_OPTIONS).
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
        name="synthetic_occ_train", dataroot="datasets/synthetic", version="v1.0-mini", split="train",
        gt_format="openocc_v2", gt_root=None, cache_dir=None,
    ),
    mapper=L(TemporalDatasetMapper)(
        is_train=True,
        image_size=(352, 128),
        resize_range=(-0.06, 0.11),
        crop_bottom_range=(0.0, 0.0),
        flip_prob=0.5,
        rotate_range=(-5.4, 5.4),
        bda_rotation_range=(0.0, 0.0),
        bda_scale_range=(1.0, 1.0),
        bda_flip_x_prob=0.5,
        bda_flip_y_prob=0.5,
        bda_outside_label="ignore",  # released: voxels rotated in from outside carry no label
        load_lidar_depth=True,
        regularizer=None,
        dataset_name="${..dataset.name}",
    ),
    total_batch_size=2,
    num_workers=2,
    sequential=True,
    split_scenes_in_half=False,
    seed=None,
)

dataloader.test = L(build_test_loader)(
    dataset=L(register_nuscenes_occupancy)(
        name="synthetic_occ_val", dataroot="datasets/synthetic", version="v1.0-mini", split="val",
        gt_format="openocc_v2", gt_root=None, cache_dir=None,
    ),
    mapper=L(TemporalDatasetMapper)(
        is_train=False,
        image_size="${...train.mapper.image_size}",
        load_lidar_depth=False,
        dataset_name="${..dataset.name}",
    ),
    num_workers=2,
    batch_size=1,
)

# output_dir=None: do_test writes to train.output_dir/inference/
# RayIoU / mAVE / OccScore, and the voxel mIoU over the ray-visible voxels of the labels
dataloader.evaluator = L(OccupancyEvaluator)(dataset_name="${..test.dataset.name}", output_dir=None,
                                             compute_miou=True, miou_mask="occ_visible")
