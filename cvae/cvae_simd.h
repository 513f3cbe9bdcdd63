/* Register-blocked GEMM micro-kernels and vectorisable elementwise helpers.
 *
 * Compiled three times (baseline x86-64, x86-64-v3, x86-64-v4) from the same source; the
 * vector width and tile height follow from the -march of each build. Cython cannot express
 * a tile of accumulators that gcc keeps in registers, so the innermost loops live here and
 * _kernels.pyx does the orchestration, the threading and everything per sample.
 *
 * One tile kernel serves all three GEMMs of a linear layer (activations are feature-major,
 * [features][batch], so the batch is the contiguous vector direction):
 *   forward  Yt[out][b]  = W[out][in]  . Xt[in][b]     A = W   (sai = ldw, sak = 1)
 *   dX       dXt[in][b]  = W^T         . dYt[out][b]   A = W^T (sai = 1,   sak = ldw)
 *   dW       dW[out][in] = dYt[out][b] . X[b][in]      A = dYt (sai = ldb, sak = 1)
 * C[i][j] = sum_k A[i*sai + k*sak] * B[k*ldb + j]: A is broadcast, B is loaded as vectors.
 */
#ifndef CVAE_SIMD_H
#define CVAE_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define CVAE_VW 16
#define CVAE_MR 14
#define CVAE_ISA "x86-64-v4"
#elif defined(__AVX2__) && defined(__FMA__)
#define CVAE_VW 8
#define CVAE_MR 6
#define CVAE_ISA "x86-64-v3"
#else
#define CVAE_VW 4
#define CVAE_MR 6
#define CVAE_ISA "baseline"
#endif
#define CVAE_NV 2                      /* vectors per tile row */
#define CVAE_NR (CVAE_NV * CVAE_VW)    /* tile width in floats */

typedef float cvae_vf __attribute__((vector_size(CVAE_VW * 4), aligned(4), may_alias));

/* Splat a float read from memory. Written as an initializer, not (vf){0} + x: gcc may not
 * fold x + 0 (it changes -0), and a register splat costs a shuffle on the FMA port. */
#if CVAE_VW == 16
#define CVAE_SPLAT(x) ((cvae_vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x})
#elif CVAE_VW == 8
#define CVAE_SPLAT(x) ((cvae_vf){x, x, x, x, x, x, x, x})
#else
#define CVAE_SPLAT(x) ((cvae_vf){x, x, x, x})
#endif

/* Literal MR and NV: with sizes known at compile time gcc keeps acc[][] in registers. */
#define CVAE_TILE(MRV, NVV)                                                                   \
    static void cvae_tile_##MRV##x##NVV(int K, const float *A, long sai, long sak,           \
                                         const float *B, long ldb, float *C, long ldc,         \
                                         int accumulate) {                                     \
        cvae_vf acc[MRV][NVV];                                                                \
        for (int i = 0; i < MRV; i++)                                                         \
            for (int j = 0; j < NVV; j++)                                                     \
                acc[i][j] = accumulate ? *(const cvae_vf *)(C + i * ldc + j * CVAE_VW)        \
                                       : (cvae_vf){0};                                        \
        for (int k = 0; k < K; k++) {                                                         \
            const float *bk = B + (long)k * ldb;                                              \
            const float *ak = A + (long)k * sak;                                              \
            cvae_vf b[NVV];                                                                   \
            for (int j = 0; j < NVV; j++) b[j] = *(const cvae_vf *)(bk + j * CVAE_VW);        \
            for (int i = 0; i < MRV; i++) {                                                   \
                cvae_vf a = CVAE_SPLAT(ak[i * sai]);                                       \
                for (int j = 0; j < NVV; j++) acc[i][j] += a * b[j];                          \
            }                                                                                 \
        }                                                                                     \
        for (int i = 0; i < MRV; i++)                                                         \
            for (int j = 0; j < NVV; j++) *(cvae_vf *)(C + i * ldc + j * CVAE_VW) = acc[i][j]; \
    }

#define CVAE_TILE_ROWS(MRV) CVAE_TILE(MRV, 1) CVAE_TILE(MRV, 2)
CVAE_TILE_ROWS(1) CVAE_TILE_ROWS(2) CVAE_TILE_ROWS(3) CVAE_TILE_ROWS(4) CVAE_TILE_ROWS(5)
CVAE_TILE_ROWS(6)
#if CVAE_MR > 6
CVAE_TILE_ROWS(7) CVAE_TILE_ROWS(8) CVAE_TILE_ROWS(9) CVAE_TILE_ROWS(10) CVAE_TILE_ROWS(11)
CVAE_TILE_ROWS(12) CVAE_TILE_ROWS(13) CVAE_TILE_ROWS(14)
#endif

typedef void (*cvae_tile_fn)(int, const float *, long, long, const float *, long, float *, long,
                             int);

