"""Procedural driving world: a road network on a ground raster, static structures and moving
agents as oriented boxes, and the ego vehicle's trajectory.

Everything lives in the global frame (x, y on the ground plane z = 0, z up). A world is a
pure function of ``(seed, scene_index, duration)``; nothing here touches the disk.

- Ground: a raster (0.2 m cells) of OpenOcc v2 ground classes (driveable_surface,
  sidewalk, other_flat, terrain) plus a lane-marking layer, drawn from road centrelines.
- Static boxes: buildings and poles (manmade), trees and hedges (vegetation), barriers and
  traffic cones.
- Agents: boxes of the eight flow classes that follow paths (lanes, sidewalks, turns)
  at constant speed; a speed of 0 means parked or standing.
- Ego: follows a lane of the main road.

``omit_classes`` removes every box of the given classes from a world after it is built, so
the rest of the world (roads, structures, the other agents) is the same as without it: a
benchmark can leave out objects too small to learn in its budget and keep the label set.
``one_way=True`` makes every lane of the main road carry traffic the ego's way (the lanes on the
left of the centreline included), as on a one-way street; the same vehicles, speeds and
draws otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from voxelsplat.structures import OPENOCC_V2_CLASSES

__all__ = ["Path", "Agent", "BoxSet", "World", "build_world", "AGENT_TYPES", "GROUND_CELL", "OMITTABLE_CLASSES"]

CLASS = {name: index for index, name in enumerate(OPENOCC_V2_CLASSES)}
FREE = CLASS["free"]
GROUND_CELL = 0.2  # m, resolution of the ground raster
LANE_WIDTH = 3.5
ROAD_MARGIN = 70.0  # m of world around the ego's path

# nuScenes category, (length, width, height) mean and relative jitter, occupancy class.
AGENT_TYPES: Dict[str, Tuple[str, Tuple[float, float, float], float]] = {
    "car": ("vehicle.car", (4.6, 1.95, 1.7), 0.08),
    "truck": ("vehicle.truck", (7.0, 2.5, 3.0), 0.12),
    "trailer": ("vehicle.trailer", (10.0, 2.6, 3.6), 0.1),
    "bus": ("vehicle.bus.rigid", (11.0, 2.9, 3.4), 0.06),
    "construction_vehicle": ("vehicle.construction", (6.5, 2.8, 3.1), 0.12),
    "bicycle": ("vehicle.bicycle", (1.75, 0.6, 1.3), 0.05),
    "motorcycle": ("vehicle.motorcycle", (2.1, 0.8, 1.5), 0.06),
    "pedestrian": ("human.pedestrian.adult", (0.7, 0.65, 1.75), 0.08),
}
STATIC_CATEGORIES = {"traffic_cone": "movable_object.trafficcone", "barrier": "movable_object.barrier"}
# classes whose boxes a world can leave out (the object classes; ground, buildings and plants stay)
OMITTABLE_CLASSES = tuple(list(AGENT_TYPES) + list(STATIC_CATEGORIES))


class Path:
    """A polyline parametrised by arclength; poses beyond the ends extrapolate straight."""

    def __init__(self, points: np.ndarray):
        points = np.asarray(points, dtype=np.float64)
        keep = np.ones(len(points), dtype=bool)
        keep[1:] = np.linalg.norm(np.diff(points, axis=0), axis=1) > 1e-6
        self.points = points[keep]
        segments = np.diff(self.points, axis=0)
        self.s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(segments, axis=1))])
        self.segment_heading = np.arctan2(segments[:, 1], segments[:, 0])
        # heading at the vertices (mean of the adjacent segments), unwrapped for interpolation
        heading = np.unwrap(self.segment_heading)
        self.vertex_heading = np.concatenate([[heading[0]], 0.5 * (heading[:-1] + heading[1:]), [heading[-1]]])

    @property
    def length(self) -> float:
        return float(self.s[-1])

    def pose(self, s) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Arclength(s) -> x, y, heading (arrays)."""
        s = np.asarray(s, dtype=np.float64)
        x = np.interp(s, self.s, self.points[:, 0])
        y = np.interp(s, self.s, self.points[:, 1])
        heading = np.interp(s, self.s, self.vertex_heading)
        before, after = s < 0, s > self.length
        if np.any(before) or np.any(after):
            h0, h1 = self.vertex_heading[0], self.vertex_heading[-1]
            x = np.where(before, self.points[0, 0] + s * np.cos(h0), x)
            y = np.where(before, self.points[0, 1] + s * np.sin(h0), y)
            extra = s - self.length
            x = np.where(after, self.points[-1, 0] + extra * np.cos(h1), x)
            y = np.where(after, self.points[-1, 1] + extra * np.sin(h1), y)
            heading = np.where(before, h0, np.where(after, h1, heading))
        return x, y, heading

    def offset(self, lateral: float) -> "Path":
        """The path shifted sideways (positive = left of the direction of travel)."""
        normal = np.stack([-np.sin(self.vertex_heading), np.cos(self.vertex_heading)], axis=1)
        return Path(self.points + lateral * normal)

    def reversed(self) -> "Path":
        return Path(self.points[::-1])


