#!/usr/bin/env python
"""The end-to-end demo: generate the synthetic dataset, train the tiny FB-Occ baseline and
the tiny VoxelSplat model on it, evaluate both, print a comparison table and write
TensorBoard logs and pictures.

    python tools/run_demo.py                      # what `make demo` runs
    python tools/run_demo.py --quick              # a much smaller run (used by the tests)

Outputs under ``--output-dir`` (default ``output/demo``): one run folder per model
(checkpoints, metrics.json, TensorBoard events, pictures/), ``results.json`` and
``results.md``.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = (
    ("FB-Occ (baseline)", "fbocc_tiny", "configs/synthetic/fbocc_tiny.py"),
    ("VoxelSplat", "voxelsplat_tiny", "configs/synthetic/voxelsplat_tiny.py"),
)
METRICS = ("RayIoU", "RayIoU@1", "RayIoU@2", "RayIoU@4", "mAVE", "mAVE_TP", "OccScore", "mIoU")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument("--data-dir", default="datasets/synthetic", help="synthetic dataset (made if missing)")
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--samples-per-scene", type=int, default=20)
    parser.add_argument("--image-size", type=int, nargs=2, default=(352, 128), metavar=("W", "H"))
    parser.add_argument("--iters", type=int, default=None, help="training iterations (default: the configs')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="tiny run: 2 scenes x 4 keyframes, 176x64 images, 6 iterations")
    parser.add_argument("--skip-pictures", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY=VALUE config overrides for both models")
    args = parser.parse_args(argv)
    if args.quick:
        args.scenes, args.samples_per_scene, args.image_size = 2, 4, (176, 64)
        args.iters = args.iters or 6
    return args


def step(message):
    print(f"\n[demo] {message}", flush=True)


def run(cmd, log_path=None):
    """Run a command, streaming its output (and teeing it to ``log_path``)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=ROOT) as proc, open(log_path or os.devnull, "w") as log:
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
    ]


def ensure_dataset(args):
    version_dir = os.path.join(args.data_dir, "v1.0-mini")
    marker = os.path.join(args.data_dir, "demo_dataset.json")
    wanted = {"scenes": args.scenes, "samples_per_scene": args.samples_per_scene,
              "image_size": list(args.image_size), "seed": args.seed}
    if os.path.isdir(version_dir) and os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == wanted:
                step(f"synthetic dataset already in {args.data_dir}")
                return 0.0
    step(f"generating the synthetic dataset in {args.data_dir} "
         f"({args.scenes} scenes x {args.samples_per_scene} keyframes, {args.image_size[0]}x{args.image_size[1]})")
    seconds = run([sys.executable, "tools/make_synthetic_dataset.py", "--output", args.data_dir,
                   "--scenes", str(args.scenes), "--samples-per-scene", str(args.samples_per_scene),
                   "--image-size", str(args.image_size[0]), str(args.image_size[1]),
                   "--seed", str(args.seed), "--overwrite"])
    with open(marker + ".tmp", "w") as f:
        json.dump(wanted, f)
    os.replace(marker + ".tmp", marker)
    return seconds


def read_run(output_dir):
    """Last evaluation and training statistics of a run, from its metrics.json."""
    records = []
    with open(os.path.join(output_dir, "metrics.json")) as f:
        for line in f:
            if line.strip():
                records.append(json.loads(line))
    evaluation = [r for r in records if any(k.startswith("occupancy/") for k in r)]
    if not evaluation:
        raise SystemExit(f"[demo] no evaluation results in {output_dir}/metrics.json")
    metrics = {k.split("/", 1)[1]: v for k, v in evaluation[-1].items() if k.startswith("occupancy/")}
    times = [r["time"] for r in records if "time" in r]
    memory = [r["peak_memory_mb"] for r in records if "peak_memory_mb" in r]
    metrics["step_time_s"] = sorted(times)[len(times) // 2] if times else float("nan")
    metrics["peak_memory_mb"] = max(memory) if memory else float("nan")
    return metrics


def format_table(rows):
    header = ["model", *METRICS, "train time (s)", "step (s)", "peak mem (MiB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in rows:
        cells = [name] + [f"{m.get(k, float('nan')):.4f}" if k.startswith("mAVE") else f"{m.get(k, float('nan')):.2f}"
                          for k in METRICS]
        cells += [f"{m['train_time_s']:.0f}", f"{m['step_time_s']:.3f}", f"{m['peak_memory_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    total_start = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    ensure_dataset(args)
    rows = []
    for title, name, config in MODELS:
        run_dir = os.path.join(args.output_dir, name)
        overrides = [f"train.output_dir={run_dir}", f"train.seed={args.seed}", *dataset_overrides(args)]
        if args.iters:
            overrides += [f"train.max_iter={args.iters}", f"train.eval_period={args.iters}",
                          f"train.checkpointer.period={args.iters}"]
        overrides += [o for o in args.opts if o != "--"]
        step(f"training {title}: {config} -> {run_dir}")
        seconds = run([sys.executable, "tools/lazyconfig_train_net.py", "--config-file", config, *overrides],
                      log_path=os.path.join(args.output_dir, f"{name}.log"))
        metrics = read_run(run_dir)
        metrics["train_time_s"] = seconds
        rows.append((title, metrics))
        if not args.skip_pictures:
            step(f"pictures of {title} -> {run_dir}/pictures")
            run([sys.executable, "tools/visualize.py", "--config-file", config,
                 "--checkpoint", os.path.join(run_dir, "model_final.pth"),
                 "--output", os.path.join(run_dir, "pictures"), "--tensorboard-dir", run_dir,
                 "--num-samples", "2", *dataset_overrides(args)])
    table = format_table(rows)
    results = {title: metrics for title, metrics in rows}
    with open(os.path.join(args.output_dir, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=2)
    os.replace(os.path.join(args.output_dir, "results.json.tmp"), os.path.join(args.output_dir, "results.json"))
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    step(f"done in {time.perf_counter() - total_start:.0f} s\n\n{table}\n\n"
         f"TensorBoard: .venv/bin/tensorboard --logdir {args.output_dir}\n"
         f"Pictures: {args.output_dir}/*/pictures/")
    return results


if __name__ == "__main__":
    main()
