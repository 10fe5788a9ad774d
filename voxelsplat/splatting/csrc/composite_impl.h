/*
 * Alpha compositing of projected Gaussians and its backward pass, for one scalar type.
 * Included by composite.c with SCALAR (float or double) and SUFFIX (f32 or f64) defined.
 *
 * Projections arrive sorted by (camera, depth); those of camera c are
 * [cam_start[c], cam_start[c + 1]). Each one has a pixel box (x0, x1, y0, y1, inclusive,
 * inside the image; x1 < x0 for none) outside which its alpha is below 1/255. Cameras are
 * independent, so the work is split by camera ([cam_first, cam_last)); within a camera
 * the projections are visited in depth order (forward) or in reverse (backward), and each
 * pixel keeps its own transmittance, which composites every pixel's Gaussians in the same
 * order as a per-pixel loop (gsplat's classic mode):
 *
 *   sigma = 0.5 (a dx^2 + c dy^2) + b dx dy, (dx, dy) = mean - pixel centre (+0.5);
 *   alpha = min(0.999, opacity exp(-sigma)); skipped where sigma < 0 or alpha < 1/255;
 *   the pixel stops before the Gaussian that would take its transmittance T to <= 1e-4;
 *   out += source * alpha * T, T *= 1 - alpha.
 *
 * Outputs and per-pixel state are (C, H, W[, D]) row-major; source is (K, D).
 */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

static inline int CAT(sigma_alpha, SUFFIX)(const SCALAR *mean, const SCALAR *conic, SCALAR opacity, int64_t x,
                                          int64_t y, double *dx, double *dy, double *sigma, double *vis,
                                          double *alpha) {
    *dx = (double)mean[0] - ((double)x + 0.5);
    *dy = (double)mean[1] - ((double)y + 0.5);
    *sigma = 0.5 * ((double)conic[0] * *dx * *dx + (double)conic[2] * *dy * *dy) + (double)conic[1] * *dx * *dy;
    if (*sigma < 0) return 0;
    *vis = exp(-*sigma);
    const double raw = (double)opacity * *vis;
    *alpha = raw < MAX_ALPHA ? raw : MAX_ALPHA;
    return *alpha >= ALPHA_THRESHOLD;
}

int CAT(voxelsplat_composite_forward, SUFFIX)(
    int64_t H, int64_t W, int64_t D, const int64_t *cam_start, const SCALAR *means2d, const SCALAR *conics,
    const SCALAR *opacities, const SCALAR *source, const int32_t *boxes, int64_t cam_first, int64_t cam_last,
    SCALAR *image, double *transmittance, int64_t *last) {
    const int64_t plane = H * W;
    for (int64_t cam = cam_first; cam < cam_last; ++cam) {
        double *T = transmittance + cam * plane;
        int64_t *stop = last + cam * plane;  /* last contributing projection; -1: none yet */
        SCALAR *out = image + cam * plane * D;
        for (int64_t p = 0; p < plane; ++p) {
            T[p] = 1.0;
            stop[p] = -1;
        }
        for (int64_t p = 0; p < plane * D; ++p) out[p] = 0;
        /* a pixel that stopped is marked done with T = 0 until the end */
        for (int64_t i = cam_start[cam]; i < cam_start[cam + 1]; ++i) {
            const int32_t *box = boxes + 4 * i;
            const SCALAR *src = source + i * D;
            for (int64_t y = box[2]; y <= box[3]; ++y) {
                for (int64_t x = box[0]; x <= box[1]; ++x) {
                    const int64_t p = y * W + x;
                    if (T[p] <= 0) continue;
                    double dx, dy, sigma, vis, alpha;
                    if (!CAT(sigma_alpha, SUFFIX)(means2d + 2 * i, conics + 3 * i, opacities[i], x, y, &dx, &dy,
                                                 &sigma, &vis, &alpha))
                        continue;
                    const double next = T[p] * (1.0 - alpha);
                    if (next <= TRANSMITTANCE_THRESHOLD) {
                        T[p] = -T[p];  /* done: keep |T| (the final transmittance) */
                        continue;
                    }
                    const SCALAR w = (SCALAR)(alpha * T[p]);
                    SCALAR *o = out + p * D;
                    for (int64_t d = 0; d < D; ++d) o[d] += w * src[d];
                    T[p] = next;
                    stop[p] = i;
                }
            }
        }
        for (int64_t p = 0; p < plane; ++p) T[p] = fabs(T[p]);
    }
    return 0;
}

