"""Pictures: orientation, colours and overlays."""
import numpy as np
import pytest

from voxelsplat.structures import OPENOCC_V2_CLASSES, OccupancyGrid
from voxelsplat.utils import visualization as vis

FREE = OPENOCC_V2_CLASSES.index("free")


def test_bev_semantics_is_map_oriented_and_shows_the_top_voxel():
    rng = np.random.default_rng(0)
    sem = np.full((20, 30, 4), FREE, dtype=np.uint8)
    sem[:, :, 0] = OPENOCC_V2_CLASSES.index("driveable_surface")
    car = OPENOCC_V2_CLASSES.index("car")
    i, j = 17, 25  # far forward (+x) and far left (+y)
    sem[i, j, 1:3] = car
    image = vis.bev_semantics(sem, OPENOCC_V2_CLASSES, FREE)
    assert image.shape == (20, 30, 3)
    palette = vis.class_palette(OPENOCC_V2_CLASSES)
    # forward is up (small row), left is left (small column)
    assert tuple(image[20 - 1 - i, 30 - 1 - j]) == tuple(palette[car])
    others = np.ones((20, 30), bool)
    others[20 - 1 - i, 30 - 1 - j] = False
    assert (image[others] == palette[OPENOCC_V2_CLASSES.index("driveable_surface")]).all()
    # random grids: every pixel is the colour of the column's highest non-free voxel
    sem = rng.integers(0, 17, size=(6, 5, 4)).astype(np.uint8)
    image = vis.bev_semantics(sem, OPENOCC_V2_CLASSES, FREE)
    for x in range(6):
        for y in range(5):
            column = [c for c in sem[x, y] if c != FREE]
            expected = palette[column[-1]] if column else palette[FREE]
            assert tuple(image[5 - x, 4 - y]) == tuple(expected)


def test_flow_colours_encode_direction_and_speed():
    colors = vis.flow_to_color(np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [-10.0, 0.0], [5.0, 0.0]]), 10.0)
    assert tuple(colors[0]) == (255, 255, 255)
    assert tuple(colors[1]) == (255, 0, 0)           # +x: red
    assert colors[2][1] == 255 and colors[2][2] == 0  # +y: a quarter turn, yellow-green
    assert tuple(colors[3]) == (0, 255, 255)         # -x: cyan
    assert tuple(colors[4]) == (255, 128, 128)       # half speed: half saturation


def test_overlay_colours_the_pixel_where_an_occupied_voxel_projects():
    grid = OccupancyGrid()
    sem = np.full(grid.shape, FREE, dtype=np.uint8)
    target = np.array([150, 100, 5])  # 20 m ahead of the ego origin
    sem[tuple(target)] = OPENOCC_V2_CLASSES.index("pedestrian")
    centers = grid.voxel_centers()
    # camera at the ego origin looking forward (+x): OpenCV axes x right(-y), y down(-z), z forward(+x)
    cam2ego = np.eye(4)
    cam2ego[:3, :3] = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]], dtype=float)
    K = np.array([[100.0, 0, 80], [0, 100.0, 45], [0, 0, 1]])
    image = np.full((90, 160, 3), 100, np.uint8)
    out = vis.overlay_occupancy_on_image(image, sem, centers, K, cam2ego, OPENOCC_V2_CLASSES, FREE, alpha=1.0)
    c = centers[tuple(target)]
    u = int(np.floor(100 * (-c[1]) / c[0] + 80))
    v = int(np.floor(100 * (-c[2]) / c[0] + 45))
    assert tuple(out[v, u]) == tuple(vis.class_palette(OPENOCC_V2_CLASSES)[7])
    assert (out[0, 0] == 100).all()


def test_save_png_round_trips_and_rejects_bad_arrays(tmp_path):
    import cv2

    image = np.random.default_rng(1).integers(0, 255, (12, 7, 3), dtype=np.uint8)
    vis.save_png(str(tmp_path / "a.png"), image)
    back = cv2.imread(str(tmp_path / "a.png"))[..., ::-1]
    np.testing.assert_array_equal(back, image)
    with pytest.raises(ValueError, match="b.png"):
        vis.save_png(str(tmp_path / "b.png"), image.astype(np.float32))
    tiled = vis.tile_images([image, image, image], columns=2, pad=1)
    assert tiled.shape == (2 * 13 + 1, 2 * 8 + 1, 3)


def test_flow_arrows_point_where_the_voxels_move_on_the_map():
    from voxelsplat.utils.visualization import bev_flow, bev_flow_columns, draw_flow_arrows, upscale

    X, Y, Z, free = 24, 24, 4, 16
    semantics = np.full((X, Y, Z), free)
    flow = np.zeros((X, Y, Z, 2), np.float32)
    semantics[9:12, 15:18, 1] = 0
    flow[9:12, 15:18, 1] = (4.0, 0.0)  # forward: up on the map
    semantics[3, 3, 0] = 14  # a still manmade voxel
    base = upscale(bev_flow(semantics, flow, free), 4)
    assert base.shape == (4 * X, 4 * Y, 3)
    assert tuple(base[4 * (X - 1 - 3) + 1, 4 * (Y - 1 - 3) + 1]) == (170, 170, 170)  # still: grey
    arrows = draw_flow_arrows(base, bev_flow_columns(semantics, flow, free), voxel_size=OccupancyGrid().voxel_size,
                              scale=4, step=3)
    changed = np.argwhere(np.any(arrows != base, axis=-1))
    assert len(changed) > 0
    # the arrow starts in the moving block's columns and extends upwards (to smaller rows)
    block_rows = (4 * (X - 12), 4 * (X - 9))
    assert changed[:, 0].min() < block_rows[0] - 10
    assert np.all((changed[:, 1] >= 4 * (Y - 18) - 4) & (changed[:, 1] <= 4 * (Y - 15) + 4))
