"""The kernels' forward/backward against an independent float64 NumPy reference.

- the reference itself is checked by central finite differences (float64);
- the kernels' loss, activations, activation gradients and parameter gradients match the
  reference (tiny odd-sized arch, both activations, beta 0 / 1 / 0.37; and "mini" at b=64);
- the kernels' gradients match finite differences of the kernels' own float32 loss.
"""

import numpy as np
import pytest

from cvae.model import Arch, Model  # (not importable = failure, never a skip)

from . import reference as R
from .conftest import params64

TINY = dict(h1=24, h2=16, latent=8)  # deliberately not multiples of 16
SEED = 1234


# --------------------------------------------------------------------------- helpers

def make_model(arch, max_batch, threads=1, seed=0, random_biases=True):
    model = Model(arch, max_batch=max_batch, threads=threads)
    model.init_params(seed=seed)
    if random_biases:  # so that a kernel that drops or misplaces a bias cannot pass
        rng = np.random.default_rng(seed + 100)
        for k, v in model.params.items():
            if k.endswith(".b"):
                v[...] = rng.normal(0, 0.1, v.shape)
    return model


def kernel_step(model, pixels, labels, beta, seed, step):
    """forward_backward on the kernels; returns copies of everything it produced."""
    loss, rec, kl = model.forward_backward(pixels, labels, beta, seed, step)
    return dict(
        loss=loss, rec=rec, kl=kl,
        grads={k: np.array(v) for k, v in model.grads.items()},
        acts={k: np.array(v) for k, v in model.acts.items()},
        act_grads={k: np.array(v) for k, v in model.act_grads.items()},
    )


def check_against_reference(model, pixels, labels, beta, seed, step, act):
    b = pixels.shape[0]
    p = params64(model)
    eps = model.noise(seed, step, b)
    assert eps.shape == (b, model.arch.latent) and eps.dtype == np.float32
    eps = np.array(eps, dtype=np.float64)
    got = kernel_step(model, pixels, labels, beta, seed, step)
    loss, rec, kl, grads, acts, act_grads = R.forward_backward(p, pixels, labels, eps, beta, act)

    problems = []
    for name, g, r, rtol, atol in (("loss", got["loss"], loss, 1e-5, 1e-5),
                                   ("rec", got["rec"], rec, 1e-5, 1e-5),
                                   ("kl", got["kl"], kl, 1e-4, 1e-5)):
        if not abs(g - r) <= rtol * abs(r) + atol:
            problems.append(f"{name}: got {g!r}, reference {r!r} (diff {g - r:.3g})")
    assert set(got["grads"]) == set(R.PARAM_NAMES), sorted(got["grads"])
    assert set(got["acts"]) >= set(R.ACT_NAMES), sorted(got["acts"])
    assert set(got["act_grads"]) >= set(R.ACT_NAMES), sorted(got["act_grads"])
    for k in R.PARAM_NAMES:
        problems.append(R.mismatch(f"grad {k}", got["grads"][k], grads[k]))
    for k in R.ACT_NAMES:
        problems.append(R.mismatch(f"act {k}", got["acts"][k], acts[k]))
        problems.append(R.mismatch(f"act_grad {k}", got["act_grads"][k], act_grads[k]))
    problems = [m for m in problems if m]
    assert not problems, f"kernels vs reference (act={act}, beta={beta}, b={b}):\n  " + "\n  ".join(problems)
    return got


# --------------------------------------------------------------------------- the reference itself

@pytest.mark.parametrize("act", ["elu", "relu"])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.37])
def test_reference_matches_finite_differences(act, beta):
    b, L = 5, TINY["latent"]
    p = R.init_params(**TINY, seed=3)
    pixels = R.digit_like_pixels(b, seed=3)
    labels = R.random_labels(b, seed=3)
    eps = np.random.default_rng(3).normal(size=(b, L))
    loss, rec, kl, grads, _, act_grads = R.forward_backward(p, pixels, labels, eps, beta, act)
    assert np.isclose(loss, rec + beta * kl)

    # d loss / d eps = d loss / d z * std: checks the "z" activation gradient
    std = np.exp(0.5 * R.forward_backward(p, pixels, labels, eps, beta, act)[4]["logvar"])
    bad = R.reference_fd_mismatches(lambda q, e: R.loss_only(q, pixels, labels, e, beta, act),
                                    p, eps, grads, act_grads["z"] * std, R.PARAM_NAMES)
    assert not bad, "\n".join(bad)


def test_reference_adam_formula():
    rng = np.random.default_rng(0)
    p = {"w": rng.normal(size=5)}
    g = {"w": rng.normal(size=5)}
    m = {"w": np.zeros(5)}
    v = {"w": np.zeros(5)}
    p1, m1, v1, t1 = R.adam(p, g, m, v, 0, 0.01)
    # first step of Adam moves every weight by ~lr against the sign of its gradient
    assert t1 == 1
    np.testing.assert_allclose(p1["w"], p["w"] - 0.01 * g["w"] / (np.abs(g["w"]) + 1e-8), rtol=1e-12)
    np.testing.assert_allclose(m1["w"], 0.1 * g["w"])
    np.testing.assert_allclose(v1["w"], 0.001 * g["w"] ** 2)


# --------------------------------------------------------------------------- kernels vs reference

