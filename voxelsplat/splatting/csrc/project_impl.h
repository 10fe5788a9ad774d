/*
 * EWA projection of Gaussians into pinhole cameras and its backward pass, for one scalar
 * type (included by rasterize.c with SCALAR and SUFFIX defined). The same arithmetic as
 * voxelsplat/splatting/projection.py (gsplat's classic mode), evaluated in double for
 * every (camera, Gaussian) pair c * N + n:
 *
 *   t = R mean + T; cull if t_z < near or > far or opacity < 1/255;
 *   A = R (R_q S) (camera-frame covariance factor);
 *   J = [[fx/z, 0, -fx tx/z^2], [0, fy/z, -fy ty/z^2]] with tx, ty = z * (x/z, y/z clamped
 *   to 1.3 x the field of view); cov2d = (J A)(J A)^T + eps2d I;
 *   radius = ceil(min(3.33, sqrt(2 ln(255 opacity))) * sqrt(cov2d_ii));
 *   kept where det(cov2d) > 0, a radius is > 0 and the box reaches the image.
 *
 * Outputs per pair: keep, means2d (u, v), conic (inverse cov2d: a, b, c), depth t_z and
 * radii (x, y). Shapes: means (N, 3), or (C, N, 3) with per_camera_means; quats (N, 4)
 * w, x, y, z (normalised here); scales (N, 3); opacities (N,); viewmats (C, 4, 4); Ks (C, 3, 3).
 */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

/* Rotation of a quaternion (w, x, y, z), normalised; returns |q|. */
static inline double CAT(quat_rotation, SUFFIX)(const SCALAR *q, double qn[4], double R[3][3]) {
    const double norm = sqrt((double)q[0] * q[0] + (double)q[1] * q[1] + (double)q[2] * q[2] + (double)q[3] * q[3]);
    const double safe = norm > 1e-12 ? norm : 1e-12;
    for (int k = 0; k < 4; ++k) qn[k] = (double)q[k] / safe;
    const double w = qn[0], x = qn[1], y = qn[2], z = qn[3];
    R[0][0] = 1 - 2 * (y * y + z * z); R[0][1] = 2 * (x * y - w * z); R[0][2] = 2 * (x * z + w * y);
    R[1][0] = 2 * (x * y + w * z); R[1][1] = 1 - 2 * (x * x + z * z); R[1][2] = 2 * (y * z - w * x);
    R[2][0] = 2 * (x * z - w * y); R[2][1] = 2 * (y * z + w * x); R[2][2] = 1 - 2 * (x * x + y * y);
    return safe;
}

/* Everything the forward and backward passes share for one pair. */
typedef struct {
    double Rv[3][3], t[3], fx, fy, cx, cy;
    double qn[4], qnorm, Rq[3][3], factor[3][3], fc[3][3];
    double rz, tx, ty, qx, qy, clamp_x, clamp_y;
    double row_x[3], row_y[3], c00, c01, c11, det;
} CAT(PairState, SUFFIX);

