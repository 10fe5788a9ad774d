"""The procedural world: leaving object classes out, and the vehicles' lamps that show their heading."""
import numpy as np
import pytest

from voxelsplat.synthetic import generate_synthetic_dataset
from voxelsplat.synthetic.render import cast_rays, shade
from voxelsplat.synthetic.world import CLASS, OMITTABLE_CLASSES, BoxSet, build_world

SMALL = ("pedestrian", "bicycle", "motorcycle", "traffic_cone", "barrier")


def _agent_rows(agents):
    return [(a.kind, a.size, a.s0, a.speed, a.colour, a.seed) for a in agents]


@pytest.mark.parametrize("scene_index", [0, 3, 7])
def test_omit_classes_removes_exactly_those_boxes_and_keeps_the_rest_of_the_world(scene_index):
    full = build_world(11, scene_index, 9.6)
    thin = build_world(11, scene_index, 9.6, omit_classes=list(reversed(SMALL)))
    omitted = [CLASS[c] for c in SMALL]
    # the full world has some of them, so the check below removes something
    assert np.isin(full.boxes(0.0).labels, omitted).any()
    assert _agent_rows(thin.agents) == _agent_rows([a for a in full.agents if a.kind not in SMALL])
    keep = ~np.isin(full.static.labels, omitted)
    for field in ("centers", "sizes", "yaw", "labels", "colours", "seeds"):
        np.testing.assert_array_equal(getattr(thin.static, field), getattr(full.static, field)[keep])
    np.testing.assert_array_equal(thin.static.ids, -1 - np.arange(keep.sum()))
    np.testing.assert_array_equal(thin.ground.labels, full.ground.labels)
    np.testing.assert_array_equal(thin.ego_pose(4.2), full.ego_pose(4.2))
    for t in (0.0, 5.0, 9.5):
        boxes = thin.boxes(t)
        assert not np.isin(boxes.labels, omitted).any()
        np.testing.assert_array_equal(boxes.ids[boxes.ids >= 0], np.arange(len(thin.agents)))


def test_omit_classes_refuses_what_is_not_an_object_class(tmp_path):
    for bad in (["pedestrians"], ["driveable_surface"], ["manmade"], ["free"]):
        with pytest.raises(ValueError, match=bad[0]):
            build_world(0, 0, 5.0, omit_classes=bad)
    out = tmp_path / "data"
    with pytest.raises(ValueError, match="cars"):
        generate_synthetic_dataset(str(out), scenes=1, samples_per_scene=1, image_size=(32, 16), omit_classes=["cars"])
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert set(SMALL) <= set(OMITTABLE_CLASSES) and "car" in OMITTABLE_CLASSES


def _one_vehicle(label, size, yaw):
    return BoxSet(np.array([[0.0, 0.0, size[2] / 2]]), np.array([size], dtype=float), np.array([yaw]),
                  np.array([CLASS[label]]), np.array([[0.5, 0.5, 0.55]]), np.zeros((1, 2)), np.array([3]),
                  np.array([0]))


def _shade_points(world, boxes, origin, points_local):
    """Colours of the rays from ``origin`` to points given in the box frame of box 0."""
    c, s = np.cos(boxes.yaw[0]), np.sin(boxes.yaw[0])
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    points = points_local @ rot.T + boxes.centers[0]
    directions = points - origin
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    hits = cast_rays(world, boxes, origin, directions)
    assert (hits.box == 0).all()
    return shade(world, boxes, hits, origin, directions), hits


