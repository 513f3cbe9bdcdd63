"""The learned latent prior: conditional flow matching over a trained CVAE's codes.

`cvae generate` used to draw z ~ N(0, I). The encoder's codes do not fill N(0, I), and a draw
that lands between them decodes to a malformed digit. The flow prior learns where the codes
are: a velocity network v(z_t, t, y) (cvae._kernels.FlowNet, its own slab, the same linear
layers and fused Adam as the CVAE) is trained with the conditional flow-matching objective
(Lipman et al. 2023; rectified flow, Liu et al. 2023):

    z1 = mu(x, y) + sigma(x, y)·eps     a training image's code, a fresh eps every step
    z0 ~ N(0, I),  t ~ U[0, 1),  z_t = (1 - t)·z0 + t·z1
    loss = mean over the latent of (v(z_t, t, y) - (z1 - z0))²

and sampling solves dz/dt = v(z, t, y) from a draw z0 ~ N(0, T² I) at t = 0 to t = 1
(`--steps` Euler, midpoint or Heun steps), then the decoder decodes z1 as before. With
probability `drop` a training label is replaced by a null label, so the same network also
learns the unconditional velocity; `--guidance w` then samples with
(1 + w)·v(z, t, y) - w·v(z, t, null) (classifier-free guidance, Ho & Salimans 2022).

This module is the network and its samplers; cvae.train_prior trains it. The prior lives in
its run as `prior.cvae` (kind "prior", cvae.rundir): parameters, Adam state, its position,
and the SHA-256 of the CVAE parameters it was trained on, so a prior is never used with
another run's decoder.
"""

import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np

from cvae.checkpoint import header_int, header_numbers, load_checkpoint, register_kind_check
from cvae.data import NUM_DIGITS
from cvae.errors import CvaeError
from cvae.model import (ACTIVATIONS, MAX_BATCH, MAX_WIDTH, SlabModel, check_sizes,
                        check_state_sections)

KIND = "prior"
PRIORS = ("flow", "gaussian")

# Defaults chosen by measurement: `benchmarks/prior_choices.py` on the main run's checkpoint
# (full, 30 epochs; N(0, I) there: 96.15% of samples recognised, lowest digit 91.6%, FID
# 8.68, diversity 11.61 against the test digits' 12.45), 1,000 samples per digit at T = 1
# (results_main/prior-choices/):
#
#   velocity network (active dims)   sampling                  accuracy lowest  FID  diversity
#   256 wide, 3 blocks, 20 epochs     heun 10                   97.96%  95.5%  4.12  11.49
#   256 wide, 3 blocks, 20 epochs     euler 10                  98.83%  97.0%  3.78  10.74
#   256 wide, 2 blocks, 30 epochs     heun 10, guidance 1       98.75%  97.4%  2.67  11.56
#    64 wide, 2 blocks, 60 epochs     euler 8, guidance 2       99.50%  98.8%  3.73  10.61
#    96 wide, 2 blocks, 50 epochs     midpoint 4, guidance 2    99.08%  98.2%  3.33  11.59
#    96 wide, 2 blocks, 50 epochs     midpoint 4, guidance 3    99.01%  97.6%  4.81  11.81
#   128 wide, 2 blocks, 50 epochs     midpoint 4, guidance 2    98.74%  97.6%  3.47  11.71
#    96 wide, 2 blocks, 80 epochs     midpoint 4, guidance 2    98.87%  97.8%  3.53  11.79
#   the chosen network, sampled with  midpoint 2, guidance 2    99.14%  98.4%  3.25  11.51
#                                     midpoint 1, guidance 2    99.12%  98.3%  3.78  11.47
#                                     midpoint 2, guidance 1    98.83%  97.8%  3.24  11.51
#                                     euler 6, guidance 2       99.76%  99.5%  3.93  10.49
#
# Euler's few steps pull samples together (accuracy up, diversity down by 15%); guidance 2
# lifts accuracy and FID without that loss, 3 costs FID. Wider or longer-trained networks did
# not do better, and the learned paths are straight enough that 2 midpoint steps do as well as
# 4. Sampling costs 8 evaluations of a 48k-multiply network per code, about half a decoder's
# work (see the README's 'The flow prior' for the times).
#
# The learning rate went from 1e-3 to 2e-3 when the conv CVAE came (22 active dims of 128):
# prior_choices.py on its run (`cvae train --variant conv --epochs 30`), 96 wide, 2 blocks,
# 50 epochs, midpoint 2, guidance 2, seeds 0-2 of the prior (results_main/prior-choices/
# conv-*.jsonl): lr 1e-3 98.99% / FID 2.55; lr 2e-3 99.15-99.29% / 2.43-2.58 (seeds 1, 2).
# On the main command's MLP run (bf16, 17 active dims; mlp-lr.jsonl): lr 1e-3 99.12% / 3.20;
# lr 2e-3 99.06% / 2.95 and 99.04% / 3.23 (seeds 0, 1). Guidance 1.5 lowers FID by 0.17 (conv)
# to 0.32 (MLP) and costs the MLP accuracy (98.99-99.05%), so 2 stays. A 128-wide network did
# no better than 96 at 2e-3 (conv: 99.24-99.25%, FID 2.39-2.49). No prior can get the conv
# decoder's FID much below 2: decoding the codes of real training images of the asked digit,
# mu + sigma eps, scores 1.99 (99.55%), mu alone 1.69 (`prior_choices.py --oracle`,
# conv-oracle.jsonl).
DEFAULT_HIDDEN = 96
DEFAULT_BLOCKS = 2
DEFAULT_FREQS = 8
DEFAULT_EPOCHS = 50
DEFAULT_BATCH = 256
DEFAULT_LR = 2e-3
DEFAULT_DROP = 0.1
DEFAULT_STEPS = 2
DEFAULT_METHOD = "midpoint"
DEFAULT_GUIDANCE = 2.0
METHODS = ("euler", "midpoint", "heun")
SAMPLE_BATCH = 1024  # codes per kernel call when sampling: wide GEMMs for a small network


