"""Every kernel build this CPU can run (baseline, x86-64-v3, x86-64-v4, v4 + AVX512_BF16)
matches the reference,
and CVAE_KERNELS picks the build."""

import numpy as np
import pytest

from cvae import kernels
from cvae.errors import CvaeError
from cvae.model import Arch

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
