/* One Adam/AdamW step over 8-bit moments, block by block, in one pass over memory.
 *
 * The first moment is kept as int8 codes of sign(m)*sqrt(|m|) with one fp32 scale per block, the second as
 * fp8 E4M3 codes of sqrt(v) with one fp32 scale per block (adaprec's "int8" optimizer state, see
 * adaprec/optim/narrow_state.py). Per block: decode both moments, update them and the parameter in fp32 in
 * the order of torch's single-tensor Adam, then encode the block again with a new scale. Nothing full-size
 * is allocated; a block's moments live on the stack. Built by adaprec/optim/fused_adam.py with the system C
 * compiler (no Python or torch headers) and called through ctypes, which releases the GIL: the caller splits
 * the blocks between threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_BLOCK 4096

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* fp32 -> fp8 E4M3 (finite-only variant: 0x7f/0xff is NaN, no inf), round to nearest even, as torch's CPU
   cast does: NaN gives the NaN code, and anything beyond the largest finite value (inf too) saturates to
   +-448; with inf_nan, inf gives the NaN code instead (adaprec's scaled E4M3 codes: a saturated inf would
   pass for a real value). Branch-free (every case computed, one kept), so the encode loop vectorises. */
static inline uint8_t to_e4m3(float f, int inf_nan) {
    const uint32_t sat = UINT32_C(0x43E80000);          /* 464.0f: from here up, 448 (ties to even) */
    const uint32_t denorm_mask = UINT32_C(141) << 23;  /* 2^14: its ulp is E4M3's subnormal step 2^-9 */
    uint32_t u = bits_of(f);
    const uint32_t sign = u & UINT32_C(0x80000000);
    u ^= sign;
    const uint32_t sub = bits_of(float_of(u) + float_of(denorm_mask)) - denorm_mask; /* below 2^-6 */
    const uint32_t nrm = (u + ((uint32_t)(7 - 127) << 23) + UINT32_C(0x7FFFF) + ((u >> 20) & 1u)) >> 20;
    uint32_t r = u < (UINT32_C(121) << 23) ? sub : nrm;
    r = u >= sat ? 0x7eu : r;
    r = u > (inf_nan ? UINT32_C(0x7F7FFFFF) : UINT32_C(0x7F800000)) ? 0x7fu : r;
    return (uint8_t)(r | (sign >> 24));
}

/* Blocks [blk0, blk1) of a tensor of n elements. Returns 0, or 1 when the block size is unsupported.
   Scalars as torch's Adam computes them (see narrow_state.adam_update_). */
int adaprec_adam_int8_blocks(
    float *p, const float *g, int8_t *mc, float *ms, uint8_t *vc, float *vs,
    int64_t n, int64_t block, int64_t blk0, int64_t blk1,
    float decay,        /* decoupled: 1 - lr*wd (1 when none) */
    float l2,           /* coupled weight decay (0 when none) */
    float w1,           /* 1 - beta1: lerp weight */
    float beta2, float one_minus_beta2, float bc2_sqrt, float eps, float neg_step_size,
    int maximize, float m_cap, float v_cap, float tiny) {
    float m[MAX_BLOCK], v[MAX_BLOCK];
    if (block <= 0 || block > MAX_BLOCK) return 1;
    const float gsign = maximize ? -1.0f : 1.0f;
    const int decoupled = decay != 1.0f, coupled = l2 != 0.0f, low = w1 < 0.5f;
    const float w1c = 1.0f - w1;
    for (int64_t b = blk0; b < blk1; ++b) {
        const int64_t a = b * block;
        const int64_t len = (n - a < block) ? (n - a) : block;
        float *restrict pb = p + a;
        const float *restrict gb = g + a;
        int8_t *restrict mcb = mc + a;
        uint8_t *restrict vcb = vc + a;
        const float sm = ms[b], sv = vs[b];
        for (int64_t i = 0; i < len; ++i) {
            float y = (float)mcb[i] * sm;
            y = mcb[i] == -128 ? NAN : y;
            float mi = y * fabsf(y);
            const uint32_t cv = vcb[i], ev = (cv >> 3) & 15u, mv = cv & 7u;  /* E4M3 decoded by hand */
            float z = ev ? float_of(((ev + 120u) << 23) | (mv << 20)) : (float)mv * 0x1p-9f;
            z = (cv & 0x7fu) == 0x7fu ? NAN : z;
            z = (cv & 0x80u) ? -z : z;
            z = z * sv;
            float vi = z * fabsf(z);
            float gi = gb[i] * gsign;
            float pi = pb[i];
            float pd = pi * decay;
            pi = decoupled ? pd : pi;
            float gl = gi + l2 * pi;
            gi = coupled ? gl : gi;
            float lo = mi + w1 * (gi - mi), hi = gi - (gi - mi) * w1c;
            mi = low ? lo : hi;
            vi = vi * beta2;
            vi = vi + one_minus_beta2 * gi * gi;
            const float rv = sqrtf(fabsf(vi));  /* one square root serves the update and the sqrt map */
            float denom = (vi < 0.0f ? NAN : rv) / bc2_sqrt + eps;  /* sqrt(vi), NaN below zero */
            pb[i] = pi + neg_step_size * (mi / denom);
            m[i] = copysignf(sqrtf(fabsf(mi)), mi);
            v[i] = copysignf(rv, vi);
        }
        /* absmax over the finite values, on the bit patterns (the order of non-negative floats; inf and NaN
           lie above 0x7f800000 - 1 and count as 0); the padding of a last, partial block holds zeros */
        uint32_t am = 0, av = 0;
        for (int64_t i = 0; i < len; ++i) {
            uint32_t a1 = bits_of(m[i]) & UINT32_C(0x7FFFFFFF);
            a1 &= -(uint32_t)(a1 < UINT32_C(0x7F800000));  /* masks, not selects: gcc 12 vectorises these */
            am = am < a1 ? a1 : am;
        }
        for (int64_t i = 0; i < len; ++i) {
            uint32_t a2 = bits_of(v[i]) & UINT32_C(0x7FFFFFFF);
            a2 &= -(uint32_t)(a2 < UINT32_C(0x7F800000));
            av = av < a2 ? a2 : av;
        }
        const float amf = float_of(am), avf = float_of(av);
        float scm = 1.0f, scv = 1.0f;
        if (amf > 0.0f) { scm = amf / 127.0f; scm = scm < tiny ? tiny : (scm > m_cap ? m_cap : scm); }
        if (avf > 0.0f) { scv = avf / 448.0f; scv = scv < tiny ? tiny : (scv > v_cap ? v_cap : scv); }
        for (int64_t i = 0; i < len; ++i) {
            float q = m[i] / scm;
            const uint32_t fin = (bits_of(q) & UINT32_C(0x7FFFFFFF)) < UINT32_C(0x7F800000);
            q = rintf(q);
            q = q < -127.0f ? -127.0f : q;
            q = q > 127.0f ? 127.0f : q;
            int32_t c = (int32_t)q;
            mcb[i] = (int8_t)(fin ? c : -128);  /* inf/NaN: the NaN code, as the eager rule */
        }
        for (int64_t i = 0; i < len; ++i) vcb[i] = to_e4m3(v[i] / scv, 1);
        ms[b] = scm;
        vs[b] = scv;
    }
    return 0;
}

/* The E4M3 cast alone, for tests against torch's own cast. */
void adaprec_to_e4m3(const float *x, uint8_t *out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = to_e4m3(x[i], 0);
}
