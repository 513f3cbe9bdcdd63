"""bf16 precision: every GEMM's inputs rounded to bf16 (round to nearest even), products
accumulated in fp32; everything else fp32.

Tolerances come from bf16's unit roundoff u = 2^-8 (8 significant bits):

- One GEMM, checked exactly: rounding its two operands in float64 (the test's own rounding,
  independent of the kernels') leaves only the fp32 accumulation, whose error is at most
  about K * 2^-24 * sum_k |a_k b_k| (K products summed in fp32). Those checks (forward, dX and
  dW of one layer, odd K, batch tails) are tight: a wrong pairing, a swapped half or an
  unrounded operand is off by ~u, thousands of times the bound.
- A whole network against the float64 reference: each operand's rounding moves a product by
  at most 2u relative; with independent signs a GEMM's output moves by ~u * sqrt(sum (a b)^2),
  which is ~u of the output's own scale for sums without heavy cancellation. A tensor at the
  end of a chain of n GEMMs (forward then backward) collects n such errors: ~u * sqrt(n) of its
  scale. We allow 4 u sqrt(n) of the tensor's max |ref| entry-wise (4 sigma) and, tighter,
  2 u sqrt(n) for the norm-wise relative error. For the same reason the bf16 kernels must
  differ from the fp32 kernels (by more than fp32's own error), or nothing was rounded.
"""

import numpy as np
import pytest

from cvae import classifier as C
from cvae import kernels
from cvae import prior as P
from cvae.errors import CvaeError
from cvae.model import Arch, Model

from . import reference as R
from .conftest import assert_training_allocates_nothing, params64, runnable_builds
from .test_gradients import make_model

U = 2.0 ** -8           # bf16 unit roundoff
U32 = 2.0 ** -24        # fp32 unit roundoff
ODD = dict(h1=23, h2=17, latent=7)  # odd K and odd row counts in every GEMM direction


# --------------------------------------------------------------------------- helpers

def bf16_round(x):
    """Round to nearest even bf16, as float64: an independent NumPy version of VCVTNEPS2BF16
    (denormals to signed zero, NaN stays NaN)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    mag = u & 0x7FFFFFFF
    r = np.where(mag < 0x00800000, (u >> 16) & 0x8000, r)
    r = np.where(mag > 0x7F800000, ((u >> 16) | 0x40) & 0xFFFF, r)
    return r.astype(np.uint16)


def bf16_value(x):
    """float64 value of bf16_round(x)."""
    h = bf16_round(x).astype(np.uint32) << 16
    return h.view(np.float32).astype(np.float64)


def gemm_bound(a, b):
    """The fp32 accumulation bound of a @ b on already-rounded operands: K u32 sum |a b|."""
    k = a.shape[1]
    return 2 * k * U32 * (np.abs(a) @ np.abs(b)) + 1e-30


def with_bf16(fp32_model, make, threads=1):
    """A bf16 twin of a model: same architecture and parameters (copies then synced)."""
    twin = make(threads)
    for k, v in fp32_model.params.items():
        twin.params[k][...] = v
    twin.sync_bf16()
    return twin


def cvae_pair(arch, max_batch=64, threads=1):
    m32 = make_model(arch, max_batch=max_batch, threads=threads)
    return m32, with_bf16(m32, lambda t: Model(arch, max_batch=max_batch, threads=t,
                                               precision="bf16"), threads)


def net_tolerance_problems(name, got, ref, n_gemms):
    """The network-level check of the module's doc."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    problems = [R.mismatch(name, got, ref, rtol=0.0, atol_scale=4 * U * np.sqrt(n_gemms))]
    rel = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-300)
    if scale > 0 and rel > 2 * U * np.sqrt(n_gemms):
        problems.append(f"{name}: norm-wise relative error {rel:.3g} > {2 * U * np.sqrt(n_gemms):.3g}")
    return [p for p in problems if p]


