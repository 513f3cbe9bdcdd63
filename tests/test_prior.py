"""The flow prior (cvae/prior.py, cvae._kernels.FlowNet): conditional flow matching over a
CVAE's latent codes.

- the float64 NumPy reference (tests/reference.py, "the flow prior") against central finite
  differences, both activations, the null label included;
- the kernels' loss, velocity and every parameter gradient against the reference (a tiny
  arch of sizes that are not multiples of 16 at batches 1, 7 and 37, and a realistic one at
  batch 64; both activations), and against finite differences of the kernels' own float32 loss;
- fused Adam: train_step equals forward_backward + adam_update bit for bit, and follows the
  reference's Adam;
- the training pairs drawn inside the kernel: z_t = (1 - t)·z0 + t·z1, target = z1 - z0,
  z1 = mu + sigma·eps, t in [0, 1), the label drop rate, keyed by (seed, step), and that a
  training step trains on exactly these pairs;
- training and integration bit-identical for 1 and 2 threads; integrate (Euler, midpoint,
  Heun, guidance, batches beyond max_batch) against a NumPy ODE solver over velocity();
- it learns: a two-mode toy latent whose samples land on their label's mode;
- PriorTrainer: a run stopped mid-epoch or at an epoch end and resumed writes the same
  prior.cvae byte for byte as a run never stopped;
- load_prior / open_prior: another CVAE's prior, a damaged file, a partly trained prior and
  a CVAE checkpoint passed as the prior are one-line CvaeErrors; the fallback to N(0, T² I).
"""


import numpy as np
import pytest

from cvae import prior as P
from cvae.checkpoint import load_checkpoint, save_checkpoint
from cvae.data import Dataset
from cvae.errors import CvaeError
from cvae.model import Arch, Model, encode_all, model_from_checkpoint
from cvae import rundir as RD
from cvae import train_prior as TP

from . import reference as R
from .conftest import make_digits, params64

TINY = P.PriorArch(latent=5, hidden=20, blocks=2, n_freq=3, act="elu")  # not multiples of 16
REALISTIC = P.PriorArch(latent=128, hidden=256, blocks=3, n_freq=8)
NULL = 10


# ---------------------------------------------------------------- helpers


def with_act(arch, act):
    return P.PriorArch(latent=arch.latent, hidden=arch.hidden, blocks=arch.blocks,
                       n_freq=arch.n_freq, act=act)


def make_prior(arch, max_batch, threads=1, seed=0):
    """A FlowPrior holding the reference's random parameters (biases ~ N(0, 0.1), so a kernel
    that drops or misplaces a bias cannot pass)."""
    prior = P.FlowPrior(arch, max_batch=max_batch, threads=threads)
    prior.init_params(seed)
    ref = R.flow_init_params(arch.latent, arch.hidden, arch.blocks, arch.n_freq, seed=seed + 1)
    assert set(ref) == set(prior.params) == set(R.flow_param_names(arch.blocks))
    for k, v in ref.items():
        prior.params[k][...] = v
    return prior


def copy_params(src, dst):
    for k in src.params:
        dst.params[k][...] = src.params[k]


def given_pairs(arch, b, seed):
    """(z_t, t, labels, target) with every label, the null label 10 always among them."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((b, arch.latent)).astype(np.float32)
    t = rng.uniform(0, 1, b).astype(np.float32)
    labels = rng.integers(0, arch.n_classes + 1, b).astype(np.uint8)
    labels[-1] = NULL
    target = rng.normal(0, 1.5, (b, arch.latent)).astype(np.float32)
    return z, t, labels, target


def codes(arch, b, seed, logvar_range=(-2.0, 0.5)):
    """(mu, logvar, labels) of b codes: labels 0..9 only (the training labels)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 2, (b, arch.latent)).astype(np.float32)
    logvar = rng.uniform(*logvar_range, (b, arch.latent)).astype(np.float32)
    labels = rng.integers(0, arch.n_classes, b).astype(np.uint8)
    return mu, logvar, labels


def state_bytes(prior):
    return {g: prior.group_block(g).tobytes() for g in ("param", "adam_m", "adam_v")}


# ---------------------------------------------------------------- the reference itself


