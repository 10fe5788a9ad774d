"""nuScenes occupancy datasets: one record per keyframe, built through the nuScenes devkit
and registered in detectron2's ``DatasetCatalog`` / ``MetadataCatalog``.

A record (a plain ``dict``, picklable) holds everything the mapper needs to load and
place one keyframe; files are only named here, never opened (missing or corrupt files
are reported when the mapper loads them). Keys:

- ``sample_token``, ``scene_token``, ``scene_name`` (str); ``timestamp`` (int, µs, the
  LIDAR_TOP keyframe time); ``frame_index`` (int, 0-based index of the keyframe in its
  scene); ``num_frames`` (keyframes in the scene); ``prev_sample_token`` /
  ``next_sample_token`` (str, '' at the scene ends).
- ``ego2global``: (4, 4) float64, ego pose of the LIDAR_TOP keyframe (the frame of the GT).
- ``cameras``: list of six dicts in nuScenes order (:data:`CAMERA_CHANNELS`) with
  ``channel``, ``image_path`` (absolute), ``sample_data_token``, ``timestamp`` (µs),
  ``width``, ``height`` (pixels), ``intrinsics`` (3, 3) float64, ``cam2ego`` (4, 4)
  float64 (OpenCV camera -> the camera's own ego frame) and ``ego2global`` (4, 4) float64
  (ego pose at the camera's timestamp, which differs slightly from the keyframe's).
- ``lidar``: dict with ``path``, ``sample_data_token``, ``timestamp``, ``lidar2ego`` and
  ``ego2global`` (4, 4) float64.
- ``lidar_origins``: (K, 3) float64 RayIoU ray origins in this keyframe's ego frame
  (:func:`voxelsplat.utils.geometry.select_lidar_origins` over the scene's keyframes).
- ``gt_path`` (absolute path of ``labels.npz``), ``gt_format`` ("openocc_v2" | "occ3d").
- only for a dataset registered with ``visible_mask_root``: ``visible_mask_path`` (absolute
  path of ``<visible_mask_root>/<scene_name>/<sample_token>/labels.npz``, the ray-visibility
  mask kept apart from the labels, as in the released code) and ``visible_mask_key`` (its key
  in that archive). These two are added after the cache is read, so they never change it.

Splits (see :func:`split_scene_names`): nuScenes' official scene lists
(``nuscenes.utils.splits.create_splits_scenes``) when every scene of the version belongs
to them ("train"/"val" mean "mini_train"/"mini_val" for a mini version); otherwise a
deterministic split by scene name (every scene sorted by name; 20 % of them, at least one,
picked at evenly spaced positions, form "val"; the rest "train").

Records are cached on disk as JSON (arrays exact; reading a cache never runs code) keyed by the
version, split, label format, paths and a content hash of the version's JSON tables, so a second
start does not load the devkit.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from voxelsplat.utils.geometry import pose_to_transform, select_lidar_origins
from voxelsplat.utils.io import atomic_write_json, read_json

from .loading import DEFAULT_VISIBLE_MASK_KEY
from ..structures import LABEL_SETS, dataset_grid, occupancy_metadata

logger = logging.getLogger(__name__)

__all__ = [
    "CAMERA_CHANNELS",
    "LIDAR_CHANNEL",
    "register_nuscenes_occupancy",
    "load_nuscenes_occupancy_records",
    "split_scene_names",
]

# nuScenes camera order used everywhere (image stacks, cam2ego stacks, render views).
CAMERA_CHANNELS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
LIDAR_CHANNEL = "LIDAR_TOP"
# Default folder of each GT format under the dataroot.
DEFAULT_GT_FOLDERS = {"openocc_v2": "openocc_v2", "occ3d": "gts"}
GT_FILE_NAME = "labels.npz"
# Bumped whenever the record layout changes, so stale caches are never reused.
RECORD_FORMAT_VERSION = 1
# Share of scenes in "val" for versions whose scenes are not in the official split lists.
DETERMINISTIC_VAL_FRACTION = 0.2

# name -> registration key, to make re-registration with identical arguments a no-op.
_REGISTERED: Dict[str, tuple] = {}


def default_cache_dir() -> str:
    """Where record caches go when ``cache_dir`` is not given: ``$VOXELSPLAT_CACHE_DIR`` or
    ``~/.cache/voxelsplat/records``."""
    return os.environ.get("VOXELSPLAT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "voxelsplat", "records")


def _version_folder(dataroot: str, version: str) -> str:
    folder = os.path.join(dataroot, version)
    if not os.path.isdir(folder):
        found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(dataroot, "v1.0-*")))
        raise FileNotFoundError(
            f"nuScenes dataroot {dataroot!r} has no version folder {version!r} (expected the JSON tables in "
            f"{folder!r}); version folders found: {found or 'none'}. See datasets/README.md for the layout."
        )
    return folder


def _resolve_gt_root(dataroot: str, gt_format: str, gt_root: Optional[str]) -> str:
    if gt_format not in LABEL_SETS:
        raise KeyError(f"unknown gt_format {gt_format!r}; expected one of {sorted(LABEL_SETS)}")
    return os.path.abspath(gt_root if gt_root is not None else os.path.join(dataroot, DEFAULT_GT_FOLDERS[gt_format]))


def _official_family(version: str) -> Optional[Dict[str, str]]:
    """Generic split name -> official split name for a version, or None if none applies."""
    if version.endswith("mini"):
        return {"train": "mini_train", "val": "mini_val"}
    if version.endswith("trainval"):
        return {"train": "train", "val": "val"}
    if version.endswith("test"):
        return {"test": "test"}
    return None


def split_scene_names(version: str, split: str, scene_names: Sequence[str]) -> List[str]:
    """Scene names of ``split`` among ``scene_names`` (all scenes of ``version``).

    Args:
        version: nuScenes version folder name, e.g. "v1.0-mini".
        split: "train", "val", "all", or an official split name ("mini_train", "train_detect", ...).
        scene_names: every scene name of the version.
    Returns:
        The split's scene names, sorted. Official lists apply when every scene of the version
        belongs to the official lists of its family (mini: mini_train + mini_val; trainval:
        train + val; test: test); otherwise a deterministic split by sorted scene name.
    Raises:
        ValueError: unknown split, or a split that selects no scene.
    """
    from nuscenes.utils.splits import create_splits_scenes

    names = sorted(set(scene_names))
    if split == "all":
        return names
    official = create_splits_scenes()
    family = _official_family(version)
    selected: Optional[List[str]] = None
    if family is not None:
        family_scenes = set().union(*(official[s] for s in family.values()))
        if set(names) <= family_scenes:
            official_name = family.get(split, split)
            if official_name not in official:
                raise ValueError(f"unknown split {split!r} for {version}; expected 'train', 'val', 'all' or one of "
                                 f"{sorted(official)}")
            selected = sorted(set(official[official_name]) & set(names))
    if selected is None:
        if split in official and split not in ("train", "val"):
            selected = sorted(set(official[split]) & set(names))
        elif split in ("train", "val"):
            num_val = max(1, int(round(DETERMINISTIC_VAL_FRACTION * len(names)))) if len(names) >= 2 else 0
            val_positions = set(np.round(np.linspace(0, len(names) - 1, num_val)).astype(int).tolist()) if num_val else set()
            selected = [n for i, n in enumerate(names) if (i in val_positions) == (split == "val")]
        else:
            raise ValueError(f"unknown split {split!r} for {version}; expected 'train', 'val', 'all' or one of "
                             f"{sorted(official)}")
    if not selected:
        raise ValueError(f"split {split!r} of {version} selects no scene (scenes of the version: {names})")
    return selected


# (table folder, its files' names/sizes/mtimes) -> content digest, so one process hashes
# the (large, for v1.0-trainval) tables once.
_DIGEST_MEMO: Dict[tuple, str] = {}


def _tables_digest(table_folder: str) -> str:
    """blake2b of every JSON table of a version (names and contents)."""
    paths = sorted(glob.glob(os.path.join(table_folder, "*.json")))
    stamp = (os.path.realpath(table_folder), tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths))
    if stamp not in _DIGEST_MEMO:
        digest = hashlib.blake2b(digest_size=16)
        for path in paths:
            digest.update(os.path.basename(path).encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 23), b""):
                    digest.update(chunk)
        _DIGEST_MEMO[stamp] = digest.hexdigest()
    return _DIGEST_MEMO[stamp]


def _cache_path(cache_dir: str, dataroot: str, version: str, split: str, gt_format: str, gt_root: str) -> str:
    key = hashlib.blake2b(digest_size=8)
    for part in (RECORD_FORMAT_VERSION, os.path.realpath(dataroot), version, split, gt_format,
                 os.path.realpath(gt_root), _tables_digest(os.path.join(dataroot, version))):
        key.update(str(part).encode() + b"\0")
    return os.path.join(cache_dir, f"{version}_{split}_{gt_format}_{key.hexdigest()}.json")


def _write_record_cache(records: List[dict], path: str) -> None:
    """The records as JSON (arrays exact), written atomically: reading a cache never runs code,
    whoever wrote the file."""
    atomic_write_json(path, records)


def _read_record_cache(path: str) -> Optional[List[dict]]:
    """The records of a cache file of :func:`_write_record_cache`; None (with a warning naming the
    file, which is then rebuilt) when it is unreadable or not a list of records."""
    try:
        records = read_json(path)
    except (OSError, ValueError) as error:
        logger.warning("ignoring unreadable record cache %s (%s); rebuilding it", path, error)
        return None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "sample_token" in r for r in records):
        logger.warning("ignoring record cache %s: it does not hold a list of keyframe records; rebuilding it", path)
        return None
    return records


def _sample_data_pose(nusc, sample_data_token: str):
    """(sample_data record, sensor2ego (4,4), ego2global (4,4), intrinsics (3,3) or None)."""
    sample_data = nusc.get("sample_data", sample_data_token)
    calibration = nusc.get("calibrated_sensor", sample_data["calibrated_sensor_token"])
    ego_pose = nusc.get("ego_pose", sample_data["ego_pose_token"])
    sensor2ego = pose_to_transform(calibration["translation"], calibration["rotation"])
    ego2global = pose_to_transform(ego_pose["translation"], ego_pose["rotation"])
    intrinsics = np.asarray(calibration["camera_intrinsic"], dtype=np.float64) if calibration["camera_intrinsic"] else None
    return sample_data, sensor2ego, ego2global, intrinsics


def _scene_keyframes(nusc, scene: dict) -> List[dict]:
    """The scene's sample records in time order (following the ``next`` links)."""
    samples, token = [], scene["first_sample_token"]
    while token:
        sample = nusc.get("sample", token)
        samples.append(sample)
        token = sample["next"]
    if len(samples) != scene["nbr_samples"]:
        logger.warning("scene %s: %d keyframes linked, table says %d", scene["name"], len(samples), scene["nbr_samples"])
    return samples