@dataclass(frozen=True)
class PriorArch:
    """The velocity network over `latent` dimensions of the CVAE's latent: the CVAE latent
    indices `dims` (default: the first `latent`)."""

    latent: int
    hidden: int = DEFAULT_HIDDEN
    blocks: int = DEFAULT_BLOCKS
    n_freq: int = DEFAULT_FREQS
    act: str = "elu"
    n_classes: int = NUM_DIGITS
    dims: tuple = None

    def __post_init__(self):
        dims = tuple(range(self.latent)) if self.dims is None else tuple(int(d) for d in self.dims)
        if len(dims) != self.latent or len(set(dims)) != len(dims) or min(dims, default=0) < 0:
            raise ValueError(f"dims must be {self.latent} distinct latent indices, got {dims}")
        object.__setattr__(self, "dims", dims)

    @property
    def n_cond(self):
        """Conditioning rows: the time features and the one-hot label (null label included)."""
        return 2 * self.n_freq + self.n_classes + 1

    def layers(self):
        """(name, n_in, n_out): in, then res{k}a and res{k}b per residual block, then out."""
        L, H, c = self.latent, self.hidden, self.n_cond
        layers = [("in", L + c, H)]
        for k in range(1, self.blocks + 1):
            layers += [(f"res{k}a", H + c, H), (f"res{k}b", H, H)]
        return tuple(layers + [("out", H, L)])

    def n_params(self):
        return sum(n_out * (n_in + 1) for _, n_in, n_out in self.layers())

    def to_json(self):
        return dict(latent=self.latent, hidden=self.hidden, blocks=self.blocks,
                    n_freq=self.n_freq, act=self.act, dims=list(self.dims))

    @classmethod
    def from_json(cls, data, source):
        if not (isinstance(data, dict)
                and {"latent", "hidden", "blocks", "n_freq", "act"} <= data.keys()):
            raise CvaeError(f"{source}: no valid prior architecture in its header")
        # Checked before constructing (the default dims alone are a tuple of `latent` ints);
        # the layers' exact bounds are check_sizes', as when a prior is created.
        bounds = {"latent": MAX_WIDTH, "hidden": MAX_WIDTH, "blocks": 8, "n_freq": 24}
        dims = data.get("dims")
        if (not all(type(data[key]) is int and 1 <= data[key] <= high
                    for key, high in bounds.items())
                or data["act"] not in ACTIVATIONS
                or not (dims is None or isinstance(dims, list) and all(
                    type(d) is int and 0 <= d < MAX_WIDTH for d in dims))):
            raise CvaeError(f"{source}: its header's prior architecture {data!r:.120} is not "
                            f"one cvae can build")
        try:
            return cls(**{key: data[key] for key in bounds}, act=data["act"], dims=dims)
        except ValueError:  # dims not `latent` distinct indices
            raise CvaeError(f"{source}: its header's prior architecture {data!r:.120} is not "
                            f"one cvae can build") from None


