#!/usr/bin/env python
"""Baseline vs VoxelSplat on the synthetic dataset: same data, iterations and seeds, several
seeds; reports mean and spread of every metric and the time/memory ratios.

    python tools/run_experiment.py                       # the benchmark: every model, seeds 0-4
    python tools/run_experiment.py --seeds 0 --models fbocc_tiny   # one seed of the baseline

The benchmark's data and schedule are the defaults (docs/RESULTS.md says why): 20 synthetic
scenes of 20 keyframes (16 training, 4 validation) without the small object classes, labels on
51.2 m x 51.2 m around the ego (128x128x16), 1600 iterations per run after a shared depth
pretraining of 1000 iterations, evaluated every 400 iterations (the learning curves). Each run
takes 13 to 19 minutes on 2 CPU cores (19 to 25 on a slower machine).

Paired seeds: every model of seed N starts from the same weights (``train.seed=N``) and sees the
same frames in the same order with the same augmentation (``dataloader.train.seed=N``). Every
training process runs on ``--num-threads`` threads with deterministic algorithms
(``train.num_threads``, ``train.deterministic``), so a run repeats its numbers on the same kind
of CPU (another CPU rounds differently, and the runs then differ as much as seeds do).

After the seeds, the ablation ladder of the regularizer trains at ``--ablation-seed`` into
``<output-dir>/ablation_seed<N>/``: semantic render loss only, + depth, + flow (the configs
``configs/synthetic/voxelsplat_tiny_{semantic_only,semantic_depth,no_propagation}.py``); its last
step, + the propagated state, is VoxelSplat itself, read from that seed's folder.

The experiment resumes where it stopped: a seed whose ``<output-dir>/seed<N>/results.json``
exists is read instead of re-run, a finished run of a seed stopped part-way is read from its
folder, and a run stopped part-way continues from its last checkpoint (every 200 iterations).
Writes ``<output-dir>/experiment.json`` and ``<output-dir>/experiment.md`` (the table that
docs/RESULTS.md quotes).

With ``--records DIR`` the record of every finished run (its marker, metrics, config and
per-frame counts: :data:`RUN_RECORD_FILES`, no checkpoints), the experiment's tables and pictures
and the shared pretrained weights are copied into DIR after each seed, and the runs recorded there
are copied into ``--output-dir`` first and read instead of trained. The experiment can so span
sittings on machines that keep nothing but the repository
(``--records docs/results/synthetic_benchmark``, the runs of docs/RESULTS.md), and every run starts
from the one pretraining kept there. A run's settings name its folder, so the records read back
under the ``--output-dir`` they were made in (``output/experiment`` for the kept ones); under
another the tool warns and trains them again.

The table ends with the floors (see ``tools/run_demo.py``): predictors without a model, the
same for every seed (the seeds share one dataset), computed once into
``<output-dir>/floors.json`` and shown as single values.

Then the benchmark gate and, only when the baseline passes it, the paired comparison of every
other model with the baseline (:mod:`voxelsplat.evaluation.statistics`): the difference of
each metric with a 95% bootstrap interval over seeds x validation frames, from the per-frame
counts each evaluation writes (``inference/occupancy_sample_stats.npz``).
"""
import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import run_demo  # noqa: E402

# iterations of the shared depth pretraining (configs/synthetic/depth_pretrain_tiny.py)
BENCHMARK_PRETRAIN_ITERS = 1000
BENCHMARK_ITERS = 1600
# evaluations during each run (the learning curves' points) and checkpoints (where an interrupted run resumes)
BENCHMARK_EVAL_PERIOD = 400
BENCHMARK_CHECKPOINT_PERIOD = 200
# intra-op threads of every training process (the results' last bits depend on it)
BENCHMARK_THREADS = 2
# object classes the benchmark's worlds leave out (too small and rare to learn in the budget)
BENCHMARK_OMITTED_CLASSES = ("pedestrian", "bicycle", "motorcycle", "traffic_cone", "barrier")
# the benchmark labels' grid: 128x128x16 voxels of 0.4 m around the ego
BENCHMARK_POINT_CLOUD_RANGE = (-25.6, -25.6, -1.0, 25.6, 25.6, 5.4)
KEYS = ("RayIoU@1", "RayIoU@2", "RayIoU@4", "RayIoU", "mAVE", "mAVE_zero_flow", "mAVE_gt_occupancy", "mAVE_TP",
        "mAVE_TP_zero_flow", "mAVE_TP_gt_occupancy", "OccScore", "mIoU", "step_time_s", "peak_memory_mb")


def mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="output/experiment")
    parser.add_argument("--data-dir", default="datasets/synthetic_benchmark")
    parser.add_argument("--seeds", type=int, nargs="+", default=(0, 1, 2, 3, 4))
    parser.add_argument("--iters", type=int, default=BENCHMARK_ITERS, help="training iterations per run")
    parser.add_argument("--eval-period", type=int, default=BENCHMARK_EVAL_PERIOD,
                        help="evaluate every this many iterations (the learning curves' points; default: "
                             "%(default)s)")
    parser.add_argument("--checkpoint-period", type=int, default=BENCHMARK_CHECKPOINT_PERIOD,
                        help="checkpoint every this many iterations: an interrupted run resumes from there "
                             "(default: %(default)s)")
    parser.add_argument("--num-threads", type=int, default=BENCHMARK_THREADS,
                        help="PyTorch threads of every training process (train.num_threads; default: %(default)s)")
    parser.add_argument("--no-deterministic", action="store_true",
                        help="leave torch.use_deterministic_algorithms off (default: on, train.deterministic)")
    parser.add_argument("--ablation-seed", type=int, default=0,
                        help="the seed at which the ablation ladder trains (default: %(default)s)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the ablation ladder")
    # the benchmark's dataset: 16 training and 4 validation scenes of 20 keyframes
    parser.add_argument("--version", default="v1.0-trainval")
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--samples-per-scene", type=int, default=20)
    parser.add_argument("--image-size", type=int, nargs=2, default=(352, 128))
    parser.add_argument("--omit-classes", nargs="*", default=list(BENCHMARK_OMITTED_CLASSES), metavar="CLASS",
                        help="object classes the synthetic worlds leave out (the label set stays; default: "
                             "%(default)s; none: give the option alone)")
    parser.add_argument("--one-way-traffic", action="store_true",
                        help="the synthetic worlds' main roads carry all traffic the ego's way")
    parser.add_argument("--point-cloud-range", type=float, nargs=6, default=BENCHMARK_POINT_CLOUD_RANGE,
                        metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                        help="extent of the synthetic labels' grid in metres (default: the benchmark's, "
                             "%(default)s; OpenOcc v2's is -40 -40 -1 40 40 5.4)")
    parser.add_argument("--pretrain-iters", type=int, default=BENCHMARK_PRETRAIN_ITERS,
                        help="shared depth pretraining of the image branch, run once for every seed and model "
                             "(0: none)")
    parser.add_argument("--models", nargs="+", default=None, choices=[name for _, name, _ in run_demo.MODELS],
                        help="which models to train (default: all; the first is the baseline)")
    parser.add_argument("--records", default=None, metavar="DIR",
                        help="keep the record of every finished run (no weights) in DIR, in the layout of "
                             "--output-dir, and start from the records already there: runs recorded there are "
                             "read instead of trained (docs/results/synthetic_benchmark holds those of "
                             "docs/RESULTS.md)")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.num_threads is not None and args.num_threads < 1:
        parser.error(f"--num-threads must be >= 1, got {args.num_threads}")
    # pinned for every training process, the depth pretraining included
    opts = [f"train.num_threads={args.num_threads}", f"train.deterministic={not args.no_deterministic}"]
    opts += [o for o in args.opts if o != "--"]
    # one dataset for every seed (the seed varies the training only), so one set of floors
    shared_args = ["--data-dir", args.data_dir, "--version", args.version, "--scenes", str(args.scenes),
                   "--samples-per-scene", str(args.samples_per_scene), "--image-size", *map(str, args.image_size),
                   "--skip-pictures", "--seed", "0", "--floors-cache", os.path.join(args.output_dir, "floors.json"),
                   "--pretrain-iters", str(args.pretrain_iters),
                   "--pretrain-dir", os.path.join(args.output_dir, run_demo.PRETRAIN_DIR)]
    if args.omit_classes:
        shared_args += ["--omit-classes", *args.omit_classes]
    if args.one_way_traffic:
        shared_args += ["--one-way-traffic"]
    if args.point_cloud_range is not None:
        shared_args += ["--point-cloud-range", *map(str, args.point_cloud_range)]
    if args.iters:
        shared_args += ["--iters", str(args.iters)]
    if args.eval_period:
        shared_args += ["--eval-period", str(args.eval_period)]
    if args.checkpoint_period:
        shared_args += ["--checkpoint-period", str(args.checkpoint_period)]
    models = args.models or [name for _, name, _ in run_demo.MODELS]
    if args.records:
        restored = restore_records(args.records, args.output_dir)
        print(f"[experiment] {len(restored)} record files from {args.records} -> {args.output_dir}", flush=True)
        elsewhere = recorded_output_dirs(args.output_dir) - {_comparable_path(args.output_dir)}
        if elsewhere:
            # a run's settings name its folder, so a run recorded under another one trains again here
            print(f"[experiment] warning: runs in {args.records} were recorded with --output-dir "
                  f"{' / '.join(sorted(elsewhere))}; under {args.output_dir} they do not match and train again "
                  f"(pass --output-dir {sorted(elsewhere)[0]} to read them back)", flush=True)
    per_model = {}
    for seed in args.seeds:
        try:
            results = run_seed(os.path.join(args.output_dir, f"seed{seed}"), seed, models, shared_args, opts)
        finally:  # an interrupted seed keeps the records of its finished runs
            if args.records:
                save_records(args.output_dir, args.records)
        for model, metrics in results.items():
            if metrics.get("kind", "model") == "model":  # the floors are read once, below
                per_model.setdefault(model, []).append(metrics)
    ladder = None
    if not args.no_ablation:
        ladder_dir = os.path.join(args.output_dir, f"ablation_seed{args.ablation_seed}")
        try:
            ladder = run_seed(ladder_dir, args.ablation_seed, [name for _, name, _ in run_demo.ABLATION_MODELS],
                              shared_args, opts)
        finally:
            if args.records:
                save_records(args.output_dir, args.records)
    shared_args = ["--models", *models, *shared_args]
    # the seeds' shared floors: from the cache the runs above filled (computed here when every seed was resumed)
    demo = run_demo.parse_args(["--output-dir", args.output_dir, *shared_args, *opts])
    run_demo.ensure_dataset(demo)
    floor_values = run_demo.floor_results(demo)
    floors = dict(run_demo.floor_rows(floor_values))
    motion = floor_values.get(run_demo.SPLIT_MOTION)

    summary = {model: {k: mean_std([r.get(k) for r in runs]) for k in KEYS} for model, runs in per_model.items()}
    names = list(summary)
    base, ours = names[0], names[-1]
    ratios = {k: summary[ours][k][0] / summary[base][k][0] if ours != base else float("nan")
              for k in ("step_time_s", "peak_memory_mb")}
    metric_keys = KEYS[:-2]
    lines = ["| model | " + " | ".join(metric_keys) + " |", "|---" * (len(metric_keys) + 1) + "|"]
    digits = {k: 4 if k.startswith("mAVE") else 2 for k in metric_keys}
    for model in names:
        cells = [f"{summary[model][k][0]:.{digits[k]}f} ± {summary[model][k][1]:.{digits[k]}f}" for k in metric_keys]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    for title, metrics in floors.items():
        lines.append(f"| {title} | " + " | ".join(run_demo.format_cell(metrics, k, digits[k]) for k in metric_keys)
                     + " |")
    lines += [""] + per_class_lines(names, per_model)
    lines.append("")
    if motion:
        lines.append(f"Moving share of flow-class voxels: {100 * motion['train_moving_share']:.1f}% in training, "
                     f"{100 * motion['val_moving_share']:.1f}% in validation ({motion['train_keyframes']} and "
                     f"{motion['val_keyframes']} keyframes).")
    if ours != base:
        lines.append(f"{ours} / {base}: step time x{ratios['step_time_s']:.3f}, "
                     f"peak memory x{ratios['peak_memory_mb']:.3f} (seeds {list(args.seeds)})")
    gate, comparisons = paired_statistics(args, names, per_model, floors, motion)
    if gate is not None:
        from voxelsplat.evaluation import format_markdown

        lines.append("")
        lines += format_markdown(gate, comparisons, baseline_name=base)
    ladder_rows = {}
    if ladder is not None:
        # like the paired comparisons, the ladder's differences only behind a passed gate
        ladder_rows = ablation_ladder(args, names, per_model, ladder, with_differences=gate is not None and gate.passed)
        lines += [""] + ablation_lines(args.ablation_seed, ladder_rows, base)
    os.makedirs(args.output_dir, exist_ok=True)
    passed = gate is not None and gate.passed
    pictures = write_pictures(args, names, per_model, floors, comparisons if passed else {})
    if pictures:
        lines += ["", "Pictures: " + ", ".join(os.path.relpath(p, args.output_dir) for p in pictures)]
    table = "\n".join(lines)
    payload = {"seeds": list(args.seeds), "iters": args.iters, "runs": per_model,
               "summary": {m: {k: {"mean": v[0], "std": v[1]} for k, v in s.items()} for m, s in summary.items()},
               "floors": floors,
               "gate": None if gate is None else {
                   "passed": gate.passed, **{name: {"value": c.value, "threshold": c.threshold, "passed": c.passed,
                                                    "reason": c.reason} for name, c in gate.criteria.items()}},
               "comparisons": {model: {metric: {"difference": r.difference, "interval": list(r.interval),
                                                "verdict": r.verdict} for metric, r in results.items()}
                               for model, results in comparisons.items()},
               "ablation": None if ladder is None else {"seed": args.ablation_seed, "rows": ladder_rows},
               "ratios": ratios, "wall_time_s": time.perf_counter() - start}
    with open(os.path.join(args.output_dir, "experiment.json"), "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(args.output_dir, "experiment.md"), "w") as f:
        f.write(table + "\n")
    if args.records:
        save_records(args.output_dir, args.records)
    print("\n" + table)
    return payload


# What the record of a finished run keeps (paths inside its folder): enough to read it back
# (run_demo.finished_run), tabulate it, draw its learning curves and bootstrap its frames.
RUN_RECORD_FILES = (run_demo.RUN_MARKER, "metrics.json", "config.yaml",
                    os.path.join("inference", "occupancy_results.json"),
                    os.path.join("inference", "occupancy_sample_stats.npz"))
# ... and of the experiment's folder: the floors' cache, the tables, the pictures.
EXPERIMENT_RECORD_FILES = ("floors.json", "experiment.json", "experiment.md")
# The shared depth pretraining's marker and weights (model only), kept so that every run of the
# experiment starts from the same weights, whichever sitting or machine trains it (floating-point
# results differ between CPUs, so a pretraining repeated elsewhere would break the pairing).
PRETRAIN_DIR = run_demo.PRETRAIN_DIR
PRETRAIN_RECORD_FILES = (os.path.join(PRETRAIN_DIR, run_demo.PRETRAIN_MARKER),
                         os.path.join(PRETRAIN_DIR, "model_final.pth"))


def _record_paths(output_dir):
    """Paths (relative to ``output_dir``) of the records of the finished runs there and of the
    experiment itself."""
    paths = [name for name in EXPERIMENT_RECORD_FILES if os.path.isfile(os.path.join(output_dir, name))]
    if all(os.path.isfile(os.path.join(output_dir, name)) for name in PRETRAIN_RECORD_FILES):
        paths += list(PRETRAIN_RECORD_FILES)
    pictures = os.path.join(output_dir, "pictures")
    if os.path.isdir(pictures):
        paths += [os.path.join("pictures", name) for name in sorted(os.listdir(pictures)) if name.endswith(".png")]
    for root, _, files in sorted(os.walk(output_dir)):
        if run_demo.RUN_MARKER in files:
            run_dir = os.path.relpath(root, output_dir)
            paths += [os.path.join(run_dir, name) for name in RUN_RECORD_FILES
                      if os.path.isfile(os.path.join(root, name))]
    return paths


def _copy_files(source, target, paths, weights_only=False):
    """Copy ``paths`` from ``source`` to ``target`` (each file written atomically); with
    ``weights_only``, a checkpoint is written with its ``model`` entry alone."""
    import shutil

    import torch

    from voxelsplat.utils.io import atomic_write

    for path in paths:
        destination = os.path.join(target, path)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        if weights_only and path.endswith(".pth"):
            state = torch.load(os.path.join(source, path), map_location="cpu", weights_only=True)
            with atomic_write(destination, "wb", suffix=".pth") as out:
                torch.save({"model": state["model"]}, out)
            continue
        with open(os.path.join(source, path), "rb") as f, atomic_write(destination, "wb") as out:
            shutil.copyfileobj(f, out)


def save_records(output_dir, records_dir):
    """Copy the record of every finished run in ``output_dir`` (:data:`RUN_RECORD_FILES`, no
    checkpoints) and the experiment's own (:data:`EXPERIMENT_RECORD_FILES`, pictures) into
    ``records_dir``, in the same layout. Returns the copied paths."""
    paths = _record_paths(output_dir)
    # the pretrained weights once: every later run starts from the copy kept first
    paths = [path for path in paths
             if path not in PRETRAIN_RECORD_FILES or not os.path.isfile(os.path.join(records_dir, path))]
    _copy_files(output_dir, records_dir, paths, weights_only=True)
    return paths


def restore_records(records_dir, output_dir):
    """Copy the runs recorded in ``records_dir`` into ``output_dir`` where that has no such
    run yet (a run there, finished or part-way, is left as it is). Returns the copied paths."""
    if not os.path.isdir(records_dir):
        return []
    paths = [path for path in _record_paths(records_dir) if not os.path.exists(os.path.join(output_dir, path))]
    runs_here = {os.path.dirname(path) for path in _record_paths(output_dir)}
    paths = [path for path in paths
             if os.path.dirname(path) not in runs_here
             and not os.path.isfile(os.path.join(output_dir, os.path.dirname(path), "last_checkpoint"))]
    _copy_files(records_dir, output_dir, paths)
    return paths


def _comparable_path(path):
    """``path`` as the run markers write folders: relative to the repository when inside it."""
    return os.path.normpath(run_demo.portable_path(os.path.abspath(path)))


def recorded_output_dirs(output_dir):
    """The experiment folders (``--output-dir``) that the finished runs in ``output_dir`` were
    trained under, read from their markers' ``train.output_dir`` (comparable paths)."""
    found = set()
    for path in _record_paths(output_dir):
        if os.path.basename(path) != run_demo.RUN_MARKER:
            continue
        with open(os.path.join(output_dir, path)) as f:
            overrides = json.load(f).get("overrides", [])
        run_dir = os.path.dirname(path)
        for override in overrides:
            key, _, value = override.partition("=")
            if key == "train.output_dir":
                recorded = _comparable_path(value)
                suffix = os.sep + os.path.normpath(run_dir)
                if recorded.endswith(suffix):
                    found.add(recorded[:-len(suffix)] or os.curdir)
    return found


def run_seed(output_dir, seed, models, shared_args, opts):
    """``run_demo`` of ``models`` at training seed ``seed`` into ``output_dir``: the same
    initialisation (``train.seed``) and data order and augmentation (``dataloader.train.seed``)
    for every model of the seed. A folder whose ``results.json`` holds every model asked for is
    read instead (an interrupted experiment resumes); otherwise ``run_demo`` runs, which reads the
    seed's finished runs back and trains the others (a run stopped part-way continues from its
    last checkpoint): e.g. the baselines of every seed first, the other models later."""
    finished = os.path.join(output_dir, "results.json")
    if os.path.isfile(finished):
        with open(finished) as f:
            results = json.load(f)
        titles = {name: title for title, name, _ in run_demo.ALL_MODELS}
        missing = [name for name in models if titles[name] not in results]
        if not missing:
            print(f"[experiment] seed {seed}: reusing {finished}", flush=True)
            return results
        print(f"[experiment] seed {seed}: {finished} lacks {', '.join(missing)}; training them", flush=True)
    return run_demo.main(["--output-dir", output_dir, "--models", *models, *shared_args,
                          f"train.seed={seed}", f"dataloader.train.seed={seed}", *opts])


LADDER_KEYS = ("RayIoU", "RayIoU@1", "mIoU", "mAVE", "mAVE_TP", "mAVE_gt_occupancy", "step_time_s")
LADDER_COMPARED = ("RayIoU", "mAVE")


def ablation_ladder(args, names, per_model, ladder, with_differences=True):
    """The ladder's rows at ``args.ablation_seed``: the baseline, the three steps (``ladder``,
    that seed's ``run_demo`` results) and, as the last step, VoxelSplat itself, each with its
    metrics and, against the baseline of the same seed, the paired difference of
    :data:`LADDER_COMPARED` with a 95 % bootstrap interval over the validation frames (with
    ``with_differences``; the experiment passes whether the baseline passed the gate).
    ``{row title: {"metrics": {...}, "differences": {metric: {...}}}}``, in ladder order."""
    from voxelsplat.evaluation import paired_bootstrap
    from voxelsplat.structures import occupancy_metadata

    seed = args.ablation_seed
    base = names[0]
    rows = []
    if seed in args.seeds:
        position = list(args.seeds).index(seed)
        rows.append((base, os.path.join(args.output_dir, f"seed{seed}"), per_model[base][position]))
    for title, _, _ in run_demo.ABLATION_MODELS:
        rows.append((title, os.path.join(args.output_dir, f"ablation_seed{seed}"), ladder[title]))
    full = "VoxelSplat"
    if seed in args.seeds and full in per_model:
        rows.append((f"{full} (+ propagated state)", os.path.join(args.output_dir, f"seed{seed}"),
                     per_model[full][list(args.seeds).index(seed)]))
    meta = occupancy_metadata("openocc_v2")
    label_set = dict(class_names=meta["class_names"], free_index=meta["free_index"])
    folders = {title: name for title, name, _ in run_demo.ALL_MODELS}
    folders[f"{full} (+ propagated state)"] = folders[full]
    frames = {title: load_frames(os.path.join(folder, folders[title])) for title, folder, _ in rows}
    result = {}
    for title, _, metrics in rows:
        differences = {}
        if (with_differences and rows[0][0] == base and title != base and frames[base] is not None
                and frames[title] is not None):
            compared = paired_bootstrap([frames[base]], [frames[title]], LADDER_COMPARED,
                                        flow_classes=meta["flow_classes"], rng=0, **label_set)
            differences = {metric: {"difference": r.difference, "interval": list(r.interval), "verdict": r.verdict}
                           for metric, r in compared.items()}
        result[title] = {"metrics": {k: metrics.get(k) for k in LADDER_KEYS}, "differences": differences}
    return result


def ablation_lines(seed, rows, base):
    """The ladder as a markdown table (metrics, then each compared metric's difference to the
    baseline with its 95 % interval over the validation frames)."""
    header = ["step", *LADDER_KEYS, *(f"{m} - baseline [95% CI]" for m in LADDER_COMPARED)]
    lines = [f"Ablation ladder (seed {seed}; intervals over the validation frames of this one seed):", "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for title, row in rows.items():
        cells = [title]
        for key in LADDER_KEYS:
            value = row["metrics"].get(key)
            digits = 4 if key.startswith("mAVE") else 3 if key == "step_time_s" else 2
            cells.append("-" if value is None or (isinstance(value, float) and math.isnan(value))
                         else f"{value:.{digits}f}")
        for metric in LADDER_COMPARED:
            d = row["differences"].get(metric)
            digits = 4 if metric.startswith("mAVE") else 2
            cells.append("-" if d is None else
                         f"{d['difference']:+.{digits}f} [{d['interval'][0]:+.{digits}f}, "
                         f"{d['interval'][1]:+.{digits}f}] ({d['verdict']})")
        lines.append("| " + " | ".join(cells) + " |")
    if base not in rows:
        lines += ["", f"(no {base} run at seed {seed}: no differences)"]
    elif not any(row["differences"] for row in rows.values()):
        lines += ["", "(differences withheld: the baseline did not pass the gate, or per-frame counts are missing)"]
    return lines


def load_frames(run_dir):
    """The per-frame counts of a run's last evaluation (``{token: SampleStats}``), or None
    when the run has none (made before the evaluator wrote them)."""
    import numpy as np

    from voxelsplat.evaluation import SAMPLE_STATS_FILE, sample_stats_from_arrays

    path = os.path.join(run_dir, "inference", SAMPLE_STATS_FILE)
    if not os.path.isfile(path):
        print(f"[experiment] no per-frame counts in {path}", flush=True)
        return None
    with np.load(path) as arrays:
        return sample_stats_from_arrays(arrays)


CURVE_METRICS = ("RayIoU", "mAVE")


def occupied_class_names():
    """The benchmark label set's classes except free (OpenOcc v2)."""
    from voxelsplat.structures import occupancy_metadata

    meta = occupancy_metadata("openocc_v2")
    return [name for index, name in enumerate(meta["class_names"]) if index != meta["free_index"]]


def per_class_lines(names, per_model):
    """A markdown table of RayIoU per class (mean over seeds), one column per model."""
    classes = occupied_class_names()
    lines = ["RayIoU per class (mean over seeds):", "", "| class | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for name in classes:
        cells = [mean_std([run.get(f"RayIoU/{name}") for run in per_model[title]])[0] for title in names]
        lines.append(f"| {name} | " + " | ".join("-" if math.isnan(c) else f"{c:.2f}" for c in cells) + " |")
    return lines


def write_pictures(args, names, per_model, floors, comparisons):
    """PNGs under ``<output-dir>/pictures/``: learning curves of RayIoU and mAVE on val (each
    model's mean over seeds with its band; the floors dashed), per-class RayIoU bars and, when the
    gate let comparisons through, the paired differences with their intervals. Returns the paths."""
    from voxelsplat.evaluation.plots import (
        plot_learning_curves, plot_paired_differences, plot_per_class, read_eval_curves,
    )

    folder = os.path.join(args.output_dir, "pictures")
    folders = {title: name for title, name, _ in run_demo.MODELS}
    curves = {metric: {} for metric in CURVE_METRICS}
    for title in names:
        for seed in args.seeds:
            path = os.path.join(args.output_dir, f"seed{seed}", folders[title], "metrics.json")
            if os.path.isfile(path):
                for metric, points in read_eval_curves(path, CURVE_METRICS).items():
                    curves[metric].setdefault(title, []).append(points)
    written = []
    floor_lines = {"RayIoU": ("floor: class prior", "floor: previous GT"), "mAVE": ("floor: GT occupancy, zero flow",)}
    for metric, per_title in curves.items():
        if per_title:
            written.append(plot_learning_curves(
                per_title, metric, os.path.join(folder, f"learning_curve_{metric}.png"),
                floors={name: floors.get(name, {}).get(metric, float("nan")) for name in floor_lines[metric]}))
    class_names = occupied_class_names()
    per_class = {title: {c: [run.get(f"RayIoU/{c}", float("nan")) for run in per_model[title]] for c in class_names}
                 for title in names}
    written.append(plot_per_class(per_class, class_names, os.path.join(folder, "per_class_RayIoU.png")))
    if comparisons:
        written.append(plot_paired_differences(comparisons, os.path.join(folder, "paired_differences.png")))
    return written


# mIoU only where every frame has its voxel confusion matrix (evaluations that record it)
COMPARED_METRICS = ("RayIoU", "RayIoU@1", "RayIoU@2", "RayIoU@4", "mAVE", "mAVE_TP", "OccScore", "mIoU")


def paired_statistics(args, names, per_model, floors, motion=None):
    """The benchmark gate of the baseline (``names[0]``) and the paired bootstrap of every other
    model against it, from the per-frame counts of each seed's evaluation. Returns
    ``(gate, {model: {metric: PairedBootstrapResult}})``, or ``(None, {})`` when a run's counts
    are missing (runs made before the evaluator wrote them)."""
    from voxelsplat.structures import occupancy_metadata
    from voxelsplat.evaluation import SampleStats, benchmark_gate, paired_bootstrap

    folders = {title: name for title, name, _ in run_demo.MODELS}
    frames = {}
    for title in names:
        frames[title] = []
        for seed in args.seeds:
            seed_frames = load_frames(os.path.join(args.output_dir, f"seed{seed}", folders[title]))
            if seed_frames is None:
                print("[experiment] gate and paired statistics skipped", flush=True)
                return None, {}
            frames[title].append(seed_frames)
    meta = occupancy_metadata("openocc_v2")
    label_set = dict(class_names=meta["class_names"], free_index=meta["free_index"])
    base = names[0]
    gate = benchmark_gate(
        [SampleStats.total(seed_frames.values()) for seed_frames in frames[base]],
        floors["floor: class prior"].get("RayIoU", float("nan")),
        [run.get("mAVE_gt_occupancy", float("nan")) for run in per_model[base]],
        floors["floor: GT occupancy, zero flow"].get("mAVE", float("nan")), **label_set,
        moving_shares=None if not motion else (motion["train_moving_share"], motion["val_moving_share"]))
    with_confusion = all(stats.confusion is not None for per_seed in frames.values()
                         for seed_frames in per_seed for stats in seed_frames.values())
    metrics = [m for m in COMPARED_METRICS if with_confusion or m != "mIoU"]
    comparisons = {model: paired_bootstrap(frames[base], frames[model], metrics,
                                           flow_classes=meta["flow_classes"], rng=0, **label_set)
                   for model in names[1:]}
    return gate, comparisons


if __name__ == "__main__":
    main()
