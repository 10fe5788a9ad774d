"""The synthetic dataset is a nuScenes dataset to the devkit, and its modalities agree:
camera pixels, LiDAR points, occupancy voxels, flow and annotated boxes."""
import hashlib
import os

import numpy as np
import pytest

from voxelsplat.structures import DEFAULT_GRID, FLOW_CLASS_NAMES, OPENOCC_V2_CLASSES, openocc_to_occ3d_lut
from voxelsplat.synthetic import generate_synthetic_dataset, synthetic_scene_names
from voxelsplat.synthetic.render import render_camera
from voxelsplat.synthetic.writer import scene_world_for
from voxelsplat.utils.geometry import invert_transform, pose_to_transform

FREE = OPENOCC_V2_CLASSES.index("free")
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")


@pytest.fixture(scope="module")
def nusc(synthetic_dataset):
    from nuscenes.nuscenes import NuScenes

    return NuScenes(version=synthetic_dataset.version, dataroot=synthetic_dataset.root, verbose=False)


def _labels(root, folder, scene_name, sample_token):
    with np.load(os.path.join(root, folder, scene_name, sample_token, "labels.npz")) as f:
        return {k: f[k] for k in f.files}


def _sensor_to_global(nusc, sample_data_token):
    data = nusc.get("sample_data", sample_data_token)
    calib = nusc.get("calibrated_sensor", data["calibrated_sensor_token"])
    pose = nusc.get("ego_pose", data["ego_pose_token"])
    ego2global = pose_to_transform(pose["translation"], pose["rotation"])
    return ego2global @ pose_to_transform(calib["translation"], calib["rotation"]), ego2global, calib, data


def _keyframes(nusc):
    for scene in sorted(nusc.scene, key=lambda s: s["name"]):
        token = scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            yield scene, sample
            token = sample["next"]


def test_devkit_loads_tables_files_boxes_and_velocities(synthetic_dataset, nusc):
    from nuscenes.utils.data_classes import LidarPointCloud
    from nuscenes.utils.splits import create_splits_scenes

    assert sorted(s["name"] for s in nusc.scene) == synthetic_dataset.scenes
    official = create_splits_scenes()
    assert set(synthetic_dataset.scenes) <= set(official["mini_train"]) | set(official["mini_val"])
    assert set(synthetic_dataset.scenes) & set(official["mini_val"])
    assert len(nusc.sample) == len(synthetic_dataset.scenes) * synthetic_dataset.samples_per_scene
    velocities = []
    for scene, sample in _keyframes(nusc):
        assert set(sample["data"]) == set(CAMERAS) | {"LIDAR_TOP"}
        for channel in CAMERAS:
            path, boxes, intrinsics = nusc.get_sample_data(sample["data"][channel])
            assert os.path.isfile(path) and intrinsics.shape == (3, 3)
            data = nusc.get("sample_data", sample["data"][channel])
            assert (data["width"], data["height"]) == tuple(synthetic_dataset.image_size)
            assert abs(data["timestamp"] - sample["timestamp"]) < 50_000
        lidar_path, _, _ = nusc.get_sample_data(sample["data"]["LIDAR_TOP"])
        cloud = LidarPointCloud.from_file(lidar_path)
        assert cloud.points.shape[0] == 4 and cloud.points.shape[1] > 5000
        assert len(nusc.get_boxes(sample["data"]["LIDAR_TOP"])) == len(sample["anns"]) > 0
        for ann in sample["anns"]:
            velocities.append(nusc.box_velocity(ann))
    # time order, 2 Hz keyframes, linked chains
    for scene in nusc.scene:
        sample = nusc.get("sample", scene["first_sample_token"])
        assert sample["prev"] == "" and scene["nbr_samples"] == synthetic_dataset.samples_per_scene
        while sample["next"]:
            nxt = nusc.get("sample", sample["next"])
            assert nxt["timestamp"] - sample["timestamp"] == 500_000 and nxt["prev"] == sample["token"]
            sample = nxt
        assert sample["token"] == scene["last_sample_token"]
    velocities = np.array(velocities)
    assert np.isfinite(velocities[:, :2]).any(axis=1).mean() > 0.8
    speeds = np.linalg.norm(velocities[np.isfinite(velocities[:, 0]), :2], axis=1)
    assert (speeds < 0.05).any() and (speeds > 2.0).any()  # parked and moving agents
    categories = {nusc.get("category", i["category_token"])["name"] for i in nusc.instance}
    assert {"vehicle.car", "human.pedestrian.adult"} <= categories


