"""Write synthetic worlds as a nuScenes dataset with OpenOcc v2 and Occ3D ground truth.

Layout under the output folder (the same as real data, see datasets/README.md)::

    <version>/*.json                         the devkit's 13 tables
    samples/CAM_*/<log>__<CAM>__<us>.jpg     keyframe images
    samples/LIDAR_TOP/<log>__LIDAR_TOP__<us>.pcd.bin
    sweeps/LIDAR_TOP/...                     intermediate LiDAR sweeps (``sweeps`` per keyframe gap)
    maps/<token>.png                         driveable-area mask per scene
    openocc_v2/<scene>/<sample>/labels.npz   semantics, flow, visible
    gts/<scene>/<sample>/labels.npz          Occ3D: semantics, mask_lidar, mask_camera
    occupancy_grid.json                      the labels' grid (voxelsplat.structures.GRID_FILE)

The dataset is built in a staging folder of its own beside the output and swapped into place
at the end (:mod:`.staging`), so that the output folder is always either the previous complete
dataset or the new one, and no other folder is touched. Worker processes end with the process
that started them (:mod:`.workers`). Output is a function of the arguments only (the same seed
gives the same bytes, whatever the number of workers).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from voxelsplat.data.datasets import CAMERA_CHANNELS
from voxelsplat.structures import (
    DEFAULT_GRID, GRID_FILE, OPENOCC_V2_CLASSES, OccupancyGrid, grid_to_json, openocc_to_occ3d_lut,
)
from voxelsplat.utils.geometry import matrix_to_quaternion, yaw_to_quaternion
from voxelsplat.utils.io import folder_bytes

from .render import lidar_scan, occupancy_labels, points_in_boxes, ray_visibility, render_camera, camera_rays
from .sensors import CAMERA_TIME_OFFSETS_US, LIDAR2EGO, LIDAR_MAX_RANGE, camera_rig, lidar_beam_directions
from .staging import staged_folder
from .workers import ordered_map
from .world import AGENT_TYPES, CLASS, STATIC_CATEGORIES, World, build_world, check_omit_classes

logger = logging.getLogger(__name__)

__all__ = ["generate_synthetic_dataset", "synthetic_scene_names", "scene_world", "scene_world_for", "keyframe_time"]

KEYFRAME_INTERVAL_US = 500_000  # 2 Hz keyframes
SWEEP_INTERVAL_US = 50_000  # 20 Hz LiDAR
BASE_TIMESTAMP_US = 1_532_402_927_647_951
SCENE_SPACING_US = 3_600_000_000
ANNOTATION_RANGE = 60.0  # m around the ego
CAMERA_MASK_RAYS = 5_000  # rays per camera for the camera-visibility mask (about 0.6 deg apart)
LIDAR_AZIMUTH_STEPS = 1080
LIDAR_TRAVERSE_EVERY = 2  # rays of the visibility mask that mark the free space they cross
JPEG_QUALITY = 92

LIDAR = "LIDAR_TOP"

# nuScenes-lidarseg category indices of the categories used here
_CATEGORY_INDEX = {"human.pedestrian.adult": 2, "movable_object.barrier": 9, "movable_object.trafficcone": 12,
                   "vehicle.bicycle": 14, "vehicle.bus.rigid": 16, "vehicle.car": 17, "vehicle.construction": 18,
                   "vehicle.motorcycle": 21, "vehicle.trailer": 22, "vehicle.truck": 23}
_ATTRIBUTES = ("vehicle.moving", "vehicle.stopped", "vehicle.parked", "cycle.with_rider", "cycle.without_rider",
               "pedestrian.sitting_lying_down", "pedestrian.standing", "pedestrian.moving")
_VISIBILITY = (("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100"))


def _token(*parts) -> str:
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def synthetic_scene_names(version: str, count: int) -> List[str]:
    """``count`` scene names that nuScenes' split tooling accepts for ``version``: official
    names (about a fifth from the validation list, at least one when count >= 2) for mini and
    trainval versions, ``scene-9xxx`` names otherwise (a deterministic split applies)."""
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    if version.endswith("mini"):
        train, val = splits["mini_train"], splits["mini_val"]
    elif version.endswith("trainval"):
        train, val = splits["train"], splits["val"]
    elif version.endswith("test"):
        if count > len(splits["test"]):
            raise ValueError(f"{version} has at most {len(splits['test'])} scenes, asked for {count}")
        return sorted(splits["test"][:count])
    else:
        return [f"scene-{9000 + i:04d}" for i in range(count)]
    num_val = min(len(val), max(1 if count >= 2 else 0, int(round(count * len(val) / (len(train) + len(val))))))
    num_train = count - num_val
    if num_train > len(train):
        raise ValueError(f"{version} holds at most {len(train) + len(val)} scenes, asked for {count}; use a larger "
                         f"version (e.g. v1.0-trainval) or another version name")
    return sorted(list(train[:num_train]) + list(val[:num_val]))


@dataclass(frozen=True)
class _SceneSpec:
    seed: int
    index: int
    name: str
    num_keyframes: int
    sweeps: int
    omit_classes: Tuple[str, ...] = ()
    one_way: bool = False

    @property
    def duration(self) -> float:
        return (self.num_keyframes - 1) * KEYFRAME_INTERVAL_US * 1e-6 + 0.1

    def world(self) -> World:
        """This scene's world (cached per process by :func:`scene_world`)."""
        return scene_world(self.seed, self.index, self.duration, self.omit_classes, self.one_way)

    @property
    def log_name(self) -> str:
        return f"n015-synthetic-s{self.seed & 0xFFFFFFFF:08x}-{self.index:03d}"

    @property
    def start_us(self) -> int:
        return BASE_TIMESTAMP_US + self.index * SCENE_SPACING_US