class FlowPrior(SlabModel):
    """The velocity network's slab and the kernels' FlowNet over it."""

    def __init__(self, arch, max_batch=SAMPLE_BATCH, threads=1, precision="fp32"):
        if arch.act not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}")
        self.arch = arch
        L, H, c, K = arch.latent, arch.hidden, arch.n_cond, arch.blocks
        rows = {"x": L + c, **{f"s{k}": H + c for k in range(K + 1)},
                **{f"a{k}": H for k in range(1, K + 1)}, "v": L, "target": L, "z": L,
                "z_mid": L, "v_first": L, "v_uncond": L}
        grads = ("v", *(f"s{k}" for k in range(K + 1)), *(f"a{k}" for k in range(1, K + 1)))
        # FlowNet's class-bias tables while sampling: for each of `threads` threads, the input
        # layer's and each block's first layer's [hidden][n_classes + 1]; "cls" holds each
        # column's class as bytes.
        tables = threads * (K + 1) * H * (arch.n_classes + 1)
        k = self._carve(arch.layers(), rows, grads, ("t", "loss", "cls"), max_batch, threads,
                        precision, scratch={"scratch.class_tables": tables})
        self.net = k.FlowNet(self.slab, self.layout, arch.layers(), L, arch.n_freq,
                             arch.n_classes, self.max_bp, arch.act, threads, precision)

    def train_step(self, mu, logvar, labels, lr, seed, step, drop):
        """One step on codes (mu, logvar) with Adam fused; returns the batch-mean loss."""
        self.adam_t += 1
        self._last_batch = len(labels)
        return self.net.step(mu, logvar, labels, seed, step, drop, lr, self.adam_t) / len(labels)

    def forward_backward(self, mu, logvar, labels, seed, step, drop):
        """Gradients of the batch-mean loss into ``grads``; returns that mean."""
        self._last_batch = len(labels)
        return self.net.step(mu, logvar, labels, seed, step, drop) / len(labels)

    def forward_backward_given(self, z, t, labels, target):
        """forward_backward on given pairs (label 10: the null label)."""
        self._last_batch = len(labels)
        return self.net.step_given(z, t, labels, target) / len(labels)

    def pairs(self, mu, logvar, labels, seed, step, drop):
        """(z_t, t, labels after the drop, target) that a step on these codes trains on."""
        n, L = mu.shape
        z, target = np.empty((n, L), np.float32), np.empty((n, L), np.float32)
        t, cond = np.empty(n, np.float32), np.empty(n, np.uint8)
        self.net.pairs(mu, logvar, labels, seed, step, drop, z, t, cond, target)
        return z, t, cond, target

    def velocity(self, z, t, labels):
        v = np.empty_like(z)
        self._last_batch = len(labels)
        self.net.velocity(z, t, labels, v)
        return v

    def integrate(self, z0, labels, steps=DEFAULT_STEPS, method=DEFAULT_METHOD,
                  guidance=DEFAULT_GUIDANCE):
        """z1 (n, latent) float32: the ODE solved from each z0 with its label, in batches."""
        z = np.array(z0, dtype=np.float32, order="C")
        labels = np.ascontiguousarray(labels, dtype=np.uint8)
        for start in range(0, len(labels), self.max_batch):
            stop = min(start + self.max_batch, len(labels))
            self.net.integrate(z[start:stop], labels[start:stop], steps, method, guidance)
        return z


# ---------------------------------------------------------------- which prior generates


class GaussianPrior:
    """The CVAE's own prior: z ~ N(0, T² I)."""

    name = "gaussian"

    def __init__(self, latent):
        self.latent = latent

    def draw(self, labels, rng, temperature):
        return self.from_normals(rng.standard_normal((len(labels), self.latent),
                                                     dtype=np.float32), labels, temperature)

    def from_normals(self, z, labels, temperature):
        """The codes of draw() from its N(0, I) draws z ((n, latent) float32, changed in
        place): for callers that draw the normals ahead, on another thread."""
        z *= np.float32(temperature)
        return z

    def describe(self, relative_to=None):
        return {"prior": self.name}