static const cvae_tile_fn cvae_tiles[CVAE_MR][CVAE_NV] = {
    {cvae_tile_1x1, cvae_tile_1x2}, {cvae_tile_2x1, cvae_tile_2x2}, {cvae_tile_3x1, cvae_tile_3x2},
    {cvae_tile_4x1, cvae_tile_4x2}, {cvae_tile_5x1, cvae_tile_5x2}, {cvae_tile_6x1, cvae_tile_6x2},
#if CVAE_MR > 6
    {cvae_tile_7x1, cvae_tile_7x2}, {cvae_tile_8x1, cvae_tile_8x2}, {cvae_tile_9x1, cvae_tile_9x2},
    {cvae_tile_10x1, cvae_tile_10x2}, {cvae_tile_11x1, cvae_tile_11x2},
    {cvae_tile_12x1, cvae_tile_12x2}, {cvae_tile_13x1, cvae_tile_13x2},
    {cvae_tile_14x1, cvae_tile_14x2},
#endif
};

/* C[mr][nv*VW] = A . B, for 1 <= mr <= CVAE_MR and 1 <= nv <= CVAE_NV. */
static inline void cvae_tile(int mr, int nv, int K, const float *A, long sai, long sak,
                             const float *B, long ldb, float *C, long ldc) {
    cvae_tiles[mr - 1][nv - 1](K, A, sai, sak, B, ldb, C, ldc, 0);
}

/* dX = dY . W is computed batch-major, [batch][in], as tiles of DX_MR samples by up to
 * 3 vectors of W's row: W is read along its rows, unpacked, and a block of DX_KB rows of it
 * stays in L1 while all the batch's tiles use it (broadcasting from W instead read each
 * tile's column of W anew from L2 and ran at about 60% of the forward's speed). */
#if CVAE_VW == 16
#define CVAE_DX_MR 8
CVAE_TILE(8, 3)
static const cvae_tile_fn cvae_dx_tiles[3] = {cvae_tile_8x1, cvae_tile_8x2, cvae_tile_8x3};
#else
#define CVAE_DX_MR 4
CVAE_TILE(4, 3)
static const cvae_tile_fn cvae_dx_tiles[3] = {cvae_tile_4x1, cvae_tile_4x2, cvae_tile_4x3};
#endif
#define CVAE_DX_NV 3
#define CVAE_DX_NR (CVAE_DX_NV * CVAE_VW)
#define CVAE_DX_KB 128

/* C[DX_MR][nv*VW] (+)= A . B for 1 <= nv <= 3. */
static inline void cvae_dx_tile(int nv, int K, const float *A, long sai, long sak,
                                const float *B, long ldb, float *C, long ldc, int accumulate) {
    cvae_dx_tiles[nv - 1](K, A, sai, sak, B, ldb, C, ldc, accumulate);
}

/* ---- bf16 GEMMs: inputs rounded to bf16, products accumulated in fp32 ----
 *
 * Operands are packed as pairs along K: one uint32 holds (x[k] low half, x[k+1] high half),
 * the layout of AVX512_BF16's vdpbf16ps, which adds both products of a pair into an fp32 lane.
 * C[i][j] = sum_kp A2[i*sai + kp*sak] . B2[kp*ldb + j] where A2, B2 are arrays of pairs: A's
 * pair is broadcast, B is loaded as vectors of pairs. Built with -mavx512bf16 the tile is
 * vdpbf16ps; every other build runs the same packed data through fp32 FMAs (each product of
 * two bf16 values is exact in fp32; the odd element is added first, as the SDM describes
 * vdpbf16ps), so bf16 runs, checkpoints and tests work on any CPU, only slower. */
#define CVAE_BMR 6
#if CVAE_VW == 16
#define CVAE_BNV 4
#else
#define CVAE_BNV 2
#endif
#define CVAE_BNR (CVAE_BNV * CVAE_VW)
#define CVAE_BKB 64 /* dX: pairs of W's rows per block kept in L1 */

typedef uint32_t cvae_vu __attribute__((vector_size(CVAE_VW * 4), aligned(4), may_alias));

#if defined(__AVX512BF16__) && CVAE_VW == 16
#include <immintrin.h>
#define CVAE_BF16_NATIVE 1
#define CVAE_BF_TILE(MRV, NVV)                                                               \
    static void cvae_bf_tile_##MRV##x##NVV(int KP, const uint32_t *A, long sai, long sak,     \
                                            const uint32_t *B, long ldb, float *C, long ldc,  \
                                            int accumulate) {                                 \
        __m512 acc[MRV][NVV];                                                                \
        for (int i = 0; i < MRV; i++)                                                        \
            for (int j = 0; j < NVV; j++)                                                    \
                acc[i][j] = accumulate ? _mm512_loadu_ps(C + i * ldc + j * 16)               \
                                       : _mm512_setzero_ps();                                \
        for (int k = 0; k < KP; k++) {                                                       \
            const uint32_t *bk = B + (long)k * ldb;                                          \
            const uint32_t *ak = A + (long)k * sak;                                          \
            __m512bh b[NVV];                                                                 \
            for (int j = 0; j < NVV; j++)                                                    \
                b[j] = (__m512bh)_mm512_loadu_si512((const void *)(bk + j * 16));            \
            for (int i = 0; i < MRV; i++) {                                                  \
                __m512bh a = (__m512bh)_mm512_set1_epi32((int)ak[i * sai]);                  \
                for (int j = 0; j < NVV; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]); \
            }                                                                                \
        }                                                                                    \
        for (int i = 0; i < MRV; i++)                                                        \
            for (int j = 0; j < NVV; j++) _mm512_storeu_ps(C + i * ldc + j * 16, acc[i][j]);  \
    }
