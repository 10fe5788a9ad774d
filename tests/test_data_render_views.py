"""Render views of adjacent keyframes: poses in the augmented current ego frame, cameras
looking forward (+z), out-of-scene keyframes replaced by the current one (released) or the
nearest, times from the camera timestamps."""
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog

from voxelsplat.data.build import SceneSequenceDataset
from voxelsplat.data.datasets import register_nuscenes_occupancy
from voxelsplat.data.mapper import TemporalDatasetMapper
from voxelsplat.structures import DEFAULT_GRID, occupancy_metadata
from voxelsplat.structures.sample_fields import check_sample

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


# ------------------------------------------------------------------- adjacent keyframes' own GT
def _adjacent_gt_dataset(records, name, limit, flip_x_prob=1.0):
    mapper = TemporalDatasetMapper(True, (176, 64), bda_rotation_range=(-40, 40), bda_scale_range=(0.9, 1.1),
                                   bda_flip_x_prob=flip_x_prob, bda_flip_y_prob=0.5, load_lidar_depth=False,
                                   dataset_name=name,
                                   regularizer=dict(num_gaussians=500, frame_offsets=OFFSETS, render_scale=0.25,
                                                    adjacent_gt_gaussians=limit))
    return SceneSequenceDataset(records, mapper)


@pytest.fixture(scope="module")
def masked_records(synthetic_dataset, tmp_path_factory):
    """The synthetic dataset registered with a separate ray mask (random, unlike the labels'
    own ``visible``) so that the mask the adjacent points obey is the dataset's one."""
    import os

    probe = register_nuscenes_occupancy(f"test_adjgt_probe_{uuid.uuid4().hex[:8]}", synthetic_dataset.root,
                                        synthetic_dataset.version, "all", cache_dir=str(tmp_path_factory.mktemp("c")))
    mask_root = tmp_path_factory.mktemp("ray_mask")
    rng = np.random.default_rng(11)
    for record in DatasetCatalog.get(probe):
        folder = mask_root / record["scene_name"] / record["sample_token"]
        os.makedirs(folder)
        np.savez_compressed(folder / "labels.npz", ray_mask2=rng.random(DEFAULT_GRID.shape) < 0.5)
    name = register_nuscenes_occupancy(f"test_adjgt_{uuid.uuid4().hex[:8]}", synthetic_dataset.root,
                                       synthetic_dataset.version, "all", cache_dir=str(tmp_path_factory.mktemp("c")),
                                       visible_mask_root=str(mask_root))
    return name, DatasetCatalog.get(name)


def _own_gt(record):
    with np.load(record["gt_path"]) as labels:
        semantics, flow = labels["semantics"], labels["flow"]
    with np.load(record["visible_mask_path"]) as masks:
        visible = masks[record["visible_mask_key"]]
    return semantics, flow, visible


