"""configs/eva.py and its EVA-02 ViT backbone: the released architecture (parameter count,
window layout), the forward pass against a reference assembled from timm's EVA-02 parts,
weights from a released-format file, the layer-wise learning-rate decay of the release's
optimizer, and one training step of the config's model on CPU."""
import math
import os
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from detectron2.config import LazyConfig, instantiate
from timm.layers import RotaryEmbeddingCat, resample_abs_pos_embed
from timm.models.eva import EvaBlock
from torch import nn

from voxelsplat.modeling.backbone import EVA02ViT
from voxelsplat.testing import make_sample

ROOT = Path(__file__).resolve().parents[1]

SMALL = dict(embed_dim=32, depth=3, num_heads=2, patch_size=16, window_size=3, pretrain_img_size=48,
             drop_path_rate=0.0)


def _eva_config():
    return LazyConfig.load(str(ROOT / "configs" / "eva.py"))


def _eva02_param_count(dim, depth, patch, in_channels, mlp_hidden, pretrain_grid, cls_slot):
    """Parameters of the released EVAViT, from its layer shapes (eva_vit.py: PatchEmbed,
    pos_embed, Attention, SwiGLU(subln=True), Block)."""
    patch_embed = in_channels * patch * patch * dim + dim
    pos_embed = (pretrain_grid ** 2 + cls_slot) * dim
    attention = 3 * dim * dim + 2 * dim + dim * dim + dim  # q/k/v (q, v biases), output proj
    mlp = 2 * (dim * mlp_hidden + mlp_hidden) + 2 * mlp_hidden + mlp_hidden * dim + dim  # w1, w2, ffn_ln, w3
    norms = 2 * 2 * dim
    return patch_embed + pos_embed + depth * (attention + mlp + norms)


def test_full_size_backbone_is_eva02_large_with_release_windows():
    cfg = _eva_config()
    with torch.device("meta"):
        backbone = instantiate(cfg.model.backbone)
        reference = timm.create_model("eva02_large_patch14_224", pretrained=False, patch_size=16, num_classes=0)
    count = sum(p.numel() for p in backbone.parameters())
    # 1024 wide, 24 blocks, SwiGLU hidden int(1024 * 8/3) = 2730, 224/16 = 14 position grid + class slot
    assert count == _eva02_param_count(1024, 24, 16, 3, 2730, 14, 1) == 303_388_608
    # timm's EVA-02-L at patch 16 has the same blocks plus a class token and a final norm
    timm_count = sum(p.numel() for p in reference.parameters())
    assert count == timm_count - reference.cls_token.numel() - sum(p.numel() for p in reference.fc_norm.parameters())
    # voxelsplat-eva.py: window_block_indexes 0-1, 3-4, ..., 21-22 at 16; the rest at global_window_size 40
    released_windowed = list(range(0, 2)) + list(range(3, 5)) + list(range(6, 8)) + list(range(9, 11)) + \
        list(range(12, 14)) + list(range(15, 17)) + list(range(18, 20)) + list(range(21, 23))
    assert [b.window_size for b in backbone.blocks] == [16 if i in released_windowed else 40 for i in range(24)]
    assert [round(b.drop_path.drop_prob, 6) for b in backbone.blocks[1:]] == \
        [round(0.3 * i / 23, 6) for i in range(1, 24)]
    assert backbone.out_channels == [1024] and backbone.out_strides == [16] and backbone.grad_checkpointing
    assert cfg.model.neck.name == "stride16" and tuple(cfg.dataloader.train.mapper.input_size) == (1600, 640)


