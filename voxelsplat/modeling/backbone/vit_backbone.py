"""EVA-02 plain ViT with ViTDet window attention, as the VoxelSplat-EVA recipe uses it.

A plain ViT (no hierarchy): a 16x16 patch embedding, an absolute position embedding
learned at the pretraining grid and resized bicubically to the token grid, then
transformer blocks with 2D rotary position embeddings (RoPE) inside each attention
window and a SwiGLU MLP with a LayerNorm before its output projection. Most blocks
attend within ``window_size`` x ``window_size`` windows; every third block (ViTDet's
"global" blocks) attends within larger ``global_window_size`` windows (the whole token
grid when 0). The last block's tokens are the single stride-16 map that feeds the depth
net; there is no final norm and no feature pyramid.

Parameter names follow the released ``EVAViT`` (``patch_embed.proj``, ``pos_embed``,
``blocks.<i>.{norm1,attn,norm2,mlp}``, ``attn.{q,k,v}_proj``, ``mlp.{w1,w2,ffn_ln,w3}``),
except that the query and value biases are the ``bias`` of ``q_proj``/``v_proj``
(released: separate ``q_bias``/``v_bias``; the loader renames them), so the released
checkpoint loads with its ``img_backbone.`` prefix stripped.
"""
from __future__ import annotations

import logging
import pickle
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from .timm_backbone import check_local_checkpoint

__all__ = [
    "EVA02ViT", "rope_angles", "window_partition", "window_unpartition",
    "vit_layer_decay_lr_multipliers", "release_window_block_indexes",
]

logger = logging.getLogger(__name__)

# Prefixes under which released / detectron2 checkpoints store the ViT's weights.
_CHECKPOINT_PREFIXES = ("img_backbone.", "backbone.net.", "backbone.", "module.img_backbone.", "")
# Released names -> ours (the query/value biases are Linear biases here).
_RELEASE_RENAMES = ((".attn.q_bias", ".attn.q_proj.bias"), (".attn.v_bias", ".attn.v_proj.bias"))


def release_window_block_indexes(depth: int) -> List[int]:
    """Blocks that use the small windows: all but every third (2, 5, 8, ...), as released
    for EVA-02-L (``voxelsplat-eva.py``: 0-1, 3-4, ..., 21-22 of 24)."""
    return [i for i in range(depth) if i % 3 != 2]