@dataclass
class Agent:
    """A box moving along ``path`` at constant ``speed`` (m/s) from arclength ``s0`` at t = 0."""

    kind: str  # key of AGENT_TYPES
    size: Tuple[float, float, float]  # length, width, height (m)
    path: Path
    s0: float
    speed: float
    colour: Tuple[float, float, float]
    seed: int

    def state(self, t: float) -> Tuple[float, float, float, float, float]:
        """x, y, yaw, vx, vy (global frame, m and m/s) at time t (s)."""
        x, y, heading = self.path.pose(self.s0 + self.speed * t)
        return float(x), float(y), float(heading), self.speed * float(np.cos(heading)), self.speed * float(np.sin(heading))


@dataclass
class BoxSet:
    """Oriented boxes standing on z = z_min: centres (M, 3), sizes (M, 3) as length (along
    yaw), width, height; yaw (M,); OpenOcc class (M,); colour (M, 3) in [0, 1]; velocity
    (M, 2) global m/s; texture seed (M,); object id (M,) (agents: index into World.agents,
    static: -1 - index into the static set)."""

    centers: np.ndarray
    sizes: np.ndarray
    yaw: np.ndarray
    labels: np.ndarray
    colours: np.ndarray
    velocity: np.ndarray
    seeds: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concatenate(sets: List["BoxSet"]) -> "BoxSet":
        return BoxSet(*(np.concatenate([getattr(s, f) for s in sets]) for f in BoxSet.__dataclass_fields__))

    def select(self, keep: np.ndarray) -> "BoxSet":
        return BoxSet(*(getattr(self, f)[keep] for f in BoxSet.__dataclass_fields__))

    def corners(self) -> np.ndarray:
        """(M, 8, 3) corners in the global frame."""
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
        local = 0.5 * signs[None] * self.sizes[:, None, :]
        c, s = np.cos(self.yaw)[:, None], np.sin(self.yaw)[:, None]
        x = c * local[..., 0] - s * local[..., 1]
        y = s * local[..., 0] + c * local[..., 1]
        return np.stack([x, y, local[..., 2]], axis=-1) + self.centers[:, None, :]


@dataclass
class Ground:
    """Ground classes and lane markings on a raster; cell (r, c) covers
    x in [x0 + c*cell, ...), y in [y0 + r*cell, ...)."""

    labels: np.ndarray  # (rows, cols) uint8 OpenOcc class
    markings: np.ndarray  # (rows, cols) uint8, 1 where a lane marking is painted
    x0: float
    y0: float
    cell: float = GROUND_CELL

    def _cells(self, x: np.ndarray, y: np.ndarray):
        col = np.floor((np.asarray(x) - self.x0) / self.cell).astype(np.int64)
        row = np.floor((np.asarray(y) - self.y0) / self.cell).astype(np.int64)
        inside = (row >= 0) & (row < self.labels.shape[0]) & (col >= 0) & (col < self.labels.shape[1])
        return np.clip(row, 0, self.labels.shape[0] - 1), np.clip(col, 0, self.labels.shape[1] - 1), inside

    def label_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        row, col, inside = self._cells(x, y)
        return np.where(inside, self.labels[row, col], CLASS["terrain"]).astype(np.uint8)

    def marking_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        row, col, inside = self._cells(x, y)
        return inside & (self.markings[row, col] > 0)


@dataclass
class World:
    seed: int
    ground: Ground
    static: BoxSet
    agents: List[Agent]
    ego: Agent  # the ego's path and speed (its box is not part of the world)
    roads: List[Path] = field(default_factory=list)

    def ego_pose(self, t: float) -> np.ndarray:
        """(4, 4) ego -> global at time t (ego frame on the ground, x along the heading)."""
        x, y, yaw, _, _ = self.ego.state(t)
        c, s = np.cos(yaw), np.sin(yaw)
        pose = np.eye(4)
        pose[:2, :2] = [[c, -s], [s, c]]
        pose[:2, 3] = (x, y)
        return pose

    def agent_boxes(self, t: float) -> BoxSet:
        n = len(self.agents)
        if n == 0:
            return _empty_boxes()
        states = np.array([a.state(t) for a in self.agents], dtype=np.float64).reshape(n, 5)
        sizes = np.array([a.size for a in self.agents], dtype=np.float64)
        centers = np.stack([states[:, 0], states[:, 1], 0.5 * sizes[:, 2]], axis=1)
        return BoxSet(centers, sizes, states[:, 2], np.array([CLASS[a.kind] for a in self.agents], dtype=np.int64),
                      np.array([a.colour for a in self.agents], dtype=np.float64), states[:, 3:5],
                      np.array([a.seed for a in self.agents], dtype=np.int64), np.arange(n, dtype=np.int64))

    def boxes(self, t: float) -> BoxSet:
        """Static and agent boxes at time t."""
        return BoxSet.concatenate([self.static, self.agent_boxes(t)])


