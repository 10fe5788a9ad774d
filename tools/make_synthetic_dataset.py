#!/usr/bin/env python
"""Generate a synthetic driving dataset in the nuScenes format (with OpenOcc v2 and Occ3D
occupancy labels) that every loader, mapper and evaluator of VoxelSplat reads like the real one.

    python tools/make_synthetic_dataset.py --output datasets/synthetic
    python tools/make_synthetic_dataset.py --output /tmp/syn --scenes 10 --samples-per-scene 40 --workers 2

The dataset is built in OUTPUT.partial-<pid>-<random> and swapped into place when complete: an
interrupted run leaves OUTPUT as it was (with --overwrite, the previous dataset), a killed one
also leaves its staging folder, which the next run names. The worker processes end with this one.
"""
import argparse
import logging
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from voxelsplat.synthetic import generate_synthetic_dataset  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="dataset root to create (the nuScenes dataroot)")
    parser.add_argument("--version", default="v1.0-mini", help="nuScenes version folder name (default: v1.0-mini, "
                        "which uses official mini scene names and splits)")
    parser.add_argument("--scenes", type=int, default=2, help="number of scenes (default: 2)")
    parser.add_argument("--samples-per-scene", type=int, default=20, help="keyframes per scene at 2 Hz (default: 20)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(704, 256), metavar=("W", "H"),
                        help="camera image size in pixels (default: 704 256)")
    parser.add_argument("--sweeps", type=int, default=0, help="LiDAR sweeps between keyframes, 0-9 (default: 0)")
    parser.add_argument("--seed", type=int, default=0, help="world seed; the same seed gives the same bytes")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    parser.add_argument("--omit-classes", nargs="*", default=[], metavar="CLASS",
                        help="object classes to leave out of every world (the label set stays), e.g. "
                        "pedestrian bicycle motorcycle traffic_cone barrier")
    parser.add_argument("--one-way-traffic", action="store_true",
                        help="every lane of the main road carries traffic the ego's way")
    parser.add_argument("--point-cloud-range", type=float, nargs=6, default=None,
                        metavar=("X0", "Y0", "Z0", "X1", "Y1", "Z1"),
                        help="extent of the occupancy labels' grid in metres, 0.4 m voxels (default: OpenOcc v2's "
                        "-40 -40 -1 40 40 5.4, 200x200x16); written to occupancy_grid.json in the dataset root")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output folder once the new dataset is complete")
    return parser.parse_args(argv)


def _exit_on_signal(signum, frame):
    # unwinds like Ctrl-C: the workers are ended and the staging folder removed; a second
    # signal of the kind ends the process at once
    signal.signal(signum, signal.SIG_DFL)
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        info = generate_synthetic_dataset(args.output, version=args.version, scenes=args.scenes,
                                          samples_per_scene=args.samples_per_scene, image_size=args.image_size,
                                          sweeps=args.sweeps, seed=args.seed, workers=args.workers,
                                          overwrite=args.overwrite, progress=True,
                                          omit_classes=args.omit_classes, one_way=args.one_way_traffic,
                                          point_cloud_range=args.point_cloud_range)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as error:
        print(f"interrupted; {args.output} was left as it was", file=sys.stderr)
        return 130 if isinstance(error, KeyboardInterrupt) else error.code
    seconds = time.perf_counter() - start
    samples = args.scenes * args.samples_per_scene
    print(f"wrote {samples} keyframes of {len(info['scenes'])} scenes ({', '.join(info['scenes'])}) to {info['root']} "
          f"in {seconds:.1f} s ({samples / seconds:.2f} samples/s), {info['bytes'] / 2 ** 20:.1f} MiB")
    return 0


if __name__ == "__main__":
    for _name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, _name):
            signal.signal(getattr(signal, _name), _exit_on_signal)
    sys.exit(main())
