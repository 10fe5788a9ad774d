"""Render views of adjacent keyframes: poses in the augmented current ego frame, cameras
looking forward (+z), out-of-scene keyframes replaced by the current one (released) or the
nearest, times from the camera timestamps."""
import uuid

import numpy as np
import pytest
from detectron2.data import DatasetCatalog

from voxelsplat.data.build import SceneSequenceDataset
from voxelsplat.data.datasets import register_nuscenes_occupancy
from voxelsplat.data.mapper import TemporalDatasetMapper
from voxelsplat.data.occupancy_meta import DEFAULT_GRID
from voxelsplat.data.sample_fields import check_sample

OFFSETS = (-2, -1, 0, 1, 2, 3)


@pytest.fixture(scope="module")
def dataset(synthetic_dataset, tmp_path_factory):
    name = register_nuscenes_occupancy(f"test_views_{uuid.uuid4().hex[:8]}", synthetic_dataset.root,
                                       synthetic_dataset.version, "all", cache_dir=str(tmp_path_factory.mktemp("c")))
    mapper = TemporalDatasetMapper(True, (176, 64), bda_rotation_range=(-25, 25), bda_scale_range=(0.9, 1.1),
                                   load_lidar_depth=False, dataset_name=name,
                                   regularizer=dict(num_gaussians=2000, frame_offsets=OFFSETS, render_scale=0.25))
    return SceneSequenceDataset(DatasetCatalog.get(name), mapper)


def _camera2global(camera):
    # global <- camera's ego at its timestamp <- camera (OpenCV)
    return np.asarray(camera["ego2global"], np.float64) @ np.asarray(camera["cam2ego"], np.float64)


def test_a_voxel_seen_by_a_next_frame_camera_projects_where_that_camera_sees_it(dataset):
    np.random.seed(0)
    record = dataset.record(0)
    assert record["num_frames"] >= 2
    sample = dataset[(0, True)]
    check_sample(sample, with_regularizer=True)
    bda = sample["bda"].double().numpy()
    num_cameras = len(record["cameras"])
    next_record = record["scene_records"][1]
    width, height = (int(record["cameras"][0]["width"]), int(record["cameras"][0]["height"]))
    assert sample["render_image_size"] == (round(width * 0.25), round(height * 0.25))
    for c, camera in enumerate(next_record["cameras"]):
        view = OFFSETS.index(1) * num_cameras + c
        assert int(sample["render_frame_offsets"][view]) == 1
        # a voxel centre 10 m in front of camera c of frame t+1, slightly off its axis
        world = _camera2global(camera) @ np.array([0.8, 0.4, 10.0, 1.0])
        ego = np.linalg.inv(record["ego2global"]) @ world
        voxel = DEFAULT_GRID.point_to_index(ego[:3])
        centre = DEFAULT_GRID.index_to_center(voxel)
        # where the camera sees the centre: through the global frame, at render resolution
        in_camera = np.linalg.inv(_camera2global(camera)) @ record["ego2global"] @ np.append(centre, 1.0)
        expected_uv = (np.asarray(camera["intrinsics"]) @ in_camera[:3])[:2] / in_camera[2] * 0.25
        # through the attached view, from the augmented current ego frame
        viewmat = sample["render_viewmats"][view].double().numpy()
        cam = viewmat @ bda @ np.append(centre, 1.0)
        assert cam[2] > 5.0  # in front of the camera: cameras look along +z
        uv = (sample["render_intrinsics"][view].double().numpy() @ cam[:3])[:2] / cam[2]
        np.testing.assert_allclose(uv, expected_uv, atol=1e-3)
        assert 0 <= uv[0] < width * 0.25 and 0 <= uv[1] < height * 0.25
        # and a point behind the camera is behind it (no flipped, backward-looking views)
        behind = _camera2global(camera) @ np.array([0.0, 0.0, -10.0, 1.0])
        behind_aug = bda @ np.linalg.inv(record["ego2global"]) @ behind
        assert (viewmat @ behind_aug)[2] < 0