def _empty_boxes() -> BoxSet:
    z = np.zeros((0,))
    return BoxSet(np.zeros((0, 3)), np.zeros((0, 3)), z, z.astype(np.int64), np.zeros((0, 3)), np.zeros((0, 2)),
                  z.astype(np.int64), z.astype(np.int64))


# --------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------

@dataclass
class _Road:
    path: Path
    lanes: int  # per direction
    parking: Tuple[bool, bool]  # parking lane on the right / left side
    sidewalk: float  # width (m)
    junction_s: float = 0.0  # side streets: arclength of the main road where they cross it

    @property
    def curb(self) -> float:
        """Distance from the centreline to the curb (both sides): the lanes and a parking lane."""
        return self.lanes * LANE_WIDTH + 2.5 * max(self.parking)


class _StaticBuilder:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.rows: List[tuple] = []

    def add(self, x, y, z_min, length, width, height, yaw, label, colour=None):
        colour = colour if colour is not None else _jitter_colour(self.rng, label)
        self.rows.append((x, y, z_min + 0.5 * height, length, width, height, yaw, CLASS[label], *colour,
                          int(self.rng.integers(1 << 30))))

    def build(self, omit_labels=()) -> BoxSet:
        """The boxes added, without those of the class ids ``omit_labels``."""
        rows = [r for r in self.rows if r[7] not in omit_labels]
        if not rows:
            return _empty_boxes()
        a = np.array(rows, dtype=np.float64)
        n = len(a)
        return BoxSet(a[:, 0:3].copy(), a[:, 3:6].copy(), a[:, 6].copy(), a[:, 7].astype(np.int64), a[:, 8:11].copy(),
                      np.zeros((n, 2)), a[:, 11].astype(np.int64), -1 - np.arange(n, dtype=np.int64))


_BASE_COLOURS = {
    "car": (0.55, 0.1, 0.1), "truck": (0.85, 0.85, 0.8), "trailer": (0.7, 0.72, 0.75), "bus": (0.95, 0.75, 0.1),
    "construction_vehicle": (0.95, 0.6, 0.05), "bicycle": (0.1, 0.45, 0.8), "motorcycle": (0.15, 0.15, 0.2),
    "pedestrian": (0.35, 0.25, 0.5), "traffic_cone": (1.0, 0.4, 0.0), "barrier": (0.85, 0.85, 0.85),
    "manmade": (0.62, 0.55, 0.5), "vegetation": (0.18, 0.45, 0.15),
}
_CAR_PAINTS = [(0.8, 0.1, 0.1), (0.1, 0.2, 0.6), (0.9, 0.9, 0.9), (0.1, 0.1, 0.1), (0.5, 0.5, 0.55),
               (0.2, 0.5, 0.3), (0.75, 0.7, 0.5)]


def _jitter_colour(rng: np.random.Generator, label: str) -> Tuple[float, float, float]:
    if label == "car":
        base = np.array(_CAR_PAINTS[int(rng.integers(len(_CAR_PAINTS)))])
    else:
        base = np.array(_BASE_COLOURS.get(label, (0.5, 0.5, 0.5)))
    return tuple(np.clip(base * rng.uniform(0.8, 1.15) + rng.normal(0, 0.04, 3), 0.02, 1.0))


def _main_centreline(rng: np.random.Generator, length: float, start: np.ndarray, heading0: float) -> Path:
    s = np.arange(0.0, length + 1.0, 1.0)
    amplitude = rng.choice([0.0, rng.uniform(0.1, 0.45)], p=[0.3, 0.7])
    period = rng.uniform(180.0, 400.0)
    phase = rng.uniform(0, 2 * np.pi)
    heading = heading0 + amplitude * (np.sin(2 * np.pi * s / period + phase) - np.sin(phase))
    steps = np.stack([np.cos(heading), np.sin(heading)], axis=1)
    points = start + np.concatenate([[np.zeros(2)], np.cumsum(steps[:-1], axis=0)])
    return Path(points)


def check_omit_classes(omit_classes) -> Tuple[str, ...]:
    """``omit_classes`` as a sorted tuple of class names; an unknown or non-object class is an error."""
    names = tuple(sorted(set(str(c) for c in omit_classes)))
    bad = [c for c in names if c not in OMITTABLE_CLASSES]
    if bad:
        raise ValueError(f"omit_classes: {bad} are not object classes; choose among {list(OMITTABLE_CLASSES)}")
    return names


