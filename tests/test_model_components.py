"""Backbones (timm, local checkpoints only), the warm-up hook and the shipped model configs."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.distributed as dist
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from voxelsplat.engine.warmup_hook import WarmupSwitchHook
from voxelsplat.modeling.backbone import TimmBackbone
from voxelsplat.structures import OccupancySpec
from voxelsplat.modeling.neck import FusionFPN

ROOT = Path(__file__).resolve().parents[1]


def test_timm_backbone_frozen_bn_stages_and_local_checkpoint(tmp_path):
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = TimmBackbone("resnet18", out_indices=(3, 4), init_checkpoint=str(path), norm="FrozenBN",
                            frozen_stages=1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    torch.testing.assert_close(backbone.model.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    torch.testing.assert_close(backbone.model.layer3[0].bn1.running_var, reference.layer3[0].bn1.running_var)
    assert not any(p.requires_grad for p in backbone.model.conv1.parameters())
    assert not any(p.requires_grad for p in backbone.model.layer1.parameters())
    assert all(p.requires_grad for p in backbone.model.layer2.parameters())
    assert backbone.out_channels == [256, 512] and backbone.out_strides == [16, 32]

    features = backbone(torch.randn(2, 3, 64, 96))
    assert features["stride16"].shape == (2, 256, 4, 6) and features["stride32"].shape == (2, 512, 2, 3)
    neck = FusionFPN(backbone.out_channels, backbone.out_strides, out_channels=32)
    assert neck(features).shape == (2, 32, 4, 6)

    trainable = TimmBackbone("resnet18", norm="BN", grad_checkpointing=True)
    assert any(isinstance(m, nn.BatchNorm2d) for m in trainable.modules())
    trainable(torch.randn(1, 3, 64, 64, requires_grad=True))["stride32"].sum().backward()
    with pytest.raises(FileNotFoundError, match="local file"):
        TimmBackbone("resnet18", init_checkpoint=str(tmp_path / "missing.pth"))


def _checkpoint_each_child(features_net, images):
    """The forward of timm's feature extractors before 1.0.31 under grad checkpointing: every child
    module but the first and the last checkpointed on its own, in-place ones too."""
    from torch.utils.checkpoint import checkpoint

    children = list(features_net.named_children())
    outputs, x = {}, images
    for i, (name, module) in enumerate(children):
        x = module(x) if i in (0, len(children) - 1) else checkpoint(module, x, use_reentrant=False)
        outputs[name] = x
    return outputs


def test_checkpointed_timm_backbone_survives_per_module_checkpointing():
    # The stem's ReLU(inplace=True), checkpointed on its own, overwrote the tensor saved for its
    # recomputation: fbocc_r50's first CUDA step failed in backward with timm 1.0.29.
    torch.manual_seed(0)
    plain = TimmBackbone("resnet18", out_indices=(2, 3, 4), norm="BN",
                         model_kwargs=dict(channels=(16, 32, 64, 128), stem_width=16)).train()
    checkpointed = TimmBackbone("resnet18", out_indices=(2, 3, 4), norm="BN", grad_checkpointing=True,
                                model_kwargs=dict(channels=(16, 32, 64, 128), stem_width=16)).train()
    checkpointed.load_state_dict(plain.state_dict())
    assert not any(getattr(m, "inplace", False) for m in checkpointed.modules())
    assert any(getattr(m, "inplace", False) for m in plain.modules())  # the hazard the option removes
    images = torch.randn(2, 3, 64, 96)
    weights = torch.randn(2, 128, 2, 3)
    grads = []
    for net, forward in ((plain, lambda x: net.model(x)[-1]),
                         (checkpointed, lambda x: _checkpoint_each_child(net.model, x)["layer4"])):
        net.zero_grad()
        x = images.clone().requires_grad_(True)
        (forward(x) * weights).sum().backward()
        grads.append((x.grad, net.model.conv1.weight.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-4, atol=1e-6)


class _PhasedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.phases = []

    def set_training_phase(self, history_enabled, flow_loss_enabled):
        self.phases.append((history_enabled, flow_loss_enabled))


def _run_hook(hook, model, start_iter, iterations):
    hook.trainer = SimpleNamespace(model=model, iter=start_iter)
    hook.before_train()
    for iteration in iterations:
        hook.trainer.iter = iteration
        hook.before_step()


def test_warmup_hook_switches_at_configured_iterations_and_after_resume(tmp_path):
    inner = _PhasedModel()
    _run_hook(WarmupSwitchHook(history_start_iter=3, flow_loss_start_iter=5), inner, 0, range(0, 7))
    assert inner.phases == [(False, False), (True, False), (True, True)]

    # Resumed past the history switch: the right phase from the first step on. The model is
    # wrapped in DistributedDataParallel (one CPU process, gloo).
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        inner = _PhasedModel()
        wrapped = nn.parallel.DistributedDataParallel(inner)
        _run_hook(WarmupSwitchHook(history_start_iter=3, flow_loss_start_iter=5), wrapped, 4, range(4, 6))
        assert inner.phases == [(True, False), (True, True)]
    finally:
        dist.destroy_process_group()

    with pytest.raises(TypeError, match="set_training_phase"):
        _run_hook(WarmupSwitchHook(1, 1), nn.Linear(1, 1), 0, [0])


def test_published_config_instantiates_with_its_settings():
    cfg = LazyConfig.load(str(ROOT / "configs" / "fbocc_r50.py"))
    assert set(cfg) >= {"model", "dataloader", "optimizer", "lr_multiplier", "train"}
    assert tuple(cfg.dataloader.train.mapper.input_size) == (704, 256)
    assert cfg.model.temporal_fusion.num_history == 16 and cfg.model.backbone.model_name == "resnet50"
    model = instantiate(cfg.model)
    assert model.forward_projection.volume_shape == (100, 100, 8)
    assert model.depth_net.num_bins == 80
    assert model.spec == OccupancySpec.for_label_set("openocc_v2")  # the dataset's gt_format
    assert tuple(model.head.output_shape) == model.spec.grid.shape and model.head.num_classes == model.spec.num_classes
    assert 35e6 < sum(p.numel() for p in model.parameters()) < 90e6  # per module: test_release_parameter_counts
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    # the released baseline: every parameter at 2e-4 (backbone x1), weight decay 1e-2 on all
    assert {(g["lr"], g["weight_decay"]) for g in optimizer.param_groups} == {(2e-4, 1e-2)}
    # 48 epochs of 28130 // 16 iterations, switches after 2 epochs, SyncBN, fp16, EMA
    assert cfg.dataloader.train.total_batch_size == 16 and cfg.dataloader.train.split_scenes_in_half
    assert cfg.train.max_iter == 84384 and cfg.train.amp.enabled and cfg.train.sync_bn
    iters_per_epoch = cfg.train.max_iter // 48
    switch, ema = cfg.train.extra_hooks
    assert switch.history_start_iter == switch.flow_loss_start_iter == 2 * iters_per_epoch
    assert (ema.decay, ema.init_updates, ema.ramp_iters) == (0.999, 10560, 2000)
    assert tuple(cfg.dataloader.train.mapper.bda_rotation_range) == (-22.5, 22.5)
    assert cfg.model.loss.flow_weight == 0.5 and cfg.model.loss.flow_voxels == "all"
    assert cfg.train.clip_grad.max_norm == 5.0


def test_released_neck_is_nearest_upsampling_and_a_plain_conv_against_a_direct_formula():
    """CustomFPN of the release: out = conv3x3(lat4(C4) + nearest_up(lat5(C5))), no BN/ReLU."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    neck = FusionFPN([6, 10], [16, 32], out_channels=5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in neck.modules())
    c4, c5 = torch.randn(2, 6, 6, 10), torch.randn(2, 10, 3, 5)
    lat4, lat5 = neck.lateral
    expected = F.conv2d(F.conv2d(c4, lat4.weight, lat4.bias)
                        + F.conv2d(c5, lat5.weight, lat5.bias).repeat_interleave(2, -2).repeat_interleave(2, -1),
                        neck.output.weight, neck.output.bias, padding=1)
    torch.testing.assert_close(neck({"stride16": c4, "stride32": c5}), expected)
    bilinear = FusionFPN([6, 10], [16, 32], out_channels=5, upsample_mode="bilinear", output_norm="bn_relu")
    assert any(isinstance(m, nn.BatchNorm2d) for m in bilinear.modules())
    with pytest.raises(ValueError, match="upsample_mode"):
        FusionFPN([6], [16], upsample_mode="cubic")


def test_released_input_channel_order_feeds_bgr_normalised_with_the_rgb_mean():
    """mmcv imnormalize(to_rgb=True) on an RGB image: the network sees (B, G, R) minus the
    RGB mean, over the RGB std (channel by channel)."""
    from voxelsplat.modeling.meta_arch import OccupancyFlowModel

    model = OccupancyFlowModel.__new__(OccupancyFlowModel)
    nn.Module.__init__(model)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    model.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1))
    model.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1))
    image = torch.randint(0, 256, (2, 3, 4, 5)).float()  # 2 cameras, RGB
    for order, channels in (("bgr", (2, 1, 0)), ("rgb", (0, 1, 2))):
        model.input_channel_order = order
        out = model.preprocess_images([{"img": image}])[0]
        for c, source in enumerate(channels):
            torch.testing.assert_close(out[:, c], (image[:, source] - mean[c]) / std[c])