def test_reference_condition_rows():
    c = R.flow_condition(np.array([0.0, 0.25]), np.array([3, NULL]), n_freq=3)
    assert c.shape == (2, 2 * 3 + 11)
    np.testing.assert_allclose(c[1, :6], [np.sin(0.25), np.cos(0.25), np.sin(0.5), np.cos(0.5),
                                          np.sin(1.0), np.cos(1.0)])
    np.testing.assert_array_equal(c[0, :6], [0, 1, 0, 1, 0, 1])
    assert c[0, 6 + 3] == 1 and c[1, 6 + NULL] == 1 and c[:, 6:].sum() == 2
    assert TINY.n_cond == 17 and TINY.layers()[0] == ("in", 22, 20)


@pytest.mark.parametrize("act", ["elu", "relu"])
def test_reference_matches_finite_differences(act):
    arch = with_act(TINY, act)
    p = R.flow_init_params(arch.latent, arch.hidden, arch.blocks, arch.n_freq, seed=2)
    z, t, labels, target = given_pairs(arch, 6, seed=2)
    labels[0] = 0
    assert NULL in labels
    loss, grads, v = R.flow_forward_backward(p, z, t, labels, target, act, arch.n_freq)
    assert v.shape == (6, arch.latent)
    assert loss == pytest.approx(np.mean((v - target) ** 2), rel=1e-12)
    rng = np.random.default_rng(0)
    h = 1e-6
    bad = []
    for k in R.flow_param_names(arch.blocks):
        scale = np.abs(grads[k]).max()
        for _ in range(5):
            idx = tuple(int(rng.integers(0, s)) for s in p[k].shape)
            q = {kk: vv.copy() for kk, vv in p.items()}
            q[k][idx] += h
            lp = R.flow_forward_backward(q, z, t, labels, target, act, arch.n_freq)[0]
            q[k][idx] -= 2 * h
            lm = R.flow_forward_backward(q, z, t, labels, target, act, arch.n_freq)[0]
            fd = (lp - lm) / (2 * h)
            if not abs(fd - grads[k][idx]) <= 1e-5 * abs(fd) + 1e-6 * scale + 1e-9:
                bad.append(f"{k}{idx}: analytic {grads[k][idx]:.9g}, fd {fd:.9g}")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------- kernels vs reference


def check_against_reference(prior, z, t, labels, target):
    arch = prior.arch
    p = params64(prior)
    loss = prior.forward_backward_given(z, t, labels, target)
    grads = {k: np.array(v) for k, v in prior.grads.items()}
    v = prior.velocity(z, t, labels)
    ref_loss, ref_grads, ref_v = R.flow_forward_backward(p, z, t, labels, target, arch.act,
                                                         arch.n_freq)
    problems = []
    if not abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) + 1e-6:
        problems.append(f"loss: got {loss!r}, reference {ref_loss!r}")
    assert v.shape == z.shape and v.dtype == np.float32
    problems.append(R.mismatch("velocity", v, ref_v))
    problems += [R.mismatch(f"grad {k}", grads[k], ref_grads[k])
                 for k in R.flow_param_names(arch.blocks)]
    problems = [m for m in problems if m]
    assert not problems, (f"kernels vs reference (act={arch.act}, b={len(labels)}):\n  "
                          + "\n  ".join(problems))


@pytest.mark.parametrize("act", ["elu", "relu"])
@pytest.mark.parametrize("batch", [1, 7, 37])
def test_tiny_arch_matches_reference(act, batch):
    arch = with_act(TINY, act)
    prior = make_prior(arch, max_batch=37)
    for name, shape in {"in.W": (20, 22), "in.b": (20,), "res1a.W": (20, 37),
                        "res1b.W": (20, 20), "res2a.b": (20,), "out.W": (5, 20),
                        "out.b": (5,)}.items():
        assert prior.params[name].shape == shape and prior.params[name].dtype == np.float32
    check_against_reference(prior, *given_pairs(arch, batch, seed=batch))


@pytest.mark.parametrize("act", ["elu", "relu"])
def test_realistic_arch_batch64_matches_reference(act):
    arch = with_act(REALISTIC, act)
    prior = make_prior(arch, max_batch=64)
    check_against_reference(prior, *given_pairs(arch, 64, seed=11))


