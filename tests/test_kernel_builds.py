"""Every kernel build this CPU can run (baseline, x86-64-v3, x86-64-v4, v4 + AVX512_BF16)
matches the reference,
and CVAE_KERNELS picks the build."""

import numpy as np
import pytest

from cvae import kernels
from cvae.errors import CvaeError
from cvae.images import to_uint8
from cvae.model import Arch, Model, decode_images

from . import reference as R
from .conftest import params64, runnable_builds
from .test_gradients import TINY, check_against_reference, make_model


def test_baseline_is_always_built():
    assert "baseline" in runnable_builds()


@pytest.mark.parametrize("build", ["baseline", "v3", "v4", "v4bf16"])
def test_build_matches_reference(build, forced_build):
    if build not in runnable_builds():
        pytest.skip(f"this CPU or installation has no {build} build")
    forced_build(build)
    assert kernels.build_name() == build
    model = make_model(Arch(act="elu", **TINY), max_batch=40)
    assert model.kernel_isa == kernels.kernels().isa
    pixels, labels = R.digit_like_pixels(37, seed=3), R.random_labels(37, seed=3)
    check_against_reference(model, pixels, labels, beta=1.0, seed=5, step=7, act="elu")


@pytest.mark.parametrize("build", ["baseline", "v3", "v4", "v4bf16"])
def test_build_classifier_matches_reference(build, forced_build):
    from cvae.classifier import ClassifierArch

    from .test_classifier import make_classifier

    if build not in runnable_builds():
        pytest.skip(f"this CPU or installation has no {build} build")
    forced_build(build)
    arch = ClassifierArch(h1=40, h2=24)
    model = make_classifier(arch, max_batch=40)
    pixels, labels = R.digit_like_pixels(37, seed=4), R.random_labels(37, seed=4)
    p = params64(model)
    loss = model.forward_backward(pixels, labels)
    ref_loss, ref_grads, _ = R.classifier_forward_backward(p, pixels, labels, arch.act)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) + 1e-6
    problems = [R.mismatch(f"{build} grad {k}", model.grads[k], ref_grads[k])
                for k in R.CLASSIFIER_PARAMS]
    assert not [m for m in problems if m], problems


def test_unknown_build_is_a_clear_error(forced_build):
    forced_build("avx9000")
    with pytest.raises(CvaeError, match="CVAE_KERNELS"):
        kernels.kernels()


def test_auto_picks_the_best_runnable_build(forced_build):
    forced_build("auto")
    assert kernels.build_name() == runnable_builds()[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("build", ["baseline", "v3", "v4", "v4bf16"])
def test_decode_bytes_are_to_uint8_of_decode(build, precision, forced_build):
    """Net.decode_bytes (the threads round the feature-major sigmoid straight to bytes) gives
    the bytes of cvae.images.to_uint8(decode(...)), batch by batch, the .5 ties included: the
    weights are drawn so that some 255 p land exactly on a tie, and some of those round
    another way when 255 p is taken in double precision (the float32 product must be used)."""
    if build not in runnable_builds():
        pytest.skip(f"this CPU or installation has no {build} build")
    forced_build(build)

    def make(max_batch, threads):
        model = Model(Arch(h1=24, h2=16, latent=8), max_batch=max_batch, threads=threads,
                      precision=precision)
        model.init_params(seed=0)
        rng = np.random.default_rng(7)
        for v in model.params.values():
            v[...] = rng.normal(0, 0.3, v.shape)
        if precision == "bf16":
            model.sync_bf16()
        return model, rng

    model, rng = make(512, 2)
    z = rng.standard_normal((509, 8), dtype=np.float32) * 2   # not a multiple of 16
    labels = rng.integers(0, 10, 509).astype(np.uint8)
    probs = model.decode(z, labels)
    scaled = probs * np.float32(255)
    assert (scaled - np.floor(scaled) == 0.5).sum() >= 3, "no .5 ties: the check would be weak"
    assert (np.rint(probs.astype(np.float64) * 255) != np.rint(scaled)).any()
    out = np.full((509, 784), 7, dtype=np.uint8)
    assert model.decode_bytes(z, labels, out) is out
    np.testing.assert_array_equal(out, to_uint8(probs))
    np.testing.assert_array_equal(decode_images(model, z[:100], labels[:100]), out[:100])
    # a digit's bytes do not depend on the batch it is decoded in, nor on the threads
    np.testing.assert_array_equal(decode_images(make(48, 1)[0], z, labels), out)

    model.params["dec3.b"][5] = np.nan
    if precision == "bf16":
        model.sync_bf16()
    with pytest.raises(CvaeError, match="NaN"):
        decode_images(model, z, labels)
