"""The experiment's pictures: the band statistics they draw, and PNGs that hold a picture."""
import json
import math
import os

import numpy as np
import pytest

from voxelsplat.evaluation.plots import (
    curve_band, plot_learning_curves, plot_paired_differences, plot_per_class, read_eval_curves,
)


def _read_png(path):
    import cv2

    image = cv2.imread(str(path))
    assert image is not None, path
    return image


def test_curve_band_is_mean_min_max_over_seeds_at_the_shared_iterations():
    rng = np.random.default_rng(3)
    seeds = []
    for s in range(4):
        points = [(it, float(rng.normal(10 + it / 100, 1))) for it in (100, 200, 300)]
        if s == 2:
            points.append((400, 1.0))  # evaluated by one seed only: not drawn
            points.append((150, math.nan))
        rng.shuffle(points)
        seeds.append(points)
    iterations, mean, low, high = curve_band(seeds)
    assert iterations.tolist() == [100, 200, 300]
    table = np.array([[dict(c)[i] for i in (100, 200, 300)] for c in seeds])
    np.testing.assert_allclose(mean, table.mean(0))
    np.testing.assert_allclose(low, table.min(0))
    np.testing.assert_allclose(high, table.max(0))
    with pytest.raises(ValueError, match="no curves"):
        curve_band([])
    with pytest.raises(ValueError, match="share no evaluated iteration"):
        curve_band([[(1, 1.0)], [(2, 1.0)]])


def test_pictures_are_written_whole_and_show_something(tmp_path):
    from voxelsplat.evaluation.statistics import PairedBootstrapResult  # noqa: F401  (the type it draws)

    rng = np.random.default_rng(0)
    curves = {"baseline": [[(i, 5 + i / 100 + rng.normal()) for i in (100, 200, 400)] for _ in range(3)],
              "variant": [[(i, 6 + i / 100 + rng.normal()) for i in (100, 200, 400)] for _ in range(3)]}
    path = plot_learning_curves(curves, "RayIoU", str(tmp_path / "curves.png"), floors={"class prior": 5.2})
    classes = ["car", "truck", "driveable_surface"]
    per_class = {m: {c: list(rng.uniform(0, 30, 3)) for c in classes} for m in ("baseline", "variant")}
    bars = plot_per_class(per_class, classes, str(tmp_path / "nested" / "per_class.png"))
    differences = plot_paired_differences(
        {"variant": {"RayIoU": {"difference": 1.2, "interval": [-0.3, 2.5]},
                     "mAVE": {"difference": -0.1, "interval": [-0.2, -0.01]}}}, str(tmp_path / "paired.png"))
    for picture in (path, bars, differences):
        image = _read_png(picture)
        assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 5, picture
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "nested", "paired.png"]  # no partial files left
    with pytest.raises(ValueError, match="no comparisons"):
        plot_paired_differences({}, str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_eval_curves_are_read_from_a_runs_metrics_json(tmp_path):
    lines = [{"iteration": 19, "total_loss": 3.0},
             {"iteration": 99, "occupancy/RayIoU": 4.5, "occupancy/mAVE": 0.9},
             {"iteration": 199, "occupancy/RayIoU": 7.25}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    curves = read_eval_curves(str(tmp_path / "metrics.json"), ["RayIoU", "mAVE"])
    assert curves == {"RayIoU": [(99, 4.5), (199, 7.25)], "mAVE": [(99, 0.9)]}
