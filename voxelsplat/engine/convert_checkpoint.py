"""Checkpoints of the released code (mmdet3d) and ImageNet ResNet-50 weights, converted into this
library's checkpoints. ``tools/convert_checkpoint.py`` is the command line; the functions here
do the work and can be imported.

Two conversions:

* **Whole model** (:func:`convert_release_state_dict`, :func:`convert_release_checkpoint`): a
  released FB-Occ / VoxelSplat checkpoint (an mmcv file, ``{"state_dict", "meta", "optimizer"}``,
  or the release's ``epoch_N_ema.pth``, ``{"state_dict", "updates"}``) -> ``{"model": state_dict,
  "conversion": report}`` for ``train.init_checkpoint``. The depth-pretrained ResNet-50 the release
  starts from (its ``load_from``) goes the same way: the release loads it non-strictly into the
  whole detector, and detectron2's checkpointer loads ``train.init_checkpoint`` non-strictly too.
* **Backbone** (:func:`convert_backbone_state_dict`, :func:`convert_backbone_checkpoint`): an
  ImageNet ResNet-50 with torchvision / timm names (``conv1``, ``bn1``, ``layer1..4``, ``fc``), or
  the ``img_backbone.*`` part of a released checkpoint -> a plain timm state dict for
  ``model.backbone.init_checkpoint`` (:class:`~voxelsplat.modeling.backbone.TimmBackbone`).

Every source key ends up in exactly one of three lists of the :class:`ConversionReport`:
``mapped`` (to one of our keys), ``dropped`` (left out on purpose, with the reason) or
``unmapped`` (no counterpart of ours); every key of ours that nothing filled is in ``unfilled``. A
mapped tensor whose shape differs from ours is an error naming both keys and both shapes.

Volume layout. The release keeps volumes as (B, C, Y, X, Z): its LSS pools into (B, C, Z, Y, X)
and permutes to (B, C, Y, X, Z) (``forward_projection/view_transformer.py:530-542``), the temporal
fusion treats the volume as (n, c, z, h, w) with h = y (``detectors/fbocc.py:180, 237-241, 316``),
and the head swaps the first two spatial axes only at its output
(``heads/occ_flow_head.py:189-196``). Ours are (B, C, X, Y, Z) throughout. Every 3D kernel of the
temporal fusion, voxel encoder and head is therefore transposed in its first two spatial axes,
which makes each of our volume modules the release's conjugated by the x/y swap (1x1x1 kernels
are unchanged by it).
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..modeling.lifting.backward_projection import RELEASE_PARAMETER_NAMES
from .checkpoint import atomic_torch_save

logger = logging.getLogger(__name__)

__all__ = [
    "ConversionReport", "load_checkpoint", "source_state_dict", "convert_release_state_dict",
    "convert_backbone_state_dict", "convert_release_checkpoint", "convert_backbone_checkpoint",
    "VOLUME_MODULES",
]

_NAME = "convert_checkpoint"

# Our top-level modules that hold volumes: their 5-D kernels get the x/y transpose.
VOLUME_MODULES = ("temporal_fusion", "voxel_encoder", "head")


@dataclass
class ConversionReport:
    """Where every key went.

    Attributes:
        source: the file converted ("" for an in-memory state dict).
        mapped: source key -> our key.
        dropped: source key -> why it has no counterpart (left out on purpose).
        unmapped: source keys with no counterpart of ours (no rule knows them, or the key a rule
            names is not in our model).
        unfilled: our keys that no source key filled.
    """

    source: str = ""
    mapped: Dict[str, str] = field(default_factory=dict)
    dropped: Dict[str, str] = field(default_factory=dict)
    unmapped: List[str] = field(default_factory=list)
    unfilled: List[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every source key known and every key of ours filled."""
        return not self.unmapped and not self.unfilled

    def as_dict(self) -> Dict[str, Any]:
        """Plain containers of strings (readable with ``torch.load(weights_only=True)``)."""
        return {"source": self.source, "mapped": dict(self.mapped), "dropped": dict(self.dropped),
                "unmapped": list(self.unmapped), "unfilled": list(self.unfilled)}

    def summary(self) -> str:
        """Counts, then every unmapped and unfilled key, then the dropped keys grouped by reason."""
        lines = [f"{self.source or '<state dict>'}: {len(self.mapped)} mapped, {len(self.dropped)} dropped, "
                 f"{len(self.unmapped)} unmapped source keys, {len(self.unfilled)} unfilled keys of ours"]
        for title, keys in (("unmapped (source keys with no counterpart of ours)", self.unmapped),
                            ("unfilled (our keys left at their initialisation)", self.unfilled)):
            if keys:
                lines.append(f"{title}:")
                lines.extend(f"  {key}" for key in keys)
        by_reason: Dict[str, List[str]] = defaultdict(list)
        for key, reason in self.dropped.items():
            by_reason[reason].append(key)
        for reason, keys in by_reason.items():
            shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} keys)" if len(keys) > 4 else "")
            lines.append(f"dropped: {reason}: {shown}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- reading
def load_checkpoint(path: str, *, allow_pickle: bool = False) -> Dict[str, Any]:
    """Read a checkpoint file: ``.safetensors`` with safetensors, anything else with
    ``torch.load(weights_only=True)``.

    A file that needs full unpickling (it holds Python objects beyond tensors and plain
    containers, e.g. NumPy scalars in an mmcv ``meta``) is refused unless ``allow_pickle``,
    which runs arbitrary code from the file: only for files from a source you trust.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable checkpoint (corrupt, truncated, not a dict),
            or needs full unpickling and ``allow_pickle`` is False; the message names the path.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{_NAME}: checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return dict(load_file(path, device="cpu"))
        except Exception as exc:
            raise ValueError(f"{_NAME}: {path!r} is not a readable safetensors file: {exc}") from exc
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not str(exc).startswith("Weights only load failed"):
            raise ValueError(f"{_NAME}: {path!r} is not a readable torch checkpoint: {exc}") from exc
        if not allow_pickle:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            what = f" ({found.group(1)})" if found else ""
            raise ValueError(
                f"{_NAME}: {path!r} holds Python objects besides tensors{what} and would need full unpickling, "
                f"which can run code from the file; allow it (allow_pickle=True, --allow-pickle) only for a file "
                f"from a source you trust") from exc
        logger.warning("Loading %s with full unpickling (allow_pickle)", path)
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as inner:
            raise ValueError(f"{_NAME}: {path!r} is not a readable torch checkpoint: {inner}") from inner
    except Exception as exc:  # zip reader errors, EOF, garbage bytes
        raise ValueError(f"{_NAME}: {path!r} is not a readable torch checkpoint "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"{_NAME}: {path!r} holds a {type(loaded).__name__}, expected a dict of tensors")
    return loaded


def source_state_dict(checkpoint: Mapping[str, Any], path: str = "<checkpoint>") -> Dict[str, torch.Tensor]:
    """The weights inside a loaded checkpoint: mmcv's ``state_dict``, ours ``model``, or the
    dict itself when it is a bare state dict. A ``module.`` prefix on every key (a model saved
    inside DataParallel / DDP) is removed. Non-tensor entries are an error naming the key."""
    for container in ("state_dict", "model"):
        if isinstance(checkpoint.get(container), Mapping):
            checkpoint = checkpoint[container]
            break
    state = dict(checkpoint)
    if not state:
        raise ValueError(f"{_NAME}: {path} holds no weights")
    bad = [key for key, value in state.items() if not torch.is_tensor(value)]
    if bad:
        raise ValueError(f"{_NAME}: {path} is not a state dict: {bad[0]!r} holds a {type(state[bad[0]]).__name__}"
                         f"{f' (and {len(bad) - 1} more non-tensor entries)' if len(bad) > 1 else ''}")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


# ---------------------------------------------------------------------------- rules
Template = Union[str, Callable[[re.Match], str]]


@dataclass(frozen=True)
class _Rule:
    """``pattern`` (full match on a source key) -> our key (``template``: ``re`` expansion or a
    function of the match); ``reason`` set: the key is dropped instead; ``guard``: the rule applies
    only when it returns True for (match, all source keys)."""

    pattern: str
    template: Optional[Template] = None
    reason: Optional[str] = None
    guard: Optional[Callable[[re.Match, frozenset], bool]] = None


def _is_aspp(match: re.Match, source_keys: frozenset) -> bool:
    return f"depth_net.depth_conv.{match.group(1)}.aspp1.atrous_conv.weight" in source_keys


def _aspp_branch(match: re.Match) -> str:
    layer = {"atrous_conv": "0", "bn": "1"}[match.group(3)]
    return f"depth_net.depth_branch.{match.group(1)}.branches.{int(match.group(2)) - 1}.{layer}.{match.group(4)}"


_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_CONV = r"(weight|bias)"

_DROP_GRID = ("the release's LSS grid constants (voxel size, first voxel centre, voxel count): checked "
              "against our forward projection's grid, then left out")
_DROP_CAMS = ("BEVFormer.cams_embeds, multiplied by 0 (use_cams_embeds=False, bevformer.py:50-51, 99): "
              "never changes the output")
_DROP_GAUSSIAN = ("constant buffers of the training-only Gaussian regularizer (voxel centres, fixed "
                  "opacity / rotation / scale, gaussian_head.py:33-35, 85-86): ours computes them from the grid")

# Release key (mmdet3d FBOCC, detectors/fbocc.py:68-126) -> ours. Module by module; the release
# definitions each rule follows are cited in tests/test_convert_checkpoint.py.
_RELEASE_RULES: Tuple[_Rule, ...] = (
    # mmdet ResNet and timm's ResNet use torchvision's names (conv1, bn1, layerN.i.convK/bnK, downsample.0/1)
    _Rule(r"img_backbone\.(.+)", r"backbone.model.\1"),
    # CustomFPN (necks/fpn.py:113-134): ConvModules without norm (conv with bias)
    _Rule(rf"img_neck\.lateral_convs\.(\d+)\.conv\.{_CONV}", r"neck.lateral.\1.\2"),
    _Rule(rf"img_neck\.fpn_convs\.0\.conv\.{_CONV}", r"neck.output.\1"),
    # CM_DepthNet (modules/depth_net.py:279-325)
    _Rule(rf"depth_net\.bn\.{_BN}", r"depth_net.camera_norm.\1"),
    _Rule(r"depth_net\.reduce_conv\.([01])\.(.+)", r"depth_net.reduce.\1.\2"),
    _Rule(rf"depth_net\.context_conv\.{_CONV}", r"depth_net.context_out.\1"),
    _Rule(rf"depth_net\.(context|depth)_mlp\.(fc[12])\.{_CONV}", r"depth_net.\1_mlp.\2.\3"),
    _Rule(rf"depth_net\.(context|depth)_se\.conv_(reduce|expand)\.{_CONV}", r"depth_net.\1_se.\2.\3"),
    _Rule(r"depth_net\.depth_conv\.(\d+)\.aspp([1-9])\.(atrous_conv|bn)\.(.+)", _aspp_branch),
    _Rule(r"depth_net\.depth_conv\.(\d+)\.global_avg_pool\.1\.weight",
          r"depth_net.depth_branch.\1.image_pool.0.weight"),
    _Rule(rf"depth_net\.depth_conv\.(\d+)\.global_avg_pool\.2\.{_BN}", r"depth_net.depth_branch.\1.image_pool.1.\2"),
    _Rule(r"depth_net\.depth_conv\.(\d+)\.conv1\.weight", r"depth_net.depth_branch.\1.fuse.0.weight", guard=_is_aspp),
    _Rule(rf"depth_net\.depth_conv\.(\d+)\.bn1\.{_BN}", r"depth_net.depth_branch.\1.fuse.1.\2", guard=_is_aspp),
    _Rule(r"depth_net\.depth_conv\.(\d+)\.((conv[12]|bn[12])\..+)", r"depth_net.depth_branch.\1.\2"),
    _Rule(rf"depth_net\.depth_conv\.(\d+)\.{_CONV}", r"depth_net.depth_branch.\1.\2"),
    # LSSViewTransformerFunction3D: no weights, three fixed grid vectors (view_transformer.py:355-357)
    _Rule(r"forward_projection\.(dx|bx|nx)", reason=_DROP_GRID),
    # BackwardProjection: the module's own table (exact names, applied before these rules)
    _Rule(r"backward_projection\.transformer\.cams_embeds", reason=_DROP_CAMS),
    # temporal fusion convs of the detector (detectors/fbocc.py:110-126)
    _Rule(r"history_keyframe_time_conv\.([01])\.(.+)", r"temporal_fusion.time_conv.\1.\2"),
    _Rule(r"history_keyframe_cat_conv\.([01])\.(.+)", r"temporal_fusion.cat_conv.\1.\2"),
    # CustomResNet3D (modules/resnet3d.py:188-247)
    _Rule(r"img_bev_encoder_backbone\.input_proj\.([01])\.(.+)", r"voxel_encoder.backbone.input_proj.\1.\2"),
    _Rule(r"img_bev_encoder_backbone\.layers\.(\d+)\.(\d+)\.downsample\.([01])\.(.+)",
          r"voxel_encoder.backbone.stages.\1.\2.shortcut.\3.\4"),
    _Rule(r"img_bev_encoder_backbone\.layers\.(\d+)\.(\d+)\.((conv|bn)[12])\.(.+)",
          r"voxel_encoder.backbone.stages.\1.\2.\3.\5"),
    # FPN3D (modules/fpn3d.py:49-68): Sequential(ConvModule(conv, bn, act))
    _Rule(r"img_bev_encoder_neck\.(lateral|fpn)_convs\.(\d+)\.0\.conv\.weight",
          lambda m: f"voxel_encoder.fpn.{'lateral' if m.group(1) == 'lateral' else 'output'}.{m.group(2)}.0.weight"),
    _Rule(rf"img_bev_encoder_neck\.(lateral|fpn)_convs\.(\d+)\.0\.bn\.{_BN}",
          lambda m: f"voxel_encoder.fpn.{'lateral' if m.group(1) == 'lateral' else 'output'}.{m.group(2)}.1."
                    f"{m.group(3)}"),
    # OccFlowHead (heads/occ_flow_head.py:79-146)
    _Rule(r"occupancy_head\.deblock\.([01])\.(.+)", r"head.deblock.\1.\2"),
    _Rule(r"occupancy_head\.occ_convs\.(\d+)\.([01])\.(.+)", r"head.level_convs.\1.\2.\3"),
    _Rule(r"occupancy_head\.voxel_soft_weights\.([013])\.(.+)", r"head.level_weights.\1.\2"),
    _Rule(r"occupancy_head\.occ_pred_conv\.([013])\.(.+)", r"head.occ_mlp.\1.\2"),
    _Rule(r"occupancy_head\.flow_pred_conv\.([013])\.(.+)", r"head.flow_mlp.\1.\2"),
    _Rule(r"occupancy_head\.gaussian_render\..+", reason=_DROP_GAUSSIAN),
)

_RELEASE_EXACT = {f"backward_projection.{release}": f"backward_projection.{ours}"
                  for release, ours in RELEASE_PARAMETER_NAMES.items()}

_BACKBONE_RULES: Tuple[_Rule, ...] = (
    _Rule(r"fc\.(weight|bias)", reason="the ImageNet classifier: the backbone returns features only"),
    _Rule(r"(conv1\.weight|bn1\..+|layer\d+\..+)", r"\1"),
)


def _apply_rules(key: str, rules: Sequence[_Rule], source_keys: frozenset) -> Tuple[Optional[str], Optional[str]]:
    """(our key, None), (None, reason to drop) or (None, None) when no rule matches."""
    for rule in rules:
        match = re.fullmatch(rule.pattern, key)
        if match is None or (rule.guard is not None and not rule.guard(match, source_keys)):
            continue
        if rule.reason is not None:
            return None, rule.reason
        target = rule.template(match) if callable(rule.template) else match.expand(rule.template)
        return target, None
    return None, None


def _to_our_layout(our_key: str, value: torch.Tensor) -> torch.Tensor:
    """Release (Y, X, Z) kernels -> ours (X, Y, Z): swap the first two spatial kernel axes of
    every 5-D kernel (Conv3d (O, I, k, k, k) and ConvTranspose3d (I, O, k, k, k) alike)."""
    if our_key.split(".", 1)[0] in VOLUME_MODULES and value.dim() == 5:
        return value.transpose(2, 3).contiguous()
    return value


def _shape(value) -> Tuple[int, ...]:
    return tuple(value.shape)


def _fill(mapping: Dict[str, Tuple[str, torch.Tensor]], target: Mapping[str, torch.Tensor],
          report: ConversionReport, skip_mismatched: bool = False) -> Dict[str, torch.Tensor]:
    """Our state dict from {our key: (source key, value in our layout)}; a shape mismatch is an
    error naming both keys and shapes, or with ``skip_mismatched`` a dropped key."""
    converted: Dict[str, torch.Tensor] = {}
    for our_key, (source_key, value) in mapping.items():
        if our_key not in target:
            report.unmapped.append(source_key)  # a rule knew the name, but we have no such key
            del report.mapped[source_key]
            continue
        expected = target[our_key]
        if _shape(value) != _shape(expected):
            mismatch = f"{source_key} {_shape(value)} -> {our_key} expects {_shape(expected)}"
            if not skip_mismatched:
                raise ValueError(f"{_NAME}: {mismatch}")
            del report.mapped[source_key]
            report.dropped[source_key] = f"shape mismatch skipped (skip_mismatched): {mismatch}"
            continue
        value = value.detach().to(dtype=expected.dtype)
        if value.untyped_storage().nbytes() != value.numel() * value.element_size() or not value.is_contiguous():
            value = value.clone(memory_format=torch.contiguous_format)  # torch.save writes whole storages
        converted[our_key] = value
    report.unmapped.sort()
    report.unfilled = sorted(set(target) - set(converted))
    return converted


def _route(source: Mapping[str, torch.Tensor], rules: Sequence[_Rule], report: ConversionReport,
           exact: Optional[Mapping[str, str]] = None, values: Optional[Mapping[str, torch.Tensor]] = None,
           ) -> Dict[str, Tuple[str, torch.Tensor]]:
    """Send every source key to mapped / dropped / unmapped; two source keys on one key of ours is an error."""
    source_keys = frozenset(source)
    mapping: Dict[str, Tuple[str, torch.Tensor]] = {}
    for key in source:
        if key in report.dropped:
            continue
        our_key = (exact or {}).get(key)
        reason = None
        if our_key is None:
            our_key, reason = _apply_rules(key, rules, source_keys)
        if reason is not None:
            report.dropped[key] = reason
        elif our_key is None:
            report.unmapped.append(key)
        else:
            if our_key in mapping:
                raise ValueError(f"{_NAME}: {mapping[our_key][0]} and {key} both map to {our_key}")
            value = (values or source)[key]
            mapping[our_key] = (key, _to_our_layout(our_key, value))
            report.mapped[key] = our_key
    return mapping


def _check_grid(source: Mapping[str, torch.Tensor], grid) -> None:
    """The release's ``dx`` (voxel size), ``bx`` (first voxel centre), ``nx`` (voxel count) per
    axis (view_transformer.py:16-20) against our forward projection's grid."""
    if grid is None:
        return
    size = float(grid.voxel_size)
    expected = {
        "forward_projection.dx": np.full(3, size),
        "forward_projection.bx": np.asarray(grid.point_cloud_range[:3], dtype=np.float64) + size / 2,
        "forward_projection.nx": np.asarray(grid.shape, dtype=np.float64),
    }
    for key, want in expected.items():
        if key in source:
            have = source[key].detach().double().cpu().numpy().reshape(-1)
            if have.shape != want.shape or not np.allclose(have, want, atol=1e-4):
                raise ValueError(f"{_NAME}: {key} = {have.tolist()} but our forward projection's grid gives "
                                 f"{want.tolist()} (point_cloud_range {tuple(grid.point_cloud_range)}, voxel_size "
                                 f"{size}): the checkpoint was trained on another volume grid")


def _ema_name(key: str) -> str:
    """mmcv's EMAHook keeps the average of parameter ``a.b.c`` as the model buffer ``ema_a_b_c``."""
    return "ema_" + key.replace(".", "_")


# ---------------------------------------------------------------------------- conversions
def convert_release_state_dict(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    use_ema: bool = False,
    grid=None,
    skip_mismatched: bool = False,
    source_name: str = "",
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """A released FB-Occ / VoxelSplat state dict (mmdet3d names) -> ours.

    Args:
        source: the release's state dict (``state_dict`` of an mmcv checkpoint, or of the
            release's ``epoch_N_ema.pth``).
        target: our model's ``state_dict()`` (names, shapes and dtypes to fill).
        use_ema: when the source carries mmcv EMAHook copies (``ema_<name with _ for .>``
            buffers), convert those instead of the live weights. Without it they are dropped
            (and reported).
        grid: our forward projection's :class:`~voxelsplat.data.occupancy_meta.OccupancyGrid`;
            when given, the release's ``forward_projection.dx/bx/nx`` must describe the same grid.
        skip_mismatched: report a tensor whose shape differs from ours as dropped instead of
            raising, as the release's non-strict ``load_from`` skips it (for partial checkpoints
            such as the depth-pretrained one; off for the release's own models).
        source_name: the file name for the report.

    Returns:
        (our state dict: the keys of ``target`` that were filled, in ``target``'s dtypes;
        the :class:`ConversionReport`).

    Raises:
        ValueError: a mapped tensor's shape differs from ours (both keys and shapes named; unless
            ``skip_mismatched``), two source keys map to one of ours, the grid differs, or
            ``use_ema`` without EMA copies.
    """
    report = ConversionReport(source=source_name)
    # mmcv EMAHook buffers: top-level keys without dots
    ema_keys = {key for key in source if key.startswith("ema_") and "." not in key}
    live_of = {_ema_name(key): key for key in source if key not in ema_keys}
    values: Dict[str, torch.Tensor] = dict(source)
    if use_ema and not ema_keys:
        raise ValueError(f"{_NAME}: use_ema, but {source_name or 'the source'} holds no mmcv EMA copies (ema_* "
                         f"keys); the release's MEGVIIEMAHook writes its average to separate epoch_N_ema.pth "
                         f"files: convert one of those instead")
    for key in sorted(ema_keys):
        live = live_of.get(key)
        if live is None:
            continue  # an ema_* key of no parameter: reported as unmapped
        if use_ema:
            values[live] = source[key]
            report.dropped[key] = f"EMA copy, converted in place of {live}"
        else:
            report.dropped[key] = f"EMA copy of {live} (convert it instead of the live weights with use_ema / --ema)"
    _check_grid(source, grid)
    mapping = _route(source, _RELEASE_RULES, report, exact=_RELEASE_EXACT, values=values)
    converted = _fill(mapping, target, report, skip_mismatched)
    return converted, report


def convert_backbone_state_dict(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    source_name: str = "",
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """ResNet weights -> a timm ResNet state dict (``TimmBackbone.model``'s names).

    Args:
        source: an ImageNet ResNet with torchvision / timm names (``conv1``, ``bn1``,
            ``layer1..4``, ``fc``; ``fc`` is dropped), or a released whole-model state dict, whose
            ``img_backbone.*`` keys are taken (mmdet's ResNet uses torchvision's names) and whose
            other keys are dropped as outside the backbone.
        target: ``TimmBackbone(...).model.state_dict()``.
        source_name: the file name for the report.

    Returns:
        (the backbone state dict, the :class:`ConversionReport`); report keys are the source's.
    """
    report = ConversionReport(source=source_name)
    prefix = "img_backbone." if any(key.startswith("img_backbone.") for key in source) else ""
    if prefix:
        for key in source:
            if not key.startswith(prefix):
                report.dropped[key] = f"outside the image backbone ({key.split('.', 1)[0]})"
    rules = tuple(_Rule(re.escape(prefix) + rule.pattern, rule.template, rule.reason) for rule in _BACKBONE_RULES)
    mapping = _route(source, rules, report)
    converted = _fill(mapping, target, report)
    return converted, report


# ---------------------------------------------------------------------------- files
def _check_paths(src: str, dst: str) -> None:
    if not dst:
        raise ValueError(f"{_NAME}: no output path given")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"{_NAME}: output {dst!r} is the input checkpoint; write the conversion elsewhere")


def _enforce(report: ConversionReport, strict: bool) -> None:
    if strict and not report.complete:
        raise ValueError(f"{_NAME} (strict): {len(report.unmapped)} unmapped source keys, {len(report.unfilled)} "
                         f"unfilled keys of ours; nothing written\n{report.summary()}")


def convert_release_checkpoint(
    src: str,
    dst: str,
    target: Mapping[str, torch.Tensor],
    *,
    grid=None,
    use_ema: bool = False,
    skip_mismatched: bool = False,
    allow_pickle: bool = False,
    strict: bool = False,
) -> ConversionReport:
    """Convert the released checkpoint file ``src`` and write ``{"model": state_dict,
    "conversion": report}`` to ``dst`` (atomically: a temporary file renamed over ``dst``, so an
    interrupted run leaves nothing half-written).

    ``target``, ``grid``, ``use_ema``, ``skip_mismatched``: as :func:`convert_release_state_dict`;
    ``allow_pickle``: as :func:`load_checkpoint`; ``strict``: refuse (and write nothing) unless
    every source key is mapped or dropped on purpose and every key of ours is filled.
    """
    _check_paths(src, dst)
    state = source_state_dict(load_checkpoint(src, allow_pickle=allow_pickle), src)
    converted, report = convert_release_state_dict(state, target, use_ema=use_ema, grid=grid,
                                                   skip_mismatched=skip_mismatched, source_name=src)
    _enforce(report, strict)
    atomic_torch_save({"model": converted, "conversion": report.as_dict()}, dst)
    return report


def convert_backbone_checkpoint(
    src: str,
    dst: str,
    target: Mapping[str, torch.Tensor],
    *,
    allow_pickle: bool = False,
    strict: bool = False,
) -> ConversionReport:
    """Convert the ResNet weights in ``src`` (see :func:`convert_backbone_state_dict`) and write
    them to ``dst`` as a plain timm state dict (what ``TimmBackbone(init_checkpoint=dst)`` reads),
    atomically. ``strict``: refuse unless every source key is mapped or dropped on purpose and
    every backbone key is filled."""
    _check_paths(src, dst)
    state = source_state_dict(load_checkpoint(src, allow_pickle=allow_pickle), src)
    converted, report = convert_backbone_state_dict(state, target, source_name=src)
    if not converted:
        raise ValueError(f"{_NAME}: {src!r} holds no ResNet backbone weights (no conv1 / bn1 / layerN keys, "
                         f"plain or under img_backbone.)\n{report.summary()}")
    _enforce(report, strict)
    atomic_torch_save(converted, dst)
    return report
