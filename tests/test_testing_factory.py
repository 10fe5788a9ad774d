"""voxelsplat.testing: fake mapped samples follow the contract on any spec, put classes and
flows where they belong, and their cameras, LiDAR and render views agree with the scene."""
import math

import numpy as np
import pytest
import torch

from voxelsplat.structures import OccupancyGrid, OccupancySpec
from voxelsplat.structures.sample_fields import MAPPER_FIELDS, REGULARIZER_FIELDS, check_sample
from voxelsplat.testing import KEYFRAME_INTERVAL_S, camera_ring, make_sample, make_sequence, street_labels
from voxelsplat.utils.geometry import project_points

SMALL_GRID = OccupancyGrid((-12.0, -9.6, -1.0, 14.0, 9.6, 2.2), 0.4)  # asymmetric, 65 x 48 x 8
SPECS = {
    "openocc_v2": OccupancySpec.for_label_set("openocc_v2"),
    "occ3d": OccupancySpec.for_label_set("occ3d"),
    "small_grid": OccupancySpec.for_label_set("openocc_v2", SMALL_GRID),
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def spec_and_sample(request):
    spec = SPECS[request.param]
    return spec, make_sample(spec, 3, image_size=(96, 40), with_regularizer=True, with_camera_mask=True,
                             num_lidar_origins=3, num_gaussians=900, render_frame_offsets=(-1, 0, 1))


def test_samples_follow_the_contract_with_the_specs_grid_and_label_set(spec_and_sample):
    spec, sample = spec_and_sample
    check_sample(sample, with_regularizer=True)
    assert set(MAPPER_FIELDS) | set(REGULARIZER_FIELDS) | {"occ_mask_camera"} == set(sample)
    assert sample["gt_format"] == spec.label_set
    assert tuple(sample["occ_semantics"].shape) == spec.grid.shape and sample["occ_semantics"].dtype == torch.int64
    assert tuple(sample["occ_flow"].shape) == (*spec.grid.shape, 2) and sample["occ_flow"].dtype == torch.float32
    assert tuple(sample["occ_mask_camera"].shape) == spec.grid.shape
    assert sample["img"].dtype == torch.uint8 and tuple(sample["img"].shape) == (6, 3, 40, 96)
    assert sample["ego2global"].dtype == torch.float64
    # Gaussians: unique voxels inside the grid, 2/3 of them occupied
    indices = sample["gaussian_voxel_indices"]
    assert len(indices) == 900 and len(torch.unique(indices, dim=0)) == 900
    assert bool(spec.grid.contains_index(indices.numpy()).all())
    occupied = sample["occ_semantics"][tuple(indices.T)] != spec.free_index
    assert int(occupied.sum()) == 600
    # LiDAR origins inside the grid, the current keyframe's among them
    origins = sample["lidar_origins"]
    assert 1 <= len(origins) <= 3 and bool(spec.grid.contains_index(spec.grid.point_to_index(origins.numpy())).all())
    assert (origins[:, :2].abs().sum(-1) == 0).any()


def test_labels_use_the_specs_classes_by_name_with_free_above(spec_and_sample):
    spec, sample = spec_and_sample
    semantics = sample["occ_semantics"]
    present = {spec.class_names[c] for c in semantics.unique().tolist()}
    assert present <= set(spec.class_names)
    assert {"driveable_surface", "sidewalk", "manmade", "free"} <= present
    assert present & {spec.class_names[c] for c in spec.flow_classes}  # some vehicles
    # ground in the bottom layer everywhere and nowhere above the ground layers
    ground = torch.isin(semantics, torch.tensor([spec.class_names.index(n)
                                                 for n in ("driveable_surface", "sidewalk", "terrain")]))
    assert bool(ground[:, :, 0].all())
    ground_layers = int(ground.any(1).any(0).sum())
    assert bool(ground[:, :, :ground_layers].all()) and not ground[:, :, ground_layers:].any()
    assert float((semantics == spec.free_index).float().mean()) > 0.5
    # the ego's path (y = 0, above the ground) is free: no origin or camera inside an object
    centre_y = spec.grid.point_to_index(np.zeros(3))[1]
    ground_top = int((semantics[:, centre_y] != spec.free_index).sum(-1).min())
    assert (semantics[:, centre_y, ground_top:] == spec.free_index).all()


def test_flows_are_non_zero_only_on_flow_classes(spec_and_sample):
    spec, sample = spec_and_sample
    moving = sample["occ_flow"].abs().sum(-1) > 0
    on_flow_class = torch.isin(sample["occ_semantics"], torch.tensor(spec.flow_classes))
    assert not (moving & ~on_flow_class).any()
    if spec.has_flow:
        assert moving.any() and bool((moving == on_flow_class).all())  # every vehicle moves
        speeds = sample["occ_flow"][moving].norm(dim=-1)
        assert float(speeds.min()) >= 2.0 and float(speeds.max()) <= 8.0 * math.hypot(1.0, 0.2) + 1e-5
    else:
        assert not moving.any()


def test_labels_are_looked_up_by_name_not_by_number():
    """The same scene on a spec with the classes in another order: the same names where they were."""
    default = OccupancySpec.for_label_set("openocc_v2", SMALL_GRID)
    names = tuple(reversed(default.class_names))
    shuffled = OccupancySpec("reversed", names, free_index=names.index("free"),
                             flow_classes=tuple(names.index(default.class_names[c]) for c in default.flow_classes),
                             grid=SMALL_GRID)
    semantics, flow = street_labels(default, 11)
    reordered, reordered_flow = street_labels(shuffled, 11)
    to_shuffled = torch.tensor([names.index(n) for n in default.class_names])
    assert torch.equal(reordered, to_shuffled[semantics])
    assert torch.equal(reordered_flow, flow) and flow.abs().sum() > 0


def test_unknown_class_names_and_missing_flow_classes_are_errors_naming_them():
    spec = SPECS["small_grid"]
    with pytest.raises(KeyError, match="structure_classes.*'building'.*openocc_v2"):
        street_labels(spec, 0, structure_classes=("building",))
    no_flow = OccupancySpec("plain", ("road", "driveable_surface", "sidewalk", "terrain", "manmade", "vegetation",
                                      "free"), free_index=6, grid=SMALL_GRID, has_flow=False)
    with pytest.raises(ValueError, match="plain.*no flow classes"):
        street_labels(no_flow, 0)
    semantics, flow = street_labels(no_flow, 0, num_vehicles=0)
    assert set(semantics.unique().tolist()) <= set(range(no_flow.num_classes)) and not flow.any()
    with pytest.raises(ValueError, match="frame_index 5 outside"):
        make_sample(spec, 0, frame_index=5, num_keyframes=5)
    with pytest.raises(TypeError, match="OccupancySpec"):
        make_sample("openocc_v2", 0)


def test_camera_ring_projects_a_voxel_centre_ahead_of_each_camera_into_its_image():
    """Independent pinhole formula: x_cam = R^T (p - c) with R's columns the camera's right,
    down and forward axes in the ego frame; u = fx x / z + cx, v = fy y / z + cy. Camera n looks
    along yaw 2 pi n / N, level; a point above its axis is higher in the image (smaller v), a
    point to its left (counter-clockwise) is at smaller u."""
    spec = SPECS["small_grid"]
    width, height = 120, 48
    rig = camera_ring(5, (width, height), horizontal_fov_deg=80.0, mount_height=1.2, mount_radius=0.3)
    grid = spec.grid
    for n, (K, cam2ego) in enumerate(zip(rig["intrinsics"].double(), rig["cam2ego"].double())):
        yaw = 2 * math.pi * n / 5
        centre = cam2ego[:3, 3]
        expected_centre = torch.tensor([0.3 * math.cos(yaw), 0.3 * math.sin(yaw), 1.2], dtype=torch.float64)
        assert torch.allclose(centre, expected_centre, atol=1e-6)
        assert torch.allclose(cam2ego[:3, 2], torch.tensor([math.cos(yaw), math.sin(yaw), 0.0], dtype=torch.float64),
                              atol=1e-6)
        assert float(K[0, 0]) == pytest.approx(width / 2 / math.tan(math.radians(40.0)), rel=1e-6)

        def pixel(point):
            x, y, z = (cam2ego[:3, :3].T @ (point - centre)).tolist()
            return K[0, 0] * x / z + K[0, 2], K[1, 1] * y / z + K[1, 2], z

        ahead = centre + 6.0 * torch.tensor([math.cos(yaw), math.sin(yaw), 0.0], dtype=torch.float64)
        voxel = torch.from_numpy(grid.index_to_center(grid.point_to_index(ahead.numpy())))
        u, v, z = pixel(voxel)
        assert z > 0 and 0 <= u < width and 0 <= v < height
        assert abs(u - width / 2) < 0.5 * width and abs(v - height / 2) < 0.5 * height
        left = voxel + torch.tensor([-math.sin(yaw), math.cos(yaw), 0.0], dtype=torch.float64)
        above = voxel + torch.tensor([0.0, 0.0, 0.8], dtype=torch.float64)
        assert pixel(left)[0] < u and pixel(above)[1] < v


def test_camera_mask_is_the_union_of_the_camera_frustums():
    spec = SPECS["small_grid"]
    sample = make_sample(spec, 4, image_size=(80, 24), num_cameras=3, with_camera_mask=True)
    centres = torch.from_numpy(spec.grid.voxel_centers().reshape(-1, 3))
    expected = torch.zeros(len(centres), dtype=torch.bool)
    for K, cam2ego in zip(sample["intrinsics"].double(), sample["cam2ego"].double()):
        uv, depth = project_points(K, torch.linalg.inv(cam2ego), centres)
        expected |= (depth > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < 80) & (uv[:, 1] >= 0) & (uv[:, 1] < 24)
    mask = sample["occ_mask_camera"].reshape(-1)
    assert mask.dtype == torch.bool and 0.1 < float(mask.float().mean()) < 0.9  # 3 narrow cameras: gaps
    assert int((mask != expected).sum()) <= 1e-4 * len(mask)  # float32 rounding at the image borders


def test_render_views_are_the_rig_at_scale_moved_with_the_ego():
    spec = SPECS["small_grid"]
    sample = make_sample(spec, 5, image_size=(128, 48), camera_image_size=(256, 96), num_cameras=4,
                         with_regularizer=True, render_scale=0.25, render_frame_offsets=(-1, 0, 2), ego_speed=3.0)
    assert sample["render_image_size"] == (64, 24)
    assert sample["render_frame_offsets"].tolist() == [-1] * 4 + [0] * 4 + [2] * 4
    assert sample["render_time_offsets"].tolist() == pytest.approx([-KEYFRAME_INTERVAL_S] * 4 + [0.0] * 4
                                                                    + [2 * KEYFRAME_INTERVAL_S] * 4)
    # input images at half the camera resolution: the same point at half the pixel coordinates
    torch.testing.assert_close(sample["img_aug"][0], torch.diag(torch.tensor([0.5, 0.5, 1.0])))
    point = torch.tensor([[9.0, 1.5, 0.4]], dtype=torch.float64)
    cam2ego, intrinsics = sample["cam2ego"].double(), sample["intrinsics"].double()
    seen = 0
    for n in range(4):
        x_cam = cam2ego[n, :3, :3].T @ (point[0] - cam2ego[n, :3, 3])
        if x_cam[2] <= 0:
            continue
        seen += 1
        image_uv = (intrinsics[n] @ (x_cam / x_cam[2]))[:2]
        for view, offset in ((n + 4, 0), (n, -1), (n + 8, 2)):
            viewmat, K = sample["render_viewmats"][view].double(), sample["render_intrinsics"][view].double()
            camera = viewmat[:3, :3] @ point[0] + viewmat[:3, 3]
            render_uv = (K @ (camera / camera[2]))[:2]
            # the ego (and its cameras) moved offset * 0.5 s * 3 m/s along x: a static point seen from
            # there is the point moved back by that much seen from here
            moved = point[0] - torch.tensor([offset * KEYFRAME_INTERVAL_S * 3.0, 0.0, 0.0], dtype=torch.float64)
            x_moved = cam2ego[n, :3, :3].T @ (moved - cam2ego[n, :3, 3])
            expected = (intrinsics[n] @ (x_moved / x_moved[2]))[:2] * 0.5  # input (128 px) -> render (64 px)
            torch.testing.assert_close(render_uv, expected, rtol=0, atol=1e-4)
            if offset == 0:
                torch.testing.assert_close(render_uv, image_uv * 0.5, rtol=0, atol=1e-4)
    assert seen >= 1


def test_lidar_depth_lands_on_occupied_voxels():
    """Every LiDAR pixel, back-projected at its depth, falls next to an occupied voxel."""
    spec = SPECS["small_grid"]
    sample = make_sample(spec, 8, image_size=(160, 64))
    occupied = sample["occ_semantics"] != spec.free_index
    near_occupied = torch.nn.functional.max_pool3d(occupied[None, None].float(), 3, 1, 1)[0, 0] > 0
    hits = 0
    for depth, K, cam2ego in zip(sample["lidar_depth"], sample["intrinsics"].double(), sample["cam2ego"].double()):
        rows, cols = depth.nonzero(as_tuple=True)
        z = depth[rows, cols].double()
        rays = torch.linalg.solve(K, torch.stack([cols + 0.5, rows + 0.5, torch.ones_like(z)]).double())
        points = (cam2ego[:3, :3] @ (rays * z) + cam2ego[:3, 3:]).T
        index = torch.from_numpy(spec.grid.point_to_index(points.numpy()))
        index = torch.minimum(index.clamp(min=0), torch.tensor(spec.grid.shape) - 1)  # edge voxels' points
        assert bool(near_occupied[tuple(index.T)].all())
        hits += len(z)
    assert hits > 500


def test_seeds_are_reproducible_and_different_seeds_differ():
    spec = SPECS["small_grid"]
    options = dict(image_size=(64, 32), with_regularizer=True, with_camera_mask=True, render_frame_offsets=(0, 1))
    first, again, other = make_sample(spec, 21, **options), make_sample(spec, 21, **options), \
        make_sample(spec, 22, **options)
    assert set(first) == set(again)
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, again[key]), key
        else:
            assert value == again[key], key
    for key in ("occ_semantics", "img", "lidar_depth", "gaussian_voxel_indices"):
        assert not torch.equal(first[key], other[key]), key


def test_sequences_chain_tokens_times_and_ego_poses():
    frames = make_sequence(SPECS["small_grid"], 30, num_frames=3, image_size=(64, 32), ego_speed=6.0,
                           scene_token="street")
    assert [f["sample_token"] for f in frames] == ["sample30", "sample31", "sample32"]
    assert [f["prev_sample_token"] for f in frames] == ["", "sample30", "sample31"]
    assert [f["sequence_start"] for f in frames] == [True, False, False]
    assert [f["frame_index"] for f in frames] == [0, 1, 2]
    assert {f["scene_token"] for f in frames} == {"street"}
    assert np.diff([f["timestamp"] for f in frames]).tolist() == [int(KEYFRAME_INTERVAL_S * 1e6)] * 2
    assert [float(f["ego2global"][0, 3]) for f in frames] == pytest.approx([0.0, 3.0, 6.0])
