#!/usr/bin/env python
"""The end-to-end demo: generate the synthetic dataset, train the tiny FB-Occ baseline and
the tiny VoxelSplat model on it, evaluate both, print a comparison table and write
TensorBoard logs and pictures.

The table also holds the floors (``voxelsplat.engine.floors``): all free, the training
labels' per-voxel class prior and the previous keyframe's ground truth, scored on the same
validation split by the same evaluator, and, next to each model's mAVE, the flow floors of
its own predictions (``mAVE_zero_flow``: its occupancy with zero flow; ``mAVE_gt_occupancy``:
its flow on the GT occupancy). A model's numbers mean something only above its floors.

    python tools/run_demo.py                      # what `make demo` runs
    python tools/run_demo.py --quick              # a much smaller run (used by the tests)

Outputs under ``--output-dir`` (default ``output/demo``): one run folder per model
(checkpoints, metrics.json, TensorBoard events, pictures/), ``results.json`` and
``results.md`` (one row per model, then one per floor; in ``results.json`` each row's
``kind`` is ``"model"`` or ``"floor"``), and ``floors.json``, the floors' results with the
dataset and evaluator settings they were computed for, reused while those stay the same
(``--floors-cache`` puts it elsewhere: ``tools/run_experiment.py`` shares one between seeds).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = (
    ("FB-Occ (baseline)", "fbocc_tiny", "configs/synthetic/fbocc_tiny.py"),
    ("VoxelSplat", "voxelsplat_tiny", "configs/synthetic/voxelsplat_tiny.py"),
    ("VoxelSplat corrected", "voxelsplat_tiny_corrected", "configs/synthetic/voxelsplat_tiny_corrected.py"),
)
# The ablation ladder of the regularizer: its render losses one by one, then the propagated
# state (the last step is VoxelSplat itself, above). tools/run_experiment.py trains it at one seed.
ABLATION_MODELS = (
    ("VoxelSplat: semantic render loss only", "voxelsplat_tiny_semantic_only",
     "configs/synthetic/voxelsplat_tiny_semantic_only.py"),
    ("VoxelSplat: + depth render loss", "voxelsplat_tiny_semantic_depth",
     "configs/synthetic/voxelsplat_tiny_semantic_depth.py"),
    ("VoxelSplat: + flow render loss", "voxelsplat_tiny_no_propagation",
     "configs/synthetic/voxelsplat_tiny_no_propagation.py"),
)
ALL_MODELS = MODELS + ABLATION_MODELS
# what `make demo` trains (tools/run_experiment.py trains every model of MODELS)
DEMO_MODELS = ("fbocc_tiny", "voxelsplat_tiny")
METRICS = ("RayIoU", "RayIoU@1", "RayIoU@2", "RayIoU@4", "mAVE", "mAVE_zero_flow", "mAVE_gt_occupancy", "mAVE_TP",
           "mAVE_TP_zero_flow", "mAVE_TP_gt_occupancy", "OccScore", "mIoU")
# (table row, floor name in voxelsplat.engine.floors)
FLOORS = (
    ("floor: all free", "all_free"),
    ("floor: class prior", "class_prior"),
    ("floor: previous GT", "previous_gt"),
    ("floor: GT occupancy, zero flow", "gt_occupancy_zero_flow"),
)
# The shared depth pretraining (--pretrain-iters) and the overrides it takes from the command line.
PRETRAIN_CONFIG = "configs/synthetic/depth_pretrain_tiny.py"
PRETRAIN_OVERRIDE_PREFIXES = ("model.backbone.", "model.neck.", "model.depth_net.", "model.pixel_", "model.input_",
                              "dataloader.train.mapper.", "train.num_threads=", "train.deterministic=")
# <run folder>/RUN_MARKER: a finished training run (its config, overrides and wall time); a later
# call with the same config and overrides reads the run instead of starting it again
RUN_MARKER = "demo_run.json"
# <output dir>/PRETRAIN_DIR: the depth pretraining (default --pretrain-dir); its PRETRAIN_MARKER
# holds the settings it was trained with
PRETRAIN_DIR = "depth_pretrain"
PRETRAIN_MARKER = "depth_pretrain.json"
# floors.json entry with the splits' motion statistics (voxelsplat.engine.floors.motion_statistics)
SPLIT_MOTION = "split_motion"
# Bumped when the floors or their cache change, so an older floors.json is recomputed.
FLOORS_CACHE_VERSION = 3
# Config overrides that can change the floors (the rest concern the models and training).
FLOOR_OVERRIDE_PREFIXES = ("dataloader.train.dataset.", "dataloader.test.dataset.", "dataloader.evaluator.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument("--data-dir", default="datasets/synthetic", help="synthetic dataset (made if missing)")
    parser.add_argument("--version", default="v1.0-mini",
                        help="nuScenes version of the synthetic dataset: v1.0-mini holds at most 10 scenes (2 for "
                             "validation); v1.0-trainval splits larger counts about 82/18")
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--samples-per-scene", type=int, default=20)
    parser.add_argument("--image-size", type=int, nargs=2, default=(352, 128), metavar=("W", "H"))
    parser.add_argument("--iters", type=int, default=None, help="training iterations (default: the configs')")
    parser.add_argument("--eval-period", type=int, default=None,
                        help="also evaluate every this many iterations (learning curves; default: at the end only)")
    parser.add_argument("--checkpoint-period", type=int, default=None,
                        help="save a checkpoint every this many iterations, where an interrupted run resumes "
                             "(default: at each evaluation)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument("--omit-classes", nargs="*", default=[], metavar="CLASS",
                        help="object classes the synthetic worlds leave out (tools/make_synthetic_dataset.py)")
    parser.add_argument("--one-way-traffic", action="store_true",
                        help="the synthetic worlds' main roads carry all traffic the ego's way")
    parser.add_argument("--point-cloud-range", type=float, nargs=6, default=None,
                        metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                        help="extent of the synthetic labels' grid in metres (tools/make_synthetic_dataset.py; "
                             "default: OpenOcc v2's 80x80x6.4 m around the ego)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny run: 2 scenes x 4 keyframes, 176x64 images, 6 iterations")
    parser.add_argument("--skip-pictures", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(DEMO_MODELS), choices=[name for _, name, _ in ALL_MODELS],
                        help="which models to train, in this order (default: %(default)s)")
    parser.add_argument("--pretrain-iters", type=int, default=0,
                        help="first pretrain the image backbone, neck and depth net on the synthetic LiDAR depth for "
                             "this many iterations (configs/synthetic/depth_pretrain_tiny.py) and start every model "
                             "from it; 0: random initialisation")
    parser.add_argument("--pretrain-dir", default=None,
                        help="where the depth pretraining runs and is reused while its settings are the same "
                             "(default: <output-dir>/depth_pretrain; tools/run_experiment.py shares one)")
    parser.add_argument("--floors-cache", default=None,
                        help="JSON file of the floors' results, reused while the dataset and evaluator settings are "
                             "the same (default: <output-dir>/floors.json)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY=VALUE config overrides for both models")
    args = parser.parse_args(argv)
    if args.quick:
        args.scenes, args.samples_per_scene, args.image_size = 2, 4, (176, 64)
        args.iters = args.iters or 6
    if args.floors_cache is None:
        args.floors_cache = os.path.join(args.output_dir, "floors.json")
    if args.pretrain_dir is None:
        args.pretrain_dir = os.path.join(args.output_dir, PRETRAIN_DIR)
    for name in ("iters", "eval_period", "checkpoint_period"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.pretrain_iters < 0:
        parser.error(f"--pretrain-iters must be >= 0, got {args.pretrain_iters}")
    return args


def selected_models(args):
    """The ``(title, run name, config)`` of the models ``args.models`` names, in that order."""
    by_name = {name: (title, name, config) for title, name, config in ALL_MODELS}
    return [by_name[name] for name in args.models]


def step(message):
    print(f"\n[demo] {message}", flush=True)


def run(cmd, log_path=None, append=False):
    """Run a command, streaming its output (and teeing it to ``log_path``, after what the file
    holds with ``append``)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=ROOT) as proc, open(log_path or os.devnull, "a" if append else "w") as log:
        for line in proc.stdout:
            log.write(line)
            if "[demo-quiet]" not in line:
                sys.stdout.write(line)
        proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"[demo] command failed ({proc.returncode}): {' '.join(cmd)}"
                         + (f"\n[demo] see {log_path}" if log_path else ""))
    return time.perf_counter() - start


