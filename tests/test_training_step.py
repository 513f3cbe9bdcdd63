"""The optimizer step, determinism across thread counts, memory discipline, odd batch sizes."""

import tracemalloc

import numpy as np
import pytest

from cvae.model import Arch, Model  # (not importable = failure, never a skip)

from . import reference as R
from .test_gradients import TINY, make_model

SEED = 4321


def copy64(d):
    return {k: np.array(v, dtype=np.float64) for k, v in d.items()}


def report(problems, what):
    problems = [p for p in problems if p]
    assert not problems, what + ":\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- Adam

def test_adam_update_matches_formula():
    """Three forward_backward + adam_update rounds, each checked against the float64 formula."""
    model = make_model(Arch(**TINY, act="elu"), max_batch=8)
    pixels = R.digit_like_pixels(5, seed=2)
    labels = R.random_labels(5, seed=2)
    lr = 1e-2
    assert model.adam_t == 0
    for k in R.PARAM_NAMES:
        assert not model.adam_m[k].any() and not model.adam_v[k].any(), f"{k}: Adam state not zero at init"
    for step in range(3):
        model.forward_backward(pixels, labels, 1.0, SEED, step)
        p, g, m, v, t = copy64(model.params), copy64(model.grads), copy64(model.adam_m), copy64(model.adam_v), model.adam_t
        assert t == step
        ref_p, ref_m, ref_v, ref_t = R.adam(p, g, m, v, t, lr)
        model.adam_update(lr)
        assert model.adam_t == ref_t
        problems = []
        for k in R.PARAM_NAMES:
            # float32 rounding: a few ulp of m / v; params: 1 ulp of p plus ~1e-6 of the update
            problems.append(R.mismatch(f"m {k}", model.adam_m[k], ref_m[k], rtol=2e-6, atol_scale=1e-7))
            problems.append(R.mismatch(f"v {k}", model.adam_v[k], ref_v[k], rtol=2e-6, atol_scale=1e-7))
            problems.append(_param_mismatch(k, model.params[k], ref_p[k], p[k], lr))
        report(problems, f"adam_update at t={t + 1}")


def _param_mismatch(k, got, ref, before, lr):
    """Param after an Adam step: allow 1e-6 relative of the value plus 1e-5 of lr."""
    got = np.asarray(got, dtype=np.float64)
    err = np.abs(got - ref)
    tol = 1e-6 * np.abs(ref) + 1e-5 * lr
    bad = err > tol
    if not bad.any():
        return None
    i = np.unravel_index(np.argmax(err / tol), err.shape)
    return (f"param {k}: {int(bad.sum())}/{bad.size} off; worst at {tuple(int(j) for j in i)}: before {before[i]:.8g}, "
            f"got {got[i]:.8g}, ref {ref[i]:.8g}; got step {got[i] - before[i]:.6g} vs ref step {ref[i] - before[i]:.6g}")


def test_fused_train_step_equals_forward_backward_plus_adam_update():
    arch = Arch(**TINY, act="elu")
    fused = make_model(arch, max_batch=8)
    plain = make_model(arch, max_batch=8)
    for k in R.PARAM_NAMES:
        assert np.array_equal(fused.params[k], plain.params[k])
    pixels = R.digit_like_pixels(6, seed=3)
    labels = R.random_labels(6, seed=3)
    lr, beta = 3e-3, 1.0
    for step in range(4):
        before = copy64(plain.params)
        out_f = fused.train_step(pixels, labels, lr, beta, SEED, step)
        out_p = plain.forward_backward(pixels, labels, beta, SEED, step)
        plain.adam_update(lr)
        assert fused.adam_t == plain.adam_t == step + 1
        problems = []
        for name, a, b in zip(("loss", "rec", "kl"), out_f, out_p):
            if not abs(a - b) <= 1e-6 * abs(b) + 1e-7:
                problems.append(f"{name}: train_step {a!r}, forward_backward {b!r}")
        for k in R.PARAM_NAMES:
            problems.append(R.mismatch(f"m {k}", fused.adam_m[k], plain.adam_m[k], rtol=1e-6, atol_scale=1e-7))
            problems.append(R.mismatch(f"v {k}", fused.adam_v[k], plain.adam_v[k], rtol=1e-6, atol_scale=1e-7))
            problems.append(_param_mismatch(k, fused.params[k], np.array(plain.params[k], np.float64), before[k], lr))
        report(problems, f"fused train_step vs forward_backward + adam_update, step {step}")
        # continue both from the same state, so each step is compared on its own
        for k in R.PARAM_NAMES:
            fused.params[k][...] = plain.params[k]
            fused.adam_m[k][...] = plain.adam_m[k]
            fused.adam_v[k][...] = plain.adam_v[k]


# --------------------------------------------------------------------------- determinism