@pytest.mark.parametrize("act,beta", [("elu", 0.0), ("elu", 1.0), ("relu", 0.0), ("relu", 1.0), ("elu", 0.37)])
def test_tiny_arch_matches_reference(act, beta):
    arch = Arch(**TINY, act=act)
    assert (arch.h1, arch.h2, arch.latent, arch.act, arch.x_dim, arch.n_classes) == (24, 16, 8, act, 784, 10)
    model = make_model(arch, max_batch=7)
    b = 5
    pixels = R.digit_like_pixels(b, seed=11)
    labels = R.random_labels(b, seed=11)
    for name, shape in {
        "enc1.W": (24, 794), "enc1.b": (24,), "enc2.W": (16, 24), "enc2.b": (16,),
        "enc3.W": (16, 16), "enc3.b": (16,), "dec1.W": (16, 18), "dec1.b": (16,),
        "dec2.W": (24, 16), "dec2.b": (24,), "dec3.W": (784, 24), "dec3.b": (784,),
    }.items():
        assert model.params[name].shape == shape, (name, model.params[name].shape)
        assert model.params[name].dtype == np.float32
    check_against_reference(model, pixels, labels, beta, SEED, 3, act)


@pytest.mark.parametrize("act", ["elu", "relu"])
@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_mini_batch64_matches_reference(act, beta):
    model = make_model(Arch.variant("mini", act=act), max_batch=64)
    pixels = R.digit_like_pixels(64, seed=5)
    labels = R.random_labels(64, seed=5)
    check_against_reference(model, pixels, labels, beta, SEED, 17, act)


def test_noise_is_deterministic_and_standard_normal():
    model = make_model(Arch.variant("mini", act="elu"), max_batch=64)
    a = np.array(model.noise(SEED, 5, 64))
    assert a.shape == (64, model.arch.latent) and a.dtype == np.float32
    assert np.array_equal(a, model.noise(SEED, 5, 64))
    assert not np.array_equal(a, model.noise(SEED, 6, 64))
    assert not np.array_equal(a, model.noise(SEED + 1, 5, 64))
    many = np.concatenate([np.array(model.noise(SEED, s, 64)).ravel() for s in range(20)])
    assert abs(many.mean()) < 0.05 and abs(many.std() - 1) < 0.05, (many.mean(), many.std())


# --------------------------------------------------------------------------- kernels vs their own finite differences

@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_kernel_grads_match_kernel_finite_differences(beta):
    """Central differences of the float32 kernel loss.

    The kernel loss is a float32 number of size ~550 (784 BCE terms per image), so its
    rounding noise is ~1e-4 absolute. Steps are therefore large (3e-2 for single entries,
    0.1 along unit-norm directions) on an ELU net (smooth), with O(1) weights so that
    encoder gradients are not tiny; a float64 model of this check errs by <= 1.3e-3
    relative, against a tolerance of 2e-2 relative plus 16 ulp of the loss.
    """
    act = "elu"
    b = 3
    model = make_model(Arch(**TINY, act=act), max_batch=4, random_biases=False)
    for k, v in R.init_params(**TINY, seed=1, scale=1.0).items():
        model.params[k][...] = v
    pixels = R.digit_like_pixels(b, seed=1)
    labels = R.random_labels(b, seed=1)
    seed, step = SEED, 9

    loss0, _, _ = model.forward_backward(pixels, labels, beta, seed, step)
    g = {k: np.array(v, dtype=np.float64) for k, v in model.grads.items()}
    base = {k: np.array(v) for k, v in model.params.items()}
    # entries to probe: the largest gradients of the (finite-difference-checked) reference
    eps = np.array(model.noise(seed, step, b), dtype=np.float64)
    ref_g = R.forward_backward(params64(model), pixels, labels, eps, beta, act)[3]

    noise = 16 * float(np.spacing(np.float32(abs(loss0))))  # loss rounding allowance
    rng = np.random.default_rng(0)
    bad = []

    def loss_at(k, value):
        model.params[k][...] = value
        stored = np.array(model.params[k], dtype=np.float64)
        loss = model.forward_backward(pixels, labels, beta, seed, step)[0]
        model.params[k][...] = base[k]
        return loss, stored

    for k in R.PARAM_NAMES:
        p0 = base[k].astype(np.float64)
        # three single entries with the largest |gradient|
        for flat in np.argsort(-np.abs(ref_g[k]).ravel())[:3]:
            idx = np.unravel_index(flat, p0.shape)
            hi, lo = p0.copy(), p0.copy()
            hi[idx] += 3e-2
            lo[idx] -= 3e-2
            lp, hi32 = loss_at(k, hi)
            lm, lo32 = loss_at(k, lo)
            delta = hi32[idx] - lo32[idx]
            fd = (lp - lm) / delta
            tol = 2e-2 * abs(g[k][idx]) + noise / delta
            if not abs(fd - g[k][idx]) <= tol:
                bad.append(f"{k}{tuple(int(i) for i in idx)}: kernel grad {g[k][idx]:.6g}, "
                           f"finite difference {fd:.6g} (tol {tol:.2g})")
        # two whole-tensor directions (unit norm, step 0.1): along sign(grad), and random
        for kind, u in (("sign", np.sign(ref_g[k])), ("random", rng.choice([-1.0, 1.0], size=p0.shape))):
            u = u / np.linalg.norm(u)
            lp, hi32 = loss_at(k, p0 + 0.1 * u)
            lm, lo32 = loss_at(k, p0 - 0.1 * u)
            d = hi32 - lo32
            predicted = float((g[k] * d).sum())
            tol = 2e-2 * np.linalg.norm(g[k]) * np.linalg.norm(d) + noise
            if not abs((lp - lm) - predicted) <= tol:
                bad.append(f"{k} along {kind} direction: kernel grad predicts dloss {predicted:.6g}, "
                           f"measured {lp - lm:.6g} (tol {tol:.2g})")
    for k in R.PARAM_NAMES:  # nothing was left perturbed
        assert np.array_equal(model.params[k], base[k])
    assert not bad, f"beta={beta}, loss={loss0}:\n  " + "\n  ".join(bad)
