"""Image and BEV augmentation keep images, cameras, GT voxels, flow and LiDAR depth consistent."""
import uuid

import numpy as np
import pytest
from detectron2.data import DatasetCatalog

from voxelsplat.data import mapper as mapper_module
from voxelsplat.data.datasets import register_nuscenes_occupancy
from voxelsplat.data.lidar_depth import lidar_depth_maps
from voxelsplat.data.mapper import TemporalDatasetMapper
from voxelsplat.structures import DEFAULT_GRID, OPENOCC_V2_CLASSES
from voxelsplat.structures.sample_fields import check_sample
from voxelsplat.data.transforms import ImageAugParams, resample_voxel_grid, warp_image
from voxelsplat.utils.geometry import bda_matrix

FREE = OPENOCC_V2_CLASSES.index("free")


@pytest.fixture(scope="module")
def records(synthetic_dataset, tmp_path_factory):
    name = register_nuscenes_occupancy(f"test_aug_{uuid.uuid4().hex[:8]}", synthetic_dataset.root,
                                       synthetic_dataset.version, "all", cache_dir=str(tmp_path_factory.mktemp("c")))
    return DatasetCatalog.get(name)


def _original_size(record):
    return int(record["cameras"][0]["width"]), int(record["cameras"][0]["height"])


def _project(intrinsics, cam2ego, point):
    """Pinhole projection of an ego-frame point, float64, written out step by step."""
    cam = np.linalg.inv(np.asarray(cam2ego, np.float64)) @ np.append(point, 1.0)
    pixel = np.asarray(intrinsics, np.float64) @ cam[:3]
    return pixel[:2] / pixel[2], cam[2]


def _blob_image(size, centres, sigma=2.5):
    """Black (H, W, 3) uint8 image with white Gaussian blobs at continuous pixel ``centres``."""
    width, height = size
    u = np.arange(width) + 0.5
    v = np.arange(height) + 0.5
    image = np.zeros((height, width))
    for cu, cv in centres:
        image += np.exp(-((u[None, :] - cu) ** 2 + (v[:, None] - cv) ** 2) / (2 * sigma ** 2))
    return np.repeat((np.clip(image, 0, 1) * 255).round().astype(np.uint8)[..., None], 3, axis=-1)


def _centroid(image):
    """Intensity centroid in continuous pixel coordinates (pixel u covers [u, u+1))."""
    weight = image[..., 0].astype(np.float64)
    v, u = np.mgrid[:weight.shape[0], :weight.shape[1]]
    return np.array([(weight * (u + 0.5)).sum(), (weight * (v + 0.5)).sum()]) / weight.sum()


def test_warp_image_moves_content_where_the_aug_matrix_maps_it():
    rng = np.random.default_rng(0)
    size, output = (240, 140), (160, 96)
    checked = 0
    while checked < 12:
        params = ImageAugParams(resize=float(rng.uniform(0.35, 1.6)), crop_xy=tuple(rng.uniform(-10, 60, 2).round()),
                                flip=bool(rng.uniform() < 0.5), rotate_deg=float(rng.uniform(-8, 8)), output_size=output)
        matrix = params.matrix()
        centre = rng.uniform([20, 20], [size[0] - 20, size[1] - 20])
        target = (matrix @ np.append(centre, 1.0))[:2]
        if not (12 < target[0] < output[0] - 12 and 12 < target[1] < output[1] - 12):
            continue
        warped = warp_image(_blob_image(size, [centre], sigma=4.0), matrix, output)
        assert warped.shape == (output[1], output[0], 3) and warped.dtype == np.uint8
        np.testing.assert_allclose(_centroid(warped), target, atol=0.15)
        checked += 1