def build_world(seed: int, scene_index: int, duration: float, omit_classes=(), one_way: bool = False) -> World:
    """A random world for one scene, big enough for the ego to drive ``duration`` seconds,
    without any box of the classes ``omit_classes`` (names from ``OMITTABLE_CLASSES``), with
    all the main road's traffic going the ego's way when ``one_way``."""
    omit = check_omit_classes(omit_classes)
    rng = np.random.default_rng([seed, scene_index, 7919])
    ego_speed = float(rng.choice([0.0, rng.uniform(3.0, 10.0)], p=[0.08, 0.92]))
    travel = ego_speed * duration
    length = travel + 2 * ROAD_MARGIN + 60.0
    main = _Road(_main_centreline(rng, length, np.array([0.0, 0.0]), float(rng.uniform(-np.pi, np.pi))),
                 lanes=int(rng.integers(1, 3)), parking=(bool(rng.random() < 0.6), bool(rng.random() < 0.4)),
                 sidewalk=float(rng.uniform(2.5, 4.5)))
    ego_s0 = ROAD_MARGIN + 30.0
    # cross streets where the ego will see them
    roads = [main]
    num_cross = int(rng.integers(1, 3))
    cross_s = np.sort(rng.uniform(ego_s0 - 25.0, ego_s0 + travel + 45.0, num_cross))
    for s in cross_s:
        if len(roads) > 1 and s - roads[-1].junction_s < 40.0:
            continue
        x, y, h = main.path.pose(s)
        angle = float(h) + np.pi / 2 + rng.uniform(-0.25, 0.25)
        direction = np.array([np.cos(angle), np.sin(angle)])
        centre = np.array([float(x), float(y)])
        points = centre + np.outer(np.arange(-90.0, 91.0, 2.0), direction)
        roads.append(_Road(Path(points), lanes=1, parking=(False, False), sidewalk=float(rng.uniform(2.0, 3.5)),
                           junction_s=float(s)))

    ground = _draw_ground(rng, roads)
    static = _StaticBuilder(rng)
    _place_roadside(rng, static, ground, roads)
    agents: List[Agent] = []
    ego_lane_offset = -(0.5 + (main.lanes - 1)) * LANE_WIDTH if rng.random() < 0.5 else -0.5 * LANE_WIDTH
    _place_traffic(rng, agents, static, ground, roads, ego_s0, ego_speed, ego_lane_offset, duration, one_way)
    ego = Agent("car", AGENT_TYPES["car"][1], main.path.offset(ego_lane_offset), ego_s0, ego_speed, (0, 0, 0), 0)
    agents = _clear_of_ego(agents, ego, duration)
    agents = [a for a in agents if a.kind not in omit]
    static_boxes = static.build(omit_labels={CLASS[c] for c in omit})
    world = World(seed=seed, ground=ground, static=static_boxes, agents=agents, ego=ego, roads=[r.path for r in roads])
    return world


# The ego's body in its own frame (origin on the rear axle): centre and half extents, with a margin.
_EGO_CENTRE_X = 1.3
_EGO_HALF = (2.3 + 0.8, 1.0 + 0.5)


def _clear_of_ego(agents: List[Agent], ego: Agent, duration: float) -> List[Agent]:
    """Agents that never come near the ego's body during the scene (checked every 0.1 s)."""
    times = np.arange(-0.5, duration + 0.5, 0.1)
    ego_states = np.array([ego.state(t) for t in times])
    keep = []
    for agent in agents:
        radius = 0.5 * np.hypot(agent.size[0], agent.size[1])
        states = np.array([agent.state(t) for t in times])
        dx, dy = states[:, 0] - ego_states[:, 0], states[:, 1] - ego_states[:, 1]
        c, s = np.cos(ego_states[:, 2]), np.sin(ego_states[:, 2])
        forward = c * dx + s * dy - _EGO_CENTRE_X
        left = -s * dx + c * dy
        if not np.any((np.abs(forward) < _EGO_HALF[0] + radius) & (np.abs(left) < _EGO_HALF[1] + radius)):
            keep.append(agent)
    return keep


