"""OccupancyFlowModel end to end on samples built to the mapper contract
(voxelsplat/structures/sample_fields.py): eval outputs, the regularizer call site, and the
tiny synthetic config learning."""
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from voxelsplat import testing
from voxelsplat.structures import OccupancySpec

ROOT = Path(__file__).resolve().parents[1]
SPEC = OccupancySpec.for_label_set("openocc_v2")
META = SPEC.metadata()
IMAGE_SIZE = (176, 64)  # (W, H) of the synthetic dataset's cameras (tests/conftest.py)


def make_sample(seed):
    """A mapped sample (voxelsplat.testing) at the synthetic dataset's image size: a street
    with moving cars (a flow class) on the spec's grid, random images, sparse LiDAR depth."""
    return testing.make_sample(SPEC, seed, image_size=IMAGE_SIZE, vehicle_classes=("car",))


def _tiny_config():
    return LazyConfig.load(str(ROOT / "configs" / "synthetic" / "fbocc_tiny.py"))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return instantiate(_tiny_config().model)


class RecordingRegularizer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, batched_inputs, head_outputs, flow_loss_enabled):
        self.calls.append(({k: tuple(v.shape) for k, v in head_outputs.items()}, flow_loss_enabled, len(batched_inputs)))
        return {"loss_recorded": self.scale * head_outputs["voxel_features"].mean() * 0.0 + 1.0}


def test_eval_returns_gt_grid_predictions_with_flow_only_on_flow_classes(tiny_model):
    model = tiny_model.eval()
    samples = [make_sample(1), make_sample(2)]
    with torch.no_grad():
        outputs = model(samples)
    assert len(outputs) == 2
    for out in outputs:
        assert out["occ"].dtype == torch.int64 and tuple(out["occ"].shape) == tuple(META["grid_shape"])
        assert out["flow"].dtype == torch.float32 and tuple(out["flow"].shape) == (*META["grid_shape"], 2)
        outside = ~torch.isin(out["occ"], torch.tensor(META["flow_classes"]))
        assert torch.count_nonzero(out["flow"][outside]) == 0

    # The zeroing rule on controlled head outputs: logits pick class per voxel, flow is kept
    # exactly where that class is a flow class.
    gen = torch.Generator().manual_seed(3)
    shape = (1, len(META["class_names"]), 4, 5, 2)
    head_outputs = {"occ_logits": torch.randn(shape, generator=gen), "flow": torch.randn(1, 2, 4, 5, 2, generator=gen)}
    (result,) = model.postprocess(head_outputs)
    expected_occ = head_outputs["occ_logits"][0].argmax(0)
    keep = torch.isin(expected_occ, torch.tensor(META["flow_classes"]))
    assert keep.any() and (~keep).any()
    torch.testing.assert_close(result["occ"], expected_occ)
    torch.testing.assert_close(result["flow"], head_outputs["flow"][0].permute(1, 2, 3, 0) * keep[..., None])
    torch.testing.assert_close(result["flow_unmasked"], head_outputs["flow"][0].permute(1, 2, 3, 0))


def test_regularizer_is_training_only_and_sees_head_outputs(tiny_model):
    model = tiny_model
    sample = make_sample(4)  # sequence_start: the temporal state is reset on each call
    model.eval()
    with torch.no_grad():
        without = model([sample])[0]
    regularizer = RecordingRegularizer()
    model.regularizer = regularizer
    try:
        with torch.no_grad():
            with_regularizer = model([sample])[0]
        assert regularizer.calls == []
        for key in without:
            assert torch.equal(without[key], with_regularizer[key])

        model.train()
        model.set_training_phase(history_enabled=True, flow_loss_enabled=False)
        losses = model([sample])
        assert losses["loss_recorded"].item() == 1.0
        assert {"loss_occ_focal", "loss_occ_lovasz", "loss_occ_sem_scal", "loss_occ_geo_scal", "loss_flow",
                "loss_depth"} <= set(losses)
        assert losses["loss_flow"].item() == 0.0
        ((shapes, flow_enabled, batch),) = regularizer.calls
        x, y, z = META["grid_shape"]
        assert flow_enabled is False and batch == 1
        assert shapes["occ_logits"] == (1, len(META["class_names"]), x, y, z)
        assert shapes["flow"] == (1, 2, x, y, z)
        assert shapes["voxel_features"][0] == 1 and shapes["voxel_features"][2:] == (x, y, z)
        assert all(torch.isfinite(v) for v in losses.values())
    finally:
        model.regularizer = None
        model.set_training_phase(True, True)


def test_missing_or_non_finite_inputs_name_the_sample(tiny_model):
    model = tiny_model.eval()
    sample = make_sample(5)
    broken = dict(sample, cam2ego=sample["cam2ego"].clone())
    broken["cam2ego"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="cam2ego.*sample5"):
        model([broken])
    missing = {k: v for k, v in sample.items() if k != "intrinsics"}
    with pytest.raises(KeyError, match="sample5.*intrinsics|intrinsics"):
        model([missing])


def test_tiny_config_trains_on_the_synthetic_dataset(synthetic_dataset, tmp_path):
    """The CPU-sized config learns from the synthetic dataset through its own loader and
    mapper: the total loss falls clearly within 20 iterations (fitting two keyframes)."""
    cfg = _tiny_config()
    cfg.dataloader.train.dataset.dataroot = synthetic_dataset.root
    cfg.dataloader.train.dataset.cache_dir = str(tmp_path)
    cfg.dataloader.train.mapper.input_size = tuple(synthetic_dataset.image_size)
    cfg.dataloader.train.num_workers = 0
    cfg.dataloader.train.seed = 0
    torch.manual_seed(0)
    np.random.seed(0)
    model = instantiate(cfg.model).train()
    model.set_training_phase(history_enabled=False, flow_loss_enabled=True)  # the warm-up phase
    loader = iter(instantiate(cfg.dataloader.train))
    batches = [next(loader), next(loader)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for iteration in range(20):
        losses = model(batches[iteration % 2])
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        history.append(total.item())
    first, last = np.mean(history[:5]), np.mean(history[-5:])
    assert last < 0.85 * first, history  # released head MLPs (BN, no bias): about 0.8 after 20 iterations
    model.eval()
    with torch.no_grad():
        output = model(batches[0][:1])[0]
    assert output["occ"].shape == tuple(META["grid_shape"]) and output["flow"].shape == (*META["grid_shape"], 2)