def keyframe_time(frame_index: int) -> float:
    """World time (s) of a keyframe."""
    return frame_index * KEYFRAME_INTERVAL_US * 1e-6


@functools.lru_cache(maxsize=4)
def scene_world(seed: int, scene_index: int, duration: float, omit_classes: Tuple[str, ...] = (),
                one_way: bool = False) -> World:
    """The world of one scene (cached per process)."""
    return build_world(seed, scene_index, duration, omit_classes, one_way)


def scene_world_for(seed: int, scene_index: int, samples_per_scene: int, omit_classes: Sequence[str] = (),
                    one_way: bool = False) -> World:
    """The world of scene ``scene_index`` (position in the sorted scene names) of a dataset
    generated with ``seed``, ``samples_per_scene``, ``omit_classes`` and ``one_way``; world
    time 0 is the first keyframe."""
    return _SceneSpec(seed, scene_index, "", samples_per_scene, 0, check_omit_classes(omit_classes),
                      bool(one_way)).world()


def _write_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
    """An .npz with fixed zip timestamps (byte-for-byte reproducible), compressed."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for name, array in arrays.items():
            entry = io.BytesIO()
            np.lib.format.write_array(entry, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, entry.getvalue())
    with open(path, "wb") as f:
        f.write(buffer.getvalue())


def _ensure_parent(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)


@dataclass(frozen=True)
class _FrameTask:
    spec: _SceneSpec
    frame: int  # keyframe index; sweeps carry the index of the keyframe before them
    sweep: int  # 0 for the keyframe, 1..K for the sweeps after it
    root: str
    image_size: Tuple[int, int]
    sample_token: str
    lidar_file: str
    camera_files: Tuple[str, ...]  # empty for sweeps
    grid: OccupancyGrid = DEFAULT_GRID  # of the occupancy labels


def _time_of(task: _FrameTask) -> Tuple[float, int]:
    offset_us = task.frame * KEYFRAME_INTERVAL_US + task.sweep * SWEEP_INTERVAL_US
    return offset_us * 1e-6, task.spec.start_us + offset_us


def _render_frame(task: _FrameTask) -> dict:
    """Render, cast and write one keyframe (or sweep); returns the annotation candidates."""
    spec = task.spec
    world = spec.world()
    t, _ = _time_of(task)
    ego2global = world.ego_pose(t)
    boxes = world.boxes(t)
    lidar2global = ego2global @ LIDAR2EGO
    directions, ring = lidar_beam_directions(LIDAR_AZIMUTH_STEPS)
    points, hits, directions_global = lidar_scan(world, boxes, lidar2global, directions, ring, LIDAR_MAX_RANGE)
    path = os.path.join(task.root, task.lidar_file)
    _ensure_parent(path)
    points.tofile(path)
    if task.sweep:
        return {}

    grid = task.grid
    global2ego = np.linalg.inv(ego2global)
    width, height = task.image_size
    mask_camera = np.zeros(grid.shape, dtype=bool)
    stride = max(1, int(round(np.sqrt(width * height / CAMERA_MASK_RAYS))))
    import cv2

    for camera, filename in zip(camera_rig(width, height), task.camera_files):
        t_cam = t + CAMERA_TIME_OFFSETS_US[camera["channel"]] * 1e-6
        cam2global = world.ego_pose(t_cam) @ camera["cam2ego"]
        render = render_camera(world, world.boxes(t_cam), cam2global, camera["intrinsics"], width, height)
        image_path = os.path.join(task.root, filename)
        _ensure_parent(image_path)
        ok, encoded = cv2.imencode(".jpg", render["image"][:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"could not encode {image_path}")
        with open(image_path, "wb") as f:
            f.write(encoded.tobytes())
        rays, _, _ = camera_rays(cam2global, camera["intrinsics"], width, height, stride)
        depth = render["depth"][::stride, ::stride].reshape(-1).astype(np.float64)
        cam2ego_kf = global2ego @ cam2global
        mask_camera |= ray_visibility(cam2ego_kf[:3, 3], rays @ global2ego[:3, :3].T, depth, grid)

    semantics, flow = occupancy_labels(world, boxes, ego2global, grid)
    lidar_t = np.where(hits.t < LIDAR_MAX_RANGE, hits.t, np.inf)
    # the free space of every other azimuth (neighbouring rays cross the same voxels), every hit
    visible = ray_visibility(LIDAR2EGO[:3, 3], directions @ LIDAR2EGO[:3, :3].T, lidar_t, grid,
                             traverse_every=LIDAR_TRAVERSE_EVERY)
    scene_dir = spec.name
    openocc = os.path.join(task.root, "openocc_v2", scene_dir, task.sample_token, "labels.npz")
    occ3d = os.path.join(task.root, "gts", scene_dir, task.sample_token, "labels.npz")
    _ensure_parent(openocc)
    _ensure_parent(occ3d)
    _write_npz(openocc, {"semantics": semantics, "flow": flow, "visible": visible})
    _write_npz(occ3d, {"semantics": openocc_to_occ3d_lut()[semantics], "mask_lidar": visible.astype(np.uint8),
                       "mask_camera": mask_camera.astype(np.uint8)})

    # annotation candidates: agents, cones and barriers near the ego
    annotated = np.isin(boxes.labels, [CLASS[n] for n in list(AGENT_TYPES) + list(STATIC_CATEGORIES)])
    near = np.linalg.norm(boxes.centers[:, :2] - ego2global[:2, 3], axis=1) < ANNOTATION_RANGE
    selected = boxes.select(annotated & near)
    points_global = points[:, :3].astype(np.float64) @ lidar2global[:3, :3].T + lidar2global[:3, 3]
    counts = points_in_boxes(points_global, selected)
    objects = []
    for b in range(len(selected)):
        objects.append(dict(id=int(selected.ids[b]), label=int(selected.labels[b]), center=selected.centers[b].tolist(),
                            size=selected.sizes[b].tolist(), yaw=float(selected.yaw[b]),
                            speed=float(np.hypot(*selected.velocity[b])), num_lidar_pts=int(counts[b])))
    return dict(objects=objects)


def _category(label: int) -> str:
    name = OPENOCC_V2_CLASSES[label]
    return AGENT_TYPES[name][0] if name in AGENT_TYPES else STATIC_CATEGORIES[name]


def _attribute(label: int, speed: float) -> List[str]:
    name = OPENOCC_V2_CLASSES[label]
    moving = speed > 0.2
    if name == "pedestrian":
        key = "pedestrian.moving" if moving else "pedestrian.standing"
    elif name in ("bicycle", "motorcycle"):
        key = "cycle.with_rider" if moving else "cycle.without_rider"
    elif name in AGENT_TYPES:
        key = "vehicle.moving" if moving else "vehicle.parked"
    else:
        return []
    return [_token("attribute", key)]


def _visibility(num_points: int) -> str:
    return "1" if num_points == 0 else "2" if num_points < 5 else "3" if num_points < 20 else "4"


def _pose_record(token: str, timestamp: int, pose: np.ndarray) -> dict:
    yaw = float(np.arctan2(pose[1, 0], pose[0, 0]))
    return dict(token=token, timestamp=timestamp, rotation=[float(v) for v in yaw_to_quaternion(yaw)],
                translation=[float(pose[0, 3]), float(pose[1, 3]), float(pose[2, 3])])


def _calibration(token: str, sensor_token: str, sensor2ego: np.ndarray, intrinsics: Optional[np.ndarray]) -> dict:
    return dict(token=token, sensor_token=sensor_token, translation=[float(v) for v in sensor2ego[:3, 3]],
                rotation=[float(v) for v in matrix_to_quaternion(sensor2ego[:3, :3])],
                camera_intrinsic=[] if intrinsics is None else [[float(v) for v in row] for row in intrinsics])


def _link(records: List[dict]) -> None:
    for i, record in enumerate(records):
        record["prev"] = records[i - 1]["token"] if i > 0 else ""
        record["next"] = records[i + 1]["token"] if i + 1 < len(records) else ""


def generate_synthetic_dataset(output: str, version: str = "v1.0-mini", scenes: int = 2, samples_per_scene: int = 20,
                               image_size: Sequence[int] = (704, 256), sweeps: int = 0, seed: int = 0,
                               workers: int = 1, overwrite: bool = False, progress: bool = False,
                               omit_classes: Sequence[str] = (), one_way: bool = False,
                               point_cloud_range: Optional[Sequence[float]] = None) -> dict:
    """Generate the dataset into ``output`` (see the module docstring for the layout).

    Args:
        output: folder to create; an existing non-empty folder is refused unless ``overwrite``,
            which replaces it only once the new dataset is complete. Staging folders that a
            killed run left beside it (``<output>.partial-*``) are reported, not removed.
        version: nuScenes version folder name ("v1.0-mini" uses official mini scene names).
        scenes, samples_per_scene: number of scenes and keyframes (2 Hz) per scene.
        image_size: (width, height) of the camera images.
        sweeps: LiDAR sweeps between consecutive keyframes (0-9; 20 Hz).
        seed: world seed; the same seed gives the same bytes.
        workers: processes rendering frames in parallel; they end with this process.
        omit_classes: object classes to leave out of every world (see ``world.OMITTABLE_CLASSES``):
            the label set stays, those classes just never occur. Recorded in each scene's
            description.
        one_way: all traffic of each main road goes the ego's way (also in the description).
        point_cloud_range: (x_min, y_min, z_min, x_max, y_max, z_max) of the occupancy labels'
            grid, in metres, at 0.4 m voxels (default: OpenOcc v2's, 200x200x16 around the ego).
            Written to ``occupancy_grid.json``, from which the dataset's registration and the
            configs' model spec take it.
    Returns:
        dict with ``root``, ``version``, ``scenes`` (names), ``samples_per_scene``, ``bytes`` (size on disk).
    """
    if scenes < 1 or samples_per_scene < 1:
        raise ValueError(f"need at least one scene and one keyframe, got scenes={scenes}, "
                         f"samples_per_scene={samples_per_scene}")
    if not 0 <= sweeps < KEYFRAME_INTERVAL_US // SWEEP_INTERVAL_US:
        raise ValueError(f"sweeps must lie in [0, {KEYFRAME_INTERVAL_US // SWEEP_INTERVAL_US - 1}], got {sweeps}")
    width, height = (int(v) for v in image_size)
    if width < 16 or height < 16:
        raise ValueError(f"image_size must be at least 16x16 pixels, got {width}x{height}")
    omit_classes = check_omit_classes(omit_classes)
    grid = DEFAULT_GRID
    if point_cloud_range is not None:
        try:
            grid = OccupancyGrid(tuple(float(v) for v in point_cloud_range), DEFAULT_GRID.voxel_size)
        except (TypeError, ValueError) as error:
            raise ValueError(f"point_cloud_range {point_cloud_range!r}: {error}") from error
        lo, hi = grid.range_min, grid.range_max
        if not (np.all(lo[:2] < 0) and np.all(hi[:2] > 0)):
            raise ValueError(f"point_cloud_range {point_cloud_range!r} must hold the ego (x and y ranges around 0)")
    output = os.path.abspath(output)
    names = synthetic_scene_names(version, scenes)
    with staged_folder(output, overwrite) as stage:
        tables, tasks = _plan(stage, version, names, samples_per_scene, (width, height), sweeps, seed, omit_classes,
                              bool(one_way), grid)
        results = _run_tasks(tasks, workers, progress)
        _add_annotations(tables, tasks, results, seed)
        table_dir = os.path.join(stage, version)
        os.makedirs(table_dir, exist_ok=True)
        for name, records in tables.items():
            with open(os.path.join(table_dir, f"{name}.json"), "w") as f:
                json.dump(records, f, indent=1)
        with open(os.path.join(stage, GRID_FILE), "w") as f:
            f.write(grid_to_json(grid))
        size = folder_bytes(stage)
    return dict(root=output, version=version, scenes=names, samples_per_scene=samples_per_scene, bytes=size)


def _plan(root: str, version: str, names: List[str], num_keyframes: int, image_size: Tuple[int, int], sweeps: int,
          seed: int, omit_classes: Tuple[str, ...] = (), one_way: bool = False, grid: OccupancyGrid = DEFAULT_GRID):
    """Every table except sample_annotation/instance, and the render tasks."""
    import cv2

    width, height = image_size
    tables: Dict[str, List[dict]] = {k: [] for k in (
        "category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log", "scene",
        "sample", "sample_data", "sample_annotation", "map")}
    for name, index in sorted(_CATEGORY_INDEX.items(), key=lambda kv: kv[1]):
        tables["category"].append(dict(token=_token("category", name), name=name, index=index,
                                       description=f"{name} (synthetic)"))
    for name in _ATTRIBUTES:
        tables["attribute"].append(dict(token=_token("attribute", name), name=name, description=name))
    for token, level in _VISIBILITY:
        tables["visibility"].append(dict(token=token, level=level, description=f"visibility of the object: {level}"))
    sensor_tokens = {}
    for channel in (*CAMERA_CHANNELS, LIDAR):
        sensor_tokens[channel] = _token("sensor", channel)
        tables["sensor"].append(dict(token=sensor_tokens[channel], channel=channel,
                                     modality="lidar" if channel == LIDAR else "camera"))
    rig = {c["channel"]: c for c in camera_rig(width, height)}
    tasks: List[_FrameTask] = []
    for index, name in enumerate(names):
        spec = _SceneSpec(seed, index, name, num_keyframes, sweeps, omit_classes, one_way)
        world = spec.world()
        log_token = _token(seed, name, "log")
        tables["log"].append(dict(token=log_token, logfile=spec.log_name, vehicle="n015", date_captured="2018-07-24",
                                  location="singapore-onenorth"))
        map_token = _token(seed, name, "map")
        map_file = f"maps/{map_token}.png"
        mask = (world.ground.labels == CLASS["driveable_surface"]).astype(np.uint8) * 255
        os.makedirs(os.path.join(root, "maps"), exist_ok=True)
        cv2.imwrite(os.path.join(root, map_file), mask[::-1])
        tables["map"].append(dict(token=map_token, category="semantic_prior", filename=map_file,
                                  log_tokens=[log_token]))
        calibration = {}
        for channel in (*CAMERA_CHANNELS, LIDAR):
            calibration[channel] = _token(seed, name, "calibrated_sensor", channel)
            if channel == LIDAR:
                record = _calibration(calibration[channel], sensor_tokens[channel], LIDAR2EGO, None)
            else:
                record = _calibration(calibration[channel], sensor_tokens[channel], rig[channel]["cam2ego"],
                                      rig[channel]["intrinsics"])
            tables["calibrated_sensor"].append(record)
        scene_token = _token(seed, name, "scene")
        samples = []
        for frame in range(num_keyframes):
            samples.append(dict(token=_token(seed, name, "sample", frame), timestamp=spec.start_us +
                                frame * KEYFRAME_INTERVAL_US, scene_token=scene_token))
        _link(samples)
        tables["sample"].extend(samples)
        description = (f"synthetic drive, {len(world.agents)} agents, ego at "
                       f"{world.ego.speed:.1f} m/s, seed {seed}")
        if omit_classes:
            description += f", without {', '.join(omit_classes)}"
        if one_way:
            description += ", one-way main road"
        tables["scene"].append(dict(token=scene_token, log_token=log_token, nbr_samples=num_keyframes,
                                    first_sample_token=samples[0]["token"], last_sample_token=samples[-1]["token"],
                                    name=name, description=description))
        channel_chain: Dict[str, List[dict]] = {c: [] for c in (*CAMERA_CHANNELS, LIDAR)}
        for frame, sample in enumerate(samples):
            for channel in CAMERA_CHANNELS:
                timestamp = sample["timestamp"] + CAMERA_TIME_OFFSETS_US[channel]
                token = _token(seed, name, channel, frame)
                channel_chain[channel].append(dict(
                    token=token, sample_token=sample["token"], ego_pose_token=token,
                    calibrated_sensor_token=calibration[channel], timestamp=timestamp, fileformat="jpg",
                    is_key_frame=True, height=height, width=width,
                    filename=f"samples/{channel}/{spec.log_name}__{channel}__{timestamp}.jpg"))
                pose = world.ego_pose((timestamp - spec.start_us) * 1e-6)
                tables["ego_pose"].append(_pose_record(token, timestamp, pose))
            last = frame == num_keyframes - 1
            for sweep in range(1 if last else sweeps + 1):
                timestamp = sample["timestamp"] + sweep * SWEEP_INTERVAL_US
                token = _token(seed, name, LIDAR, frame, sweep)
                folder = "samples" if sweep == 0 else "sweeps"
                filename = f"{folder}/{LIDAR}/{spec.log_name}__{LIDAR}__{timestamp}.pcd.bin"
                # a sweep belongs to the nearest keyframe, as in nuScenes
                owner = samples[frame + 1]["token"] if sweep * SWEEP_INTERVAL_US > KEYFRAME_INTERVAL_US // 2 \
                    else sample["token"]
                channel_chain[LIDAR].append(dict(
                    token=token, sample_token=owner, ego_pose_token=token, calibrated_sensor_token=calibration[LIDAR],
                    timestamp=timestamp, fileformat="pcd", is_key_frame=sweep == 0, height=0, width=0,
                    filename=filename))
                pose = world.ego_pose((timestamp - spec.start_us) * 1e-6)
                tables["ego_pose"].append(_pose_record(token, timestamp, pose))
                cameras = tuple(channel_chain[c][frame]["filename"] for c in CAMERA_CHANNELS) if sweep == 0 else ()
                tasks.append(_FrameTask(spec, frame, sweep, root, (width, height), sample["token"], filename, cameras,
                                        grid))
        for chain in channel_chain.values():
            _link(chain)
            tables["sample_data"].extend(chain)
    return tables, tasks


def _run_tasks(tasks: List[_FrameTask], workers: int, progress: bool) -> List[dict]:
    from tqdm import tqdm

    with tqdm(total=len(tasks), desc="synthetic frames", unit="frame", disable=not progress,
              dynamic_ncols=True) as bar:
        if workers > 1:
            return ordered_map(_render_frame, tasks, workers, on_result=lambda _: bar.update(1))
        results = []
        for task in tasks:
            results.append(_render_frame(task))
            bar.update(1)
        return results


def _add_annotations(tables: Dict[str, List[dict]], tasks: List[_FrameTask], results: List[dict], seed: int) -> None:
    """sample_annotation and instance tables from the objects each keyframe saw."""
    per_instance: Dict[str, List[dict]] = {}
    category_of: Dict[str, str] = {}
    for task, result in zip(tasks, results):
        if task.sweep:
            continue
        for obj in result["objects"]:
            instance = _token(seed, task.spec.name, "instance", obj["id"])
            category_of[instance] = _category(obj["label"])
            yaw = obj["yaw"]
            length, width, height = obj["size"]
            record = dict(
                token=_token(seed, task.spec.name, "annotation", obj["id"], task.frame),
                sample_token=task.sample_token, instance_token=instance,
                visibility_token=_visibility(obj["num_lidar_pts"]),
                attribute_tokens=_attribute(obj["label"], obj["speed"]),
                translation=[float(v) for v in obj["center"]], size=[width, length, height],
                rotation=[float(v) for v in yaw_to_quaternion(yaw)], num_lidar_pts=obj["num_lidar_pts"],
                num_radar_pts=0)
            per_instance.setdefault(instance, []).append(record)
    for instance, records in per_instance.items():
        _link(records)
        tables["sample_annotation"].extend(records)
        tables["instance"].append(dict(token=instance, category_token=_token("category", category_of[instance]),
                                       nbr_annotations=len(records), first_annotation_token=records[0]["token"],
                                       last_annotation_token=records[-1]["token"]))