def _draw_ground(rng: np.random.Generator, roads: List[_Road]) -> Ground:
    import cv2

    points = np.concatenate([r.path.points for r in roads])
    lo = points.min(axis=0) - ROAD_MARGIN
    hi = points.max(axis=0) + ROAD_MARGIN
    cols, rows = (np.ceil((hi - lo) / GROUND_CELL)).astype(int)
    labels = np.full((rows, cols), CLASS["terrain"], dtype=np.uint8)
    markings = np.zeros((rows, cols), dtype=np.uint8)
    shift = 4  # cv2 sub-pixel bits

    def pix(xy):
        return np.round((np.asarray(xy) - lo) / GROUND_CELL * (1 << shift)).astype(np.int32)

    # patches of other_flat (parking lots, plazas) on the terrain, then sidewalks and roads
    for road in roads:
        for _ in range(int(rng.integers(1, 4))):
            s = rng.uniform(0, road.path.length)
            x, y, h = road.path.pose(s)
            side = rng.choice([-1.0, 1.0])
            dist = road.curb + road.sidewalk + rng.uniform(1.0, 4.0)
            length, depth = rng.uniform(12, 30), rng.uniform(8, 18)
            corners = _rectangle(float(x), float(y), float(h), side, dist, length, depth)
            cv2.fillPoly(labels, [pix(corners)], CLASS["other_flat"], lineType=cv2.LINE_8, shift=shift)
    for road in roads:
        width = 2 * (road.curb + road.sidewalk) / GROUND_CELL
        cv2.polylines(labels, [pix(road.path.points)], False, CLASS["sidewalk"], thickness=int(round(width)),
                      lineType=cv2.LINE_8, shift=shift)
    for road in roads:
        width = 2 * road.curb / GROUND_CELL
        cv2.polylines(labels, [pix(road.path.points)], False, CLASS["driveable_surface"], thickness=int(round(width)),
                      lineType=cv2.LINE_8, shift=shift)
    # dashed centre line and lane lines, solid edge lines of the driving lanes
    for road in roads:
        offsets = [0.0] + [sign * k * LANE_WIDTH for k in range(1, road.lanes) for sign in (-1, 1)]
        for offset in offsets:
            line = road.path.offset(offset).points
            for start in range(0, len(line) - 1, 6):  # 3 m dashes every 6 m
                segment = line[start:start + 3]
                cv2.polylines(markings, [pix(segment)], False, 1, thickness=1, lineType=cv2.LINE_8, shift=shift)
        for sign in (-1, 1):
            edge = road.path.offset(sign * road.lanes * LANE_WIDTH).points
            cv2.polylines(markings, [pix(edge)], False, 1, thickness=1, lineType=cv2.LINE_8, shift=shift)
    markings[labels != CLASS["driveable_surface"]] = 0
    return Ground(labels=labels, markings=markings, x0=float(lo[0]), y0=float(lo[1]))


def _rectangle(x, y, heading, side, dist, length, depth) -> np.ndarray:
    """Corners (4, 2) of a rectangle beside a road: ``length`` along the heading, from
    ``dist`` to ``dist + depth`` off the centreline on ``side`` (+1 left, -1 right)."""
    t = np.array([np.cos(heading), np.sin(heading)])
    n = np.array([-np.sin(heading), np.cos(heading)]) * side
    c = np.array([x, y])
    return np.array([c - 0.5 * length * t + dist * n, c + 0.5 * length * t + dist * n,
                     c + 0.5 * length * t + (dist + depth) * n, c - 0.5 * length * t + (dist + depth) * n])


def _footprint_clear(ground: Ground, corners: np.ndarray, allowed=("terrain", "other_flat")) -> bool:
    """True when a footprint (4, 2) lies on allowed ground classes only (checked on a 6x6 lattice)."""
    a, b, d = corners[0], corners[1], corners[3]
    u, v = np.meshgrid(np.linspace(0, 1, 6), np.linspace(0, 1, 6))
    pts = a + u.reshape(-1, 1) * (b - a) + v.reshape(-1, 1) * (d - a)
    labels = ground.label_at(pts[:, 0], pts[:, 1])
    return bool(np.isin(labels, [CLASS[n] for n in allowed]).all())


class _Occupied2D:
    """Footprints placed so far (as circles), to keep static objects apart."""

    def __init__(self):
        self.items: List[Tuple[float, float, float]] = []

    def free(self, x, y, r) -> bool:
        return all((x - a) ** 2 + (y - b) ** 2 > (r + c) ** 2 for a, b, c in self.items)

    def add(self, x, y, r):
        self.items.append((x, y, r))