static inline void CAT(pair_state, SUFFIX)(CAT(PairState, SUFFIX) *s, const SCALAR *mean, const SCALAR *quat,
                                          const SCALAR *scale, const SCALAR *viewmat, const SCALAR *K, int64_t W,
                                          int64_t H, double eps2d) {
    for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) s->Rv[i][j] = (double)viewmat[4 * i + j];
        s->t[i] = (double)viewmat[4 * i + 3];
        for (int j = 0; j < 3; ++j) s->t[i] += s->Rv[i][j] * (double)mean[j];
    }
    s->fx = (double)K[0]; s->cx = (double)K[2]; s->fy = (double)K[4]; s->cy = (double)K[5];
    s->qnorm = CAT(quat_rotation, SUFFIX)(quat, s->qn, s->Rq);
    for (int k = 0; k < 3; ++k)
        for (int j = 0; j < 3; ++j) s->factor[k][j] = s->Rq[k][j] * (double)scale[j];
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
            s->fc[i][j] = s->Rv[i][0] * s->factor[0][j] + s->Rv[i][1] * s->factor[1][j] + s->Rv[i][2] * s->factor[2][j];
    const double x = s->t[0], y = s->t[1], z = s->t[2];
    s->rz = 1.0 / z;
    const double tan_fovx = 0.5 * (double)W / s->fx, tan_fovy = 0.5 * (double)H / s->fy;
    const double lim_x_pos = ((double)W - s->cx) / s->fx + 0.3 * tan_fovx, lim_x_neg = s->cx / s->fx + 0.3 * tan_fovx;
    const double lim_y_pos = ((double)H - s->cy) / s->fy + 0.3 * tan_fovy, lim_y_neg = s->cy / s->fy + 0.3 * tan_fovy;
    s->qx = x * s->rz;
    s->qy = y * s->rz;
    s->clamp_x = fmin(lim_x_pos, fmax(-lim_x_neg, s->qx));
    s->clamp_y = fmin(lim_y_pos, fmax(-lim_y_neg, s->qy));
    s->tx = z * s->clamp_x;
    s->ty = z * s->clamp_y;
    const double a = s->fx * s->rz, b = s->fx * s->tx * s->rz * s->rz;
    const double c = s->fy * s->rz, d = s->fy * s->ty * s->rz * s->rz;
    for (int j = 0; j < 3; ++j) {
        s->row_x[j] = a * s->fc[0][j] - b * s->fc[2][j];
        s->row_y[j] = c * s->fc[1][j] - d * s->fc[2][j];
    }
    s->c00 = s->row_x[0] * s->row_x[0] + s->row_x[1] * s->row_x[1] + s->row_x[2] * s->row_x[2] + eps2d;
    s->c01 = s->row_x[0] * s->row_y[0] + s->row_x[1] * s->row_y[1] + s->row_x[2] * s->row_y[2];
    s->c11 = s->row_y[0] * s->row_y[0] + s->row_y[1] * s->row_y[1] + s->row_y[2] * s->row_y[2] + eps2d;
    s->det = s->c00 * s->c11 - s->c01 * s->c01;
}

int CAT(voxelsplat_project_forward, SUFFIX)(
    int64_t C, int64_t N, int32_t per_camera_means, const SCALAR *means, const SCALAR *quats, const SCALAR *scales,
    const SCALAR *opacities, const SCALAR *viewmats, const SCALAR *Ks, int64_t W, int64_t H, double near_plane,
    double far_plane, double eps2d, uint8_t *keep, SCALAR *means2d, SCALAR *conics, SCALAR *depths, int32_t *radii) {
    for (int64_t c = 0; c < C; ++c) {
        for (int64_t n = 0; n < N; ++n) {
            const int64_t p = c * N + n;
            keep[p] = 0;
            means2d[2 * p] = means2d[2 * p + 1] = 0;
            conics[3 * p] = conics[3 * p + 1] = conics[3 * p + 2] = 0;
            depths[p] = 0;
            radii[2 * p] = radii[2 * p + 1] = 0;
            const SCALAR *mean = means + 3 * (per_camera_means ? p : n);
            const SCALAR *Rv = viewmats + 16 * c;
            const double z = (double)Rv[8] * mean[0] + (double)Rv[9] * mean[1] + (double)Rv[10] * mean[2] + Rv[11];
            if (!(z >= near_plane && z <= far_plane && opacities[n] >= (SCALAR)ALPHA_THRESHOLD)) continue;
            CAT(PairState, SUFFIX) s;
            CAT(pair_state, SUFFIX)(&s, mean, quats + 4 * n, scales + 3 * n, Rv, Ks + 9 * c, W, H, eps2d);
            const double u = s.fx * s.t[0] * s.rz + s.cx, v = s.fy * s.t[1] * s.rz + s.cy;
            double extend = sqrt(2.0 * log((double)opacities[n] / ALPHA_THRESHOLD));
            if (extend > MAX_EXTEND) extend = MAX_EXTEND;
            const double rx = ceil(extend * sqrt(s.c00 > 0 ? s.c00 : 0));
            const double ry = ceil(extend * sqrt(s.c11 > 0 ? s.c11 : 0));
            const int on_screen = u + rx > 0 && u - rx < (double)W && v + ry > 0 && v - ry < (double)H;
            if (!(s.det > 0 && on_screen && (rx > 0 || ry > 0))) continue;
            keep[p] = 1;
            means2d[2 * p] = (SCALAR)u;
            means2d[2 * p + 1] = (SCALAR)v;
            conics[3 * p] = (SCALAR)(s.c11 / s.det);
            conics[3 * p + 1] = (SCALAR)(-s.c01 / s.det);
            conics[3 * p + 2] = (SCALAR)(s.c00 / s.det);
            depths[p] = (SCALAR)s.t[2];
            radii[2 * p] = (int32_t)rx;
            radii[2 * p + 1] = (int32_t)ry;
        }
    }
    return 0;
}