def test_threads_1_and_2_bit_identical():
    arch = Arch.variant("mini", act="elu")
    pixels = R.digit_like_pixels(64, seed=4)
    labels = R.random_labels(64, seed=4)
    runs = []
    for threads in (1, 2):
        model = make_model(arch, max_batch=64, threads=threads)
        losses = []
        for step in range(20):
            b = 64 if step % 3 else 37  # also partial batches
            losses.append(model.train_step(pixels[:b], labels[:b], 1e-3, 1.0, SEED, step))
        runs.append((model, losses))
    (m1, l1), (m2, l2) = runs
    assert m1.adam_t == m2.adam_t == 20
    problems = []
    for k in R.PARAM_NAMES:
        for what in ("params", "adam_m", "adam_v"):
            a, b = getattr(m1, what)[k], getattr(m2, what)[k]
            if not np.array_equal(a, b):
                d = np.abs(a.astype(np.float64) - b)
                problems.append(f"{what}[{k}]: {int((a != b).sum())}/{a.size} entries differ, max |diff| {d.max():.3g}")
    if l1 != l2:
        first = next(i for i, (a, b) in enumerate(zip(l1, l2)) if a != b)
        problems.append(f"losses first differ at step {first}: {l1[first]} vs {l2[first]}")
    report(problems, "threads=1 vs threads=2 after 20 train_steps")


# --------------------------------------------------------------------------- memory

def _mini64():
    model = make_model(Arch.variant("mini", act="elu"), max_batch=64)
    pixels = R.digit_like_pixels(64, seed=6)
    labels = R.random_labels(64, seed=6)
    return model, pixels, labels


def _check_views(model):
    slab = model.slab
    assert slab.dtype == np.float32
    for group in ("params", "grads", "adam_m", "adam_v", "acts", "act_grads"):
        for k, v in getattr(model, group).items():
            if v.size == 0:  # acts / act_grads before the first forward have 0 rows
                continue
            assert np.shares_memory(v, slab), f"model.{group}[{k!r}] is not a view into model.slab"


def test_slab_aligned_stable_and_no_growth_over_200_steps():
    model, pixels, labels = _mini64()
    address = model.slab.ctypes.data
    assert address % 64 == 0, f"slab at {address:#x} is not 64-byte aligned"
    _check_views(model)
    for step in range(5):  # warm-up
        model.train_step(pixels, labels, 1e-3, 1.0, SEED, step)
    _check_views(model)
    assert model.acts["enc1"].shape == (64, model.arch.h1)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for step in range(5, 205):
            model.train_step(pixels, labels, 1e-3, 1.0, SEED, step)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 4096, f"traced memory grew by {after - before} bytes over 200 train_steps"
    assert model.slab.ctypes.data == address, "model.slab moved"
    _check_views(model)
    assert model.adam_t == 205


def test_no_per_step_temporaries():
    """Peak traced memory inside the loop stays within a few KiB of where it started:
    a per-step numpy temporary (even one freed again) would show up here."""
    model, pixels, labels = _mini64()
    for step in range(5):
        model.train_step(pixels, labels, 1e-3, 1.0, SEED, step)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for step in range(5, 55):
            model.train_step(pixels, labels, 1e-3, 1.0, SEED, step)
        peak = tracemalloc.get_traced_memory()[1]
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    top = "\n".join(str(s) for s in snapshot.statistics("lineno")[:5])
    assert peak - before < 16384, f"peak traced memory rose {peak - before} bytes inside the loop; top sites:\n{top}"


# --------------------------------------------------------------------------- odd batch sizes

@pytest.mark.parametrize("b", [37, 1])
def test_partial_batch_matches_reference(b):
    """After full batches (so buffers hold stale rows), a b < max_batch batch is exact."""
    act = "elu"
    model = make_model(Arch.variant("mini", act=act), max_batch=64)
    full_px = R.digit_like_pixels(64, seed=8)
    full_lab = R.random_labels(64, seed=8)
    for step in range(3):
        model.train_step(full_px, full_lab, 1e-3, 1.0, SEED, step)
    pixels = R.digit_like_pixels(b, seed=9)
    labels = R.random_labels(b, seed=9)
    beta, step = 1.0, 3
    p = copy64(model.params)
    eps = np.array(model.noise(SEED, step, b), dtype=np.float64)
    loss, rec, kl = model.forward_backward(pixels, labels, beta, SEED, step)
    r_loss, r_rec, r_kl, r_grads, r_acts, r_act_grads = R.forward_backward(p, pixels, labels, eps, beta, act)
    problems = []
    for name, a, r in (("loss", loss, r_loss), ("rec", rec, r_rec), ("kl", kl, r_kl)):
        if not abs(a - r) <= 1e-5 * abs(r) + 1e-5:
            problems.append(f"{name}: got {a!r}, reference {r!r}")
    for k in R.PARAM_NAMES:
        problems.append(R.mismatch(f"grad {k}", model.grads[k], r_grads[k]))
    for k in R.ACT_NAMES:
        problems.append(R.mismatch(f"act {k}", model.acts[k], r_acts[k]))
        problems.append(R.mismatch(f"act_grad {k}", model.act_grads[k], r_act_grads[k]))
    report(problems, f"batch {b} (max_batch 64) vs reference")

    # and a fused step at this batch size does what forward_backward + Adam says
    g, m, v, t = copy64(model.grads), copy64(model.adam_m), copy64(model.adam_v), model.adam_t
    ref_p, ref_m, ref_v, _ = R.adam(p, g, m, v, t, 1e-3)
    model.train_step(pixels, labels, 1e-3, beta, SEED, step)
    problems = [_param_mismatch(k, model.params[k], ref_p[k], p[k], 1e-3) for k in R.PARAM_NAMES]
    report(problems, f"train_step at batch {b} vs forward_backward grads + reference Adam step")