#else
#define CVAE_BF16_NATIVE 0
/* A pair's low element as a float is its bits shifted up; the high one is its bits masked. */
#define CVAE_BF_TILE(MRV, NVV)                                                               \
    static void cvae_bf_tile_##MRV##x##NVV(int KP, const uint32_t *A, long sai, long sak,     \
                                            const uint32_t *B, long ldb, float *C, long ldc,  \
                                            int accumulate) {                                 \
        cvae_vf acc[MRV][NVV];                                                               \
        for (int i = 0; i < MRV; i++)                                                        \
            for (int j = 0; j < NVV; j++)                                                    \
                acc[i][j] = accumulate ? *(const cvae_vf *)(C + i * ldc + j * CVAE_VW)       \
                                       : (cvae_vf){0};                                       \
        for (int k = 0; k < KP; k++) {                                                       \
            const uint32_t *bk = B + (long)k * ldb;                                          \
            const uint32_t *ak = A + (long)k * sak;                                          \
            cvae_vf blo[NVV], bhi[NVV];                                                      \
            for (int j = 0; j < NVV; j++) {                                                  \
                cvae_vu v = *(const cvae_vu *)(bk + j * CVAE_VW);                            \
                cvae_vu lo = v << 16, hi = v & 0xFFFF0000u;                                  \
                memcpy(&blo[j], &lo, sizeof lo);                                             \
                memcpy(&bhi[j], &hi, sizeof hi);                                             \
            }                                                                                \
            for (int i = 0; i < MRV; i++) {                                                  \
                uint32_t p = ak[i * sai], plo = p << 16, phi = p & 0xFFFF0000u;              \
                float flo, fhi;                                                              \
                memcpy(&flo, &plo, 4);                                                       \
                memcpy(&fhi, &phi, 4);                                                       \
                cvae_vf alo = CVAE_SPLAT(flo), ahi = CVAE_SPLAT(fhi);                        \
                for (int j = 0; j < NVV; j++) {                                              \
                    acc[i][j] += ahi * bhi[j];                                               \
                    acc[i][j] += alo * blo[j];                                               \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        for (int i = 0; i < MRV; i++)                                                        \
            for (int j = 0; j < NVV; j++) *(cvae_vf *)(C + i * ldc + j * CVAE_VW) = acc[i][j]; \
    }
#endif

#if CVAE_BNV == 4
#define CVAE_BF_TILE_ROWS(MRV) CVAE_BF_TILE(MRV, 1) CVAE_BF_TILE(MRV, 2) CVAE_BF_TILE(MRV, 3) \
    CVAE_BF_TILE(MRV, 4)
#define CVAE_BF_ROW(MRV) {cvae_bf_tile_##MRV##x1, cvae_bf_tile_##MRV##x2, \
    cvae_bf_tile_##MRV##x3, cvae_bf_tile_##MRV##x4}
#else
#define CVAE_BF_TILE_ROWS(MRV) CVAE_BF_TILE(MRV, 1) CVAE_BF_TILE(MRV, 2)
#define CVAE_BF_ROW(MRV) {cvae_bf_tile_##MRV##x1, cvae_bf_tile_##MRV##x2}
#endif
CVAE_BF_TILE_ROWS(1) CVAE_BF_TILE_ROWS(2) CVAE_BF_TILE_ROWS(3) CVAE_BF_TILE_ROWS(4)
CVAE_BF_TILE_ROWS(5) CVAE_BF_TILE_ROWS(6)

typedef void (*cvae_bf_tile_fn)(int, const uint32_t *, long, long, const uint32_t *, long,
                                float *, long, int);
static const cvae_bf_tile_fn cvae_bf_tiles[CVAE_BMR][CVAE_BNV] = {
    CVAE_BF_ROW(1), CVAE_BF_ROW(2), CVAE_BF_ROW(3), CVAE_BF_ROW(4), CVAE_BF_ROW(5),
    CVAE_BF_ROW(6)};

/* C[mr][nv*VW] (+)= A . B over KP pairs, 1 <= mr <= CVAE_BMR, 1 <= nv <= CVAE_BNV. */
static inline void cvae_bf_tile(int mr, int nv, int KP, const uint32_t *A, long sai, long sak,
                                const uint32_t *B, long ldb, float *C, long ldc,
                                int accumulate) {
    cvae_bf_tiles[mr - 1][nv - 1](KP, A, sai, sak, B, ldb, C, ldc, accumulate);
}

/* fp32 -> bf16, round to nearest even, exactly as VCVTNEPS2BF16 (Intel SDM): denormals
 * become signed zeros, NaNs stay quiet NaNs. Integer arithmetic, so every build (native or
 * not) rounds identically and gcc vectorises the packing loops. */
static inline uint16_t cvae_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    uint32_t mag = u & 0x7FFFFFFFu;
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    uint32_t zero = (u >> 16) & 0x8000u;
    r = mag > 0x7F800000u ? nan : r;
    r = mag < 0x00800000u ? zero : r;
    return (uint16_t)r;
}

/* Pairs along rows: P[kp][j] = (X[2kp][j], X[2kp+1][j]) for kp < ceil(rows / 2), j < n;
 * the row past an odd count is zero (it meets a zero in the other operand, never garbage). */
static inline void cvae_pack_row_pair(const float *__restrict x0, const float *__restrict x1,
                                      uint32_t *__restrict p, int n) {
    if (x1) {
        for (int j = 0; j < n; j++)
            p[j] = (uint32_t)cvae_bf16(x0[j]) | ((uint32_t)cvae_bf16(x1[j]) << 16);
    } else {
        for (int j = 0; j < n; j++) p[j] = (uint32_t)cvae_bf16(x0[j]);
    }
}

/* One row of n floats to bf16, columns from `valid` on set to zero. */
static inline void cvae_pack_row(const float *__restrict x, uint16_t *__restrict h, int n,
                                 int valid) {
    for (int j = 0; j < n; j++) h[j] = j < valid ? cvae_bf16(x[j]) : 0;
}

/* ---- elementwise math, written so that gcc vectorises the loops that call it ---- */

/* exp(x) to about 2 ulp: 2^n * p(r) with r in [-ln2/2, ln2/2]. */
static inline float cvae_expf(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* log(1 + t) for t in [0, 1]: 2 atanh(s) with s = t / (2 + t) <= 1/3. */
static inline float cvae_log1p_unit(float t) {
    float s = t / (2.0f + t);
    float s2 = s * s;
    float p = 1.0f / 15.0f;
    p = p * s2 + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

enum { CVAE_ACT_NONE = 0, CVAE_ACT_ELU = 1, CVAE_ACT_RELU = 2 };

/* y = act(c + bias) over one row of n floats. */
static inline void cvae_bias_act_row(float *c, int n, float bias, int act) {
    if (act == CVAE_ACT_ELU) {
        for (int j = 0; j < n; j++) {
            float x = c[j] + bias;
            float e = cvae_expf(x < 0.0f ? x : 0.0f) - 1.0f;
            c[j] = x > 0.0f ? x : e;
        }
    } else if (act == CVAE_ACT_RELU) {
        for (int j = 0; j < n; j++) {
            float x = c[j] + bias;
            c[j] = x > 0.0f ? x : 0.0f;
        }
    } else {
        for (int j = 0; j < n; j++) c[j] += bias;
    }
}

/* y = a·y + b·x over one row of n floats: residual sums, ODE steps, guidance. The
   __restrict lets gcc vectorise it (written inline in a prange, it stayed scalar). */
static inline void cvae_axpby_row(float *__restrict y, float a, const float *__restrict x,
                                  float b, int n) {
    for (int j = 0; j < n; j++) y[j] = a * y[j] + b * x[j];
}

/* c[j] += bias[cls[j]] over a row of n floats: each column's bias picked by its class (the
   flow prior's conditioning while sampling, see FlowNet._class_tables). */
static inline void cvae_class_bias_row(float *__restrict c, int n, const float *__restrict bias,
                                       int n_cls, const uint8_t *__restrict cls) {
    int j = 0;
#if defined(__AVX512F__)
    /* Up to 16 classes fit one register: a permute picks 16 columns' biases at once, where
       the loop below gathers them one by one (twice the epilogue's time in the flow). */
    if (n_cls <= 16) {
        __m512 table = _mm512_maskz_loadu_ps((__mmask16)((1u << n_cls) - 1), bias);
        for (; j + 16 <= n; j += 16) {
            __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(cls + j)));
            _mm512_storeu_ps(c + j, _mm512_add_ps(_mm512_loadu_ps(c + j),
                                                  _mm512_permutexvar_ps(idx, table)));
        }
    }
#endif
    for (; j < n; j++) c[j] += bias[cls[j]];
}

/* dy *= act'(pre-activation), written in terms of the activation's output y. */
static inline void cvae_act_grad_row(float *dy, const float *y, int n, int act) {
    if (act == CVAE_ACT_ELU) {
        for (int j = 0; j < n; j++) dy[j] *= y[j] > 0.0f ? 1.0f : y[j] + 1.0f;
    } else if (act == CVAE_ACT_RELU) {
        for (int j = 0; j < n; j++) dy[j] = y[j] > 0.0f ? dy[j] : 0.0f;
    }
}

/* Non-finite (inf or NaN) floats counted by their exponent bits: vectorises, costs nothing
 * next to Adam's memory traffic. */
static inline int cvae_nonfinite(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (u & 0x7F800000u) == 0x7F800000u;
}

/* Adam (PyTorch's form) over n contiguous parameters with their gradient g. Returns how many
 * gradients or updated parameters are not finite (the trainers stop on the first). */
static inline int cvae_adam_row(float *w, float *m, float *v, const float *g, int n,
                                float step_size, float inv_bc2_sqrt) {
    int bad = 0;
    for (int j = 0; j < n; j++) {
        float mj = 0.9f * m[j] + 0.1f * g[j];
        float vj = 0.999f * v[j] + 0.001f * g[j] * g[j];
        m[j] = mj;
        v[j] = vj;
        float wj = w[j] - step_size * mj / (sqrtf(vj) * inv_bc2_sqrt + 1e-8f);
        w[j] = wj;
        bad += cvae_nonfinite(wj) | cvae_nonfinite(g[j]);
    }
    return bad;
}

/* cvae_adam_row that also writes the new weights rounded to bf16 into wh while the row is in
 * cache (restrict: without it gcc does not vectorise the loop). */
static inline int cvae_adam_row_bf16(float *__restrict w, float *__restrict m,
                                     float *__restrict v, const float *__restrict g, int n,
                                     float step_size, float inv_bc2_sqrt,
                                     uint16_t *__restrict wh) {
    int bad = 0;
    for (int j = 0; j < n; j++) {
        float mj = 0.9f * m[j] + 0.1f * g[j];
        float vj = 0.999f * v[j] + 0.001f * g[j] * g[j];
        m[j] = mj;
        v[j] = vj;
        float wj = w[j] - step_size * mj / (sqrtf(vj) * inv_bc2_sqrt + 1e-8f);
        w[j] = wj;
        wh[j] = cvae_bf16(wj);
        bad += cvae_nonfinite(wj) | cvae_nonfinite(g[j]);
    }
    return bad;
}

/* Adam on two rows of W (w1 NULL: an odd last row, paired with zeros) that also writes both
 * rows' bf16 copies: wh0, wh1 and their pairs wp[j] = (wh0[j], wh1[j]), in one pass while the
 * rows are in cache (a second pass re-reading wh cost a tenth of the step). wp NULL: a layer
 * without dX, whose pairs nothing reads. */
static inline int cvae_adam_pair_bf16(float *__restrict w0, float *__restrict m0,
                                      float *__restrict v0, const float *__restrict g0,
                                      float *__restrict w1, float *__restrict m1,
                                      float *__restrict v1, const float *__restrict g1, int n,
                                      float step_size, float inv_bc2_sqrt,
                                      uint16_t *__restrict wh0, uint16_t *__restrict wh1,
                                      uint32_t *__restrict wp) {
    int bad = 0;
    if (!w1 || !wp) {
        bad = cvae_adam_row_bf16(w0, m0, v0, g0, n, step_size, inv_bc2_sqrt, wh0);
        if (w1)
            bad += cvae_adam_row_bf16(w1, m1, v1, g1, n, step_size, inv_bc2_sqrt, wh1);
        else if (wp)
            for (int j = 0; j < n; j++) wp[j] = wh0[j];
        return bad;
    }
    for (int j = 0; j < n; j++) {
        float ma = 0.9f * m0[j] + 0.1f * g0[j];
        float va = 0.999f * v0[j] + 0.001f * g0[j] * g0[j];
        m0[j] = ma;
        v0[j] = va;
        float wa = w0[j] - step_size * ma / (sqrtf(va) * inv_bc2_sqrt + 1e-8f);
        w0[j] = wa;
        float mb = 0.9f * m1[j] + 0.1f * g1[j];
        float vb = 0.999f * v1[j] + 0.001f * g1[j] * g1[j];
        m1[j] = mb;
        v1[j] = vb;
        float wb = w1[j] - step_size * mb / (sqrtf(vb) * inv_bc2_sqrt + 1e-8f);
        w1[j] = wb;
        uint16_t ha = cvae_bf16(wa), hb = cvae_bf16(wb);
        wh0[j] = ha;
        wh1[j] = hb;
        wp[j] = (uint32_t)ha | ((uint32_t)hb << 16);
        bad += cvae_nonfinite(wa) | cvae_nonfinite(g0[j]) | cvae_nonfinite(wb) |
               cvae_nonfinite(g1[j]);
    }
    return bad;
}

/* Prefetch part `part` of `parts` of the cache lines of rows [0, rows) of n floats (stride ld)
 * of W, m and v: the bf16 dW task spreads them over its compute-bound tiles, so that the
 * memory-bound fused Adam that follows finds its rows in cache. The division per line looks
 * like waste but is not: the same loop stepping a row and chunk counter instead was slower
 * (`cvae bench --variant full --precision bf16`, 6 alternating rounds: 21k against 25.5k
 * img/s on 1 thread, 42k against 47k on 2), as was no prefetch at all (21k against 23.6k on
 * 1 thread); likely, issued that fast, the prefetches crowd the tiles' own loads. */
static inline void cvae_prefetch_rows(const float *w, const float *m, const float *v, long ld,
                                      int rows, int n, int part, int parts) {
    int per_row = (n + 15) / 16;
    long total = (long)rows * per_row;
    long a = total * part / parts, b = total * (part + 1) / parts;
    for (long c = a; c < b; c++) {
        long off = (c / per_row) * ld + (c % per_row) * 16;
        __builtin_prefetch(w + off, 1, 2);
        __builtin_prefetch(m + off, 1, 2);
        __builtin_prefetch(v + off, 1, 2);
    }
}

/* A block of 4-byte elements transposed: dst[j * ldd + i] = src[i * lds + j] for i < rows,
 * j < cols (both at most 16; strides in elements). A whole 16 x 16 block on AVX-512 is 16 row
 * loads, four rounds of 16 shuffles and 16 row stores; element by element, the same block is
 * 256 scalar loads and stores, most of them to a different cache line each (what the dX and
 * dW packing loops did before, 4-6% of a 2-thread bf16 step of `full`). */
typedef uint32_t cvae_u32a __attribute__((may_alias));

static inline void cvae_transpose16(const void *src, long lds, void *dst, long ldd, int rows,
                                    int cols) {
#if CVAE_VW == 16
    if (rows == 16 && cols == 16) {
        const cvae_u32a *s = (const cvae_u32a *)src;
        cvae_u32a *d = (cvae_u32a *)dst;
        __m512i r[16], t[16];
        for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const void *)(s + i * lds));
        /* pairs of rows interleaved by elements, then by element pairs: each 128-bit lane of
         * r[4g + c] holds column (4 lane + c)'s 4 elements of rows 4g .. 4g + 3 */
        for (int i = 0; i < 16; i += 2) {
            t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
        }
        for (int i = 0; i < 16; i += 4) {
            r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
            r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
            r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
            r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
        }
        /* then the 128-bit lanes: two rounds of shuffles gather a column's four groups */
        for (int c = 0; c < 4; c++) {
            t[c] = _mm512_shuffle_i32x4(r[c], r[c + 4], 0x88);
            t[c + 4] = _mm512_shuffle_i32x4(r[c], r[c + 4], 0xdd);
            t[c + 8] = _mm512_shuffle_i32x4(r[c + 8], r[c + 12], 0x88);
            t[c + 12] = _mm512_shuffle_i32x4(r[c + 8], r[c + 12], 0xdd);
        }
        for (int c = 0; c < 8; c++) {
            r[c] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0x88);
            r[c + 8] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0xdd);
        }
        for (int j = 0; j < 16; j++) _mm512_storeu_si512((void *)(d + j * ldd), r[j]);
        return;
    }