def _build_records(dataroot: str, version: str, split: str, gt_format: str, gt_root: str) -> List[dict]:
    from nuscenes.nuscenes import NuScenes

    nusc = NuScenes(version=version, dataroot=dataroot, verbose=False)
    scene_names = split_scene_names(version, split, [scene["name"] for scene in nusc.scene])
    wanted = set(scene_names)
    records: List[dict] = []
    for scene in sorted(nusc.scene, key=lambda s: s["name"]):
        if scene["name"] not in wanted:
            continue
        keyframes = _scene_keyframes(nusc, scene)
        scene_records = []
        for frame_index, sample in enumerate(keyframes):
            missing = [c for c in (*CAMERA_CHANNELS, LIDAR_CHANNEL) if c not in sample["data"]]
            if missing:
                raise KeyError(f"{version}: sample {sample['token']} (scene {scene['name']}) has no sample_data for "
                               f"{missing}")
            lidar_data, lidar2ego, lidar_ego2global, _ = _sample_data_pose(nusc, sample["data"][LIDAR_CHANNEL])
            cameras = []
            for channel in CAMERA_CHANNELS:
                cam_data, cam2ego, cam_ego2global, intrinsics = _sample_data_pose(nusc, sample["data"][channel])
                cameras.append(dict(
                    channel=channel,
                    image_path=os.path.join(dataroot, cam_data["filename"]),
                    sample_data_token=cam_data["token"],
                    timestamp=int(cam_data["timestamp"]),
                    width=int(cam_data["width"]),
                    height=int(cam_data["height"]),
                    intrinsics=intrinsics,
                    cam2ego=cam2ego,
                    ego2global=cam_ego2global,
                ))
            scene_records.append(dict(
                sample_token=sample["token"],
                scene_token=scene["token"],
                scene_name=scene["name"],
                timestamp=int(sample["timestamp"]),
                frame_index=frame_index,
                num_frames=len(keyframes),
                prev_sample_token=sample["prev"],
                next_sample_token=sample["next"],
                ego2global=lidar_ego2global,
                cameras=cameras,
                lidar=dict(
                    path=os.path.join(dataroot, lidar_data["filename"]),
                    sample_data_token=lidar_data["token"],
                    timestamp=int(lidar_data["timestamp"]),
                    lidar2ego=lidar2ego,
                    ego2global=lidar_ego2global,
                ),
                gt_path=os.path.join(gt_root, scene["name"], sample["token"], GT_FILE_NAME),
                gt_format=gt_format,
            ))
        keyframe_lidar2global = np.stack([r["lidar"]["ego2global"] @ r["lidar"]["lidar2ego"] for r in scene_records])
        for record in scene_records:
            record["lidar_origins"] = select_lidar_origins(keyframe_lidar2global, record["ego2global"])
        records.extend(scene_records)
    return records


