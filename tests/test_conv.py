"""The convolutional CVAE (issue 17): ConvArch, its kernels (cvae._kernels.ConvNet) and its
checkpoints.

- the float64 reference's conv2d / conv_transpose2d against their loop-by-loop definitions,
  and its gradients against central finite differences;
- the kernels' loss, activations, activation gradients and every parameter gradient against
  the reference (odd channels (3, 5), hidden 24, latent 8; batches 5 and 37; both
  activations; beta 0 / 1 / 0.37), and against finite differences of their own float32 loss;
- bf16 against the reference (tolerances from bf16's rounding, as tests/test_bf16.py) and
  against the fp32 kernels;
- bit-identical training for 1 and 2 threads, no allocation per step, checkpoints, and a
  few hundred steps that learn.
"""

import tracemalloc

import numpy as np
import pytest

from cvae.checkpoint import load_checkpoint, save_checkpoint
from cvae.errors import CvaeError
from cvae.model import (VARIANTS, Arch, ConvArch, Model, arch_for_variant, arch_from_json,
                        decode_images, encode_all, model_from_checkpoint)

from . import reference as R
from .conftest import assert_training_allocates_nothing, params64
from .test_bf16 import U, bf16_value, net_tolerance_problems

TINY = dict(channels=(3, 5), hidden=24, latent=8)   # nothing a multiple of 16
SEED = 1234


def make_conv(act="elu", max_batch=37, threads=1, precision="fp32", seed=0, **sizes):
    arch = ConvArch(**{**TINY, **sizes}, act=act)
    model = Model(arch, max_batch=max_batch, threads=threads, precision=precision)
    model.init_params(seed=seed)
    # Random biases, so that a kernel that drops or misplaces a bias cannot pass.
    rng = np.random.default_rng(seed + 100)
    for k, v in model.params.items():
        if k.endswith(".b"):
            v[...] = rng.normal(0, 0.1, v.shape)
    model.sync_bf16()
    return model


def run_reference(model, pixels, labels, beta, seed, step):
    b = pixels.shape[0]
    eps = np.array(model.noise(seed, step, b), dtype=np.float64)
    return R.conv_forward_backward(params64(model), pixels, labels, eps, beta, model.arch.act)


def kernel_step(model, pixels, labels, beta, seed, step):
    loss, rec, kl = model.forward_backward(pixels, labels, beta, seed, step)
    return dict(loss=loss, rec=rec, kl=kl,
                grads={k: np.array(v) for k, v in model.grads.items()},
                acts={k: np.array(v) for k, v in model.acts.items()},
                act_grads={k: np.array(v) for k, v in model.act_grads.items()})


def batch(b, seed):
    return R.digit_like_pixels(b, seed=seed), R.random_labels(b, seed=seed)


# --------------------------------------------------------------------------- the architecture

def test_conv_arch_interface():
    arch = ConvArch()
    assert (arch.channels, arch.hidden, arch.latent, arch.act) == ((32, 64), 512, 128, "elu")
    assert arch.to_json() == {"type": "conv", "channels": [32, 64], "hidden": 512,
                              "latent": 128, "act": "elu"}
    assert arch.describe() == "conv 32-64-512-128 elu"
    assert Arch.variant("full").describe() == "640-320-128 elu"
    assert Arch.variant("full").to_json() == {"h1": 640, "h2": 320, "latent": 128, "act": "elu"}
    assert arch_from_json(arch.to_json()) == arch
    assert arch_from_json(Arch.variant("full").to_json()) == Arch.variant("full")
    # PyTorch's parameter count of the model: conv 1->32, 32->64, fc 3146->512,
    # 512->256, 138->512, 512->3136, tconv 64->32, 32->1 (each weight plus its bias).
    torch_count = (32 * 16 + 32) + (64 * 32 * 16 + 64) + (3146 * 512 + 512) + (512 * 256 + 256) \
        + (138 * 512 + 512) + (512 * 3136 + 3136) + (64 * 32 * 16 + 32) + (32 * 16 + 1)
    assert arch.n_params() == torch_count
    m = Model(ConvArch(**TINY), max_batch=5)
    assert sum(v.size for v in m.params.values()) == ConvArch(**TINY).n_params()
    assert m.params["tconv1.W"].shape == (5, 48) and m.params["tconv1.b"].shape == (3,)
    assert m.params["conv2.W"].shape == (5, 48) and m.params["conv2.b"].shape == (5,)