def test_evaluation_draws_do_not_depend_on_the_batch_size():
    """Image i's eps is keyed by (seed, step, first_index + i): 3 batches of 16 = 1 batch of 48."""
    model = Model(Arch(h1=24, h2=16, latent=8), max_batch=48, threads=1)
    model.init_params(seed=0)
    pixels, labels = R.digit_like_pixels(48, seed=9), R.random_labels(48, seed=9)
    rec_all, kl_all = (np.array(a) for a in model.evaluate(pixels, labels, seed=3, step=10**9))
    parts = [np.array(a) for start in range(0, 48, 16)
             for a in model.evaluate(pixels[start:start + 16], labels[start:start + 16], seed=3,
                                     step=10**9, first_index=start)]
    np.testing.assert_allclose(np.concatenate(parts[0::2]), rec_all, rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(parts[1::2]), kl_all, rtol=1e-6)
    # rec depends on eps (KL is analytic): without the offset, images 16-31 get other draws
    shifted = np.array(model.evaluate(pixels[16:32], labels[16:32], seed=3, step=10**9)[0])
    assert not np.allclose(shifted, rec_all[16:32], rtol=1e-6)


def mix64(x):
    """cvae_simd.h's cvae_mix64 (splitmix64's finaliser) on uint64 arrays (wrapping)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def reference_noise(seed, step, batch, latent):
    """Box-Muller in float64 on the kernels' counter hash and their float32 uniforms."""
    key = mix64(mix64(np.array([seed], np.uint64)) ^ np.uint64(step))
    sample = np.arange(batch, dtype=np.uint64)[:, None]
    index = np.arange(latent, dtype=np.uint64)[None, :]
    h = mix64(key ^ ((sample << np.uint64(32)) | index))
    u1 = ((h >> np.uint64(40)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -24)
    u2 = (h & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0 ** -24)
    u1, u2 = u1.astype(np.float64), u2.astype(np.float64)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)


def test_noise_is_box_muller_of_the_counter_hash():
    """The kernels' own log and cos(2 pi u) (vectorisable, not libm's) keep the draws within a
    few float32 roundings of the float64 formula; the training step's vectorised rows draw what
    Model.noise's scalar path draws (z = mu + eps * exp(logvar / 2) holds with it)."""
    model = Model(Arch(h1=24, h2=16, latent=40), max_batch=64, threads=2)
    model.init_params(seed=0)
    for step in range(8):
        np.testing.assert_allclose(model.noise(7, step, 64), reference_noise(7, step, 64, 40),
                                   rtol=2e-6, atol=1e-6)
    draws = np.concatenate([model.noise(11, step, 64).ravel() for step in range(40)])
    assert abs(draws.mean()) < 0.02 and abs(draws.std() - 1.0) < 0.02
    pixels, labels = R.digit_like_pixels(37, seed=4), R.random_labels(37, seed=4)
    model.forward_backward(pixels, labels, 1.0, 7, 5)
    acts = {k: np.array(v, np.float64) for k, v in model.acts.items()}
    expected = acts["mu"] + model.noise(7, 5, 37) * np.exp(0.5 * acts["logvar"])
    np.testing.assert_allclose(acts["z"], expected, rtol=1e-5, atol=1e-6)


def test_kernel_entry_points_refuse_arrays_of_the_wrong_shape():
    """Bounds checks are off inside the kernels, so every Net method checks its arrays."""
    model = Model(Arch(h1=24, h2=16, latent=8), max_batch=20, threads=1)
    model.init_params(seed=0)
    with pytest.raises(ValueError, match="z must be"):
        model.decode(np.zeros((3, 4), np.float32), np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="does not fit"):
        model.evaluate(R.digit_like_pixels(40, seed=1), R.random_labels(40, seed=1), 0, 0)
    with pytest.raises(ValueError, match="mu_out"):
        model.net.encode(R.digit_like_pixels(3, seed=1), R.random_labels(3, seed=1),
                         np.zeros((3, 7), np.float32), np.zeros((3, 8), np.float32))
    # a batch above max_batch but inside its padding (20 -> 32) still gets whole outputs
    rec, kl = model.evaluate(R.digit_like_pixels(30, seed=1), R.random_labels(30, seed=1), 0, 0)
    assert rec.shape == kl.shape == (30,) and np.isfinite(rec).all()
