#!/usr/bin/env python
"""Train or evaluate a VoxelSplat model described by a LazyConfig python file.

    python tools/lazyconfig_train_net.py --config-file configs/r50.py --num-gpus 8
    python tools/lazyconfig_train_net.py --config-file configs/r50.py --eval-only train.init_checkpoint=PATH
    python tools/lazyconfig_train_net.py --config-file configs/synthetic/voxelsplat_tiny.py --resume

``--num-gpus N`` starts N processes: one per GPU with CUDA (NCCL), N CPU processes
(gloo) without. Trailing ``KEY=VALUE`` pairs override config keys; a key the config
does not have is an error (write ``+KEY=VALUE`` to add one).
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.engine import default_argument_parser, default_setup  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from voxelsplat.engine import configure_reproducibility, do_eval_only, do_train, launch, load_config  # noqa: E402
from voxelsplat.utils.io import atomic_write_bytes  # noqa: E402

logger = logging.getLogger("voxelsplat")


def setup(cfg, args):
    """detectron2's ``default_setup`` (logging, seeds, ``<output_dir>/config.yaml``). An
    ``--eval-only`` run leaves the folder's ``config.yaml`` as it was, since it is often the
    folder of the training run that config.yaml describes; ``do_eval_only`` saves the eval
    config as config_eval.yaml once the checkpoint has loaded."""
    if not args.eval_only:
        default_setup(cfg, args)
        return
    config_yaml = os.path.join(cfg.train.output_dir, "config.yaml") if cfg.train.output_dir else None
    previous = None
    if config_yaml and os.path.isfile(config_yaml):
        with open(config_yaml, "rb") as f:
            previous = f.read()
    default_setup(cfg, args)
    if config_yaml and comm.is_main_process():
        if previous is None:
            if os.path.isfile(config_yaml):
                os.remove(config_yaml)
        else:
            atomic_write_bytes(config_yaml, previous)


def main(args):
    cfg = load_config(args.config_file, args.opts)
    setup(cfg, args)
    # the library's own loggers (evaluation tables, data, hooks) go to the console and log.txt too
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="voxelsplat", abbrev_name="vs")
    configure_reproducibility(cfg)  # train.num_threads, train.deterministic
    if args.eval_only:
        results = do_eval_only(cfg)
        logger.info("Evaluation results: %s", results)
        return results
    do_train(cfg, resume=args.resume)


# flags a user may write after the KEY=VALUE overrides (argparse hands them to the overrides)
_LATE_FLAGS = {"--resume": "resume", "--eval-only": "eval_only"}


def parse_args(argv=None):
    """detectron2's arguments, with ``--resume`` / ``--eval-only`` also accepted after the
    overrides (``... train.max_iter=400 --resume``); any other ``--option`` there is an error."""
    parser = default_argument_parser()
    args = parser.parse_args(argv)
    overrides = []
    for item in args.opts:
        if item in _LATE_FLAGS:
            setattr(args, _LATE_FLAGS[item], True)
        elif item.startswith("--") and item != "--":
            parser.error(f"unrecognized option {item!r} among the KEY=VALUE overrides "
                         f"(options go before them; only {sorted(_LATE_FLAGS)} may follow)")
        else:
            overrides.append(item)
    args.opts = overrides
    return args


def cli(argv=None):
    args = parse_args(argv)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    cli()
