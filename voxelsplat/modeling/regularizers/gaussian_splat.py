"""VoxelSplat's training-only regularizer: voxel predictions -> 3D Gaussians -> renders
in the current and adjacent keyframes' cameras -> losses against renders of the GT.

Per sample, with the N voxels the mapper sampled (``gaussian_voxel_indices``) and the V
render views (cameras of keyframes t-2..t+3 in the current augmented ego frame):

- **predicted Gaussians** at all N voxel centres. Features: the non-free class logits
  and the predicted flow (vx, vy). ``mode="release"`` (the released code): opacity
  ``sigmoid(-free logit)``, isotropic ``scale``, identity rotation. ``mode="decoded"``
  (the paper): a 1x1 head on the full-resolution voxel features decodes a position
  offset (``tanh`` x ``max_offset`` voxels), per-axis scales (within ``scale_range``),
  a rotation and an opacity.
- **GT Gaussians** at the sampled voxels whose GT class is not free: one-hot class
  (non-free classes) + GT flow, opacity 1, isotropic ``scale``, identity rotation.
- **states**: "current" (positions as they are) and, once the flow loss is on,
  "propagated": every Gaussian moved in x, y by its flow times a time -- predictions by
  the predicted flow, the GT by the GT flow (the gradient reaches the predicted flow
  through the positions too). The released code moves every view's Gaussians by
  ``flow x 1 s`` whatever the view's time (``propagation_seconds=1.0``, a quirk the release
  configs keep); ``propagation_seconds=None`` uses each view's own time offset from the
  current keyframe (the corrected behaviour).

  The propagated state's **target** is the current GT moved by the GT flow
  (``propagated_targets="moved_gt"``, released). ``propagated_targets="adjacent_gt"`` (not
  released) renders, into the views of keyframe t+o (``render_frame_offsets == o``, o != 0),
  that keyframe's own GT instead: the occupied voxels the mapper drew from its labels
  (``adjacent_gt_gaussians`` mapper option; the ``adjacent_gt_*`` fields of
  :mod:`voxelsplat.structures.sample_fields`), in the current augmented ego frame, not moved;
  views of offset 0 (out-of-scene views replaced by the current keyframe included) get the
  current GT, not moved. The prediction moves as above either way, so pair it with
  ``propagation_seconds=None``: with the released 1 s, a prediction moved by 1 s is compared
  with a keyframe 0.5 s (or 0 s) away.
- **losses**, as the released code computes them; each pools the pixels of every view,
  state and sample of the batch before dividing (one mean per batch, not a mean of means):

  * ``loss_splat_semantic``: soft-target cross-entropy ``-sum_c t_c log softmax(x)_c``
    between the rendered logits ``x`` and the GT render's alpha-accumulated one-hot ``t``
    (not renormalised), on the pixels whose GT accumulated depth exceeds
    ``semantic_min_gt_depth`` (0.1 m);
  * ``loss_splat_depth``: L1 between the accumulated depths ``sum_i w_i z_i`` of the two
    renders over **all** pixels: opacity the prediction puts where the GT renders nothing
    adds depth there and is penalised, missing opacity is penalised where the GT has some;
  * ``loss_splat_flow``: ``sum_p w_p |f_p - g_p|_1 / sum_p w_p`` over all pixels, with
    ``w_p = |g_p| + 0.1`` of the GT render's accumulated flow ``g``; 0 (but present) while
    the flow loss is off.

  Options that are not in the release (off in the release configs):
  ``normalize_by_alpha`` compares depth and flow as alpha-normalised values
  (``D / alpha``, ``F / alpha``) on the pixels both renders cover (alpha >
  ``coverage_threshold``), so a faint splat is not read as a near surface or a slow
  object; ``detach_flow_weights`` renders the predicted flow a second time with the
  Gaussians' opacities (and, decoded mode, their shapes) detached, so the flow term trains
  the flow and not the occupancy.

Cameras are OpenCV (x right, y down, z forward) world-to-camera matrices. The released
code flipped y and z of frames that are already OpenCV, so its virtual cameras looked
backwards (the published numbers came from that): ``flip_render_cameras=True`` reproduces
it, ``False`` renders the views the cameras actually saw.

The latest renders of a few views (detached, on CPU) stay in :attr:`last_renders` for
:class:`voxelsplat.engine.render_image_hook.RenderImageHook` and ``tools/visualize.py``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...structures.sample_fields import ADJACENT_GT_FIELDS
from ...splatting import rasterize_gaussians
from ...structures import OccupancySpec

__all__ = ["GaussianSplatRegularizer", "gather_voxels", "release_camera_flip"]

DEFAULT_LOSS_WEIGHTS = {"semantic": 0.5, "depth": 1.0, "flow": 0.5}
MODES = ("release", "decoded")
PROPAGATED_TARGETS = ("moved_gt", "adjacent_gt")


class _GaussianDecoder(nn.Module):
    """1x1 (per-voxel) MLP: voxel features (N, F) -> offset (N, 3) m, scales (N, 3) m,
    quaternions (N, 4) w,x,y,z, opacities (N,).

    The last layer starts at zero, so a new decoder places Gaussians at the voxel
    centres with identity rotation, ``initial_scale`` and opacity 0.5.
    """

    def __init__(self, feature_channels: int, hidden_channels: int, voxel_size: float, max_offset: float,
                 scale_range: Tuple[float, float], initial_scale: float):
        super().__init__()
        low, high = float(scale_range[0]), float(scale_range[1])
        if not 0 < low < high or not low < initial_scale < high:
            raise ValueError(f"GaussianSplatRegularizer: need 0 < scale_range[0] < scale ({initial_scale}) < "
                             f"scale_range[1], got scale_range={scale_range}")
        self.feature_channels = int(feature_channels)
        self.mlp = nn.Sequential(nn.Linear(feature_channels, hidden_channels), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_channels, 3 + 3 + 4 + 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.max_offset_m = float(max_offset) * float(voxel_size)
        self.scale_low, self.scale_high = low, high
        # sigmoid(bias) puts the initial scale at ``initial_scale``.
        fraction = (initial_scale - low) / (high - low)
        self.register_buffer("scale_bias", torch.tensor(math.log(fraction / (1 - fraction))), persistent=False)

    def forward(self, features: torch.Tensor):
        raw_offset, raw_scale, raw_quat, raw_opacity = self.mlp(features).split([3, 3, 4, 1], dim=-1)
        offset = torch.tanh(raw_offset) * self.max_offset_m
        scales = self.scale_low + (self.scale_high - self.scale_low) * torch.sigmoid(raw_scale + self.scale_bias)
        identity = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=raw_quat.dtype, device=raw_quat.device)
        quats = F.normalize(raw_quat + identity, dim=-1)
        return offset, scales, quats, torch.sigmoid(raw_opacity[:, 0])


class _GatherVoxels(torch.autograd.Function):
    """``volume.flatten(2)[batch_ids, :, linear]`` as (M, C), whose backward scatters the
    (M, C) gradient straight into one zero volume (plain indexing would add a view and a
    generic index backward on top of that: ~10 ms per step for the tiny config's 17-channel
    200x200x16 logits on a CPU)."""

    @staticmethod
    def forward(ctx, volume, batch_ids, linear):
        ctx.save_for_backward(batch_ids, linear)
        ctx.volume_shape = volume.shape
        flat = volume.reshape(volume.shape[0], volume.shape[1], -1)
        channels = torch.arange(volume.shape[1], device=volume.device)
        return flat[batch_ids[:, None], channels[None, :], linear[:, None]]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        batch_ids, linear = ctx.saved_tensors
        shape = ctx.volume_shape
        grad_volume = grad.new_zeros(shape)
        channels = torch.arange(shape[1], device=grad.device)
        grad_volume.view(shape[0], shape[1], -1).index_put_((batch_ids[:, None], channels[None, :], linear[:, None]),
                                                            grad, accumulate=True)
        return grad_volume, None, None


def release_camera_flip(viewmats: torch.Tensor) -> torch.Tensor:
    """(V, 4, 4) world-to-camera matrices as the released code used them: it flipped the y
    and z axes of the camera-to-world matrix (meant for an OpenGL-style input) of cameras
    that were already OpenCV, ``w2c' = inv(c2w @ diag(1, -1, -1, 1)) = diag(1, -1, -1, 1) @ w2c``:
    the virtual camera sits at the same place and looks the opposite way, upside down."""
    flip = viewmats.new_tensor([1.0, -1.0, -1.0, 1.0])
    return viewmats * flip[:, None]


def gather_voxels(volume: torch.Tensor, batch_ids: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Values of a (B, C, X, Y, Z) volume at voxels (M, 3) [x, y, z] of samples ``batch_ids``
    (M,), as (M, C); differentiable (repeated voxels add up their gradients)."""
    x_size, y_size, z_size = volume.shape[2:]
    linear = (indices[:, 0] * y_size + indices[:, 1]) * z_size + indices[:, 2]
    return _GatherVoxels.apply(volume, batch_ids, linear)