def test_augmented_cameras_see_each_point_at_the_same_image_content(records, monkeypatch):
    record = records[1]
    size = _original_size(record)
    # one 3D point per camera, 12 m in front of it, in the keyframe ego frame
    points, blobs = [], {}
    for camera in record["cameras"]:
        cam2keyego = np.linalg.inv(record["ego2global"]) @ camera["ego2global"] @ camera["cam2ego"]
        point = (cam2keyego @ np.array([0.6, -0.3, 12.0, 1.0]))[:3]
        uv, depth = _project(camera["intrinsics"], cam2keyego, point)
        assert depth > 0
        points.append(point)
        blobs[camera["image_path"]] = _blob_image(size, [uv], sigma=3.0)
    monkeypatch.setattr(mapper_module, "load_image", lambda path, token: blobs[path])

    np.random.seed(3)
    mapper = TemporalDatasetMapper(True, (int(size[0] * 1.5), int(size[1] * 1.5)), resize_range=(0.1, 0.3),
                                   crop_bottom_range=(0.0, 0.1), flip_prob=0.5, rotate_range=(-6, 6),
                                   bda_rotation_range=(-30, 30), bda_scale_range=(0.9, 1.1), load_lidar_depth=False)
    flips = set()
    for _ in range(3):
        sample = mapper(dict(record))
        bda = sample["bda"].double().numpy()
        for c in range(len(points)):
            img_aug = sample["img_aug"][c].double().numpy()
            flips.add(bool(img_aug[0, 0] < 0))
            np.testing.assert_allclose(sample["intrinsics"][c].double().numpy(),
                                       img_aug @ record["cameras"][c]["intrinsics"], rtol=1e-5, atol=1e-3)
            uv, depth = _project(sample["intrinsics"][c], sample["cam2ego"][c], (bda @ np.append(points[c], 1))[:3])
            image = sample["img"][c].permute(1, 2, 0).numpy()
            assert depth > 0 and image.max() > 100
            np.testing.assert_allclose(_centroid(image), uv, atol=0.5)
    assert flips == {True, False}


@pytest.mark.parametrize("rotation,flip_x,flip_y", [(90.0, False, False), (180.0, True, False), (-90.0, True, True),
                                                     (0.0, False, True)])