def test_kernel_grads_match_kernel_finite_differences():
    """Central differences of the float32 kernel loss (a mean squared error of size ~2, so its
    rounding noise is ~1e-7) at the largest-gradient entries and along a random direction;
    ELU, so the loss is smooth."""
    prior = make_prior(TINY, max_batch=8)
    z, t, labels, target = given_pairs(TINY, 7, seed=4)
    loss0 = prior.forward_backward_given(z, t, labels, target)
    base = {k: np.array(v) for k, v in prior.params.items()}
    noise = 16 * float(np.spacing(np.float32(abs(loss0))))
    bad = R.kernel_fd_mismatches(prior, lambda: prior.forward_backward_given(z, t, labels, target),
                                 R.flow_param_names(TINY.blocks), noise)
    for k in prior.params:  # nothing was left perturbed
        assert np.array_equal(prior.params[k], base[k])
    assert not bad, f"loss {loss0}:\n  " + "\n  ".join(bad)


def test_arrays_that_do_not_fit_are_refused_before_the_kernels_write():
    """Bounds checks are off inside the kernels: every entry point checks its arrays; training
    and integration take the digits 0..9 only, velocity and given pairs the null label too."""
    prior = make_prior(TINY, max_batch=16)
    z, t, labels, target = given_pairs(TINY, 4, seed=1)
    digits = np.array([0, 1, 2, 9], np.uint8)
    with pytest.raises(ValueError, match="does not fit"):
        prior.velocity(*given_pairs(TINY, 17, seed=1)[:3])
    with pytest.raises(ValueError, match="t must be"):
        prior.velocity(z, t[:3], labels)
    with pytest.raises(ValueError, match="label 11"):
        prior.velocity(z, t, np.array([0, 1, 11, 10], np.uint8))
    with pytest.raises(ValueError, match="z must be"):
        prior.forward_backward_given(np.zeros((4, 6), np.float32), t, labels, target)
    with pytest.raises(ValueError, match="target must be"):
        prior.forward_backward_given(z, t, labels, target[:3])
    with pytest.raises(ValueError, match="label 10"):
        prior.forward_backward(z, z, labels, 0, 0, 0.1)
    with pytest.raises(ValueError, match="logvar must be"):
        prior.forward_backward(z, z[:, :4].copy(), digits, 0, 0, 0.1)
    with pytest.raises(ValueError, match="label 10"):
        prior.integrate(z, labels)
    with pytest.raises(ValueError, match="steps"):
        prior.integrate(z, digits, steps=0)
    prior.forward_backward(z, z, digits, 0, 0, 0.1)  # the right sizes pass
    prior.forward_backward_given(z, t, labels, target)


# ---------------------------------------------------------------- Adam


def test_fused_adam_equals_forward_backward_then_adam_update():
    fused, unfused = make_prior(TINY, max_batch=32), make_prior(TINY, max_batch=32)
    mu, logvar, labels = codes(TINY, 29, seed=3)
    for step in range(4):
        lr = 1e-3 * (step + 1)
        a = fused.train_step(mu, logvar, labels, lr, 5, step, 0.3)
        b = unfused.forward_backward(mu, logvar, labels, 5, step, 0.3)
        unfused.adam_update(lr)
        assert a == b and fused.adam_t == unfused.adam_t == step + 1
        sa, sb = state_bytes(fused), state_bytes(unfused)
        for group in sa:
            assert sa[group] == sb[group], (group, step)


def test_fused_adam_matches_reference_adam():
    prior = make_prior(TINY, max_batch=32)
    mu, logvar, labels = codes(TINY, 23, seed=8)
    p = params64(prior)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    t = 0
    for step in range(3):
        z, tt, cond, target = prior.pairs(mu, logvar, labels, 9, step, 0.2)
        _, grads, _ = R.flow_forward_backward(params64(prior), z, tt, cond, target, TINY.act,
                                              TINY.n_freq)
        p, m, v, t = R.adam(params64(prior), grads, m, v, t, 1e-3)
        prior.train_step(mu, logvar, labels, 1e-3, 9, step, 0.2)
        problems = [R.mismatch(f"param {k} after step {step}", prior.params[k], p[k], rtol=1e-5)
                    for k in R.flow_param_names(TINY.blocks)]
        problems += [R.mismatch(f"adam_m {k} after step {step}", prior.adam_m[k], m[k])
                     for k in R.flow_param_names(TINY.blocks)]
        problems = [x for x in problems if x]
        assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- the training pairs