def dataset_overrides(args):
    """Point the synthetic configs at the dataset this demo made."""
    data_dir = os.path.abspath(args.data_dir)
    return [
        f"dataloader.train.dataset.dataroot={data_dir}",
        f"dataloader.test.dataset.dataroot={data_dir}",
        f"dataloader.train.dataset.version={args.version}",
        f"dataloader.test.dataset.version={args.version}",
    ]


def dataset_settings(args):
    """What the demo's synthetic dataset is generated from."""
    settings = {"version": args.version, "scenes": args.scenes, "samples_per_scene": args.samples_per_scene,
                "image_size": list(args.image_size), "seed": args.seed}
    if args.omit_classes:  # only when used, so that the markers of datasets made before stay valid
        settings["omit_classes"] = sorted(set(args.omit_classes))
    if args.one_way_traffic:
        settings["one_way_traffic"] = True
    if args.point_cloud_range is not None:
        settings["point_cloud_range"] = [float(v) for v in args.point_cloud_range]
    return settings


def ensure_dataset(args):
    version_dir = os.path.join(args.data_dir, args.version)
    marker = os.path.join(args.data_dir, "demo_dataset.json")
    wanted = dataset_settings(args)
    if os.path.isdir(version_dir) and os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == wanted:
                step(f"synthetic dataset already in {args.data_dir}")
                return 0.0
    step(f"generating the synthetic dataset in {args.data_dir} "
         f"({args.scenes} scenes x {args.samples_per_scene} keyframes, {args.image_size[0]}x{args.image_size[1]})")
    seconds = run([sys.executable, "tools/make_synthetic_dataset.py", "--output", args.data_dir,
                   "--version", args.version,
                   "--scenes", str(args.scenes), "--samples-per-scene", str(args.samples_per_scene),
                   "--image-size", str(args.image_size[0]), str(args.image_size[1]),
                   "--seed", str(args.seed), "--overwrite",
                   *(["--omit-classes", *args.omit_classes] if args.omit_classes else []),
                   *(["--one-way-traffic"] if args.one_way_traffic else []),
                   *(["--point-cloud-range", *map(str, args.point_cloud_range)] if args.point_cloud_range else [])])
    write_json(marker, wanted)
    return seconds