def _place_roadside(rng, static: _StaticBuilder, ground: Ground, roads: List[_Road]) -> None:
    taken = _Occupied2D()
    for road in roads:
        for side in (-1.0, 1.0):
            s = rng.uniform(0, 8)
            while s < road.path.length:
                length = rng.uniform(8.0, 26.0)
                x, y, h = (float(v) for v in road.path.pose(s + 0.5 * length))
                setback = road.curb + road.sidewalk + rng.uniform(1.0, 5.0)
                roll = rng.random()
                if roll < 0.62:  # building
                    depth, height = rng.uniform(8.0, 18.0), rng.uniform(4.5, 22.0)
                    corners = _rectangle(x, y, h, side, setback, length, depth)
                    centre = corners.mean(axis=0)
                    radius = 0.5 * np.hypot(length, depth)
                    if _footprint_clear(ground, corners) and taken.free(*centre, radius * 0.8):
                        static.add(*centre, 0.0, length, depth, height, h, "manmade")
                        taken.add(*centre, radius * 0.8)
                elif roll < 0.85:  # a group of trees or a hedge
                    for k in range(int(rng.integers(1, 4))):
                        ox = rng.uniform(-0.4, 0.4) * length
                        corners = _rectangle(x + ox * np.cos(h), y + ox * np.sin(h), h, side, setback, 3.0, 3.0)
                        cx, cy = corners.mean(axis=0)
                        if _footprint_clear(ground, corners) and taken.free(cx, cy, 1.8):
                            _add_tree(rng, static, cx, cy)
                            taken.add(cx, cy, 1.8)
                    if rng.random() < 0.4:
                        corners = _rectangle(x, y, h, side, setback - 0.5, length * 0.8, 1.0)
                        cx, cy = corners.mean(axis=0)
                        if _footprint_clear(ground, corners):
                            static.add(cx, cy, 0.0, length * 0.8, 1.0, rng.uniform(0.8, 1.5), h, "vegetation")
                elif roll < 0.93:  # a wall or fence
                    corners = _rectangle(x, y, h, side, setback, length, 0.4)
                    cx, cy = corners.mean(axis=0)
                    if _footprint_clear(ground, corners):
                        static.add(cx, cy, 0.0, length, 0.4, rng.uniform(1.2, 2.5), h, "manmade")
                s += length + rng.uniform(1.5, 10.0)
            # street furniture on the sidewalk: trees and poles near the curb
            s = rng.uniform(0, 10)
            while s < road.path.length:
                x, y, h = (float(v) for v in road.path.pose(s))
                d = side * (road.curb + min(0.9, 0.35 * road.sidewalk))
                px, py = x - d * np.sin(h), y + d * np.cos(h)
                if ground.label_at(np.array([px]), np.array([py]))[0] == CLASS["sidewalk"] and taken.free(px, py, 1.0):
                    if rng.random() < 0.55:
                        _add_tree(rng, static, px, py, canopy=rng.uniform(2.0, 3.2))
                    else:
                        static.add(px, py, 0.0, 0.3, 0.3, rng.uniform(4.5, 7.0), h, "manmade")
                    taken.add(px, py, 1.0)
                s += rng.uniform(9.0, 22.0)
    # free-standing vegetation in the open terrain
    rows, cols = ground.labels.shape
    for _ in range(int(rng.integers(15, 40))):
        px = ground.x0 + rng.uniform(0, cols * ground.cell)
        py = ground.y0 + rng.uniform(0, rows * ground.cell)
        size = rng.uniform(1.0, 3.0)
        corners = _rectangle(px, py, 0.0, 1.0, -0.5 * size, size, size)
        if _footprint_clear(ground, corners, allowed=("terrain",)) and taken.free(px, py, size):
            if rng.random() < 0.5:
                _add_tree(rng, static, px, py)
            else:
                static.add(px, py, 0.0, size, size, rng.uniform(0.5, 1.4), rng.uniform(0, np.pi), "vegetation")
            taken.add(px, py, size)


def _add_tree(rng, static: _StaticBuilder, x, y, canopy=None):
    trunk = rng.uniform(1.8, 2.8)
    canopy = canopy if canopy is not None else rng.uniform(2.5, 4.5)
    yaw = rng.uniform(0, np.pi)
    colour = _jitter_colour(rng, "vegetation")
    static.add(x, y, 0.0, 0.35, 0.35, trunk, yaw, "vegetation", colour=tuple(np.array(colour) * 0.55 + 0.12))
    static.add(x, y, trunk, canopy, canopy, rng.uniform(2.0, 4.0), yaw, "vegetation", colour=colour)


def _size(rng, kind: str) -> Tuple[float, float, float]:
    _, mean, jitter = AGENT_TYPES[kind]
    return tuple(float(m * rng.uniform(1 - jitter, 1 + jitter)) for m in mean)


def _pick_vehicle(rng) -> str:
    kinds = ["car", "truck", "bus", "motorcycle", "construction_vehicle", "trailer"]
    return str(rng.choice(kinds, p=[0.66, 0.11, 0.07, 0.08, 0.03, 0.05]))


