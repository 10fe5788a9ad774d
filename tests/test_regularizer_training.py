"""Fitting the VoxelSplat regularizer's losses in some render views makes the prediction agree
with the GT in views it never rendered, which only a regularizer whose renders and targets share
one 3D geometry can do; with the targets rendered in the wrong cameras, or from a shifted GT,
the same training drives its own loss down and leaves the held-out views no better.

Setup: ``configs/synthetic/voxelsplat_tiny.py`` on the synthetic dataset. Its loader's mapper
gives the second keyframe of a scene with its sampled voxels and the render views of keyframes
t-1..t+2; its model gives the initial prediction. The regularizer's losses are restricted to the
current keyframe's cameras (offset 0) and what trains is the prediction at the sampled voxels
itself (the head outputs, the regularizer's only input with a gradient): the whole network costs
about a second a step on one CPU core, and a few of its steps mostly learn what any target
teaches (free space, the class prior), which would blur the comparison with the controls.

The agreement is measured here, not by the loss code: Gaussians at the sampled voxel centres
(prediction: opacity ``sigmoid(-free logit)``, every class logit; GT: its occupied voxels,
opaque, one-hot) rasterized by the reference backend into the real cameras of keyframes t-1,
t+1 and t+2 (the training renders use the config's backward-looking virtual cameras). Metrics
over the pixels the GT covers (alpha > 0.5): L1 of the accumulated depths, and how often the
rendered logits' argmax is the GT class.
"""
import contextlib
import os
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import LazyConfig, instantiate

from voxelsplat.splatting import rasterize_gaussians

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 0
KEYFRAME = 1  # with frame offsets -1..+2 every render view is a keyframe of the scene
FRAME_OFFSETS = (-1, 0, 1, 2)
RENDER_FIELDS = ("render_viewmats", "render_intrinsics", "render_frame_offsets", "render_time_offsets")
ITERATIONS = 30
LEARNING_RATE = 0.2  # Adam on logits
# held-out improvement that a working regularizer reaches and a misaligned one does not:
# depth L1 below this fraction of its initial value, class agreement above this
DEPTH_MARGIN = 0.4
CLASS_AGREEMENT = 0.7


@pytest.fixture(scope="module")
def keyframe(synthetic_dataset, tmp_path_factory):
    """The tiny config's regularizer, spec and regularizer scale; one mapped keyframe with views
    of ``FRAME_OFFSETS``; the model's initial head outputs on it."""
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "synthetic", "voxelsplat_tiny.py"))
    cfg.dataloader.train.dataset.dataroot = synthetic_dataset.root
    cfg.dataloader.train.dataset.cache_dir = str(tmp_path_factory.mktemp("record_cache"))
    cfg.dataloader.train.mapper.input_size = tuple(synthetic_dataset.image_size)
    cfg.dataloader.train.num_workers = 0
    cfg.dataloader.train.total_batch_size = 1
    cfg.dataloader.train.seed = SEED
    cfg.dataloader.train.mapper.regularizer.num_gaussians = 1500
    cfg.dataloader.train.mapper.regularizer.frame_offsets = FRAME_OFFSETS
    cfg.model.regularizer.max_views = None  # every view it is given, every step
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    model = instantiate(cfg.model).train()
    model.set_training_phase(history_enabled=False, flow_loss_enabled=False)
    dataset = instantiate(cfg.dataloader.train).dataset
    index = next(i for i in range(len(dataset)) if dataset.record(i)["frame_index"] == KEYFRAME)
    sample = dataset[(index, True, (SEED,))]
    with torch.no_grad():
        head_outputs = model.head_outputs([sample])[0]
    return SimpleNamespace(regularizer=model.regularizer, spec=model.spec, scale=float(cfg.model.regularizer.scale),
                           sample=sample, occ_logits=head_outputs["occ_logits"], flow=head_outputs["flow"])


def views_of(sample: dict, keep: torch.Tensor) -> dict:
    """``sample`` with only the render views ``keep`` (V,) bool."""
    return dict(sample, **{key: sample[key][keep] for key in RENDER_FIELDS})


def fit_splat_losses(keyframe, train_sample: dict):
    """Adam on the class logits at the sampled voxels against the regularizer's current-state
    losses on ``train_sample``; returns the trained (1, C, X, Y, Z) logits and the total loss
    of each step."""
    x, y, z = keyframe.sample["gaussian_voxel_indices"].long().unbind(1)
    initial = keyframe.occ_logits
    at_voxels = torch.nn.Parameter(initial[0][:, x, y, z].clone())
    optimizer = torch.optim.Adam([at_voxels], lr=LEARNING_RATE)

    def logits():
        volume = initial.clone()
        volume[0][:, x, y, z] = at_voxels
        return volume

    history = []
    for _ in range(ITERATIONS):
        losses = keyframe.regularizer([train_sample], {"occ_logits": logits(), "flow": keyframe.flow},
                                      flow_loss_enabled=False)
        total = losses["loss_splat_semantic"] + losses["loss_splat_depth"]
        assert torch.isfinite(total), losses
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(float(total.detach()))
    with torch.no_grad():
        return logits(), history


