#!/usr/bin/env python
"""Convert released FB-Occ / VoxelSplat checkpoints and ImageNet ResNet-50 weights into this
library's checkpoints (the work is done by ``voxelsplat.engine.convert_checkpoint``).

Whole model (a checkpoint written by the release's code, its ``epoch_N_ema.pth``, or the
depth-pretrained ResNet-50 the release starts from) -> ``{"model": ..., "conversion": ...}`` for
``train.init_checkpoint`` (``--skip-mismatched`` skips tensors of another shape, as the release's
non-strict ``load_from`` does, for partial checkpoints):

    python tools/convert_checkpoint.py model ckpts/voxelsplat_r50.pth checkpoints/voxelsplat_r50.pth \\
        --config-file configs/r50.py
    python tools/convert_checkpoint.py model ckpts/r50_256x705_depth_pretrain.pth \\
        checkpoints/r50_depth_pretrain.pth --config-file configs/fbocc_r50.py

Backbone only (torchvision / timm ResNet-50, or the ``img_backbone.*`` of a released checkpoint)
-> a timm state dict for ``model.backbone.init_checkpoint``:

    python tools/convert_checkpoint.py backbone resnet50-0676ba61.pth checkpoints/resnet50_imagenet.pth

The model to fill is built from ``--config-file`` (default ``configs/fbocc_r50.py``; trailing
``KEY=VALUE`` pairs override it, as in ``tools/lazyconfig_train_net.py``). Every source key that
could not be mapped and every key of ours left unfilled is printed; ``--strict`` makes either an
error and writes nothing. Checkpoints are read with ``torch.load(weights_only=True)``; one that
needs full unpickling is refused unless ``--allow-pickle`` (only for files you trust).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.config import instantiate  # noqa: E402

from voxelsplat.engine.convert_checkpoint import convert_backbone_checkpoint, convert_release_checkpoint  # noqa: E402
from voxelsplat.engine.defaults import load_config  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/fbocc_r50.py"  # relative to the repository root


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model", help="a released whole-model checkpoint -> train.init_checkpoint")
    backbone = commands.add_parser("backbone", help="ResNet-50 weights -> model.backbone.init_checkpoint")
    for sub in (model, backbone):
        sub.add_argument("source", help="checkpoint to convert (.pth / .pt / .bin / .safetensors)")
        sub.add_argument("output", help="file to write (written atomically)")
        sub.add_argument("--config-file", default=DEFAULT_CONFIG,
                         help=f"config whose model is filled (default: {DEFAULT_CONFIG})")
        sub.add_argument("--strict", action="store_true",
                         help="fail (and write nothing) on any unmapped source key or unfilled key of ours")
        sub.add_argument("--allow-pickle", action="store_true",
                         help="allow checkpoints that need full unpickling (runs code from the file: trusted "
                              "files only)")
    model.add_argument("--ema", action="store_true",
                       help="convert the mmcv EMAHook copies (ema_* keys) instead of the live weights")
    model.add_argument("--skip-mismatched", action="store_true",
                       help="report tensors whose shape differs from ours as dropped instead of failing "
                            "(as the release's non-strict load_from does; for partial checkpoints)")
    args, extra = parser.parse_known_args(argv)
    unknown = [token for token in extra if token.startswith("-") or "=" not in token]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.opts = extra  # KEY=VALUE config overrides
    return args


def _config(args):
    config_file = args.config_file
    if config_file == DEFAULT_CONFIG and not os.path.isfile(config_file):
        config_file = os.path.join(REPO_ROOT, DEFAULT_CONFIG)
    cfg = load_config(config_file, args.opts)
    if "init_checkpoint" in cfg.model.backbone:
        cfg.model.backbone.init_checkpoint = ""  # only the layout is needed: read no weights
    return cfg


def convert(args):
    if not os.path.isfile(args.source):  # before building the model
        raise FileNotFoundError(f"convert_checkpoint: checkpoint {args.source!r} does not exist")
    cfg = _config(args)
    if args.command == "model":
        model = instantiate(cfg.model)
        grid = getattr(getattr(model, "forward_projection", None), "grid", None)
        return convert_release_checkpoint(args.source, args.output, model.state_dict(), grid=grid,
                                          use_ema=args.ema, skip_mismatched=args.skip_mismatched,
                                          allow_pickle=args.allow_pickle, strict=args.strict)
    backbone = instantiate(cfg.model.backbone)
    if not hasattr(backbone, "model") or not hasattr(backbone.model, "feature_info"):
        raise ValueError(f"convert_checkpoint: the backbone of {args.config_file} is a {type(backbone).__name__}; "
                         f"the backbone command fills timm ResNets (TimmBackbone)")
    return convert_backbone_checkpoint(args.source, args.output, backbone.model.state_dict(),
                                       allow_pickle=args.allow_pickle, strict=args.strict)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = convert(args)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