def ensure_depth_pretraining(args):
    """The checkpoint every model of the demo starts from, or None without ``--pretrain-iters``.

    The image backbone, neck and depth net of the tiny configs, trained on the synthetic LiDAR
    depth alone (:data:`PRETRAIN_CONFIG`), the way the released models start from a
    depth-pretrained checkpoint. Trained once into ``args.pretrain_dir`` and reused while the
    dataset, the iterations and the overrides that reach it are the same; an interrupted
    pretraining resumes from its last checkpoint. A folder pretrained with other settings is
    refused rather than overwritten."""
    if not args.pretrain_iters:
        return None
    opts = [o for o in args.opts if o != "--" and o.startswith(PRETRAIN_OVERRIDE_PREFIXES)]
    # the labels' grid is left out: the pretraining reads the images and the LiDAR, which it does not change
    dataset = {k: v for k, v in dataset_settings(args).items() if k != "point_cloud_range"}
    wanted = {"config": PRETRAIN_CONFIG, "iters": args.pretrain_iters, "dataset": dataset, "overrides": opts}
    final = os.path.join(args.pretrain_dir, "model_final.pth")
    marker = os.path.join(args.pretrain_dir, PRETRAIN_MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            found = json.load(f)
        if found != wanted:
            raise SystemExit(f"[demo] {args.pretrain_dir} holds a depth pretraining with other settings "
                             f"({marker}: {found}, wanted {wanted}); pass another --pretrain-dir or remove it")
        if os.path.isfile(final):
            step(f"depth-pretrained checkpoint already in {final}")
            return final
    os.makedirs(args.pretrain_dir, exist_ok=True)
    write_json(marker, wanted)
    step(f"pretraining the image backbone, neck and depth net on LiDAR depth ({args.pretrain_iters} iterations) "
         f"-> {args.pretrain_dir}")
    run([sys.executable, "tools/lazyconfig_train_net.py", "--config-file", PRETRAIN_CONFIG, "--resume",
         f"train.output_dir={args.pretrain_dir}", f"train.max_iter={args.pretrain_iters}",
         f"train.checkpointer.period={max(1, args.pretrain_iters // 4)}", "train.checkpointer.max_to_keep=1",
         *dataset_overrides(args), *opts],
        log_path=os.path.join(args.pretrain_dir, "log_demo.txt"))
    if not os.path.isfile(final):
        raise SystemExit(f"[demo] the depth pretraining finished without writing {final}")
    return final


def _plain(value):
    """A config value as plain JSON data (callables by their dotted name)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(value):
        return f"{value.__module__}.{value.__qualname__}"
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


def write_json(path, payload):
    from voxelsplat.utils.io import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2))


def floor_results(args):
    """The floors on the demo's validation split: ``{floor name: results}`` (see
    ``voxelsplat.engine.floors``), scored by the evaluator of the models' data config.

    Read from ``args.floors_cache`` when it was computed for the same dataset and evaluator
    settings; otherwise computed (a few seconds) and written there."""
    from detectron2.config import LazyConfig, instantiate
    from omegaconf import OmegaConf

    from voxelsplat.engine.floors import evaluate_floors
    from voxelsplat.engine.floors import motion_statistics

    cfg = LazyConfig.load(os.path.join(ROOT, MODELS[0][2]))  # every model of the demo shares its data config
    overrides = dataset_overrides(args) + [o for o in args.opts if o.startswith(FLOOR_OVERRIDE_PREFIXES)]
    cfg = LazyConfig.apply_overrides(cfg, overrides)
    # scored like a model, but in this process, writing nothing, without a model's flow floors
    cfg.dataloader.evaluator.output_dir = None
    cfg.dataloader.evaluator.export_submission = False
    cfg.dataloader.evaluator.distributed = False
    cfg.dataloader.evaluator.compute_flow_floors = False
    key = _plain({"version": FLOORS_CACHE_VERSION, "dataset": dataset_settings(args),
                  **{part: OmegaConf.to_container(node, resolve=True) for part, node in (
                      ("train_dataset", cfg.dataloader.train.dataset), ("val_dataset", cfg.dataloader.test.dataset),
                      ("evaluator", cfg.dataloader.evaluator))}})
    key = portable_path(key)  # the dataset's folder relative to the repository
    if os.path.isfile(args.floors_cache):
        with open(args.floors_cache) as f:
            cached = json.load(f)
        if portable_path(cached.get("key")) == key:
            step(f"floors already in {args.floors_cache}")
            return {name: {k: float("nan") if v is None else v for k, v in results.items()}
                    for name, results in cached["floors"].items()}
    step(f"floors on the validation split -> {args.floors_cache}")
    train_name, val_name = instantiate(cfg.dataloader.train.dataset), instantiate(cfg.dataloader.test.dataset)
    results = evaluate_floors(train_name, val_name, [name for _, name in FLOORS],
                              evaluator=instantiate(cfg.dataloader.evaluator))
    # how much of each split moves (the benchmark gate asks train and val to move alike)
    results[SPLIT_MOTION] = {f"{split}_{key}": value for split, name in (("train", train_name), ("val", val_name))
                             for key, value in motion_statistics(name).items()}
    folder = os.path.dirname(os.path.abspath(args.floors_cache))
    os.makedirs(folder, exist_ok=True)
    write_json(args.floors_cache, {"key": key, "floors": {
        name: {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in floor.items()}
        for name, floor in results.items()}})
    return results


def floor_rows(floors):
    """Table rows of the floors, in :data:`FLOORS` order."""
    return [(title, dict(floors[name], kind="floor", floor=name)) for title, name in FLOORS]


def portable_path(value):
    """``value`` relative to the repository when it is an absolute path inside it, else as it is
    (so that records such as a run's :data:`RUN_MARKER` or the floors' cache key match in another
    checkout); dicts and lists are converted item by item."""
    if isinstance(value, dict):
        return {k: portable_path(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_path(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        relative = os.path.relpath(value, ROOT)
        if not relative.startswith(os.pardir):
            return relative
    return value


def portable_overrides(overrides):
    """``overrides`` with every ``key=value`` whose value is an absolute path inside the
    repository written relative to it (:func:`portable_path`)."""
    portable = []
    for override in overrides:
        key, sep, value = override.partition("=")
        portable.append(f"{key}={portable_path(value)}" if sep else override)
    return portable


def finished_run(run_dir, config, overrides):
    """``(wall time, resumed)`` of the finished run in ``run_dir`` when it was trained with
    ``config`` and ``overrides`` (its :data:`RUN_MARKER` and its ``metrics.json`` are there; the
    checkpoints need not be, so a run's record can be kept without its weights), else None.
    ``resumed``: the run continued a checkpoint, so the time covers the part after it."""
    marker = os.path.join(run_dir, RUN_MARKER)
    if not (os.path.isfile(marker) and os.path.isfile(os.path.join(run_dir, "metrics.json"))):
        return None
    with open(marker) as f:
        found = json.load(f)
    if found.get("config") != config or (portable_overrides(found.get("overrides", []))
                                         != portable_overrides(overrides)):
        return None
    return float(found["train_time_s"]), bool(found.get("resumed", False))


def read_run(output_dir):
    """Last evaluation and training statistics of a run, from its metrics.json (a line cut by a
    killed run is skipped with a warning)."""
    from voxelsplat.utils.io import read_json_lines

    records = read_json_lines(os.path.join(output_dir, "metrics.json"))
    evaluation = [r for r in records if any(k.startswith("occupancy/") for k in r)]
    if not evaluation:
        raise SystemExit(f"[demo] no evaluation results in {output_dir}/metrics.json")
    metrics = {k.split("/", 1)[1]: v for k, v in evaluation[-1].items() if k.startswith("occupancy/")}
    times = [r["time"] for r in records if "time" in r]
    memory = [r["peak_memory_mb"] for r in records if "peak_memory_mb" in r]
    metrics["step_time_s"] = sorted(times)[len(times) // 2] if times else float("nan")
    metrics["peak_memory_mb"] = max(memory) if memory else float("nan")
    return metrics


def format_cell(metrics, key, digits):
    """A number with ``digits`` decimals; "-" where the row has no such entry (a floor has no
    training time nor flow floors of its own)."""
    value = metrics.get(key)
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows):
    header = ["model", *METRICS, "train time (s)", "step (s)", "peak mem (MiB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in rows:
        cells = [name] + [format_cell(m, k, 4 if k.startswith("mAVE") else 2) for k in METRICS]
        cells += [format_cell(m, "train_time_s", 0), format_cell(m, "step_time_s", 3),
                  format_cell(m, "peak_memory_mb", 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    total_start = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    ensure_dataset(args)
    floors = floor_results(args)
    pretrained = ensure_depth_pretraining(args)
    rows = []
    for title, name, config in selected_models(args):
        run_dir = os.path.join(args.output_dir, name)
        # resuming needs only the newest checkpoint: one periodic file beside model_final
        overrides = [f"train.output_dir={run_dir}", f"train.seed={args.seed}", "train.checkpointer.max_to_keep=1",
                     *dataset_overrides(args)]
        if pretrained:
            overrides.append(f"train.init_checkpoint={os.path.abspath(pretrained)}")
        if args.iters:
            overrides += [f"train.max_iter={args.iters}", f"train.eval_period={args.eval_period or args.iters}",
                          f"train.checkpointer.period={args.checkpoint_period or args.eval_period or args.iters}"]
        else:
            if args.eval_period:
                overrides += [f"train.eval_period={args.eval_period}"]
            if args.checkpoint_period:
                overrides += [f"train.checkpointer.period={args.checkpoint_period}"]
        overrides += [o for o in args.opts if o != "--"]
        finished = finished_run(run_dir, config, overrides)
        seconds, resumed = finished if finished is not None else (None, False)
        if finished is None:
            # a checkpoint already there: the run continues it, and its wall time covers this part only
            resumed = os.path.isfile(os.path.join(run_dir, "last_checkpoint"))
            step(f"training {title}: {config} -> {run_dir}")
            # --resume: a run interrupted part-way continues from its last checkpoint (its log goes on)
            seconds = run([sys.executable, "tools/lazyconfig_train_net.py", "--config-file", config, "--resume",
                           *overrides],
                          log_path=os.path.join(args.output_dir, f"{name}.log"), append=True)
            write_json(os.path.join(run_dir, RUN_MARKER),
                       {"config": config, "overrides": portable_overrides(overrides), "train_time_s": seconds,
                        "resumed": resumed})
        else:
            step(f"{title}: finished run in {run_dir}, read instead of trained again")
        metrics = read_run(run_dir)
        metrics["train_time_s"] = seconds
        metrics["resumed"] = resumed  # train_time_s then covers the part after the checkpoint only
        metrics["kind"] = "model"
        rows.append((title, metrics))
        if not args.skip_pictures and not os.path.isfile(os.path.join(run_dir, "model_final.pth")):
            step(f"pictures of {title}: skipped, {run_dir}/model_final.pth is not there (a run kept without "
                 f"its weights)")
        elif not args.skip_pictures:
            step(f"pictures of {title} -> {run_dir}/pictures")
            run([sys.executable, "tools/visualize.py", "--config-file", config,
                 "--checkpoint", os.path.join(run_dir, "model_final.pth"),
                 "--output", os.path.join(run_dir, "pictures"), "--tensorboard-dir", run_dir,
                 "--num-samples", "2", *dataset_overrides(args)])
    rows += floor_rows(floors)
    table = format_table(rows)
    results = {title: metrics for title, metrics in rows}
    write_json(os.path.join(args.output_dir, "results.json"), results)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    step(f"done in {time.perf_counter() - total_start:.0f} s\n\n{table}\n\n"
         f"TensorBoard: .venv/bin/tensorboard --logdir {args.output_dir}\n"
         f"Pictures: {args.output_dir}/*/pictures/")
    return results


if __name__ == "__main__":
    main()
