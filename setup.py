#!/usr/bin/env python
"""VoxelSplat: camera-based 3D semantic occupancy and scene flow, with the
Gaussian-splatting regularizer."""
import glob
import os
import shutil
from os import path

from setuptools import find_packages, setup

ROOT = path.dirname(path.abspath(__file__))


def model_zoo_configs():
    """Expose the repository's configs/ inside the package (as detectron2 does) so that
    ``voxelsplat.model_zoo.get_config("r50.py")`` works from an installed copy."""
    source = path.join(ROOT, "configs")
    destination = path.join(ROOT, "voxelsplat", "model_zoo", "configs")
    if path.exists(source) and not path.exists(destination):
        try:
            os.symlink(source, destination)
        except OSError:
            shutil.copytree(source, destination)
    return [path.relpath(p, path.join(ROOT, "voxelsplat", "model_zoo"))
            for p in glob.glob(path.join(source, "**", "*.py"), recursive=True)]


setup(
    name="voxelsplat",
    version="0.1.0",
    description="Camera-based 3D occupancy and flow with Gaussian-splatting regularization",
    packages=find_packages(include=("voxelsplat", "voxelsplat.*")),
    package_data={"voxelsplat.model_zoo": model_zoo_configs(), "voxelsplat.evaluation": ["csrc/*.c"],
                  "voxelsplat.splatting": ["csrc/*.c", "csrc/*.h"]},
    python_requires=">=3.10",
    install_requires=[],  # installed by scripts/setup_env.sh (see scripts/constraints.txt)
)