def test_bev_augmentation_moves_voxels_flow_and_cameras_together(records, rotation, flip_x, flip_y):
    record = records[2]
    size = _original_size(record)
    reference = TemporalDatasetMapper(False, size, load_lidar_depth=False)(dict(record))
    augment = TemporalDatasetMapper(True, size, resize_range=(0, 0), flip_prob=0.0, rotate_range=(0, 0),
                                    bda_rotation_range=(rotation, rotation), bda_flip_x_prob=float(flip_x),
                                    bda_flip_y_prob=float(flip_y), load_lidar_depth=False)
    sample = augment(dict(record))
    bda = sample["bda"].double().numpy()
    np.testing.assert_allclose(bda, bda_matrix(rotation, 1.0, flip_x, flip_y), atol=1e-6)
    torch_equal = np.testing.assert_array_equal
    torch_equal(sample["intrinsics"].numpy(), reference["intrinsics"].numpy())

    semantics = reference["occ_semantics"].numpy()
    rng = np.random.default_rng(int(rotation) + 360)
    occupied = np.argwhere(semantics != FREE)
    for index in occupied[rng.choice(len(occupied), size=40, replace=False)]:
        point = DEFAULT_GRID.index_to_center(index) + rng.uniform(-0.15, 0.15, size=3)  # anywhere inside the voxel
        moved = (bda @ np.append(point, 1.0))[:3]
        target = tuple(DEFAULT_GRID.point_to_index(moved))
        assert sample["occ_semantics"][target] == semantics[tuple(index)]
        assert sample["occ_visible"][target] == reference["occ_visible"][tuple(index)]
        flow = reference["occ_flow"][tuple(index)].double().numpy()
        np.testing.assert_allclose(sample["occ_flow"][target].double().numpy(), bda[:2, :2] @ flow, atol=1e-5)
        for c in range(len(record["cameras"])):
            before, depth_before = _project(reference["intrinsics"][c], reference["cam2ego"][c], point)
            after, depth_after = _project(sample["intrinsics"][c], sample["cam2ego"][c], moved)
            np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-3)
            assert depth_after == pytest.approx(depth_before, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("outside_label", ["ignore", "free"])
def test_bev_resampling_with_rotation_and_scale_matches_a_per_voxel_reference(records, outside_label):
    """Voxels brought in from outside the grid: the ignore label 255 (released) or free."""
    record = records[0]
    size = _original_size(record)
    reference = TemporalDatasetMapper(False, size, load_lidar_depth=False)(dict(record))
    np.random.seed(11)
    augment = TemporalDatasetMapper(True, size, resize_range=(0, 0), flip_prob=0.0, rotate_range=(0, 0),
                                    bda_rotation_range=(-40, 40), bda_scale_range=(0.85, 1.15), load_lidar_depth=False,
                                    bda_outside_label=outside_label)
    sample = augment(dict(record))
    check_sample(sample)
    bda = sample["bda"].double().numpy()
    assert abs(bda[0, 1]) > 1e-3  # a genuine non-axis-aligned rotation
    inverse = np.linalg.inv(bda)
    rng = np.random.default_rng(12)
    semantics, flow = reference["occ_semantics"].numpy(), reference["occ_flow"].numpy().astype(np.float64)
    shape = np.array(DEFAULT_GRID.shape)
    for index in rng.integers(0, shape, size=(400, 3)):
        centre = DEFAULT_GRID.range_min + DEFAULT_GRID.voxel_size * (index + 0.5)
        source = np.floor(((inverse @ np.append(centre, 1.0))[:3] - DEFAULT_GRID.range_min) / DEFAULT_GRID.voxel_size)
        source = source.astype(int)
        inside = bool(np.all((source >= 0) & (source < shape)))
        expected_label = semantics[tuple(source)] if inside else (255 if outside_label == "ignore" else FREE)
        expected_flow = bda[:2, :2] @ flow[tuple(source)] if inside else np.zeros(2)
        assert sample["occ_semantics"][tuple(index)] == expected_label
        np.testing.assert_allclose(sample["occ_flow"][tuple(index)].double().numpy(), expected_flow, atol=1e-5)
        assert bool(sample["occ_visible"][tuple(index)]) == (inside and bool(reference["occ_visible"][tuple(source)]))
    assert (sample["occ_semantics"] == 255).any() == (outside_label == "ignore")


def test_resample_voxel_grid_keeps_trailing_channels_and_fills_outside():
    rng = np.random.default_rng(4)
    volume = rng.normal(size=DEFAULT_GRID.shape + (3,)).astype(np.float32)
    shift = bda_matrix(0.0, 1.0)
    shift[0, 3] = 2 * DEFAULT_GRID.voxel_size  # a translation by two voxels along x
    out = resample_voxel_grid(volume, shift, DEFAULT_GRID, fill_value=-7.0)
    np.testing.assert_array_equal(out[2:], volume[:-2])
    assert (out[:2] == -7.0).all()


def test_lidar_depth_keeps_the_nearest_point_per_pixel_like_a_reference_loop():
    rng = np.random.default_rng(6)
    size = (40, 24)
    points = rng.uniform([-20, -20, -2], [20, 20, 3], size=(3000, 3))
    points = np.concatenate([points, points[:200] * 1.3])  # several points per pixel: farther copies
    cam2ego = np.stack([bda_matrix(yaw, 1.0) @ np.array([[0, 0, 1, 1.0], [-1, 0, 0, 0.2], [0, -1, 0, 1.5],
                                                         [0, 0, 0, 1]]) for yaw in (0.0, 120.0)])
    intrinsics = np.stack([np.array([[20.0, 0, 20], [0, 20.0, 12], [0, 0, 1]])] * 2)
    depth = lidar_depth_maps(points, cam2ego, intrinsics, size)
    expected = np.zeros((2, size[1], size[0]))
    for c in range(2):
        for point in points:
            (u, v), z = _project(intrinsics[c], cam2ego[c], point)
            if z > 1e-3 and 0 <= u < size[0] and 0 <= v < size[1]:
                pixel = (int(np.floor(v)), int(np.floor(u)))
                if expected[c][pixel] == 0 or z < expected[c][pixel]:
                    expected[c][pixel] = z
    assert (expected > 0).sum() > 100
    np.testing.assert_allclose(depth, expected, rtol=1e-5)


def test_mapper_lidar_depth_is_the_keyframe_sweep_in_the_augmented_images(records):
    from voxelsplat.data.loading import load_lidar_points

    record = records[3]
    size = _original_size(record)
    np.random.seed(5)
    mapper = TemporalDatasetMapper(True, size, bda_rotation_range=(-20, 20))
    sample = mapper(dict(record))
    points = load_lidar_points(record["lidar"]["path"], record["sample_token"]).astype(np.float64)
    lidar2ego = record["lidar"]["lidar2ego"]
    points_ego = points @ lidar2ego[:3, :3].T + lidar2ego[:3, 3]
    bda = sample["bda"].double().numpy()
    cam2ego_unaugmented = np.linalg.inv(bda) @ sample["cam2ego"].double().numpy()
    expected = lidar_depth_maps(points_ego, cam2ego_unaugmented, sample["intrinsics"].double().numpy(), size)
    assert (expected > 0).any()
    np.testing.assert_allclose(sample["lidar_depth"].numpy(), expected, rtol=1e-4, atol=1e-4)