#endif
    const cvae_u32a *s = (const cvae_u32a *)src;
    cvae_u32a *d = (cvae_u32a *)dst;
    for (int j = 0; j < cols; j++)
        for (int i = 0; i < rows; i++) d[j * ldd + i] = s[i * lds + j];
}

/* dW's B operand from 16 feature rows of X (feature-major, rows ldx apart): the rows as pairs
 * of samples, transposed: p[q * ld + r] = (x[r][2q], x[r][2q + 1]) for q < bp / 2, r < 16.
 * Rows from `rows` on and samples from `valid` on are zero. 32 samples at a time go to bf16
 * in a vector loop, then a 16 x 16 transpose of their pairs stores whole rows of P. */
static inline void cvae_pack_col_pairs16(const float *x, long ldx, int rows, int bp, int valid,
                                         uint32_t *p, long ld) {
    uint16_t t[16][32] __attribute__((aligned(64)));
    for (int c = 0; c < bp; c += 32) {
        int n = bp - c < 32 ? bp - c : 32; /* bp is a multiple of 16: 16 or 32 */
        for (int r = 0; r < 16; r++) {
            if (r < rows)
                cvae_pack_row(x + r * ldx + c, t[r], n, valid - c);
            else
                memset(t[r], 0, sizeof t[r]);
        }
        cvae_transpose16(t, 16, p + (long)(c / 2) * ld, ld, 16, n / 2);
    }
}