def test_pairs_are_a_straight_path_from_noise_to_the_code():
    arch = P.PriorArch(latent=6, hidden=16, blocks=1, n_freq=2)
    prior = make_prior(arch, max_batch=256)
    mu, logvar, labels = codes(arch, 256, seed=1)
    z, t, cond, target = (np.asarray(x, dtype=np.float64) if x.dtype == np.float32 else x
                          for x in prior.pairs(mu, logvar, labels, 3, 7, 0.0))
    assert z.shape == target.shape == mu.shape and t.shape == cond.shape == (256,)
    assert np.all(t >= 0) and np.all(t < 1) and len(np.unique(t)) == 256
    assert abs(t.mean() - 0.5) < 0.06 and abs(t.std() - 12 ** -0.5) < 0.04
    np.testing.assert_array_equal(cond, labels)  # drop 0: no null label
    tc = t[:, None]
    z0, z1 = z - tc * target, z + (1 - tc) * target
    sigma = np.exp(0.5 * logvar.astype(np.float64))
    eps = (z1 - mu) / sigma
    for name, draws in (("z0", z0), ("eps", eps)):
        assert abs(draws.mean()) < 0.08 and abs(draws.std() - 1) < 0.06, (name, draws.mean(),
                                                                        draws.std())
    assert abs(np.corrcoef(z0.ravel(), eps.ravel())[0, 1]) < 0.08

    # z0, eps and t do not depend on the codes: other mu and logvar move z1 = mu + sigma·eps
    mu2, logvar2, _ = codes(arch, 256, seed=2)
    z_b, t_b, cond_b, target_b = prior.pairs(mu2, logvar2, labels, 3, 7, 0.0)
    np.testing.assert_array_equal(t_b, t)
    np.testing.assert_array_equal(cond_b, cond)
    z0_b = z_b - t_b[:, None].astype(np.float64) * target_b
    z1_b = z_b + (1 - t_b[:, None].astype(np.float64)) * target_b
    np.testing.assert_allclose(z0_b, z0, atol=2e-5)
    np.testing.assert_allclose((z1_b - mu2) / np.exp(0.5 * logvar2.astype(np.float64)), eps,
                               rtol=1e-4, atol=5e-4)

    # a vanishing sigma: z1 is mu itself
    z_c, t_c, _, target_c = prior.pairs(mu, np.full_like(logvar, -40.0), labels, 3, 7, 0.0)
    z1_c = z_c + (1 - t_c[:, None].astype(np.float64)) * target_c
    np.testing.assert_allclose(z1_c, mu, atol=2e-5)
    np.testing.assert_allclose(z_c - t_c[:, None].astype(np.float64) * target_c, z0, atol=2e-5)

    # sample k's draws are keyed by k: a shorter batch gets the first rows
    short = prior.pairs(mu[:9], logvar[:9], labels[:9], 3, 7, 0.0)
    for got, full in zip(short, prior.pairs(mu, logvar, labels, 3, 7, 0.0)):
        np.testing.assert_array_equal(got, full[:9])


def test_pairs_drop_labels_to_null_at_the_drop_rate():
    arch = P.PriorArch(latent=3, hidden=16, blocks=1, n_freq=2)
    prior = make_prior(arch, max_batch=256)
    mu, logvar, labels = codes(arch, 256, seed=4)
    dropped, kept = 0, 0
    for step in range(20):
        _, _, cond, _ = prior.pairs(mu, logvar, labels, 1, step, 0.25)
        null = cond == NULL
        np.testing.assert_array_equal(cond[~null], labels[~null])
        dropped += int(null.sum())
        kept += int((~null).sum())
        assert not (prior.pairs(mu, logvar, labels, 1, step, 0.0)[2] == NULL).any()
    rate = dropped / (dropped + kept)
    assert abs(rate - 0.25) < 0.025, rate  # 5120 draws: sd 0.006
    assert (prior.pairs(mu, logvar, labels, 1, 0, 1.0)[2] == NULL).all()


