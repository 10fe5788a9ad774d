"""Camera-aware depth network (BEVDepth / FB-Occ ``CM_DepthNet``) and its LiDAR depth loss.

Per image-feature pixel it predicts a categorical distribution over depth bins and a
context feature. The camera's parameters (intrinsics, image augmentation, BEV augmentation,
camera-to-ego pose; 27 numbers) are batch-normalized and turned, by one MLP per branch, into
squeeze-and-excitation gates on the shared trunk, so the network can account for the
geometry it is looking through. The depth branch is residual blocks, an atrous spatial
pyramid (ASPP) and a 1x1 classifier over the bins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import BasicBlock2d, maybe_checkpoint

__all__ = [
    "DepthBins", "BIN_POSITIONS", "depth_bin_values", "CAMERA_PARAMETER_NAMES", "CAMERA_PARAMETER_DIM",
    "camera_parameter_vector", "lidar_depth_to_bins", "depth_bce_loss", "AtrousSpatialPyramid", "CameraAwareDepthNet",
]

# Where a frustum point of bin i sits along the ray: at the bin's lower edge (the release's
# ``torch.arange(start, stop, step)``) or at its centre.
BIN_POSITIONS = ("start", "center")


@dataclass(frozen=True)
class DepthBins:
    """Uniform depth bins ``[start + i*step, start + (i+1)*step)``, i = 0..num_bins-1, metres
    along the camera's optical axis. Published FB-Occ: (2.0, 42.0, 0.5) -> 80 bins.

    The released model places the frustum point of bin ``i`` at the bin START
    ``start + i * step`` (see :func:`depth_bin_values`).
    """

    start: float
    stop: float
    step: float

    @classmethod
    def from_config(cls, bounds: Sequence[float]) -> "DepthBins":
        if len(bounds) != 3 or not bounds[2] > 0 or not bounds[1] > bounds[0] > 0:
            raise ValueError(f"DepthBins: depth_bins must be (start > 0, stop > start, step > 0) in metres, "
                             f"got {tuple(bounds)}")
        return cls(float(bounds[0]), float(bounds[1]), float(bounds[2]))

    @property
    def num_bins(self) -> int:
        return int(round((self.stop - self.start) / self.step))

    def values(self, bin_position: str = "start", device=None, dtype=torch.float32) -> torch.Tensor:
        """(D,) depth (m) that stands for each bin: its lower edge (``"start"``, the release)
        or its centre (``"center"``)."""
        if bin_position not in BIN_POSITIONS:
            raise ValueError(f"DepthBins: bin_position must be one of {BIN_POSITIONS}, got {bin_position!r}")
        offset = 0.0 if bin_position == "start" else 0.5
        return self.start + self.step * (torch.arange(self.num_bins, device=device, dtype=dtype) + offset)

    def starts(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """(D,) lower bin edges in metres (the released frustum depths)."""
        return self.values("start", device=device, dtype=dtype)

    def centers(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """(D,) bin centres in metres."""
        return self.values("center", device=device, dtype=dtype)

    def index_of(self, depth: torch.Tensor) -> torch.Tensor:
        """Bin index (int64) of each depth; -1 where the depth is outside [start, stop) or not finite."""
        index = torch.floor((depth - self.start) / self.step)
        valid = torch.isfinite(depth) & (index >= 0) & (index < self.num_bins)
        return torch.where(valid, index, torch.full_like(index, -1)).long()

    def clamped_index(self, depth: torch.Tensor) -> torch.Tensor:
        """Bin index (int64) of each depth, clamped into [0, num_bins - 1]: the bin whose
        start is the largest one not above the depth (the release's depth lookup at a
        backward-projection reference point). Non-finite depths map to bin 0."""
        index = torch.floor((depth - self.start) / self.step)
        index = torch.nan_to_num(index, nan=0.0, posinf=self.num_bins - 1, neginf=0.0)
        return index.clamp(0, self.num_bins - 1).long()


def depth_bin_values(bins, bin_position: str = "start", device=None, dtype=torch.float32) -> torch.Tensor:
    """(D,) depth in metres at which the frustum point of each bin sits.

    Args:
        bins: a :class:`DepthBins` or its (start, stop, step) bounds.
        bin_position: ``"start"`` (the release: ``start + i * step``) or ``"center"``
            (``start + (i + 0.5) * step``).
    """
    if not isinstance(bins, DepthBins):
        bins = DepthBins.from_config(bins)
    return bins.values(bin_position, device=device, dtype=dtype)


# The release's order: intrinsics (source pixels), image-augmentation 2x3 row by row,
# BEV-augmentation entries, camera -> un-augmented ego 3x4 row by row.
CAMERA_PARAMETER_NAMES = (
    "fx", "fy", "cx", "cy",
    "img_aug_00", "img_aug_01", "img_aug_02", "img_aug_10", "img_aug_11", "img_aug_12",
    "bda_00", "bda_01", "bda_10", "bda_11", "bda_22",
    *(f"cam2ego_{row}{col}" for row in range(3) for col in range(4)),
)
CAMERA_PARAMETER_DIM = len(CAMERA_PARAMETER_NAMES)  # 27


def camera_parameter_vector(intrinsics: torch.Tensor, img_aug: torch.Tensor, cam2ego: torch.Tensor,
                            bda: torch.Tensor) -> torch.Tensor:
    """The camera description fed to the depth net, in the release's units and order
    (:data:`CAMERA_PARAMETER_NAMES`).

    The release builds it from the un-augmented quantities: intrinsics in source-image
    pixels, the image augmentation as ``p_aug = R p + t`` (pixels), five entries of the BEV
    rotation, and the camera -> ego pose before BEV augmentation. They are recovered here
    as ``K = img_aug^-1 @ intrinsics`` and ``cam2ego_raw = bda^-1 @ cam2ego``. Raw pixel and
    metre units are kept on purpose: the depth net batch-normalizes each entry.

    Args:
        intrinsics: (B, N, 3, 3) intrinsics after image augmentation (``img_aug @ K``, pixels).
        img_aug: (B, N, 3, 3) image-augmentation pixel transform (source -> augmented pixels).
        cam2ego: (B, N, 4, 4) camera (OpenCV) -> BEV-augmented ego (``bda @ cam2ego_raw``, metres).
        bda: (B, 4, 4) BEV augmentation acting on ego-frame points.
    Returns:
        (B, N, CAMERA_PARAMETER_DIM) in the dtype of ``intrinsics`` (computed in float64).
    """
    if intrinsics.dim() != 4 or intrinsics.shape[-2:] != (3, 3):
        raise ValueError(f"camera_parameter_vector: intrinsics must be (B, N, 3, 3), got {tuple(intrinsics.shape)}")
    b, n = intrinsics.shape[:2]
    if img_aug.shape != (b, n, 3, 3):
        raise ValueError(f"camera_parameter_vector: img_aug must be {(b, n, 3, 3)}, got {tuple(img_aug.shape)}")
    if cam2ego.shape != (b, n, 4, 4):
        raise ValueError(f"camera_parameter_vector: cam2ego must be {(b, n, 4, 4)}, got {tuple(cam2ego.shape)}")
    if bda.shape != (b, 4, 4):
        raise ValueError(f"camera_parameter_vector: bda must be {(b, 4, 4)}, got {tuple(bda.shape)}")
    wide = torch.float64
    source_intrinsics = torch.linalg.solve(img_aug.to(wide), intrinsics.to(wide))
    raw_cam2ego = torch.linalg.solve(bda.to(wide)[:, None].expand(b, n, 4, 4), cam2ego.to(wide))
    bda_rot = bda.to(wide)[:, None, :3, :3].expand(b, n, 3, 3)
    vector = torch.cat([
        torch.stack([source_intrinsics[..., 0, 0], source_intrinsics[..., 1, 1],
                     source_intrinsics[..., 0, 2], source_intrinsics[..., 1, 2]], dim=-1),
        img_aug.to(wide)[..., :2, :3].flatten(-2),
        torch.stack([bda_rot[..., 0, 0], bda_rot[..., 0, 1], bda_rot[..., 1, 0], bda_rot[..., 1, 1],
                     bda_rot[..., 2, 2]], dim=-1),
        raw_cam2ego[..., :3, :4].flatten(-2),
    ], dim=-1)
    return vector.to(intrinsics.dtype)


def lidar_depth_to_bins(lidar_depth: torch.Tensor, stride: int, bins: DepthBins) -> torch.Tensor:
    """Depth-bin targets at the feature resolution from a LiDAR depth image.

    Returns outside ``[bins.start, bins.stop)`` are dropped first (as the release drops
    them when it projects the points); each ``stride x stride`` patch then takes the
    minimum remaining depth (the nearest surface), which is binned.

    Args:
        lidar_depth: (..., H, W) metres, 0 (or negative / non-finite) = no return.
        stride: feature stride; H and W must be multiples of it.
    Returns:
        (..., H/stride, W/stride) int64 bin indices, -1 where the patch has no return in range.
    """
    height, width = lidar_depth.shape[-2:]
    if height % stride or width % stride:
        raise ValueError(f"lidar_depth_to_bins: lidar_depth of size {height}x{width} is not a multiple of the "
                         f"feature stride {stride}")
    valid = torch.isfinite(lidar_depth) & (lidar_depth >= bins.start) & (lidar_depth < bins.stop)
    depth = torch.where(valid, lidar_depth, torch.full_like(lidar_depth, float("inf")))
    lead = depth.shape[:-2]
    depth = depth.reshape(*lead, height // stride, stride, width // stride, stride)
    nearest = depth.amin(dim=(-3, -1))
    return bins.index_of(nearest)


def depth_bce_loss(depth_logits: torch.Tensor, target_bins: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy between the softmax depth distribution and one-hot LiDAR bins,
    summed over bins and averaged over foreground (valid) pixels.

    Args:
        depth_logits: (M, D, h, w).
        target_bins: (M, h, w) int64, -1 = no target.
    Returns:
        scalar (0 with a zero gradient when no pixel has a target).
    """
    # At least float32 (mixed precision), float64 kept.
    logits = depth_logits.to(torch.promote_types(depth_logits.dtype, torch.float32)).permute(0, 2, 3, 1).reshape(-1, depth_logits.shape[1])
    target = target_bins.reshape(-1)
    valid = target >= 0
    if not bool(valid.any()):
        return depth_logits.sum() * 0.0
    logits, target = logits[valid], target[valid]
    log_prob = F.log_softmax(logits, dim=-1)
    log_not_prob = torch.log1p(-log_prob.exp().clamp(max=1.0 - 1e-6))
    one_hot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    bce = -(one_hot * log_prob.clamp(min=-100.0) + (1.0 - one_hot) * log_not_prob)
    return bce.sum() / valid.sum().clamp(min=1)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class AtrousSpatialPyramid(nn.Module):
    """ASPP (DeepLabv3): a 1x1 branch, 3x3 branches at several dilations and an image-level
    (global average) branch, concatenated and fused by a 1x1 conv + BN + ReLU + dropout.

    Args:
        in_channels: input channels.
        channels: width of every branch and of the output.
        dilations: dilation of each 3x3 branch (the 1x1 branch comes first).
        dropout: dropout probability on the output (training only).

    Forward: (M, in_channels, h, w) -> (M, channels, h, w).
    """

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int] = (6, 12, 18), dropout: float = 0.5):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_channels, channels, 1)])
        self.branches.extend(_conv_bn_relu(in_channels, channels, 3, dilation=int(d)) for d in dilations)
        self.image_pool = _conv_bn_relu(in_channels, channels, 1)
        self.fuse = _conv_bn_relu(channels * (len(self.branches) + 1), channels, 1)
        self.dropout = nn.Dropout(dropout)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [branch(x) for branch in self.branches]
        pooled = self.image_pool(x.mean(dim=(-2, -1), keepdim=True))
        outputs.append(pooled.expand(-1, -1, *x.shape[-2:]))
        return self.dropout(self.fuse(torch.cat(outputs, dim=1)))


