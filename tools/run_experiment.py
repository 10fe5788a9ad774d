#!/usr/bin/env python
"""Baseline vs VoxelSplat on the synthetic dataset: same data, iterations and seeds, several
seeds; reports mean and spread of every metric and the time/memory ratios.

    python tools/run_experiment.py --seeds 0 1 2 --iters 300

A seed whose ``<output-dir>/seed<N>/results.json`` exists is read instead of re-run (an
interrupted experiment resumes). Writes ``<output-dir>/experiment.json`` and ``<output-dir>/experiment.md`` (the table that
docs/RESULTS.md quotes).

The table ends with the floors (see ``tools/run_demo.py``): predictors without a model, the
same for every seed (the seeds share one dataset), computed once into
``<output-dir>/floors.json`` and shown as single values.
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
    parser.add_argument("--data-dir", default="datasets/synthetic")
    parser.add_argument("--seeds", type=int, nargs="+", default=(0, 1, 2))
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--samples-per-scene", type=int, default=20)
    parser.add_argument("--image-size", type=int, nargs=2, default=(352, 128))
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    opts = [o for o in args.opts if o != "--"]
    # one dataset for every seed (the seed varies the training only), so one set of floors
    shared_args = ["--data-dir", args.data_dir, "--scenes", str(args.scenes),
                   "--samples-per-scene", str(args.samples_per_scene), "--image-size", *map(str, args.image_size),
                   "--skip-pictures", "--seed", "0", "--floors-cache", os.path.join(args.output_dir, "floors.json")]
    if args.iters:
        shared_args += ["--iters", str(args.iters)]
    per_model = {}
    for seed in args.seeds:
        demo_args = ["--output-dir", os.path.join(args.output_dir, f"seed{seed}"), *shared_args]
        finished = os.path.join(args.output_dir, f"seed{seed}", "results.json")
        if os.path.isfile(finished):  # an interrupted experiment resumes where it stopped
            with open(finished) as f:
                results = json.load(f)
            print(f"[experiment] seed {seed}: reusing {finished}", flush=True)
        else:
            results = run_demo.main(demo_args + [f"train.seed={seed}"] + opts)
        for model, metrics in results.items():
            if metrics.get("kind", "model") == "model":  # the floors are read once, below
                per_model.setdefault(model, []).append(metrics)
    # the seeds' shared floors: from the cache the runs above filled (computed here when every seed was resumed)
    demo = run_demo.parse_args(["--output-dir", args.output_dir, *shared_args, *opts])
    run_demo.ensure_dataset(demo)
    floors = dict(run_demo.floor_rows(run_demo.floor_results(demo)))

    summary = {model: {k: mean_std([r.get(k) for r in runs]) for k in KEYS} for model, runs in per_model.items()}
    names = list(summary)
    base, ours = names[0], names[-1]
    ratios = {k: summary[ours][k][0] / summary[base][k][0] for k in ("step_time_s", "peak_memory_mb")}
    metric_keys = KEYS[:-2]
    lines = ["| model | " + " | ".join(metric_keys) + " |", "|---" * (len(metric_keys) + 1) + "|"]
    digits = {k: 4 if k.startswith("mAVE") else 2 for k in metric_keys}
    for model in names:
        cells = [f"{summary[model][k][0]:.{digits[k]}f} ± {summary[model][k][1]:.{digits[k]}f}" for k in metric_keys]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    for title, metrics in floors.items():
        lines.append(f"| {title} | " + " | ".join(run_demo.format_cell(metrics, k, digits[k]) for k in metric_keys)
                     + " |")
    lines.append("")
    lines.append(f"VoxelSplat / baseline: step time x{ratios['step_time_s']:.3f}, "
                 f"peak memory x{ratios['peak_memory_mb']:.3f} (seeds {list(args.seeds)})")
    table = "\n".join(lines)
    os.makedirs(args.output_dir, exist_ok=True)
    payload = {"seeds": list(args.seeds), "iters": args.iters, "runs": per_model,
               "summary": {m: {k: {"mean": v[0], "std": v[1]} for k, v in s.items()} for m, s in summary.items()},
               "floors": floors,
               "ratios": ratios, "wall_time_s": time.perf_counter() - start}
    with open(os.path.join(args.output_dir, "experiment.json"), "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(args.output_dir, "experiment.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    return payload


if __name__ == "__main__":
    main()