def test_variants():
    assert VARIANTS["conv"] == dict(channels=(32, 64), hidden=512, latent=128,
                                    digits=tuple(range(10)))
    assert arch_for_variant("conv") == ConvArch()
    assert arch_for_variant("conv", act="relu", hidden=100, latent=16, channels=(4, 8)) == \
        ConvArch(channels=(4, 8), hidden=100, latent=16, act="relu")
    assert arch_for_variant("full", hidden=(100, 50)) == Arch(h1=100, h2=50, latent=128)
    assert arch_for_variant("mini") == Arch.variant("mini")
    with pytest.raises(CvaeError, match="channels"):
        arch_for_variant("full", channels=(4, 8))
    with pytest.raises(CvaeError, match="variant"):
        arch_for_variant("huge")
    with pytest.raises(CvaeError, match="arch_for_variant"):
        Arch.variant("conv")


def test_sizes_beyond_the_conv_bounds_are_refused_before_allocating():
    with pytest.raises(CvaeError, match="channels"):
        Model(ConvArch(channels=(3, 100_000), hidden=24, latent=8), max_batch=5)
    with pytest.raises(CvaeError, match="batch of 5000"):
        Model(ConvArch(**TINY), max_batch=5000)


@pytest.mark.parametrize("change", [
    {"channels": [3]}, {"channels": [3, 5.0]}, {"channels": [3, 10**6]}, {"channels": "35"},
    {"hidden": 1.5}, {"hidden": True}, {"latent": 0}, {"latent": 10**9}, {"act": "tanh"},
    {"extra": 1},
])
def test_conv_header_validation(change):
    data = {**ConvArch(**TINY).to_json(), **change}
    with pytest.raises(CvaeError, match="not one cvae can build"):
        arch_from_json(data, "x.cvae")


# --------------------------------------------------------------------------- the reference itself

def test_reference_convolutions_match_their_definitions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 6, 8))
    w = rng.normal(size=(4, 3 * 16))
    bias = rng.normal(size=4)
    np.testing.assert_allclose(R.conv2d(x, w, bias), R.conv2d_direct(x, w, bias), atol=1e-12)
    xt = rng.normal(size=(2, 4, 3, 4))
    wt = rng.normal(size=(4, 3 * 16))
    bt = rng.normal(size=3)
    np.testing.assert_allclose(R.conv_transpose2d(xt, wt, bt),
                               R.conv_transpose2d_direct(xt, wt, bt), atol=1e-12)
    # the transposed convolution is the adjoint of the convolution (biases zero)
    y = R.conv2d(x, w, np.zeros(4))
    u = rng.normal(size=y.shape)
    assert np.isclose((y * u).sum(), (x * R.conv_transpose2d(u, w, np.zeros(3))).sum())


@pytest.mark.parametrize("act", ["elu", "relu"])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.37])
def test_reference_matches_finite_differences(act, beta):
    b, L = 3, TINY["latent"]
    p = R.conv_init_params(TINY["channels"], TINY["hidden"], L, seed=3)
    pixels, labels = batch(b, 3)
    eps = np.random.default_rng(3).normal(size=(b, L))
    loss, rec, kl, grads, acts, act_grads = R.conv_forward_backward(p, pixels, labels, eps,
                                                                    beta, act)
    assert np.isclose(loss, rec + beta * kl)
    bad = R.reference_fd_mismatches(
        lambda q, e: R.conv_loss_only(q, pixels, labels, e, beta, act), p, eps, grads,
        act_grads["z"] * np.exp(0.5 * acts["logvar"]), R.CONV_PARAM_NAMES)
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- fp32 kernels vs reference

