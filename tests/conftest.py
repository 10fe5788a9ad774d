"""Shared fixtures: a small synthetic nuScenes-format dataset, generated once per test process."""
import os
from types import SimpleNamespace

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one intra-op thread per test process (and the processes they start): N workers on N cores
    # without oversubscription, which slows CPU training steps several times over
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, "1")
    import torch

    torch.set_num_threads(1)

from voxelsplat.utils.io import folder_bytes  # noqa: E402  (after the thread settings: it imports numpy)

# 2 scenes (one of nuScenes' mini_train, one of mini_val) x 4 keyframes, small images.
SYNTHETIC_SCENES = 2
SYNTHETIC_SAMPLES_PER_SCENE = 4
SYNTHETIC_IMAGE_SIZE = (176, 64)
SYNTHETIC_SEED = 3


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """The dataset: ``root``, ``version``, ``scenes`` (names), ``samples_per_scene``,
    ``image_size``, ``seed``; the record cache goes to a private folder."""
    from voxelsplat.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic") / "nuscenes"
    info = generate_synthetic_dataset(str(root), version="v1.0-mini", scenes=SYNTHETIC_SCENES,
                                      samples_per_scene=SYNTHETIC_SAMPLES_PER_SCENE,
                                      image_size=SYNTHETIC_IMAGE_SIZE, seed=SYNTHETIC_SEED, workers=1)
    os.environ.setdefault("VOXELSPLAT_CACHE_DIR", str(tmp_path_factory.mktemp("record_cache")))
    return SimpleNamespace(root=str(root), version=info["version"], scenes=info["scenes"],
                           samples_per_scene=SYNTHETIC_SAMPLES_PER_SCENE, image_size=SYNTHETIC_IMAGE_SIZE,
                           seed=SYNTHETIC_SEED)


# A test's own files (its tmp_path, measured before it is removed) stay under this. CI machines
# can have little free disk beside the 6 GB environment, and two tests run at once.
TMP_PATH_BUDGET_MB = 320


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):
    path = getattr(item, "funcargs", {}).get("tmp_path")
    size_mb = 0 if path is None else folder_bytes(path) / 2 ** 20  # before tmp_path's teardown removes it
    result = yield
    if size_mb > TMP_PATH_BUDGET_MB:
        pytest.fail(f"{item.nodeid} left {size_mb:.0f} MB in {path}, over the {TMP_PATH_BUDGET_MB} MB per-test "
                    f"disk budget (tests/conftest.py): write smaller files or remove them when done", pytrace=False)
    return result