@torch.no_grad()
def render_agreement(keyframe, occ_logits: torch.Tensor, keep: torch.Tensor) -> dict:
    """Prediction vs GT renders of the sampled voxels in the real cameras ``keep`` (V,) bool:
    {"depth_l1" m, "class_agreement"} over the pixels the GT covers."""
    sample, spec = keyframe.sample, keyframe.spec
    indices = sample["gaussian_voxel_indices"].long()
    centres = spec.grid.index_to_center(indices)
    x, y, z = indices.unbind(1)
    logits = occ_logits[0][:, x, y, z].T.float()  # (N, C), every class
    labels = sample["occ_semantics"].long()[x, y, z]
    occupied = labels != spec.free_index
    n = len(indices)
    quats = centres.new_tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4)
    scales = centres.new_full((n, 3), keyframe.scale)
    viewmats, intrinsics = sample["render_viewmats"][keep].float(), sample["render_intrinsics"][keep].float()
    width, height = sample["render_image_size"]
    cameras = dict(viewmats=viewmats, Ks=intrinsics, width=width, height=height, near_plane=0.1, backend="torch")
    pred_features, _, pred_depths = rasterize_gaussians(centres, quats, scales,
                                                        torch.sigmoid(-logits[:, spec.free_index]), logits, **cameras)
    one_hot = F.one_hot(labels[occupied], spec.num_classes).float()
    gt_features, gt_alphas, gt_depths = rasterize_gaussians(centres[occupied], quats[occupied], scales[occupied],
                                                            one_hot.new_ones(len(one_hot)), one_hot, **cameras)
    covered = gt_alphas > 0.5
    assert covered.float().mean() > 0.05, "the held-out views see too little GT to compare"
    agree = pred_features.argmax(-1) == gt_features.argmax(-1)
    return {"depth_l1": float((pred_depths - gt_depths).abs()[covered].mean()),
            "class_agreement": float(agree[covered].float().mean())}


def split_views(keyframe):
    """(training views, held-out views): bool (V,) masks of offset 0 and of the other keyframes."""
    sample = keyframe.sample
    offsets = sample["render_frame_offsets"]
    # every offset is a keyframe of the scene (none replaced by the current one)
    assert sorted(set(offsets.tolist())) == sorted(FRAME_OFFSETS), offsets
    training, held_out = offsets == 0, offsets != 0
    # held-out cameras sit elsewhere than every training camera: other poses, not copies
    centres = torch.linalg.inv(sample["render_viewmats"].double())[:, :3, 3]
    assert torch.cdist(centres[held_out], centres[training]).min() > 0.5
    return training, held_out


def test_splat_losses_in_current_cameras_improve_renders_in_held_out_keyframes(keyframe):
    training, held_out = split_views(keyframe)
    before = render_agreement(keyframe, keyframe.occ_logits, held_out)
    trained, history = fit_splat_losses(keyframe, views_of(keyframe.sample, training))
    after = render_agreement(keyframe, trained, held_out)
    report = dict(before=before, after=after, loss=(history[0], history[-1]))
    # seeds 0-5: loss x0.05-0.08; depth L1 3.7-4.7 m -> 0.30-0.48 m (x0.07-0.12); class agreement
    # 0.01-0.11 -> 0.95-0.96
    assert history[-1] < 0.2 * history[0], report
    assert after["depth_l1"] < DEPTH_MARGIN * before["depth_l1"], report
    assert after["class_agreement"] > CLASS_AGREEMENT, report


def targets_in_opposite_cameras(regularizer):
    """A wrong-camera regularizer: each view's GT is rendered in the view half-way round the list
    (one keyframe's six cameras in nuScenes' order: front <-> back, front-right <-> back-left,
    front-left <-> back-right), the prediction in the view's own."""
    render_target = regularizer.target_render

    def target_render(gt, views, propagated):
        return render_target(gt, dict(views, viewmats=views["viewmats"].roll(len(views["viewmats"]) // 2, 0)),
                             propagated)

    return mock.patch.object(regularizer, "target_render", target_render)


@pytest.mark.parametrize("fault", ["targets_in_opposite_cameras", "gt_shifted_4m"])
def test_splat_losses_with_misaligned_targets_fall_without_improving_held_out_keyframes(keyframe, fault):
    training, held_out = split_views(keyframe)
    train_sample = views_of(keyframe.sample, training)
    patch = contextlib.nullcontext()
    if fault == "targets_in_opposite_cameras":
        patch = targets_in_opposite_cameras(keyframe.regularizer)
    else:
        # the GT 4 m ahead of where the prediction sits (e.g. an ego translation left out)
        shift = int(round(4.0 / keyframe.spec.grid.voxel_size))
        train_sample["occ_semantics"] = torch.roll(train_sample["occ_semantics"], shift, dims=0)
    before = render_agreement(keyframe, keyframe.occ_logits, held_out)
    with patch:
        trained, history = fit_splat_losses(keyframe, train_sample)
    after = render_agreement(keyframe, trained, held_out)
    report = dict(before=before, after=after, loss=(history[0], history[-1]))
    # its own loss falls, the held-out views do not follow. Seeds 0-5, opposite cameras: loss
    # x0.43-0.46, depth L1 x1.6-2.1, class agreement 0.18-0.23; shifted GT: loss x0.05-0.07,
    # depth L1 x0.70-0.89, class agreement 0.44-0.50
    assert history[-1] < 0.6 * history[0], report
    assert after["depth_l1"] > DEPTH_MARGIN * before["depth_l1"], report
    assert after["class_agreement"] < CLASS_AGREEMENT, report