class GaussianSplatRegularizer(nn.Module):
    """Gaussian-splatting losses on voxel predictions (VoxelSplat); training only.

    Args:
        spec: the dataset's :class:`~voxelsplat.structures.OccupancySpec`: the GT grid (where
            the Gaussians sit), the classes rendered and the free index.
        mode: "release" (opacity from the free logit, fixed scale and rotation) or
            "decoded" (offset, scale, rotation and opacity decoded from voxel features).
        scale: isotropic Gaussian standard deviation, metres (published 0.12).
        loss_weights: {"semantic", "depth", "flow"} weights (published 0.5, 1.0, 0.5).
        backend: rasterization backend (see :func:`voxelsplat.splatting.rasterize_gaussians`).
        propagate_by_flow: add the flow-propagated state once the flow loss is on.
        propagation_seconds: time (s) by which every view's propagated Gaussians move
            (released: 1.0 for every view); None: each view's own time offset.
        propagated_targets: the GT render of the propagated state: "moved_gt" (released: the
            current GT moved by GT flow x time) or "adjacent_gt" (views of keyframe t+o show
            that keyframe's own GT, the sample's ``adjacent_gt_*`` fields; offset 0 the
            current GT; nothing moved).
        flip_render_cameras: flip the y and z axes of the render cameras as the released
            code does (the renders then look backwards); False: the cameras as they are.
        max_views: render at most this many of a sample's views, drawn at random each call
            (None: all), to bound CPU cost.
        render_chunk: views per rasterization call (None: all views of a state in one call).
        semantic_min_gt_depth: pixels whose GT accumulated depth exceeds this (metres) get
            the semantic loss (released: 0.1).
        normalize_by_alpha: depth and flow losses on alpha-normalised renders over the pixels
            both renders cover (not released).
        coverage_threshold: alpha above which ``normalize_by_alpha`` counts a pixel as covered.
        detach_flow_weights: the flow loss does not reach the opacities (not released).
        depth_scale: metres per unit of the depth loss.
        near_plane, far_plane: Gaussians nearer / farther than this (metres, camera z) are
            not rendered (released: 0.1, 100).
        feature_channels, hidden_channels, max_offset, scale_range: the decoder of
            ``mode="decoded"`` (channels of ``voxel_features``; hidden width; largest
            offset in voxels; scale bounds in metres).
        keep_views: how many views of the first sample to keep in :attr:`last_renders`.

    Forward:
        ``losses = regularizer(batched_inputs, head_outputs, flow_loss_enabled)`` with
        ``head_outputs`` {"occ_logits": (B, num_classes, X, Y, Z), "flow": (B, 2, X, Y, Z)
        m/s in the augmented ego frame, "voxel_features": (B, F, X, Y, Z) (decoded mode)}
        and per-sample fields ``gaussian_voxel_indices`` (N, 3), ``occ_semantics``
        (X, Y, Z), ``occ_flow`` (X, Y, Z, 2), ``render_viewmats`` (V, 4, 4),
        ``render_intrinsics`` (V, 3, 3), ``render_image_size`` (W, H),
        ``render_time_offsets`` (V,) s; with ``propagated_targets="adjacent_gt"`` also
        ``render_frame_offsets`` (V,) and ``adjacent_gt_means`` (M, 3) m,
        ``adjacent_gt_classes`` (M,), ``adjacent_gt_flow`` (M, 2) m/s,
        ``adjacent_gt_frame_offsets`` (M,). Returns {"loss_splat_semantic",
        "loss_splat_depth", "loss_splat_flow"}: weighted scalar losses.
    """

    def __init__(
        self,
        *,
        spec: OccupancySpec,
        mode: str = "release",
        scale: float = 0.12,
        loss_weights: Optional[Dict[str, float]] = None,
        backend: str = "auto",
        propagate_by_flow: bool = True,
        propagation_seconds: Optional[float] = None,
        propagated_targets: str = "moved_gt",
        flip_render_cameras: bool = False,
        max_views: Optional[int] = None,
        render_chunk: Optional[int] = None,
        semantic_min_gt_depth: float = 0.1,
        normalize_by_alpha: bool = False,
        coverage_threshold: float = 0.5,
        detach_flow_weights: bool = False,
        depth_scale: float = 1.0,
        near_plane: float = 0.1,
        far_plane: float = 100.0,
        feature_channels: Optional[int] = None,
        hidden_channels: int = 32,
        max_offset: float = 1.0,
        scale_range: Tuple[float, float] = (0.04, 0.4),
        keep_views: int = 3,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"GaussianSplatRegularizer: mode must be one of {MODES}, got {mode!r}")
        if propagated_targets not in PROPAGATED_TARGETS:
            raise ValueError(f"GaussianSplatRegularizer: propagated_targets must be one of {PROPAGATED_TARGETS}, got "
                             f"{propagated_targets!r}")
        if not isinstance(spec, OccupancySpec):
            raise TypeError(f"GaussianSplatRegularizer: spec must be an OccupancySpec, got {type(spec).__name__}")
        weights = dict(DEFAULT_LOSS_WEIGHTS)
        unknown = sorted(set(loss_weights or {}) - set(weights))
        if unknown:
            raise KeyError(f"GaussianSplatRegularizer: unknown loss_weights {unknown}; known: {sorted(weights)}")
        weights.update({k: float(v) for k, v in (loss_weights or {}).items()})
        if scale <= 0 or depth_scale <= 0:
            raise ValueError(f"GaussianSplatRegularizer: scale and depth_scale must be > 0, got {scale}, {depth_scale}")
        for name, value in (("max_views", max_views), ("render_chunk", render_chunk)):
            if value is not None and int(value) < 1:
                raise ValueError(f"GaussianSplatRegularizer: {name} must be >= 1 or None, got {value}")
        self.mode = mode
        self.grid = spec.grid
        self.voxel_size = spec.grid.voxel_size
        self.free_index = spec.free_index
        self.num_classes = spec.num_classes
        self.register_buffer("semantic_classes",
                             torch.tensor([c for c in range(self.num_classes) if c != self.free_index]),
                             persistent=False)
        self.scale = float(scale)
        self.loss_weights = weights
        self.backend = backend
        self.propagate_by_flow = bool(propagate_by_flow)
        self.propagation_seconds = None if propagation_seconds is None else float(propagation_seconds)
        self.propagated_targets = propagated_targets
        self.flip_render_cameras = bool(flip_render_cameras)
        self.semantic_min_gt_depth = float(semantic_min_gt_depth)
        self.normalize_by_alpha = bool(normalize_by_alpha)
        self.detach_flow_weights = bool(detach_flow_weights)
        self.far_plane = float(far_plane)
        self.max_views = None if max_views is None else int(max_views)
        self.render_chunk = None if render_chunk is None else int(render_chunk)
        self.coverage_threshold = float(coverage_threshold)
        self.depth_scale = float(depth_scale)
        self.near_plane = float(near_plane)
        if not 0 < self.near_plane < self.far_plane:
            raise ValueError(f"GaussianSplatRegularizer: need 0 < near_plane < far_plane, got {near_plane}, {far_plane}")
        self.keep_views = int(keep_views)
        self.decoder = None
        if mode == "decoded":
            if feature_channels is None:
                raise ValueError("GaussianSplatRegularizer: mode='decoded' needs feature_channels (the channels of "
                                 "the head's voxel_features)")
            self.decoder = _GaussianDecoder(int(feature_channels), int(hidden_channels), self.voxel_size, max_offset,
                                            scale_range, self.scale)
        self.last_renders: Dict[str, torch.Tensor] = {}

    @property
    def needs_voxel_features(self) -> bool:
        """Whether ``head_outputs`` must carry ``voxel_features`` (decoded mode only)."""
        return self.decoder is not None

    # ------------------------------------------------------------------ Gaussians
    def sample_inputs(self, sample: dict, device) -> dict:
        """The regularizer's fields of one mapped sample, checked, on ``device``: voxel
        ``indices`` (N, 3), ``viewmats`` (V, 4, 4), ``intrinsics`` (V, 3, 3), ``time_offsets``
        (V,) s, ``frame_offsets`` (V,) int64 (None when the sample has no
        ``render_frame_offsets``), ``width``, ``height`` (views subsampled to ``max_views``),
        and ``adjacent``: with ``propagated_targets="adjacent_gt"`` the adjacent GT points
        {"means" (M, 3), "classes" (M,), "flow" (M, 2), "frame_offsets" (M,)}, else None."""
        token = sample.get("sample_token", "<unknown>")
        needed = ("gaussian_voxel_indices", "occ_semantics", "occ_flow", "render_viewmats", "render_intrinsics",
                  "render_image_size", "render_time_offsets")
        missing = [k for k in needed if k not in sample]
        if missing:
            raise KeyError(f"GaussianSplatRegularizer: sample {token} lacks {missing}; configure the mapper's "
                           "regularizer options (dataloader.train.mapper.regularizer)")
        adjacent = self._adjacent_inputs(sample, token, device) if self.propagated_targets == "adjacent_gt" else None
        indices = torch.as_tensor(sample["gaussian_voxel_indices"], device=device).long()
        viewmats = torch.as_tensor(sample["render_viewmats"], device=device, dtype=torch.float32)
        intrinsics = torch.as_tensor(sample["render_intrinsics"], device=device, dtype=torch.float32)
        time_offsets = torch.as_tensor(sample["render_time_offsets"], device=device, dtype=torch.float32)
        width, height = (int(v) for v in sample["render_image_size"])
        num_views = viewmats.shape[0]
        if indices.dim() != 2 or indices.shape[1] != 3:
            raise ValueError(f"GaussianSplatRegularizer: sample {token} gaussian_voxel_indices has shape "
                             f"{tuple(indices.shape)}, expected (N, 3)")
        if viewmats.shape[1:] != (4, 4) or intrinsics.shape != (num_views, 3, 3) or time_offsets.shape != (num_views,):
            raise ValueError(f"GaussianSplatRegularizer: sample {token} render views disagree: render_viewmats "
                             f"{tuple(viewmats.shape)}, render_intrinsics {tuple(intrinsics.shape)}, "
                             f"render_time_offsets {tuple(time_offsets.shape)}; expected (V, 4, 4), (V, 3, 3), (V,)")
        frame_offsets = None
        if "render_frame_offsets" in sample:
            frame_offsets = torch.as_tensor(sample["render_frame_offsets"], device=device).long()
            if frame_offsets.shape != (num_views,):
                raise ValueError(f"GaussianSplatRegularizer: sample {token} render_frame_offsets has shape "
                                 f"{tuple(frame_offsets.shape)}, expected ({num_views},) like render_viewmats")
        if self.flip_render_cameras:
            viewmats = release_camera_flip(viewmats)
        if self.max_views is not None and num_views > self.max_views:
            keep = torch.randperm(num_views)[: self.max_views].sort().values.to(device)
            viewmats, intrinsics, time_offsets = viewmats[keep], intrinsics[keep], time_offsets[keep]
            frame_offsets = None if frame_offsets is None else frame_offsets[keep]
        return dict(indices=indices, viewmats=viewmats, intrinsics=intrinsics, time_offsets=time_offsets,
                    frame_offsets=frame_offsets, adjacent=adjacent, width=width, height=height, token=token)

    @staticmethod
    def _adjacent_inputs(sample: dict, token: str, device) -> Dict[str, torch.Tensor]:
        """The ``adjacent_gt_*`` fields of one sample, checked, on ``device``."""
        missing = [k for k in ("render_frame_offsets", *ADJACENT_GT_FIELDS) if k not in sample]
        if missing:
            raise KeyError(f"GaussianSplatRegularizer(propagated_targets='adjacent_gt'): sample {token} lacks "
                           f"{missing}; set the mapper's regularizer option adjacent_gt_gaussians > 0 "
                           "(dataloader.train.mapper.regularizer.adjacent_gt_gaussians)")
        adjacent = dict(means=torch.as_tensor(sample["adjacent_gt_means"], device=device, dtype=torch.float32),
                        classes=torch.as_tensor(sample["adjacent_gt_classes"], device=device).long(),
                        flow=torch.as_tensor(sample["adjacent_gt_flow"], device=device, dtype=torch.float32),
                        frame_offsets=torch.as_tensor(sample["adjacent_gt_frame_offsets"], device=device).long())
        count = adjacent["means"].shape[0]
        expected = dict(means=(count, 3), classes=(count,), flow=(count, 2), frame_offsets=(count,))
        if any(tuple(adjacent[k].shape) != shape for k, shape in expected.items()):
            shapes = {f"adjacent_gt_{k}": tuple(v.shape) for k, v in adjacent.items()}
            raise ValueError(f"GaussianSplatRegularizer: sample {token} adjacent GT fields disagree: {shapes}; "
                             "expected (M, 3), (M,), (M, 2), (M,)")
        return adjacent

    def predicted_gaussians(self, voxel_outputs: Dict[str, torch.Tensor], indices: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The prediction's Gaussians at the sampled voxels of one sample.

        Args:
            voxel_outputs: the head outputs at those voxels (:func:`gather_voxels`):
                "occ_logits" (N, num_classes), "flow" (N, 2) and, in decoded mode,
                "voxel_features" (N, F).
            indices: (N, 3) voxel indices [x, y, z].
        Returns {"means" (N, 3) m, "quats" (N, 4), "scales" (N, 3) m, "opacities" (N,),
        "features" (N, num_classes - 1 + 2): non-free logits then (vx, vy), "flow" (N, 2)}.
        """
        logits, flow = voxel_outputs["occ_logits"].float(), voxel_outputs["flow"].float()
        means = self.grid.index_to_center(indices)
        n = means.shape[0]
        if self.decoder is None:
            quats = means.new_tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4)
            scales = means.new_full((n, 3), self.scale)
            opacities = torch.sigmoid(-logits[:, self.free_index])
        else:
            offset, scales, quats, opacities = self.decoder(voxel_outputs["voxel_features"].float())
            means = means + offset
        features = torch.cat([logits.index_select(1, self.semantic_classes), flow], dim=1)
        return dict(means=means, quats=quats, scales=scales, opacities=opacities, features=features, flow=flow)

    def gt_gaussians(self, sample: dict, indices: torch.Tensor) -> Dict[str, torch.Tensor]:
        """GT Gaussians at the sampled voxels whose class is not free (nor outside the label
        set): one-hot non-free class + GT flow, opacity 1, isotropic ``scale``."""
        device = indices.device
        x, y, z = indices.unbind(-1)
        semantics = torch.as_tensor(sample["occ_semantics"], device=device).long()[x, y, z]
        flow = torch.as_tensor(sample["occ_flow"], device=device).float()[x, y, z]
        return self._labelled_gaussians(self.grid.index_to_center(indices), semantics, flow)

    def adjacent_gt_gaussians(self, adjacent: Dict[str, torch.Tensor], frame_offset: int) -> Dict[str, torch.Tensor]:
        """GT Gaussians of keyframe t + ``frame_offset``: the adjacent points of that offset
        (``adjacent`` from :meth:`sample_inputs`), built like :meth:`gt_gaussians`."""
        of_offset = adjacent["frame_offsets"] == int(frame_offset)
        return self._labelled_gaussians(adjacent["means"][of_offset], adjacent["classes"][of_offset],
                                        adjacent["flow"][of_offset])

    def _labelled_gaussians(self, means: torch.Tensor, semantics: torch.Tensor,
                            flow: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Target Gaussians at ``means`` (M, 3) m with classes (M,) and flow (M, 2) m/s, those
        whose class is free or outside the label set dropped: one-hot non-free class + flow,
        opacity 1, isotropic ``scale``, identity rotation."""
        flow = torch.nan_to_num(flow.float(), nan=0.0, posinf=0.0, neginf=0.0)
        occupied = (semantics != self.free_index) & (semantics >= 0) & (semantics < self.num_classes)
        means, semantics, flow = means[occupied].float(), semantics[occupied], flow[occupied]
        # class c -> its channel among the non-free classes
        channel = semantics - (semantics > self.free_index).long()
        one_hot = F.one_hot(channel, self.num_classes - 1).float()
        n = means.shape[0]
        return dict(means=means, quats=means.new_tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4),
                    scales=means.new_full((n, 3), self.scale), opacities=means.new_ones(n),
                    features=torch.cat([one_hot, flow], dim=1), flow=flow)

    # ------------------------------------------------------------------ rendering
    def render(self, gaussians: Dict[str, torch.Tensor], views: dict, displacement: Optional[torch.Tensor] = None,
               features: Optional[torch.Tensor] = None, detach_geometry: bool = False):
        """Render ``gaussians`` into the views; ``displacement`` (V, N, 3) moves them per view.

        ``features`` (N, D) replaces the Gaussians' features; ``detach_geometry`` cuts the
        gradient to everything but the features and the displacement (positions, when not
        displaced, shapes and opacities).
        Returns features (V, H, W, D), alphas (V, H, W), accumulated depths (V, H, W).
        """
        num_views = views["viewmats"].shape[0]
        means, quats, scales, opacities = (gaussians[k] for k in ("means", "quats", "scales", "opacities"))
        if detach_geometry:
            means, quats, scales, opacities = means.detach(), quats.detach(), scales.detach(), opacities.detach()
        if displacement is not None:
            means = means[None] + displacement
        features = gaussians["features"] if features is None else features
        chunk = self.render_chunk or num_views
        rendered = []
        # Rasterize in float32 even inside a mixed-precision training step.
        with torch.autocast(device_type=means.device.type, enabled=False):
            for start in range(0, num_views, chunk):
                group = slice(start, start + chunk)
                rendered.append(rasterize_gaussians(
                    means if displacement is None else means[group], quats, scales, opacities, features,
                    views["viewmats"][group], views["intrinsics"][group], views["width"], views["height"],
                    near_plane=self.near_plane, far_plane=self.far_plane, backend=self.backend))
        return tuple(torch.cat(parts) for parts in zip(*rendered))

    def target_render(self, gt: Dict[str, torch.Tensor], views: dict, propagated: bool):
        """The GT render of one state, as :meth:`render` returns it: the current state renders
        ``gt`` as it is; the propagated state moves it by its flow x :meth:`propagation_times`
        (``"moved_gt"``) or, with ``"adjacent_gt"``, renders into the views of each effective
        frame offset o (``views["frame_offsets"]``) the Gaussians of keyframe t+o
        (:meth:`adjacent_gt_gaussians`; ``gt`` for o = 0), unmoved."""
        if not propagated:
            return self.render(gt, views)
        if self.propagated_targets == "moved_gt":
            times = self.propagation_times(views["time_offsets"])
            return self.render(gt, views, self.flow_displacement(gt["flow"], times))
        frame_offsets = views["frame_offsets"]
        rendered = None
        for offset in torch.unique(frame_offsets).tolist():
            group = (frame_offsets == offset).nonzero()[:, 0]
            gaussians = gt if offset == 0 else self.adjacent_gt_gaussians(views["adjacent"], offset)
            part = self.render(gaussians, dict(views, viewmats=views["viewmats"][group],
                                               intrinsics=views["intrinsics"][group],
                                               time_offsets=views["time_offsets"][group], frame_offsets=None))
            if rendered is None:
                rendered = tuple(p.new_zeros((len(frame_offsets),) + p.shape[1:]) for p in part)
            for whole, piece in zip(rendered, part):
                whole[group] = piece
        return rendered

    def propagation_times(self, time_offsets: torch.Tensor) -> torch.Tensor:
        """(V,) seconds by which each view's Gaussians move in the propagated state:
        ``propagation_seconds`` for every view (released: 1 s), else the view's own offset."""
        if self.propagation_seconds is None:
            return time_offsets
        return torch.full_like(time_offsets, self.propagation_seconds)

    def flow_displacement(self, flow: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """(V, N, 3) per-view displacement ``(vx t, vy t, 0)`` of Gaussians with (N, 2) flow,
        ``times`` (V,) seconds (see :meth:`propagation_times`)."""
        xy = times[:, None, None] * flow[None]
        return F.pad(xy, (0, 1))

    # ------------------------------------------------------------------ losses
    def _loss_terms(self, pred, gt, pred_flow_render: Optional[torch.Tensor],
                    flow_loss_enabled: bool) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """(numerator, denominator) of each loss over the pixels of one set of renders; the
        batch's losses divide the summed numerators by the summed denominators."""
        pred_features, pred_alphas, pred_depths = pred
        gt_features, gt_alphas, gt_depths = gt
        k = self.num_classes - 1
        logits, pred_flow = pred_features.split([k, 2], dim=-1)
        if pred_flow_render is not None:
            pred_flow = pred_flow_render
        gt_classes, gt_flow = gt_features.split([k, 2], dim=-1)
        terms = {}
        foreground = gt_depths > self.semantic_min_gt_depth
        cross_entropy = -(gt_classes[foreground] * F.log_softmax(logits[foreground], dim=-1)).sum()
        terms["semantic"] = (cross_entropy, foreground.sum().to(cross_entropy.dtype))
        if self.normalize_by_alpha:
            both = (gt_alphas > self.coverage_threshold) & (pred_alphas > self.coverage_threshold)
            pred_alpha, gt_alpha = pred_alphas[both][:, None], gt_alphas[both][:, None]
            depth_error = (pred_depths[both] / pred_alpha[:, 0] - gt_depths[both] / gt_alpha[:, 0]).abs()
            pred_flow, gt_flow = pred_flow[both] / pred_alpha, gt_flow[both] / gt_alpha
        else:
            depth_error = (pred_depths - gt_depths).abs().flatten()
            pred_flow, gt_flow = pred_flow.reshape(-1, 2), gt_flow.reshape(-1, 2)
        terms["depth"] = (depth_error.sum() / self.depth_scale, depth_error.new_tensor(float(depth_error.numel())))
        if flow_loss_enabled:
            weight = gt_flow.norm(dim=-1) + 0.1
            terms["flow"] = ((weight * (pred_flow - gt_flow).abs().sum(-1)).sum(), weight.sum())
        else:
            terms["flow"] = (pred_flow.sum() * 0.0, pred_flow.new_zeros(()))
        return terms

    def forward(self, batched_inputs: List[dict], head_outputs: Dict[str, torch.Tensor],
                flow_loss_enabled: bool) -> Dict[str, torch.Tensor]:
        device = head_outputs["occ_logits"].device
        sums = {name: [] for name in self.loss_weights}
        self.last_renders = {}
        inputs = [self.sample_inputs(sample, device) for sample in batched_inputs]
        keys = ["occ_logits", "flow"] + (["voxel_features"] if self.needs_voxel_features else [])
        missing = [k for k in keys if k not in head_outputs]
        if missing:
            raise KeyError(f"GaussianSplatRegularizer(mode={self.mode!r}) needs head_outputs {missing}")
        counts = [len(views["indices"]) for views in inputs]
        batch_ids = torch.repeat_interleave(torch.arange(len(inputs), device=device), torch.tensor(counts, device=device))
        all_indices = torch.cat([views["indices"] for views in inputs])
        # One gather per head output for the whole batch: its backward fills a full-size
        # gradient once instead of once per sample.
        gathered = {k: gather_voxels(head_outputs[k], batch_ids, all_indices).split(counts) for k in keys}
        for batch_index, (sample, views) in enumerate(zip(batched_inputs, inputs)):
            pred = self.predicted_gaussians({k: v[batch_index] for k, v in gathered.items()}, views["indices"])
            with torch.no_grad():
                gt = self.gt_gaussians(sample, views["indices"])
            states = [None]
            if flow_loss_enabled and self.propagate_by_flow:
                states.append(self.flow_displacement(pred["flow"], self.propagation_times(views["time_offsets"])))
            for state, pred_move in enumerate(states):
                with torch.no_grad():
                    gt_render = self.target_render(gt, views, propagated=pred_move is not None)
                pred_render = self.render(pred, views, pred_move)
                pred_flow_render = None
                if self.detach_flow_weights and flow_loss_enabled:
                    pred_flow_render = self.render(pred, views, pred_move, features=pred["flow"],
                                                   detach_geometry=True)[0]
                for name, term in self._loss_terms(pred_render, gt_render, pred_flow_render,
                                                   flow_loss_enabled).items():
                    sums[name].append(term)
                if batch_index == 0 and state == 0:
                    self._keep_renders(pred_render, gt_render)
        losses = {}
        for name, terms in sums.items():
            numerator = torch.stack([t[0] for t in terms]).sum()
            denominator = torch.stack([t[1] for t in terms]).sum()
            # No pixel to supervise (e.g. nothing in view): a zero that keeps the graph.
            value = numerator / denominator if bool(denominator > 0) else numerator * 0.0
            losses[f"loss_splat_{name}"] = self.loss_weights[name] * value
        return losses

    @torch.no_grad()
    def _keep_renders(self, pred_render, gt_render) -> None:
        """Stash a few views (CPU, detached) with class scores over all ``num_classes``
        channels (free at -inf), as ``render_to_color`` expects."""
        views = min(self.keep_views, pred_render[0].shape[0])
        if views <= 0:
            return
        k = self.num_classes - 1
        stash = {}
        for prefix, (features, alphas, depths) in (("pred", pred_render), ("gt", gt_render)):
            scores = features[:views, ..., :k].detach().float().cpu()
            full = scores.new_full(scores.shape[:-1] + (self.num_classes,), float("-inf"))
            full[..., self.semantic_classes.cpu()] = scores
            stash[f"{prefix}_features"] = full
            stash[f"{prefix}_alphas"] = alphas[:views].detach().float().cpu()
            stash[f"{prefix}_depths"] = depths[:views].detach().float().cpu()
        self.last_renders = stash