def test_camera_pixels_see_the_class_of_the_first_occupied_voxel(synthetic_dataset, nusc):
    rng = np.random.default_rng(0)
    grid = DEFAULT_GRID
    agree = total = 0
    for scene, sample in list(_keyframes(nusc))[1::3]:
        index = synthetic_dataset.scenes.index(scene["name"])
        world = scene_world_for(synthetic_dataset.seed, index, synthetic_dataset.samples_per_scene)
        gt = _labels(synthetic_dataset.root, "openocc_v2", scene["name"], sample["token"])["semantics"]
        _, keyframe_ego2global, _, _ = _sensor_to_global(nusc, sample["data"]["LIDAR_TOP"])
        for channel in CAMERAS:
            cam2global, _, calib, data = _sensor_to_global(nusc, sample["data"][channel])
            start_us = nusc.get("sample", scene["first_sample_token"])["timestamp"]
            t = (data["timestamp"] - start_us) * 1e-6
            render = render_camera(world, world.boxes(t), cam2global, np.array(calib["camera_intrinsic"]),
                                   data["width"], data["height"])
            label, depth = render["label"], render["depth"]
            # interior pixels (same class in a 5x5 window) of nearby surfaces
            pad = np.pad(label, 2, mode="edge")
            same = np.ones_like(label, dtype=bool)
            for dy in range(5):
                for dx in range(5):
                    same &= pad[dy:dy + label.shape[0], dx:dx + label.shape[1]] == label
            rows, cols = np.nonzero(same & (label != FREE) & (depth < 25.0))
            pick = rng.choice(len(rows), size=min(40, len(rows)), replace=False)
            to_keyframe = invert_transform(keyframe_ego2global) @ cam2global
            intrinsics_inv = np.linalg.inv(np.array(calib["camera_intrinsic"]))
            for r, c in zip(rows[pick], cols[pick]):
                ray = to_keyframe[:3, :3] @ (intrinsics_inv @ np.array([c + 0.5, r + 0.5, 1.0]))
                ray /= np.linalg.norm(ray)
                steps = np.arange(0.0, 40.0, 0.02)
                points = to_keyframe[:3, 3] + steps[:, None] * ray
                idx = grid.point_to_index(points)
                inside = grid.contains_index(idx)
                classes = np.full(len(steps), FREE)
                classes[inside] = gt[idx[inside, 0], idx[inside, 1], idx[inside, 2]]
                hit = np.flatnonzero(classes != FREE)
                total += 1
                agree += bool(len(hit)) and classes[hit[0]] == label[r, c]
    assert total > 100
    assert agree / total > 0.9, f"{agree}/{total} pixels agree with the voxels"


def test_lidar_points_occupied_voxels_flow_and_label_files(synthetic_dataset, nusc):
    from nuscenes.utils.data_classes import LidarPointCloud

    grid = DEFAULT_GRID
    flow_classes = [OPENOCC_V2_CLASSES.index(n) for n in FLOW_CLASS_NAMES]
    checked_agents = 0
    for scene, sample in _keyframes(nusc):
        labels = _labels(synthetic_dataset.root, "openocc_v2", scene["name"], sample["token"])
        occ3d = _labels(synthetic_dataset.root, "gts", scene["name"], sample["token"])
        semantics, flow, visible = labels["semantics"], labels["flow"], labels["visible"]
        assert semantics.shape == DEFAULT_GRID.shape and semantics.dtype == np.uint8
        assert flow.shape == (*DEFAULT_GRID.shape, 2) and flow.dtype == np.float32
        np.testing.assert_array_equal(occ3d["semantics"], openocc_to_occ3d_lut()[semantics])
        assert occ3d["mask_camera"].any() and occ3d["mask_lidar"].any()
        # static world has no flow; the classes of the world are all present over the scene
        assert not np.abs(flow[~np.isin(semantics, flow_classes)]).any()
        # every LiDAR point lies in an occupied, visible voxel
        lidar2global, ego2global, _, data = _sensor_to_global(nusc, sample["data"]["LIDAR_TOP"])
        cloud = LidarPointCloud.from_file(os.path.join(synthetic_dataset.root, data["filename"])).points[:3].T
        points = cloud @ (invert_transform(ego2global) @ lidar2global)[:3, :3].T + \
            (invert_transform(ego2global) @ lidar2global)[:3, 3]
        idx = grid.point_to_index(points)
        inside = grid.contains_index(idx)
        idx = idx[inside]
        occupied = semantics[idx[:, 0], idx[:, 1], idx[:, 2]] != FREE
        assert inside.sum() > 3000 and occupied.mean() > 0.99
        assert visible[idx[:, 0], idx[:, 1], idx[:, 2]].mean() > 0.99
        # free voxels between the sensor and its hits are visible too
        assert (visible & (semantics == FREE)).sum() > (visible & (semantics != FREE)).sum()
        # an agent's voxels carry its velocity (the devkit's estimate from the annotations)
        rotation = invert_transform(ego2global)[:2, :2]
        for ann_token in sample["anns"]:
            ann = nusc.get("sample_annotation", ann_token)
            name = ann["category_name"]
            if name.startswith("movable_object"):
                continue
            velocity = nusc.box_velocity(ann_token)[:2]
            box_ego = invert_transform(ego2global) @ np.append(ann["translation"], 1.0)
            centre = grid.point_to_index(box_ego[:3])
            if not np.isfinite(velocity).all() or not grid.contains_index(centre) or not ann["prev"] or \
                    not ann["next"]:
                continue
            cell = semantics[centre[0], centre[1], centre[2]]
            if cell not in flow_classes:
                continue  # covered by something else at its centre
            expected = rotation @ velocity
            np.testing.assert_allclose(flow[centre[0], centre[1], centre[2]], expected, atol=0.3 + 0.05 *
                                       np.linalg.norm(expected))
            checked_agents += 1
    assert checked_agents > 10


