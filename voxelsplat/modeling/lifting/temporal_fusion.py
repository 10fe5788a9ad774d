"""Long-term temporal fusion: a queue of past volumes warped into the current frame.

Each batch slot (index ``b`` of the batch, which a sequential sampler keeps on one
scene) remembers the last ``num_history`` volumes it produced, each with the pose and
BEV augmentation of its frame. At every step the stored volumes are warped into the
current (augmented) ego frame by ego-motion, concatenated with the current volume and
a sinusoidal encoding of each frame's time gap, and fused by convolutions. History is
detached (no gradient through time) and reset at ``sequence_start`` (or when the
slot's scene changes); an empty queue is filled with copies of the current volume,
as in the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...data.occupancy_meta import OccupancyGrid
from ..layers import conv_bn_relu
from ..registry import LIFTING_REGISTRY

__all__ = ["current_to_past_transform", "warp_volume", "time_encoding", "TemporalVolumeFusion"]


def current_to_past_transform(ego2global_current: torch.Tensor, bda_current: torch.Tensor,
                              ego2global_past: torch.Tensor, bda_past: torch.Tensor) -> torch.Tensor:
    """Map points of the current *augmented* ego frame to a past frame's augmented ego frame:
    undo the current BEV augmentation, go through the global frame, redo the past one's.

        T = bda_past @ inv(ego2global_past) @ ego2global_current @ inv(bda_current)

    All inputs (..., 4, 4); computed in float64 (global translations are km-scale).
    """
    f64 = torch.float64
    return (bda_past.to(f64) @ torch.linalg.inv(ego2global_past.to(f64)) @ ego2global_current.to(f64)
            @ torch.linalg.inv(bda_current.to(f64)))


def warp_volume(volume: torch.Tensor, current_to_past: torch.Tensor, grid: OccupancyGrid) -> torch.Tensor:
    """Resample past volumes at the current voxel centres (trilinear, zeros outside).

    Args:
        volume: (B, C, X, Y, Z) volumes in their own (past, augmented) ego frames.
        current_to_past: (B, 4, 4) from :func:`current_to_past_transform`.
        grid: the volumes' grid (same for past and current).
    Returns:
        (B, C, X, Y, Z) in the current augmented ego frame.
    """
    b = volume.shape[0]
    device = volume.device
    centers = torch.as_tensor(grid.voxel_centers(), device=device, dtype=torch.float64)  # (X, Y, Z, 3)
    transform = current_to_past.to(torch.float64)
    past = torch.einsum("bij,xyzj->bxyzi", transform[:, :3, :3], centers) + transform[:, None, None, None, :3, 3]
    lo = torch.as_tensor(grid.range_min, device=device, dtype=torch.float64)
    hi = torch.as_tensor(grid.range_max, device=device, dtype=torch.float64)
    normalized = (past - lo) / (hi - lo) * 2.0 - 1.0  # align_corners=False: -1/+1 are the outer faces
    # grid_sample's last axis is (W, H, D) = (z, y, x) for a (B, C, X, Y, Z) input.
    sample_grid = normalized.flip(-1).to(volume.dtype)
    return F.grid_sample(volume, sample_grid.reshape(b, *grid.shape, 3), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def time_encoding(time_gap: torch.Tensor, num_channels: int, max_period: float = 8.0) -> torch.Tensor:
    """Sinusoidal encoding of time gaps (seconds) -> (..., num_channels); sin/cos pairs with
    periods from ``max_period`` s down by powers of two."""
    if num_channels == 0:
        return time_gap.new_zeros(*time_gap.shape, 0)
    pairs = (num_channels + 1) // 2
    freqs = 2.0 * math.pi / (max_period / (2.0 ** torch.arange(pairs, device=time_gap.device, dtype=time_gap.dtype)))
    angles = time_gap[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)[..., :num_channels]


@dataclass
class _SlotHistory:
    """What one batch slot remembers: newest first."""

    scene_token: Optional[str] = None
    volumes: List[torch.Tensor] = field(default_factory=list)   # each (C, X, Y, Z), detached
    ego2global: List[torch.Tensor] = field(default_factory=list)  # each (4, 4) float64
    bda: List[torch.Tensor] = field(default_factory=list)        # each (4, 4)
    timestamps: List[int] = field(default_factory=list)          # microseconds


@LIFTING_REGISTRY.register()
class TemporalVolumeFusion(nn.Module):
    """Fuse the current volume with ``num_history`` warped past volumes.

    Args:
        in_channels: channels of the volume.
        out_channels: channels after fusion.
        num_history: past frames in the queue (published: 16).
        point_cloud_range, voxel_size: the volume's grid.
        time_channels: sinusoidal time-gap channels concatenated to every frame.

    Forward:
        volume: (B, C, X, Y, Z) current volume (augmented ego frame).
        ego2global: (B, 4, 4) float64; bda: (B, 4, 4); timestamps: list of B ints (us);
        sequence_start: list of B bools; scene_tokens: list of B str (or None).
    Returns:
        (B, out_channels, X, Y, Z).
    """

    def __init__(self, in_channels: int, out_channels: int, num_history: int, point_cloud_range: Sequence[float],
                 voxel_size: float, time_channels: int = 8):
        super().__init__()
        self.grid = OccupancyGrid(tuple(float(v) for v in point_cloud_range), float(voxel_size))
        self.num_history = int(num_history)
        self.time_channels = int(time_channels)
        frames = self.num_history + 1
        self.fuse = nn.Sequential(
            conv_bn_relu(frames * (in_channels + self.time_channels), out_channels, kernel_size=1, dims=3),
            conv_bn_relu(out_channels, out_channels, kernel_size=3, dims=3),
        )
        self.history_enabled = True
        self._slots: List[_SlotHistory] = []
        self._state_training: Optional[bool] = None

    def reset_history(self) -> None:
        """Forget every slot's history (e.g. before evaluation)."""
        self._slots = []

    def _check_state(self, batch_size: int) -> None:
        # A change of batch size or of train/eval mode means the slots no longer follow sequences.
        if len(self._slots) != batch_size or self._state_training != self.training:
            self._slots = [_SlotHistory() for _ in range(batch_size)]
            self._state_training = self.training

    def forward(self, volume: torch.Tensor, ego2global: torch.Tensor, bda: torch.Tensor, timestamps: Sequence[int],
                sequence_start: Sequence[bool], scene_tokens: Optional[Sequence[Optional[str]]] = None) -> torch.Tensor:
        b = volume.shape[0]
        scene_tokens = list(scene_tokens) if scene_tokens is not None else [None] * b
        self._check_state(b)
        current = volume.detach()
        past_volumes, transforms, gaps = [], [], []
        for slot_index in range(b):
            slot = self._slots[slot_index]
            restart = (not self.history_enabled or bool(sequence_start[slot_index]) or not slot.volumes
                       or (scene_tokens[slot_index] is not None and slot.scene_token != scene_tokens[slot_index]))
            if restart:
                slot = _SlotHistory(scene_token=scene_tokens[slot_index])
                self._slots[slot_index] = slot
            for t in range(self.num_history):
                if t < len(slot.volumes):
                    past_volumes.append(slot.volumes[t])
                    transforms.append(current_to_past_transform(ego2global[slot_index], bda[slot_index],
                                                                slot.ego2global[t], slot.bda[t]))
                    gaps.append((int(timestamps[slot_index]) - slot.timestamps[t]) * 1e-6)
                else:  # queue not full yet: the current volume stands in (zero motion, zero gap)
                    past_volumes.append(current[slot_index])
                    transforms.append(torch.eye(4, dtype=torch.float64, device=volume.device))
                    gaps.append(0.0)
        frames = [volume]
        if self.num_history:
            warped = warp_volume(torch.stack(past_volumes), torch.stack(transforms), self.grid)
            frames += list(warped.view(b, self.num_history, *volume.shape[1:]).unbind(1))
        past_gaps = volume.new_tensor(gaps).view(b, self.num_history) if gaps else volume.new_zeros(b, 0)
        all_gaps = torch.cat([volume.new_zeros(b, 1), past_gaps], dim=1)  # seconds, current first
        encodings = time_encoding(all_gaps, self.time_channels)  # (B, T+1, E)
        spatial = volume.shape[2:]
        stacked = [torch.cat([frame, encodings[:, t, :, None, None, None].expand(b, -1, *spatial)], dim=1)
                   for t, frame in enumerate(frames)]
        fused = self.fuse(torch.cat(stacked, dim=1))

        if self.history_enabled:
            for slot_index in range(b):
                slot = self._slots[slot_index]
                slot.volumes.insert(0, current[slot_index])
                slot.ego2global.insert(0, ego2global[slot_index].to(torch.float64))
                slot.bda.insert(0, bda[slot_index].to(torch.float64))
                slot.timestamps.insert(0, int(timestamps[slot_index]))
                del slot.volumes[self.num_history:], slot.ego2global[self.num_history:]
                del slot.bda[self.num_history:], slot.timestamps[self.num_history:]
        else:
            self._slots = [_SlotHistory() for _ in range(b)]
        return fused
