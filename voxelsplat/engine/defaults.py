"""Build and run training / evaluation from a LazyConfig, in the spirit of
detectron2's ``DefaultTrainer`` and ``tools/lazyconfig_train_net.py``.

Config root keys: ``model``, ``dataloader.{train,test,evaluator}``, ``optimizer``,
``lr_multiplier`` and ``train`` (see ``configs/common/train.py``).
"""
from __future__ import annotations

import logging
import os
from typing import List

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, TensorboardXWriter
from omegaconf import OmegaConf

from .checkpoint import OccupancyCheckpointer
from .hooks import PeakMemoryHook, TrainingStateHook, unwrap_model
from .json_writer import MetricsJSONWriter, drop_records_from
from .trainer import OccupancyTrainer

logger = logging.getLogger("voxelsplat")
_MISSING = object()


def load_config(config_file: str, overrides: List[str] = ()):
    """Load a LazyConfig file and apply ``key=value`` overrides strictly: a key that the
    config does not have is an error (prefix it with ``+`` to add a new key)."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file {config_file!r} does not exist")
    cfg = LazyConfig.load(config_file)
    return apply_overrides(cfg, list(overrides), config_file=config_file)


def apply_overrides(cfg, overrides: List[str], config_file: str = "<config>"):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    for override in parsed:
        key = override.key_or_group
        if override.is_delete():
            raise ValueError(f"override {override.input_line!r}: deleting keys is not supported")
        if not override.is_add() and OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            parent, _, leaf = key.rpartition(".")
            container = OmegaConf.select(cfg, parent, default=None) if parent else cfg
            if _lazy_call_accepts(container, leaf):
                continue
            known = sorted(container.keys()) if OmegaConf.is_dict(container) else []
            raise KeyError(
                f"override {override.input_line!r}: {config_file} has no key '{key}'"
                + (f" ('{parent or '<root>'}' has keys: {', '.join(map(str, known))})" if known else "")
                + "; use +KEY=VALUE to add a new key"
            )
    plain = [o.input_line.lstrip("+") for o in parsed]
    return LazyConfig.apply_overrides(cfg, plain)


def _lazy_call_accepts(node, argument: str) -> bool:
    """True when ``node`` is a ``LazyCall`` whose target takes ``argument`` (a keyword
    left at its default in the config)."""
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        return False
    import inspect

    from detectron2.utils.registry import locate

    target = node._target_
    target = locate(target) if isinstance(target, str) else target
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return argument in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def create_ddp_model(model: torch.nn.Module, *, fp16_compression: bool = False, **kwargs) -> torch.nn.Module:
    """Wrap in ``DistributedDataParallel`` when there are several processes (GPU or CPU/gloo).

    ``fp16_compression`` compresses gradients for all-reduce (CUDA only)."""
    if comm.get_world_size() == 1:
        return model
    on_cuda = next(model.parameters()).is_cuda
    kwargs.setdefault("device_ids", [comm.get_local_rank()] if on_cuda else None)
    ddp = torch.nn.parallel.DistributedDataParallel(model, **kwargs)
    if fp16_compression and on_cuda:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp


def do_test(cfg, model):
    """Run the configured evaluator on ``dataloader.test``; returns its results (or {})."""
    if cfg.dataloader.get("evaluator", None) is None:
        logger.warning("no dataloader.evaluator in the config: skipping evaluation")
        return {}
    # the loader first: building it registers the dataset whose metadata the evaluator reads
    test_loader = instantiate(cfg.dataloader.test)
    evaluator = instantiate(cfg.dataloader.evaluator)
    if getattr(evaluator, "output_dir", "") is None and cfg.get("train", None) is not None:
        evaluator.output_dir = cfg.train.get("output_dir", None)  # results go to <train.output_dir>/inference/
    # Without the DDP wrapper: inference needs no gradient sync, and the ranks' shards of
    # whole scenes differ in length, so a per-forward buffer broadcast would not pair up.
    results = inference_on_dataset(unwrap_model(model), test_loader, evaluator)
    if comm.is_main_process() and results:
        print_csv_format(results)
    return results


def configure_reproducibility(cfg) -> None:
    """Apply ``train.num_threads`` and ``train.deterministic`` to this process.

    ``num_threads`` (a positive int; None leaves PyTorch's default, or the share the CPU
    launcher gave each process) fixes the intra-op thread count, on which CPU reductions and
    so the last bits of a run depend. ``deterministic`` switches on
    ``torch.use_deterministic_algorithms`` (an op without a deterministic implementation is
    then an error that names it), cuDNN's deterministic mode and, for cuBLAS, the workspace
    setting it needs; it cannot go with ``train.cudnn_benchmark``. Called by
    ``tools/lazyconfig_train_net.py`` after detectron2's ``default_setup``."""
    train = cfg.train
    threads = train.get("num_threads", None)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"train.num_threads must be a positive integer or None, got {threads!r}")
        torch.set_num_threads(threads)
    deterministic = train.get("deterministic", False)
    if not isinstance(deterministic, bool):
        raise ValueError(f"train.deterministic must be True or False, got {deterministic!r}")
    if deterministic and train.get("cudnn_benchmark", False):
        raise ValueError("train.deterministic=True cannot go with train.cudnn_benchmark=True "
                         "(cuDNN's benchmark picks algorithms by timing)")
    if deterministic:
        # cuBLAS reproduces its results only with a fixed workspace (read when CUDA starts)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(deterministic)
    logger.info("Threads per process: %d; deterministic algorithms: %s", torch.get_num_threads(), deterministic)


