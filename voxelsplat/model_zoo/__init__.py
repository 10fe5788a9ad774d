"""Access to the configs shipped with VoxelSplat, by path relative to ``configs/``."""
import os

from detectron2.config import LazyConfig

_CONFIG_ROOTS = (
    os.path.join(os.path.dirname(__file__), "configs"),
    os.path.join(os.path.dirname(__file__), "..", "..", "configs"),
)


def get_config_file(config_path: str) -> str:
    """Absolute path of a shipped config, e.g. ``get_config_file("r50.py")``."""
    for root in _CONFIG_ROOTS:
        candidate = os.path.abspath(os.path.join(root, config_path))
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"config {config_path!r} is not shipped with voxelsplat (looked in {', '.join(map(os.path.abspath, _CONFIG_ROOTS))})"
    )


def get_config(config_path: str):
    """Load a shipped LazyConfig, e.g. ``get_config("synthetic/voxelsplat_tiny.py")``."""
    return LazyConfig.load(get_config_file(config_path))