def reference_problems(model, pixels, labels, beta, seed, step, tol=None):
    """Mismatches of the kernels' forward_backward against the float64 reference; tol is
    None (fp32's) or a function name, ref, got, kind -> problems."""
    got = kernel_step(model, pixels, labels, beta, seed, step)
    loss, rec, kl, grads, acts, act_grads = run_reference(model, pixels, labels, beta, seed,
                                                          step)
    assert set(got["grads"]) == set(R.CONV_PARAM_NAMES), sorted(got["grads"])
    assert set(got["acts"]) == set(R.CONV_ACT_NAMES), sorted(got["acts"])
    assert set(got["act_grads"]) == set(R.CONV_ACT_NAMES), sorted(got["act_grads"])
    problems = []
    if tol is None:
        for name, g, r in (("loss", got["loss"], loss), ("rec", got["rec"], rec),
                           ("kl", got["kl"], kl)):
            if not abs(g - r) <= 1e-5 * abs(r) + 1e-5:
                problems.append(f"{name}: got {g!r}, reference {r!r}")
        for k in R.CONV_PARAM_NAMES:
            problems.append(R.mismatch(f"grad {k}", got["grads"][k], grads[k]))
        for k in R.CONV_ACT_NAMES:
            problems.append(R.mismatch(f"act {k}", got["acts"][k], acts[k]))
            problems.append(R.mismatch(f"act_grad {k}", got["act_grads"][k], act_grads[k]))
    else:
        problems += tol("loss", np.array([loss]), np.array([got["loss"]]), "loss")
        for k in R.CONV_PARAM_NAMES:
            problems += tol(f"grad {k}", grads[k], got["grads"][k], "grad")
        for k in R.CONV_ACT_NAMES:
            problems += tol(f"act {k}", acts[k], got["acts"][k], "act")
            problems += tol(f"act_grad {k}", act_grads[k], got["act_grads"][k], "act_grad")
    return [p for p in problems if p], got


@pytest.mark.parametrize("act,beta,b", [("elu", 0.0, 5), ("elu", 1.0, 37), ("relu", 0.0, 37),
                                        ("relu", 1.0, 5), ("elu", 0.37, 37)])
def test_kernels_match_reference(act, beta, b):
    model = make_conv(act=act, max_batch=37)
    pixels, labels = batch(b, b)
    problems, _ = reference_problems(model, pixels, labels, beta, SEED, 3)
    assert not problems, f"act={act} beta={beta} b={b}:\n  " + "\n  ".join(problems)


def test_default_size_matches_reference_at_batch_64():
    """The issue's sizes (32, 64, 512, 128): every GEMM runs full tiles and long K."""
    model = make_conv(max_batch=64, channels=(32, 64), hidden=512, latent=128)
    pixels, labels = batch(64, 9)
    problems, _ = reference_problems(model, pixels, labels, 1.0, SEED, 5)
    assert not problems, "\n  ".join(problems)


def test_kernel_grads_match_kernel_finite_differences():
    model = make_conv(max_batch=3)
    for k, v in R.conv_init_params(TINY["channels"], TINY["hidden"], TINY["latent"],
                                   seed=1).items():
        model.params[k][...] = v
    pixels, labels = batch(3, 1)
    loss0 = model.forward_backward(pixels, labels, 1.0, SEED, 9)[0]
    noise = 16 * float(np.spacing(np.float32(abs(loss0))))
    bad = R.kernel_fd_mismatches(
        model, lambda: model.forward_backward(pixels, labels, 1.0, SEED, 9)[0],
        R.CONV_PARAM_NAMES, noise)
    assert not bad, "\n  ".join(bad)


def test_adam_update_matches_the_fused_step():
    """The unfused path (forward_backward then adam_update) moves every parameter, the
    transposed convolutions' biases included, exactly as train_step's fused Adam."""
    a, b = make_conv(), make_conv()
    pixels, labels = batch(37, 2)
    for step in range(3):
        a.forward_backward(pixels, labels, 1.0, SEED, step)
        assert a.adam_update(1e-3) == 0
        b.train_step(pixels, labels, 1e-3, 1.0, SEED, step)
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
        assert np.array_equal(a.adam_v[k], b.adam_v[k]), k
    assert not np.array_equal(a.params["tconv1.b"], make_conv().params["tconv1.b"])


