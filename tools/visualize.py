#!/usr/bin/env python
"""Pictures of a trained model on the test split: BEV occupancy (prediction vs GT), BEV flow
(prediction vs GT), the six cameras with projected predicted occupancy, and, for models with
the VoxelSplat regularizer, its rendered semantics next to the GT renders.

    python tools/visualize.py --config-file configs/synthetic/voxelsplat_tiny.py \
        --checkpoint output/demo/voxelsplat_tiny/model_final.pth --output output/demo/pictures

PNG files go to ``--output``; with ``--tensorboard-dir`` the same pictures are also logged
as TensorBoard images.
"""
import argparse
import itertools
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from detectron2.config import instantiate  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from voxelsplat.structures import grid_from_metadata  # noqa: E402
from voxelsplat.engine import OccupancyCheckpointer, load_config  # noqa: E402
from voxelsplat.engine.render_image_hook import render_comparison_image  # noqa: E402
from voxelsplat.utils import visualization as vis  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--checkpoint", required=True, help="model weights (.pth)")
    parser.add_argument("--output", required=True, help="folder for the PNG files")
    parser.add_argument("--tensorboard-dir", default=None, help="also log the pictures to TensorBoard here")
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY=VALUE config overrides")
    return parser.parse_args(argv)


BEV_SCALE = 3  # pixels per voxel in the BEV pictures
RENDER_MIN_WIDTH = 320  # regularizer renders are enlarged to at least this width


def dataset_metadata(dataset_name):
    meta = MetadataCatalog.get(dataset_name)
    return meta.thing_classes, meta.free_index, grid_from_metadata(meta)


def sample_pictures(sample, output, class_names, free_index, grid):
    """Pictures of one test sample: {name: (H, W, 3) uint8}."""
    token = sample["sample_token"][:8]
    gt = sample["occ_semantics"].cpu().numpy()
    pred = output["occ"].cpu().numpy()
    pictures = {}
    scale = BEV_SCALE
    bev_gt = vis.caption(vis.upscale(vis.bev_semantics(gt, class_names, free_index), scale), "GT occupancy")
    bev_pred = vis.caption(vis.upscale(vis.bev_semantics(pred, class_names, free_index), scale),
                           "predicted occupancy")
    legend = vis.legend(class_names)
    legend_canvas = np.full((bev_gt.shape[0], legend.shape[1], 3), 255, np.uint8)
    legend_canvas[: min(legend.shape[0], bev_gt.shape[0])] = legend[: bev_gt.shape[0]]
    gap = np.full((bev_gt.shape[0], 6, 3), 255, np.uint8)
    pictures[f"{token}_bev_occupancy"] = np.concatenate([bev_pred, gap, bev_gt, legend_canvas], axis=1)
    flows = []
    for title, semantics, flow in (("predicted flow", pred, output["flow"].cpu().numpy()),
                                   ("GT flow", gt, sample["occ_flow"].cpu().numpy())):
        image = vis.upscale(vis.bev_flow(semantics, flow, free_index, class_names=class_names), scale)
        image = vis.draw_flow_arrows(image, vis.bev_flow_columns(semantics, flow, free_index), grid.voxel_size, scale)
        flows.append(vis.caption(image, f"{title} (arrows: 1 s of motion; colour: direction)"))
    pictures[f"{token}_bev_flow"] = np.concatenate([flows[0], gap, flows[1]], axis=1)
    centers = grid.voxel_centers()
    images = sample["img"].cpu().numpy().transpose(0, 2, 3, 1)
    cams = []
    for i in range(images.shape[0]):
        overlay = vis.overlay_occupancy_on_image(
            np.ascontiguousarray(images[i]).astype(np.uint8), pred, centers, sample["intrinsics"][i].numpy(),
            sample["cam2ego"][i].numpy(), class_names, free_index, alpha=0.45)
        cams.append(np.concatenate([images[i].astype(np.uint8), overlay], axis=0))
    # nuScenes order: FRONT, FRONT_RIGHT, FRONT_LEFT, BACK, BACK_LEFT, BACK_RIGHT -> a 2x3 rig layout
    order = [2, 0, 1, 4, 3, 5] if len(cams) == 6 else list(range(len(cams)))
    pictures[f"{token}_cameras"] = vis.tile_images([cams[i] for i in order], columns=3)
    return pictures


def regularizer_pictures(model, cfg, class_names, num_views=3):
    """Rendered semantics of the regularizer (prediction vs GT) on one training sample, if the
    model has a regularizer that exposes its renders; {} otherwise. The model stays in eval
    mode (batch-norm statistics untouched): the regularizer is called on its head outputs."""
    regularizer = getattr(model, "regularizer", None)
    if regularizer is None or not hasattr(regularizer, "last_renders"):
        return {}
    loader = instantiate(cfg.dataloader.train)
    batch = next(iter(loader))
    with torch.no_grad():
        head_outputs, _ = model.head_outputs(batch, return_features=model.regularizer_needs_features)
        regularizer(batch, head_outputs, flow_loss_enabled=model.flow_loss_enabled)
    renders = regularizer.last_renders
    if not renders:
        return {}
    image = render_comparison_image(renders, class_names, max_views=num_views)
    factor = max(1, -(-RENDER_MIN_WIDTH // (image.shape[1] // 2)))
    return {"regularizer_renders": vis.upscale(image, factor)}


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config_file, [o for o in args.opts if o != "--"])
    cfg.train.device = args.device
    model = instantiate(cfg.model).to(args.device)
    if not os.path.isfile(args.checkpoint):
        raise SystemExit(f"checkpoint {args.checkpoint} does not exist")
    # strict: a checkpoint of another model is an error naming the missing or mis-shaped entries,
    # never a picture of randomly initialised weights
    OccupancyCheckpointer(model, strict=True, trust_checkpoint=cfg.train.get("trust_checkpoint", False)).load(
        args.checkpoint)
    model.eval()
    test_loader = instantiate(cfg.dataloader.test)
    dataset_name = OmegaConf.select(cfg, "dataloader.test.dataset.name", default=None)
    class_names, free_index, grid = dataset_metadata(dataset_name)

    pictures = {}
    with torch.no_grad():
        for batch in itertools.islice(test_loader, args.num_samples):
            outputs = model(batch)
            for sample, output in zip(batch, outputs):
                pictures.update(sample_pictures(sample, output, class_names, free_index, grid))
    pictures.update(regularizer_pictures(model, cfg, class_names))

    for name, image in pictures.items():
        vis.save_png(os.path.join(args.output, f"{name}.png"), image)
    if args.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.tensorboard_dir)
        for name, image in pictures.items():
            writer.add_image(f"pictures/{name}", vis.to_chw_float(image), global_step=0)
        writer.close()
    print(f"wrote {len(pictures)} pictures to {args.output}: {', '.join(sorted(pictures))}")
    return pictures


if __name__ == "__main__":
    main()