/* Sum of a row of n floats in 16 interleaved partial sums, added up in a fixed order: the same
 * result on every build and thread count, and no chain of n dependent adds (the bf16 path's
 * bias gradients; fp32 keeps its sequential sum). */
static inline float cvae_row_sum(const float *x, int n) {
    float part[16] = {0};
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) part[l] += x[j + l];
    for (int l = 0; j + l < n; l++) part[l] += x[j + l];
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) part[l] += part[l + w];
    return part[0];
}

/* One row of W rounded to bf16 (after initialisation or loading). */
static inline void cvae_bf16_row(const float *__restrict w, int n, uint16_t *__restrict wh) {
    for (int j = 0; j < n; j++) wh[j] = cvae_bf16(w[j]);
}

/* Pairs of two bf16 rows: p[j] = (h0[j], h1[j]); h1 NULL (an odd last row) pairs with 0. */
static inline void cvae_interleave_rows(const uint16_t *__restrict h0,
                                        const uint16_t *__restrict h1, uint32_t *__restrict p,
                                        int n) {
    if (h1) {
        for (int j = 0; j < n; j++) p[j] = (uint32_t)h0[j] | ((uint32_t)h1[j] << 16);
    } else {
        for (int j = 0; j < n; j++) p[j] = (uint32_t)h0[j];
    }
}