def test_encode_decode_and_evaluate_agree_with_the_training_forward():
    model = make_conv(max_batch=37)
    pixels, labels = batch(37, 4)
    model.forward_backward(pixels, labels, 1.0, SEED, 2)
    acts = {k: np.array(v) for k, v in model.acts.items()}
    mu, logvar = encode_all(model, pixels, labels)
    assert np.array_equal(mu, acts["mu"]) and np.array_equal(logvar, acts["logvar"])
    probs = model.decode(acts["z"], labels)
    assert np.allclose(probs, 1 / (1 + np.exp(-acts["logits"].astype(np.float64))), atol=1e-6)
    assert decode_images(model, acts["z"], labels).shape == (37, 784)
    rec, kl = model.evaluate(pixels, labels, SEED, 2)
    loss = model.forward_backward(pixels, labels, 1.0, SEED, 2)
    assert np.isclose(rec.mean(), loss[1], rtol=1e-6) and np.isclose(kl.mean(), loss[2], rtol=1e-6)


# --------------------------------------------------------------------------- bf16

# GEMMs on the path to each tensor (forward layers, then backward dX and dW), as test_bf16.
CONV_FORWARD_DEPTH = {"conv1": 1, "conv2": 2, "enc_fc": 3, "mu": 4, "logvar": 4, "z": 4,
                      "dec_fc1": 5, "dec_fc2": 6, "tconv1": 7, "logits": 8, "loss": 8}
CONV_BACKWARD_DEPTH = {"tconv2": 9, "logits": 8, "tconv1": 10, "dec_fc2": 11, "dec_fc1": 12,
                       "z": 13, "mu": 13, "logvar": 13, "enc_out": 14, "enc_fc": 15,
                       "conv2": 16, "conv1": 17}


def bf16_tolerance(name, ref, got, kind):
    if kind == "loss":
        # a sum of 784 pixels' terms whose errors (~u of the logits) do not all share a sign
        return [] if abs(got[0] - ref[0]) <= 4 * U * abs(ref[0]) else \
            [f"loss: got {got[0]:.7g}, reference {ref[0]:.7g}"]
    layer = name.split()[1].split(".")[0]
    depth = (CONV_FORWARD_DEPTH if kind == "act" else CONV_BACKWARD_DEPTH)[layer]
    return net_tolerance_problems(name, got, ref, depth)


@pytest.mark.parametrize("b", [37, 64])
def test_bf16_matches_reference_within_bf16_rounding(b):
    """ELU: a smooth network, so test_bf16's error-propagation bound applies."""
    model = make_conv(act="elu", precision="bf16", max_batch=64)
    pixels, labels = batch(b, 20 + b)
    problems, _ = reference_problems(model, pixels, labels, 1.0, SEED, 3, tol=bf16_tolerance)
    assert not problems, "\n  ".join(problems)


def test_bf16_relu_within_the_reference_own_sensitivity():
    """ReLU's derivative jumps at 0, so rounding flips masks (test_bf16 says more): the weight
    gradients must stay within twice the float64 reference's own movement when only W is
    rounded to bf16, plus the smooth bound."""
    model = make_conv(act="relu", precision="bf16")
    pixels, labels = batch(37, 7)
    got = kernel_step(model, pixels, labels, 1.0, SEED, 3)
    eps = np.array(model.noise(SEED, 3, 37), np.float64)
    p = params64(model)
    ref = R.conv_forward_backward(p, pixels, labels, eps, 1.0, "relu")
    rounded = {k: bf16_value(v.astype(np.float32)) if k.endswith(".W") else v
               for k, v in p.items()}
    moved = R.conv_forward_backward(rounded, pixels, labels, eps, 1.0, "relu")[3]
    assert abs(got["loss"] - ref[0]) <= 4 * U * abs(ref[0])
    problems = []
    for k in ("conv1", "conv2", "enc_fc", "mu", "logvar"):
        problems += bf16_tolerance(f"act {k}", ref[4][k], got["acts"][k], "act")
    for layer, n in CONV_BACKWARD_DEPTH.items():
        k = f"{layer}.W"
        if k not in ref[3]:
            continue
        norm = np.linalg.norm(ref[3][k])
        sensitivity = np.linalg.norm(moved[k] - ref[3][k]) / norm
        rel = np.linalg.norm(got["grads"][k] - ref[3][k]) / norm
        if rel > 2 * sensitivity + 2 * U * np.sqrt(n):
            problems.append(f"grad {k}: relative error {rel:.3g}, the reference's own "
                            f"sensitivity {sensitivity:.3g}")
    assert not problems, "\n  ".join(problems)