def rope_angles(grid_hw: Tuple[int, int], head_dim: int, pretrain_grid: int = 16, theta: float = 10000.0,
                device=None) -> torch.Tensor:
    """EVA-02's 2D rotary angles for the tokens of an (h, w) attention window.

    Positions along each axis are rescaled to span the pretraining grid (``i * pretrain_grid / h``),
    so a window of any size sees the position range the weights were trained with. The
    first half of the head channels rotates with the row, the second half with the
    column; consecutive channel pairs (2k, 2k+1) share a frequency ``theta^(-2k/(head_dim/2))``.

    Returns:
        Tensor of shape (h * w, head_dim), float32 radians, tokens in row-major order.
    """
    if head_dim % 4:
        raise ValueError(f"rope_angles: head_dim must be a multiple of 4, got {head_dim}")
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float32, device=device) / half)  # (half/2,)
    h, w = int(grid_hw[0]), int(grid_hw[1])
    rows = torch.arange(h, dtype=torch.float32, device=device) * (pretrain_grid / h)
    cols = torch.arange(w, dtype=torch.float32, device=device) * (pretrain_grid / w)
    row_angles = (rows[:, None] * freqs).repeat_interleave(2, dim=-1)  # (h, half)
    col_angles = (cols[:, None] * freqs).repeat_interleave(2, dim=-1)  # (w, half)
    angles = torch.cat([row_angles[:, None, :].expand(h, w, half), col_angles[None, :, :].expand(h, w, half)], dim=-1)
    return angles.reshape(h * w, head_dim)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2k, 2k+1) of ``x`` (..., N, D) by the angles whose cos/sin are (N, D)."""
    # rotate in at least float32 (the released tables are float32 buffers), then back to x.dtype
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    pairs = wide.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (wide * cos.to(wide.dtype) + rotated * sin.to(wide.dtype)).to(x.dtype)


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Split (B, H, W, C) tokens into (B * nW, window_size, window_size, C) windows, zero-padding
    the bottom and right edges to multiples of ``window_size``. Returns the windows and the
    padded (Hp, Wp)."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window_size, (-w) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, window_size: int, padded_hw: Tuple[int, int],
                       hw: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, ws, ws, C) -> (B, H, W, C), padding removed."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w].contiguous()


class _PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> tokens: (B, C_in, H, W) -> (B, H/p, W/p, C)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).permute(0, 2, 3, 1)


class _RopeAttention(nn.Module):
    """Multi-head self-attention with 2D RoPE on queries and keys; the key projection has no bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        """x (B', N, C) tokens of B' windows -> (B', N, C); rope_cos/sin (N, head_dim)."""
        b, n, c = x.shape
        q, k, v = (proj(x).view(b, n, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q = _apply_rope(q, rope_cos, rope_sin).to(v.dtype)
        k = _apply_rope(k, rope_cos, rope_sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _SwiGLU(nn.Module):
    """``w3(LN(silu(w1 x) * w2 x))``: EVA-02's gated MLP with its inner LayerNorm."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=eps)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class _Block(nn.Module):
    """Pre-norm transformer block with (optionally windowed) RoPE attention and a SwiGLU MLP.

    As in ViTDet, windows are cut from the normalised tokens and zero-padded without an
    attention mask: a padded key has logit 0 and value ``v_proj.bias``. Pretrained
    weights were trained that way, so it is kept."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, window_size: int, drop_path: float,
                 qkv_bias: bool, eps: float):
        super().__init__()
        self.window_size = int(window_size)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _RopeAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _SwiGLU(dim, mlp_hidden, eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W, C); rope_cos/sin (tokens per window, head_dim)."""
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.window_size > 0:
            windows, padded_hw = window_partition(y, self.window_size)
            y = self.attn(windows.flatten(1, 2), rope_cos, rope_sin)
            y = window_unpartition(y.view_as(windows), self.window_size, padded_hw, (h, w))
        else:
            y = self.attn(y.reshape(b, h * w, c), rope_cos, rope_sin).view(b, h, w, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class EVA02ViT(nn.Module):
    """EVA-02 ViT with ViTDet window attention, returning one stride-``patch_size`` map.

    The defaults are the released VoxelSplat-EVA backbone (EVA-02-L: ``voxelsplat-eva.py``
    ``img_backbone``): width 1024, 24 blocks, 16 heads, SwiGLU hidden int(1024 * 8/3) = 2730,
    16x16 windows in blocks 0-1, 3-4, ..., 21-22 and 40x40 windows in blocks 2, 5, ..., 23
    (40 = 640 / 16, the token rows of a 640x1600 image), stochastic depth rising linearly
    to 0.3, activation checkpointing.

    Args:
        embed_dim: token width (= output channels).
        depth: number of blocks.
        num_heads: attention heads (head width ``embed_dim / num_heads``, a multiple of 4).
        mlp_ratio: SwiGLU hidden width / ``embed_dim`` (hidden = ``int(embed_dim * mlp_ratio)``).
        patch_size: patch embedding kernel and stride (= output stride).
        in_channels: image channels.
        window_size: side, in tokens, of the windows of the blocks in ``window_block_indexes``.
        global_window_size: window side of the other blocks; 0 attends over the whole token grid.
        window_block_indexes: blocks that use ``window_size``; None: all but every third
            (:func:`release_window_block_indexes`).
        qkv_bias: biases on the query and value projections (never on the key).
        drop_path_rate: stochastic depth of the last block (linear from 0 at the first).
        pretrain_img_size: image side the position embedding was learned at (its grid is
            ``pretrain_img_size / patch_size`` squared, resized to the token grid bicubically).
        pretrain_use_cls_token: the stored position embedding has a leading class-token slot
            (kept for checkpoint compatibility, never used).
        rope_pretrain_grid: token grid side of RoPE pretraining (positions are rescaled to it).
        rope_theta: RoPE frequency base.
        layer_norm_eps: epsilon of every LayerNorm.
        init_checkpoint: local weights file ("" = random init): a state dict (or one under
            ``"state_dict"``/``"model"``) with the released names, optionally under a prefix
            (``img_backbone.`` as in the released ``eva02_L_coco_det_sys_o365_remapped.pth``,
            ``backbone.net.`` as in detectron2 ViTDet checkpoints). Read with
            ``torch.load(weights_only=True)`` (or as ``.safetensors``).
        trust_checkpoint: read an ``init_checkpoint`` that needs full unpickling (an mmcv /
            detectron2 file holding Python objects besides tensors). Unpickling runs whatever
            code the file names, so only for a file from a trusted source; without it such a
            file is refused with an error naming it.
        grad_checkpointing: recompute each block's activations in the backward pass.

    Forward: ``images`` (B, 3, H, W) normalised float, H and W multiples of ``patch_size``
    -> ``{"stride<patch_size>": (B, embed_dim, H / patch_size, W / patch_size)}``.
    """

    def __init__(
        self,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4 * 2 / 3,
        patch_size: int = 16,
        in_channels: int = 3,
        window_size: int = 16,
        global_window_size: int = 40,
        window_block_indexes: Optional[Sequence[int]] = None,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.3,
        pretrain_img_size: int = 224,
        pretrain_use_cls_token: bool = True,
        rope_pretrain_grid: int = 16,
        rope_theta: float = 10000.0,
        layer_norm_eps: float = 1e-6,
        init_checkpoint: str = "",
        trust_checkpoint: bool = False,
        grad_checkpointing: bool = True,
    ):
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads),
                            ("patch_size", patch_size), ("in_channels", in_channels),
                            ("pretrain_img_size", pretrain_img_size), ("rope_pretrain_grid", rope_pretrain_grid)):
            if int(value) <= 0:
                raise ValueError(f"EVA02ViT: {name} must be positive, got {value}")
        if embed_dim % num_heads or (embed_dim // num_heads) % 4:
            raise ValueError(f"EVA02ViT: embed_dim {embed_dim} / num_heads {num_heads} must be an integer multiple "
                             f"of 4 (RoPE rotates row and column channel pairs)")
        if window_size < 0 or global_window_size < 0:
            raise ValueError(f"EVA02ViT: window_size {window_size} and global_window_size {global_window_size} "
                             f"must be >= 0 (0: no windows)")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"EVA02ViT: drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if window_block_indexes is None:
            window_block_indexes = release_window_block_indexes(depth)
        window_block_indexes = sorted(int(i) for i in window_block_indexes)
        if any(not 0 <= i < depth for i in window_block_indexes):
            raise ValueError(f"EVA02ViT: window_block_indexes {window_block_indexes} must lie in [0, depth={depth})")
        if pretrain_img_size % patch_size:
            raise ValueError(f"EVA02ViT: pretrain_img_size {pretrain_img_size} is not a multiple of patch_size {patch_size}")

        self.embed_dim = int(embed_dim)
        self.depth = int(depth)
        self.num_heads = int(num_heads)
        self.patch_size = int(patch_size)
        self.rope_pretrain_grid = int(rope_pretrain_grid)
        self.rope_theta = float(rope_theta)
        self.pretrain_use_cls_token = bool(pretrain_use_cls_token)
        self.pretrain_grid = pretrain_img_size // patch_size
        self.window_block_indexes = window_block_indexes
        self.grad_checkpointing = bool(grad_checkpointing)
        self.trust_checkpoint = bool(trust_checkpoint)

        self.patch_embed = _PatchEmbed(in_channels, embed_dim, patch_size)
        num_positions = self.pretrain_grid ** 2 + int(self.pretrain_use_cls_token)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim))
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        mlp_hidden = int(embed_dim * mlp_ratio)
        windowed = set(window_block_indexes)
        self.blocks = nn.ModuleList(
            _Block(embed_dim, num_heads, mlp_hidden, window_size if i in windowed else global_window_size,
                   rates[i], qkv_bias, layer_norm_eps)
            for i in range(depth)
        )
        self._init_weights()

        self.out_channels: List[int] = [self.embed_dim]
        self.out_strides: List[int] = [self.patch_size]
        self.out_names: List[str] = [f"stride{self.patch_size}"]

        path = check_local_checkpoint(init_checkpoint, "EVA02ViT")
        if path is not None:
            self.load_checkpoint(path)

    def _init_weights(self) -> None:
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ weights
    def load_checkpoint(self, path: str) -> None:
        """Load the ViT's weights from a local file (see ``init_checkpoint``); entries outside
        the ViT (other model parts, RoPE tables, a class token) are ignored."""
        state = _read_state_dict(path, self.trust_checkpoint)
        own = self.state_dict()
        prefix = next((p for p in _CHECKPOINT_PREFIXES if f"{p}patch_embed.proj.weight" in state), None)
        if prefix is None:
            raise KeyError(f"EVA02ViT: {path} has no 'patch_embed.proj.weight' under any of the prefixes "
                           f"{list(_CHECKPOINT_PREFIXES)}; is it an EVA-02 ViT checkpoint?")
        loaded = {}
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            for old, new in _RELEASE_RENAMES:
                if name.endswith(old):
                    name = name[: -len(old)] + new
            if name in own:
                loaded[name] = value
        missing = sorted(set(own) - set(loaded))
        if missing:
            raise KeyError(f"EVA02ViT: {path} (prefix {prefix!r}) lacks {len(missing)} weights, e.g. {missing[:5]}")
        wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in loaded.items()
                 if tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise ValueError(f"EVA02ViT: {path} has weights of other shapes: {wrong[:5]}")
        self.load_state_dict(loaded, strict=True)

    # ------------------------------------------------------------------ forward
    def _position_embedding(self, h: int, w: int) -> torch.Tensor:
        """(1, h, w, C): the pretraining-grid embedding resized bicubically to the token grid."""
        grid = self.pos_embed[:, int(self.pretrain_use_cls_token):]
        side = self.pretrain_grid
        if (side, side) == (h, w):
            return grid.reshape(1, h, w, -1)
        grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        resized = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return resized.to(self.pos_embed.dtype).permute(0, 2, 3, 1)

    def _rope_tables(self, window: int, h: int, w: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        grid = (window, window) if window > 0 else (h, w)
        angles = rope_angles(grid, self.embed_dim // self.num_heads, self.rope_pretrain_grid, self.rope_theta, device)
        return angles.cos(), angles.sin()

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if images.dim() != 4:
            raise ValueError(f"EVA02ViT: images must be (B, C, H, W), got {tuple(images.shape)}")
        if images.shape[-2] % self.patch_size or images.shape[-1] % self.patch_size:
            raise ValueError(f"EVA02ViT: image size {tuple(images.shape[-2:])} is not a multiple of the patch size "
                             f"{self.patch_size}")
        x = self.patch_embed(images)  # (B, h, w, C)
        h, w = x.shape[1:3]
        x = x + self._position_embedding(h, w)
        tables = {}
        for block in self.blocks:
            if block.window_size not in tables:
                tables[block.window_size] = self._rope_tables(block.window_size, h, w, x.device)
            cos, sin = tables[block.window_size]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return {self.out_names[0]: x.permute(0, 3, 1, 2).contiguous()}


def _read_state_dict(path: str, trust_checkpoint: bool = False) -> Dict[str, torch.Tensor]:
    """The tensors of a weights file (see ``EVA02ViT``'s ``init_checkpoint``); full unpickling
    only with ``trust_checkpoint``."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not str(error).startswith("Weights only load failed"):
            raise RuntimeError(f"EVA02ViT: {path} is not a readable torch checkpoint: {error}") from error
        if not trust_checkpoint:
            found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(error))
            what = (f"holds Python objects besides tensors and plain containers ({found.group(1)})" if found
                    else "is not a plain weights file (torch.load(weights_only=True) refuses it)")
            raise RuntimeError(
                f"EVA02ViT: init_checkpoint {path} {what}; loading it means full unpickling, which runs code named "
                f"by the file. Pass trust_checkpoint=True (config: model.backbone.trust_checkpoint=True) only for "
                f"a file from a source you trust") from None
        # mmcv / detectron2 checkpoints may carry Python metadata beside the weights.
        logger.warning("EVA02ViT: loading %s with full unpickling (trust_checkpoint=True)", path)
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(loaded, dict):
        raise ValueError(f"EVA02ViT: {path} holds a {type(loaded).__name__}, expected a state dict")
    for key in ("state_dict", "model", "module"):
        if isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def vit_layer_decay_lr_multipliers(num_layers: int, decay_rate: float, scale: float = 1.0,
                                   prefix: str = "backbone") -> Dict[str, float]:
    """Layer-wise learning-rate decay of an :class:`EVA02ViT`, as ``lr_multipliers`` for
    :func:`voxelsplat.engine.optim.get_optimizer_param_groups`.

    Block ``i`` gets ``scale * decay_rate ** (num_layers - i)``; the patch and position
    embeddings, one step below the first block, ``scale * decay_rate ** (num_layers + 1)``
    (BEiT/ViTDet ``get_vit_lr_decay_rate``). Parameters outside ``prefix`` keep multiplier 1.

    Args:
        num_layers: the ViT's depth.
        decay_rate: ratio between the rates of consecutive blocks.
        scale: multiplier of the last block's rate relative to the base learning rate.
        prefix: module name of the ViT in the model.
    Returns:
        ``{module-name prefix: multiplier}``.
    """
    if int(num_layers) <= 0 or not 0.0 < float(decay_rate) <= 1.0:
        raise ValueError(f"vit_layer_decay_lr_multipliers: need num_layers > 0 and decay_rate in (0, 1], got "
                         f"num_layers={num_layers}, decay_rate={decay_rate}")
    num_layers, decay_rate, scale = int(num_layers), float(decay_rate), float(scale)
    stem = scale * decay_rate ** (num_layers + 1)
    multipliers = {f"{prefix}.patch_embed": stem, f"{prefix}.pos_embed": stem}
    multipliers.update({f"{prefix}.blocks.{i}": scale * decay_rate ** (num_layers - i) for i in range(num_layers)})
    return multipliers


