#!/usr/bin/env python
"""Benchmarks of VoxelSplat's components, each reported against a baseline measured
in the same run (ratios, not absolute timings, are what compare across machines).

    python tools/benchmark.py                 # every benchmark
    python tools/benchmark.py splatting data  # some of them
    python tools/benchmark.py --list

Each benchmark lives in ``tools/benchmarks/<name>.py`` and exposes ``run(args) -> dict``.
Results are printed and written to ``--output`` (JSON).
"""
import argparse
import importlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

BENCHMARKS = ("synthetic", "data", "model", "splatting", "evaluation")  # splatting includes the regularizer overhead


def available():
    return [name for name in BENCHMARKS
            if os.path.isfile(os.path.join(ROOT, "tools", "benchmarks", f"{name}.py"))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(available())})")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--quick", action="store_true", help="smaller workloads (smoke run)")
    parser.add_argument("--output", default="output/benchmark.json", help="where to write the results (JSON)")
    parser.add_argument("--workdir", default="output/benchmark", help="scratch folder (datasets, runs)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(available()))
        return {}
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available()}")
    os.makedirs(args.workdir, exist_ok=True)
    results = {}
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        start = time.perf_counter()
        print(f"== {name} ==", flush=True)
        results[name] = module.run(args)
        results[name]["benchmark_wall_s"] = round(time.perf_counter() - start, 2)
        print(json.dumps(results[name], indent=2, default=str), flush=True)
    from voxelsplat.utils.io import atomic_write_text

    atomic_write_text(args.output, json.dumps(results, indent=2, default=str))
    print(f"results written to {args.output}")
    return results


if __name__ == "__main__":
    main()
