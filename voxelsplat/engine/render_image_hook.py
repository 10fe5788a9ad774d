"""TensorBoard images of the VoxelSplat regularizer: predicted vs GT rendered semantics."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from detectron2.engine import HookBase

from ..utils import visualization as vis
from .hooks import unwrap_model

__all__ = ["RenderImageHook", "render_comparison_image"]


def render_comparison_image(renders: Dict[str, torch.Tensor], class_names: Sequence[str], max_views: int = 3) -> np.ndarray:
    """One (H', W', 3) uint8 picture: a row per view, the prediction's rendered semantics on
    the left and the GT's on the right, coloured by class and blended over white by alpha.

    Args:
        renders: the regularizer's ``last_renders``: ``pred_features``/``gt_features``
            (V, H, W, num_classes) class scores, ``pred_alphas``/``gt_alphas`` (V, H, W).
        class_names: the label set (colours by name).
    """
    tiles = []
    for view in range(min(int(max_views), renders["pred_features"].shape[0])):
        for prefix, title in (("pred", "prediction"), ("gt", "GT")):
            color = vis.render_to_color(renders[f"{prefix}_features"][view].numpy(),
                                        renders[f"{prefix}_alphas"][view].numpy(), class_names)
            tiles.append(vis.label_image(color, f"{title} {view}"))
    return vis.tile_images(tiles, columns=2)


class RenderImageHook(HookBase):
    """Every ``period`` iterations, put the regularizer's latest renders (predicted vs GT
    semantics for up to ``max_views`` views of the step's first sample) into the
    ``EventStorage`` as the image ``name`` (TensorBoard shows it with the scalars).

    Reads ``model.regularizer.last_renders`` (see
    :class:`voxelsplat.modeling.regularizers.GaussianSplatRegularizer`); does nothing for a
    model without a regularizer or before its first render.

    Args:
        period: iterations between images.
        max_views: views shown.
        class_names: label set for the colours; default: the model's ``class_names``.
        name: image name in the event storage.
    """

    def __init__(self, period: int = 100, max_views: int = 3, class_names: Optional[Sequence[str]] = None,
                 name: str = "voxelsplat/renders_pred_vs_gt"):
        if int(period) < 1:
            raise ValueError(f"RenderImageHook: period must be >= 1, got {period}")
        self.period = int(period)
        self.max_views = int(max_views)
        self.class_names = list(class_names) if class_names is not None else None
        self.name = name

    def after_step(self):
        if (self.trainer.iter + 1) % self.period:
            return
        model = unwrap_model(self.trainer.model)
        renders = getattr(getattr(model, "regularizer", None), "last_renders", None)
        if not renders:
            return
        class_names = self.class_names or getattr(model, "class_names", None)
        if class_names is None:
            raise AttributeError("RenderImageHook: pass class_names (the model has no class_names attribute)")
        image = render_comparison_image(renders, class_names, self.max_views)
        self.trainer.storage.put_image(self.name, vis.to_chw_float(image))
