"""Long-term temporal fusion (FB-Occ): a queue of past volumes carried along in the
current frame, tagged with their age and fused with the current volume.

Each batch slot (index ``b`` of the batch, which a sequential sampler keeps on one
scene) remembers ``num_history`` volumes, newest first, all expressed in the slot's
previous (augmented) ego frame. At every step the whole queue is warped by the ego
motion from the previous frame to the current one, so a volume that is ``k`` steps old
has been resampled ``k`` times, as in the released code (it is not warped once from
its own frame). Every frame, the current one first, gets its age as extra channels
and goes through one shared 1x1x1 conv + BN + ReLU; the frames are then concatenated
and fused by a 1x1x1 conv + BN + ReLU. The queue is detached (no gradient through
time) and restarts at ``sequence_start`` (or when the slot's scene changes) as copies
of the current volume; while it is not full, the oldest volume it holds fills it, with
that volume's age. With ``history_enabled`` False every step is a sequence start (the
released warm-up instead ages those copies by one step and warps them by the last ego
motion).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...structures import OccupancyGrid, check_grid

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
    """Channels that tell a frame's age: (...,) seconds -> (..., num_channels).

    One channel is the age itself in seconds (released); more channels are sin/cos pairs
    with periods from ``max_period`` s down by powers of two; zero channels: none.
    """
    if num_channels == 0:
        return time_gap.new_zeros(*time_gap.shape, 0)
    if num_channels == 1:
        return time_gap[..., None]
    pairs = (num_channels + 1) // 2
    freqs = 2.0 * math.pi / (max_period / (2.0 ** torch.arange(pairs, device=time_gap.device, dtype=time_gap.dtype)))
    angles = time_gap[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)[..., :num_channels]


@dataclass
class _SlotHistory:
    """What one batch slot remembers. ``volumes`` (num_history, C, X, Y, Z), newest first,
    detached, all in the augmented ego frame ``ego2global`` / ``bda`` of the slot's last step;
    ``ages`` in steps and ``timestamps`` (us) per stored volume."""

    scene_token: Optional[str] = None
    volumes: Optional[torch.Tensor] = None
    ages: List[int] = field(default_factory=list)
    timestamps: List[int] = field(default_factory=list)
    ego2global: Optional[torch.Tensor] = None  # (4, 4) float64
    bda: Optional[torch.Tensor] = None         # (4, 4) float64


class TemporalVolumeFusion(nn.Module):
    """Fuse the current volume with ``num_history`` past volumes (FB-Occ's history fusion).

    out = ReLU(BN(W_cat [f_0; f_1; ...; f_T])),  f_t = ReLU(BN(W_time [v_t; e(age_t)] + b_time))

    with v_0 the current volume, v_t (t >= 1) the queued volumes warped into the current
    frame, e the :func:`time_encoding` of each frame's age (0 for the current frame) and
    W_time shared by all frames. Both convolutions are 1x1x1 with a bias, as released.

    Args:
        in_channels: channels of the volume (released: 80).
        out_channels: channels after fusion (released: 80, the same; None: ``in_channels``).
        num_history: past frames in the queue (released: 16).
        grid: the volume's grid (the forward projection's).
        time_channels: age channels per frame (released: 1, the age in seconds; see
            :func:`time_encoding`).
        frame_interval: seconds per step of age (released: 0.5 s, the keyframe spacing: a
            volume k steps old is k x 0.5 s old whatever the timestamps say); None: ages from
            the samples' timestamps.

    Forward:
        volume: (B, C, X, Y, Z) current volume (augmented ego frame).
        ego2global: (B, 4, 4) float64; bda: (B, 4, 4); timestamps: list of B ints (us);
        sequence_start: list of B bools; scene_tokens: list of B str (or None).
    Returns:
        (B, out_channels, X, Y, Z).
    """

    def __init__(self, in_channels: int, out_channels: Optional[int], num_history: int,
                 grid: OccupancyGrid, time_channels: int = 1,
                 frame_interval: Optional[float] = 0.5):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        for name, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                 ("num_history", num_history, 0), ("time_channels", time_channels, 0)):
            if int(value) != value or value < low:
                raise ValueError(f"TemporalVolumeFusion: {name} must be an integer >= {low}, got {value!r}")
        if frame_interval is not None and not frame_interval > 0:
            raise ValueError(f"TemporalVolumeFusion: frame_interval must be > 0 s or None, got {frame_interval!r}")
        self.grid = check_grid(grid, "TemporalVolumeFusion")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.num_history = int(num_history)
        self.time_channels = int(time_channels)
        self.frame_interval = None if frame_interval is None else float(frame_interval)
        frames = self.num_history + 1
        self.time_conv = nn.Sequential(
            nn.Conv3d(self.in_channels + self.time_channels, self.in_channels, 1),
            nn.BatchNorm3d(self.in_channels),
            nn.ReLU(inplace=True),
        )
        self.cat_conv = nn.Sequential(
            nn.Conv3d(frames * self.in_channels, self.out_channels, 1),
            nn.BatchNorm3d(self.out_channels),
            nn.ReLU(inplace=True),
        )
        self.history_enabled = True
        self._slots: List[_SlotHistory] = []
        self._state_training: Optional[bool] = None

    def reset_history(self) -> None:
        """Forget every slot's history (e.g. before evaluation)."""
        self._slots = []

    def history_state(self) -> dict:
        """The history every slot carries into the next step (what a resumed run needs to
        continue exactly): ``{"training": mode the slots were filled in (None: empty),
        "slots": [{"scene_token", "volumes" (num_history, C, X, Y, Z) or None, "ages",
        "timestamps", "ego2global" (4, 4) float64, "bda" (4, 4) float64}, ...]}``. The
        tensors are the module's own (not copies); they are never modified in place."""
        return {"training": self._state_training,
                "slots": [dict(scene_token=s.scene_token, volumes=s.volumes, ages=list(s.ages),
                               timestamps=list(s.timestamps), ego2global=s.ego2global, bda=s.bda)
                          for s in self._slots]}

    def load_history_state(self, state: dict) -> None:
        """Restore what :meth:`history_state` returned (tensors moved to this module's device)."""
        device = self.cat_conv[0].weight.device
        slots = []
        for index, slot in enumerate(state["slots"]):
            volumes = slot["volumes"]
            if volumes is not None and tuple(volumes.shape) != (self.num_history, self.in_channels, *self.grid.shape):
                raise ValueError(f"TemporalVolumeFusion: history slot {index} holds volumes of shape "
                                 f"{tuple(volumes.shape)}, expected "
                                 f"{(self.num_history, self.in_channels, *self.grid.shape)}")
            moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in slot.items()}
            slots.append(_SlotHistory(scene_token=moved["scene_token"], volumes=moved["volumes"],
                                      ages=list(moved["ages"]), timestamps=list(moved["timestamps"]),
                                      ego2global=moved["ego2global"], bda=moved["bda"]))
        self._slots = slots
        self._state_training = state["training"]

    def _check_state(self, batch_size: int) -> None:
        # A change of batch size or of train/eval mode means the slots no longer follow sequences.
        if len(self._slots) != batch_size or self._state_training != self.training:
            self._slots = [_SlotHistory() for _ in range(batch_size)]
            self._state_training = self.training

    def _restarts(self, sequence_start: Sequence[bool], scene_tokens: Sequence[Optional[str]]) -> List[bool]:
        restarts = []
        for slot, start, token in zip(self._slots, sequence_start, scene_tokens):
            restarts.append(not self.history_enabled or bool(start) or slot.volumes is None
                            or (token is not None and slot.scene_token != token))
        return restarts

    def _past_frames(self, current: torch.Tensor, ego2global: torch.Tensor, bda: torch.Tensor,
                     timestamps: Sequence[int], restarts: Sequence[bool]):
        """The queue warped into the current frame (B, H, C, X, Y, Z), with each volume's age in
        steps and timestamp (lists of B lists of H)."""
        b, h = current.shape[0], self.num_history
        continuing = [i for i in range(b) if not restarts[i]]
        warped = {}
        if continuing:
            stored = torch.stack([self._slots[i].volumes for i in continuing])  # (n, H, C, X, Y, Z)
            transforms = torch.stack([current_to_past_transform(ego2global[i], bda[i], self._slots[i].ego2global,
                                                                self._slots[i].bda) for i in continuing])
            # One batch entry per stored volume: grid_sample spreads its work over the batch.
            moved = warp_volume(stored.flatten(0, 1), transforms.repeat_interleave(h, dim=0), self.grid).view_as(stored)
            warped = dict(zip(continuing, moved.unbind(0)))
        past, steps, stamps = [], [], []
        for i in range(b):
            if restarts[i]:  # the queue restarts as copies of the current volume, age 0
                past.append(current[i].unsqueeze(0).expand(h, *current.shape[1:]))
                steps.append([0] * h)
                stamps.append([int(timestamps[i])] * h)
            else:
                past.append(warped[i])
                steps.append([a + 1 for a in self._slots[i].ages])
                stamps.append(list(self._slots[i].timestamps))
        return torch.stack(past), steps, stamps

    def _store(self, current: torch.Tensor, past: torch.Tensor, steps, stamps, ego2global: torch.Tensor,
               bda: torch.Tensor, timestamps: Sequence[int], scene_tokens: Sequence[Optional[str]]) -> None:
        # The new queue, in the current frame: this volume, then the warped queue minus its oldest.
        queue = torch.cat([current.unsqueeze(1), past[:, :-1]], dim=1)
        for i in range(len(self._slots)):
            now = int(timestamps[i])
            self._slots[i] = _SlotHistory(
                scene_token=scene_tokens[i], volumes=queue[i], ages=[0] + steps[i][:-1],
                timestamps=[now] + stamps[i][:-1],
                ego2global=ego2global[i].to(torch.float64), bda=bda[i].to(torch.float64),
            )

    def forward(self, volume: torch.Tensor, ego2global: torch.Tensor, bda: torch.Tensor, timestamps: Sequence[int],
                sequence_start: Sequence[bool], scene_tokens: Optional[Sequence[Optional[str]]] = None) -> torch.Tensor:
        if volume.dim() != 5 or volume.shape[1] != self.in_channels:
            raise ValueError(f"TemporalVolumeFusion: volume must be (B, {self.in_channels}, X, Y, Z), "
                             f"got {tuple(volume.shape)}")
        if tuple(volume.shape[2:]) != tuple(self.grid.shape):
            raise ValueError(f"TemporalVolumeFusion: volume grid {tuple(volume.shape[2:])} != the grid of "
                             f"its grid {tuple(self.grid.shape)}")
        b = volume.shape[0]
        scene_tokens = list(scene_tokens) if scene_tokens is not None else [None] * b
        self._check_state(b)
        current = volume.detach()
        if self.num_history:
            restarts = self._restarts(sequence_start, scene_tokens)
            past, steps, stamps = self._past_frames(current, ego2global, bda, timestamps, restarts)
            if self.frame_interval is None:
                ages = [[0.0] + [(int(now) - t) * 1e-6 for t in row] for now, row in zip(timestamps, stamps)]
            else:
                ages = [[0.0] + [k * self.frame_interval for k in row] for row in steps]
            frames = torch.cat([volume.unsqueeze(1), past], dim=1)  # (B, T, C, X, Y, Z), current first
        else:
            frames, ages = volume.unsqueeze(1), [[0.0]] * b
        fused = self.cat_conv(self._embed_frames(frames, volume.new_tensor(ages)).flatten(1, 2))
        if not self.history_enabled:
            self._slots = [_SlotHistory() for _ in range(b)]
        elif self.num_history:
            self._store(current, past, steps, stamps, ego2global, bda, timestamps, scene_tokens)
        return fused

    def _embed_frames(self, frames: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """The shared time conv on every frame: (B, T, C, X, Y, Z), ages (B, T) s -> (B, T, C, X, Y, Z).

        The age channels are constant over a frame, so their part of the 1x1x1 conv is a
        per-frame bias: the same result as convolving the concatenation, without building it.
        """
        b, t, c = frames.shape[:3]
        conv, norm, activation = self.time_conv
        weight = conv.weight.flatten(1)  # (C, C + E)
        time_bias = time_encoding(ages, self.time_channels).to(weight.dtype) @ weight[:, c:].T + conv.bias  # (B, T, C)
        embedded = F.conv3d(frames.flatten(0, 1), weight[:, :c, None, None, None])
        embedded = embedded + time_bias.flatten(0, 1)[:, :, None, None, None]
        return activation(norm(embedded)).view(b, t, c, *frames.shape[3:])
