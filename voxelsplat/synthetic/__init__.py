"""Procedural driving worlds written as nuScenes datasets with OpenOcc v2 and Occ3D labels.

``generate_synthetic_dataset(output, ...)`` (or ``tools/make_synthetic_dataset.py``) writes
a dataset that the nuScenes devkit and every loader of this library read like the real one.
Modules: :mod:`.world` (roads, structures, agents, ego path), :mod:`.sensors` (the camera rig
and LiDAR), :mod:`.render` (ray casting, images, LiDAR sweeps, voxel labels and visibility),
:mod:`.writer` (tables and files), :mod:`.staging` (the output folder swapped in whole),
:mod:`.workers` (processes that end with the generator).
"""
from .writer import generate_synthetic_dataset, keyframe_time, scene_world, synthetic_scene_names

__all__ = ["generate_synthetic_dataset", "synthetic_scene_names", "scene_world", "keyframe_time"]