class _CameraMLP(nn.Module):
    """Linear -> ReLU -> Linear from the normalized camera vector to SE logits."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, camera: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(camera)))


class _SqueezeExcite(nn.Module):
    """``features * sigmoid(expand(relu(reduce(camera_logits))))`` with 1x1 convs at full width."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels, 1)
        self.expand = nn.Conv2d(channels, channels, 1)

    def forward(self, features: torch.Tensor, camera_logits: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.relu(self.reduce(camera_logits[:, :, None, None])))
        return features * torch.sigmoid(gate)


def _positive_int(value, name: str) -> int:
    if int(value) != value or int(value) <= 0:
        raise ValueError(f"CameraAwareDepthNet: {name} must be a positive integer, got {value!r}")
    return int(value)


class CameraAwareDepthNet(nn.Module):
    """Depth distribution + context features per image-feature pixel (the release's
    ``CM_DepthNet`` with ``use_dcn=False``, as its R50 recipe configures it).

    Structure::

        camera = BatchNorm1d(camera_params)                          (M, 27)
        trunk  = ReLU(BN(conv3x3(features)))                          (M, mid, h, w)
        context = conv1x1(SE(trunk, context_mlp(camera)))             (M, context_channels, h, w)
        depth_logits = conv1x1(ASPP(BasicBlock^k(SE(trunk, depth_mlp(camera)))))   (M, D, h, w)

    Args:
        in_channels: channels of the neck's image map.
        mid_channels: width of the trunk, the SE gates and the depth branch (release: 512).
        context_channels: channels of the context output (= the voxel feature width; release: 80).
        depth_bins: (start, stop, step) metres, see :class:`DepthBins`.
        num_depth_blocks: residual blocks in the depth branch (release: 3).
        use_aspp: put an ASPP after the residual blocks (release: True).
        aspp_channels: ASPP width; 0 = ``mid_channels`` (the release).
        aspp_dilations: dilations of the ASPP's 3x3 branches (release: 6, 12, 18).
        aspp_dropout: dropout on the ASPP output (release: 0.5).
        camera_embed_dim: hidden width of each camera MLP; 0 = ``mid_channels`` (the release).
        grad_checkpointing: recompute the trunk and the depth branch in the backward pass.

    The release's optional deformable 3x3 conv (``use_dcn``) is switched off in its recipe
    and is not provided.

    Forward:
        features: (M, in_channels, h, w) image features, M = B * N cameras.
        camera_params: (M, CAMERA_PARAMETER_DIM), see :func:`camera_parameter_vector`.
            In training the batch norm needs M > 1.
    Returns:
        depth_logits (M, D, h, w) (softmax over D gives the distribution) and
        context (M, context_channels, h, w).
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int = 512,
        context_channels: int = 80,
        depth_bins: Sequence[float] = (2.0, 42.0, 0.5),
        num_depth_blocks: int = 3,
        use_aspp: bool = True,
        aspp_channels: int = 0,
        aspp_dilations: Sequence[int] = (6, 12, 18),
        aspp_dropout: float = 0.5,
        camera_embed_dim: int = 0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        in_channels = _positive_int(in_channels, "in_channels")
        mid_channels = _positive_int(mid_channels, "mid_channels")
        context_channels = _positive_int(context_channels, "context_channels")
        if int(num_depth_blocks) != num_depth_blocks or num_depth_blocks < 0:
            raise ValueError(f"CameraAwareDepthNet: num_depth_blocks must be a non-negative integer, "
                             f"got {num_depth_blocks!r}")
        aspp_channels = _positive_int(aspp_channels, "aspp_channels") if aspp_channels else mid_channels
        camera_embed_dim = _positive_int(camera_embed_dim, "camera_embed_dim") if camera_embed_dim else mid_channels
        if not 0.0 <= float(aspp_dropout) < 1.0:
            raise ValueError(f"CameraAwareDepthNet: aspp_dropout must be in [0, 1), got {aspp_dropout!r}")
        if use_aspp and any(int(d) <= 0 for d in aspp_dilations):
            raise ValueError(f"CameraAwareDepthNet: aspp_dilations must be positive, got {tuple(aspp_dilations)}")
        self.bins = DepthBins.from_config(depth_bins)
        self.in_channels = in_channels
        self.context_channels = context_channels
        self.grad_checkpointing = bool(grad_checkpointing)

        self.camera_norm = nn.BatchNorm1d(CAMERA_PARAMETER_DIM)
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 3, padding=1),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
        )
        self.context_mlp = _CameraMLP(CAMERA_PARAMETER_DIM, camera_embed_dim, mid_channels)
        self.context_se = _SqueezeExcite(mid_channels)
        self.context_out = nn.Conv2d(mid_channels, context_channels, 1)
        self.depth_mlp = _CameraMLP(CAMERA_PARAMETER_DIM, camera_embed_dim, mid_channels)
        self.depth_se = _SqueezeExcite(mid_channels)
        layers: list = [BasicBlock2d(mid_channels, mid_channels) for _ in range(int(num_depth_blocks))]
        classifier_in = mid_channels
        if use_aspp:
            layers.append(AtrousSpatialPyramid(mid_channels, aspp_channels, aspp_dilations, float(aspp_dropout)))
            classifier_in = aspp_channels
        layers.append(nn.Conv2d(classifier_in, self.bins.num_bins, 1))
        self.depth_branch = nn.Sequential(*layers)

    @property
    def num_bins(self) -> int:
        return self.bins.num_bins

    def forward(self, features: torch.Tensor, camera_params: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"CameraAwareDepthNet: features must be (M, {self.in_channels}, h, w), "
                             f"got {tuple(features.shape)}")
        if camera_params.shape != (features.shape[0], CAMERA_PARAMETER_DIM):
            raise ValueError(f"CameraAwareDepthNet: camera_params must be ({features.shape[0]}, "
                             f"{CAMERA_PARAMETER_DIM}), got {tuple(camera_params.shape)}")
        if self.training and features.shape[0] < 2:
            raise ValueError("CameraAwareDepthNet: camera_params needs more than one camera in training "
                             "(its batch norm normalizes over the cameras of the batch)")
        camera = self.camera_norm(camera_params.to(self.camera_norm.weight.dtype))
        trunk = maybe_checkpoint(self.reduce, features, enabled=self.grad_checkpointing)
        context = self.context_out(self.context_se(trunk, self.context_mlp(camera)))
        depth_logits = maybe_checkpoint(self.depth_branch, self.depth_se(trunk, self.depth_mlp(camera)),
                                        enabled=self.grad_checkpointing)
        return depth_logits, context

    def loss(self, depth_logits: torch.Tensor, lidar_depth: torch.Tensor) -> torch.Tensor:
        """Depth BCE of ``depth_logits`` (M, D, h, w) against ``lidar_depth`` (M, H, W) metres."""
        stride = lidar_depth.shape[-1] // depth_logits.shape[-1]
        if stride * depth_logits.shape[-1] != lidar_depth.shape[-1] or stride * depth_logits.shape[-2] != lidar_depth.shape[-2]:
            raise ValueError(f"CameraAwareDepthNet: lidar_depth {tuple(lidar_depth.shape[-2:])} is not an integer "
                             f"multiple of the depth map {tuple(depth_logits.shape[-2:])}")
        return depth_bce_loss(depth_logits, lidar_depth_to_bins(lidar_depth, stride, self.bins))