def _timm_block_from(block, dim, num_heads):
    """A timm EvaBlock carrying ``block``'s weights (names mapped)."""
    reference = EvaBlock(dim, num_heads, qkv_bias=True, qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True,
                         scale_mlp=True, num_prefix_tokens=0, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    renames = {"mlp.w1.": "mlp.fc1_g.", "mlp.w2.": "mlp.fc1_x.", "mlp.ffn_ln.": "mlp.norm.", "mlp.w3.": "mlp.fc2."}
    state = {}
    for key, value in block.state_dict().items():
        for old, new in renames.items():
            key = key.replace(old, new)
        state[key] = value
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all(".k_bias" in k for k in missing), (missing, unexpected)
    return reference.double().eval()


def _timm_rope(head_dim, grid):
    return RotaryEmbeddingCat(head_dim, in_pixels=False, feat_shape=list(grid), ref_feat_shape=[16, 16]).get_embed()


def _reference_forward(model, images, global_window_size):
    """Patch embedding, bicubic position embedding (timm's resampler), then per block: the
    normalised tokens cut into zero-padded windows, timm EVA attention with timm RoPE on each
    window, and timm's SwiGLU MLP."""
    dim, heads = model.embed_dim, model.num_heads
    x = F.conv2d(images, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=model.patch_size)
    x = x.permute(0, 2, 3, 1)
    b, h, w, c = x.shape
    side = model.pretrain_grid
    pos = resample_abs_pos_embed(model.pos_embed, new_size=[h, w], old_size=[side, side], num_prefix_tokens=1,
                                 interpolation="bicubic", antialias=False)
    x = x + pos[:, 1:].reshape(1, h, w, c)
    for block in model.blocks:
        ref = _timm_block_from(block, dim, heads)
        y = ref.norm1(x)
        window = block.window_size
        if window == 0:
            attended = ref.attn(y.reshape(b, h * w, c), rope=_timm_rope(dim // heads, (h, w)).double()).view(b, h, w, c)
        else:
            rope = _timm_rope(dim // heads, (window, window)).double()
            rows, cols = math.ceil(h / window), math.ceil(w / window)
            padded = torch.zeros(b, rows * window, cols * window, c, dtype=y.dtype)
            padded[:, :h, :w] = y
            out = torch.zeros_like(padded)
            for i in range(rows):
                for j in range(cols):
                    cell = (slice(None), slice(i * window, (i + 1) * window), slice(j * window, (j + 1) * window))
                    tokens = padded[cell].reshape(b, window * window, c)
                    out[cell] = ref.attn(tokens, rope=rope).view(b, window, window, c)
            attended = out[:, :h, :w]
        x = x + attended
        x = x + ref.mlp(ref.norm2(x))
    return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize("global_window_size", [5, 0])
def test_vit_matches_reference_built_from_timm_eva_parts(global_window_size):
    torch.manual_seed(0)
    model = EVA02ViT(**SMALL, global_window_size=global_window_size).double().eval()
    with torch.no_grad():
        for param in model.parameters():  # biases and norms away from their zero/one init
            param.add_(0.05 * torch.randn_like(param))
        images = torch.randn(2, 3, 64, 112, dtype=torch.float64)  # 4x7 tokens: every window size pads
        out = model(images)["stride16"]
        expected = _reference_forward(model, images, global_window_size)
    assert out.shape == (2, 32, 4, 7)
    assert [b.window_size for b in model.blocks] == [3, 3, global_window_size]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_saves_memory_and_keeps_gradients():
    torch.manual_seed(1)
    plain = EVA02ViT(**SMALL, global_window_size=0, grad_checkpointing=False).train()
    checkpointed = EVA02ViT(**SMALL, global_window_size=0, grad_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 64, 96)
    results = []
    for model in (plain, checkpointed):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = model(images)["stride16"]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert results[1][2] < 0.5 * results[0][2]


def test_init_checkpoint_reads_the_released_names(tmp_path):
    torch.manual_seed(2)
    source = EVA02ViT(**SMALL, global_window_size=0)
    released = {}
    for key, value in source.state_dict().items():
        key = key.replace("attn.q_proj.bias", "attn.q_bias").replace("attn.v_proj.bias", "attn.v_bias")
        released[f"img_backbone.{key}"] = value.clone()
    # the release's files also hold RoPE tables and, as whole-model checkpoints, other parts
    released["img_backbone.rope_win.freqs_cos"] = torch.randn(9, 16)
    released["img_backbone.blocks.0.attn.rope.freqs_cos"] = torch.randn(9, 16)
    released["depth_net.reduce.0.weight"] = torch.randn(4, 4, 3, 3)
    path = tmp_path / "eva_remapped.pth"
    torch.save({"meta": {"mmcv_version": "1.6"}, "state_dict": released}, path)

    loaded = EVA02ViT(**SMALL, global_window_size=0, init_checkpoint=str(path))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)

    del released["img_backbone.blocks.2.mlp.w3.weight"]
    torch.save(released, tmp_path / "partial.pth")
    with pytest.raises(KeyError, match="blocks.2.mlp.w3.weight"):
        EVA02ViT(**SMALL, global_window_size=0, init_checkpoint=str(tmp_path / "partial.pth"))
    with pytest.raises(ValueError, match="pos_embed"):
        EVA02ViT(**{**SMALL, "pretrain_img_size": 64}, global_window_size=0, init_checkpoint=str(path))
    with pytest.raises(FileNotFoundError, match="EVA02ViT"):
        EVA02ViT(**SMALL, init_checkpoint=str(tmp_path / "absent.pth"))


class _CreatesFolderWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_init_checkpoint_needing_full_unpickling_is_refused_unless_trusted(tmp_path):
    torch.manual_seed(3)
    source = EVA02ViT(**SMALL, global_window_size=0)
    marker = tmp_path / "code_ran"
    path = tmp_path / "eva_with_objects.pth"
    # mmcv checkpoints carry Python objects in "meta"; this one runs code when unpickled
    torch.save({"meta": {"hook": _CreatesFolderWhenUnpickled(str(marker))},
                "state_dict": {f"img_backbone.{k}": v for k, v in source.state_dict().items()}}, path)

    with pytest.raises(RuntimeError, match="trust_checkpoint") as refused:
        EVA02ViT(**SMALL, global_window_size=0, init_checkpoint=str(path))
    assert str(path) in str(refused.value) and "mkdir" in str(refused.value)
    assert not marker.exists()

    loaded = EVA02ViT(**SMALL, global_window_size=0, init_checkpoint=str(path), trust_checkpoint=True)
    assert marker.is_dir()  # trusted: the file was fully unpickled
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="garbage.pth.*trust_checkpoint"):
        EVA02ViT(**SMALL, global_window_size=0, init_checkpoint=str(garbage))


def test_bad_arguments_name_the_module_and_argument():
    with pytest.raises(ValueError, match="EVA02ViT: embed_dim"):
        EVA02ViT(**{**SMALL, "num_heads": 3})
    with pytest.raises(ValueError, match="EVA02ViT: window_block_indexes"):
        EVA02ViT(**SMALL, window_block_indexes=[0, 3])
    with pytest.raises(ValueError, match="EVA02ViT: image size"):
        EVA02ViT(**SMALL)(torch.randn(1, 3, 64, 100))


def _release_lr_and_decay(name, param, num_layers):
    """The release's LearningRateDecayOptimizerConstructor (vit_wise; lr 1e-4, decay_rate 0.9,
    head_decay_rate 2.0, weight decay 1e-4) for one parameter of our model: ``backbone.`` is
    the release's ``img_backbone.``."""
    layer_id, scale = num_layers + 1, 2.0
    if name.startswith("backbone."):
        released = "img_backbone." + name[len("backbone."):]
        if ".pos_embed" in released or ".patch_embed" in released:
            layer_id = 0
        elif ".blocks." in released:
            layer_id = int(released[released.find(".blocks."):].split(".")[2]) + 1
        scale = 0.9 ** (num_layers + 1 - layer_id)
    decay = 0.0 if param.ndim == 1 or name.endswith(".bias") else 1e-4
    return 1e-4 * scale, decay


def test_optimizer_follows_the_released_layer_decay_and_weight_decay():
    cfg = _eva_config()
    cfg.model.backbone.update(embed_dim=64, depth=4, num_heads=4, window_size=2, global_window_size=4)
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    setting = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert len(setting) == len(names)
    for name, param in names.items():
        lr, decay = setting[id(param)]
        expected_lr, expected_decay = _release_lr_and_decay(name, param, num_layers=4)
        assert lr == pytest.approx(expected_lr, rel=1e-12), name
        assert decay == expected_decay, name
    assert setting[id(names["backbone.blocks.3.mlp.w3.weight"])][0] == pytest.approx(0.9e-4)
    head_param = next(n for n in names if n.startswith("head."))
    assert setting[id(names[head_param])][0] == pytest.approx(2e-4)


def test_eva_config_trains_one_step_on_cpu():
    """configs/eva.py's model at 64x160 with a 3-block, 64-wide ViT and the CPU-sized 3D
    parts of configs/synthetic/fbocc_tiny.py: one forward/backward."""
    cfg = _eva_config()
    tiny = LazyConfig.load(str(ROOT / "configs" / "synthetic" / "fbocc_tiny.py"))
    for key in ("depth_net", "forward_projection", "backward_projection", "temporal_fusion", "voxel_encoder", "head"):
        cfg.model[key] = tiny.model[key]
    cfg.model.depth_net.in_channels = "${..neck.out_channels}"
    cfg.model.backbone.update(embed_dim=64, depth=3, num_heads=4, window_size=2, global_window_size=4)
    cfg.model.regularizer = None  # rendering 36 views does not fit a CPU test; covered by its own tests
    torch.manual_seed(3)
    model = instantiate(cfg.model).train()
    assert isinstance(model.backbone, EVA02ViT) and model.neck.out_channels == 64
    losses = model([make_sample(seed=5, image_size=(160, 64))])
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = [p.grad for n, p in model.backbone.named_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
