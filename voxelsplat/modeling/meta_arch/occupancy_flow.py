"""``OccupancyFlowModel``: the FB-Occ meta-architecture with detectron2-style I/O.

images -> backbone -> neck -> camera-aware depth net -> forward projection (LSS)
-> backward projection (depth-aware cross-attention) -> temporal fusion -> 3D
ResNet + FPN -> occupancy/flow head. In training it returns a dict of scalar losses
(plus an optional training-only regularizer's); in eval, one dict per sample.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ...structures import IGNORE_LABEL, OccupancySpec
from ..lifting.depth_net import camera_parameter_vector

__all__ = ["OccupancyFlowModel"]

_GEOMETRY_FIELDS = ("intrinsics", "cam2ego", "img_aug", "bda", "ego2global")


class OccupancyFlowModel(nn.Module):
    """Camera-only semantic occupancy + scene flow (FB-Occ).

    Components are ``nn.Module`` instances (a LazyConfig builds them).

    Args:
        backbone: images (B*N, 3, H, W) -> dict of maps (e.g. :class:`TimmBackbone`).
        neck: dict of maps -> (B*N, C, h, w) (e.g. :class:`FusionFPN`).
        depth_net: :class:`CameraAwareDepthNet`.
        forward_projection: :class:`LSSForwardProjection`.
        backward_projection: :class:`DepthAwareBackwardProjection` or None.
        temporal_fusion: :class:`TemporalVolumeFusion` or None.
        voxel_encoder: :class:`ResNet3DFPN`: volume -> list of levels, finest first.
        head: :class:`OccFlowHead`: list of levels -> dict of per-voxel outputs.
        loss: :class:`OccupancyFlowLoss`.
        spec: the dataset's :class:`~voxelsplat.structures.OccupancySpec` (label set and GT
            grid). The head must predict its classes on its grid; the first batch is checked
            against it (``gt_format`` and ``occ_semantics`` of the samples).
        regularizer: optional training-only module called as
            ``regularizer(batched_inputs, head_outputs, flow_loss_enabled=...)`` -> dict of losses;
            ``head_outputs`` holds ``occ_logits`` (B, K, X, Y, Z), ``flow`` (B, 2, X, Y, Z) and, unless
            the regularizer's ``needs_voxel_features`` is False, ``voxel_features`` (B, F, X, Y, Z).
        pixel_mean, pixel_std: normalisation in 0-255 units, per network input channel.
        input_channel_order: "bgr" (released: the RGB image's channels are reversed before the
            normalisation, as mmcv's ``imnormalize(to_rgb=True)`` did to an image that was
            already RGB, so the network sees B, G, R normalised with the RGB mean and std and
            released weights get what they were trained on) or "rgb".
        depth_loss_weight: weight of the LiDAR depth BCE.
        history_enabled, flow_loss_enabled: initial training phase (see :meth:`set_training_phase`).
        return_logits: add ``occ_logits`` (K, X, Y, Z) to eval outputs.
        use_camera_mask: restrict the occupancy losses to ``occ_mask_camera`` when present (Occ3D).
        depth_only: depth pretraining: training runs the image branch only (backbone, neck,
            depth net) and returns ``{"loss_depth"}``; nothing behind the depth net runs or
            learns (``configs/synthetic/depth_pretrain_tiny.py``). Evaluation is refused.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        depth_net: nn.Module,
        forward_projection: nn.Module,
        voxel_encoder: nn.Module,
        head: nn.Module,
        loss: nn.Module,
        spec: OccupancySpec,
        backward_projection: Optional[nn.Module] = None,
        temporal_fusion: Optional[nn.Module] = None,
        regularizer: Optional[nn.Module] = None,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        input_channel_order: str = "bgr",
        depth_loss_weight: float = 1.0,
        history_enabled: bool = True,
        flow_loss_enabled: bool = True,
        return_logits: bool = False,
        use_camera_mask: bool = False,
        depth_only: bool = False,
    ):
        super().__init__()
        components = dict(backbone=backbone, neck=neck, depth_net=depth_net, forward_projection=forward_projection,
                          backward_projection=backward_projection, temporal_fusion=temporal_fusion,
                          voxel_encoder=voxel_encoder, head=head, loss=loss, regularizer=regularizer)
        optional = ("backward_projection", "temporal_fusion", "regularizer")
        for key, module in components.items():
            if not isinstance(module, nn.Module) and not (module is None and key in optional):
                raise TypeError(f"OccupancyFlowModel: {key} must be an nn.Module (build it with a LazyConfig "
                                f"LazyCall), got {type(module).__name__}")
            setattr(self, key, module)
        if not isinstance(spec, OccupancySpec):
            raise TypeError(f"OccupancyFlowModel: spec must be an OccupancySpec, got {type(spec).__name__}")
        self.spec = spec
        if getattr(self.head, "num_classes", spec.num_classes) != spec.num_classes:
            raise ValueError(f"OccupancyFlowModel: the head predicts {self.head.num_classes} classes, the spec is "
                             f"{spec.describe()}")
        if tuple(getattr(self.head, "output_shape", spec.grid.shape)) != tuple(spec.grid.shape):
            raise ValueError(f"OccupancyFlowModel: the head predicts on a {self.head.output_shape} grid, the spec is "
                             f"{spec.describe()}")
        decoder = getattr(self.regularizer, "decoder", None)
        head_features = getattr(self.head, "feature_channels", None)
        if decoder is not None and head_features is not None and decoder.feature_channels != head_features:
            raise ValueError(f"OccupancyFlowModel: the regularizer decodes Gaussians from {decoder.feature_channels} "
                             f"voxel-feature channels (regularizer.feature_channels) but the head's voxel features "
                             f"have {head_features} (head.feature_channels = its mid_channels)")
        self._checked_batch = False
        if input_channel_order not in ("bgr", "rgb"):
            raise ValueError(f"OccupancyFlowModel: input_channel_order must be 'bgr' or 'rgb', got "
                             f"{input_channel_order!r}")
        self.input_channel_order = input_channel_order
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        flow_lut = torch.zeros(spec.num_classes, dtype=torch.bool)
        flow_lut[list(spec.flow_classes)] = True
        self.register_buffer("flow_class_lut", flow_lut, persistent=False)
        self.depth_loss_weight = float(depth_loss_weight)
        self.return_logits = return_logits
        self.use_camera_mask = use_camera_mask
        self.depth_only = bool(depth_only)
        if self.depth_only and not self.depth_loss_weight:
            raise ValueError("OccupancyFlowModel: depth_only trains the depth loss alone; depth_loss_weight is 0")
        self.flow_loss_enabled = True
        self.set_training_phase(history_enabled, flow_loss_enabled)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def class_names(self) -> List[str]:
        return list(self.spec.class_names)

    @property
    def free_index(self) -> int:
        return self.spec.free_index

    @property
    def flow_classes(self) -> List[int]:
        return list(self.spec.flow_classes)

    @property
    def grid_shape(self):
        return tuple(self.spec.grid.shape)

    def check_batch(self, batched_inputs: List[dict]) -> None:
        """Fail, naming both sides, when samples are not of the model's spec: their label set
        (``gt_format``), the shape of ``occ_semantics`` or a class id outside the spec."""
        spec = self.spec
        for sample in batched_inputs:
            where = f"sample {sample.get('sample_token', '<unknown>')}"
            gt_format = sample.get("gt_format")
            if gt_format is not None and gt_format != spec.label_set:
                raise ValueError(f"OccupancyFlowModel: {where} has labels of gt_format {gt_format!r}, the model's "
                                 f"spec is {spec.describe()}; build the model's spec from the dataset's gt_format")
            semantics = sample.get("occ_semantics")
            if semantics is None:
                continue
            if tuple(semantics.shape) != tuple(spec.grid.shape):
                raise ValueError(f"OccupancyFlowModel: {where} has occ_semantics of shape {tuple(semantics.shape)}, "
                                 f"the model's spec is {spec.describe()}")
            labels = torch.as_tensor(semantics)
            labelled = labels[labels != IGNORE_LABEL]
            if labelled.numel() and (int(labelled.min()) < 0 or int(labelled.max()) >= spec.num_classes):
                raise ValueError(f"OccupancyFlowModel: {where} has class ids in [{int(labelled.min())}, "
                                 f"{int(labelled.max())}], the model's spec is {spec.describe()}")

    @property
    def history_enabled(self) -> bool:
        return bool(self.temporal_fusion is not None and self.temporal_fusion.history_enabled)

    def set_training_phase(self, history_enabled: bool, flow_loss_enabled: bool) -> None:
        """Switch long-term history fusion and the flow loss on/off (the warm-up schedule).
        With history off, the temporal queue holds copies of the current volume."""
        if self.temporal_fusion is not None:
            self.temporal_fusion.history_enabled = bool(history_enabled)
        self.flow_loss_enabled = bool(flow_loss_enabled)

    # ------------------------------------------------------------------ inputs
    def _stack(self, batched_inputs: List[dict], key: str, dtype=torch.float32) -> torch.Tensor:
        try:
            values = [torch.as_tensor(sample[key]) for sample in batched_inputs]
        except KeyError:
            tokens = [s.get("sample_token", "<unknown>") for s in batched_inputs if key not in s]
            raise KeyError(f"OccupancyFlowModel: samples {tokens} have no field {key!r} "
                           f"(see voxelsplat/structures/sample_fields.py)") from None
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) != 1:
            raise ValueError(f"OccupancyFlowModel: field {key!r} has different shapes across the batch: {sorted(shapes)}")
        return torch.stack(values).to(device=self.device, dtype=dtype, non_blocking=True)

    def preprocess_images(self, batched_inputs: List[dict]) -> torch.Tensor:
        """(B, N, 3, H, W) normalised float images from the samples' ``img`` (uint8/float RGB 0-255),
        channels in ``input_channel_order``."""
        images = self._stack(batched_inputs, "img")
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"OccupancyFlowModel: 'img' must be (N_cam, 3, H, W) per sample, got {tuple(images.shape[1:])}")
        b, n = images.shape[:2]
        images = torch.nan_to_num(images.flatten(0, 1))
        if self.input_channel_order == "bgr":
            images = images.flip(1)
        images = (images - self.pixel_mean) / self.pixel_std
        return images.view(b, n, *images.shape[1:])

    def _geometry(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        geometry = {key: self._stack(batched_inputs, key, torch.float64 if key == "ego2global" else torch.float32)
                    for key in _GEOMETRY_FIELDS}
        for key, value in geometry.items():
            finite = torch.isfinite(value.flatten(1)).all(1)
            if not bool(finite.all()):
                bad = [batched_inputs[i].get("sample_token", "<unknown>") for i in (~finite).nonzero().flatten().tolist()]
                raise ValueError(f"OccupancyFlowModel: field {key!r} is not finite in samples {bad}")
        return geometry

    # ------------------------------------------------------------------ forward
    def extract_depth(self, batched_inputs: List[dict]):
        """The image branch: backbone, neck and depth net.

        Returns:
            depth_logits (B*N, D, h, w), context (B*N, C, h, w), the samples' geometry and the
            network input size (H, W).
        """
        images = self.preprocess_images(batched_inputs)
        height, width = images.shape[-2:]
        geometry = self._geometry(batched_inputs)
        features = self.neck(self.backbone(images.flatten(0, 1)))
        camera_params = camera_parameter_vector(geometry["intrinsics"], geometry["img_aug"], geometry["cam2ego"],
                                                geometry["bda"])
        depth_logits, context = self.depth_net(features, camera_params.flatten(0, 1))
        return depth_logits, context, geometry, (height, width)

    def extract_volume(self, batched_inputs: List[dict]):
        """Run everything up to and including the voxel encoder.

        Returns:
            the voxel encoder's levels (list of (B, C, X_i, Y_i, Z_i), finest first),
            depth_logits (B*N, D, h, w).
        """
        depth_logits, context, geometry, (height, width) = self.extract_depth(batched_inputs)
        b, n = geometry["intrinsics"].shape[:2]
        depth_probs = depth_logits.softmax(dim=1)
        h, w = depth_logits.shape[-2:]
        context = context.view(b, n, -1, h, w)
        depth_probs = depth_probs.view(b, n, -1, h, w)
        volume = self.forward_projection(context, depth_probs, geometry["intrinsics"], geometry["cam2ego"],
                                         (height, width))
        if self.backward_projection is not None:
            volume = self.backward_projection(volume, context, depth_probs, geometry["intrinsics"],
                                              geometry["cam2ego"], (height, width))
        if self.temporal_fusion is not None:
            volume = self.temporal_fusion(
                volume, geometry["ego2global"], geometry["bda"],
                timestamps=[int(s.get("timestamp", 0)) for s in batched_inputs],
                sequence_start=[bool(s.get("sequence_start", True)) for s in batched_inputs],
                scene_tokens=[s.get("scene_token") for s in batched_inputs],
            )
        return self.voxel_encoder(volume), depth_logits

    def forward(self, batched_inputs: List[dict]):
        """Training: dict of scalar losses. Eval: list of per-sample dicts
        ``{"occ": int64 (X, Y, Z), "flow": float (X, Y, Z, 2) m/s (zero where the predicted class has
        no flow), "flow_unmasked": the same before that masking, ["occ_logits": (K, X, Y, Z)]}``."""
        if not self._checked_batch:
            self.check_batch(batched_inputs)
            self._checked_batch = True
        if self.depth_only:
            if not self.training:
                raise RuntimeError("OccupancyFlowModel: a depth_only model (depth pretraining) predicts no "
                                   "occupancy; evaluate the model that starts from its weights")
            return {"loss_depth": self.depth_loss(batched_inputs, self.extract_depth(batched_inputs)[0])}
        # Full-resolution features are only needed by a training-time regularizer that asks for them.
        head_outputs, depth_logits = self.head_outputs(batched_inputs,
                                                       self.training and self.regularizer_needs_features)
        if not self.training:
            return self.postprocess(head_outputs)
        return self.losses(batched_inputs, head_outputs, depth_logits)

    @property
    def regularizer_needs_features(self) -> bool:
        """Whether the regularizer reads ``voxel_features`` from the head outputs."""
        return self.regularizer is not None and bool(getattr(self.regularizer, "needs_voxel_features", True))

    def head_outputs(self, batched_inputs: List[dict], return_features: bool = False):
        """(the head's outputs, the depth logits) of a batch, in the current mode; with the
        full-resolution ``voxel_features`` when ``return_features``."""
        levels, depth_logits = self.extract_volume(batched_inputs)
        return self.head(levels, return_features=return_features), depth_logits

    def losses(self, batched_inputs: List[dict], head_outputs: Dict[str, torch.Tensor],
               depth_logits: torch.Tensor) -> Dict[str, torch.Tensor]:
        occ_target = self._stack(batched_inputs, "occ_semantics", torch.int64)
        flow_target = self._stack(batched_inputs, "occ_flow")
        valid_mask = None
        if self.use_camera_mask and all("occ_mask_camera" in s for s in batched_inputs):
            valid_mask = self._stack(batched_inputs, "occ_mask_camera", torch.bool)
        losses = self.loss(head_outputs["occ_logits"], head_outputs["flow"], occ_target, flow_target, valid_mask,
                           flow_loss_enabled=self.flow_loss_enabled)
        if self.depth_loss_weight:
            losses["loss_depth"] = self.depth_loss(batched_inputs, depth_logits)
        if self.regularizer is not None:
            losses.update(self.regularizer(batched_inputs, head_outputs, flow_loss_enabled=self.flow_loss_enabled))
        return losses

    def depth_loss(self, batched_inputs: List[dict], depth_logits: torch.Tensor) -> torch.Tensor:
        """The weighted LiDAR depth BCE of the depth net's logits (B*N, D, h, w)."""
        lidar_depth = self._stack(batched_inputs, "lidar_depth").flatten(0, 1)
        return self.depth_loss_weight * self.depth_net.loss(depth_logits, lidar_depth)

    @torch.no_grad()
    def postprocess(self, head_outputs: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        """Per-sample predictions; flow is zeroed where the predicted class is not a flow class."""
        logits = torch.nan_to_num(head_outputs["occ_logits"].float())
        occ = logits.argmax(dim=1)  # (B, X, Y, Z)
        unmasked = torch.nan_to_num(head_outputs["flow"].float()).permute(0, 2, 3, 4, 1)  # (B, X, Y, Z, 2)
        flow = unmasked * self.flow_class_lut[occ][..., None].to(unmasked.dtype)
        results = []
        for i in range(occ.shape[0]):
            # "flow_unmasked": the head's flow at every voxel, whatever class it predicts there (the
            # evaluator reads it on the GT occupancy: mAVE_gt_occupancy)
            result = {"occ": occ[i], "flow": flow[i], "flow_unmasked": unmasked[i]}
            if self.return_logits:
                result["occ_logits"] = logits[i]
            results.append(result)
        return results