class FlowSampler(GaussianPrior):
    """The flow prior: the same N(0, T² I) draws, the prior's dimensions carried to t = 1 by
    the ODE (the others, where every code is N(0, 1) noise, stay as drawn)."""

    name = "flow"

    def __init__(self, prior, path, latent, steps=DEFAULT_STEPS, method=DEFAULT_METHOD,
                 guidance=DEFAULT_GUIDANCE):
        """latent: the CVAE's latent size (the prior models arch.dims of it)."""
        super().__init__(latent)
        self.prior, self.path = prior, os.path.abspath(path)
        self.steps, self.method, self.guidance = steps, method, guidance

    def from_normals(self, z, labels, temperature):
        z = super().from_normals(z, labels, temperature)
        dims = list(self.prior.arch.dims)
        z[:, dims] = self.prior.integrate(z[:, dims], labels, self.steps, self.method,
                                          self.guidance)
        return z

    def describe(self, relative_to=None):
        """What drew the codes; the prior's file relative to `relative_to` (a directory) when
        given, so that files recording it carry no machine paths."""
        path = self.path if relative_to is None else os.path.relpath(self.path, relative_to)
        return {"prior": self.name, "prior_file": path, "steps": self.steps,
                "method": self.method, "guidance": self.guidance}


def sampling_text(settings):
    """How a flow prior is sampled, in words ('midpoint, 2 steps, guidance 2'), from a
    FlowSampler.describe() or an eval.json by_prior entry; missing parts are left out."""
    parts = [settings["method"]] if isinstance(settings.get("method"), str) else []
    steps, guidance = settings.get("steps"), settings.get("guidance")
    if isinstance(steps, int) and not isinstance(steps, bool):
        parts.append(f"{steps} steps")
    if isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and guidance:
        parts.append(f"guidance {guidance:g}")
    return ", ".join(parts)


def cvae_digest(model):
    """SHA-256 of a CVAE's parameters: which decoder a prior belongs to."""
    return hashlib.sha256(model.group_block("param").tobytes()).hexdigest()


def check_sampling(steps, method, guidance):
    if steps is None or steps < 1:
        raise CvaeError(f"--steps must be a positive integer, got {steps}")
    if method not in METHODS:
        raise CvaeError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if guidance is None or not math.isfinite(guidance) or guidance < 0:
        raise CvaeError(f"--guidance must be a finite number >= 0, got {guidance}")


def load_prior(path, model, threads=1, precision="fp32"):
    """(FlowPrior, meta) from a prior file trained for this CVAE, complete; else CvaeError."""
    meta, sections, _ = load_checkpoint(path, expected_kind=KIND)
    arch = PriorArch.from_json(meta.get("arch", {}), path)
    if meta.get("cvae_sha256") != cvae_digest(model):
        raise CvaeError(f"{path} is the prior of another CVAE (its parameters' digest differs "
                        f"from this checkpoint's): use --prior gaussian, or delete it and train "
                        f"one for this checkpoint with 'cvae prior train --checkpoint RUN'")
    if max(arch.dims) >= model.arch.latent:
        raise CvaeError(f"{path}: its latent dimensions {list(arch.dims)} do not fit the "
                        f"CVAE's {model.arch.latent}")
    if not meta.get("complete"):
        raise CvaeError(f"{path} is a partly trained prior: finish it with 'cvae prior train "
                        f"--checkpoint {os.path.dirname(os.path.abspath(path))} --resume'")
    prior = FlowPrior(arch, threads=threads, precision=precision)
    prior.load_state_sections(sections, source=path)
    return prior, meta


def check_checkpoint(meta, sections, path):
    """The validation of a prior file (kind "prior"), run by load_checkpoint: its numbers
    where numbers belong, its architecture within bounds and matching the sections (its
    training position is cvae.train_prior's check)."""
    for key in ("epochs", "seed", "step"):
        header_int(meta, key, path)
    batch = header_int(meta, "batch", path, 1, MAX_BATCH)
    header_int(meta, "adam_t", path, required=False)
    header_numbers(meta, "lr", path, 1e-30)
    for key in ("drop", "loss_sum", "epoch_losses"):
        header_numbers(meta, key, path)
    arch = PriorArch.from_json(meta.get("arch"), path)
    check_sizes(arch.layers(), max(batch, SAMPLE_BATCH), path)
    check_state_sections(arch.layers(), sections, path)


register_kind_check(KIND, check_checkpoint)