def _attach_visible_mask_paths(records: List[dict], visible_mask_root: Optional[str], visible_mask_key: str) -> None:
    if visible_mask_root is None:
        return
    for record in records:
        record["visible_mask_path"] = os.path.join(visible_mask_root, record["scene_name"], record["sample_token"],
                                                   GT_FILE_NAME)
        record["visible_mask_key"] = visible_mask_key


def load_nuscenes_occupancy_records(dataroot: str, version: str, split: str, gt_format: str = "openocc_v2",
                                    gt_root: Optional[str] = None, cache_dir: Optional[str] = None,
                                    visible_mask_root: Optional[str] = None,
                                    visible_mask_key: str = DEFAULT_VISIBLE_MASK_KEY) -> List[dict]:
    """Records of every keyframe of ``split``, ordered by scene name then time (see the module
    docstring for the record keys). Uses the on-disk cache when it matches; otherwise loads
    the nuScenes devkit and writes the cache atomically. With ``visible_mask_root`` (see
    :func:`register_nuscenes_occupancy`) records name their ray-visibility mask file.

    Raises:
        FileNotFoundError: ``dataroot`` has no ``version`` folder.
    """
    dataroot = os.path.abspath(dataroot)
    _version_folder(dataroot, version)
    gt_root = _resolve_gt_root(dataroot, gt_format, gt_root)
    cache_path = _cache_path(cache_dir or default_cache_dir(), dataroot, version, split, gt_format, gt_root)
    visible_mask_root = os.path.abspath(visible_mask_root) if visible_mask_root is not None else None
    records = _read_record_cache(cache_path) if os.path.isfile(cache_path) else None
    if records is not None:
        logger.info("loaded %d %s/%s records from cache %s", len(records), version, split, cache_path)
        _attach_visible_mask_paths(records, visible_mask_root, visible_mask_key)
        return records
    records = _build_records(dataroot, version, split, gt_format, gt_root)
    _write_record_cache(records, cache_path)
    logger.info("built %d %s/%s records through the nuScenes devkit; cached in %s", len(records), version, split,
                cache_path)
    _attach_visible_mask_paths(records, visible_mask_root, visible_mask_key)
    return records