/* im2col in bf16 for two taps (kx, kx + 1) at one output position: x0, x1 the input pixels'
 * n batch values (NULL: padding, zeros) as two col rows in bf16, h0 and h1, and their pairs p
 * (see im2col_bf16 in _kernels.pyx). */
static inline void cvae_im2col_pair_bf16(const float *x0, const float *x1, uint16_t *h0,
                                         uint16_t *h1, uint32_t *p, int n) {
    if (x0)
        cvae_pack_row(x0, h0, n, n);
    else
        memset(h0, 0, (size_t)n * sizeof *h0);
    if (x1)
        cvae_pack_row(x1, h1, n, n);
    else
        memset(h1, 0, (size_t)n * sizeof *h1);
    cvae_interleave_rows(h0, h1, p, n);
}
/* Stable BCE-with-logits over one strip of n columns of a pixel row: rec[j] += loss,
 * dlogit[j] = (sigmoid(l) - x) * scale.  t = exp(-|l|) serves both the loss and the sigmoid. */
static inline void cvae_bce_row(const float *logit, const float *x, float *dlogit, float *rec,
                                int n, float scale) {
    for (int j = 0; j < n; j++) {
        float l = logit[j];
        float t = cvae_expf(-fabsf(l));
        float inv = 1.0f / (1.0f + t);
        float sig = l >= 0.0f ? inv : t * inv;
        rec[j] += (l > 0.0f ? l : 0.0f) - l * x[j] + cvae_log1p_unit(t);
        dlogit[j] = (sig - x[j]) * scale;
    }
}