def test_views_place_each_camera_in_the_augmented_frame_and_times_follow_timestamps(dataset):
    np.random.seed(1)
    record = dataset.record(1)
    sample = dataset[(1, False)]
    bda = sample["bda"].double().numpy()
    scale = np.cbrt(np.linalg.det(bda[:3, :3]))
    num_cameras = len(record["cameras"])
    for view, viewmat in enumerate(sample["render_viewmats"].double().numpy()):
        offset = int(sample["render_frame_offsets"][view])
        requested = OFFSETS[view // num_cameras]
        target = record["frame_index"] + requested
        if not 0 <= target < record["num_frames"]:
            target = record["frame_index"]
        assert offset == target - record["frame_index"]
        camera = record["scene_records"][target]["cameras"][view % num_cameras]
        # the view maps the camera's own centre to the origin and its optical axis to +z
        centre = bda @ np.linalg.inv(record["ego2global"]) @ _camera2global(camera) @ np.array([0, 0, 0, 1.0])
        ahead = bda @ np.linalg.inv(record["ego2global"]) @ _camera2global(camera) @ np.array([0, 0, 1, 1.0])
        np.testing.assert_allclose((viewmat @ centre)[:3], 0, atol=1e-3)
        # 1 m ahead of the real camera: metric depth 1 even in a scaled BEV-augmented world
        np.testing.assert_allclose((viewmat @ ahead)[:3], [0, 0, 1], atol=1e-6)
        np.testing.assert_allclose(np.linalg.det(viewmat[:3, :3]), scale ** -3, rtol=1e-5)
        assert float(sample["render_time_offsets"][view]) == pytest.approx(
            (camera["timestamp"] - record["timestamp"]) * 1e-6, abs=1e-6)
        np.testing.assert_allclose(sample["render_intrinsics"][view].numpy(), np.diag([0.25, 0.25, 1.0]) @
                                   camera["intrinsics"], rtol=1e-6)


def test_offsets_are_clamped_at_the_scene_ends(dataset):
    np.random.seed(2)
    last = max(range(len(dataset)), key=lambda i: (dataset.record(i)["scene_token"] == dataset.record(0)["scene_token"],
                                                    dataset.record(i)["frame_index"]))
    record = dataset.record(last)
    assert record["frame_index"] == record["num_frames"] - 1
    sample = dataset[(last, False)]
    num_cameras = len(record["cameras"])
    offsets = sample["render_frame_offsets"].numpy().reshape(len(OFFSETS), num_cameras)
    # released rule: a keyframe beyond the scene is replaced by the current one
    expected = [o if 0 <= record["frame_index"] + o < record["num_frames"] else 0 for o in OFFSETS]
    np.testing.assert_array_equal(offsets[:, 0], expected)
    views = sample["render_viewmats"].numpy().reshape(len(OFFSETS), num_cameras, 4, 4)
    for i, o in enumerate(OFFSETS):
        if o > 0:  # beyond the last keyframe: the current (= last) keyframe's cameras again
            np.testing.assert_array_equal(views[i], views[OFFSETS.index(0)])
    # the sampled Gaussians lie in the (augmented) visible voxels
    index = sample["gaussian_voxel_indices"]
    assert len(index) == 2000
    assert sample["occ_visible"][index[:, 0], index[:, 1], index[:, 2]].all()


def test_out_of_scene_keyframes_are_the_current_one_as_released_or_the_nearest(dataset):
    from voxelsplat.data.render_views import adjacent_render_views

    record = dataset.record(1)
    assert record["frame_index"] == 1 and record["num_frames"] >= 3
    scene = record["scene_records"]
    num_cameras = len(record["cameras"])
    released = adjacent_render_views(record, scene, (-2, -1, 0, 1), np.eye(4), 0.25)
    nearest = adjacent_render_views(record, scene, (-2, -1, 0, 1), np.eye(4), 0.25, out_of_scene="nearest")
    np.testing.assert_array_equal(released["render_frame_offsets"][::num_cameras], [0, -1, 0, 1])
    np.testing.assert_array_equal(nearest["render_frame_offsets"][::num_cameras], [-1, -1, 0, 1])
    views = released["render_viewmats"].reshape(4, num_cameras, 4, 4)
    np.testing.assert_array_equal(views[0], views[2])
    with pytest.raises(ValueError, match="out_of_scene"):
        adjacent_render_views(record, scene, (0,), np.eye(4), 0.25, out_of_scene="wrap")
