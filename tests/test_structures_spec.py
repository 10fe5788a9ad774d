"""OccupancySpec: one label set + grid from the dataset to every component; the package layering."""
import ast
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from voxelsplat.structures import (
    DEFAULT_GRID,
    LABEL_SETS,
    OccupancyGrid,
    OccupancySpec,
    occupancy_spec,
    volume_grid,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "voxelsplat"


@pytest.mark.parametrize("label_set", sorted(LABEL_SETS))
def test_spec_of_each_label_set_round_trips_through_metadata(label_set):
    from detectron2.data import Metadata

    spec = OccupancySpec.for_label_set(label_set)
    names = LABEL_SETS[label_set]
    assert spec.class_names == names and spec.class_names[spec.free_index] == "free"
    assert [names[c] for c in spec.flow_classes] == ["car", "truck", "trailer", "bus", "construction_vehicle",
                                                     "bicycle", "motorcycle", "pedestrian"]
    assert spec.has_flow == (label_set == "openocc_v2")
    assert OccupancySpec.from_metadata(spec.metadata()) == spec
    # detectron2's Metadata object (class_names stored as thing_classes), as registration does
    entries = {k: v for k, v in spec.metadata().items() if k != "class_names"}
    assert OccupancySpec.from_metadata(Metadata(name="x").set(**entries)) == spec
    other = occupancy_spec(label_set, point_cloud_range=(-8.0, -8.0, -1.0, 8.0, 8.0, 5.4), voxel_size=0.8)
    assert other.grid.shape == (20, 20, 8) and other.label_set == label_set
    assert OccupancySpec.from_metadata(other.metadata()) == other


def test_spec_and_grid_reject_inconsistent_values_naming_them():
    with pytest.raises(ValueError, match="free_index 5 outside"):
        OccupancySpec("mine", ("a", "b", "free"), 5)
    with pytest.raises(ValueError, match=r"flow_classes \[2\]"):
        OccupancySpec("mine", ("a", "b", "free"), 2, flow_classes=(0, 2))
    with pytest.raises(ValueError, match="unique"):
        OccupancySpec("mine", ("a", "a", "free"), 2)
    with pytest.raises(KeyError, match="unknown label set"):
        occupancy_spec("kitti")
    with pytest.raises(ValueError, match="whole number"):
        OccupancyGrid((-8.0, -4.0, -1.0, 8.0, 8.0, 5.4), 1.6)  # y: 12 m / 1.6 m
    with pytest.raises(ValueError, match="not divisible by 3"):
        DEFAULT_GRID.coarsened(3)
    with pytest.raises(KeyError, match="lacks the occupancy spec entries"):
        OccupancySpec.from_metadata({"name": "plain", "thing_classes": ["a"]})
    assert volume_grid(occupancy_spec(), 2).shape == (100, 100, 8)
    assert volume_grid(occupancy_spec(), 4).voxel_size == pytest.approx(1.6)


def test_voxel_centres_agree_between_numpy_torch_and_a_direct_formula():
    rng = np.random.default_rng(0)
    grid = OccupancyGrid((-3.0, -2.0, -1.0, 4.0, 3.5, 2.0), 0.5)
    index = rng.integers(0, grid.shape, size=(50, 3))
    expected = np.array([[-3.0 + 0.5 * (i + 0.5), -2.0 + 0.5 * (j + 0.5), -1.0 + 0.5 * (k + 0.5)] for i, j, k in index])
    np.testing.assert_allclose(grid.index_to_center(index), expected)
    torch_centres = grid.index_to_center(torch.from_numpy(index))
    assert torch_centres.dtype == torch.float32
    np.testing.assert_allclose(torch_centres.numpy(), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(grid.voxel_centers()[tuple(index.T)], expected)
    np.testing.assert_array_equal(grid.point_to_index(expected), index)


def _config(name, *overrides):
    from voxelsplat.engine import load_config

    return load_config(str(ROOT / "configs" / name), list(overrides))


@pytest.mark.parametrize("config", ["synthetic/voxelsplat_tiny.py", "r50.py"])
def test_one_key_switches_data_model_and_regularizer_to_occ3d(config):
    from detectron2.config import instantiate

    cfg = _config(config, "dataloader.train.dataset.gt_format=occ3d")
    assert cfg.dataloader.test.dataset.gt_format == "occ3d"
    model = instantiate(cfg.model)
    occ3d = OccupancySpec.for_label_set("occ3d")
    assert model.spec == occ3d and model.regularizer.num_classes == 18
    assert model.head.num_classes == 18 and tuple(model.head.output_shape) == occ3d.grid.shape
    assert model.loss.class_weights.shape == (18,) and int(model.loss.flow_class_lut.sum()) == 8
    assert model.regularizer.free_index == occ3d.free_index == 17
    # the internal volume is derived from the spec's grid in one place (the forward projection's)
    assert model.backward_projection.grid == model.temporal_fusion.grid == model.forward_projection.grid
    default = instantiate(_config(config).model)
    assert default.spec == OccupancySpec.for_label_set("openocc_v2") and default.head.num_classes == 17


def test_model_refuses_a_first_batch_of_another_spec_naming_both_sides():
    from detectron2.config import instantiate

    model = instantiate(_config("synthetic/fbocc_tiny.py").model).eval()
    spec = model.spec
    semantics = torch.full(spec.grid.shape, spec.free_index, dtype=torch.int64)
    sample = {"sample_token": "tok1", "gt_format": "occ3d", "occ_semantics": semantics}
    with pytest.raises(ValueError, match=r"tok1 has labels of gt_format 'occ3d'.*openocc_v2 \(17 classes"):
        model.check_batch([sample])
    sample.update(gt_format="openocc_v2", occ_semantics=torch.zeros(100, 100, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(100, 100, 8\).*grid 200x200x16"):
        model.check_batch([sample])
    bad = semantics.clone()
    bad[3, 4, 5] = 17
    sample.update(occ_semantics=bad)
    with pytest.raises(ValueError, match=r"class ids in \[16, 17\]"):
        model.check_batch([sample])
    bad[3, 4, 5] = 255  # ignored voxels are fine
    model.check_batch([sample])
    with pytest.raises(ValueError, match="head predicts 17 classes, the spec is occ3d"):
        type(model)(**{**{k: getattr(model, k) for k in ("backbone", "neck", "depth_net", "forward_projection",
                                                         "voxel_encoder", "head", "loss")},
                       "spec": OccupancySpec.for_label_set("occ3d")})
    with pytest.raises(TypeError, match="head must be an nn.Module"):
        type(model)(**{**{k: getattr(model, k) for k in ("backbone", "neck", "depth_net", "forward_projection",
                                                         "voxel_encoder", "loss")},
                       "head": {"name": "OccFlowHead"}, "spec": spec})


def test_occ3d_with_one_override_trains_two_iterations_and_evaluates(synthetic_dataset, tmp_path):
    from voxelsplat.engine import do_train

    out = tmp_path / "occ3d"
    cfg = _config(
        "synthetic/fbocc_tiny.py",
        "dataloader.train.dataset.gt_format=occ3d",
        f"dataloader.train.dataset.dataroot={synthetic_dataset.root}",
        f"dataloader.test.dataset.dataroot={synthetic_dataset.root}",
        f"dataloader.train.dataset.version={synthetic_dataset.version}",
        f"dataloader.test.dataset.version={synthetic_dataset.version}",
        "dataloader.train.dataset.name=spec_test_occ3d_train", "dataloader.test.dataset.name=spec_test_occ3d_val",
        "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "dataloader.train.mapper.input_size=[128,48]",
        "train.max_iter=2", "train.eval_period=0", "train.checkpointer.period=100", "train.log_period=1",
        f"train.output_dir={out}", "train.seed=0",
    )
    do_train(cfg)
    results = json.loads((out / "inference" / "occupancy_results.json").read_text())
    metrics = results.get("metrics", results)
    assert "RayIoU" in metrics and "mIoU" in metrics  # Occ3D: mIoU over mask_camera
    assert not any(key.startswith("mAVE") for key in metrics)  # Occ3D labels carry no flow
    per_class = json.dumps(results)
    assert "others" in per_class  # the Occ3D class names reached the evaluator


# ----------------------------------------------------------------------------------------- layering
def _imports(path: Path, package_parts):
    """Absolute module names imported by ``path`` (function-level imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[:len(package_parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
    return [n for n in names if n == "voxelsplat" or n.startswith("voxelsplat.")]


def _module_graph():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package_parts = parts
        else:
            package_parts = parts[:-1]
        modules[".".join(parts)] = (path, package_parts)
    graph = {}
    for name, (path, package_parts) in modules.items():
        targets = set()
        for imported in _imports(path, package_parts):
            # "from pkg import name" names a module or an attribute: keep the longest module prefix
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def test_modeling_and_evaluation_do_not_import_the_data_package():
    graph = _module_graph()
    offenders = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                       if m.split(".")[1] in ("modeling", "evaluation", "structures", "splatting")
                       and t.startswith("voxelsplat.data"))
    assert not offenders, offenders


def test_no_import_cycle_between_modules():
    graph = _module_graph()
    # a package's __init__ importing its own modules is not a cycle of the code's design
    edges = {m: {t for t in ts if not (t.startswith(m + ".") or m.startswith(t + "."))} for m, ts in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_no_label_set_or_grid_literal_outside_the_spec_module():
    """Class counts, grid shapes and voxel sizes are read from the spec, not typed."""
    import re

    pattern = re.compile(r"(\b200, ?200, ?16\b|num_classes ?= ?1[678]\b|free_index ?= ?1[67]\b|"
                         r"flow_classes ?= ?(list\()?range\(8\)|voxel_size ?= ?0\.4\b)")
    allowed = {PACKAGE / "structures" / "occupancy.py"}
    hits = []
    allowed.add(Path(__file__).resolve())
    for folder in ("voxelsplat", "configs", "tools", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path in allowed or "model_zoo/configs" in str(path):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if pattern.search(code) and "point_cloud_range" not in code:  # a made-up grid of its own is fine
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, hits


def test_dataclass_spec_is_immutable():
    spec = occupancy_spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.free_index = 3
    assert os.path.basename(__file__)  # keeps the module importable under any name


def test_evaluator_takes_the_spec_and_derives_its_metrics_from_it():
    from voxelsplat.evaluation import OccupancyEvaluator

    occ3d = OccupancyEvaluator(spec=OccupancySpec.for_label_set("occ3d"), distributed=False)
    assert occ3d.class_names[0] == "others" and occ3d.free_index == 17
    assert occ3d.compute_miou and not occ3d.compute_flow  # Occ3D: mIoU, no flow
    openocc = OccupancyEvaluator(distributed=False)  # default: OpenOcc v2 on the default grid
    assert openocc.spec == OccupancySpec.for_label_set("openocc_v2")
    assert openocc.compute_flow and not openocc.compute_miou
    assert OccupancyEvaluator(distributed=False, compute_miou=True).compute_miou
    with pytest.raises(ValueError, match="OccupancyEvaluator: .*free_index 30 outside"):
        OccupancyEvaluator(distributed=False, free_index=30)


def test_decoded_regularizer_with_other_feature_channels_than_the_head_is_refused_at_build():
    from detectron2.config import instantiate

    cfg = _config("synthetic/voxelsplat_tiny.py", "model.regularizer.mode=decoded",
                  "+model.regularizer.feature_channels=64")
    with pytest.raises(ValueError, match=r"from 64 voxel-feature channels .* have 16"):
        instantiate(cfg.model)
    cfg = _config("synthetic/voxelsplat_tiny.py", "model.regularizer.mode=decoded",
                  "+model.regularizer.feature_channels=${..head.mid_channels}")
    assert instantiate(cfg.model).regularizer.decoder.feature_channels == 16