def test_bf16_matches_fp32_kernels_at_the_default_size():
    """The issue's sizes at batch 64: bf16 within the bound of fp32, and not equal to it (or
    nothing was rounded)."""
    m32 = make_conv(max_batch=64, channels=(32, 64), hidden=512, latent=128)
    m16 = make_conv(max_batch=64, channels=(32, 64), hidden=512, latent=128,
                    precision="bf16")
    pixels, labels = batch(64, 8)
    g32 = kernel_step(m32, pixels, labels, 1.0, SEED, 1)
    g16 = kernel_step(m16, pixels, labels, 1.0, SEED, 1)
    problems = []
    for k in R.CONV_PARAM_NAMES:
        problems += bf16_tolerance(f"grad {k}", g32["grads"][k], g16["grads"][k], "grad")
        if k.endswith(".W"):
            a, c = g32["grads"][k], g16["grads"][k]
            if not np.abs(a - c).max() > 1e-4 * np.abs(a).max():
                problems.append(f"{k}: bf16 gave fp32's gradient")
    for k in R.CONV_ACT_NAMES:
        problems += bf16_tolerance(f"act {k}", g32["acts"][k], g16["acts"][k], "act")
    assert not problems, "\n  ".join(problems)


def test_bf16_weight_copies_follow_adam():
    """Adam writes the bf16 copies as it updates W: a fresh sync changes nothing after a
    fused step (so the next forward sees the new weights)."""
    m = make_conv(precision="bf16")
    pixels, labels = batch(37, 3)
    for step in range(2):
        m.train_step(pixels, labels, 1e-3, 1.0, SEED, step)
    before = m.slab.copy()
    m.sync_bf16()
    assert np.array_equal(before.view(np.uint32), m.slab.view(np.uint32))


# --------------------------------------------------------------------------- determinism, memory

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_threads_do_not_change_a_bit(precision):
    """Training steps with a full and a partial batch. (A race shows only now and then: this
    did not catch the one fixed in d5e7dda, which the resumed runs of test_rundir did.)"""
    runs = []
    for threads in (1, 2):
        m = make_conv(max_batch=37, threads=threads, precision=precision)
        losses = []
        for step in range(12):
            pixels, labels = batch(37 if step % 2 else 21, step)
            losses.append(m.train_step(pixels, labels, 1e-3, 0.5, SEED, step))
        runs.append((losses, m.group_block("param").copy(), m.group_block("adam_v").copy()))
    assert runs[0][0] == runs[1][0]
    assert np.array_equal(runs[0][1], runs[1][1]) and np.array_equal(runs[0][2], runs[1][2])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_allocates_nothing(precision):
    m = Model(ConvArch(channels=(8, 16), hidden=64, latent=16), max_batch=64,
              precision=precision)
    m.init_params(0)
    assert "scratch.col" in m.layout and "act.col2" in m.layout
    assert all(off + m.section_sizes[name] <= m.slab.size for name, off in m.layout.items())
    pixels, labels = batch(64, 6)
    assert_training_allocates_nothing(m, pixels, labels, warmup=3, steps=20)