int CAT(voxelsplat_composite_backward, SUFFIX)(
    int64_t H, int64_t W, int64_t D, const int64_t *cam_start, const SCALAR *means2d, const SCALAR *conics,
    const SCALAR *opacities, const SCALAR *source, const int32_t *boxes, int64_t cam_first, int64_t cam_last,
    const double *transmittance, const int64_t *last, const SCALAR *grad_image, double *T_scratch,
    SCALAR *acc_scratch, int64_t *stop_scratch, SCALAR *grad_means2d, SCALAR *grad_conics, SCALAR *grad_opacities,
    SCALAR *grad_source) {
    const int64_t plane = H * W;
    for (int64_t cam = cam_first; cam < cam_last; ++cam) {
        double *T = T_scratch + cam * plane;
        SCALAR *acc = acc_scratch + cam * plane * D;  /* sum of source * weight of the later Gaussians */
        int64_t *stop = stop_scratch + cam * plane;
        const SCALAR *grad_out = grad_image + cam * plane * D;
        for (int64_t p = 0; p < plane; ++p) {
            T[p] = transmittance[cam * plane + p];
            /* a pixel without gradient (e.g. outside the loss mask) adds nothing to any
             * gradient: skip it as if no Gaussian had reached it */
            int any = 0;
            for (int64_t d = 0; d < D; ++d) any |= grad_out[p * D + d] != 0;
            stop[p] = any ? last[cam * plane + p] : -1;
        }
        for (int64_t p = 0; p < plane * D; ++p) acc[p] = 0;
        for (int64_t i = cam_start[cam + 1] - 1; i >= cam_start[cam]; --i) {
            const int32_t *box = boxes + 4 * i;
            const SCALAR *src = source + i * D;
            const SCALAR *conic = conics + 3 * i;
            double g_mean[2] = {0, 0}, g_conic[3] = {0, 0, 0}, g_opacity = 0;
            SCALAR *g_src = grad_source + i * D;
            for (int64_t y = box[2]; y <= box[3]; ++y) {
                for (int64_t x = box[0]; x <= box[1]; ++x) {
                    const int64_t p = y * W + x;
                    if (i > stop[p]) continue;
                    double dx, dy, sigma, vis, alpha;
                    if (!CAT(sigma_alpha, SUFFIX)(means2d + 2 * i, conic, opacities[i], x, y, &dx, &dy, &sigma,
                                                 &vis, &alpha))
                        continue;
                    const double keep = 1.0 / (1.0 - alpha);
                    T[p] *= keep;  /* the transmittance in front of this Gaussian */
                    const SCALAR w = (SCALAR)(alpha * T[p]), Tp = (SCALAR)T[p], keep_s = (SCALAR)keep;
                    const SCALAR *g = grad_out + p * D;
                    SCALAR *a = acc + p * D;
                    SCALAR g_alpha_s = 0;
                    for (int64_t d = 0; d < D; ++d) {
                        g_alpha_s += g[d] * (src[d] * Tp - a[d] * keep_s);
                        g_src[d] += w * g[d];
                        a[d] += src[d] * w;
                    }
                    const double g_alpha = (double)g_alpha_s;
                    if ((double)opacities[i] * vis <= MAX_ALPHA) {  /* alpha not clamped */
                        const double g_sigma = -alpha * g_alpha;
                        g_opacity += vis * g_alpha;
                        g_conic[0] += 0.5 * dx * dx * g_sigma;
                        g_conic[1] += dx * dy * g_sigma;
                        g_conic[2] += 0.5 * dy * dy * g_sigma;
                        g_mean[0] += ((double)conic[0] * dx + (double)conic[1] * dy) * g_sigma;
                        g_mean[1] += ((double)conic[2] * dy + (double)conic[1] * dx) * g_sigma;
                    }
                }
            }
            grad_means2d[2 * i] = (SCALAR)g_mean[0];
            grad_means2d[2 * i + 1] = (SCALAR)g_mean[1];
            for (int k = 0; k < 3; ++k) grad_conics[3 * i + k] = (SCALAR)g_conic[k];
            grad_opacities[i] = (SCALAR)g_opacity;
        }
    }
    return 0;
}

#undef CAT
#undef CAT_