def test_pairs_are_keyed_by_seed_and_step():
    prior = make_prior(TINY, max_batch=32)
    mu, logvar, labels = codes(TINY, 31, seed=5)
    a = prior.pairs(mu, logvar, labels, 8, 3, 0.5)
    b = prior.pairs(mu, logvar, labels, 8, 3, 0.5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for other in (prior.pairs(mu, logvar, labels, 8, 4, 0.5),
                  prior.pairs(mu, logvar, labels, 9, 3, 0.5)):
        assert not np.array_equal(other[0], a[0])
        assert not np.array_equal(other[1], a[1])
        assert not np.array_equal(other[3], a[3])
        assert not np.array_equal(other[2], a[2])


@pytest.mark.parametrize("drop", [0.0, 0.4])
def test_a_step_trains_on_exactly_its_pairs(drop):
    prior = make_prior(TINY, max_batch=48)
    mu, logvar, labels = codes(TINY, 37, seed=6)
    z, t, cond, target = prior.pairs(mu, logvar, labels, 2, 11, drop)
    assert (drop > 0) == (cond == NULL).any()
    loss_given = prior.forward_backward_given(z, t, cond, target)
    grads_given = {k: np.array(v) for k, v in prior.grads.items()}
    loss = prior.forward_backward(mu, logvar, labels, 2, 11, drop)
    assert loss == loss_given
    for k, v in prior.grads.items():
        np.testing.assert_array_equal(v, grads_given[k], err_msg=k)
    # ... and those are the reference's loss and gradients of these pairs
    ref_loss, ref_grads, _ = R.flow_forward_backward(params64(prior), z, t, cond, target,
                                                     TINY.act, TINY.n_freq)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    problems = [R.mismatch(f"grad {k}", prior.grads[k], ref_grads[k]) for k in ref_grads]
    problems = [x for x in problems if x]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- threads and integration


MID = P.PriorArch(latent=24, hidden=72, blocks=2, n_freq=4)


def test_training_is_bit_identical_for_1_and_2_threads():
    one, two = make_prior(MID, max_batch=64, threads=1), make_prior(MID, max_batch=64, threads=2)
    mu, logvar, labels = codes(MID, 53, seed=7)
    for step in range(5):
        a = one.train_step(mu, logvar, labels, 2e-3, 4, step, 0.2)
        b = two.train_step(mu, logvar, labels, 2e-3, 4, step, 0.2)
        assert a == b, step
    assert state_bytes(one) == state_bytes(two)
    assert state_bytes(one)["param"] != state_bytes(make_prior(MID, max_batch=64))["param"]


@pytest.mark.parametrize("method", P.METHODS)
def test_integrate_is_bit_identical_for_1_and_2_threads(method):
    one, two = make_prior(MID, max_batch=32, threads=1), make_prior(MID, max_batch=32, threads=2)
    z0 = np.random.default_rng(3).standard_normal((45, MID.latent)).astype(np.float32)
    labels = (np.arange(45) % 10).astype(np.uint8)
    for guidance in (0.0, 1.5):
        a = one.integrate(z0, labels, steps=5, method=method, guidance=guidance)
        b = two.integrate(z0, labels, steps=5, method=method, guidance=guidance)
        assert a.tobytes() == b.tobytes(), guidance
        assert not np.array_equal(a, z0)


def numpy_integrate(prior, z0, labels, steps, method, guidance):
    """dz/dt = v(z, t, y) from t = 0 to 1 in float64, the velocity from prior.velocity (one
    call per evaluation, so the prior's max_batch must hold the whole batch):
    euler      z += h·v(z, t)
    midpoint   z += h·v(z + h/2·v(z, t), t + h/2)
    heun       z += h/2·(v(z, t) + v(z + h·v(z, t), t + h))
    with guidance w, v = (1 + w)·v(z, t, y) - w·v(z, t, null)."""
    null = np.full(len(labels), NULL, np.uint8)

    def v(z, t):
        zz = np.ascontiguousarray(z, dtype=np.float32)
        tt = np.full(len(labels), t, np.float32)
        cond = prior.velocity(zz, tt, labels).astype(np.float64)
        if guidance == 0:
            return cond
        return (1 + guidance) * cond - guidance * prior.velocity(zz, tt, null)

    z = np.asarray(z0, dtype=np.float64).copy()
    h = 1.0 / steps
    for i in range(steps):
        t = i * h
        v1 = v(z, t)
        if method == "euler":
            z = z + h * v1
        elif method == "midpoint":
            z = z + h * v(z + 0.5 * h * v1, t + 0.5 * h)
        else:
            z = z + 0.5 * h * (v1 + v(z + h * v1, t + h))
    return z


@pytest.mark.parametrize("method", P.METHODS)
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_integrate_matches_a_numpy_ode_solver(method, guidance):
    prior = make_prior(TINY, max_batch=16)          # 40 draws: batches of 16, 16 and 8
    wide = make_prior(TINY, max_batch=48)
    copy_params(prior, wide)
    rng = np.random.default_rng(9)
    z0 = rng.standard_normal((40, TINY.latent)).astype(np.float32)
    labels = rng.integers(0, 10, 40).astype(np.uint8)
    before = z0.copy()
    got = prior.integrate(z0, labels, steps=4, method=method, guidance=guidance)
    assert got.shape == z0.shape and got.dtype == np.float32
    np.testing.assert_array_equal(z0, before)  # the draws are not overwritten
    want = numpy_integrate(wide, z0, labels, 4, method, guidance)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
    # the solvers (and guidance) differ by far more than that tolerance
    for other in P.METHODS:
        if other != method:
            assert np.abs(numpy_integrate(wide, z0, labels, 4, other, guidance)
                          - want).max() > 1e-3 * scale
    assert np.abs(numpy_integrate(wide, z0, labels, 4, method, 1.0 - guidance / 2)
                  - want).max() > 1e-3 * scale


def test_it_learns_a_two_mode_latent():
    """Codes at (+3, 0) for label 0 and (-3, 0) for label 1 (sigma 0.1): after 300 steps the
    flow carries N(0, I) draws to their label's mode."""
    arch = P.PriorArch(latent=2, hidden=32, blocks=2, n_freq=4)
    prior = P.FlowPrior(arch, max_batch=256)
    prior.init_params(0)
    labels = (np.arange(128) % 2).astype(np.uint8)
    mu = np.zeros((128, 2), np.float32)
    mu[:, 0] = np.where(labels == 0, 3.0, -3.0)
    logvar = np.full((128, 2), np.log(0.01), np.float32)
    losses = [prior.train_step(mu, logvar, labels, 3e-3, 0, step, 0.1) for step in range(300)]
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20]), (losses[:20], losses[-20:])
    y = (np.arange(400) % 2).astype(np.uint8)
    z0 = np.random.default_rng(1).standard_normal((400, 2)).astype(np.float32)
    for method in P.METHODS:
        z = prior.integrate(z0, y, steps=20, method=method)
        for label, sign in ((0, 1), (1, -1)):
            x = sign * z[y == label, 0]
            assert 2.2 < x.mean() < 3.8, (method, label, x.mean())
            assert (x > 1.5).mean() > 0.95, (method, label)
            assert abs(z[y == label, 1].mean()) < 0.5
            assert z[y == label].std(axis=0).max() < 0.7, (method, label, z[y == label].std(0))


