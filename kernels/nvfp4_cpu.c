/* NVFP4 quantize-and-pack on the CPU: the steps of docs/nvfp4.md ("The computation"), over pieces of a row.
 *
 * Compiled at first use by nvfp4_cpu.py with -O3 -ffp-contract=off and no fast-math flags: every float operation
 * is the IEEE float32 operation of the definition, so the bytes equal nvfp4_ref's (tests/kernels/test_nvfp4_cpu.py).
 * nvfp4_fake_quantize is the quantize-decode of the same steps (nvfp4_ref.fake_quantize, divide arithmetic), for
 * quantization-aware training. Single-threaded; the caller runs chunks of rows on several threads (ctypes releases
 * the GIL).
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 16

static inline float from_bits(uint32_t b) {
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static inline uint32_t bits_of(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return b;
}

/* Step 7: float32 s in [2**-9, 448] -> its E4M3 byte, and *value = that byte's value as float32; round to nearest
 * even. Adding M = 2**(e + 20), e = max(floor(log2 s), -6), rounds s to a multiple of ulp(M) = 2**(e - 3): three
 * mantissa bits in the normal range, 2**-9 steps in the subnormal one; subtracting M back is exact. Branch-free, so
 * that a loop over blocks vectorizes. */
static inline uint8_t e4m3_encode(float s, float *value) {
    int32_t e = (int32_t)((bits_of(s) >> 23) & 0xFF) - 127;
    e = e < -6 ? -6 : e;
    float m = from_bits((uint32_t)(e + 20 + 127) << 23);
    float q = (s + m) - m;
    *value = q;
    uint32_t qb = bits_of(q);
    int32_t qe = (int32_t)((qb >> 23) & 0xFF) - 127;
    int32_t subnormal = (int32_t)(q * 512.0f); /* q = k * 2**-9, k = 1..7, when qe < -6 */
    int32_t normal = ((qe + 7) << 3) | (int32_t)((qb >> 20) & 7);
    return (uint8_t)(qe < -6 ? subnormal : normal);
}

/* Steps 10-11: code = (r < 0) << 3 | index, index = round half to even on the E2M1 grid (the bounds of
 * nvfp4_spec.ROUNDING_BOUNDS), saturating at 6; int32 lanes so that the loop vectorizes. */
static inline int32_t e2m1_code(float r) {
    float a = from_bits(bits_of(r) & 0x7FFFFFFFu);
    return (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f) +
           ((r < 0.0f) << 3);
}

/* The float32 value of a positive E4M3 byte (1..126): k * 2**-9 below 8, else 2**(e - 7) * (1 + m / 8). */
static inline float e4m3_value(int32_t byte) {
    float subnormal = (float)byte * 0x1p-9f;
    float normal = from_bits((uint32_t)(((byte >> 3) + 120) << 23) | (uint32_t)((byte & 7) << 20));
    return byte < 8 ? subnormal : normal;
}

/* Step 10's value with r's sign (that of r + 0.0, so -0.0 gives +0.0): each bound of e2m1_code that |r| passes adds
 * the step to the next grid value (0.5 up to 2, then 1, then 2); small exact sums, comparisons only, so it vectorizes. */
static inline float e2m1_value(float r) {
    float a = from_bits(bits_of(r) & 0x7FFFFFFFu);
    int32_t halves = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f);
    int32_t ones = (a > 2.5f) + (a >= 3.5f) + 2 * (a > 5.0f);
    float v = (float)halves * 0.5f + (float)ones;
    return from_bits(bits_of(v) | (bits_of(r + 0.0f) & 0x80000000u));
}

enum { RULE_AMAX, RULE_FOUR_OVER_SIX, RULE_MSE, RULE_MSE_ACT }; /* nvfp4_spec.SCALE_RULES, in order */

#define ROW_BUFFER 4096 /* elements of a row handled at a time (a multiple of 16) */
#define MAX_BLOCKS (ROW_BUFFER / BLOCK)

/* A searching rule's scale bytes for the blocks of a piece (all finite; docs/nvfp4.md, "Scale rules"). s: step 4's
 * float32 after step 5, byte: the amax rule's bytes, replaced in place. Candidate j of every block is scored in a few
 * passes over the blocks (so that the 16-element error vectorizes); a candidate replaces the best when its error is
 * smaller, or equal and it is the amax byte. Visiting bytes first..last in ascending order is the order pinned. */