def register_nuscenes_occupancy(name: str, dataroot: str, version: str, split: str, gt_format: str = "openocc_v2",
                                gt_root: Optional[str] = None, cache_dir: Optional[str] = None,
                                visible_mask_root: Optional[str] = None,
                                visible_mask_key: str = DEFAULT_VISIBLE_MASK_KEY) -> str:
    """Register a nuScenes occupancy dataset in detectron2's catalogs and return ``name``.

    Usable from a LazyConfig (``dataset=LazyCall(register_nuscenes_occupancy)(name=..., ...)``
    instantiates to the name). Records are built lazily on the first ``DatasetCatalog.get``.
    Calling again with the same arguments is a no-op; with other arguments (e.g. a config
    reloaded with another dataroot) the registration is replaced, with a warning.

    Args:
        name: dataset name in the catalogs.
        dataroot: nuScenes root (holds ``<version>/``, ``samples/``, ``sweeps/``, ``maps/``).
        version: e.g. "v1.0-trainval", "v1.0-mini".
        split: "train", "val", "all" or an official split name (see :func:`split_scene_names`).
        gt_format: "openocc_v2" (semantics + flow) or "occ3d" (semantics + camera/LiDAR masks).
        gt_root: folder of ``<scene_name>/<sample_token>/labels.npz``; default
            ``dataroot/openocc_v2`` or ``dataroot/gts``.
        cache_dir: where record caches go (default :func:`default_cache_dir`); the
            dataset-wide voxel counts of the Gaussian sampling are cached there too.
        visible_mask_root: folder of ``<scene_name>/<sample_token>/labels.npz`` holding each
            keyframe's ray-visibility mask apart from the labels (the released code's
            ``openocc_v2_ray_mask``); the mapper then reads the mask from there (and gives it
            as ``occ_visible``, BEV-augmented like the labels) instead of the labels' own
            ``visible`` key. None: no separate mask. Missing files are reported when a sample
            is loaded.
        visible_mask_key: the mask's key in those archives (the release's: ``ray_mask2``).
    Raises:
        FileNotFoundError: ``dataroot`` has no ``version`` folder.
        ValueError: ``name`` is already registered by something else.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    dataroot = os.path.abspath(dataroot)
    _version_folder(dataroot, version)
    gt_root = _resolve_gt_root(dataroot, gt_format, gt_root)
    cache_dir = os.path.abspath(cache_dir) if cache_dir else None
    visible_mask_root = os.path.abspath(visible_mask_root) if visible_mask_root else None
    visible_mask_key = str(visible_mask_key)
    key = (dataroot, version, split, gt_format, gt_root, cache_dir, visible_mask_root, visible_mask_key)
    if name in DatasetCatalog.list():
        if _REGISTERED.get(name) == key:
            return name
        if name not in _REGISTERED:
            raise ValueError(f"dataset {name!r} is already registered, not by register_nuscenes_occupancy")
        # a config loaded again with another dataroot (tests, notebooks): the new arguments win
        logger.warning("re-registering dataset %r: %s -> %s", name, _REGISTERED[name], key)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_nuscenes_occupancy_records(dataroot, version, split, gt_format,
                                                                          gt_root, cache_dir, visible_mask_root,
                                                                          visible_mask_key))
    # "class_names" is detectron2's deprecated alias of "thing_classes" (which holds the same list)
    # the labels' grid: the default one unless the dataset root describes another (structures.GRID_FILE)
    entries = {k: v for k, v in occupancy_metadata(gt_format, dataset_grid(dataroot)).items() if k != "class_names"}
    MetadataCatalog.get(name).set(evaluator_type="occupancy", dataroot=dataroot, version=version, split=split,
                                  gt_root=gt_root, record_cache_dir=cache_dir, visible_mask_root=visible_mask_root,
                                  visible_mask_key=visible_mask_key, **entries)
    _REGISTERED[name] = key
    return name
