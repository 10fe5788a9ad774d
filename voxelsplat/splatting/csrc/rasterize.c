/*
 * CPU kernels of the "native" rasterization backend (voxelsplat/splatting/native_backend.py):
 * EWA projection (project_impl.h) and front-to-back alpha compositing (composite_impl.h),
 * each with its backward pass, in float32 and float64 (every header included once per type).
 */
#include <math.h>
#include <stdint.h>

#define ALPHA_THRESHOLD (1.0 / 255.0)
#define MAX_ALPHA 0.999
#define TRANSMITTANCE_THRESHOLD 1e-4
#define MAX_EXTEND 3.33

#define SCALAR float
#define SUFFIX f32
#include "project_impl.h"
#include "composite_impl.h"
#undef SCALAR
#undef SUFFIX

#define SCALAR double
#define SUFFIX f64
#include "project_impl.h"
#include "composite_impl.h"
#undef SCALAR
#undef SUFFIX