# --------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip(tmp_path):
    m = make_conv(act="relu")
    pixels, labels = batch(37, 5)
    for step in range(3):
        m.train_step(pixels, labels, 1e-3, 1.0, SEED, step)
    path = tmp_path / "conv.cvae"
    save_checkpoint(path, "cvae", {"arch": m.arch.to_json(), "adam_t": m.adam_t},
                    m.state_sections())
    loaded, meta = model_from_checkpoint(path, max_batch=37)
    assert loaded.arch == m.arch and loaded.adam_t == 3
    for k in m.params:
        assert np.array_equal(loaded.params[k], m.params[k]), k
        assert np.array_equal(loaded.adam_m[k], m.adam_m[k]), k
    # the loaded model continues exactly as the original
    assert loaded.train_step(pixels, labels, 1e-3, 1.0, SEED, 3) == \
        m.train_step(pixels, labels, 1e-3, 1.0, SEED, 3)


@pytest.mark.parametrize("arch_change, fragment", [
    ({"channels": [4, 5]}, "'param.conv1.W' is [3, 16], but the architecture its header "
                           "declares needs [4, 16]"),
    ({"hidden": 25}, "needs [25, 255]"),
    ({"channels": [200, 250], "hidden": 30000}, "needs"),     # huge: refused by its sections
    ({"channels": [10**5, 5]}, "not one cvae can build"),    # beyond the channel bound
    ({"type": "mlp"}, "no valid architecture"),
])
def test_a_conv_header_that_does_not_fit_is_refused(tmp_path, arch_change, fragment):
    m = make_conv()
    path = tmp_path / "bad.cvae"
    save_checkpoint(path, "cvae", {"arch": {**m.arch.to_json(), **arch_change}},
                    m.state_sections(optimizer=False))
    tracemalloc.start()
    try:
        with pytest.raises(CvaeError) as error:
            load_checkpoint(path, expected_kind="cvae")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fragment in str(error.value)
    assert peak < 50 << 20, f"refusing the header traced {peak} bytes"


def test_a_small_checkpoint_cannot_ask_for_a_huge_slab(tmp_path):
    """256 channels into 1, one hidden unit, latent 1: a file of ~100 KB whose buffers at a
    batch of 4096 would be 13 GB. The slab's bound refuses it, naming the file, before numpy
    hands out anything (it allocates lazily: the first step would be killed instead)."""
    m = Model(ConvArch(channels=(256, 1), hidden=1, latent=1), max_batch=16)
    m.init_params(0)
    path = tmp_path / "wide.cvae"
    save_checkpoint(path, "cvae", {"arch": m.arch.to_json(), "batch": 4096},
                    m.state_sections(optimizer=False))
    assert path.stat().st_size < 200_000
    with pytest.raises(CvaeError) as error:
        model_from_checkpoint(path, max_batch=4096)
    assert str(path) in str(error.value) and "GB slab" in str(error.value)


def test_the_mlp_checkpoint_is_unchanged(tmp_path):
    """Old checkpoints have no "type" key and mean the MLP; the MLP's header is as before."""
    m = Model(Arch(h1=24, h2=16, latent=8), max_batch=8)
    m.init_params(0)
    path = tmp_path / "mlp.cvae"
    save_checkpoint(path, "cvae", {"arch": m.arch.to_json()}, m.state_sections())
    loaded, meta = model_from_checkpoint(path)
    assert "type" not in meta["arch"] and loaded.arch == m.arch


# --------------------------------------------------------------------------- learning

def test_a_few_hundred_steps_lower_the_loss():
    m = make_conv(max_batch=32, channels=(4, 8), hidden=32, latent=4)
    pixels, labels = batch(128, 42)
    first = np.mean([m.forward_backward(pixels[i:i + 32], labels[i:i + 32], 1.0, 0, 0)[0]
                     for i in range(0, 128, 32)])
    for step in range(300):
        i = (step % 4) * 32
        loss = m.train_step(pixels[i:i + 32], labels[i:i + 32], 3e-3, 1.0, SEED, step)[0]
        assert np.isfinite(loss) and m.nonfinite() == 0
    last = np.mean([m.forward_backward(pixels[i:i + 32], labels[i:i + 32], 1.0, 0, 0)[0]
                    for i in range(0, 128, 32)])
    assert last < 0.6 * first, (first, last)