def _place_traffic(rng, agents: List[Agent], static: _StaticBuilder, ground: Ground, roads: List[_Road],
                   ego_s0: float, ego_speed: float, ego_lane: float, duration: float, one_way: bool = False) -> None:
    def new_agent(kind, path, s0, speed, size=None):
        agents.append(Agent(kind, size or _size(rng, kind), path, float(s0), float(speed),
                            _jitter_colour(rng, kind), int(rng.integers(1 << 30))))
        return agents[-1]

    main = roads[0]
    def lane_path(direction, offset):
        # the lanes of direction -1 lie left of the centreline; on a one-way road they run the ego's way
        if direction == 1:
            return main.path.offset(offset)
        return main.path.offset(-offset) if one_way else main.path.reversed().offset(offset)

    # driving lanes of the main road: both directions, one speed per lane (no overtaking)
    for direction in (1, -1):
        for lane in range(main.lanes):
            offset = -(lane + 0.5) * LANE_WIDTH
            path = lane_path(direction, offset)
            is_ego_lane = direction == 1 and abs(offset - ego_lane) < 1e-6
            speed = ego_speed if is_ego_lane else (0.0 if rng.random() < 0.15 else rng.uniform(3.0, 12.0))
            ego_here = ego_s0 if direction == 1 or one_way else path.length - ego_s0
            s = rng.uniform(0, 12)
            while s < path.length:
                kind = _pick_vehicle(rng)
                size = _size(rng, kind)
                if is_ego_lane and abs(s - ego_here) < 0.5 * size[0] + 6.0:
                    s = ego_here + 0.5 * size[0] + 6.0 + rng.uniform(0, 5)
                    continue
                if kind == "trailer":  # a tractor pulling it
                    tractor = _size(rng, "truck")
                    tractor = (tractor[0] * 0.7, tractor[1], tractor[2])
                    new_agent("truck", path, s + 0.5 * tractor[0], speed, tractor)
                    new_agent("trailer", path, s - 0.5 * size[0] - 0.4, speed, size)
                    s += tractor[0] + size[0] + rng.uniform(4.0, 25.0)
                    continue
                new_agent(kind, path, s, speed, size)
                s += size[0] + rng.uniform(4.0, 30.0)
        # cyclists near the right edge of the outer lane
        path = lane_path(direction, -(main.lanes * LANE_WIDTH - 0.6))
        for _ in range(int(rng.integers(0, 3))):
            kind = "bicycle" if rng.random() < 0.7 else "motorcycle"
            new_agent(kind, path, rng.uniform(0, path.length), rng.uniform(2.5, 6.0))
    # parked vehicles in the parking lanes, the odd construction site
    for side, present in zip((-1.0, 1.0), main.parking):
        if not present:
            continue
        path = main.path.offset(side * (main.lanes * LANE_WIDTH + 1.25))
        s = rng.uniform(0, 6)
        while s < path.length:
            x, y, _ = path.pose(s)
            if ground.label_at(np.atleast_1d(x), np.atleast_1d(y))[0] != CLASS["driveable_surface"] or rng.random() < 0.3:
                s += rng.uniform(5, 15)
                continue
            if rng.random() < 0.1:
                s = _construction_site(rng, agents, static, path, s, side, new_agent)
                continue
            kind = "car" if rng.random() < 0.85 else str(rng.choice(["truck", "motorcycle", "bicycle"]))
            size = _size(rng, kind)
            yaw_path = path if rng.random() < 0.8 else path.reversed()
            s_on = s if yaw_path is path else path.length - s
            new_agent(kind, yaw_path, s_on, 0.0, size)
            s += size[0] + rng.uniform(1.0, 6.0)
    # cross streets: outbound traffic moves away, inbound traffic queues at the junction
    for road in roads[1:]:
        half = road.path.length / 2
        for direction in (1, -1):
            base = road.path if direction == 1 else road.path.reversed()
            path = base.offset(-0.5 * LANE_WIDTH)
            junction = half  # the main road crosses at the middle
            outbound_start = junction + main.curb + 4.0
            speed = rng.uniform(3.0, 10.0)
            s = outbound_start + rng.uniform(0, 10)
            while s < path.length:
                kind = _pick_vehicle(rng) if rng.random() < 0.8 else "car"
                if kind == "trailer":
                    kind = "truck"
                size = _size(rng, kind)
                new_agent(kind, path, s, speed, size)
                s += size[0] + rng.uniform(5.0, 30.0)
            s = junction - main.curb - 3.0
            for _ in range(int(rng.integers(0, 4))):
                kind = "car" if rng.random() < 0.8 else "truck"
                size = _size(rng, kind)
                s -= 0.5 * size[0]
                new_agent(kind, path, s, 0.0, size)
                s -= 0.5 * size[0] + rng.uniform(1.5, 4.0)
        # a vehicle turning right from the main road into this street
        if rng.random() < 0.8:
            turn = _turn_path(main, road, rng)
            if turn is not None:
                path, s_turn = turn
                speed = rng.uniform(3.0, 6.0)
                new_agent("car" if rng.random() < 0.8 else "truck", path, s_turn - speed * rng.uniform(0.0, duration),
                          speed)
    # pedestrians on the sidewalks, standing or walking either way, and some crossing
    for road in roads:
        for side in (-1.0, 1.0):
            for _ in range(int(rng.integers(2, 8 if road is main else 4))):
                offset = side * (road.curb + rng.uniform(0.6, max(0.7, road.sidewalk - 0.6)))
                path = road.path.offset(offset)
                if rng.random() < 0.5:
                    path = path.reversed()
                speed = 0.0 if rng.random() < 0.25 else rng.uniform(0.8, 1.7)
                new_agent("pedestrian", path, rng.uniform(0, path.length), speed)
            if rng.random() < 0.3:  # a parked bicycle on the sidewalk
                path = road.path.offset(side * (road.curb + road.sidewalk - 0.5))
                new_agent("bicycle", path, rng.uniform(0, path.length), 0.0)
    for road in roads[1:]:
        for _ in range(int(rng.integers(0, 3))):
            # cross the side street just off the junction, walking across its width
            half = road.path.length / 2
            s = half + rng.choice([-1, 1]) * (main.curb + rng.uniform(1.0, 3.0))
            x, y, h = (float(v) for v in road.path.pose(s))
            n = np.array([-np.sin(h), np.cos(h)])
            start = np.array([x, y]) - n * (road.curb + road.sidewalk)
            end = np.array([x, y]) + n * (road.curb + road.sidewalk)
            path = Path(np.stack([start, end]) if rng.random() < 0.5 else np.stack([end, start]))
            new_agent("pedestrian", path, rng.uniform(-4.0, path.length), rng.uniform(0.9, 1.5))