@pytest.mark.parametrize("label", ["car", "truck", "bus"])
def test_vehicle_front_shows_white_lamps_and_rear_red_lamps(label):
    rng = np.random.default_rng(CLASS[label])
    world = build_world(0, 0, 5.0)
    length, width, height = {"car": (4.5, 1.9, 1.6), "truck": (7.0, 2.5, 3.0), "bus": (11.0, 2.9, 3.4)}[label]
    for yaw in rng.uniform(-np.pi, np.pi, 3):
        boxes = _one_vehicle(label, (length, width, height), yaw)
        heading = np.array([np.cos(yaw), np.sin(yaw), 0.0])
        # points on the front/rear face in the lamp band (0.28-0.48 of the height), near both sides
        y = rng.uniform(0.25, 0.45, 8) * width * rng.choice([-1, 1], 8)
        z = rng.uniform(0.30, 0.46, 8) * height - height / 2
        colours = {}
        for end in (1, -1):
            origin = boxes.centers[0] + end * (length / 2 + 6.0) * heading
            origin[2] = 0.3 * height
            local = np.stack([np.full(8, end * length / 2), y, z], axis=1)
            colour, hits = _shade_points(world, boxes, origin, local)
            assert (hits.axis == 0).all() and (hits.sign == end).all()
            colours[end] = colour
        front, rear = colours[1], colours[-1]
        assert (front.min(axis=1) > 0.3).all(), front  # white: every channel bright
        assert (rear[:, 0] > 4 * rear[:, 1]).all() and (rear[:, 0] > 0.3).all(), rear  # red
        # outside the band both ends show the body colour alike
        origin = boxes.centers[0] + (length / 2 + 6.0) * heading
        body_front, _ = _shade_points(world, boxes, origin, np.array([[length / 2, 0.0, 0.3 * height]]))
        assert abs(body_front[0, 0] - body_front[0, 1]) < 0.2


def test_generator_and_tools_pass_omit_classes_and_one_way_on(tmp_path):
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import run_demo

    info = generate_synthetic_dataset(str(tmp_path / "d"), scenes=1, samples_per_scene=2, image_size=(48, 24),
                                      seed=4, omit_classes=["pedestrian", "traffic_cone"], one_way=True)
    tables = os.path.join(info["root"], info["version"])
    with open(os.path.join(tables, "scene.json")) as f:
        assert f.read().count("without pedestrian, traffic_cone, one-way main road") == 1
    with open(os.path.join(tables, "category.json")) as f:
        names = {c["token"]: c["name"] for c in json.load(f)}
    with open(os.path.join(tables, "instance.json")) as f:
        categories = {names[i["category_token"]] for i in json.load(f)}
    assert categories and not categories & {"human.pedestrian.adult", "movable_object.trafficcone"}
    # the demo's dataset marker names the omitted classes only when there are some (older markers stay valid)
    plain = run_demo.parse_args(["--data-dir", str(tmp_path / "x")])
    assert not {"omit_classes", "one_way_traffic"} & set(run_demo.dataset_settings(plain))
    thin = run_demo.parse_args(["--data-dir", str(tmp_path / "x"), "--omit-classes", "barrier", "pedestrian",
                                "--one-way-traffic", "--models", "fbocc_tiny"])
    assert run_demo.dataset_settings(thin)["omit_classes"] == ["barrier", "pedestrian"]
    assert run_demo.dataset_settings(thin)["one_way_traffic"] is True


def _heading_agreement(world, t=2.0):
    """Cosine between each moving agent's velocity and the main road's direction at the nearest
    centreline point, for the agents within the main road's carriageway."""
    road = world.roads[0]
    s = np.arange(0.0, road.length, 0.5)
    x, y, h = road.pose(s)
    cos = []
    for agent in world.agents:
        if agent.speed <= 0:
            continue
        ax, ay, _, vx, vy = agent.state(t)
        d = np.hypot(x - ax, y - ay)
        i = int(np.argmin(d))
        if d[i] < 6.0:
            cos.append((vx * np.cos(h[i]) + vy * np.sin(h[i])) / agent.speed)
    return np.array(cos)


@pytest.mark.parametrize("scene_index", [0, 2, 3])
def test_one_way_traffic_sends_the_main_roads_traffic_the_egos_way(scene_index):
    two = build_world(3, scene_index, 9.6)
    one = build_world(3, scene_index, 9.6, one_way=True)
    # the same draws: the same vehicles and speeds, except the few that the ego's body now meets
    # (or no longer meets) on the changed lanes and that are therefore dropped
    keys = lambda w: {(a.kind, a.size, a.speed, a.colour, a.seed) for a in w.agents}  # noqa: E731
    assert len(keys(one) & keys(two)) >= 0.85 * max(len(one.agents), len(two.agents))
    np.testing.assert_array_equal(one.ego_pose(3.0), two.ego_pose(3.0))
    np.testing.assert_array_equal(one.static.centers, two.static.centers)
    cos_two, cos_one = _heading_agreement(two), _heading_agreement(one)
    assert (cos_two < -0.9).sum() >= 4  # two-way: oncoming traffic
    assert len(cos_one) >= len(cos_two) - 2 and (cos_one > 0.5).mean() > 0.95