/* Gradients of the kept pairs' means2d, conics and depths -> means, quats, scales
 * (accumulated over cameras; the caller zeroes them). */
int CAT(voxelsplat_project_backward, SUFFIX)(
    int64_t C, int64_t N, int32_t per_camera_means, const SCALAR *means, const SCALAR *quats, const SCALAR *scales,
    const SCALAR *viewmats, const SCALAR *Ks, int64_t W, int64_t H, double eps2d, const uint8_t *keep,
    const SCALAR *grad_means2d, const SCALAR *grad_conics, const SCALAR *grad_depths, SCALAR *grad_means,
    SCALAR *grad_quats, SCALAR *grad_scales) {
    for (int64_t c = 0; c < C; ++c) {
        for (int64_t n = 0; n < N; ++n) {
            const int64_t p = c * N + n;
            if (!keep[p]) continue;
            const int64_t m = per_camera_means ? p : n;
            CAT(PairState, SUFFIX) s;
            CAT(pair_state, SUFFIX)(&s, means + 3 * m, quats + 4 * n, scales + 3 * n, viewmats + 16 * c, Ks + 9 * c, W,
                                   H, eps2d);
            const double gu = grad_means2d[2 * p], gv = grad_means2d[2 * p + 1];
            const double ga = grad_conics[3 * p], gb = grad_conics[3 * p + 1], gc = grad_conics[3 * p + 2];
            /* conic = (c11, -c01, c00) / det */
            const double c00 = s.c00, c01 = s.c01, c11 = s.c11, inv = 1.0 / s.det, inv2 = inv * inv;
            const double g_c00 = ga * (-c11 * c11 * inv2) + gb * (c01 * c11 * inv2) + gc * (inv - c00 * c11 * inv2);
            const double g_c11 = ga * (inv - c11 * c00 * inv2) + gb * (c01 * c00 * inv2) + gc * (-c00 * c00 * inv2);
            const double g_c01 = ga * (2 * c01 * c11 * inv2) + gb * (-inv - 2 * c01 * c01 * inv2) +
                                 gc * (2 * c00 * c01 * inv2);
            double g_row_x[3], g_row_y[3];
            for (int j = 0; j < 3; ++j) {
                g_row_x[j] = 2 * g_c00 * s.row_x[j] + g_c01 * s.row_y[j];
                g_row_y[j] = 2 * g_c11 * s.row_y[j] + g_c01 * s.row_x[j];
            }
            const double rz = s.rz;
            const double a = s.fx * rz, b = s.fx * s.tx * rz * rz, cc = s.fy * rz, d = s.fy * s.ty * rz * rz;
            double g_fc[3][3];
            double g_a = 0, g_b = 0, g_c = 0, g_d = 0;
            for (int j = 0; j < 3; ++j) {
                g_fc[0][j] = g_row_x[j] * a;
                g_fc[1][j] = g_row_y[j] * cc;
                g_fc[2][j] = -g_row_x[j] * b - g_row_y[j] * d;
                g_a += g_row_x[j] * s.fc[0][j];
                g_b -= g_row_x[j] * s.fc[2][j];
                g_c += g_row_y[j] * s.fc[1][j];
                g_d -= g_row_y[j] * s.fc[2][j];
            }
            const double x = s.t[0], y = s.t[1], z = s.t[2];
            double g_rz = s.fx * g_a + 2 * s.fx * s.tx * rz * g_b + s.fy * g_c + 2 * s.fy * s.ty * rz * g_d;
            const double g_tx = s.fx * rz * rz * g_b, g_ty = s.fy * rz * rz * g_d;
            double g_x = 0, g_y = 0, g_z = (double)grad_depths[p];
            /* tx = z * clamp(x / z): the clamp passes the gradient strictly inside its range */
            g_z += s.clamp_x * g_tx + s.clamp_y * g_ty;
            if (s.clamp_x == s.qx) { g_x += rz * z * g_tx; g_rz += x * z * g_tx; }
            if (s.clamp_y == s.qy) { g_y += rz * z * g_ty; g_rz += y * z * g_ty; }
            /* u = fx x / z + cx, v = fy y / z + cy */
            g_x += s.fx * rz * gu;
            g_rz += s.fx * x * gu;
            g_y += s.fy * rz * gv;
            g_rz += s.fy * y * gv;
            g_z += -rz * rz * g_rz;
            const double g_t[3] = {g_x, g_y, g_z};
            SCALAR *gm = grad_means + 3 * m;
            for (int k = 0; k < 3; ++k)
                gm[k] += (SCALAR)(s.Rv[0][k] * g_t[0] + s.Rv[1][k] * g_t[1] + s.Rv[2][k] * g_t[2]);
            /* fc = Rv factor, factor = Rq diag(scale) */
            double g_Rq[3][3];
            SCALAR *gs = grad_scales + 3 * n;
            for (int k = 0; k < 3; ++k) {
                for (int j = 0; j < 3; ++j) {
                    const double g_factor = s.Rv[0][k] * g_fc[0][j] + s.Rv[1][k] * g_fc[1][j] + s.Rv[2][k] * g_fc[2][j];
                    g_Rq[k][j] = g_factor * (double)scales[3 * n + j];
                    gs[j] += (SCALAR)(g_factor * s.Rq[k][j]);
                }
            }
            const double w = s.qn[0], qx = s.qn[1], qy = s.qn[2], qz = s.qn[3];
            double g_qn[4];
            g_qn[0] = 2 * (-qz * g_Rq[0][1] + qy * g_Rq[0][2] + qz * g_Rq[1][0] - qx * g_Rq[1][2] - qy * g_Rq[2][0] +
                           qx * g_Rq[2][1]);
            g_qn[1] = 2 * (qy * g_Rq[0][1] + qz * g_Rq[0][2] + qy * g_Rq[1][0] - 2 * qx * g_Rq[1][1] - w * g_Rq[1][2] +
                           qz * g_Rq[2][0] + w * g_Rq[2][1] - 2 * qx * g_Rq[2][2]);
            g_qn[2] = 2 * (-2 * qy * g_Rq[0][0] + qx * g_Rq[0][1] + w * g_Rq[0][2] + qx * g_Rq[1][0] + qz * g_Rq[1][2] -
                           w * g_Rq[2][0] + qz * g_Rq[2][1] - 2 * qy * g_Rq[2][2]);
            g_qn[3] = 2 * (-2 * qz * g_Rq[0][0] - w * g_Rq[0][1] + qx * g_Rq[0][2] + w * g_Rq[1][0] - 2 * qz * g_Rq[1][1] +
                           qy * g_Rq[1][2] + qx * g_Rq[2][0] + qy * g_Rq[2][1]);
            const double dot = s.qn[0] * g_qn[0] + s.qn[1] * g_qn[1] + s.qn[2] * g_qn[2] + s.qn[3] * g_qn[3];
            SCALAR *gq = grad_quats + 4 * n;
            for (int k = 0; k < 4; ++k) gq[k] += (SCALAR)((g_qn[k] - s.qn[k] * dot) / s.qnorm);
        }
    }
    return 0;
}

#undef CAT
#undef CAT_
