/* int8 codes with an fp32 absmax scale per group (block or row): pack and unpack in one pass each.
 *
 * The same rule as adaprec.formats.storage's eager path, bit for bit: scale = amax / max_code clamped to
 * [tiny, cap] (1 for an all-zero group), code = round-half-even(x / scale) clamped to +-max_code, value =
 * code * scale (NaN for the NaN code), bf16 results rounded to nearest even. A group holding a non-finite
 * value makes encode return 1 and the caller takes the general rule. Groups [g0, g1) only, so the caller can
 * split the work between threads. Built by adaprec.ckernel with -O3 -march=native -ffp-contract=off.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

int adaprec_int8_encode(const void *x, int bf16, int64_t n, int64_t group, int64_t g0, int64_t g1,
                        int8_t *codes, float *scales, float max_code, float cap, float tiny) {
    const float *xf = (const float *)x;
    const uint16_t *xh = (const uint16_t *)x;
    float buf[4096];
    for (int64_t g = g0; g < g1; g++) {
        int64_t lo = g * group, hi = lo + group < n ? lo + group : n;
        int64_t len = hi - lo;
        float amax = 0.0f;
        int bad = 0;
        for (int64_t s = 0; s < len; s += 4096) {
            int64_t m = len - s < 4096 ? len - s : 4096;
            if (bf16) {
                for (int64_t i = 0; i < m; i++) buf[i] = from_bf16(xh[lo + s + i]);
            } else {
                memcpy(buf, xf + lo + s, (size_t)m * sizeof(float));
            }
            for (int64_t i = 0; i < m; i++) {
                float a = fabsf(buf[i]);
                bad |= !(a <= 3.4028234663852886e38f);
                amax = a > amax ? a : amax;
            }
        }
        if (bad) return 1;
        float scale = 1.0f;
        if (amax > 0.0f) {
            scale = amax / max_code;
            scale = scale < tiny ? tiny : scale;
            scale = scale > cap ? cap : scale;
        }
        scales[g] = scale;
        for (int64_t i = lo; i < hi; i++) {
            float v = bf16 ? from_bf16(xh[i]) : xf[i];
            float y = nearbyintf(v / scale);
            y = y > max_code ? max_code : (y < -max_code ? -max_code : y);
            codes[i] = (int8_t)y;
        }
        for (int64_t i = hi; i < lo + group; i++) codes[i] = 0; /* the last block's padding */
    }
    return 0;
}

void adaprec_int8_decode(const int8_t *codes, const float *scales, int64_t n, int64_t group, int64_t g0,
                         int64_t g1, void *out, int bf16, int nan_code) {
    float *of = (float *)out;
    uint16_t *oh = (uint16_t *)out;
    for (int64_t g = g0; g < g1; g++) {
        int64_t lo = g * group, hi = lo + group < n ? lo + group : n;
        float s = scales[g];
        if (bf16) {
            for (int64_t i = lo; i < hi; i++) oh[i] = to_bf16(codes[i] == nan_code ? NAN : (float)codes[i] * s);
        } else {
            for (int64_t i = lo; i < hi; i++) of[i] = codes[i] == nan_code ? NAN : (float)codes[i] * s;
        }
    }
}