def test_cameras_from_the_tables_reproduce_the_written_images(synthetic_dataset, nusc):
    import cv2

    scene = sorted(nusc.scene, key=lambda s: s["name"])[0]
    sample = nusc.get("sample", nusc.get("sample", scene["first_sample_token"])["next"])
    world = scene_world_for(synthetic_dataset.seed, 0, synthetic_dataset.samples_per_scene)
    start_us = nusc.get("sample", scene["first_sample_token"])["timestamp"]
    for channel in ("CAM_FRONT", "CAM_BACK_LEFT"):
        cam2global, _, calib, data = _sensor_to_global(nusc, sample["data"][channel])
        written = cv2.imread(os.path.join(synthetic_dataset.root, data["filename"]))[:, :, ::-1].astype(np.float64)
        t = (data["timestamp"] - start_us) * 1e-6
        K = np.array(calib["camera_intrinsic"])

        def error(pose):
            image = render_camera(world, world.boxes(t), pose, K, data["width"], data["height"])["image"]
            return np.abs(image.astype(np.float64) - written).mean()

        yaw = np.deg2rad(2.0)
        turn = np.eye(4)
        turn[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
        exact = error(cam2global)
        assert exact < 4.0  # JPEG loss only
        assert error(turn @ cam2global) > 2 * exact + 2.0  # a 2 degree error shows


def _digest(root):
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def test_same_seed_same_bytes_any_workers_other_seed_other_world(tmp_path):
    kwargs = dict(version="v1.0-mini", scenes=1, samples_per_scene=2, image_size=(64, 32))
    a = generate_synthetic_dataset(str(tmp_path / "a"), seed=5, workers=1, **kwargs)
    b = generate_synthetic_dataset(str(tmp_path / "b"), seed=5, workers=2, **kwargs)
    c = generate_synthetic_dataset(str(tmp_path / "c"), seed=6, workers=1, **kwargs)
    assert a["bytes"] > 0 and _digest(a["root"]) == _digest(b["root"])
    assert _digest(a["root"]) != _digest(c["root"])
    first = [os.path.join(root, "samples", "LIDAR_TOP", sorted(os.listdir(os.path.join(root, "samples", "LIDAR_TOP")))[0])
             for root in (a["root"], c["root"])]
    pa, pc = (np.fromfile(path, dtype=np.float32) for path in first)
    assert pa.shape != pc.shape or not np.array_equal(pa, pc)  # another world, not only other names


def test_output_folder_rules_sweeps_and_failures_leave_nothing(tmp_path, monkeypatch):
    from nuscenes.nuscenes import NuScenes

    from voxelsplat.synthetic import writer

    root = tmp_path / "data"
    kwargs = dict(scenes=1, samples_per_scene=2, image_size=(48, 24), seed=1)
    info = generate_synthetic_dataset(str(root), sweeps=2, **kwargs)
    nusc = NuScenes(version="v1.0-mini", dataroot=str(root), verbose=False)
    lidar = [d for d in nusc.sample_data if d["channel"] == "LIDAR_TOP"]
    assert sum(not d["is_key_frame"] for d in lidar) == 2 and len(lidar) == 4
    chain = sorted(lidar, key=lambda d: d["timestamp"])
    assert all(chain[i]["next"] == chain[i + 1]["token"] for i in range(3))
    assert all(os.path.isfile(os.path.join(str(root), d["filename"])) for d in lidar)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_synthetic_dataset(str(root), **kwargs)
    before = info["bytes"]
    # a failure while rendering: the old dataset stays, no staging folder is left
    def broken(task):
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(writer, "_render_frame", broken)
    with pytest.raises(RuntimeError, match="renderer failed"):
        generate_synthetic_dataset(str(root), overwrite=True, **kwargs)
    assert sorted(os.listdir(tmp_path)) == ["data"]
    assert sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs) == before
    with pytest.raises(ValueError, match="at most 10 scenes"):
        synthetic_scene_names("v1.0-mini", 11)
    with pytest.raises(ValueError, match="sweeps"):
        generate_synthetic_dataset(str(tmp_path / "x"), sweeps=10, **kwargs)
    assert synthetic_scene_names("v1.0-mini", 2) == ["scene-0061", "scene-0103"]


def test_command_line_tool(tmp_path, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                        "make_synthetic_dataset.py")
    spec = importlib.util.spec_from_file_location("make_synthetic_dataset", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "cli"
    assert tool.main(["--output", str(out), "--scenes", "1", "--samples-per-scene", "1", "--image-size", "48", "24",
                      "--workers", "1"]) == 0
    assert "samples/s" in capsys.readouterr().out
    assert os.path.isfile(out / "v1.0-mini" / "sample.json")
    assert tool.main(["--output", str(out), "--scenes", "1", "--samples-per-scene", "1"]) == 2
    assert "overwrite" in capsys.readouterr().err
