"""FB-Occ (the baseline VoxelSplat regularizes) at the release's structure and widths, with the
released losses: ResNet-50 C4+C5 -> FPN (256 ch, stride 16) -> CM depth net (mid 512, ASPP,
80 bins from 2 m by 0.5) -> LSS to a 100x100x8 volume (0.8 m) -> one backward-projection layer
(deformable self-attention, depth-aware cross-attention, learned BEV queries) -> 16-frame
temporal fusion (80 ch) -> 1x1 80->64, 3D ResNet-18 + FPN3D (3 levels of 256) -> head
(deconv x2 + 3 levels, soft level weights; occupancy 17 classes and flow MLPs) at the
200x200x16 GT grid. docs/reproducing.md lists each module with its release file.

Label set and grid: ``model.spec``, the :class:`~voxelsplat.structures.OccupancySpec` of the
training dataset's ``gt_format`` on its grid (200x200x16 unless the dataset root has an
``occupancy_grid.json``, as a synthetic dataset made with ``--point-cloud-range`` does); every component reads it (``${..spec}``) and the model checks
the first batch against it. ``dataloader.train.dataset.gt_format=occ3d`` switches data, model
and evaluation to Occ3D.
"""
from detectron2.config import LazyCall as L

from voxelsplat.structures import nuscenes_voxel_counts, occupancy_spec, volume_grid
from voxelsplat.modeling.backbone import TimmBackbone
from voxelsplat.modeling.heads import OccFlowHead, OccupancyFlowLoss
from voxelsplat.modeling.lifting import (
    CameraAwareDepthNet, DepthAwareBackwardProjection, LSSForwardProjection, TemporalVolumeFusion,
)
from voxelsplat.modeling.meta_arch import OccupancyFlowModel
from voxelsplat.modeling.neck import FusionFPN
from voxelsplat.modeling.voxel_encoder import ResNet3DFPN

model = L(OccupancyFlowModel)(
    spec=L(occupancy_spec)(label_set="${dataloader.train.dataset.gt_format}",
                           dataroot="${dataloader.train.dataset.dataroot}"),
    backbone=L(TimmBackbone)(
        model_name="resnet50", out_indices=(3, 4), init_checkpoint="", norm="BN", frozen_stages=-1,
        grad_checkpointing=True,
    ),
    # released CustomFPN: nearest upsampling, plain 3x3 output conv
    neck=L(FusionFPN)(in_channels=(1024, 2048), in_strides=(16, 32), out_channels=256, upsample_mode="nearest",
                      output_norm="none", grad_checkpointing=True),
    depth_net=L(CameraAwareDepthNet)(
        in_channels="${..neck.out_channels}", mid_channels=512, context_channels=80,
        depth_bins=(2.0, 42.0, 0.5), num_depth_blocks=3, grad_checkpointing=True,
    ),
    # the internal volume: the GT grid at 2x the voxel edge (0.8 m, 100x100x8)
    forward_projection=L(LSSForwardProjection)(
        grid=L(volume_grid)(spec="${...spec}", downsample=2), depth_bins="${..depth_net.depth_bins}",
    ),
    backward_projection=L(DepthAwareBackwardProjection)(
        embed_dims="${..depth_net.context_channels}", grid="${..forward_projection.grid}",
        depth_bins="${..depth_net.depth_bins}",
        num_heads=8, num_points_in_pillar=4, num_offsets=2, ffn_channels=320,
    ),
    # released: each frame + its age (1 channel, 0.5 s per keyframe) -> shared 1x1 81->80 + BN + ReLU,
    # 17 frames concatenated -> 1x1 1360->80 + BN + ReLU; the history re-warped at every step
    temporal_fusion=L(TemporalVolumeFusion)(
        in_channels="${..depth_net.context_channels}", out_channels="${..depth_net.context_channels}",
        num_history=16, grid="${..forward_projection.grid}", time_channels=1, frame_interval=0.5,
    ),
    voxel_encoder=L(ResNet3DFPN)(
        in_channels="${..temporal_fusion.out_channels}", stage_channels=(64, 128, 256), stage_blocks=(2, 2, 2),
        stage_strides=(1, 2, 2), out_channels=256, grad_checkpointing=True,
    ),
    head=L(OccFlowHead)(
        spec="${..spec}", in_channels="${..voxel_encoder.out_channels}", mid_channels=128, hidden_channels=64,
        grad_checkpointing=True,
    ),
    loss=L(OccupancyFlowLoss)(
        spec="${..spec}",
        # focal class weights 1 / log(count) from the nuScenes voxel counts of the label set
        # (released: the OpenOcc v2 counts)
        class_frequencies=L(nuscenes_voxel_counts)(gt_format="${...spec.label_set}"),
        focal_gamma=2.0, focal_alpha=0.25, distance_weighting=True,
        focal_weight=100.0, lovasz_weight=1.0, sem_scal_weight=1.0, geo_scal_weight=1.0,
        # released: 0.5 x sum_all (|g| + 0.1)|d|_1 / sum (|g| + 0.1), off until history starts
        flow_weight=0.5, flow_voxels="all", flow_normalization="weight_sum",
    ),
    regularizer=None,
    pixel_mean=(123.675, 116.28, 103.53),
    pixel_std=(58.395, 57.12, 57.375),
    input_channel_order="bgr",  # released: B, G, R normalised with the RGB mean / std
    depth_loss_weight=1.0,
    history_enabled=True,
    flow_loss_enabled=True,
    use_camera_mask=True,  # Occ3D labels: occupancy losses on camera-visible voxels (OpenOcc v2 has no such mask)
)