# ---------------------------------------------------------------- PriorTrainer on a tiny CVAE


CVAE = Arch(h1=32, h2=16, latent=4)
SMALL = P.PriorArch(latent=4, hidden=24, blocks=2, n_freq=3)


def tiny_digits(n, seed):
    """conftest's digit-like images (make_digits) as a Dataset."""
    return Dataset(*make_digits(n, seed), "synthetic")


def tiny_cvae(seed=3):
    model = Model(CVAE, max_batch=64)
    model.init_params(seed)
    return model


@pytest.fixture(scope="module")
def cvae_world():
    return tiny_cvae(), tiny_digits(150, 0)   # 150 codes in batches of 32: 5 steps an epoch


def saver(path):
    """train_prior's save(meta, sections): the prior file at path."""
    return lambda meta, sections: save_checkpoint(path, P.KIND, meta, sections)


def resume(model, data, path):
    meta, sections, _ = load_checkpoint(path, expected_kind=P.KIND)
    return TP.resume_prior(model, data, meta, sections, str(path), saver(path))


def start(model, data, path, **kwargs):
    return TP.train_prior(model, data, saver(path), arch=SMALL, epochs=3, batch=32, lr=3e-3,
                         drop=0.2, seed=5, checkpoint_name="last.cvae", **kwargs)


def stop_at(trainer, step):
    def on_progress(done, loss, rate):
        assert np.isfinite(loss) and rate > 0
        if done == step:
            trainer.request_stop(15)
    trainer.on_progress = on_progress


