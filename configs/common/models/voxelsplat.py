"""The VoxelSplat regularizer as published (release mode): Gaussians at 100k sampled voxels,
isotropic scale 0.12 m, rendered into the 6 cameras of keyframes t-2..t+3 at 1/4 resolution
(400x225 on nuScenes), current and flow-propagated states, losses semantic 0.5 / depth 1.0 /
flow 0.5. Grid and label set come from the dataset metadata (``occupancy_metadata``).

Attach it to a model config and switch the mapper's regularizer inputs on:

    from ..common.models.voxelsplat import regularizer as _regularizer, mapper_options as _mapper_options
    model.regularizer = _regularizer
    dataloader.train.mapper.regularizer = _mapper_options
    train.extra_hooks.append(L(RenderImageHook)(period=...))

``mode="decoded"`` (offset, scale, rotation and opacity decoded from the voxel features,
as the paper describes) also needs ``feature_channels`` = the head's voxel feature channels.
"""
from detectron2.config import LazyCall as L

from voxelsplat.data.occupancy_meta import occupancy_metadata
from voxelsplat.modeling.regularizers import GaussianSplatRegularizer

_meta = occupancy_metadata("openocc_v2")

regularizer = L(GaussianSplatRegularizer)(
    point_cloud_range=_meta["point_cloud_range"],
    voxel_size=_meta["voxel_size"],
    free_index=_meta["free_index"],
    num_classes=len(_meta["class_names"]),
    mode="release",
    scale=0.12,
    loss_weights=dict(semantic=0.5, depth=1.0, flow=0.5),
    backend="auto",            # gsplat on CUDA, the C rasterizer on CPU (PyTorch without a C compiler)
    propagate_by_flow=True,    # the flow-propagated state, once the flow loss is on
    max_views=None,            # all 36 views
    render_chunk=None,
    coverage_threshold=0.5,
    depth_scale=1.0,           # depth L1 in metres
)

# TemporalDatasetMapper(regularizer=...): keys of voxelsplat.data.mapper.DEFAULT_REGULARIZER_OPTIONS
mapper_options = dict(
    num_gaussians=100000,
    frame_offsets=(-2, -1, 0, 1, 2, 3),
    render_scale=0.25,
)
