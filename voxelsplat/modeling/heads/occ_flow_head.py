"""Occupancy + flow head (FB-Occ's ``OccFlowHead``): fuse the encoder's levels at twice the
finest level's resolution with per-voxel soft weights, then predict per-voxel class logits
and a 2D velocity."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...structures import OccupancySpec
from ..layers import maybe_checkpoint

__all__ = ["OccFlowHead"]


def _voxel_mlp(in_channels: int, hidden_channels: int, out_channels: int, activation: nn.Module) -> nn.Sequential:
    """1x1x1 conv -> BN -> activation -> 1x1x1 conv, no biases (released); ``hidden_channels=0``:
    one 1x1x1 conv with a bias."""
    if not hidden_channels:
        return nn.Sequential(nn.Conv3d(in_channels, out_channels, 1))
    return nn.Sequential(
        nn.Conv3d(in_channels, hidden_channels, 1, bias=False),
        nn.BatchNorm3d(hidden_channels),
        activation,
        nn.Conv3d(hidden_channels, out_channels, 1, bias=False),
    )


def _pointwise(volume: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A 1x1x1 convolution as a matrix product over channels: (B, C, ...) -> (B, O, ...) with
    ``weight`` (O, C[, 1, 1, 1]). The same map as ``F.conv3d``, several times faster on a CPU
    for the narrow layers run at every voxel of the fusion grid."""
    out = torch.matmul(weight.flatten(1), volume.flatten(2))
    if bias is not None:
        out = out + bias[:, None]
    return out.view(volume.shape[0], weight.shape[0], *volume.shape[2:])


def _run_voxel_mlp(mlp: nn.Sequential, volume: torch.Tensor) -> torch.Tensor:
    for layer in mlp:
        volume = _pointwise(volume, layer.weight, layer.bias) if isinstance(layer, nn.Conv3d) else layer(volume)
    return volume


def _subvoxel_shuffle(volume: torch.Tensor, channels: int, factors: Tuple[int, int, int]) -> torch.Tensor:
    """(B, channels * fx * fy * fz, X, Y, Z) -> (B, channels, X fx, Y fy, Z fz): channel
    ``c * fx fy fz + (a fy + b) fz + d`` is child voxel (a, b, d) of its parent (a 3D pixel shuffle)."""
    b, _, x, y, z = volume.shape
    fx, fy, fz = factors
    volume = volume.reshape(b, channels, fx, fy, fz, x, y, z).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return volume.reshape(b, channels, x * fx, y * fy, z * fz)


def _resample(volume: torch.Tensor, size: Tuple[int, ...]) -> torch.Tensor:
    if tuple(volume.shape[2:]) == tuple(size):
        return volume
    return F.interpolate(volume, size=size, mode="trilinear", align_corners=False)


