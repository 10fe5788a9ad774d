"""The VoxelSplat regularizer as released (``GaussianHead`` of the release, mode "release"):
Gaussians at 100k sampled voxels, isotropic scale 0.12 m, rendered into the 6 cameras of
keyframes t-2..t+3 at 1/4 resolution (400x225 on nuScenes), current and flow-propagated
states, the released loss formulas with weights semantic 0.5 / depth 1.0 / flow 0.5, and
the release's two quirks: the render cameras look backwards (``flip_render_cameras``) and
the propagated state moves every view by flow x 1 s (``propagation_seconds``). The
published numbers came from these; ``configs/r50_corrected.py`` fixes both. Grid and label
set are the model's ``spec`` (the training dataset's). docs/reproducing.md lists every
setting.

Attach it to a model config and switch the mapper's regularizer inputs on:

    from ..common.models.voxelsplat import regularizer as _regularizer, mapper_options as _mapper_options
    model.regularizer = _regularizer
    dataloader.train.mapper.regularizer = _mapper_options
    train.extra_hooks.append(L(RenderImageHook)(period=...))

``mode="decoded"`` (offset, scale, rotation and opacity decoded from the voxel features,
as the paper describes) also needs ``feature_channels`` = the head's voxel feature channels.
"""
from detectron2.config import LazyCall as L

from voxelsplat.modeling.regularizers import GaussianSplatRegularizer

regularizer = L(GaussianSplatRegularizer)(
    spec="${..spec}",  # the model's (as model.regularizer)
    mode="release",
    scale=0.12,
    loss_weights=dict(semantic=0.5, depth=1.0, flow=0.5),
    backend="auto",            # gsplat on CUDA, the C rasterizer on CPU (PyTorch without a C compiler)
    propagate_by_flow=True,    # the flow-propagated state, once the flow loss is on
    propagation_seconds=1.0,   # released quirk: flow x 1 s for every view (None: each view's time)
    flip_render_cameras=True,  # released quirk: y/z-flipped, backward-looking cameras
    max_views=None,            # all 36 views
    render_chunk=None,
    semantic_min_gt_depth=0.1,  # semantic loss on pixels with GT accumulated depth > 0.1 m
    normalize_by_alpha=False,  # released: accumulated depth / flow over all pixels
    coverage_threshold=0.5,
    detach_flow_weights=False,
    depth_scale=1.0,           # depth L1 in metres
    near_plane=0.1,
    far_plane=100.0,
)

# TemporalDatasetMapper(regularizer=...): keys of voxelsplat.data.mapper.DEFAULT_REGULARIZER_OPTIONS
mapper_options = dict(
    num_gaussians=100000,                 # drawn without replacement among the ray-visible voxels
    frame_offsets=(-2, -1, 0, 1, 2, 3),
    out_of_scene_views="current",         # released: a keyframe beyond the scene -> the current one
    render_scale=0.25,
    # weights: class frequency^-1/2 x speed-bin frequency^-1/2, frequencies counted over the whole
    # training split ("dataset"; configs/r50.py gives the release's nuScenes constants instead)
    class_frequencies="dataset",
    speed_bin_frequencies="dataset",
    speed_bin_edges=(1.0, 2.0, 5.0, 10.0),
    speed_bin_rule="release",             # released quirk: speed 0 in the top bin ("corrected": the first)
)
