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

/* dy *= act'(pre-activation), written in terms of the activation's output y. */
static inline void cvae_act_grad_row(float *dy, const float *y, int n, int act) {
    if (act == CVAE_ACT_ELU) {
        for (int j = 0; j < n; j++) dy[j] *= y[j] > 0.0f ? 1.0f : y[j] + 1.0f;
    } else if (act == CVAE_ACT_RELU) {
        for (int j = 0; j < n; j++) dy[j] = y[j] > 0.0f ? dy[j] : 0.0f;
    }
}

/* Adam (PyTorch's form) over n contiguous parameters with their gradient g. */
static inline void cvae_adam_row(float *w, float *m, float *v, const float *g, int n,
                                 float step_size, float inv_bc2_sqrt) {
    for (int j = 0; j < n; j++) {
        float mj = 0.9f * m[j] + 0.1f * g[j];
        float vj = 0.999f * v[j] + 0.001f * g[j] * g[j];
        m[j] = mj;
        v[j] = vj;
        w[j] -= step_size * mj / (sqrtf(vj) * inv_bc2_sqrt + 1e-8f);
    }
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

/* ---- counter-based Gaussian noise: eps depends only on (seed, step, sample, index) ---- */

static inline uint64_t cvae_mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static inline float cvae_normal(uint64_t seed, uint64_t step, uint64_t sample, uint64_t index) {
    uint64_t h = cvae_mix64(cvae_mix64(cvae_mix64(seed) ^ step) ^ ((sample << 32) | index));
    float u1 = ((float)(h >> 40) + 0.5f) * (1.0f / 16777216.0f); /* (0, 1): log stays finite */
    float u2 = (float)(h & 0xFFFFFF) * (1.0f / 16777216.0f);
    return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
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

#endif