static void search_scales(const float *x, const float *w, const float *s, float g, int rule, int64_t blocks,
                          uint8_t *byte) {
    int32_t amax_byte[MAX_BLOCKS], first[MAX_BLOCKS], last[MAX_BLOCKS], best[MAX_BLOCKS];
    float best_err[MAX_BLOCKS], err[MAX_BLOCKS], divisor[MAX_BLOCKS], t[ROW_BUFFER];
    /* 1.5, 2, 2 and 126: nvfp4_spec.FOUR_OVER_SIX_FACTOR, MSE_STEPS_BELOW, MSE_STEPS_ABOVE, E4M3_MAX_BYTE */
    for (int64_t b = 0; b < blocks; b++) {
        float s4 = s[b] * 1.5f, unused;
        s4 = s4 < 0x1p-9f ? 0x1p-9f : (s4 > 448.0f ? 448.0f : s4);
        int32_t four_byte = e4m3_encode(s4, &unused);
        amax_byte[b] = best[b] = byte[b];
        best_err[b] = __builtin_inff();
        first[b] = rule == RULE_FOUR_OVER_SIX ? byte[b] : (byte[b] - 2 < 1 ? 1 : byte[b] - 2);
        last[b] = rule == RULE_FOUR_OVER_SIX ? four_byte : (four_byte + 2 > 126 ? 126 : four_byte + 2);
    }
    int32_t candidates = 2; /* mse: the widest range of the piece (nvfp4_spec.MSE_MAX_CANDIDATES at most) */
    for (int64_t b = 0; rule != RULE_FOUR_OVER_SIX && b < blocks; b++) {
        int32_t n = last[b] - first[b] + 1;
        candidates = n > candidates ? n : candidates;
    }
    for (int j = 0; j < candidates; j++) {
        /* four-over-six: j = 0 is the amax byte, j = 1 the 1.5x byte; mse: byte first + j while <= last */
        for (int64_t b = 0; b < blocks; b++) {
            int32_t c = rule == RULE_FOUR_OVER_SIX ? (j ? last[b] : first[b]) : first[b] + j;
            divisor[b] = e4m3_value(c > 126 ? 126 : c) * g;
        }
        /* the block error (docs/nvfp4.md, "Scale rules"): [w *] (x - E2M1(x / d) * d)**2, summed by folding halves */
        for (int64_t b = 0; b < blocks; b++) {
            const float d = divisor[b];
            for (int i = 0; i < BLOCK; i++) {
                float e = x[b * BLOCK + i] - e2m1_value(x[b * BLOCK + i] / d) * d;
                t[b * BLOCK + i] = e * e;
            }
        }
        if (w)
            for (int64_t i = 0; i < blocks * BLOCK; i++) t[i] = t[i] * w[i];
        for (int64_t b = 0; b < blocks; b++) {
            float *tb = t + b * BLOCK;
            for (int i = 0; i < 8; i++) tb[i] = tb[i] + tb[i + 8];
            for (int i = 0; i < 4; i++) tb[i] = tb[i] + tb[i + 4];
            for (int i = 0; i < 2; i++) tb[i] = tb[i] + tb[i + 2];
            err[b] = tb[0] + tb[1];
        }
        for (int64_t b = 0; b < blocks; b++) {
            int32_t c = rule == RULE_FOUR_OVER_SIX ? (j ? last[b] : first[b]) : first[b] + j;
            int better = c <= last[b] && (err[b] < best_err[b] || (err[b] == best_err[b] && c == amax_byte[b]));
            best[b] = better ? c : best[b];
            best_err[b] = better ? err[b] : best_err[b];
        }
    }
    for (int64_t b = 0; b < blocks; b++) byte[b] = (uint8_t)best[b];
}

/* Steps 3-8 (and the searching rules) for the blocks of one piece of a row: k elements (k a multiple of 16, at most
 * ROW_BUFFER) already in float32 -> the E4M3 scale bytes and the divisors d = s * g. Returns 1 if a block holds NaN or
 * Inf; such a block is given the scale of an all-zero block (its outputs are the caller's to replace). Each loop runs
 * over all blocks or over a fixed block of 16, so that the compiler vectorizes it. */
static int piece_scales(const float *x, int64_t k, float g, float six_g, int rule, const float *w, uint8_t *scales,
                        float *divisor, uint32_t *amax_bits) {
    const int64_t blocks = k / BLOCK;
    float s[MAX_BLOCKS];
    /* Step 3 on the bits: for |x| (sign cleared) the integer order of the bits is the order of the values, and every
     * NaN or Inf lies above the largest finite bits. */
    for (int64_t b = 0; b < blocks; b++) {
        uint32_t m = 0;
        for (int i = 0; i < BLOCK; i++) {
            uint32_t a = bits_of(x[b * BLOCK + i]) & 0x7FFFFFFFu;
            m = a > m ? a : m;
        }
        amax_bits[b] = m;
    }
    int nonfinite = 0;
    for (int64_t b = 0; b < blocks; b++) nonfinite |= amax_bits[b] >= 0x7F800000u;
    for (int64_t b = 0; b < blocks; b++) {
        float sb = (amax_bits[b] >= 0x7F800000u ? 0.0f : from_bits(amax_bits[b])) / six_g; /* step 4 */
        s[b] = sb = sb == 0.0f ? 1.0f : sb;                                                /* step 5 */
        sb = sb < 0x1p-9f ? 0x1p-9f : (sb > 448.0f ? 448.0f : sb);                         /* step 6 */
        float s_q;
        scales[b] = e4m3_encode(sb, &s_q);                                                 /* step 7 */
        divisor[b] = s_q * g;                                                              /* step 8 */
    }
    if (rule != RULE_AMAX) { /* a non-finite block's errors are NaN: it keeps its byte */
        search_scales(x, w, s, g, rule, blocks, scales);
        for (int64_t b = 0; b < blocks; b++) divisor[b] = e4m3_value(scales[b]) * g;
    }
    return nonfinite;
}