/* Probabilities sigmoid(l) for image output. */
static inline void cvae_sigmoid_row(const float *logit, float *p, int n) {
    for (int j = 0; j < n; j++) {
        float l = logit[j];
        float t = cvae_expf(-fabsf(l));
        float inv = 1.0f / (1.0f + t);
        p[j] = l >= 0.0f ? inv : t * inv;
    }
}

/* ---- the reparameterisation, 16 samples (one vector on AVX-512) at a time ----
 * O = [mu ; logvar] and eps, Z, dZ, dO are feature-major rows ld apart, all pointers at the
 * strip's first column; columns from `valid` on get zeros. Rows outer, samples inner: the
 * loops vectorise (a sample at a time, walking down its column with libm's expf, did not). */

/* z = mu + eps * exp(logvar / 2); kl[j] = KL(q || N(0, I)) of sample j. */
static inline void cvae_reparam_strip(const float *O, const float *eps, float *Z, float *kl,
                                      int latent, long ld, int valid) {
    float s[16] = {0};
    for (int l = 0; l < latent; l++) {
        const float *mu = O + l * ld, *logvar = O + (latent + l) * ld;
        for (int j = 0; j < 16; j++) {
            float sd = cvae_expf(0.5f * logvar[j]);
            Z[l * ld + j] = j < valid ? mu[j] + eps[l * ld + j] * sd : 0.0f;
            s[j] += 1.0f + logvar[j] - mu[j] * mu[j] - sd * sd;
        }
    }
    for (int j = 0; j < 16; j++) kl[j] = j < valid ? -0.5f * s[j] : 0.0f;
}

/* dmu, dlogvar from dz and from kl_scale * KL (kl_scale = beta / batch). */
static inline void cvae_reparam_backward_strip(const float *O, const float *eps, const float *dZ,
                                               float *dO, int latent, long ld, int valid,
                                               float kl_scale) {
    for (int l = 0; l < latent; l++) {
        const float *mu = O + l * ld, *logvar = O + (latent + l) * ld;
        for (int j = 0; j < 16; j++) {
            float sd = cvae_expf(0.5f * logvar[j]);
            float dz = dZ[l * ld + j];
            float dmu = dz + kl_scale * mu[j];
            float dlogvar = dz * eps[l * ld + j] * 0.5f * sd + kl_scale * 0.5f * (sd * sd - 1.0f);
            dO[l * ld + j] = j < valid ? dmu : 0.0f;
            dO[(latent + l) * ld + j] = j < valid ? dlogvar : 0.0f;
        }
    }
}