def build_model(cfg) -> torch.nn.Module:
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    return model


def convert_sync_batchnorm(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """BatchNorm -> SyncBatchNorm over the whole model (the released recipe trains with
    SyncBN on 8 GPUs) when ``enabled`` and several CUDA processes train together; a no-op
    otherwise (one process, or CPU where SyncBatchNorm does not run)."""
    if not enabled or comm.get_world_size() == 1:
        return model
    if not next(model.parameters()).is_cuda:
        logger.warning("train.sync_bn=True ignored: SyncBatchNorm needs CUDA; BatchNorm statistics stay per process")
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def build_hooks(cfg, model, trainer, checkpointer) -> list:
    train = cfg.train
    extra = [instantiate(h) for h in train.get("extra_hooks", None) or []]
    writers = None
    if comm.is_main_process():  # detectron2's default_writers, with a metrics.json a killed run leaves whole
        os.makedirs(train.output_dir, exist_ok=True)
        writers = [
            CommonMetricPrinter(train.max_iter),
            MetricsJSONWriter(os.path.join(train.output_dir, "metrics.json")),
            TensorboardXWriter(train.output_dir),
        ]
    return [
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        *extra,
        PeakMemoryHook(period=train.log_period),
        hooks.PeriodicCheckpointer(checkpointer, **train.checkpointer) if comm.is_main_process() else None,
        # eval_period 0: evaluate after the last iteration only; None: never (e.g. a pretraining)
        hooks.EvalHook(train.eval_period, lambda: do_test(cfg, model)) if train.eval_period is not None else None,
        hooks.PeriodicWriter(writers, period=train.log_period) if writers else None,
    ]


def do_train(cfg, resume: bool = False, extra_hooks: list = ()):
    """Train the configured model. ``extra_hooks`` are appended after the configured ones.

    With ``resume``, training continues from the last checkpoint of ``train.output_dir`` as
    the uninterrupted run would have: the checkpoint carries the data position, every
    process's random generators and temporal history, and the recent metrics
    (:class:`~voxelsplat.engine.trainer.OccupancyTrainer`, :class:`~.hooks.TrainingStateHook`).

    Returns the trainer (its ``model`` holds the final weights)."""
    model = convert_sync_batchnorm(build_model(cfg), bool(cfg.train.get("sync_bn", False)))
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = OccupancyTrainer(
        model, train_loader, optimizer,
        clip_grad_norm=cfg.train.clip_grad.max_norm if cfg.train.clip_grad.enabled else None,
        clip_grad_norm_type=cfg.train.clip_grad.norm_type,
        amp=cfg.train.amp.enabled,
    )
    trainer.output_dir = cfg.train.output_dir  # for hooks that write files of their own (EMA weights)
    # the optimizer's state is part of the trainer's (SimpleTrainer.state_dict): saved once, under "trainer"
    checkpointer = OccupancyCheckpointer(model, cfg.train.output_dir, trainer=trainer,
                                         trust_checkpoint=cfg.train.get("trust_checkpoint", False))
    # first, so that it has gathered the per-process state when the checkpointer saves
    state_hook = TrainingStateHook(checkpoint_period=cfg.train.checkpointer.period,
                                   checkpoint_history=cfg.train.get("checkpoint_history", True))
    trainer.register_hooks([state_hook] + build_hooks(cfg, model, trainer, checkpointer) + list(extra_hooks))

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    if start_iter and comm.is_main_process():
        # the iterations after the checkpoint run again: their records are written again
        dropped = drop_records_from(os.path.join(cfg.train.output_dir, "metrics.json"), start_iter)
        if dropped:
            logger.info("Resuming at iteration %d: dropped %d later records of metrics.json", start_iter, dropped)
    trainer.train(start_iter, cfg.train.max_iter)
    return trainer


# Where an --eval-only run saves its config (a training run's folder keeps its config.yaml).
EVAL_CONFIG_FILE = "config_eval.yaml"


def do_eval_only(cfg):
    """Load ``train.init_checkpoint`` into the configured model and evaluate it.

    Every parameter and buffer of the model must be in the checkpoint with its shape (an
    :class:`IncompatibleCheckpointError` lists those that are not). Once it has loaded, the
    run's config is saved as ``<train.output_dir>/config_eval.yaml``, beside (never over) the
    ``config.yaml`` of a training run in the same folder.
    """
    if not cfg.train.init_checkpoint:
        raise ValueError("--eval-only needs train.init_checkpoint=PATH (a checkpoint to evaluate)")
    model = build_model(cfg)
    model = create_ddp_model(model)
    OccupancyCheckpointer(model, strict=True, trust_checkpoint=cfg.train.get("trust_checkpoint", False)).load(
        cfg.train.init_checkpoint)
    if comm.is_main_process() and cfg.train.output_dir:
        os.makedirs(cfg.train.output_dir, exist_ok=True)
        LazyConfig.save(cfg, os.path.join(cfg.train.output_dir, EVAL_CONFIG_FILE))
    return do_test(cfg, model)