# GEMMs on the path to each CVAE tensor: forward layers up to it, then backward dX and dW.
CVAE_FORWARD_DEPTH = {"enc1": 1, "enc2": 2, "mu": 3, "logvar": 3, "z": 3, "dec1": 4, "dec2": 5,
                      "logits": 6}
CVAE_GRAD_DEPTH = {"dec3": 7, "dec2": 8, "dec1": 9, "enc3": 10, "enc2": 11, "enc1": 12}


# --------------------------------------------------------------------------- rounding


def test_kernel_rounding_is_round_to_nearest_even():
    k = kernels.kernels()
    ties = np.array([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -(1.0 + 2.0 ** -8)], np.float32)
    midpoint_to_inf = 2.0 ** 127 * (2 - 2.0 ** -8)  # between the largest bf16 and infinity
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3.4e38,
                         midpoint_to_inf], np.float32)
    rng = np.random.default_rng(0)
    x = np.concatenate([ties, specials, rng.normal(0, 10, 1000).astype(np.float32),
                        rng.integers(0, 2 ** 32, 1000, dtype=np.uint32).view(np.float32)])
    out = np.zeros(len(x), np.uint16)
    k.bf16_round(x, out)
    assert out.tolist() == bf16_round(x).tolist()
    # ties go to even: 1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6
    assert out[0] == 0x3F80 and out[1] == 0x3F82 and out[2] == 0xBF80
    assert out[5] == 0x7F80 and out[6] == 0xFF80 and (out[7] & 0x7FFF) > 0x7F80
    assert out[8] == 0 and out[9] == 0x8000   # denormals flush, keeping the sign
    assert out[11] == 0x7F80                   # rounds up to infinity


# --------------------------------------------------------------------------- one GEMM, exactly