@pytest.mark.parametrize("stops", [(7,), (10,), (3, 10)])
def test_a_stopped_and_resumed_prior_is_byte_identical(tmp_path, cvae_world, stops):
    """Steps 3 and 7 are mid-epoch, step 10 is the end of the second of three epochs."""
    model, data = cvae_world
    straight = tmp_path / "straight" / RD.PRIOR
    straight.parent.mkdir()
    trainer = start(model, data, straight)
    assert (trainer.per_epoch, trainer.total) == (5, 15)
    assert trainer.run() == "complete"
    meta, _, _ = load_checkpoint(straight, expected_kind=P.KIND)
    assert meta["complete"] and meta["step"] == meta["adam_t"] == 15
    assert len(meta["epoch_losses"]) == 3 and meta["cvae_sha256"] == P.cvae_digest(model)

    path = tmp_path / "stopped" / RD.PRIOR
    path.parent.mkdir()
    trainer = start(model, data, path)
    for k, step in enumerate(stops):
        stop_at(trainer, step)
        assert trainer.run() == "interrupted"
        meta, _, _ = load_checkpoint(path, expected_kind=P.KIND)
        assert (meta["step"], meta["complete"]) == (step, False)
        assert len(meta["epoch_losses"]) == step // 5
        assert (meta["loss_sum"] == 0) == (step % 5 == 0)
        trainer = resume(model, data, path)
        assert trainer.plan.step == step
    assert trainer.run() == "complete"
    assert path.read_bytes() == straight.read_bytes()


def test_a_prior_loads_and_samples(tmp_path, cvae_world):
    model, data = cvae_world
    run = tmp_path / "run"
    run.mkdir()
    assert start(model, data, RD.prior_path(run)).run() == "complete"
    prior, meta = P.load_prior(RD.prior_path(run), model)
    assert prior.arch == SMALL and meta["complete"]
    # the digest is of the parameters alone: the CVAE saved and loaded (another max_batch,
    # threads) is the same CVAE
    save_checkpoint(run / "last.cvae", "cvae", {"arch": model.arch.to_json(), "adam_t": 0},
                    model.state_sections())
    loaded, _ = model_from_checkpoint(run / "last.cvae", threads=2, max_batch=16)
    assert P.cvae_digest(loaded) == P.cvae_digest(model) == meta["cvae_sha256"]
    again, _ = P.load_prior(RD.prior_path(run), loaded)
    assert state_bytes(again) == state_bytes(prior)
    sampler = RD.open_prior(None, run, model, steps=3, method="midpoint", guidance=0.5)
    assert isinstance(sampler, P.FlowSampler) and sampler.describe()["steps"] == 3
    labels = (np.arange(20) % 10).astype(np.uint8)
    z = sampler.draw(labels, np.random.default_rng(0), 0.8)
    z0 = P.GaussianPrior(4).draw(labels, np.random.default_rng(0), 0.8)
    np.testing.assert_array_equal(z, prior.integrate(z0, labels, 3, "midpoint", 0.5))
    assert isinstance(RD.open_prior("gaussian", run, model), P.GaussianPrior)
    # With 2 or 3 threads each integrates its own lane of the batch's columns: the same bits
    # (100 codes: three lanes of 32, 32 and 48 columns, the last one 36 codes and padding).
    for threads in (2, 3):
        for precision in ("fp32", "bf16"):
            many, _ = P.load_prior(RD.prior_path(run), model, threads=threads,
                                   precision=precision)
            lanes = P.FlowSampler(many, RD.prior_path(run), 4, 3, "midpoint", 0.5)
            one, _ = P.load_prior(RD.prior_path(run), model, precision=precision)
            for n in (1, 2, 20, 37, 100):
                z0 = np.random.default_rng(n).standard_normal((n, 4), dtype=np.float32)
                y = (np.arange(n) % 10).astype(np.uint8)
                expect = one.integrate(z0, y, 3, "midpoint", 0.5)
                np.testing.assert_array_equal(lanes.from_normals(z0.copy(), y, 1.0), expect)


def test_active_dims_are_those_whose_means_vary():
    rng = np.random.default_rng(0)
    mu = rng.normal(0, 0.02, (5000, 6)).astype(np.float32)   # variance 4e-4: inactive
    mu[:, 1] = rng.normal(0, 1.0, 5000)
    mu[:, 4] = rng.normal(0, 0.2, 5000)                       # variance 0.04 > 0.01
    assert TP.active_dims(mu) == (1, 4)
    assert TP.active_dims(mu[:, [0, 2]]) in ((0,), (1,))      # none active: the most varied