/* One piece of a row, quantized and packed (steps 9-11). Returns 1 if a block holds NaN or Inf. */
static int quantize_piece(const float *x, int64_t k, float g, float six_g, int rule, const float *w, uint8_t *packed,
                          uint8_t *scales) {
    const int64_t blocks = k / BLOCK;
    uint32_t amax_bits[MAX_BLOCKS];
    float divisor[MAX_BLOCKS];
    if (piece_scales(x, k, g, six_g, rule, w, scales, divisor, amax_bits)) return 1;
    for (int64_t b = 0; b < blocks; b++) {
        const float d = divisor[b];
        int32_t codes[BLOCK];
        for (int i = 0; i < BLOCK; i++) codes[i] = e2m1_code(x[b * BLOCK + i] / d); /* steps 9-11 */
        for (int i = 0; i < BLOCK / 2; i++)
            packed[b * BLOCK / 2 + i] = (uint8_t)(codes[2 * i] | (codes[2 * i + 1] << 4));
    }
    return 0;
}

/* One piece of a row, quantized and decoded again: E2M1 value of x / d, times d (nvfp4_ref.fake_quantize); a block
 * holding NaN or Inf decodes to NaN, as its NaN scale makes it in the reference. */
static void fake_quantize_piece(const float *x, int64_t k, float g, float six_g, int rule, const float *w,
                                float *out) {
    const int64_t blocks = k / BLOCK;
    uint32_t amax_bits[MAX_BLOCKS];
    uint8_t scales[MAX_BLOCKS];
    float divisor[MAX_BLOCKS];
    int nonfinite = piece_scales(x, k, g, six_g, rule, w, scales, divisor, amax_bits);
    for (int64_t b = 0; b < blocks; b++) {
        const float d = divisor[b];
        for (int i = 0; i < BLOCK; i++) out[b * BLOCK + i] = e2m1_value(x[b * BLOCK + i] / d) * d;
    }
    if (nonfinite)
        for (int64_t b = 0; b < blocks; b++)
            if (amax_bits[b] >= 0x7F800000u)
                for (int i = 0; i < BLOCK; i++) out[b * BLOCK + i] = __builtin_nanf("");
}

/* x: rows x k elements of the given kind (0 float32, 1 bfloat16), row-major. rule: the index of the scale rule in
 * nvfp4_spec.SCALE_RULES; weights: k per-channel error weights for mse-act, else NULL. packed: rows x k/2 bytes,
 * scales: rows x k/16 E4M3 bytes. Returns 1 if any element is NaN or Inf (the outputs are then unspecified), else 0. */
int nvfp4_quantize_pack(const void *x, int kind, int64_t rows, int64_t k, float g, int rule, const float *weights,
                        uint8_t *packed, uint8_t *scales) {
    const float six_g = 6.0f * g;
    float buffer[ROW_BUFFER];
    int nonfinite = 0;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c0 = 0; c0 < k; c0 += ROW_BUFFER) {
            int64_t n = k - c0 < ROW_BUFFER ? k - c0 : ROW_BUFFER;
            const float *xf;
            if (kind == 1) {
                const uint16_t *src = (const uint16_t *)x + r * k + c0;
                for (int64_t i = 0; i < n; i++) buffer[i] = from_bits((uint32_t)src[i] << 16);
                xf = buffer;
            } else {
                xf = (const float *)x + r * k + c0;
            }
            nonfinite |= quantize_piece(xf, n, g, six_g, rule, weights ? weights + c0 : 0,
                                        packed + r * (k / 2) + c0 / 2, scales + r * (k / BLOCK) + c0 / BLOCK);
        }
    }
    return nonfinite;
}

/* x: rows x k float32 elements, row-major; g finite and positive. out: rows x k float32, the fake-quantized values
 * (NaN for a block holding NaN or Inf). rule and weights as in nvfp4_quantize_pack. */
void nvfp4_fake_quantize(const float *x, int64_t rows, int64_t k, float g, int rule, const float *weights,
                         float *out) {
    const float six_g = 6.0f * g;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c0 = 0; c0 < k; c0 += ROW_BUFFER) {
            int64_t n = k - c0 < ROW_BUFFER ? k - c0 : ROW_BUFFER;
            fake_quantize_piece(x + r * k + c0, n, g, six_g, rule, weights ? weights + c0 : 0, out + r * k + c0);
        }
}
