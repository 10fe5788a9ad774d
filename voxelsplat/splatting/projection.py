"""EWA projection of 3D Gaussians into pinhole cameras (gsplat's "classic" conventions).

This is the pure-PyTorch projection used by the ``"torch"`` backend. It follows
gsplat 1.5.3's fused projection exactly:

- camera-frame mean ``t = R @ mean + T`` with the world->camera ``viewmat = [R | T]``;
  a Gaussian is culled when ``t_z < near_plane`` or ``t_z > far_plane``;
- 3D covariance ``Sigma = (R_q S)(R_q S)^T`` from the normalised quaternion (w, x, y, z)
  and the per-axis scales; camera-frame covariance ``R Sigma R^T``;
- the projection Jacobian is evaluated at the camera-frame mean with ``x/z`` and ``y/z``
  clamped to the field of view widened by 30 % (keeps Gaussians far outside the
  image from growing huge footprints), the mean itself is projected unclamped;
- ``eps2d`` is added to the diagonal of the 2D covariance (no antialiasing
  compensation); a Gaussian whose blurred 2D covariance has ``det <= 0`` is culled;
- its screen-space radius is ``ceil(extend * sqrt(cov2d_ii))`` with
  ``extend = min(3.33, sqrt(2 log(opacity / (1/255))))`` (beyond it every pixel has
  alpha < 1/255), and it is culled when opacity < 1/255 or the box lies off-screen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999
TRANSMITTANCE_THRESHOLD = 1e-4
# Largest screen-space extent, in standard deviations, gsplat gives a Gaussian.
MAX_EXTEND = 3.33


def quaternion_to_rotation(quats: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternions (w, x, y, z), not necessarily unit -> (..., 3, 3) rotations."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = (
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


@dataclass
class Projections:
    """The (camera, Gaussian) pairs that survive culling, sorted by camera then depth.

    Every tensor has length K (the number of surviving pairs); the differentiable
    ones carry gradients back to the Gaussians' parameters.

    Attributes:
        camera_ids, gaussian_ids: int64 (K,) which camera and which Gaussian.
        means2d: (K, 2) projected mean in pixels (u right, v down; pixel (j, i) has
            its centre at (j + 0.5, i + 0.5)).
        conics: (K, 3) upper triangle (a, b, c) of the inverse blurred 2D covariance,
            so that ``sigma = 0.5 (a dx^2 + c dy^2) + b dx dy``.
        depths: (K,) camera-frame z of the mean, metres.
        opacities: (K,) the Gaussian's opacity.
        radii: int64 (K, 2) screen-space half extent in pixels (x, y), no gradient.
    """

    camera_ids: torch.Tensor
    gaussian_ids: torch.Tensor
    means2d: torch.Tensor
    conics: torch.Tensor
    depths: torch.Tensor
    opacities: torch.Tensor
    radii: torch.Tensor

    def select(self, index: torch.Tensor) -> "Projections":
        return Projections(*(getattr(self, name)[index] for name in self.__dataclass_fields__))


def project_gaussians(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    near_plane: float,
    far_plane: float,
    eps2d: float,
) -> Projections:
    """Project N Gaussians into C cameras, keeping only the pairs that can touch a pixel.

    Args:
        means (N, 3), quats (N, 4) w,x,y,z, scales (N, 3), opacities (N,): the Gaussians
            in the world frame (metres); means may be (C, N, 3), one position per camera.
        viewmats (C, 4, 4): world -> camera (OpenCV: x right, y down, z forward).
        Ks (C, 3, 3): pinhole intrinsics in pixels.
        width, height: image size in pixels.
    Returns:
        :class:`Projections`, sorted by (camera, depth, Gaussian index) — the order in
        which gsplat composites a pixel's Gaussians.
    """
    rotations, translations = viewmats[:, :3, :3], viewmats[:, :3, 3]
    with torch.no_grad():
        equation = "cij,nj->cni" if means.dim() == 2 else "cij,cnj->cni"
        cam_points = torch.einsum(equation, rotations, means) + translations[:, None, :]  # (C, N, 3)
        x, y, z = cam_points.unbind(-1)
        keep = (z >= near_plane) & (z <= far_plane) & (opacities[None, :] >= ALPHA_THRESHOLD)
        # Cheap early cull of pairs whose screen box must lie off-screen, with a radius that
        # bounds the exact one: std along x <= |J row x| * |R_view|_2 * max(scale), where
        # |J row x| <= fx / z * sqrt(1 + lim_x^2) (the Jacobian clamps x/z to +-lim_x).
        fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
        cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
        lim_x = torch.maximum(width - cx, cx) / fx + 0.3 * 0.5 * width / fx
        lim_y = torch.maximum(height - cy, cy) / fy + 0.3 * 0.5 * height / fy
        spread = (torch.linalg.matrix_norm(rotations, ord=2)[:, None] * scales.amax(-1)[None, :]) ** 2  # (C, N)
        safe_z = torch.where(keep, z, torch.ones_like(z))
        bound_x = MAX_EXTEND * torch.sqrt((fx / safe_z) ** 2 * (1 + lim_x ** 2) * spread + eps2d) + 1
        bound_y = MAX_EXTEND * torch.sqrt((fy / safe_z) ** 2 * (1 + lim_y ** 2) * spread + eps2d) + 1
        u, v = fx * x / safe_z + cx, fy * y / safe_z + cy
        keep &= (u + bound_x > 0) & (u - bound_x < width) & (v + bound_y > 0) & (v - bound_y < height)
        # nonzero over (C, N) orders pairs by camera, then Gaussian index.
        camera_ids, gaussian_ids = keep.nonzero(as_tuple=True)

    # Only the pairs in range are projected: computing 1/z for culled pairs would put
    # inf/nan into the backward pass even though their values are never used.
    rotation = rotations.index_select(0, camera_ids)  # (K, 3, 3)
    if means.dim() == 2:
        mean_w = means.index_select(0, gaussian_ids)
    else:
        mean_w = means.reshape(-1, 3).index_select(0, camera_ids * means.shape[1] + gaussian_ids)
    mean_c = (rotation * mean_w[:, None, :]).sum(-1) + translations.index_select(0, camera_ids)
    # Camera-frame factor of the covariance, R_view (R_q S): cov_c = A A^T. Broadcast
    # products instead of batched 3x3 matmuls, which are slow on CPU.
    factor = quaternion_to_rotation(quats) * scales[:, None, :]  # (N, 3, 3)
    factor_c = (rotation[:, :, :, None] * factor.index_select(0, gaussian_ids)[:, None, :, :]).sum(2)
    K = Ks.index_select(0, camera_ids)
    fx, fy, cx, cy = K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]
    x, y, z = mean_c.unbind(-1)
    rz = 1.0 / z
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    tx = z * torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x * rz))
    ty = z * torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y * rz))
    # J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]]; cov2d = (J A)(J A)^T + eps2d I.
    row_x = (fx * rz)[:, None] * factor_c[:, 0] - (fx * tx * rz * rz)[:, None] * factor_c[:, 2]
    row_y = (fy * rz)[:, None] * factor_c[:, 1] - (fy * ty * rz * rz)[:, None] * factor_c[:, 2]
    c00 = (row_x * row_x).sum(-1) + eps2d
    c01 = (row_x * row_y).sum(-1)
    c11 = (row_y * row_y).sum(-1) + eps2d
    det = c00 * c11 - c01 * c01
    means2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], dim=-1)
    opacity = opacities.index_select(0, gaussian_ids)

    with torch.no_grad():
        positive = det > 0
        extend = torch.sqrt(2.0 * torch.log(opacity / ALPHA_THRESHOLD)).clamp(max=MAX_EXTEND)
        radius_x = torch.ceil(extend * torch.sqrt(c00.clamp(min=0)))
        radius_y = torch.ceil(extend * torch.sqrt(c11.clamp(min=0)))
        u, v = means2d[:, 0], means2d[:, 1]
        on_screen = (u + radius_x > 0) & (u - radius_x < width) & (v + radius_y > 0) & (v - radius_y < height)
        keep = positive & on_screen & ((radius_x > 0) | (radius_y > 0))
        kept = keep.nonzero(as_tuple=True)[0]
        # Sort by (camera, depth); ties keep the Gaussian order (stable sorts).
        order = torch.sort(z.index_select(0, kept), stable=True).indices
        order = order.index_select(0, torch.sort(camera_ids.index_select(0, kept.index_select(0, order)), stable=True).indices)
        kept = kept.index_select(0, order)

    det_k = det.index_select(0, kept)
    conics = torch.stack([c11.index_select(0, kept) / det_k, -c01.index_select(0, kept) / det_k,
                          c00.index_select(0, kept) / det_k], dim=-1)
    radii = torch.stack([radius_x.index_select(0, kept), radius_y.index_select(0, kept)], dim=-1).long()
    return Projections(camera_ids.index_select(0, kept), gaussian_ids.index_select(0, kept),
                       means2d.index_select(0, kept), conics, z.index_select(0, kept), opacity.index_select(0, kept),
                       radii)