/* ---- counter-based Gaussian noise: eps depends only on (seed, step, sample, index) ---- */

static inline uint64_t cvae_mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* log(x) for a normal float x > 0, to about 1 ulp: x = 2^k m with m in [sqrt(1/2), sqrt(2)),
 * log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172 (the series' next term is below
 * 1e-9). Branch-free, so that the noise loops vectorise (libm's logf is a call per value). */
static inline float cvae_logf(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    uint32_t ix = u - 0x3F3504F3u; /* sqrt(1/2)'s bits: m's binade starts there */
    int32_t k = (int32_t)ix >> 23;
    uint32_t mb = (ix & 0x007FFFFFu) + 0x3F3504F3u;
    float m;
    memcpy(&m, &mb, 4);
    float f = m - 1.0f;
    float s = f / (2.0f + f);
    float s2 = s * s;
    float p = 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    float log_m = f - s * (f - 2.0f * s2 * p); /* 2s (1 + s^2 p) = f - s (f - 2 s^2 p) */
    return (float)k * 0.693145751953125f + ((float)k * 1.428606765330187045e-06f + log_m);
}

/* cos(2 pi u) for u in [0, 1), to about 1 ulp: u = q / 4 + r with |r| <= 1/8, then the sine
 * or cosine of 2 pi r by its Taylor polynomial (next terms below 3e-8), by quadrant q. */
static inline float cvae_cos2pi(float u) {
    float q = (u * 4.0f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float a = (u - q * 0.25f) * 6.283185307179586f;    /* u - q / 4 is exact */
    float a2 = a * a;
    float c = 1.0f / 40320.0f;
    c = c * a2 - 1.0f / 720.0f;
    c = c * a2 + 1.0f / 24.0f;
    c = c * a2 - 0.5f;
    c = c * a2 + 1.0f;
    float sn = 1.0f / 362880.0f;
    sn = sn * a2 - 1.0f / 5040.0f;
    sn = sn * a2 + 1.0f / 120.0f;
    sn = sn * a2 - 1.0f / 6.0f;
    sn = sn * a2 * a + a;
    int quadrant = (int)q & 3; /* cos(a + q pi / 2): c, -sin, -c, sin */
    float v = (quadrant & 1) ? sn : c;
    return (quadrant == 1 || quadrant == 2) ? -v : v;
}

/* Box-Muller on one 64-bit hash: 24 bits for each uniform. */
static inline float cvae_normal_of_hash(uint64_t h) {
    float u1 = ((float)(h >> 40) + 0.5f) * (1.0f / 16777216.0f); /* (0, 1): log stays finite */
    float u2 = (float)(h & 0xFFFFFF) * (1.0f / 16777216.0f);
    return sqrtf(-2.0f * cvae_logf(u1)) * cvae_cos2pi(u2);
}

/* N(0, 1) keyed by (seed, step, sample, index) through a counter hash. */
static inline float cvae_normal(uint64_t seed, uint64_t step, uint64_t sample, uint64_t index) {
    return cvae_normal_of_hash(
        cvae_mix64(cvae_mix64(cvae_mix64(seed) ^ step) ^ ((sample << 32) | index)));
}

/* out[k] = cvae_normal(seed, step, first_sample + k, index) for k < valid, 0 up to n: one
 * latent row of a batch's noise, in a loop gcc vectorises. */
static inline void cvae_normal_row(float *out, int n, int valid, uint64_t seed, uint64_t step,
                                   uint64_t first_sample, uint64_t index) {
    uint64_t key = cvae_mix64(cvae_mix64(seed) ^ step);
    for (int k = 0; k < n; k++) {
        uint64_t sample = first_sample + (uint64_t)k;
        float e = cvae_normal_of_hash(cvae_mix64(key ^ ((sample << 32) | index)));
        out[k] = k < valid ? e : 0.0f;
    }
}

/* Uniform in [0, 1) keyed like cvae_normal. */
static inline float cvae_uniform(uint64_t seed, uint64_t step, uint64_t sample, uint64_t index) {
    uint64_t h = cvae_mix64(cvae_mix64(cvae_mix64(seed) ^ step) ^ ((sample << 32) | index));
    return (float)(h >> 40) * (1.0f / 16777216.0f);
}

static inline int cvae_cpu_level(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
        return 4;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("movbe"))
        return 3;
    return 1;
#else
    return 0;
#endif
}

/* 1 when the CPU has AVX512_BF16 (vdpbf16ps) on top of x86-64-v4; the -mavx512bf16 build
 * needs both. */
static inline int cvae_cpu_bf16(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return cvae_cpu_level() >= 4 && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

/* 1 on AMD: Zen 4 and 5 run vdpbf16ps at twice the fp32 FMA rate, while Intel's AVX512_BF16
 * CPUs (Cooper Lake, Sapphire Rapids and later) run it at the FMA rate: no gain there. */
static inline int cvae_cpu_amd(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_is("amd");
#else
    return 0;
#endif
}

#endif
