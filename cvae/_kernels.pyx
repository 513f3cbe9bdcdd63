# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Every forward and backward step of the MLP CVAE, the convolutional CVAE (ConvNet, its
convolutions on the same GEMMs: see "convolutions"), and the project's digit classifier, over
pointers into one slab.

Activations and their gradients are feature-major, ``[features][bp]`` with ``bp`` the batch
rounded up to 16, so the batch is the contiguous (vector) direction of every GEMM and every
per-pixel loop. Feature counts are padded to 16 as well; padding rows and columns are zero
and stay zero. Work is split into tasks (GEMM tiles, column strips, rows) whose partition
does not depend on the thread count, and no float is summed across threads, so results are
bit-identical for any ``num_threads`` and any OpenMP schedule. The GEMM and Adam loops use
``schedule(runtime)``; cvae.kernels sets the default (OMP_SCHEDULE).

The module is compiled once per ISA level (see setup.py); ``cvae.kernels`` picks one.

Precision (``Net``, ``Classifier`` and ``FlowNet`` take ``precision``): fp32, or bf16, where
every GEMM's inputs (weights, activations, gradients) are rounded to bf16 (nearest even) and
their products summed in fp32, in the forward pass, dX and dW alike; master weights, Adam's
moments, the losses and every elementwise step stay fp32. Adam writes the weights' bf16
copies as it updates them (``sync_bf16`` after initialising or loading); the other operand of
each GEMM is packed into the slab's bf16 scratch just before it. The v4bf16 build runs them
on vdpbf16ps, the others on fp32 FMA with the same rounding. Adam counts non-finite
gradients and updated parameters: ``nonfinite()`` (``adam_update`` also returns it).
"""

from cython.parallel cimport prange, threadid
from libc.math cimport cosf, expf, fabsf, logf, rintf, sinf
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

cdef extern from "cvae_simd.h" nogil:
    const int VW "CVAE_VW"
    const int MR "CVAE_MR"
    const int NV "CVAE_NV"
    const int NR "CVAE_NR"
    const int DX_MR "CVAE_DX_MR"
    const int DX_NV "CVAE_DX_NV"
    const int DX_NR "CVAE_DX_NR"
    const int DX_KB "CVAE_DX_KB"
    const char *ISA "CVAE_ISA"
    const int ACT_NONE "CVAE_ACT_NONE"
    const int ACT_ELU "CVAE_ACT_ELU"
    const int ACT_RELU "CVAE_ACT_RELU"
    void tile "cvae_tile"(int mr, int nv, int K, const float *A, long sai, long sak,
                          const float *B, long ldb, float *C, long ldc)
    void dx_tile "cvae_dx_tile"(int nv, int K, const float *A, long sai, long sak,
                                const float *B, long ldb, float *C, long ldc, int accumulate)
    void bias_act_row "cvae_bias_act_row"(float *c, int n, float bias, int act)
    void act_grad_row "cvae_act_grad_row"(float *dy, const float *y, int n, int act)
    void axpby_row "cvae_axpby_row"(float *y, float a, const float *x, float b, int n)
    void class_bias_row "cvae_class_bias_row"(float *c, int n, const float *bias, int n_cls,
                                              const uint8_t *cls)
    int adam_row "cvae_adam_row"(float *w, float *m, float *v, const float *g, int n,
                                 float step_size, float inv_bc2_sqrt)
    int adam_row_bf16 "cvae_adam_row_bf16"(float *w, float *m, float *v, const float *g, int n,
                                           float step_size, float inv_bc2_sqrt, uint16_t *wh)
    void bf16_row "cvae_bf16_row"(const float *w, int n, uint16_t *wh)
    int adam_pair_bf16 "cvae_adam_pair_bf16"(float *w0, float *m0, float *v0, const float *g0,
                                             float *w1, float *m1, float *v1, const float *g1,
                                             int n, float step_size, float inv_bc2_sqrt,
                                             uint16_t *wh0, uint16_t *wh1, uint32_t *wp)
    void transpose16 "cvae_transpose16"(const void *src, long lds, void *dst, long ldd, int rows,
                                        int cols)
    void pack_col_pairs16 "cvae_pack_col_pairs16"(const float *x, long ldx, int rows, int bp,
                                                  int valid, uint32_t *p, long ld)
    float row_sum "cvae_row_sum"(const float *x, int n)
    void prefetch_rows "cvae_prefetch_rows"(const float *w, const float *m, const float *v,
                                            long ld, int rows, int n, int part, int parts)
    void im2col_pair_bf16 "cvae_im2col_pair_bf16"(const float *x0, const float *x1, uint16_t *h0,
                                                  uint16_t *h1, uint32_t *p, int n)
    void interleave_rows "cvae_interleave_rows"(const uint16_t *h0, const uint16_t *h1,
                                                uint32_t *p, int n)
    const int BMR "CVAE_BMR"
    const int BNV "CVAE_BNV"
    const int BNR "CVAE_BNR"
    const int BKB "CVAE_BKB"
    const int BF16_NATIVE "CVAE_BF16_NATIVE"
    void bf_tile "cvae_bf_tile"(int mr, int nv, int KP, const uint32_t *A, long sai, long sak,
                                const uint32_t *B, long ldb, float *C, long ldc, int accumulate)
    uint16_t to_bf16 "cvae_bf16"(float x)
    void pack_row_pair "cvae_pack_row_pair"(const float *x0, const float *x1, uint32_t *p, int n)
    void pack_row "cvae_pack_row"(const float *x, uint16_t *h, int n, int valid)
    void bce_row "cvae_bce_row"(const float *logit, const float *x, float *dlogit, float *rec,
                                int n, float scale)
    void sigmoid_row "cvae_sigmoid_row"(const float *logit, float *p, int n)
    float normal "cvae_normal"(uint64_t seed, uint64_t step, uint64_t sample, uint64_t index)
    void reparam_strip "cvae_reparam_strip"(const float *O, const float *eps, float *Z,
                                            float *kl, int latent, long ld, int valid)
    void reparam_backward_strip "cvae_reparam_backward_strip"(
        const float *O, const float *eps, const float *dZ, float *dO, int latent, long ld,
        int valid, float kl_scale)
    void normal_row "cvae_normal_row"(float *out, int n, int valid, uint64_t seed, uint64_t step,
                                      uint64_t first_sample, uint64_t index)
    float uniform "cvae_uniform"(uint64_t seed, uint64_t step, uint64_t sample, uint64_t index)
    int c_cpu_level "cvae_cpu_level"()
    int c_cpu_bf16 "cvae_cpu_bf16"()
    int c_cpu_amd "cvae_cpu_amd"()

isa = ISA.decode()
vector_width = VW
tile_rows = MR   # a thread's fused-Adam scratch holds this many rows of dW (BMR <= MR in bf16)
bf16_native = bool(BF16_NATIVE)   # bf16 GEMMs on vdpbf16ps; else the same numerics on fp32 FMA
PRECISIONS = ("fp32", "bf16")

ACTIVATIONS = {"none": ACT_NONE, "elu": ACT_ELU, "relu": ACT_RELU}


def cpu_level():
    """x86-64 ISA level this CPU supports: 4, 3 or 1 (0 off x86)."""
    return c_cpu_level()


def cpu_bf16():
    """True when this CPU has AVX512_BF16 (and x86-64-v4), so the v4bf16 build runs."""
    return bool(c_cpu_bf16())


def cpu_amd():
    """True on an AMD CPU (where vdpbf16ps outruns fp32 FMA: Zen 4 and 5)."""
    return bool(c_cpu_amd())


def bf16_round(const float[::1] x not None, uint16_t[::1] out not None):
    """The kernels' fp32 -> bf16 rounding (nearest even) of x into out, for the tests."""
    cdef Py_ssize_t i
    if out.shape[0] < x.shape[0]:
        raise ValueError("out is shorter than x")
    for i in range(x.shape[0]):
        out[i] = to_bf16(x[i])


cdef struct Linear:
    int n_in, n_out, ld     # ld: n_in padded to 16, the row stride of W and gW
    # b, gb, mb, vb NULL: no bias (a transposed convolution's weight, whose bias is per output
    # channel, not per row of W; see ConvNet).
    float *W
    float *b
    float *gW
    float *gb
    float *mW
    float *mb
    float *vW
    float *vb
    # bf16 precision only (NULL in fp32): W rounded to bf16 as [out][ld] (the forward's A),
    # W as pairs of rows [ceil(out / 2)][ld] (dX's B), and two packing scratch areas.
    uint16_t *Wh
    uint32_t *Wp
    uint32_t *pa
    uint32_t *pb
    uint32_t *pc


cdef struct ClassBias:
    # A layer's inputs past the first k_in enter as a bias that depends only on a column's
    # class: bias[out][n_cls], cls[column] (FlowNet's conditioning rows while sampling).
    int k_in, n_cls
    const float *bias
    const uint8_t *cls


cdef struct Adam:
    float step_size        # lr / (1 - beta1^t)
    float inv_bc2_sqrt     # 1 / sqrt(1 - beta2^t)


cdef inline float *at(float *base, dict layout, str key) except NULL:
    return base + <Py_ssize_t>layout[key]


cdef Adam adam_step(float lr, long t):
    """PyTorch's bias corrections for Adam step number t."""
    cdef Adam adam
    adam.step_size = lr / (1.0 - 0.9 ** t)
    adam.inv_bc2_sqrt = 1.0 / (1.0 - 0.999 ** t) ** 0.5
    return adam


cdef inline int ceil_div(int a, int b) noexcept nogil:
    return (a + b - 1) // b


# A GEMM task's row tile and column tile: row-major when row tiles outnumber column tiles (a
# linear layer: the tasks of one block of W's rows follow each other, so it stays in cache),
# column-major otherwise (a convolution, whose columns are positions x batch: one strip of the
# im2col stays in cache while every block of W's rows uses it). Two functions whose results
# the loop assigns, not one writing through pointers: Cython makes a prange's variables
# private only when the loop body assigns them (through a pointer they were shared, a race).
cdef inline int task_row(int task, int n_rt, int n_ct) noexcept nogil:
    return task % n_rt if n_ct > n_rt else task // n_ct


cdef inline int task_col(int task, int n_rt, int n_ct) noexcept nogil:
    return task // n_rt if n_ct > n_rt else task % n_ct


# ---------------------------------------------------------------- linear layer

cdef void linear_forward(const Linear *L, const float *Xt, float *Yt, int bp, int act,
                         int nthreads) noexcept nogil:
    """Yt[out][bp] = act(W . Xt + b): tiles of out rows x batch columns."""
    linear_forward_cols(L, Xt, Yt, 0, bp, bp, act, NULL, nthreads)


cdef inline void epilogue_row(const Linear *L, float *y, int row, int j0, int n, int act,
                              const ClassBias *cb) noexcept nogil:
    """A forward tile's row done: its bias, per row or (cb) per class of column, and act."""
    if cb == NULL:
        bias_act_row(y, n, L.b[row] if L.b != NULL else 0.0, act)
        return
    class_bias_row(y, n, cb.bias + row * cb.n_cls, cb.n_cls, cb.cls + j0)
    if act != ACT_NONE:
        bias_act_row(y, n, 0.0, act)


cdef void linear_forward_cols(const Linear *L, const float *Xt, float *Yt, int c0, int n,
                              int ld, int act, const ClassBias *cb,
                              int nthreads) noexcept nogil:
    """linear_forward on columns c0 .. c0 + n (n a multiple of 16) of rows of ld floats: the
    whole batch, or one lane of the flow prior's sampling (FlowNet.integrate). A column's
    products are the same whichever columns share its tile. With cb, only the first cb.k_in
    inputs enter the product, the rest as cb's bias (which replaces b). bf16: A = Wh, B = Xt
    as pairs of feature rows (an odd k_in pairs W's next input with a packed zero)."""
    cdef int k_in = L.n_in if cb == NULL else cb.k_in
    if L.Wh != NULL:
        pack_pairs(Xt + c0, k_in, n, ld, L.pb + c0, nthreads)
    forward_tiles(L, Xt, L.pb, Yt, c0, n, ld, k_in, act, cb, nthreads)


cdef void linear_forward_packed(const Linear *L, const uint32_t *Xp, float *Yt, int n, int act,
                                int nthreads) noexcept nogil:
    """bf16 linear_forward on an input already packed as pairs of rows (im2col_bf16)."""
    forward_tiles(L, NULL, Xp, Yt, 0, n, n, L.n_in, act, NULL, nthreads)


cdef void forward_tiles(const Linear *L, const float *Xt, const uint32_t *Xp, float *Yt, int c0,
                        int n, int ld, int k_in, int act, const ClassBias *cb,
                        int nthreads) noexcept nogil:
    """The forward's tiles on columns c0 .. c0 + n: fp32 on Xt, bf16 on Xp."""
    cdef int bf16 = L.Wh != NULL
    cdef int n_ct = ceil_div(n, BNR if bf16 else NR)
    cdef int n_rt = ceil_div(L.n_out, BMR if bf16 else MR)
    cdef int task
    # One thread (a lane of the flow's sampling, on a thread of its own): a plain loop. A
    # prange would open a nested team of one, about a microsecond each, a tenth of the lane.
    if nthreads == 1:
        for task in range(n_rt * n_ct):
            forward_task(L, Xt, Xp, Yt, task, n_rt, n_ct, c0, n, ld, k_in, act, cb)
        return
    for task in prange(n_rt * n_ct, num_threads=nthreads, schedule='runtime'):
        forward_task(L, Xt, Xp, Yt, task, n_rt, n_ct, c0, n, ld, k_in, act, cb)