def test_a_prior_over_some_dims_moves_only_those(tmp_path, cvae_world):
    model, data = cvae_world
    arch = P.PriorArch(latent=2, hidden=24, blocks=1, n_freq=3, dims=(1, 3))
    path = tmp_path / "prior.cvae"
    trainer = TP.train_prior(model, data, saver(path), arch=arch, epochs=1, batch=32)
    mu, logvar = encode_all(model, data.images, data.labels)
    np.testing.assert_array_equal(trainer.mu, mu[:, [1, 3]])
    np.testing.assert_array_equal(trainer.logvar, logvar[:, [1, 3]])
    assert trainer.run() == "complete"
    sampler = RD.open_prior("flow", tmp_path, model, steps=2, method="euler")
    labels = (np.arange(30) % 10).astype(np.uint8)
    z = sampler.draw(labels, np.random.default_rng(1), 1.0)
    z0 = P.GaussianPrior(4).draw(labels, np.random.default_rng(1), 1.0)
    np.testing.assert_array_equal(z[:, [0, 2]], z0[:, [0, 2]])
    np.testing.assert_array_equal(z[:, [1, 3]],
                                  trainer.prior.integrate(z0[:, [1, 3]], labels, 2, "euler"))
    # Chosen by the codes when no architecture is given: the tiny CVAE's active dimensions.
    fresh = TP.train_prior(model, data, saver(tmp_path / "other.cvae"), epochs=1, batch=32,
                          hidden=16, blocks=1)
    assert fresh.prior.arch.dims == TP.active_dims(mu) and fresh.prior.arch.hidden == 16


# ---------------------------------------------------------------- load_prior and open_prior errors


def one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cvae_world):
    """A run directory with last.cvae (the tiny CVAE) and a complete one-epoch prior.cvae."""
    model, data = cvae_world
    run = tmp_path_factory.mktemp("trained") / "run"
    run.mkdir()
    save_checkpoint(run / "last.cvae", "cvae", {"arch": model.arch.to_json(), "adam_t": 0},
                    model.state_sections())
    trainer = TP.train_prior(model, data, saver(RD.prior_path(run)), arch=SMALL, epochs=1,
                             batch=64)
    assert trainer.run() == "complete"
    return run


def test_another_cvaes_prior_is_refused(trained, cvae_world):
    model, _ = cvae_world
    P.load_prior(RD.prior_path(trained), model)  # its own CVAE: fine
    other = tiny_cvae()
    other.params["dec3.b"][5] += np.float32(1e-3)   # one parameter differs
    with pytest.raises(CvaeError) as e:
        P.load_prior(RD.prior_path(trained), other)
    one_line_error(e, RD.prior_path(trained), "another CVAE")
    with pytest.raises(CvaeError) as e:
        RD.open_prior("flow", trained, other)
    one_line_error(e, "another CVAE")


def test_a_damaged_prior_is_refused(tmp_path, trained, cvae_world):
    model, _ = cvae_world
    data = bytearray(open(RD.prior_path(trained), "rb").read())
    data[len(data) // 2] ^= 0x10
    path = tmp_path / RD.PRIOR
    path.write_bytes(bytes(data))
    with pytest.raises(CvaeError) as e:
        P.load_prior(str(path), model)
    one_line_error(e, str(path), "damaged")


def test_a_partly_trained_prior_is_refused(tmp_path, cvae_world):
    model, data = cvae_world
    path = tmp_path / RD.PRIOR
    trainer = start(model, data, path)
    stop_at(trainer, 2)
    assert trainer.run() == "interrupted"
    with pytest.raises(CvaeError) as e:
        P.load_prior(str(path), model)
    one_line_error(e, str(path), "partly trained", "--resume")


def test_a_cvae_checkpoint_is_not_a_prior(trained, cvae_world):
    model, _ = cvae_world
    with pytest.raises(CvaeError) as e:
        P.load_prior(str(trained / "last.cvae"), model)
    one_line_error(e, "last.cvae", "'cvae'", "'prior'")


def test_open_prior_without_a_prior_file(tmp_path, cvae_world):
    model, _ = cvae_world
    with pytest.raises(CvaeError) as e:
        RD.open_prior("flow", tmp_path, model)
    one_line_error(e, str(tmp_path), "no flow prior", "--prior gaussian")
    fallback = RD.open_prior(None, tmp_path, model)
    assert isinstance(fallback, P.GaussianPrior) and not isinstance(fallback, P.FlowSampler)
    assert fallback.describe() == {"prior": "gaussian"}
    z = fallback.draw(np.zeros(6, np.uint8), np.random.default_rng(2), 0.5)
    assert z.shape == (6, CVAE.latent) and z.dtype == np.float32
    np.testing.assert_array_equal(
        z, 0.5 * np.random.default_rng(2).standard_normal((6, 4), dtype=np.float32))