@pytest.mark.parametrize("batch,act", [(37, "elu"), (64, "elu"), (37, "relu"), (1, "elu")])
def test_single_gemms_match_rounded_float64(batch, act):
    """enc1's forward, dec3's dX and dec3's dW from bf16-rounded operands in float64, within
    the fp32 accumulation bound: odd K (ODD arch: dec3 has 23 inputs; enc1 23 outputs) and
    a batch tail (37)."""
    arch = Arch(act=act, **ODD)
    _, m = cvae_pair(arch)
    pixels, labels = R.digit_like_pixels(batch, seed=batch), R.random_labels(batch, seed=batch)
    m.forward_backward(pixels, labels, 1.0, 3, 4)
    acts = {k: np.array(v, np.float64) for k, v in m.acts.items()}
    act_grads = {k: np.array(v, np.float64) for k, v in m.act_grads.items()}
    p = {k: np.array(v) for k, v in m.params.items()}
    problems = []

    # forward of enc1: x = [pixels / 255 ; onehot], exactly as the kernels form it in fp32
    x = np.concatenate([pixels.astype(np.float32) * np.float32(1 / 255),
                        R.onehot(labels, np.float32)], axis=1)
    a, b = bf16_value(x), bf16_value(p["enc1.W"]).T
    pre = a @ b + p["enc1.b"]
    ref = np.where(pre > 0, pre, np.expm1(np.minimum(pre, 0)) if act == "elu" else 0.0)
    err = np.abs(acts["enc1"] - ref)
    tol = gemm_bound(a, b) + 4e-7 * np.abs(ref) + 1e-7 * (np.abs(pre) + 1)  # + bias and ELU
    if (err > tol).any():
        problems.append(f"enc1 forward: max err/tol {np.max(err / tol):.3g}")

    # dX of dec3: d(dec2 pre-activation) = (bf16(dlogits) @ bf16(W3)) * elu'(dec2)
    dlog = np.array(m.act_grads["logits"], np.float32)
    a, b = bf16_value(dlog), bf16_value(p["dec3.W"])
    g2 = acts["dec2"]
    deriv = np.where(g2 > 0, 1.0, g2 + 1.0 if act == "elu" else 0.0)
    ref = (a @ b) * deriv
    err = np.abs(act_grads["dec2"] - ref)
    tol = gemm_bound(a, b) * deriv + 4e-7 * np.abs(ref) + 1e-30
    if (err > tol).any():
        problems.append(f"dec3 dX: max err/tol {np.max(err / tol):.3g}")

    # dW of dec3: bf16(dlogits)^T @ bf16(dec2 output), K = batch (odd at 37)
    a, b = bf16_value(dlog).T, bf16_value(np.array(m.acts["dec2"], np.float32))
    ref = a @ b
    err = np.abs(np.array(m.grads["dec3.W"], np.float64) - ref)
    tol = gemm_bound(a, b)
    if (err > tol).any():
        problems.append(f"dec3 dW: max err/tol {np.max(err / tol):.3g}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- whole networks

@pytest.mark.parametrize("arch_kw,act,batch", [(ODD, "elu", 37), (ODD, "elu", 64),
                                              (dict(h1=256, h2=128, latent=32), "elu", 64)])
def test_cvae_bf16_matches_float64_reference(arch_kw, act, batch):
    """ELU: a smooth network, so the error-propagation bound of the module's doc applies."""
    arch = Arch(act=act, **arch_kw)
    m32, m = cvae_pair(arch)
    pixels, labels = R.digit_like_pixels(batch, seed=7), R.random_labels(batch, seed=7)
    eps = np.array(m.noise(5, 9, batch), np.float64)
    loss, rec, kl = m.forward_backward(pixels, labels, 1.0, 5, 9)
    ref = R.forward_backward(params64(m), pixels, labels, eps, 1.0, act)
    ref_loss, _, _, ref_grads, ref_acts, _ = ref
    problems = []
    # the loss: a sum of per-pixel terms, each off by ~u * sqrt(6) of its logit's scale
    if not abs(loss - ref_loss) <= 4 * U * np.sqrt(6) * abs(ref_loss):
        problems.append(f"loss {loss} vs reference {ref_loss}")
    for k, n in CVAE_FORWARD_DEPTH.items():
        problems += net_tolerance_problems(f"act {k}", m.acts[k], ref_acts[k], n)
    for layer, n in CVAE_GRAD_DEPTH.items():
        for t in "Wb":
            problems += net_tolerance_problems(f"grad {layer}.{t}", m.grads[f"{layer}.{t}"],
                                               ref_grads[f"{layer}.{t}"], n)
    # ... and it did round: bf16 differs from the fp32 kernels by more than fp32's error
    m32.forward_backward(pixels, labels, 1.0, 5, 9)
    diff = np.abs(np.array(m.grads["enc1.W"]) - m32.grads["enc1.W"]).max()
    assert diff > 1e-4 * np.abs(m32.grads["enc1.W"]).max(), "bf16 gave fp32's gradients"
    assert not problems, "\n".join(problems)


def test_cvae_relu_bf16_within_the_reference_own_sensitivity():
    """ReLU's derivative jumps at 0: a pre-activation within u of 0 flips its mask, so the
    gradients are not a smooth function of the roundings and the bound above does not hold
    (the float64 reference itself moves by ~6% in the encoder's gradients here when only W is
    rounded to bf16). The kernels, which round W and the activations, must stay within twice
    that measured sensitivity plus the smooth bound; the forward activations (no mask in
    their path) and the loss still meet the smooth bound."""
    arch = Arch(act="relu", **ODD)
    _, m = cvae_pair(arch)
    pixels, labels = R.digit_like_pixels(64, seed=7), R.random_labels(64, seed=7)
    eps = np.array(m.noise(5, 9, 64), np.float64)
    loss, _, _ = m.forward_backward(pixels, labels, 1.0, 5, 9)
    p = params64(m)
    ref_loss, _, _, ref_grads, ref_acts, _ = R.forward_backward(p, pixels, labels, eps, 1.0, "relu")
    rounded = {k: bf16_value(v.astype(np.float32)) if k.endswith(".W") else v for k, v in p.items()}
    moved = R.forward_backward(rounded, pixels, labels, eps, 1.0, "relu")[3]
    problems = []
    assert abs(loss - ref_loss) <= 4 * U * np.sqrt(6) * abs(ref_loss)
    for k in ("enc1", "enc2", "mu", "logvar"):   # before the first ReLU-free sampling step
        problems += net_tolerance_problems(f"act {k}", m.acts[k], ref_acts[k],
                                           CVAE_FORWARD_DEPTH[k])
    for layer, n in CVAE_GRAD_DEPTH.items():
        k = f"{layer}.W"
        norm = np.linalg.norm(ref_grads[k])
        sensitivity = np.linalg.norm(moved[k] - ref_grads[k]) / norm
        rel = np.linalg.norm(np.array(m.grads[k], np.float64) - ref_grads[k]) / norm
        if rel > 2 * sensitivity + 2 * U * np.sqrt(n):
            problems.append(f"grad {k}: relative error {rel:.3g}, the reference's own "
                            f"sensitivity {sensitivity:.3g}")
    assert not problems, "\n".join(problems)


def test_cvae_bf16_matches_fp32_kernels():
    """bf16 vs fp32 kernels on the full architecture: the same bound as against float64."""
    m32, m = cvae_pair(Arch.variant("full"))
    pixels, labels = R.digit_like_pixels(64, seed=8), R.random_labels(64, seed=8)
    m32.forward_backward(pixels, labels, 1.0, 1, 2)
    m.forward_backward(pixels, labels, 1.0, 1, 2)
    problems = []
    for layer, n in CVAE_GRAD_DEPTH.items():
        for t in "Wb":
            k = f"{layer}.{t}"
            problems += net_tolerance_problems(f"grad {k}", m.grads[k], m32.grads[k], n)
    for k, n in CVAE_FORWARD_DEPTH.items():
        problems += net_tolerance_problems(f"act {k}", m.acts[k], m32.acts[k], n)
    assert not problems, "\n".join(problems)


def test_classifier_bf16_matches_float64_reference():
    arch = C.ClassifierArch(h1=23, h2=17, act="elu")
    m32 = C.DigitClassifier(arch, max_batch=48)
    m32.init_params(0)
    for k, v in R.classifier_init_params(arch.h1, arch.h2, seed=1).items():
        m32.params[k][...] = v
    m = with_bf16(m32, lambda t: C.DigitClassifier(arch, max_batch=48, threads=t,
                                                   precision="bf16"))
    pixels, labels = R.digit_like_pixels(45, seed=4), R.random_labels(45, seed=4)
    loss = m.forward_backward(pixels, labels)
    p = {k: np.array(v, np.float64) for k, v in m.params.items()}
    ref_loss, ref_grads, ref_acts = R.classifier_forward_backward(p, pixels, labels, arch.act)
    assert abs(loss - ref_loss) <= 4 * U * np.sqrt(3) * abs(ref_loss)
    depth = {"fc3": 3, "fc2": 4, "fc1": 5}
    problems = []
    for layer, n in depth.items():
        for t in "Wb":
            k = f"{layer}.{t}"
            problems += net_tolerance_problems(f"grad {k}", m.grads[k], ref_grads[k], n)
    for k, n in (("fc1", 1), ("fc2", 2), ("logits", 3)):
        problems += net_tolerance_problems(f"act {k}", m.acts[k], ref_acts[k], n)
    assert not problems, "\n".join(problems)


def test_flow_prior_bf16_matches_float64_reference():
    from .test_prior import TINY as PTINY
    from .test_prior import given_pairs, make_prior

    arch = PTINY
    p32 = make_prior(arch, max_batch=48)
    p = with_bf16(p32, lambda t: P.FlowPrior(arch, max_batch=48, threads=t, precision="bf16"))
    z, t, labels, target = given_pairs(arch, 45, seed=3)
    loss = p.forward_backward_given(z, t, labels, target)
    params = {k: np.array(v, np.float64) for k, v in p.params.items()}
    ref_loss, ref_grads, ref_v = R.flow_forward_backward(params, z, t, labels, target, arch.act,
                                                         arch.n_freq)
    n = 2 * (2 * arch.blocks + 2)  # forward and backward through every layer
    problems = net_tolerance_problems("v", p.velocity(z, t, labels), ref_v, 2 * arch.blocks + 2)
    assert abs(loss - ref_loss) <= 4 * U * np.sqrt(n) * abs(ref_loss), (loss, ref_loss)
    for k in R.flow_param_names(arch.blocks):
        problems += net_tolerance_problems(f"grad {k}", p.grads[k], ref_grads[k], n)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_flow_prior_bf16_sampling_matches_the_float64_ode(guidance):
    """integrate in bf16 (its conditioning as fp32 class biases, its lanes) against the
    float64 ODE on the fp32 velocity: each of the 8 evaluations carries the rounding of 2K + 2
    GEMMs, amplified up to 1 + 2w by guidance; a wrong class's bias is far outside that."""
    from .test_prior import MID as PMID
    from .test_prior import make_prior, numpy_integrate

    arch = PMID
    p32 = make_prior(arch, max_batch=48)
    rng = np.random.default_rng(9)
    z0 = rng.standard_normal((40, arch.latent)).astype(np.float32)
    labels = rng.integers(0, 10, 40).astype(np.uint8)
    want = numpy_integrate(p32, z0, labels, 4, "midpoint", guidance)
    tolerance = 4 * U * np.sqrt(2 * arch.blocks + 2) * (1 + 2 * guidance) * np.abs(want).max()
    for threads in (1, 2):
        p = with_bf16(p32, lambda t: P.FlowPrior(arch, max_batch=48, threads=t,
                                                 precision="bf16"), threads)
        got = p.integrate(z0, labels, 4, "midpoint", guidance)
        assert np.abs(got - want).max() <= tolerance, (np.abs(got - want).max(), tolerance)
    other = numpy_integrate(p32, z0, (labels + 1) % 10, 4, "midpoint", guidance)
    assert np.abs(other - want).max() > 2 * tolerance


# --------------------------------------------------------------------------- threads, copies, Adam

def training_state(threads, steps=3, arch=None, batch=37):
    arch = arch or Arch(act="elu", **ODD)
    m = Model(arch, max_batch=64, threads=threads, precision="bf16")
    m.init_params(3)
    pixels, labels = R.digit_like_pixels(batch, seed=1), R.random_labels(batch, seed=1)
    losses = [m.train_step(pixels, labels, 1e-3, 1.0, 11, s) for s in range(steps)]
    m.forward_backward(pixels, labels, 1.0, 11, steps)
    # every section but the scratch (whose size depends on the thread count)
    state = {name: m.slab[off:off + m.section_sizes[name]].tobytes()
             for name, off in m.layout.items() if not name.startswith("scratch.")}
    return losses, state


@pytest.mark.parametrize("arch", [Arch(act="elu", **ODD), Arch.variant("full")])
def test_bf16_bit_identical_across_threads(arch):
    """Fused-Adam training steps, then stored gradients: every slab section but the scratch
    (parameters, gradients, moments, bf16 copies, activations) bit for bit, 1 thread against 2."""
    l1, s1 = training_state(1, arch=arch)
    l2, s2 = training_state(2, arch=arch)
    assert l1 == l2
    assert any(k.startswith("bf16.") for k in s1)
    assert [k for k in s1 if s1[k] != s2[k]] == []


def bf16_copies(model, layer):
    n_out, n_in = model.params[f"{layer}.W"].shape
    ld = -(-n_in // 16) * 16
    off = model.layout[f"bf16.{layer}.W"]
    wh = model.slab[off:off + n_out * ld // 2].view(np.uint16).reshape(n_out, ld)
    off = model.layout.get(f"bf16.{layer}.Wp")     # the first layer has none (no dX)
    wp = (None if off is None
          else model.slab[off:off + -(-n_out // 2) * ld].view(np.uint32).reshape(-1, ld))
    return wh, wp


def check_copies(model):
    problems = []
    for name, n_in, n_out in model.layer_dims:
        wh, wp = bf16_copies(model, name)
        ld = wh.shape[1]
        full = np.zeros((n_out, ld), np.float32)
        full[:, :n_in] = model.params[f"{name}.W"]
        expected = bf16_round(full)
        if not np.array_equal(wh, expected):
            problems.append(f"{name}: bf16 row copy is not RNE of the masters")
        if wp is None:
            if name != model.layer_dims[0][0]:
                problems.append(f"{name}: no bf16 row pairs, yet the layer has a dX")
            continue
        lo = (wp & 0xFFFF).astype(np.uint16)
        hi = (wp >> 16).astype(np.uint16)
        if not (np.array_equal(lo, expected[0::2]) and np.array_equal(hi[:n_out // 2],
                                                                      expected[1::2])):
            problems.append(f"{name}: bf16 row pairs do not interleave the row copy")
        if n_out % 2 and hi[-1].any():
            problems.append(f"{name}: the pair past an odd row count is not zero")
    return problems


def test_bf16_copies_track_the_masters():
    m = Model(Arch(act="elu", **ODD), max_batch=64, precision="bf16")
    m.init_params(1)
    assert not check_copies(m)
    pixels, labels = R.digit_like_pixels(37, seed=2), R.random_labels(37, seed=2)
    m.train_step(pixels, labels, 1e-2, 1.0, 0, 0)          # fused Adam
    assert not check_copies(m)
    m.forward_backward(pixels, labels, 1.0, 0, 1)
    assert m.adam_update(1e-2) == 0                          # unfused Adam
    assert not check_copies(m)
    m2 = Model(m.arch, max_batch=64, precision="bf16")       # loading
    m2.load_state_sections(m.state_sections())
    assert not check_copies(m2)


def test_nonfinite_count_reports_a_nan_in_both_precisions():
    for precision in ("fp32", "bf16"):
        m = Model(Arch(act="elu", **ODD), max_batch=64, precision=precision)
        m.init_params(1)
        pixels, labels = R.digit_like_pixels(37, seed=2), R.random_labels(37, seed=2)
        m.train_step(pixels, labels, 1e-3, 1.0, 0, 0)
        assert m.nonfinite() == 0
        m.params["dec2.W"][3, 5] = np.nan
        m.sync_bf16()
        m.train_step(pixels, labels, 1e-3, 1.0, 0, 1)
        assert m.nonfinite() > 0, precision
        m.forward_backward(pixels, labels, 1.0, 0, 2)
        assert m.adam_update(1e-3) > 0


def test_bf16_training_lowers_the_loss_like_fp32():
    """Both precisions from the same start: 30 Adam steps on one batch, similar losses."""
    arch = Arch(act="elu", **ODD)
    pixels, labels = R.digit_like_pixels(64, seed=5), R.random_labels(64, seed=5)
    ends = {}
    for precision in ("fp32", "bf16"):
        m = Model(arch, max_batch=64, precision=precision)
        m.init_params(2)
        losses = [m.train_step(pixels, labels, 3e-3, 1.0, 0, s)[0] for s in range(30)]
        assert losses[-1] < 0.8 * losses[0], (precision, losses[0], losses[-1])
        ends[precision] = losses[-1]
    assert abs(ends["bf16"] - ends["fp32"]) <= 0.02 * ends["fp32"], ends


def test_bf16_allocates_nothing_per_step():
    """The bf16 copies and packing scratch live in the slab: a training step allocates nothing
    (as test_training_step checks for fp32)."""
    m = Model(Arch.variant("mini", act="elu"), max_batch=64, precision="bf16")
    m.init_params(0)
    assert {"bf16.enc1.W", "bf16.enc2.Wp", "scratch.bf16_a", "scratch.bf16_b"} <= set(m.layout)
    # enc1's input is the data: no dX, so no pairs of its rows for one.
    assert "bf16.enc1.Wp" not in m.layout
    assert all(off + m.section_sizes[name] <= m.slab.size for name, off in m.layout.items())
    pixels, labels = R.digit_like_pixels(64, seed=6), R.random_labels(64, seed=6)
    assert_training_allocates_nothing(m, pixels, labels)


def test_fp32_slab_has_no_bf16_sections():
    m = Model(Arch(act="elu", **ODD), max_batch=16)
    assert not [k for k in m.layout if "bf16" in k]


# --------------------------------------------------------------------------- builds and dispatch

def test_precision_is_checked():
    with pytest.raises(CvaeError, match="precision"):
        Model(Arch(act="elu", **ODD), max_batch=16, precision="fp16")
    with pytest.raises(CvaeError, match="precision"):
        kernels.resolve_precision("half")


def test_resolve_precision():
    assert kernels.resolve_precision("fp32")[0] == "fp32"
    chosen, why = kernels.resolve_precision("bf16")
    assert chosen == "bf16" and ("native" if kernels.native_bf16() else "emulated") in why
    chosen, why = kernels.resolve_precision("auto")
    assert chosen == ("bf16" if kernels.bf16_faster_than_fp32() else "fp32") and why
    base = kernels._import("baseline")
    # auto picks bf16 exactly where the native dot product is faster: AMD with AVX512_BF16
    assert kernels.bf16_faster_than_fp32() == (kernels.native_bf16() and base.cpu_amd())


def test_native_build_is_picked_where_the_cpu_has_bf16(forced_build):
    base = kernels._import("baseline")
    forced_build("auto")
    if base.cpu_bf16() and kernels._import("v4bf16") is not None:
        assert kernels.build_name() == "v4bf16" and kernels.native_bf16()
    else:
        assert kernels.build_name() != "v4bf16" and not kernels.native_bf16()


@pytest.mark.parametrize("build", ["baseline", "v3", "v4", "v4bf16"])
def test_every_build_runs_bf16_with_the_same_rounding(build, forced_build):
    """The emulated builds and the native one: each within the derived bound of the float64
    reference, and bit-identical across threads."""
    if build not in runnable_builds():
        pytest.skip(f"this CPU or installation has no {build} build")
    forced_build(build)
    assert kernels.native_bf16() == (build == "v4bf16")
    test_single_gemms_match_rounded_float64(37, "elu")
    test_cvae_bf16_matches_float64_reference(ODD, "elu", 37)
    l1, s1 = training_state(1)
    l2, s2 = training_state(2)
    assert l1 == l2 and s1 == s2



def test_fp32_is_the_same_on_the_bf16_build(forced_build):
    """The v4bf16 build only adds the bf16 GEMMs: its fp32 training is bit-identical to v4's
    (so an fp32 run can move between the two)."""
    if not {"v4", "v4bf16"} <= set(runnable_builds()):
        pytest.skip("this CPU or installation lacks the v4 or the v4bf16 build")
    states = {}
    for build in ("v4", "v4bf16"):
        forced_build(build)
        m = Model(Arch(act="elu", **ODD), max_batch=64, threads=2)
        m.init_params(3)
        pixels, labels = R.digit_like_pixels(37, seed=1), R.random_labels(37, seed=1)
        for s in range(3):
            m.train_step(pixels, labels, 1e-3, 1.0, 11, s)
        states[build] = {g: m.group_block(g).tobytes() for g in ("param", "adam_m", "adam_v")}
    assert states["v4"] == states["v4bf16"]