@pytest.mark.parametrize("limit", [10**7, 700])
def test_adjacent_gt_points_land_on_their_own_keyframes_occupied_visible_voxels(masked_records, limit):
    """Each point, taken back through the global frame into its own keyframe's ego frame,
    sits on an occupied, ray-visible voxel centre of that keyframe's labels with the same
    class, and its flow rotates back to that voxel's flow; BEV rotation, scale and flips
    included. Without a limit every candidate inside the current grid's x-y range is there."""
    from voxelsplat.structures.sample_fields import ADJACENT_GT_FIELDS

    name, records = masked_records
    dataset = _adjacent_gt_dataset(records, name, limit)
    free = occupancy_metadata("openocc_v2")["free_index"]
    flipped = moving = 0
    for index in range(len(dataset)):
        np.random.seed(100 + index)
        record = dataset.record(index)
        sample = dataset[(index, False)]
        check_sample(sample, with_regularizer=True, with_adjacent_gt=True)
        assert set(sample) >= set(ADJACENT_GT_FIELDS)
        assert sample["adjacent_gt_means"].dtype == torch.float32 and sample["adjacent_gt_flow"].dtype == torch.float32
        assert sample["adjacent_gt_classes"].dtype == torch.int64
        bda = sample["bda"].double().numpy()
        flipped += np.linalg.det(bda[:2, :2]) < 0
        frame_offsets = sample["adjacent_gt_frame_offsets"].numpy()
        # one keyframe per distinct non-zero view offset (out-of-scene views are the current one)
        assert set(frame_offsets.tolist()) == set(sample["render_frame_offsets"].tolist()) - {0}
        for offset in set(frame_offsets.tolist()):
            own = record["scene_records"][record["frame_index"] + offset]
            semantics, flow, visible = _own_gt(own)
            of_offset = frame_offsets == offset
            means = sample["adjacent_gt_means"][of_offset].double().numpy()
            assert np.all(np.abs(means[:, :2]) < 40.0)
            world = record["ego2global"] @ np.linalg.inv(bda) @ np.c_[means, np.ones(len(means))].T
            back = (np.linalg.inv(own["ego2global"]) @ world)[:3].T
            voxels = DEFAULT_GRID.point_to_index(back)
            np.testing.assert_allclose(back, DEFAULT_GRID.index_to_center(voxels), atol=2e-3)
            assert DEFAULT_GRID.contains_index(voxels).all()
            flat = np.ravel_multi_index(tuple(voxels.T), DEFAULT_GRID.shape)
            assert len(np.unique(flat)) == len(flat)  # drawn without replacement
            at = tuple(voxels.T)
            np.testing.assert_array_equal(sample["adjacent_gt_classes"][of_offset].numpy(), semantics[at])
            assert (semantics[at] != free).all() and visible[at].all()
            # flow: rotate back through the same chain (un-augment, then current ego -> own ego)
            linear = (np.linalg.inv(own["ego2global"]) @ record["ego2global"] @ np.linalg.inv(bda))[:2, :2]
            np.testing.assert_allclose(sample["adjacent_gt_flow"][of_offset].double().numpy() @ linear.T, flow[at],
                                       atol=1e-4)
            moving += int((np.abs(flow[at]).sum(-1) > 0.1).sum())
            # the candidates, counted independently: occupied and visible, inside the current x-y range
            candidates = np.argwhere((semantics != free) & visible)
            centres = DEFAULT_GRID.index_to_center(candidates)
            to_current = bda @ np.linalg.inv(record["ego2global"]) @ own["ego2global"]
            current = centres @ to_current[:3, :3].T + to_current[:3, 3]
            inside = np.all((current[:, :2] >= -40.0) & (current[:, :2] < 40.0), axis=1)
            assert 0 < inside.sum() < len(candidates)  # some fall outside the current grid: cut
            assert len(voxels) == min(limit, int(inside.sum()))
            if limit >= inside.sum():
                np.testing.assert_array_equal(np.sort(flat),
                                              np.ravel_multi_index(tuple(candidates[inside].T), DEFAULT_GRID.shape))
    assert flipped > 0 and moving > 0


def test_adjacent_gt_points_are_off_by_default_and_reproducible(dataset, masked_records):
    from voxelsplat.data.mapper import DEFAULT_REGULARIZER_OPTIONS
    from voxelsplat.structures.sample_fields import ADJACENT_GT_FIELDS

    assert DEFAULT_REGULARIZER_OPTIONS["adjacent_gt_gaussians"] == 0
    np.random.seed(3)
    assert not set(ADJACENT_GT_FIELDS) & set(dataset[(1, False)])
    name, records = masked_records
    adjacent = _adjacent_gt_dataset(records, name, 300)
    samples = []
    for _ in range(2):
        np.random.seed(4)
        samples.append(adjacent[(1, False)])
    for field in ADJACENT_GT_FIELDS:
        assert torch.equal(samples[0][field], samples[1][field])
    with pytest.raises(ValueError, match="disagree on M"):
        check_sample(dict(samples[0], adjacent_gt_flow=samples[0]["adjacent_gt_flow"][1:]), with_regularizer=True,
                     with_adjacent_gt=True)
    with pytest.raises(ValueError, match="adjacent_gt_gaussians"):
        TemporalDatasetMapper(True, (176, 64), regularizer=dict(adjacent_gt_gaussians=-1))