cdef inline void forward_task(const Linear *L, const float *Xt, const uint32_t *Xp, float *Yt,
                              int task, int n_rt, int n_ct, int c0, int n, int ld, int k_in,
                              int act, const ClassBias *cb) noexcept nogil:
    """forward_tiles' tile number `task`: fp32 on Xt, or bf16 on Xp, the input's pairs of rows
    (ld apart like Xt's rows)."""
    cdef int bf16 = L.Wh != NULL
    cdef int tile_rows = BMR if bf16 else MR
    cdef int tile_vectors = BNV if bf16 else NV
    cdef int i0 = task_row(task, n_rt, n_ct) * tile_rows
    cdef int j0 = c0 + task_col(task, n_rt, n_ct) * tile_vectors * VW
    cdef int mr = min(tile_rows, L.n_out - i0)
    cdef int nv = min(tile_vectors, (c0 + n - j0) // VW)
    cdef int i
    if bf16:
        bf_tile(mr, nv, ceil_div(k_in, 2), <const uint32_t *>(L.Wh + i0 * L.ld), L.ld // 2, 1,
                Xp + j0, ld, Yt + i0 * ld + j0, ld, 0)
    else:
        tile(mr, nv, k_in, L.W + i0 * L.ld, L.ld, 1, Xt + j0, ld, Yt + i0 * ld + j0, ld)
    for i in range(mr):
        epilogue_row(L, Yt + (i0 + i) * ld + j0, i0 + i, j0, nv * VW, act, cb)


cdef void transpose(const float *src, long lds, int rows, long cols, float *dst, long ldd,
                    int nthreads) noexcept nogil:
    """dst[j][i] = src[i][j] for i < rows, j < cols, by strips of 16 columns of src."""
    cdef long jb
    for jb in prange((cols + 15) // 16, num_threads=nthreads, schedule='static'):
        transpose_strip(src, lds, rows, cols, dst, ldd, jb)


cdef inline void transpose_strip(const float *src, long lds, int rows, long cols, float *dst,
                                 long ldd, long jb) noexcept nogil:
    """Strip jb of transpose: columns 16 jb .. 16 jb + 15 of src's rows, in 16 x 16 blocks, into
    the same rows of dst, which stay in L1."""
    cdef long j0 = jb * 16
    cdef int i0
    for i0 in range(0, rows, 16):
        transpose16(src + i0 * lds + j0, lds, dst + j0 * ldd + i0, ldd, min(16, rows - i0),
                    min(16, cols - j0))


cdef void linear_backward_input(const Linear *L, const float *dYt, float *dXt, const float *Xt,
                                int x_act, int bp, float *dXb, int nthreads) noexcept nogil:
    """dXt[in][bp] = (dY . W)^T, times act'(.) of the layer that produced X.

    dY . W goes batch-major into dXb first (see cvae_simd.h for why). A task is a strip of
    DX_NR input features for 32 samples; blocks of DX_KB rows of W run over its tiles.
    """
    cdef int fb
    dx_fp32(L, dYt, bp, dXb, nthreads)
    for fb in prange(ceil_div(L.n_in, 16), num_threads=nthreads, schedule='static'):
        dx_out_task(L, dXb, dXt, Xt, x_act, bp, fb)


cdef inline void dx_out_task(const Linear *L, const float *dXb, float *dXt, const float *Xt,
                             int x_act, int bp, int fb) noexcept nogil:
    """16 input features of dX, transposed from dXb into dXt and then through act' while in
    cache."""
    cdef int f
    transpose_strip(dXb, L.ld, bp, L.n_in, dXt, bp, fb)
    if x_act != ACT_NONE:
        for f in range(fb * 16, min(fb * 16 + 16, L.n_in)):
            act_grad_row(dXt + f * bp, Xt + f * bp, bp, x_act)


cdef void dx_fp32(const Linear *L, const float *dYt, int bp, float *dXb,
                  int nthreads) noexcept nogil:
    cdef int n_groups = ceil_div(bp, 32)
    cdef int task, i0, g0, nv, kblock, k0, kb, bt, b0
    for task in prange(ceil_div(L.ld, DX_NR) * n_groups, num_threads=nthreads,
                       schedule='runtime'):
        i0 = (task // n_groups) * DX_NR
        g0 = (task % n_groups) * 32
        nv = min(DX_NV, (L.ld - i0) // VW)
        for kblock in range(ceil_div(L.n_out, DX_KB)):
            k0 = kblock * DX_KB
            kb = min(DX_KB, L.n_out - k0)
            for bt in range(min(32, bp - g0) // DX_MR):
                b0 = g0 + bt * DX_MR
                dx_tile(nv, kb, dYt + k0 * bp + b0, 1, bp, L.W + k0 * L.ld + i0, L.ld,
                        dXb + b0 * L.ld + i0, L.ld, k0 > 0)


cdef int linear_backward_params(const Linear *L, const float *dYt, const float *Xt, float *Xb,
                                int batch, int bp, const Adam *adam, float *scratch,
                                int nthreads) noexcept nogil:
    """dW = dYt . X and db = sum over the batch of dYt.

    A task is one block of MR whole rows of dW and the same rows of db. With ``adam``, the
    block goes to per-thread scratch (it stays in cache) and Adam then streams over whole rows
    of W, m and v: per-tile updates touched 3 x MR short row pieces at once, which defeats the
    prefetcher. Without ``adam``, dW goes to gW (the path the gradient tests read). Returns
    how many of the gradients or updated parameters Adam found not finite (0 without
    ``adam``).
    """
    cdef int n_ct = ceil_div(L.ld, NR)
    cdef int rt, ct, i0, j0, mr, nv, i, k, f, kb
    cdef int bad = 0
    cdef float *C
    cdef float s
    # X batch-major, [batch][ld], padding columns zero: the B operand of dW. A task: 16 samples.
    for kb in prange(ceil_div(batch, 16), num_threads=nthreads, schedule='static'):
        transpose_strip(Xt, bp, L.n_in, batch, Xb, L.ld, kb)
        for k in range(kb * 16, min(kb * 16 + 16, batch)):
            for f in range(L.n_in, L.ld):
                Xb[k * L.ld + f] = 0.0
    for rt in prange(ceil_div(L.n_out, MR), num_threads=nthreads, schedule='runtime'):
        i0 = rt * MR
        mr = min(MR, L.n_out - i0)
        C = scratch + threadid() * MR * L.ld if adam != NULL else L.gW + i0 * L.ld
        for ct in range(n_ct):
            j0 = ct * NR
            nv = min(NV, (L.ld - j0) // VW)
            tile(mr, nv, batch, dYt + i0 * bp, bp, 1, Xb + j0, L.ld, C + j0, L.ld)
        for i in range(i0, i0 + mr):
            s = 0.0
            for k in range(batch):
                s = s + dYt[i * bp + k]
            L.gb[i] = s
        if adam != NULL:
            for i in range(mr):
                bad += adam_row(L.W + (i0 + i) * L.ld, L.mW + (i0 + i) * L.ld,
                                L.vW + (i0 + i) * L.ld, C + i * L.ld, L.ld, adam.step_size,
                                adam.inv_bc2_sqrt)
            bad += adam_row(L.b + i0, L.mb + i0, L.vb + i0, L.gb + i0, mr, adam.step_size,
                            adam.inv_bc2_sqrt)
    return bad


cdef inline int adam_w_row(const Linear *L, int i, const float *g,
                           const Adam *adam) noexcept nogil:
    """Adam on row i of W from its gradient g (fp32)."""
    return adam_row(L.W + i * L.ld, L.mW + i * L.ld, L.vW + i * L.ld, g, L.ld,
                    adam.step_size, adam.inv_bc2_sqrt)


cdef inline int adam_w_pair(const Linear *L, int kp, const float *g0, const float *g1,
                            const Adam *adam) noexcept nogil:
    """bf16: Adam on rows 2kp and 2kp + 1 of W (gradients g0, g1), writing their bf16 copies
    Wh and pair kp of Wp (if the layer has Wp); a missing odd row (2kp + 1 == n_out) pairs
    with zeros."""
    cdef int i = 2 * kp
    cdef long o0 = i * L.ld, o1 = (i + 1) * L.ld
    cdef uint32_t *wp = L.Wp + kp * L.ld if L.Wp != NULL else NULL
    if i + 1 >= L.n_out:
        return adam_pair_bf16(L.W + o0, L.mW + o0, L.vW + o0, g0, NULL, NULL, NULL, NULL, L.ld,
                              adam.step_size, adam.inv_bc2_sqrt, L.Wh + o0, NULL, wp)
    return adam_pair_bf16(L.W + o0, L.mW + o0, L.vW + o0, g0, L.W + o1, L.mW + o1, L.vW + o1,
                          g1, L.ld, adam.step_size, adam.inv_bc2_sqrt, L.Wh + o0, L.Wh + o1, wp)


cdef inline void wp_pair(const Linear *L, int kp) noexcept nogil:
    """Pair kp of Wp from rows 2kp and 2kp + 1 of Wh (a missing odd row pairs with zeros)."""
    interleave_rows(L.Wh + 2 * kp * L.ld,
                    L.Wh + (2 * kp + 1) * L.ld if 2 * kp + 1 < L.n_out else NULL,
                    L.Wp + kp * L.ld, L.ld)


cdef int linear_adam(const Linear *L, const Adam *adam, int nthreads) noexcept nogil:
    """Unfused Adam from the stored gradients (rows of W, then b); returns the non-finite
    count."""
    cdef int i
    cdef int bad = 0
    if L.Wh != NULL:
        for i in prange(ceil_div(L.n_out, 2), num_threads=nthreads, schedule='runtime'):
            bad += adam_w_pair(L, i, L.gW + 2 * i * L.ld, L.gW + (2 * i + 1) * L.ld, adam)
    else:
        for i in prange(L.n_out, num_threads=nthreads, schedule='runtime'):
            bad += adam_w_row(L, i, L.gW + i * L.ld, adam)
    if L.b != NULL:
        bad += adam_row(L.b, L.mb, L.vb, L.gb, L.n_out, adam.step_size, adam.inv_bc2_sqrt)
    return bad


# ---------------------------------------------------------------- bf16 GEMMs
# Each GEMM packs its two operands as bf16 pairs along K (cvae_simd.h) into the slab's bf16
# scratch, except W, whose copies Adam writes: Wh (pairs along W's rows' input features, the
# forward's A) and Wp (pairs of W's rows, dX's B). Padding never enters a product with
# anything but zeros: odd K is padded with a zero row in both operands, batch columns past the
# batch are packed as zeros. Tasks are the same for any thread count, as in fp32.

cdef void pack_pairs(const float *X, int rows, int n, int ld, uint32_t *P,
                     int nthreads) noexcept nogil:
    """P[kp][0:n] = pairs (X[2kp], X[2kp + 1]) of n floats of rows ld apart, P's rows ld apart
    too; a missing odd row is 0."""
    cdef int kp
    if nthreads == 1:       # see linear_forward_cols
        for kp in range(ceil_div(rows, 2)):
            pack_pair_of_rows(X, rows, kp, n, ld, P)
        return
    for kp in prange(ceil_div(rows, 2), num_threads=nthreads, schedule='static'):
        pack_pair_of_rows(X, rows, kp, n, ld, P)


cdef inline void pack_pair_of_rows(const float *X, int rows, int kp, int n, int ld,
                                   uint32_t *P) noexcept nogil:
    pack_row_pair(X + 2 * kp * ld, X + (2 * kp + 1) * ld if 2 * kp + 1 < rows else NULL,
                  P + kp * ld, n)


cdef int linear_backward_bf16(const Linear *L, const float *dYt, float *dXt, const float *Xt,
                              int x_act, int batch, int bp, float *dXb, const Adam *adam,
                              float *scratch, int nthreads) noexcept nogil:
    """A linear layer's backward on bf16 inputs, what linear_backward_input (with dXt) and
    linear_backward_params do in fp32, in three parallel regions instead of five, each
    region's tasks dealt out together: (1) every packed operand (dY as pairs of rows for dX,
    dY's rows in bf16 and X as pairs of samples for dW); (2) dX's tiles, which read Wp; (3)
    dX's transposition and act', and dW's tiles with the fused Adam (which rewrites W, Wh
    and Wp: after (2)). Returns the non-finite count."""
    cdef int x_tasks = L.ld // 16
    cdef int row_tasks = ceil_div(L.n_out, 16)
    cdef int pair_tasks = ceil_div(ceil_div(L.n_out, 2), 8) if dXt != NULL else 0
    cdef int n_groups = ceil_div(bp, 4 * BMR)
    cdef int dx_tasks = ceil_div(L.ld, BNR) * n_groups if dXt != NULL else 0
    cdef int out_tasks = ceil_div(L.n_in, 16) if dXt != NULL else 0
    cdef int task
    cdef int bad = 0
    for task in prange(x_tasks + row_tasks + pair_tasks, num_threads=nthreads,
                       schedule='static', chunksize=1):
        pack_task(L, dYt, Xt, batch, bp, task, x_tasks, row_tasks)
    if dXt != NULL:
        for task in prange(dx_tasks, num_threads=nthreads, schedule='runtime'):
            dx_task(L, bp, dXb, task, n_groups)
    for task in prange(out_tasks + ceil_div(L.n_out, BMR), num_threads=nthreads,
                       schedule='runtime'):
        if task < out_tasks:
            dx_out_task(L, dXb, dXt, Xt, x_act, bp, task)
        else:
            bad += dw_task(L, dYt, batch, bp, adam, scratch, task - out_tasks)
    return bad


cdef inline void pack_task(const Linear *L, const float *dYt, const float *Xt, int batch,
                           int bp, int task, int x_tasks, int row_tasks) noexcept nogil:
    """linear_backward_bf16's operands, a task each: 16 features of X batch-major as pairs of
    samples for dW, pb[q][f] = (X[f][2q], X[f][2q + 1]), zero past the batch and in the
    padding features (ld is a multiple of 16); 16 rows of dYt in bf16 for dW (pc); or 8 pairs
    of dYt's rows for dX (pa; a missing odd row is 0)."""
    cdef int i, kp
    if task < x_tasks:
        pack_col_pairs16(Xt + task * 16 * bp, bp, L.n_in - task * 16, bp, batch,
                         L.pb + task * 16, L.ld)
        return
    task -= x_tasks
    if task < row_tasks:
        for i in range(task * 16, min(task * 16 + 16, L.n_out)):
            pack_row(dYt + i * bp, <uint16_t *>L.pc + i * bp, bp, batch)
        return
    task -= row_tasks
    for kp in range(task * 8, min(task * 8 + 8, ceil_div(L.n_out, 2))):
        pack_pair_of_rows(dYt, L.n_out, kp, bp, bp, L.pa)


cdef inline void dx_task(const Linear *L, int bp, float *dXb, int task,
                         int n_groups) noexcept nogil:
    """dXb[bp][ld] = dY . W on bf16 inputs, one task: A = dYt as pairs of output rows (pa, a
    sample's pair broadcast), B = Wp. A task is a strip of BNR input features for 4 tiles of
    BMR samples; blocks of BKB pairs of W's rows stay in L1 while the strip's tiles use them."""
    cdef int group = 4 * BMR
    cdef int kp = ceil_div(L.n_out, 2)
    cdef int i0 = (task // n_groups) * BNR
    cdef int g0 = (task % n_groups) * group
    cdef int g1 = min(g0 + group, bp)
    cdef int nv = min(BNV, (L.ld - i0) // VW)
    cdef int kblock, k0, kb, bt, b0
    for kblock in range(ceil_div(kp, BKB)):
        k0 = kblock * BKB
        kb = min(BKB, kp - k0)
        for bt in range(ceil_div(g1 - g0, BMR)):
            b0 = g0 + bt * BMR
            bf_tile(min(BMR, g1 - b0), nv, kb, L.pa + k0 * bp + b0, 1, bp,
                    L.Wp + k0 * L.ld + i0, L.ld, dXb + b0 * L.ld + i0, L.ld, k0 > 0)


cdef inline int dw_task(const Linear *L, const float *dYt, int batch, int bp,
                        const Adam *adam, float *scratch, int rt) noexcept nogil:
    """dW's row tile rt on bf16 inputs: A = rows of dYt in bf16 (pc, pairs of samples), B = X
    as pairs of samples [bp / 2][ld] (pb); BMR rows of dW, then db, then with ``adam`` the
    fused update as in fp32 (BMR is even, so both rows of a pair in Wp belong to one task).
    Returns the non-finite count."""
    cdef int n_ct = ceil_div(L.ld, BNR)
    cdef int i0 = rt * BMR
    cdef int mr = min(BMR, L.n_out - i0)
    cdef const uint16_t *dyh = <const uint16_t *>L.pc
    cdef float *C = scratch + threadid() * BMR * L.ld if adam != NULL else L.gW + i0 * L.ld
    cdef int ct, j0, nv, i
    cdef int bad = 0
    for ct in range(n_ct):
        j0 = ct * BNR
        nv = min(BNV, (L.ld - j0) // VW)
        if adam != NULL:
            prefetch_rows(L.W + i0 * L.ld, L.mW + i0 * L.ld, L.vW + i0 * L.ld, L.ld, mr, L.ld,
                          ct, n_ct)
        bf_tile(mr, nv, ceil_div(batch, 2), <const uint32_t *>(dyh + i0 * bp), bp // 2, 1,
                L.pb + j0, L.ld, C + j0, L.ld, 0)
    for i in range(i0, i0 + mr):
        L.gb[i] = row_sum(dYt + i * bp, batch)
    if adam != NULL:
        for i in range(0, mr, 2):
            bad += adam_w_pair(L, (i0 + i) // 2, C + i * L.ld, C + (i + 1) * L.ld, adam)
        bad += adam_row(L.b + i0, L.mb + i0, L.vb + i0, L.gb + i0, mr, adam.step_size,
                        adam.inv_bc2_sqrt)
    return bad


cdef void linear_sync_bf16(const Linear *L, int nthreads) noexcept nogil:
    """Wh and Wp from W (after initialisation or loading; Adam keeps them current after)."""
    cdef int i
    if L.Wh == NULL:
        return
    for i in prange(L.n_out, num_threads=nthreads, schedule='static'):
        bf16_row(L.W + i * L.ld, L.ld, L.Wh + i * L.ld)
    if L.Wp == NULL:
        return
    for i in prange(ceil_div(L.n_out, 2), num_threads=nthreads, schedule='static'):
        wp_pair(L, i)


# ---------------------------------------------------------------- input and label rows

cdef void onehot_rows(float *Rt, const uint8_t *labels, int n_cls, int batch, int n,
                      int ld) noexcept nogil:
    """n_cls rows Rt[c][b] = (label_b == c) of n floats, ld apart; zero in the columns past
    the batch."""
    cdef int c, k
    for c in range(n_cls):
        for k in range(n):
            Rt[c * ld + k] = 1.0 if (k < batch and labels[k] == c) else 0.0


cdef void copy_rows(float *dst, const float *src, int rows, int n, int ld) noexcept nogil:
    """n floats of each of `rows` rows ld apart (one memcpy when they are whole rows)."""
    cdef int r
    if n == ld:
        memcpy(dst, src, <size_t>rows * n * sizeof(float))
        return
    for r in range(rows):
        memcpy(dst + r * ld, src + r * ld, n * sizeof(float))


cdef void pixel_rows(const uint8_t *pixels, float *Xt, int n_pix, int batch, int bp,
                     int nthreads) noexcept nogil:
    """Xt = pixels / 255, transposed to feature-major as it converts."""
    cdef int p, k
    cdef float inv255 = 1.0 / 255.0
    for p in prange(n_pix, num_threads=nthreads, schedule='static'):
        for k in range(batch):
            Xt[p * bp + k] = pixels[k * n_pix + p] * inv255
        for k in range(batch, bp):
            Xt[p * bp + k] = 0.0


cdef void pixels_forward(const uint8_t *pixels, const uint8_t *labels, float *Xt, int n_pix,
                         int batch, int bp, int nthreads) noexcept nogil:
    """Xt = [pixels / 255 ; onehot(labels)]: the CVAE encoder's input."""
    pixel_rows(pixels, Xt, n_pix, batch, bp, nthreads)
    onehot_rows(Xt + n_pix * bp, labels, 10, batch, bp, bp)


# ---------------------------------------------------------------- reparameterisation and KL

cdef void reparam_forward(const float *Ot, const float *eps_t, float *Zt, float *kl, int latent,
                          int batch, int bp, int nthreads) noexcept nogil:
    """z = mu + eps * exp(logvar / 2) and KL(q || N(0, I)) per sample; O = [mu ; logvar]."""
    cdef int c
    for c in prange(0, bp, 16, num_threads=nthreads, schedule='static'):
        reparam_strip(Ot + c, eps_t + c, Zt + c, kl + c, latent, bp, batch - c)


cdef void reparam_backward(const float *Ot, const float *eps_t, const float *dZt, float *dOt,
                           int latent, int batch, int bp, float kl_scale,
                           int nthreads) noexcept nogil:
    """dmu, dlogvar from dz and from kl_scale * KL (kl_scale = beta / batch)."""
    cdef int c
    for c in prange(0, bp, 16, num_threads=nthreads, schedule='static'):
        reparam_backward_strip(Ot + c, eps_t + c, dZt + c, dOt + c, latent, bp, batch - c,
                               kl_scale)


cdef void noise_fill(float *eps_t, uint64_t seed, uint64_t step, uint64_t first_sample,
                     int latent, int batch, int bp, int nthreads) noexcept nogil:
    cdef int l
    for l in prange(latent, num_threads=nthreads, schedule='static'):
        normal_row(eps_t + l * bp, bp, batch, seed, step, first_sample, l)


# ---------------------------------------------------------------- reconstruction loss

cdef void bce_forward_backward(const float *logits_t, const float *Xt, float *dlogits_t,
                               float *rec, int n_pix, int batch, int bp, float scale,
                               int nthreads) noexcept nogil:
    """rec[b] = sum over pixels of BCE-with-logits; dlogits = (sigmoid - x) * scale.

    Strips of 16 columns: each sample's sum runs in pixel order inside one task.
    """
    cdef int strip, j0, p, k
    for strip in prange(bp // 16, num_threads=nthreads, schedule='runtime'):
        j0 = strip * 16
        for k in range(j0, j0 + 16):
            rec[k] = 0.0
        for p in range(n_pix):
            bce_row(logits_t + p * bp + j0, Xt + p * bp + j0, dlogits_t + p * bp + j0,
                    rec + j0, 16, scale)
        for k in range(j0, j0 + 16):
            if k >= batch:
                rec[k] = 0.0
                for p in range(n_pix):
                    dlogits_t[p * bp + k] = 0.0


# ---------------------------------------------------------------- classification loss

cdef void softmax_xent_forward_backward(const float *logits_t, const uint8_t *labels,
                                        float *dlogits_t, float *loss, int n_cls, int batch,
                                        int bp, float scale) noexcept nogil:
    """loss[b] = logsumexp(logits[:, b]) - logits[label_b, b]; dlogits = (softmax - onehot)
    * scale. Ten rows by one batch: too little work to be worth a parallel region."""
    cdef int k, c
    cdef float m, s, e
    for k in range(bp):
        if k >= batch:
            loss[k] = 0.0
            for c in range(n_cls):
                dlogits_t[c * bp + k] = 0.0
            continue
        m = logits_t[k]
        for c in range(1, n_cls):
            m = max(m, logits_t[c * bp + k])
        s = 0.0
        for c in range(n_cls):
            e = expf(logits_t[c * bp + k] - m)
            dlogits_t[c * bp + k] = e
            s = s + e
        loss[k] = m + logf(s) - logits_t[labels[k] * bp + k]
        for c in range(n_cls):
            dlogits_t[c * bp + k] = (dlogits_t[c * bp + k] / s
                                     - (1.0 if c == labels[k] else 0.0)) * scale


# ---------------------------------------------------------------- flow matching (the latent prior)

cdef void time_rows(float *Rt, const float *t, int n_freq, int batch, int bp,
                    int nthreads) noexcept nogil:
    """2·n_freq rows sin(2^i t), cos(2^i t): how the velocity network sees the time."""
    cdef int i, k
    cdef float w
    for i in prange(n_freq, num_threads=nthreads, schedule='static'):
        w = <float>(1 << i)
        for k in range(bp):
            Rt[2 * i * bp + k] = sinf(w * t[k]) if k < batch else 0.0
            Rt[(2 * i + 1) * bp + k] = cosf(w * t[k]) if k < batch else 0.0


cdef void flow_pairs(const float *mu, const float *logvar, const uint8_t *labels, float *Xt,
                     float *target_t, float *t, int latent, int n_freq, int null_label,
                     float drop_prob, uint64_t seed, uint64_t step, int batch, int bp,
                     int nthreads) noexcept nogil:
    """The conditional flow-matching pairs of a batch of codes (mu, logvar batch-major).

    Sample k: z1 = mu + exp(logvar / 2)·eps, z0 ~ N(0, I), t ~ U[0, 1); Xt = [z_t ; time rows ;
    onehot(label, or null_label with probability drop_prob)] with z_t = (1 - t)·z0 + t·z1, and
    target = z1 - z0. Draws are keyed by (seed, step, k, index): z0 by index l, eps by
    latent + l, t by 2·latent, the label drop by 2·latent + 1."""
    cdef int k, l, c, cond
    cdef float z0, z1
    cdef float *label_rows = Xt + (latent + 2 * n_freq) * bp
    for k in range(bp):
        t[k] = uniform(seed, step, k, 2 * latent) if k < batch else 0.0
    for l in prange(latent, num_threads=nthreads, schedule='static'):
        for k in range(bp):
            if k < batch:
                z0 = normal(seed, step, k, l)
                z1 = (mu[k * latent + l]
                      + expf(0.5 * logvar[k * latent + l]) * normal(seed, step, k, latent + l))
                Xt[l * bp + k] = (1.0 - t[k]) * z0 + t[k] * z1
                target_t[l * bp + k] = z1 - z0
            else:
                Xt[l * bp + k] = 0.0
                target_t[l * bp + k] = 0.0
    time_rows(Xt + latent * bp, t, n_freq, batch, bp, nthreads)
    for k in range(bp):
        cond = -1
        if k < batch:
            cond = null_label if uniform(seed, step, k, 2 * latent + 1) < drop_prob else labels[k]
        for c in range(null_label + 1):
            label_rows[c * bp + k] = 1.0 if c == cond else 0.0


cdef void mse_forward_backward(const float *v_t, const float *target_t, float *dv_t,
                               float *loss, int latent, int batch, int bp, float scale,
                               int nthreads) noexcept nogil:
    """loss[b] = mean over the latent of (v - target)²; dv = 2·(v - target) / latent · scale.
    Strips of 16 columns: each sample's sum runs in latent order inside one task."""
    cdef int strip, j0, l, k
    cdef float d
    for strip in prange(bp // 16, num_threads=nthreads, schedule='static'):
        j0 = strip * 16
        for k in range(j0, j0 + 16):
            loss[k] = 0.0
        for l in range(latent):
            for k in range(j0, j0 + 16):
                d = v_t[l * bp + k] - target_t[l * bp + k] if k < batch else 0.0
                loss[k] = loss[k] + d * d
                dv_t[l * bp + k] = 2.0 * d / latent * scale
        for k in range(j0, j0 + 16):
            loss[k] = loss[k] / latent


cdef void rows_axpby(float *y, float a, const float *x, float b, int rows, int n, int ld,
                     int nthreads) noexcept nogil:
    """y = a·y + b·x over n floats of rows ld apart: residual sums, ODE steps, guidance."""
    cdef int r
    if nthreads == 1:       # see linear_forward_cols
        for r in range(rows):
            axpby_row(y + r * ld, a, x + r * ld, b, n)
        return
    for r in prange(rows, num_threads=nthreads, schedule='static'):
        axpby_row(y + r * ld, a, x + r * ld, b, n)



# ---------------------------------------------------------------- slab plumbing

cdef Linear linear_in_slab(float *base, dict layout, dict dims, str name, int bf16) except *:
    """Layer ``name`` (dims[name] = (n_in, n_out)): W and b, their gradients and Adam moments,
    at layout's offsets; with ``bf16``, W's bf16 copies and the packing scratch too."""
    cdef Linear L
    L.n_in, L.n_out = dims[name]
    L.ld = ceil_div(L.n_in, 16) * 16
    L.W = at(base, layout, "param." + name + ".W")
    L.b = at(base, layout, "param." + name + ".b")
    L.gW = at(base, layout, "grad." + name + ".W")
    L.gb = at(base, layout, "grad." + name + ".b")
    L.mW = at(base, layout, "adam_m." + name + ".W")
    L.mb = at(base, layout, "adam_m." + name + ".b")
    L.vW = at(base, layout, "adam_v." + name + ".W")
    L.vb = at(base, layout, "adam_v." + name + ".b")
    L.Wh = NULL
    L.Wp = NULL
    L.pa = NULL
    L.pb = NULL
    L.pc = NULL
    if bf16:
        L.Wh = <uint16_t *>at(base, layout, "bf16." + name + ".W")
        if "bf16." + name + ".Wp" in layout:     # not for a network's first layer (no dX)
            L.Wp = <uint32_t *>at(base, layout, "bf16." + name + ".Wp")
        L.pa = <uint32_t *>at(base, layout, "scratch.bf16_a")
        L.pb = <uint32_t *>at(base, layout, "scratch.bf16_b")
        L.pc = <uint32_t *>at(base, layout, "scratch.bf16_c")
    return L


cdef int precision_flag(str precision) except -1:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision == "bf16"


cdef int check_pixels(Py_ssize_t batch, Py_ssize_t n_cols, int n_pix, int max_bp) except -1:
    if batch < 1 or ceil_div(batch, 16) * 16 > max_bp:
        raise ValueError(f"batch of {batch} does not fit this model's slab")
    if n_cols != n_pix:
        raise ValueError("pixels must be (batch, %d)" % n_pix)
    return 0


cdef int check_out(str name, Py_ssize_t rows, Py_ssize_t cols, int batch, int width) except -1:
    """Every output array must hold the whole answer: bounds checks are off in here."""
    if rows < batch or cols != width:
        raise ValueError(f"{name} must be at least ({batch}, {width}), got ({rows}, {cols})")
    return 0


# ---------------------------------------------------------------- the network

cdef struct ConvBias:
    # a transposed convolution's per-channel bias (its Linear has none)
    int n
    float *b
    float *gb
    float *mb
    float *vb


cdef enum:
    MAX_LAYERS = 20
    MAX_BIASES = 2


cdef class Network:
    """What every network over a slab shares: its settings, its scratch, and its Linear layers
    (and a transposed convolution's per-channel biases) in a list, for the unfused Adam
    update, the bf16 copies of W and the non-finite count that every network offers alike."""
    cdef Linear *layers[MAX_LAYERS]
    cdef ConvBias *biases[MAX_BIASES]
    cdef int n_layers, n_biases
    cdef int act, nthreads, max_bp
    cdef object slab
    cdef int bf16, bad
    cdef float *xb
    cdef float *scratch
    cdef readonly str precision

    cdef _settings(self, float[::1] slab, dict layout, int max_bp, str act, int nthreads,
                   str precision):
        self.bf16 = precision_flag(precision)
        self.precision = precision
        self.slab = slab
        self.max_bp = max_bp
        self.act = ACTIVATIONS[act]
        self.nthreads = nthreads
        self.xb = at(&slab[0], layout, "scratch.batch_major")
        self.scratch = at(&slab[0], layout, "scratch.tiles")

    cdef Linear *_layer(self, Linear *L) except NULL:
        """L (a field of the network, so its address lives as long as the network) joins
        the list; returns it."""
        if self.n_layers == MAX_LAYERS:
            raise ValueError(f"a network has at most {MAX_LAYERS} layers")
        self.layers[self.n_layers] = L
        self.n_layers += 1
        return L

    cdef _bias(self, ConvBias *B):
        if self.n_biases == MAX_BIASES:
            raise ValueError(f"a network has at most {MAX_BIASES} per-channel biases")
        self.biases[self.n_biases] = B
        self.n_biases += 1

    cdef int _backward_layer(self, const Linear *L, const float *dYt, float *dXt,
                             const float *Xt, int x_act, int batch, int bp,
                             const Adam *adam) noexcept nogil:
        """One linear layer's backward from dYt, its input Xt: with dXt, the input gradient
        (times act'(.) of the layer that produced Xt, x_act) first, as it reads W before the
        fused Adam changes it; then dW and db and, with adam, the update. dXt NULL: the first
        layer, whose input needs no gradient. Returns the non-finite count."""
        if L.Wh != NULL:
            return linear_backward_bf16(L, dYt, dXt, Xt, x_act, batch, bp, self.xb, adam,
                                        self.scratch, self.nthreads)
        if dXt != NULL:
            linear_backward_input(L, dYt, dXt, Xt, x_act, bp, self.xb, self.nthreads)
        return linear_backward_params(L, dYt, Xt, self.xb, batch, bp, adam, self.scratch,
                                      self.nthreads)

    def adam_update(self, float lr, long adam_t):
        """Adam step number adam_t from the stored gradients (the unfused path)."""
        cdef Adam adam = adam_step(lr, adam_t)
        cdef int i
        self.bad = 0
        with nogil:
            for i in range(self.n_layers):
                self.bad += linear_adam(self.layers[i], &adam, self.nthreads)
            for i in range(self.n_biases):
                self.bad += adam_row(self.biases[i].b, self.biases[i].mb, self.biases[i].vb,
                                     self.biases[i].gb, self.biases[i].n, adam.step_size,
                                     adam.inv_bc2_sqrt)
        return self.bad

    def nonfinite(self):
        """How many gradients or updated parameters the last Adam update (fused into step, or
        adam_update) found not finite: 0 while training is healthy."""
        return self.bad

    def sync_bf16(self):
        """Round W into its bf16 copies (after initialisation or loading); a no-op in fp32."""
        cdef int i
        with nogil:
            for i in range(self.n_layers):
                linear_sync_bf16(self.layers[i], self.nthreads)


cdef class Net(Network):
    """The CVAE's layers and buffers as pointers into a slab that Python carved (cvae.model).

    ``layout`` maps buffer names to float offsets in ``slab``; ``dims`` gives the sizes.
    """
    cdef Linear enc1, enc2, enc3, dec1, dec2, dec3
    cdef float *x_t
    cdef float *h1_t
    cdef float *h2_t
    cdef float *o_t
    cdef float *eps_t
    cdef float *d0_t
    cdef float *g1_t
    cdef float *g2_t
    cdef float *logits_t
    cdef float *dh1_t
    cdef float *dh2_t
    cdef float *do_t
    cdef float *dd0_t
    cdef float *dg1_t
    cdef float *dg2_t
    cdef float *dlogits_t
    cdef float *rec
    cdef float *kl
    cdef int n_pix, latent

    def __init__(self, float[::1] slab not None, dict layout, tuple layers, int latent,
                 int max_bp, str act, int nthreads, str precision="fp32"):
        """``layers``: (name, n_in, n_out) of enc1, enc2, enc3, dec1, dec2, dec3 (Arch.layers).
        ``precision`` bf16 rounds every GEMM's inputs to bf16 (fp32 accumulation); the layout
        then has the bf16 sections (cvae.model)."""
        cdef float *base = &slab[0]
        self._buffers(slab, layout, latent, max_bp, act, nthreads, precision)
        dims = {name: (n_in, n_out) for name, n_in, n_out in layers}
        self._layer(&self.enc1)[0] = linear_in_slab(base, layout, dims, "enc1", self.bf16)
        self._layer(&self.enc2)[0] = linear_in_slab(base, layout, dims, "enc2", self.bf16)
        self._layer(&self.enc3)[0] = linear_in_slab(base, layout, dims, "enc3", self.bf16)
        self._layer(&self.dec1)[0] = linear_in_slab(base, layout, dims, "dec1", self.bf16)
        self._layer(&self.dec2)[0] = linear_in_slab(base, layout, dims, "dec2", self.bf16)
        self._layer(&self.dec3)[0] = linear_in_slab(base, layout, dims, "dec3", self.bf16)
        self.n_pix = self.dec3.n_out
        if (self.enc1.n_in != self.n_pix + 10 or self.enc3.n_out != 2 * latent
                or self.dec1.n_in != latent + 10):
            raise ValueError("layers do not form a CVAE of this latent size")
        self.x_t = at(base, layout, "act.x")
        self.h1_t = at(base, layout, "act.enc1")
        self.h2_t = at(base, layout, "act.enc2")
        self.o_t = at(base, layout, "act.enc3")
        self.d0_t = at(base, layout, "act.dec_in")
        self.g1_t = at(base, layout, "act.dec1")
        self.g2_t = at(base, layout, "act.dec2")
        self.logits_t = at(base, layout, "act.dec3")
        self.dh1_t = at(base, layout, "actgrad.enc1")
        self.dh2_t = at(base, layout, "actgrad.enc2")
        self.do_t = at(base, layout, "actgrad.enc3")
        self.dd0_t = at(base, layout, "actgrad.dec_in")
        self.dg1_t = at(base, layout, "actgrad.dec1")
        self.dg2_t = at(base, layout, "actgrad.dec2")
        self.dlogits_t = at(base, layout, "actgrad.dec3")

    cdef _buffers(self, float[::1] slab, dict layout, int latent, int max_bp, str act,
                  int nthreads, str precision):
        """What every CVAE (this MLP and ConvNet) shares: settings, the noise and loss
        buffers, the scratch."""
        cdef float *base = &slab[0]
        self._settings(slab, layout, max_bp, act, nthreads, precision)
        self.latent = latent
        self.eps_t = at(base, layout, "act.eps")
        self.rec = at(base, layout, "per_sample.rec")
        self.kl = at(base, layout, "per_sample.kl")

    cdef int _check_batch(self, const uint8_t[:, ::1] pixels, const uint8_t[::1] labels) except -1:
        check_pixels(pixels.shape[0], pixels.shape[1], self.n_pix, self.max_bp)
        if labels.shape[0] != pixels.shape[0]:
            raise ValueError("labels must be (batch,)")
        return pixels.shape[0]

    cdef void _encode(self, const uint8_t *pixels, const uint8_t *labels, int batch,
                      int bp) noexcept nogil:
        pixels_forward(pixels, labels, self.x_t, self.n_pix, batch, bp, self.nthreads)
        linear_forward(&self.enc1, self.x_t, self.h1_t, bp, self.act, self.nthreads)
        linear_forward(&self.enc2, self.h1_t, self.h2_t, bp, self.act, self.nthreads)
        linear_forward(&self.enc3, self.h2_t, self.o_t, bp, ACT_NONE, self.nthreads)

    cdef void _decode(self, const uint8_t *labels, int batch, int bp) noexcept nogil:
        """Decoder from the z rows already in d0_t."""
        onehot_rows(self.d0_t + self.latent * bp, labels, 10, batch, bp, bp)
        linear_forward(&self.dec1, self.d0_t, self.g1_t, bp, self.act, self.nthreads)
        linear_forward(&self.dec2, self.g1_t, self.g2_t, bp, self.act, self.nthreads)
        linear_forward(&self.dec3, self.g2_t, self.logits_t, bp, ACT_NONE, self.nthreads)

    cdef void _forward(self, const uint8_t *pixels, const uint8_t *labels, int batch, int bp,
                       uint64_t seed, uint64_t step, uint64_t first_sample) noexcept nogil:
        self._encode(pixels, labels, batch, bp)
        noise_fill(self.eps_t, seed, step, first_sample, self.latent, batch, bp, self.nthreads)
        reparam_forward(self.o_t, self.eps_t, self.d0_t, self.kl, self.latent, batch, bp,
                        self.nthreads)
        self._decode(labels, batch, bp)

    cdef void _backward(self, int batch, int bp, float beta, const Adam *adam) noexcept nogil:
        cdef int nt = self.nthreads
        self.bad = 0
        # Each layer's dX reads W before the (optionally fused) update of that W.
        self.bad += self._backward_layer(&self.dec3, self.dlogits_t, self.dg2_t, self.g2_t,
                                         self.act, batch, bp, adam)
        self.bad += self._backward_layer(&self.dec2, self.dg2_t, self.dg1_t, self.g1_t, self.act,
                                         batch, bp, adam)
        self.bad += self._backward_layer(&self.dec1, self.dg1_t, self.dd0_t, self.d0_t, ACT_NONE,
                                         batch, bp, adam)
        reparam_backward(self.o_t, self.eps_t, self.dd0_t, self.do_t, self.latent, batch, bp,
                         beta / batch, nt)
        self.bad += self._backward_layer(&self.enc3, self.do_t, self.dh2_t, self.h2_t, self.act,
                                         batch, bp, adam)
        self.bad += self._backward_layer(&self.enc2, self.dh2_t, self.dh1_t, self.h1_t, self.act,
                                         batch, bp, adam)
        self.bad += self._backward_layer(&self.enc1, self.dh1_t, NULL, self.x_t, ACT_NONE,
                                         batch, bp, adam)

    cdef tuple _sums(self, int batch):
        cdef double rec = 0.0, kl = 0.0
        cdef int k
        for k in range(batch):
            rec += self.rec[k]
            kl += self.kl[k]
        return rec, kl

    def step(self, const uint8_t[:, ::1] pixels not None, const uint8_t[::1] labels not None,
             float beta, uint64_t seed, uint64_t step, float lr=0.0, long adam_t=0):
        """One training step on a batch; returns (rec, kl) summed over the batch.

        With adam_t > 0 the Adam update (step number adam_t, learning rate lr) is fused into
        the backward pass; with adam_t == 0 the gradients are stored and nothing moves.
        """
        cdef int batch = self._check_batch(pixels, labels)
        cdef int bp = ceil_div(batch, 16) * 16
        cdef Adam adam
        cdef const Adam *adam_p = NULL
        if adam_t > 0:
            adam = adam_step(lr, adam_t)
            adam_p = &adam
        with nogil:
            self._forward(&pixels[0, 0], &labels[0], batch, bp, seed, step, 0)
            bce_forward_backward(self.logits_t, self.x_t, self.dlogits_t, self.rec, self.n_pix,
                                 batch, bp, 1.0 / batch, self.nthreads)
            self._backward(batch, bp, beta, adam_p)
        return self._sums(batch)

    def evaluate(self, const uint8_t[:, ::1] pixels not None, const uint8_t[::1] labels not None,
                 uint64_t seed, uint64_t step, uint64_t first_sample, float[::1] rec_out not None,
                 float[::1] kl_out not None):
        """Forward only: per-sample reconstruction and KL terms into rec_out, kl_out.

        Sample k draws eps keyed by (seed, step, first_sample + k), so a data set evaluated in
        consecutive batches gets the same draws whatever the batch size."""
        cdef int batch = self._check_batch(pixels, labels)
        cdef int bp = ceil_div(batch, 16) * 16
        cdef int k
        check_out("rec_out", rec_out.shape[0], 1, batch, 1)
        check_out("kl_out", kl_out.shape[0], 1, batch, 1)
        with nogil:
            self._forward(&pixels[0, 0], &labels[0], batch, bp, seed, step, first_sample)
            bce_forward_backward(self.logits_t, self.x_t, self.dlogits_t, self.rec, self.n_pix,
                                 batch, bp, 0.0, self.nthreads)
        for k in range(batch):
            rec_out[k] = self.rec[k]
            kl_out[k] = self.kl[k]

    def noise(self, uint64_t seed, uint64_t step, float[:, ::1] out not None):
        """The eps of (seed, step) for the first out.shape[0] samples, as (batch, latent)."""
        cdef int k, l
        check_out("out", out.shape[0], out.shape[1], out.shape[0], self.latent)
        for k in range(out.shape[0]):
            for l in range(self.latent):
                out[k, l] = normal(seed, step, k, l)

    def encode(self, const uint8_t[:, ::1] pixels not None, const uint8_t[::1] labels not None,
               float[:, ::1] mu_out not None, float[:, ::1] logvar_out not None):
        """The encoder's mu and logvar as (batch, latent)."""
        cdef int batch = self._check_batch(pixels, labels)
        cdef int bp = ceil_div(batch, 16) * 16
        cdef int k, l
        check_out("mu_out", mu_out.shape[0], mu_out.shape[1], batch, self.latent)
        check_out("logvar_out", logvar_out.shape[0], logvar_out.shape[1], batch,
                        self.latent)
        with nogil:
            self._encode(&pixels[0, 0], &labels[0], batch, bp)
        for k in range(batch):
            for l in range(self.latent):
                mu_out[k, l] = self.o_t[l * bp + k]
                logvar_out[k, l] = self.o_t[(self.latent + l) * bp + k]

    cdef int _decode_probs(self, const float[:, ::1] z, const uint8_t[::1] labels,
                           str out_name, Py_ssize_t out_rows, Py_ssize_t out_cols) except -1:
        """The decoder's probabilities for z and labels, feature-major in dlogits_t (decode's
        and decode_bytes' common part, after checking z, labels and their output array)."""
        cdef int batch = z.shape[0]
        cdef int bp = ceil_div(batch, 16) * 16
        cdef int k, l, p
        if batch < 1 or bp > self.max_bp or labels.shape[0] != batch:
            raise ValueError(f"batch of {batch} does not fit this model's slab")
        check_out("z", z.shape[0], z.shape[1], batch, self.latent)
        check_out(out_name, out_rows, out_cols, batch, self.n_pix)
        for l in range(self.latent):
            for k in range(bp):
                self.d0_t[l * bp + k] = z[k, l] if k < batch else 0.0
        with nogil:
            self._decode(&labels[0], batch, bp)
            for p in prange(self.n_pix, num_threads=self.nthreads, schedule='static'):
                sigmoid_row(self.logits_t + p * bp, self.dlogits_t + p * bp, bp)
        return bp

    def decode(self, const float[:, ::1] z not None, const uint8_t[::1] labels not None,
               float[:, ::1] probs_out not None):
        """Pixel probabilities sigmoid(decoder(z, label)) as (batch, 784)."""
        cdef int bp = self._decode_probs(z, labels, "probs_out", probs_out.shape[0],
                                         probs_out.shape[1])
        cdef int k, p
        for k in range(z.shape[0]):
            for p in range(self.n_pix):
                probs_out[k, p] = self.dlogits_t[p * bp + k]

    def decode_bytes(self, const float[:, ::1] z not None, const uint8_t[::1] labels not None,
                     uint8_t[:, ::1] out not None):
        """decode's probabilities p as the bytes cvae.images.to_uint8 makes of them (rint of
        the float32 product 255 p, half to even, clipped to [0, 255]), written by the threads
        straight from the feature-major sigmoid: no float copy, no serial transpose. Returns
        how many pixels are NaN (their bytes are then meaningless)."""
        cdef int batch = z.shape[0]
        cdef int bp = self._decode_probs(z, labels, "out", out.shape[0], out.shape[1])
        cdef int block, nan = 0
        with nogil:
            # 16 samples a task: each pixel's 16 probabilities are one cache line.
            for block in prange(bp // 16, num_threads=self.nthreads, schedule='static'):
                nan += probs_to_bytes(self.dlogits_t, bp, block * 16, min(block * 16 + 16, batch),
                                      self.n_pix, &out[0, 0])
        return nan


cdef inline int probs_to_bytes(const float *probs_t, int bp, int k0, int k1, int n_pix,
                               uint8_t *out) noexcept nogil:
    """Samples k0 .. k1 - 1 of feature-major probabilities (pixel p of sample k at p * bp + k)
    as rows of n_pix bytes in out, as cvae.images.to_uint8 rounds them; returns the NaNs."""
    cdef int p, k, nan = 0
    cdef float v
    for p in range(n_pix):
        for k in range(k0, k1):
            v = probs_t[p * bp + k]
            if v != v:
                nan += 1
                v = 0.0
            # A float32 product, as numpy's float32 array times 255.0: a double product
            # could round a different way at the .5 ties.
            v = rintf(v * <float>255.0)
            out[k * n_pix + p] = <uint8_t>(0.0 if v < 0.0 else (255.0 if v > 255.0 else v))
    return nan


# ---------------------------------------------------------------- convolutions
# Every convolution here is 4x4, stride 2, padding 1: an H x W map becomes H/2 x W/2, and the
# transposed convolution takes it back. A map of C channels is feature-major like every other
# activation, [C][H][W][bp], which is already [C][H*W*bp]: a convolution is one GEMM,
#   Y[C_out][P*bp] = W[C_out][C_in*16] . col[C_in*16][P*bp]      (P = output positions)
# where im2col's row k = (c, ky, kx) holds, for every output position, the bp batch values of
# the input pixel that tap reads (zeros in the padding). So a convolution's weight is a Linear
# with n_in = C_in*16 and "batch" P*bp, and the Linear routines are its three GEMMs: the
# forward, dX = col2im(W^T . dY) and dW = dY . col^T. A transposed convolution is the adjoint
# pair (its forward is that dX, its dX that forward); its weight is stored as PyTorch's
# ConvTranspose2d, (C_in, C_out, 4, 4) = W[C_in][C_out*16], with no bias in the Linear (its
# bias is per output channel: a ConvBias). Padding batch columns of every gradient are zero,
# so GEMMs whose K runs over P*bp (dW) may include them.

cdef inline const float *tap_source(const float *X, int r, int oy, int ox, int H, int W,
                                    int bp) noexcept nogil:
    """The bp values im2col's row r = (c, ky, kx) takes at output position (oy, ox): X's pixel
    (2oy - 1 + ky, 2ox - 1 + kx) of channel c, or NULL where that is padding."""
    cdef int iy = 2 * oy - 1 + (r // 4) % 4
    cdef int ix = 2 * ox - 1 + r % 4
    if iy < 0 or iy >= H or ix < 0 or ix >= W:
        return NULL
    return X + (<long>((r // 16) * H + iy) * W + ix) * bp


cdef void im2col(const float *X, float *col, int C, int H, int W, int bp,
                 int nthreads) noexcept nogil:
    """col[(c, ky, kx)][(oy, ox)][bp] = X[c][2oy - 1 + ky][2ox - 1 + kx][bp], zero outside."""
    cdef int Wo = W // 2
    cdef long P = (H // 2) * Wo
    cdef int r
    cdef long pos
    cdef const float *src
    cdef float *dst
    for r in prange(C * 16, num_threads=nthreads, schedule='static'):
        for pos in range(P):
            src = tap_source(X, r, pos // Wo, pos % Wo, H, W, bp)
            dst = col + (r * P + pos) * bp
            if src != NULL:
                memcpy(dst, src, bp * sizeof(float))
            else:
                memset(dst, 0, bp * sizeof(float))


cdef uint32_t *im2col_bf16(const float *X, float *col, int C, int H, int W, int bp,
                           int nthreads) noexcept nogil:
    """bf16 precision's im2col, made once for both GEMMs that read it: col's rows in bf16,
    colh[(c, ky, kx)][(oy, ox)][bp] (dW's operand, conv_backward_params), then their pairs
    along K (the forward's operand), which it returns; 2 + 2 bytes an entry, in col's floats.
    The fp32 im2col is never made: packing it twice cost the conv model 7% of a step."""
    cdef int Wo = W // 2
    cdef long P = (H // 2) * Wo
    cdef long N = P * bp
    cdef uint16_t *colh = <uint16_t *>col
    cdef uint32_t *pairs = <uint32_t *>(col + C * 8 * N)
    cdef int rp, r
    cdef long pos
    for rp in prange(C * 8, num_threads=nthreads, schedule='static'):
        r = 2 * rp          # taps r and r + 1: one row of the kernel, kx and kx + 1
        for pos in range(P):
            im2col_pair_bf16(tap_source(X, r, pos // Wo, pos % Wo, H, W, bp),
                             tap_source(X, r + 1, pos // Wo, pos % Wo, H, W, bp),
                             colh + (r * P + pos) * bp, colh + ((r + 1) * P + pos) * bp,
                             pairs + (rp * P + pos) * bp, bp)
    return pairs


cdef void col2im(const float *col, float *X, int C, int H, int W, int bp, const float *bias,
                 const float *y, int act, int nthreads) noexcept nogil:
    """X[c][iy][ix][bp] = the sum of the (up to 4) col entries of the taps that read that pixel,
    in a fixed tap order (a gather: no two tasks write one pixel, no atomics). Then, by rows of
    the map, with ``bias``: X = act(X + bias[c]) (the transposed convolution's output); with
    ``y``: X *= act'(.) of the layer whose output y is (an input gradient)."""
    cdef int Ho = H // 2, Wo = W // 2
    cdef long P = Ho * Wo
    cdef int row, c, iy, ix, ky, kx, oy, ox, k
    cdef float *dst
    cdef const float *src
    for row in prange(C * H, num_threads=nthreads, schedule='static'):
        c = row // H
        iy = row % H
        for ix in range(W):
            dst = X + (<long>row * W + ix) * bp
            memset(dst, 0, bp * sizeof(float))
            for ky in range((iy + 1) % 2, 4, 2):
                oy = (iy + 1 - ky) // 2
                if oy < 0 or oy >= Ho:
                    continue
                for kx in range((ix + 1) % 2, 4, 2):
                    ox = (ix + 1 - kx) // 2
                    if ox < 0 or ox >= Wo:
                        continue
                    src = col + ((c * 16 + ky * 4 + kx) * P + oy * Wo + ox) * bp
                    for k in range(bp):
                        dst[k] = dst[k] + src[k]
        if bias != NULL:
            bias_act_row(X + <long>row * W * bp, W * bp, bias[c], act)
        elif y != NULL and act != ACT_NONE:
            act_grad_row(X + <long>row * W * bp, y + <long>row * W * bp, W * bp, act)


cdef void linear_transposed(const Linear *L, const float *Yt, float *Ct, int N,
                            int nthreads) noexcept nogil:
    """Ct[in][N] = W^T . Yt[out][N], feature-major: a convolution's input gradient before
    col2im, a transposed convolution's forward. (The linear layers' dX goes batch-major first,
    which for N = positions x batch would cost a large strided transpose.) Tiles of rows of
    W^T by N's columns, column strips outer: a strip of Yt stays in L1 while every block of
    W's columns uses it. bf16: A = Wp (pairs of W's rows), B = Yt as pairs of rows."""
    cdef int task, i0, j0, mr, nv
    cdef int n_rt, n_ct
    if L.Wh != NULL:
        pack_pairs(Yt, L.n_out, N, N, L.pa, nthreads)
        n_rt = ceil_div(L.n_in, BMR)
        n_ct = ceil_div(N, BNR)
        for task in prange(n_rt * n_ct, num_threads=nthreads, schedule='runtime'):
            i0 = (task % n_rt) * BMR
            j0 = (task // n_rt) * BNR
            mr = min(BMR, L.n_in - i0)
            nv = min(BNV, (N - j0) // VW)
            bf_tile(mr, nv, ceil_div(L.n_out, 2), L.Wp + i0, 1, L.ld, L.pa + j0, N,
                    Ct + <long>i0 * N + j0, N, 0)
        return
    n_rt = ceil_div(L.n_in, MR)
    n_ct = ceil_div(N, NR)
    for task in prange(n_rt * n_ct, num_threads=nthreads, schedule='runtime'):
        i0 = (task % n_rt) * MR
        j0 = (task // n_rt) * NR
        mr = min(MR, L.n_in - i0)
        nv = min(NV, (N - j0) // VW)
        tile(mr, nv, L.n_out, L.W + i0, 1, L.ld, Yt + j0, N, Ct + <long>i0 * N + j0, N)


cdef int conv_backward_params(const Linear *L, const float *dYt, const float *col, int N,
                              const Adam *adam, float *xb, float *dwt,
                              int nthreads) noexcept nogil:
    """dW = dYt[out][N] . col[in][N]^T into gW, and (when the Linear has a bias) db = the row
    sums of dYt; with ``adam`` W and b are then updated as linear_backward_params does. The
    GEMM runs as dW^T = col . dYt^T into dwt[in][out padded]: its K = N runs along col's rows,
    and its batch-major operand is dYt transposed (out, the small side, is its width), not the
    im2col. bf16: A = col's rows in bf16 (pairs of columns: col is im2col_bf16's), B = dYt as
    pairs of columns. Returns the non-finite count."""
    cdef int ldm = ceil_div(L.n_out, 16) * 16
    cdef int task, i0, j0, n_ct, k, i
    cdef const uint16_t *colh
    if L.Wh != NULL:
        colh = <const uint16_t *>col
        for k in prange(ldm // 16, num_threads=nthreads, schedule='static'):
            pack_col_pairs16(dYt + <long>k * 16 * N, N, L.n_out - k * 16, N, N, L.pb + k * 16,
                             ldm)
        n_ct = ceil_div(ldm, BNR)
        for task in prange(ceil_div(L.n_in, BMR) * n_ct, num_threads=nthreads,
                           schedule='runtime'):
            i0 = (task // n_ct) * BMR
            j0 = (task % n_ct) * BNR
            bf_tile(min(BMR, L.n_in - i0), min(BNV, (ldm - j0) // VW), N // 2,
                    <const uint32_t *>(colh + <long>i0 * N), N // 2, 1, L.pb + j0, ldm,
                    dwt + i0 * ldm + j0, ldm, 0)
    else:
        transpose(dYt, N, L.n_out, N, xb, ldm, nthreads)
        n_ct = ceil_div(ldm, NR)
        for task in prange(ceil_div(L.n_in, MR) * n_ct, num_threads=nthreads,
                           schedule='runtime'):
            i0 = (task // n_ct) * MR
            j0 = (task % n_ct) * NR
            tile(min(MR, L.n_in - i0), min(NV, (ldm - j0) // VW), N, col + <long>i0 * N, N, 1,
                 xb + j0, ldm, dwt + i0 * ldm + j0, ldm)
    # gW's padding columns are never written: zero since the slab was made.
    transpose(dwt, ldm, L.n_in, L.n_out, L.gW, L.ld, nthreads)
    if L.b != NULL:
        for i in prange(L.n_out, num_threads=nthreads, schedule='static'):
            L.gb[i] = row_sum(dYt + <long>i * N, N)
    # A convolution's W is small (C_out rows): Adam from gW costs little next to the GEMM.
    return linear_adam(L, adam, nthreads) if adam != NULL else 0


cdef void conv_forward(const Linear *L, const float *X, float *col, float *Y, int H, int W,
                       int bp, int act, int nthreads) noexcept nogil:
    """Y[C_out][(H/2)(W/2)bp] = act(W . im2col(X) + b); col keeps im2col(X) for dW."""
    cdef int N = (H // 2) * (W // 2) * bp
    if L.Wh != NULL:
        linear_forward_packed(L, im2col_bf16(X, col, L.n_in // 16, H, W, bp, nthreads), Y, N,
                              act, nthreads)
        return
    im2col(X, col, L.n_in // 16, H, W, bp, nthreads)
    linear_forward(L, col, Y, N, act, nthreads)


cdef void conv_backward_input(const Linear *L, const float *dY, float *dcol, float *dX,
                              const float *X, int x_act, int H, int W, int bp,
                              int nthreads) noexcept nogil:
    """dX[C_in][H*W*bp] = col2im(W^T . dY), times act'(.) of the layer that produced X."""
    linear_transposed(L, dY, dcol, (H // 2) * (W // 2) * bp, nthreads)
    col2im(dcol, dX, L.n_in // 16, H, W, bp, NULL, X, x_act, nthreads)


cdef void tconv_forward(const Linear *L, const ConvBias *B, const float *X, float *colT,
                        float *Y, int H, int W, int bp, int act, int nthreads) noexcept nogil:
    """The transposed convolution from X[C_in][(H/2)(W/2)bp] to Y[C_out][H*W*bp]:
    act(col2im(W^T . X) + b), conv_backward_input's computation."""
    linear_transposed(L, X, colT, (H // 2) * (W // 2) * bp, nthreads)
    col2im(colT, Y, L.n_in // 16, H, W, bp, B.b, NULL, act, nthreads)


cdef int tconv_backward(const Linear *L, const ConvBias *B, const float *dY, const float *X,
                        float *dX, int x_act, float *col, int H, int W, int bp,
                        const Adam *adam, float *xb, float *dwt, int nthreads) noexcept nogil:
    """The transposed convolution's gradients from dY[C_out][H*W*bp]: dX = W . im2col(dY)
    (conv_forward's GEMM, times act'(.) of X's layer), dW = X . im2col(dY)^T, db = the sums of
    dY's channels; with ``adam`` W and b are updated (after dX has read W). Returns the
    non-finite count as linear_backward_params."""
    cdef int N = (H // 2) * (W // 2) * bp
    cdef int c, f
    cdef int bad
    if L.Wh != NULL:
        linear_forward_packed(L, im2col_bf16(dY, col, L.n_in // 16, H, W, bp, nthreads), dX, N,
                              ACT_NONE, nthreads)
    else:
        im2col(dY, col, L.n_in // 16, H, W, bp, nthreads)
        linear_forward(L, col, dX, N, ACT_NONE, nthreads)
    if x_act != ACT_NONE:
        for f in prange(L.n_out, num_threads=nthreads, schedule='static'):
            act_grad_row(dX + <long>f * N, X + <long>f * N, N, x_act)
    bad = conv_backward_params(L, X, col, N, adam, xb, dwt, nthreads)
    for c in prange(B.n, num_threads=nthreads, schedule='static'):
        B.gb[c] = row_sum(dY + <long>c * H * W * bp, H * W * bp)
    if adam != NULL:
        bad += adam_row(B.b, B.mb, B.vb, B.gb, B.n, adam.step_size, adam.inv_bc2_sqrt)
    return bad


cdef ConvBias conv_bias_in_slab(Linear *L, int n):
    """A transposed convolution's bias (n output channels) from the slab pointers that
    linear_in_slab gave its Linear, which then has none."""
    cdef ConvBias B
    B.n = n
    B.b, B.gb, B.mb, B.vb = L.b, L.gb, L.mb, L.vb
    L.b = L.gb = L.mb = L.vb = NULL
    return B


cdef class ConvNet(Net):
    """The convolutional CVAE over a slab that Python carved (cvae.model.Model of a ConvArch):
    encoder conv1 (1 -> C1, 28 -> 14), conv2 (C1 -> C2, 14 -> 7), [flatten ; onehot] -> enc_fc
    (H) -> enc_out (mu, logvar); decoder [z ; onehot] -> dec_fc1 (H) -> dec_fc2 (C2*49) ->
    tconv1 (C2 -> C1, 7 -> 14) -> tconv2 (C1 -> 1, 14 -> 28) -> logits. The same loss, noise,
    fused Adam and Python methods as Net, whose buffers it reuses by role (h1, h2: the conv
    outputs, o, d0, g1, g2, logits)."""
    cdef Linear conv1, conv2, enc_fc, enc_out, dec_fc1, dec_fc2, tconv1, tconv2
    cdef ConvBias tb1, tb2
    cdef float *col1
    cdef float *col2
    cdef float *colT
    cdef float *dwt
    cdef float *h3_t
    cdef float *g3_t
    cdef float *dh3_t
    cdef float *dg3_t
    cdef int c1, c2

    def __init__(self, float[::1] slab not None, dict layout, tuple layers, int latent,
                 int max_bp, str act, int nthreads, str precision="fp32"):
        """``layers``: (name, n_in, n_out, n_bias) of conv1, conv2, enc_fc, enc_out, dec_fc1,
        dec_fc2, tconv1, tconv2 (ConvArch.layers); ``precision`` as for Net."""
        cdef float *base = &slab[0]
        cdef int bf = precision_flag(precision)
        self._buffers(slab, layout, latent, max_bp, act, nthreads, precision)
        dims = {layer[0]: (layer[1], layer[2]) for layer in layers}
        self._layer(&self.conv1)[0] = linear_in_slab(base, layout, dims, "conv1", bf)
        self._layer(&self.conv2)[0] = linear_in_slab(base, layout, dims, "conv2", bf)
        self._layer(&self.enc_fc)[0] = linear_in_slab(base, layout, dims, "enc_fc", bf)
        self._layer(&self.enc_out)[0] = linear_in_slab(base, layout, dims, "enc_out", bf)
        self._layer(&self.dec_fc1)[0] = linear_in_slab(base, layout, dims, "dec_fc1", bf)
        self._layer(&self.dec_fc2)[0] = linear_in_slab(base, layout, dims, "dec_fc2", bf)
        self._layer(&self.tconv1)[0] = linear_in_slab(base, layout, dims, "tconv1", bf)
        self._layer(&self.tconv2)[0] = linear_in_slab(base, layout, dims, "tconv2", bf)
        self.c1 = self.conv1.n_out
        self.c2 = self.conv2.n_out
        self.n_pix = 784
        hidden = self.enc_fc.n_out
        if not (self.conv1.n_in == 16 and self.conv2.n_in == 16 * self.c1
                and self.enc_fc.n_in == 49 * self.c2 + 10 and self.enc_out.n_in == hidden
                and self.enc_out.n_out == 2 * latent and self.dec_fc1.n_in == latent + 10
                and self.dec_fc2.n_out == 49 * self.c2
                and self.tconv1.n_out == self.c2 and self.tconv1.n_in == 16 * self.c1
                and self.tconv2.n_out == self.c1 and self.tconv2.n_in == 16):
            raise ValueError("layers do not form a convolutional CVAE of this latent size")
        self.tb1 = conv_bias_in_slab(&self.tconv1, self.c1)
        self.tb2 = conv_bias_in_slab(&self.tconv2, 1)
        self._bias(&self.tb1)
        self._bias(&self.tb2)
        self.x_t = at(base, layout, "act.x")
        self.col1 = at(base, layout, "act.col1")
        self.h1_t = at(base, layout, "act.conv1")
        self.col2 = at(base, layout, "act.col2")
        self.h2_t = at(base, layout, "act.conv2")
        self.h3_t = at(base, layout, "act.enc_fc")
        self.o_t = at(base, layout, "act.enc_out")
        self.d0_t = at(base, layout, "act.dec_in")
        self.g1_t = at(base, layout, "act.dec_fc1")
        self.g2_t = at(base, layout, "act.dec_fc2")
        self.g3_t = at(base, layout, "act.tconv1")
        self.logits_t = at(base, layout, "act.tconv2")
        self.dh1_t = at(base, layout, "actgrad.conv1")
        self.dh2_t = at(base, layout, "actgrad.conv2")
        self.dh3_t = at(base, layout, "actgrad.enc_fc")
        self.do_t = at(base, layout, "actgrad.enc_out")
        self.dd0_t = at(base, layout, "actgrad.dec_in")
        self.dg1_t = at(base, layout, "actgrad.dec_fc1")
        self.dg2_t = at(base, layout, "actgrad.dec_fc2")
        self.dg3_t = at(base, layout, "actgrad.tconv1")
        self.dlogits_t = at(base, layout, "actgrad.tconv2")
        self.colT = at(base, layout, "scratch.col")
        self.dwt = at(base, layout, "scratch.dwt")

    cdef void _encode(self, const uint8_t *pixels, const uint8_t *labels, int batch,
                      int bp) noexcept nogil:
        cdef int nt = self.nthreads
        pixel_rows(pixels, self.x_t, self.n_pix, batch, bp, nt)
        conv_forward(&self.conv1, self.x_t, self.col1, self.h1_t, 28, 28, bp, self.act, nt)
        conv_forward(&self.conv2, self.h1_t, self.col2, self.h2_t, 14, 14, bp, self.act, nt)
        onehot_rows(self.h2_t + 49 * self.c2 * bp, labels, 10, batch, bp, bp)
        linear_forward(&self.enc_fc, self.h2_t, self.h3_t, bp, self.act, nt)
        linear_forward(&self.enc_out, self.h3_t, self.o_t, bp, ACT_NONE, nt)

    cdef void _decode(self, const uint8_t *labels, int batch, int bp) noexcept nogil:
        """Decoder from the z rows already in d0_t."""
        cdef int nt = self.nthreads
        onehot_rows(self.d0_t + self.latent * bp, labels, 10, batch, bp, bp)
        linear_forward(&self.dec_fc1, self.d0_t, self.g1_t, bp, self.act, nt)
        linear_forward(&self.dec_fc2, self.g1_t, self.g2_t, bp, self.act, nt)
        tconv_forward(&self.tconv1, &self.tb1, self.g2_t, self.colT, self.g3_t, 14, 14, bp,
                      self.act, nt)
        tconv_forward(&self.tconv2, &self.tb2, self.g3_t, self.colT, self.logits_t, 28, 28, bp,
                      ACT_NONE, nt)

    cdef void _backward(self, int batch, int bp, float beta, const Adam *adam) noexcept nogil:
        cdef int nt = self.nthreads, act = self.act
        cdef int n1 = 196 * bp, n2 = 49 * bp
        self.bad = 0
        # Each layer's dX reads W before the (optionally fused) update of that W.
        self.bad += tconv_backward(&self.tconv2, &self.tb2, self.dlogits_t, self.g3_t,
                                   self.dg3_t, act, self.colT, 28, 28, bp, adam, self.xb,
                                   self.dwt, nt)
        self.bad += tconv_backward(&self.tconv1, &self.tb1, self.dg3_t, self.g2_t, self.dg2_t,
                                   act, self.colT, 14, 14, bp, adam, self.xb, self.dwt, nt)
        self.bad += self._backward_layer(&self.dec_fc2, self.dg2_t, self.dg1_t, self.g1_t, act,
                                         batch, bp, adam)
        self.bad += self._backward_layer(&self.dec_fc1, self.dg1_t, self.dd0_t, self.d0_t,
                                         ACT_NONE, batch, bp, adam)
        reparam_backward(self.o_t, self.eps_t, self.dd0_t, self.do_t, self.latent, batch, bp,
                         beta / batch, nt)
        self.bad += self._backward_layer(&self.enc_out, self.do_t, self.dh3_t, self.h3_t, act,
                                         batch, bp, adam)
        self.bad += self._backward_layer(&self.enc_fc, self.dh3_t, self.dh2_t, self.h2_t, act,
                                         batch, bp, adam)
        conv_backward_input(&self.conv2, self.dh2_t, self.colT, self.dh1_t, self.h1_t, act, 14,
                            14, bp, nt)
        self.bad += conv_backward_params(&self.conv2, self.dh2_t, self.col2, n2, adam, self.xb,
                                         self.dwt, nt)
        self.bad += conv_backward_params(&self.conv1, self.dh1_t, self.col1, n1, adam, self.xb,
                                         self.dwt, nt)

# ---------------------------------------------------------------- the digit classifier

cdef class Classifier(Network):
    """The project's digit classifier: pixels -> fc1 -> fc2 -> fc3 (class logits), softmax
    cross-entropy, the same linear layers and slab conventions as Net (cvae.classifier carves
    the slab). fc2's output is the feature space of the FID."""
    cdef Linear fc1, fc2, fc3
    cdef float *x_t
    cdef float *h1_t
    cdef float *h2_t
    cdef float *logits_t
    cdef float *dh1_t
    cdef float *dh2_t
    cdef float *dlogits_t
    cdef float *loss
    cdef int n_pix, n_cls

    def __init__(self, float[::1] slab not None, dict layout, tuple layers, int max_bp, str act,
                 int nthreads, str precision="fp32"):
        """``layers``: (name, n_in, n_out) of fc1, fc2, fc3; ``precision`` as for Net."""
        cdef float *base = &slab[0]
        self._settings(slab, layout, max_bp, act, nthreads, precision)
        dims = {name: (n_in, n_out) for name, n_in, n_out in layers}
        self._layer(&self.fc1)[0] = linear_in_slab(base, layout, dims, "fc1", self.bf16)
        self._layer(&self.fc2)[0] = linear_in_slab(base, layout, dims, "fc2", self.bf16)
        self._layer(&self.fc3)[0] = linear_in_slab(base, layout, dims, "fc3", self.bf16)
        self.n_pix = self.fc1.n_in
        self.n_cls = self.fc3.n_out
        if self.fc2.n_in != self.fc1.n_out or self.fc3.n_in != self.fc2.n_out:
            raise ValueError("layers do not chain")
        self.x_t = at(base, layout, "act.x")
        self.h1_t = at(base, layout, "act.fc1")
        self.h2_t = at(base, layout, "act.fc2")
        self.logits_t = at(base, layout, "act.fc3")
        self.dh1_t = at(base, layout, "actgrad.fc1")
        self.dh2_t = at(base, layout, "actgrad.fc2")
        self.dlogits_t = at(base, layout, "actgrad.fc3")
        self.loss = at(base, layout, "per_sample.loss")

    cdef void _forward(self, const uint8_t *pixels, int batch, int bp) noexcept nogil:
        pixel_rows(pixels, self.x_t, self.n_pix, batch, bp, self.nthreads)
        linear_forward(&self.fc1, self.x_t, self.h1_t, bp, self.act, self.nthreads)
        linear_forward(&self.fc2, self.h1_t, self.h2_t, bp, self.act, self.nthreads)
        linear_forward(&self.fc3, self.h2_t, self.logits_t, bp, ACT_NONE, self.nthreads)

    cdef void _backward(self, int batch, int bp, const Adam *adam) noexcept nogil:
        self.bad = 0
        self.bad += self._backward_layer(&self.fc3, self.dlogits_t, self.dh2_t, self.h2_t, self.act,
                                         batch, bp, adam)
        self.bad += self._backward_layer(&self.fc2, self.dh2_t, self.dh1_t, self.h1_t, self.act,
                                         batch, bp, adam)
        self.bad += self._backward_layer(&self.fc1, self.dh1_t, NULL, self.x_t, ACT_NONE,
                                         batch, bp, adam)

    def step(self, const uint8_t[:, ::1] pixels not None, const uint8_t[::1] labels not None,
             float lr=0.0, long adam_t=0):
        """One training step; returns the cross-entropy summed over the batch. With
        adam_t > 0 Adam is fused into the backward pass, else the gradients are stored."""
        cdef int batch = pixels.shape[0]
        cdef int bp = ceil_div(batch, 16) * 16
        cdef int k
        cdef double total = 0.0
        cdef Adam adam
        cdef const Adam *adam_p = NULL
        check_pixels(batch, pixels.shape[1], self.n_pix, self.max_bp)
        if labels.shape[0] != batch:
            raise ValueError("labels must be (batch,)")
        for k in range(batch):
            if labels[k] >= self.n_cls:
                raise ValueError(f"label {labels[k]} is not below {self.n_cls}")
        if adam_t > 0:
            adam = adam_step(lr, adam_t)
            adam_p = &adam
        with nogil:
            self._forward(&pixels[0, 0], batch, bp)
            softmax_xent_forward_backward(self.logits_t, &labels[0], self.dlogits_t, self.loss,
                                          self.n_cls, batch, bp, 1.0 / batch)
            self._backward(batch, bp, adam_p)
        for k in range(batch):
            total += self.loss[k]
        return total

    def forward(self, const uint8_t[:, ::1] pixels not None, float[:, ::1] logits_out not None,
                float[:, ::1] features_out not None):
        """Class logits (batch, n_cls) and the last hidden layer (batch, fc2 outputs)."""
        cdef int batch = pixels.shape[0]
        cdef int bp = ceil_div(batch, 16) * 16
        cdef int k, c
        check_pixels(batch, pixels.shape[1], self.n_pix, self.max_bp)
        check_out("logits_out", logits_out.shape[0], logits_out.shape[1], batch, self.n_cls)
        check_out("features_out", features_out.shape[0], features_out.shape[1], batch,
                  self.fc2.n_out)
        with nogil:
            self._forward(&pixels[0, 0], batch, bp)
        for k in range(batch):
            for c in range(self.n_cls):
                logits_out[k, c] = self.logits_t[c * bp + k]
            for c in range(self.fc2.n_out):
                features_out[k, c] = self.h2_t[c * bp + k]


# ---------------------------------------------------------------- the flow-matching prior

cdef enum:
    MAX_BLOCKS = 8
    # Codes a thread integrates at a time: 4 bf16 tiles wide. Lanes of 64 or 128 were no
    # faster alone, and their kernels' calls cost more per code.
    LANE_COLUMNS = 256

ODE_METHODS = {"euler": 0, "midpoint": 1, "heun": 2}


cdef class FlowNet(Network):
    """The velocity network v(z_t, t, y) of the latent prior (cvae.prior carves its slab).

    in: x = [z_t ; time rows ; onehot(y)] -> h_0 = W_in x; block k: h_k = h_{k-1} +
    W_kb act(W_ka [h_{k-1} ; time rows ; onehot(y)]); out: v = W_out h_K. The conditioning
    rows sit below h_k in each residual buffer s_k, so every block sees t and y directly.
    Label n_classes is the null label of classifier-free guidance.

    While sampling, every code of a step shares its t and has one of n_classes + 1 labels, so
    the conditioning rows' share of W_in x and W_ka [...] is one bias per class: worked out
    once a step (_class_tables, in fp32) instead of in every column's product."""
    cdef Linear inp, out
    cdef Linear block_a[MAX_BLOCKS]
    cdef Linear block_b[MAX_BLOCKS]
    cdef float *s[MAX_BLOCKS + 1]
    cdef float *ds[MAX_BLOCKS + 1]
    cdef float *a[MAX_BLOCKS]
    cdef float *da[MAX_BLOCKS]
    cdef float *x_t
    cdef float *v_t
    cdef float *dv_t
    cdef float *target_t
    cdef float *z_t
    cdef float *z_mid_t
    cdef float *v_first_t
    cdef float *v_uncond_t
    cdef float *t
    cdef float *loss
    cdef float *tables      # per thread: n_blocks + 1 class-bias tables [hidden][n_classes + 1]
    cdef uint8_t *cls       # each column's class while sampling
    cdef int latent, n_freq, n_classes, n_cond, hidden, n_blocks

    def __init__(self, float[::1] slab not None, dict layout, tuple layers, int latent,
                 int n_freq, int n_classes, int max_bp, str act, int nthreads,
                 str precision="fp32"):
        """``layers``: (name, n_in, n_out) of in, res1a, res1b, ..., out (PriorArch.layers);
        ``precision`` as for Net."""
        cdef float *base = &slab[0]
        cdef int k
        self._settings(slab, layout, max_bp, act, nthreads, precision)
        self.latent = latent
        self.n_freq = n_freq
        self.n_classes = n_classes
        self.n_cond = 2 * n_freq + n_classes + 1
        self.n_blocks = (len(layers) - 2) // 2
        if not 1 <= self.n_blocks <= MAX_BLOCKS or len(layers) != 2 * self.n_blocks + 2:
            raise ValueError(f"a velocity network has 1 to {MAX_BLOCKS} residual blocks")
        dims = {name: (n_in, n_out) for name, n_in, n_out in layers}
        self._layer(&self.inp)[0] = linear_in_slab(base, layout, dims, "in", self.bf16)
        self._layer(&self.out)[0] = linear_in_slab(base, layout, dims, "out", self.bf16)
        self.hidden = self.inp.n_out
        ok = (self.inp.n_in == latent + self.n_cond and self.out.n_in == self.hidden
              and self.out.n_out == latent)
        for k in range(self.n_blocks):
            self._layer(&self.block_a[k])[0] = linear_in_slab(base, layout, dims,
                                                              f"res{k + 1}a", self.bf16)
            self._layer(&self.block_b[k])[0] = linear_in_slab(base, layout, dims,
                                                              f"res{k + 1}b", self.bf16)
            ok = ok and (self.block_a[k].n_in == self.hidden + self.n_cond
                         and self.block_a[k].n_out == self.hidden
                         and self.block_b[k].n_in == self.hidden
                         and self.block_b[k].n_out == self.hidden)
            self.a[k] = at(base, layout, f"act.a{k + 1}")
            self.da[k] = at(base, layout, f"actgrad.a{k + 1}")
        if not ok:
            raise ValueError("layers do not form a velocity network of this latent size")
        for k in range(self.n_blocks + 1):
            self.s[k] = at(base, layout, f"act.s{k}")
            self.ds[k] = at(base, layout, f"actgrad.s{k}")
        self.x_t = at(base, layout, "act.x")
        self.v_t = at(base, layout, "act.v")
        self.dv_t = at(base, layout, "actgrad.v")
        self.target_t = at(base, layout, "act.target")
        self.z_t = at(base, layout, "act.z")
        self.z_mid_t = at(base, layout, "act.z_mid")
        self.v_first_t = at(base, layout, "act.v_first")
        self.v_uncond_t = at(base, layout, "act.v_uncond")
        self.t = at(base, layout, "per_sample.t")
        self.loss = at(base, layout, "per_sample.loss")
        self.tables = at(base, layout, "scratch.class_tables")
        self.cls = <uint8_t *>at(base, layout, "per_sample.cls")

    cdef void _forward(self, const float *x, const float *tables, int c0, int n, int ld,
                       int nt) noexcept nogil:
        """v on columns c0 .. c0 + n of rows of ld floats (the batch, or a lane of integrate)
        with nt threads. tables NULL: x is the input rows [z_t ; time ; onehot(y)] (x_t);
        else x holds z_t alone and the conditioning comes from tables (_class_tables) by each
        column's class in cls."""
        cdef int k, H = self.hidden, n_tab = self.n_classes + 1
        cdef ClassBias cb_in, cb_a
        cdef const ClassBias *p_in = NULL
        cdef const ClassBias *p_a = NULL
        if tables == NULL:
            for k in range(self.n_blocks + 1):
                copy_rows(self.s[k] + H * ld + c0, x + self.latent * ld + c0, self.n_cond, n,
                          ld)
        else:
            cb_in = ClassBias(k_in=self.latent, n_cls=n_tab, bias=tables, cls=self.cls)
            cb_a = ClassBias(k_in=H, n_cls=n_tab, bias=tables, cls=self.cls)
            p_in, p_a = &cb_in, &cb_a
        linear_forward_cols(&self.inp, x, self.s[0], c0, n, ld, ACT_NONE, p_in, nt)
        for k in range(self.n_blocks):
            if p_a != NULL:
                cb_a.bias = tables + (k + 1) * H * n_tab
            linear_forward_cols(&self.block_a[k], self.s[k], self.a[k], c0, n, ld, self.act,
                                p_a, nt)
            linear_forward_cols(&self.block_b[k], self.a[k], self.s[k + 1], c0, n, ld, ACT_NONE,
                                NULL, nt)
            rows_axpby(self.s[k + 1] + c0, 1.0, self.s[k] + c0, 1.0, H, n, ld, nt)
        linear_forward_cols(&self.out, self.s[self.n_blocks], self.v_t, c0, n, ld, ACT_NONE,
                            NULL, nt)

    cdef float *_class_tables(self, float t, int slot) noexcept nogil:
        """Table slot `slot` (one per thread) filled for time t: for the input layer and each
        block's first layer, bias[o][c] = b[o] + W[o, time rows] . time(t) + W[o, onehot row
        c], the conditioning's share of output o for a code of class c (n_classes: the null
        label). In fp32 from the master weights, also in bf16, where only GEMM inputs are
        rounded."""
        cdef int n_tab = self.n_classes + 1, H = self.hidden, n_time = 2 * self.n_freq
        cdef float *tables = self.tables + slot * (self.n_blocks + 1) * H * n_tab
        cdef float time_row[2 * 24]     # n_freq <= 24: PriorArch's bound
        cdef const Linear *lin
        cdef int i, k, o, f, c, off
        cdef float acc, w
        for i in range(self.n_freq):
            w = <float>(1 << i)
            time_row[2 * i] = sinf(w * t)
            time_row[2 * i + 1] = cosf(w * t)
        for k in range(self.n_blocks + 1):
            lin = &self.inp if k == 0 else &self.block_a[k - 1]
            off = self.latent if k == 0 else H
            for o in range(H):
                acc = lin.b[o]
                for f in range(n_time):
                    acc = acc + lin.W[o * lin.ld + off + f] * time_row[f]
                for c in range(n_tab):
                    tables[(k * H + o) * n_tab + c] = acc + lin.W[o * lin.ld + off + n_time + c]
        return tables

    cdef void _backward(self, int batch, int bp, const Adam *adam) noexcept nogil:
        cdef int k, nt = self.nthreads, K = self.n_blocks
        self.bad = 0
        # Each layer's dX reads W before the (optionally fused) update of that W.
        self.bad += self._backward_layer(&self.out, self.dv_t, self.ds[K], self.s[K], ACT_NONE,
                                         batch, bp, adam)
        for k in range(K - 1, -1, -1):
            self.bad += self._backward_layer(&self.block_b[k], self.ds[k + 1], self.da[k],
                                             self.a[k], self.act, batch, bp, adam)
            self.bad += self._backward_layer(&self.block_a[k], self.da[k], self.ds[k], self.s[k],
                                             ACT_NONE, batch, bp, adam)
            # The residual path: dL/dh_k reaches h_{k-1} unchanged.
            rows_axpby(self.ds[k], 1.0, self.ds[k + 1], 1.0, self.hidden, bp, bp, nt)
        self.bad += self._backward_layer(&self.inp, self.ds[0], NULL, self.x_t, ACT_NONE,
                                         batch, bp, adam)

    cdef int _check(self, Py_ssize_t batch, str name, Py_ssize_t rows, Py_ssize_t cols,
                    int width) except -1:
        if batch < 1 or ceil_div(batch, 16) * 16 > self.max_bp:
            raise ValueError(f"batch of {batch} does not fit this model's slab")
        if rows != batch or cols != width:
            raise ValueError(f"{name} must be ({batch}, {width}), got ({rows}, {cols})")
        return 0

    cdef int _check_labels(self, const uint8_t[::1] labels, Py_ssize_t batch,
                           int highest) except -1:
        cdef Py_ssize_t k
        if labels.shape[0] != batch:
            raise ValueError("labels must be (batch,)")
        for k in range(batch):
            if labels[k] > highest:
                raise ValueError(f"label {labels[k]} is above {highest}")
        return 0

    cdef void _input_rows(self, const float *z, const float *t, const uint8_t *labels,
                          int batch, int bp) noexcept nogil:
        """x_t = [z (batch-major) ; time rows of t ; onehot(labels)]."""
        cdef int l, k
        for l in range(self.latent):
            for k in range(bp):
                self.x_t[l * bp + k] = z[k * self.latent + l] if k < batch else 0.0
        time_rows(self.x_t + self.latent * bp, t, self.n_freq, batch, bp, self.nthreads)
        onehot_rows(self.x_t + (self.latent + 2 * self.n_freq) * bp, labels, self.n_classes + 1,
                    batch, bp, bp)

    cdef double _train(self, int batch, int bp, float lr, long adam_t):
        """Loss, backward and (adam_t > 0) the fused Adam step on the rows already in x_t and
        target_t; returns the loss summed over the batch."""
        cdef Adam adam
        cdef const Adam *adam_p = NULL
        cdef double total = 0.0
        cdef int k
        if adam_t > 0:
            adam = adam_step(lr, adam_t)
            adam_p = &adam
        with nogil:
            self._forward(self.x_t, NULL, 0, bp, bp, self.nthreads)
            mse_forward_backward(self.v_t, self.target_t, self.dv_t, self.loss, self.latent,
                                 batch, bp, 1.0 / batch, self.nthreads)
            self._backward(batch, bp, adam_p)
        for k in range(batch):
            total += self.loss[k]
        return total

    def step(self, const float[:, ::1] mu not None, const float[:, ::1] logvar not None,
             const uint8_t[::1] labels not None, uint64_t seed, uint64_t step, float drop_prob,
             float lr=0.0, long adam_t=0):
        """One training step on a batch of codes (see flow_pairs); returns the loss summed
        over the batch. With adam_t > 0 Adam is fused into the backward pass, else the
        gradients are stored."""
        cdef int batch = mu.shape[0]
        cdef int bp = ceil_div(batch, 16) * 16
        self._check(batch, "mu", mu.shape[0], mu.shape[1], self.latent)
        self._check(batch, "logvar", logvar.shape[0], logvar.shape[1], self.latent)
        self._check_labels(labels, batch, self.n_classes - 1)
        with nogil:
            flow_pairs(&mu[0, 0], &logvar[0, 0], &labels[0], self.x_t, self.target_t, self.t,
                       self.latent, self.n_freq, self.n_classes, drop_prob, seed, step, batch, bp,
                       self.nthreads)
        return self._train(batch, bp, lr, adam_t)

    def step_given(self, const float[:, ::1] z not None, const float[::1] t not None,
                   const uint8_t[::1] labels not None, const float[:, ::1] target not None,
                   float lr=0.0, long adam_t=0):
        """step() on given pairs: z_t, t, labels (n_classes: the null label) and target."""
        cdef int batch = z.shape[0]
        cdef int bp = ceil_div(batch, 16) * 16
        cdef int l, k
        self._check(batch, "z", z.shape[0], z.shape[1], self.latent)
        self._check(batch, "target", target.shape[0], target.shape[1], self.latent)
        self._check(batch, "t", t.shape[0], 1, 1)
        self._check_labels(labels, batch, self.n_classes)
        with nogil:
            self._input_rows(&z[0, 0], &t[0], &labels[0], batch, bp)
            for l in range(self.latent):
                for k in range(bp):
                    self.target_t[l * bp + k] = target[k, l] if k < batch else 0.0
        return self._train(batch, bp, lr, adam_t)

    def pairs(self, const float[:, ::1] mu not None, const float[:, ::1] logvar not None,
              const uint8_t[::1] labels not None, uint64_t seed, uint64_t step, float drop_prob,
              float[:, ::1] z_out not None, float[::1] t_out not None,
              uint8_t[::1] labels_out not None, float[:, ::1] target_out not None):
        """The z_t, t, labels (after the drop) and target that step() would train on."""
        cdef int batch = mu.shape[0]
        cdef int bp = ceil_div(batch, 16) * 16
        cdef int k, l, c
        cdef float *label_rows
        self._check(batch, "mu", mu.shape[0], mu.shape[1], self.latent)
        self._check(batch, "logvar", logvar.shape[0], logvar.shape[1], self.latent)
        self._check_labels(labels, batch, self.n_classes - 1)
        check_out("z_out", z_out.shape[0], z_out.shape[1], batch, self.latent)
        check_out("target_out", target_out.shape[0], target_out.shape[1], batch, self.latent)
        check_out("t_out", t_out.shape[0], 1, batch, 1)
        check_out("labels_out", labels_out.shape[0], 1, batch, 1)
        flow_pairs(&mu[0, 0], &logvar[0, 0], &labels[0], self.x_t, self.target_t, self.t,
                   self.latent, self.n_freq, self.n_classes, drop_prob, seed, step, batch, bp,
                   self.nthreads)
        label_rows = self.x_t + (self.latent + 2 * self.n_freq) * bp
        for k in range(batch):
            t_out[k] = self.t[k]
            for l in range(self.latent):
                z_out[k, l] = self.x_t[l * bp + k]
                target_out[k, l] = self.target_t[l * bp + k]
            for c in range(self.n_classes + 1):
                if label_rows[c * bp + k] == 1.0:
                    labels_out[k] = c

    def velocity(self, const float[:, ::1] z not None, const float[::1] t not None,
                 const uint8_t[::1] labels not None, float[:, ::1] v_out not None):
        """v(z, t, label) as (batch, latent); label n_classes is the null label."""
        cdef int batch = z.shape[0]
        cdef int bp = ceil_div(batch, 16) * 16
        cdef int k, l
        self._check(batch, "z", z.shape[0], z.shape[1], self.latent)
        self._check(batch, "t", t.shape[0], 1, 1)
        self._check_labels(labels, batch, self.n_classes)
        check_out("v_out", v_out.shape[0], v_out.shape[1], batch, self.latent)
        with nogil:
            self._input_rows(&z[0, 0], &t[0], &labels[0], batch, bp)
            self._forward(self.x_t, NULL, 0, bp, bp, self.nthreads)
        for k in range(batch):
            for l in range(self.latent):
                v_out[k, l] = self.v_t[l * bp + k]

    cdef void _velocity_at(self, const float *z_t, float t, const uint8_t *labels,
                           float guidance, int batch, int slot, int c0, int n,
                           int ld) noexcept nogil:
        """v_t = v(z_t, t, y) for feature-major z_t on columns c0 .. c0 + n (the first `batch`
        of them codes) of rows of ld floats, on one thread; with guidance w,
        (1 + w)·v(z_t, t, y) - w·v(z_t, t, null)."""
        cdef int k
        cdef float *tables = self._class_tables(t, slot)
        cdef uint8_t *cls = self.cls + c0
        if guidance != 0.0:
            memset(cls, self.n_classes, n)
            self._forward(z_t, tables, c0, n, ld, 1)
            copy_rows(self.v_uncond_t + c0, self.v_t + c0, self.latent, n, ld)
        for k in range(n):
            cls[k] = labels[k] if k < batch else self.n_classes
        self._forward(z_t, tables, c0, n, ld, 1)
        if guidance != 0.0:
            rows_axpby(self.v_t + c0, 1.0 + guidance, self.v_uncond_t + c0, -guidance,
                       self.latent, n, ld, 1)

    cdef void _integrate_lane(self, const uint8_t *labels, int steps, int m, float guidance,
                              int batch, int slot, int c0, int n, int ld) noexcept nogil:
        """integrate's ODE on columns c0 .. c0 + n of z_t (the first `batch` codes), on one
        thread, whose class-bias tables are slot `slot`: each code's path depends on that code
        alone."""
        cdef int i, L = self.latent
        cdef float h = 1.0 / steps
        cdef float t0
        cdef float *z = self.z_t + c0
        cdef float *z_mid = self.z_mid_t + c0
        cdef float *v = self.v_t + c0
        cdef float *v_first = self.v_first_t + c0
        for i in range(steps):
            t0 = i * h
            self._velocity_at(self.z_t, t0, labels, guidance, batch, slot, c0, n, ld)
            if m == 0:
                rows_axpby(z, 1.0, v, h, L, n, ld, 1)
            elif m == 1:
                copy_rows(z_mid, z, L, n, ld)
                rows_axpby(z_mid, 1.0, v, 0.5 * h, L, n, ld, 1)
                self._velocity_at(self.z_mid_t, t0 + 0.5 * h, labels, guidance, batch, slot, c0,
                                  n, ld)
                rows_axpby(z, 1.0, v, h, L, n, ld, 1)
            else:
                copy_rows(v_first, v, L, n, ld)
                copy_rows(z_mid, z, L, n, ld)
                rows_axpby(z_mid, 1.0, v_first, h, L, n, ld, 1)
                self._velocity_at(self.z_mid_t, t0 + h, labels, guidance, batch, slot, c0, n,
                                  ld)
                rows_axpby(z, 1.0, v_first, 0.5 * h, L, n, ld, 1)
                rows_axpby(z, 1.0, v, 0.5 * h, L, n, ld, 1)

    def integrate(self, float[:, ::1] z not None, const uint8_t[::1] labels not None,
                  int steps, str method, float guidance):
        """Solve dz/dt = v(z, t, y) from t = 0 to 1 in `steps` equal steps of `method`
        (euler, midpoint or heun), in place: z (batch, latent) goes in as the draws z0 and
        comes out as z1.

        The batch's columns are cut into lanes of LANE_COLUMNS, each integrated from the first
        step to the last by one thread, the threads taking lanes as they finish the last.
        The ODE's loops are a few microseconds each, some hundred per batch: as one team over
        every loop the threads would meet at a barrier after each, which costs more than the
        loop where waiting threads sleep (cvae generate's do, see
        cvae.kernels.sleep_when_waiting). Many short lanes, not one per thread: in cvae
        generate the writer thread takes a core now and then, and a thread slowed by it then
        does fewer lanes instead of holding the others up (one half-batch lane per thread
        took twice as long there as alone). A column's results do not depend on its lane, so
        they are the same bits for any thread count."""
        cdef int batch = z.shape[0]
        cdef int bp = ceil_div(batch, 16) * 16
        cdef int k, l, lane, c0, n, m = ODE_METHODS[method]
        cdef int L = self.latent
        cdef int lanes = ceil_div(bp, LANE_COLUMNS)
        self._check(batch, "z", z.shape[0], z.shape[1], L)
        self._check_labels(labels, batch, self.n_classes - 1)
        if steps < 1:
            raise ValueError("steps must be positive")
        for l in range(L):
            for k in range(bp):
                self.z_t[l * bp + k] = z[k, l] if k < batch else 0.0
        with nogil:
            for lane in prange(lanes, num_threads=min(self.nthreads, lanes),
                               schedule='dynamic'):
                c0 = lane * LANE_COLUMNS
                n = min(LANE_COLUMNS, bp - c0)
                self._integrate_lane(&labels[c0] if c0 < batch else &labels[0], steps, m,
                                     guidance, max(0, min(batch - c0, n)), threadid(), c0, n,
                                     bp)
        for k in range(batch):
            for l in range(L):
                z[k, l] = self.z_t[l * bp + k]