def _construction_site(rng, agents, static, path: Path, s: float, side: float, new_agent) -> float:
    """Barriers and cones along a stretch of the parking lane, a construction vehicle inside."""
    length = rng.uniform(12.0, 24.0)
    for k in np.arange(0.0, length, 2.1):
        x, y, h = (float(v) for v in path.pose(s + k))
        off = side * -1.0  # the traffic side of the parking lane
        static.add(x - off * np.sin(h), y + off * np.cos(h), 0.0, 2.0, 0.45, 1.0, h, "barrier")
    for k in np.arange(-4.0, 0.0, 1.3):
        x, y, h = (float(v) for v in path.pose(s + k))
        static.add(x, y, 0.0, 0.4, 0.4, 0.7, h, "traffic_cone")
    new_agent("construction_vehicle", path, s + 0.5 * length, 0.0 if rng.random() < 0.7 else 0.5)
    if rng.random() < 0.6:  # a worker
        new_agent("pedestrian", path.offset(side * 0.8), s + rng.uniform(2, length - 2), rng.choice([0.0, 0.6]))
    return s + length + 4.0


def _turn_path(main: _Road, road: _Road, rng) -> Optional[Tuple[Path, float]]:
    """Main road's right lane -> a right turn -> the side street's outbound lane; returns the
    path and the arclength where the turn begins."""
    lane = main.path.offset(-0.5 * LANE_WIDTH)
    junction_s = road.junction_s
    # the side street's outbound lane on the right of the main road's direction of travel
    x, y, h = (float(v) for v in main.path.pose(junction_s))
    right = np.array([np.sin(h), -np.cos(h)])
    street_dir = road.path.points[-1] - road.path.points[0]
    street_dir /= np.linalg.norm(street_dir)
    outbound = road.path if float(street_dir @ right) > 0 else road.path.reversed()
    outbound_lane = outbound.offset(-0.5 * LANE_WIDTH)
    radius = main.curb + 2.0
    approach_end = junction_s - radius - 0.5 * LANE_WIDTH
    s_vals = np.arange(max(0.0, approach_end - 80.0), approach_end, 2.0)
    ax, ay, _ = lane.pose(s_vals)
    approach = np.stack([ax, ay], axis=1)
    out_half = outbound_lane.length / 2
    depart_s = np.arange(out_half + radius + 0.5 * LANE_WIDTH, outbound_lane.length, 2.0)
    dx, dy, _ = outbound_lane.pose(depart_s)
    depart = np.stack([dx, dy], axis=1)
    if len(approach) < 2 or len(depart) < 2:
        return None
    # a quadratic Bezier between the two lane ends, control point where the lanes would cross
    p0, p2 = approach[-1], depart[0]
    t0 = np.array([np.cos(float(lane.pose(approach_end)[2])), np.sin(float(lane.pose(approach_end)[2]))])
    p1 = p0 + t0 * (radius + 0.5 * LANE_WIDTH)
    u = np.linspace(0, 1, 12)[1:-1, None]
    arc = (1 - u) ** 2 * p0 + 2 * (1 - u) * u * p1 + u ** 2 * p2
    path = Path(np.concatenate([approach, arc, depart]))
    return path, float(path.s[len(approach) - 1])
