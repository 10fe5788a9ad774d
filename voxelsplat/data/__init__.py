"""Data pipeline: dataset registration, the temporal mapper, augmentation, Gaussian voxel
sampling, samplers and loaders (see datasets/README.md for the expected layout)."""
from .build import SceneSequenceDataset, build_test_loader, build_train_loader, get_records
from .datasets import CAMERA_CHANNELS, load_nuscenes_occupancy_records, register_nuscenes_occupancy, split_scene_names
from .gaussian_sampling import (
    NUSCENES_OPENOCC_V2_CLASS_COUNTS,
    NUSCENES_OPENOCC_V2_SPEED_BIN_COUNTS,
    count_dataset_voxels,
    sample_gaussian_voxels,
)
from .mapper import DEFAULT_REGULARIZER_OPTIONS, TemporalDatasetMapper
from .samplers import InferenceSequenceSampler, SequentialSceneBatchSampler, ShuffledBatchSampler, scene_sequences

__all__ = [
    "CAMERA_CHANNELS",
    "DEFAULT_REGULARIZER_OPTIONS",
    "InferenceSequenceSampler",
    "NUSCENES_OPENOCC_V2_CLASS_COUNTS",
    "NUSCENES_OPENOCC_V2_SPEED_BIN_COUNTS",
    "SceneSequenceDataset",
    "SequentialSceneBatchSampler",
    "ShuffledBatchSampler",
    "TemporalDatasetMapper",
    "build_test_loader",
    "build_train_loader",
    "count_dataset_voxels",
    "get_records",
    "load_nuscenes_occupancy_records",
    "register_nuscenes_occupancy",
    "sample_gaussian_voxels",
    "scene_sequences",
    "split_scene_names",
]
