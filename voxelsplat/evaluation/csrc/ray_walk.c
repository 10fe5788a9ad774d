/*
 * Per-ray 3D-DDA through a padded occupancy code volume, the CPU kernel behind
 * voxelsplat.evaluation.cast_rays (see ray_casting.py for the semantics, which this
 * file follows step for step: the walk starts in the origin's voxel, crossing times
 * are float64 and accumulate by addition, ties go to z, then y, then x).
 *
 * code:        (X+2, Y+2, Z+2) uint8; bit v = occupied in volume v, bit 7 = the border.
 * origins:     (K, 3) float64 origins in voxel units.
 * directions:  (Kd, R, 3) float64 unit directions; Kd = 1 (shared) or K.
 * Rays [first, last) of the K * R origin-major rays are walked; outputs are (V, K * R):
 * out_index int64 (grid flat index, -1 = never entered), out_depth float64 (voxel
 * units), out_hit uint8.
 */
#include <math.h>
#include <stdint.h>

#define OUTSIDE 128

static inline int choose_axis(const double t[3]) {
    if (t[0] < t[1]) return t[0] < t[2] ? 0 : 2;
    return t[1] < t[2] ? 1 : 2;
}

int voxelsplat_ray_walk(const uint8_t *code, int64_t X, int64_t Y, int64_t Z, int32_t num_volumes,
                        const double *origins, int64_t K, const double *directions, int64_t Kd, int64_t R,
                        int64_t first, int64_t last, int64_t *out_index, double *out_depth,
                        uint8_t *out_hit) {
    const int64_t N = K * R;
    const int64_t size[3] = {X, Y, Z};
    const int64_t pad_stride[3] = {(Y + 2) * (Z + 2), Z + 2, 1};
    const uint8_t all_volumes = (uint8_t)((1u << num_volumes) - 1u);
    for (int64_t ray = first; ray < last; ++ray) {
        const int64_t k = ray / R, r = ray % R;
        const double *o = origins + 3 * k;
        const double *d = directions + 3 * ((Kd > 1 ? k * R : 0) + r);
        int64_t v[3], step[3];
        double t[3], dt[3];
        for (int a = 0; a < 3; ++a) {
            v[a] = (int64_t)floor(o[a]);
            step[a] = d[a] >= 0 ? 1 : -1;
            if (d[a] != 0) {
                t[a] = ((double)(v[a] + (step[a] > 0)) - o[a]) / d[a];
                dt[a] = 1.0 / fabs(d[a]);
            } else {
                t[a] = INFINITY;
                dt[a] = INFINITY;
            }
        }
        for (int32_t vol = 0; vol < num_volumes; ++vol) {
            out_index[vol * N + ray] = -1;
            out_depth[vol * N + ray] = 0.0;
            out_hit[vol * N + ray] = 0;
        }
        int inside = v[0] >= 0 && v[0] < X && v[1] >= 0 && v[1] < Y && v[2] >= 0 && v[2] < Z;
        if (!inside) {
            /* Walk in from outside: the slab test says whether (and until when) the ray
             * is over the box; the walk then takes the crossings one by one. */
            double t_enter = 0.0, t_leave = INFINITY;
            int never = 0;
            for (int a = 0; a < 3; ++a) {
                if (d[a] != 0) {
                    double lo = (0.0 - o[a]) / d[a], hi = ((double)size[a] - o[a]) / d[a];
                    if (lo > hi) { double s = lo; lo = hi; hi = s; }
                    if (lo > t_enter) t_enter = lo;
                    if (hi < t_leave) t_leave = hi;
                } else if (!(o[a] >= 0 && o[a] < (double)size[a])) {
                    never = 1;
                }
            }
            if (never || !(t_enter < t_leave)) continue;
            while (!inside) {
                const int a = choose_axis(t);
                if (t[a] > t_leave + 1e-9) break;
                v[a] += step[a];
                t[a] += dt[a];
                inside = v[0] >= 0 && v[0] < X && v[1] >= 0 && v[1] < Y && v[2] >= 0 && v[2] < Z;
            }
            if (!inside) continue;
        }
        int64_t pflat = ((v[0] + 1) * pad_stride[0]) + (v[1] + 1) * pad_stride[1] + (v[2] + 1);
        uint8_t need = all_volumes;
        int64_t last_index = -1;
        double last_exit = 0.0;
        for (;;) {
            const uint8_t c = code[pflat];
            const int a = choose_axis(t);
            const double t_exit = t[a];
            if (c & OUTSIDE) {
                for (int32_t vol = 0; vol < num_volumes; ++vol) {
                    if (need & (1u << vol)) {
                        out_index[vol * N + ray] = last_index;
                        out_depth[vol * N + ray] = last_exit;
                    }
                }
                break;
            }
            const int64_t index = (v[0] * Y + v[1]) * Z + v[2];
            const uint8_t hits = c & need;
            if (hits) {
                for (int32_t vol = 0; vol < num_volumes; ++vol) {
                    if (hits & (1u << vol)) {
                        out_index[vol * N + ray] = index;
                        out_depth[vol * N + ray] = t_exit;
                        out_hit[vol * N + ray] = 1;
                    }
                }
                need &= (uint8_t)~hits;
                if (!need) break;
            }
            last_index = index;
            last_exit = t_exit;
            v[a] += step[a];
            t[a] += dt[a];
            pflat += step[a] * pad_stride[a];
        }
    }
    return 0;
}
