/* NVFP4 quantize-and-pack on the CPU: the steps of docs/nvfp4.md ("The computation"), over pieces of a row.
 *
 * Compiled at first use by nvfp4_cpu.py with -O3 -ffp-contract=off and no fast-math flags: every float operation
 * is the IEEE float32 operation of the definition, so the bytes equal nvfp4_ref's (tests/kernels/test_nvfp4_cpu.py).
 * Single-threaded; the caller runs chunks of rows on several threads (ctypes releases the GIL).
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

#define ROW_BUFFER 4096 /* elements of a row handled at a time (a multiple of 16) */
#define MAX_BLOCKS (ROW_BUFFER / BLOCK)

/* One piece of a row: k elements (k a multiple of 16, at most ROW_BUFFER) already in float32. Returns 1 if a block
 * holds NaN or Inf. Each loop runs over all blocks or over a fixed block of 16, so that the compiler vectorizes it. */
static int quantize_piece(const float *x, int64_t k, float g, float six_g, uint8_t *packed, uint8_t *scales) {
    const int64_t blocks = k / BLOCK;
    uint32_t amax_bits[MAX_BLOCKS];
    float divisor[MAX_BLOCKS];
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
    uint32_t worst = 0;
    for (int64_t b = 0; b < blocks; b++) worst = amax_bits[b] > worst ? amax_bits[b] : worst;
    if (worst >= 0x7F800000u) return 1;
    for (int64_t b = 0; b < blocks; b++) {
        float s = from_bits(amax_bits[b]) / six_g;               /* step 4 */
        s = s == 0.0f ? 1.0f : s;                                /* step 5 */
        s = s < 0x1p-9f ? 0x1p-9f : (s > 448.0f ? 448.0f : s);   /* step 6 */
        float s_q;
        scales[b] = e4m3_encode(s, &s_q);                        /* step 7 */
        divisor[b] = s_q * g;                                    /* step 8 */
    }
    for (int64_t b = 0; b < blocks; b++) {
        const float d = divisor[b];
        int32_t codes[BLOCK];
        for (int i = 0; i < BLOCK; i++) codes[i] = e2m1_code(x[b * BLOCK + i] / d); /* steps 9-11 */
        for (int i = 0; i < BLOCK / 2; i++) packed[b * BLOCK / 2 + i] = (uint8_t)(codes[2 * i] | (codes[2 * i + 1] << 4));
    }
    return 0;
}

/* x: rows x k elements of the given kind (0 float32, 1 bfloat16), row-major. packed: rows x k/2 bytes, scales:
 * rows x k/16 E4M3 bytes. Returns 1 if any element is NaN or Inf (the outputs are then unspecified), else 0. */
int nvfp4_quantize_pack(const void *x, int kind, int64_t rows, int64_t k, float g, uint8_t *packed,
                        uint8_t *scales) {
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
            nonfinite |= quantize_piece(xf, n, g, six_g, packed + r * (k / 2) + c0 / 2, scales + r * (k / BLOCK) + c0 / BLOCK);
        }
    }
    return nonfinite;
}