class OccFlowHead(nn.Module):
    """The released head, for L encoder levels (finest first):

        D   = ReLU(BN(deconv(v_0)))              # kernel 2, stride 2: twice the finest resolution
        c_i = ReLU(BN(conv3x3x3(v_i)))           # i = 0 .. L-1
        w   = softmax over the L+1 parts of MLP_w(D)   (1x1x1 -> BN -> ReLU -> 1x1x1), per voxel
        f   = w_0 D + sum_i w_(i+1) up(c_i)      # up: trilinear (align_corners=False) to D's grid
        occ_logits = MLP_occ(f)   (1x1x1 -> BN -> ReLU -> 1x1x1)
        flow       = MLP_flow(f)  (1x1x1 -> BN -> Softplus -> 1x1x1), m/s

    Every conv is without bias and keeps PyTorch's default initialisation, as released. The
    fusion grid (D's) is the GT grid in the released setting (100x100x8 levels -> 200x200x16);
    when ``output_shape`` differs, logits, flow and features are trilinearly resampled to it,
    or, with ``subvoxel_factors``, logits and flow are predicted per child voxel.

    Args:
        in_channels: channels of each level (an int for all; released: 256).
        mid_channels: channels of D, c_i and f (released: in_channels // 2 = 128; None: that).
        spec: the dataset's :class:`~voxelsplat.structures.OccupancySpec`: gives ``num_classes``
            (17 for OpenOcc v2, 18 for Occ3D) and ``output_shape`` (its grid's X, Y, Z).
        num_classes, output_shape: the same two parts given directly, without a spec.
        hidden_channels: hidden width of the three per-voxel MLPs (released: mid_channels // 2
            = 64; None: that; 0: each MLP is one 1x1x1 conv with a bias).
        flow_hidden_channels: the flow MLP's own hidden width (None: ``hidden_channels``; 0:
            one 1x1x1 conv with a bias), e.g. the released flow MLP beside linear classifiers.
        flow_dims: velocity components (2: vx, vy).
        grad_checkpointing: recompute the deconvolution, the level convs and the fusion with
            the MLPs in the backward pass.
        num_levels: encoder levels when ``in_channels`` is an int (released: 3, the default).
        subvoxel_factors: (fx, fy, fz) from D's grid to ``output_shape``. When given, the last
            layers of the occupancy and flow MLPs predict every child voxel of a D voxel apart
            (num_classes x fx fy fz and flow_dims x fx fy fz outputs, rearranged onto the output
            grid), instead of trilinear resampling, which gives a child the blend of its
            neighbours: e.g. a one-voxel ground layer and the free layer above it, which share a
            0.8 m voxel, can get different classes. Not released (the released fusion grid is the
            output grid); None (default): trilinear resampling.

    Forward: list of ``num_levels`` volumes (B, in_channels, X_i, Y_i, Z_i), finest first
        [, return_features] -> dict with ``occ_logits`` (B, num_classes, X, Y, Z), ``flow``
        (B, flow_dims, X, Y, Z) in m/s and ``voxel_features`` (B, mid_channels, X, Y, Z): f,
        the features the MLPs read (left out when ``return_features`` is False).
    """

    def __init__(self, in_channels: Union[int, Sequence[int]], mid_channels: Optional[int] = None, *,
                 spec: Optional[OccupancySpec] = None, num_classes: Optional[int] = None,
                 output_shape: Optional[Sequence[int]] = None, hidden_channels: Optional[int] = None,
                 flow_dims: int = 2, grad_checkpointing: bool = False, num_levels: Optional[int] = None,
                 subvoxel_factors: Optional[Sequence[int]] = None, flow_hidden_channels: Optional[int] = None):
        super().__init__()
        if spec is not None:
            for key, given, from_spec in (("num_classes", num_classes, spec.num_classes),
                                          ("output_shape", output_shape, spec.grid.shape)):
                if given is not None and tuple(np.atleast_1d(given)) != tuple(np.atleast_1d(from_spec)):
                    raise ValueError(f"OccFlowHead: {key} {given} disagrees with the spec's {from_spec} "
                                     f"({spec.describe()})")
            num_classes, output_shape = spec.num_classes, spec.grid.shape
        if num_classes is None or output_shape is None:
            raise ValueError("OccFlowHead: needs spec (an OccupancySpec) or both num_classes and output_shape")
        if isinstance(in_channels, int):
            num_levels = 3 if num_levels is None else num_levels
            in_channels = [in_channels] * int(num_levels)
        in_channels = [int(c) for c in in_channels]
        if num_levels is not None and len(in_channels) != num_levels:
            raise ValueError(f"OccFlowHead: in_channels {in_channels} disagree with num_levels {num_levels}")
        if not in_channels or min(in_channels) < 1:
            raise ValueError(f"OccFlowHead: in_channels must be positive, got {in_channels}")
        if len(output_shape) != 3:
            raise ValueError(f"OccFlowHead: output_shape must be (X, Y, Z), got {output_shape}")
        mid_channels = in_channels[0] // 2 if mid_channels is None else int(mid_channels)
        hidden_channels = mid_channels // 2 if hidden_channels is None else int(hidden_channels)
        flow_hidden_channels = hidden_channels if flow_hidden_channels is None else int(flow_hidden_channels)
        for name, value, low in (("mid_channels", mid_channels, 1), ("hidden_channels", hidden_channels, 0),
                                 ("flow_hidden_channels", flow_hidden_channels, 0),
                                 ("num_classes", num_classes, 1), ("flow_dims", flow_dims, 1)):
            if value < low:
                raise ValueError(f"OccFlowHead: {name} must be >= {low}, got {value}")
        self.output_shape = tuple(int(v) for v in output_shape)
        self.num_classes = int(num_classes)
        self.num_levels = len(in_channels)
        self.flow_dims = int(flow_dims)
        self.mid_channels = mid_channels
        self.hidden_channels = hidden_channels
        self.flow_hidden_channels = flow_hidden_channels
        self.subvoxel_factors = None
        if subvoxel_factors is not None:
            factors = tuple(int(f) for f in subvoxel_factors)
            if len(factors) != 3 or min(factors) < 1 or tuple(subvoxel_factors) != factors:
                raise ValueError(f"OccFlowHead: subvoxel_factors must be three positive integers (fx, fy, fz), got "
                                 f"{subvoxel_factors}")
            self.subvoxel_factors = factors
        children = int(np.prod(self.subvoxel_factors or (1,)))
        self.feature_channels = mid_channels
        self.deblock = nn.Sequential(
            nn.ConvTranspose3d(in_channels[0], mid_channels, kernel_size=2, stride=2, bias=False),
            nn.BatchNorm3d(mid_channels),
            nn.ReLU(inplace=True),
        )
        self.level_convs = nn.ModuleList(
            nn.Sequential(nn.Conv3d(c, mid_channels, 3, padding=1, bias=False), nn.BatchNorm3d(mid_channels),
                          nn.ReLU(inplace=True))
            for c in in_channels
        )
        self.level_weights = _voxel_mlp(mid_channels, hidden_channels, self.num_levels + 1, nn.ReLU(inplace=True))
        self.occ_mlp = _voxel_mlp(mid_channels, hidden_channels, self.num_classes * children, nn.ReLU(inplace=True))
        self.flow_mlp = _voxel_mlp(mid_channels, flow_hidden_channels, self.flow_dims * children, nn.Softplus())
        self.grad_checkpointing = grad_checkpointing

    # ------------------------------------------------------------------ parts
    @property
    def classifier(self) -> nn.Conv3d:
        """The layer that outputs the class logits (the occupancy MLP's last; with
        ``subvoxel_factors``, those of every child voxel)."""
        return self.occ_mlp[-1]

    def soft_weights(self, deblocked: torch.Tensor) -> torch.Tensor:
        """Per-voxel soft weights (B, num_levels + 1, ...) of [D, c_0, ..., c_(L-1)]; sum to 1."""
        return torch.softmax(_run_voxel_mlp(self.level_weights, deblocked), dim=1)

    def _first_layers(self, features: torch.Tensor) -> torch.Tensor:
        """The first 1x1x1 layers of the occupancy and flow MLPs at once: (B, M, ...) -> (B, 2H, ...)."""
        return _pointwise(features, torch.cat([self.occ_mlp[0].weight, self.flow_mlp[0].weight]))

    def _fuse_and_predict(self, deblocked: torch.Tensor, *levels: torch.Tensor, project_first: bool):
        """At D's grid: (occupancy logits and flow concatenated, f or None).

        ``project_first``: the MLPs' first layer is linear and f is a convex combination of
        trilinear upsamplings (weights summing to 1), so that layer can act on each part before
        the upsampling: the same result, cheaper when the layer is narrower than the parts, and
        f itself is never built.
        """
        weights = self.soft_weights(deblocked)
        parts = (deblocked,) + levels
        if project_first:
            parts = tuple(self._first_layers(part) for part in parts)
        size = tuple(deblocked.shape[2:])
        fused = None
        for k, part in enumerate(parts):
            term = weights[:, k:k + 1] * _resample(part, size)
            fused = term if fused is None else fused + term
        if self.hidden_channels and self.flow_hidden_channels:
            first = fused if project_first else self._first_layers(fused)
            occ_first, flow_first = first.split([self.hidden_channels, self.flow_hidden_channels], dim=1)
            predicted = torch.cat([_run_voxel_mlp(self.occ_mlp[1:], occ_first),
                                   _run_voxel_mlp(self.flow_mlp[1:], flow_first)], dim=1)
        elif self.hidden_channels or self.flow_hidden_channels:  # one MLP, one linear layer
            predicted = torch.cat([_run_voxel_mlp(self.occ_mlp, fused), _run_voxel_mlp(self.flow_mlp, fused)], dim=1)
        else:  # single linear layers: one product for both
            occ_linear, flow_linear = self.occ_mlp[0], self.flow_mlp[0]
            predicted = _pointwise(fused, torch.cat([occ_linear.weight, flow_linear.weight]),
                                   torch.cat([occ_linear.bias, flow_linear.bias]))
        return predicted, (None if project_first else fused)

    def _children(self, predicted: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-child logits and flow at D's grid -> (occupancy logits, flow) on the output grid."""
        factors = self.subvoxel_factors
        reached = tuple(s * f for s, f in zip(predicted.shape[2:], factors))
        if reached != self.output_shape:
            raise ValueError(f"OccFlowHead: subvoxel_factors {factors} take the fusion grid {tuple(predicted.shape[2:])} "
                             f"to {reached}, not to the output grid {self.output_shape}")
        children = int(np.prod(factors))
        occ, flow = predicted.split([self.num_classes * children, self.flow_dims * children], dim=1)
        return _subvoxel_shuffle(occ, self.num_classes, factors), _subvoxel_shuffle(flow, self.flow_dims, factors)

    # ------------------------------------------------------------------ forward
    def forward(self, volumes: Union[Sequence[torch.Tensor], torch.Tensor],
                return_features: bool = True) -> Dict[str, torch.Tensor]:
        """``return_features=False`` may leave ``voxel_features`` out (and lets the MLPs' first
        layer run before the fusion where that is cheaper)."""
        volumes: List[torch.Tensor] = [volumes] if torch.is_tensor(volumes) else list(volumes)
        if len(volumes) != self.num_levels:
            raise ValueError(f"OccFlowHead: expected {self.num_levels} encoder levels (finest first), got "
                             f"{len(volumes)}")
        checkpointing = self.grad_checkpointing and self.training
        deblocked = maybe_checkpoint(self.deblock, volumes[0], enabled=checkpointing)
        levels = [maybe_checkpoint(conv, volume, enabled=checkpointing)
                  for conv, volume in zip(self.level_convs, volumes)]
        both_hidden = self.hidden_channels > 0 and self.flow_hidden_channels > 0
        project_first = (not return_features and both_hidden
                         and self.hidden_channels + self.flow_hidden_channels < self.mid_channels)

        def fuse_and_predict(*inputs):
            return self._fuse_and_predict(*inputs, project_first=project_first)

        if checkpointing and (deblocked.requires_grad or any(level.requires_grad for level in levels)):
            predicted, features = checkpoint(fuse_and_predict, deblocked, *levels, use_reentrant=False)
        else:
            predicted, features = fuse_and_predict(deblocked, *levels)
        # The released setting predicts at the GT grid already; elsewhere the predictions are
        # resampled (cheaper than running the MLPs at the finer grid).
        if self.subvoxel_factors is None:
            occ_logits, flow = _resample(predicted, self.output_shape).split([self.num_classes, self.flow_dims], dim=1)
        else:
            occ_logits, flow = self._children(predicted)
        outputs = {"occ_logits": occ_logits, "flow": flow}
        if return_features:
            outputs["voxel_features"] = _resample(features, self.output_shape)
        return outputs
