"""Camera geometry of a keyframe and its neighbours in the current keyframe's ego frame:
the cameras that feed the network, and the render views of the VoxelSplat regularizer."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

__all__ = ["cameras_to_reference_ego", "adjacent_render_views", "OUT_OF_SCENE_RULES"]


def cameras_to_reference_ego(cameras: Sequence[dict], reference_ego2global: np.ndarray) -> np.ndarray:
    """OpenCV camera -> reference ego frame for each camera of a record.

    Each camera sits in the ego frame of its own capture time, so the chain is
    ``inv(reference_ego2global) @ camera ego2global @ cam2ego``; this removes the ego motion
    between a camera's exposure and the reference (LiDAR keyframe) time.

    Args:
        cameras: the record's ``cameras`` list (``cam2ego``, ``ego2global`` (4, 4) each).
        reference_ego2global: (4, 4) ego pose that defines the target frame.
    Returns:
        (C, 4, 4) float64.
    """
    global2reference = np.linalg.inv(np.asarray(reference_ego2global, dtype=np.float64))
    return np.stack([global2reference @ np.asarray(c["ego2global"], dtype=np.float64)
                     @ np.asarray(c["cam2ego"], dtype=np.float64) for c in cameras])


OUT_OF_SCENE_RULES = ("current", "nearest")


def adjacent_render_views(record: dict, scene_records: List[dict], frame_offsets: Sequence[int], bda: np.ndarray,
                          render_scale: float, out_of_scene: str = "current") -> Dict[str, object]:
    """Render views of the keyframes ``frame_index + offset``, every camera of each,
    expressed in the current keyframe's BEV-augmented ego frame.

    Args:
        record: the current keyframe's record.
        scene_records: all records of its scene in time order (``scene_records[i]`` has
            ``frame_index == i``).
        frame_offsets: keyframe offsets, e.g. (-2, -1, 0, 1, 2, 3).
        bda: (4, 4) BEV augmentation of the current sample.
        render_scale: render resolution relative to the original images (e.g. 0.25).
        out_of_scene: a keyframe beyond the scene's ends is replaced by the current keyframe
            ("current", as the released code does) or by the scene's nearest keyframe
            ("nearest").
    Returns:
        dict with (V = len(frame_offsets) * C views, offset-major, cameras in record order)
        ``render_viewmats`` (V, 4, 4) float64 world(augmented current ego) -> OpenCV camera
        (x right, y down, z forward), ``= inv(bda @ inv(ego2global_cur) @ ego2global_view @ cam2ego_view)``
        (with a BEV scale ``s != 1`` its 3x3 block is a rotation times ``1/s``, so camera-frame
        depths stay metric);
        ``render_intrinsics`` (V, 3, 3) float64 original intrinsics scaled by ``render_scale``;
        ``render_image_size`` (W, H) ints; ``render_frame_offsets`` (V,) int64 effective
        offsets (after the out-of-scene rule); ``render_time_offsets`` (V,) float64 seconds, view camera
        timestamp minus the current keyframe timestamp.
    """
    if out_of_scene not in OUT_OF_SCENE_RULES:
        raise ValueError(f"adjacent_render_views: out_of_scene must be one of {OUT_OF_SCENE_RULES}, got "
                         f"{out_of_scene!r}")
    frame_index = int(record["frame_index"])
    if not (0 <= frame_index < len(scene_records)) or scene_records[frame_index]["sample_token"] != record["sample_token"]:
        raise ValueError(f"sample {record['sample_token']}: scene_records do not hold it at frame_index {frame_index} "
                         f"(scene {record.get('scene_name')}, {len(scene_records)} records)")
    sizes = {(int(c["width"]), int(c["height"])) for c in record["cameras"]}
    if len(sizes) != 1:
        raise ValueError(f"sample {record['sample_token']}: cameras have different image sizes {sorted(sizes)}; "
                         "render views need one size")
    width, height = sizes.pop()
    render_size = (int(round(width * render_scale)), int(round(height * render_scale)))
    # exact per-axis factors so that the full image maps onto the full render
    pixel_scale = np.diag([render_size[0] / width, render_size[1] / height, 1.0])
    bda = np.asarray(bda, dtype=np.float64)
    viewmats, intrinsics, effective_offsets, time_offsets = [], [], [], []
    for offset in frame_offsets:
        target = frame_index + int(offset)
        if not 0 <= target < len(scene_records):
            target = frame_index if out_of_scene == "current" else int(np.clip(target, 0, len(scene_records) - 1))
        view_record = scene_records[target]
        cam2ego = cameras_to_reference_ego(view_record["cameras"], record["ego2global"])
        viewmats.append(np.linalg.inv(bda @ cam2ego))
        intrinsics.append(np.stack([pixel_scale @ np.asarray(c["intrinsics"], dtype=np.float64)
                                    for c in view_record["cameras"]]))
        effective_offsets += [target - frame_index] * len(view_record["cameras"])
        time_offsets += [(int(c["timestamp"]) - int(record["timestamp"])) * 1e-6 for c in view_record["cameras"]]
    return dict(
        render_viewmats=np.concatenate(viewmats),
        render_intrinsics=np.concatenate(intrinsics),
        render_image_size=render_size,
        render_frame_offsets=np.asarray(effective_offsets, dtype=np.int64),
        render_time_offsets=np.asarray(time_offsets, dtype=np.float64),
    )
