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

The prior lives in its run as `prior.cvae` (kind "prior"): parameters, Adam state, its
position, and the SHA-256 of the CVAE parameters it was trained on, so a prior is never
used with another run's decoder.
"""

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from cvae.checkpoint import header_int, header_numbers, load_checkpoint, save_checkpoint
from cvae.classifier import cosine_lr
from cvae.data import NUM_DIGITS
from cvae.errors import CvaeError
from cvae.model import (ACTIVATIONS, MAX_BATCH, MAX_WIDTH, SlabModel, check_sizes,
                        check_state_sections)

KIND = "prior"
PRIOR_NAME = "prior.cvae"
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
DEFAULT_HIDDEN = 96
DEFAULT_BLOCKS = 2
DEFAULT_FREQS = 8
DEFAULT_EPOCHS = 50
DEFAULT_BATCH = 256
DEFAULT_LR = 1e-3
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

    def __init__(self, arch, max_batch=SAMPLE_BATCH, threads=1):
        if arch.act not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}")
        self.arch = arch
        L, H, c, K = arch.latent, arch.hidden, arch.n_cond, arch.blocks
        rows = {"x": L + c, **{f"s{k}": H + c for k in range(K + 1)},
                **{f"a{k}": H for k in range(1, K + 1)}, "v": L, "target": L, "z": L,
                "z_mid": L, "v_first": L, "v_uncond": L}
        grads = ("v", *(f"s{k}" for k in range(K + 1)), *(f"a{k}" for k in range(1, K + 1)))
        k = self._carve(arch.layers(), rows, grads, ("t", "loss"), max_batch, threads)
        self.net = k.FlowNet(self.slab, self.layout, arch.layers(), L, arch.n_freq,
                             arch.n_classes, self.max_bp, arch.act, threads)

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
        z = rng.standard_normal((len(labels), self.latent), dtype=np.float32)
        z *= np.float32(temperature)
        return z

    def describe(self):
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

    def draw(self, labels, rng, temperature):
        z = super().draw(labels, rng, temperature)
        dims = list(self.prior.arch.dims)
        z[:, dims] = self.prior.integrate(z[:, dims], labels, self.steps, self.method,
                                          self.guidance)
        return z

    def describe(self):
        return {"prior": self.name, "prior_file": self.path, "steps": self.steps,
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


def prior_path(run_dir):
    return os.path.join(os.fspath(run_dir), PRIOR_NAME)


def check_sampling(steps, method, guidance):
    if steps is None or steps < 1:
        raise CvaeError(f"--steps must be a positive integer, got {steps}")
    if method not in METHODS:
        raise CvaeError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if guidance is None or not math.isfinite(guidance) or guidance < 0:
        raise CvaeError(f"--guidance must be a finite number >= 0, got {guidance}")


def load_prior(path, model, threads=1):
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
    prior = FlowPrior(arch, threads=threads)
    prior.load_state_sections(sections, source=path)
    return prior, meta


def prior_state(run_dir, model):
    """(state, header meta) of RUN/prior.cvae for the CVAE `model`: 'none', 'stale' (the prior
    of other CVAE parameters: an earlier checkpoint's, or a run since continued), 'partial'
    (its training was stopped) or 'complete'. A damaged file is a CvaeError."""
    path = prior_path(run_dir)
    if not os.path.isfile(path):
        return "none", None
    meta, _, _ = load_checkpoint(path, expected_kind=KIND)
    if meta.get("cvae_sha256") != cvae_digest(model):
        return "stale", meta
    return ("complete" if meta.get("complete") else "partial"), meta


def default_prior(run_dir, model):
    """'flow' when RUN/prior.cvae is a complete prior of this CVAE, else 'gaussian'. A prior
    of the run that cannot serve this checkpoint (partly trained, or trained for the run's
    newest checkpoint while an earlier one is asked for) is passed over with a note on stderr;
    a prior of none of the run's checkpoints (copied from another run) is an error."""
    state, _ = prior_state(run_dir, model)
    path = prior_path(run_dir)
    if state == "stale" and not _prior_of_newest_checkpoint(run_dir):
        raise CvaeError(f"{path} is the prior of another CVAE (it fits none of this run's "
                        f"checkpoints): use --prior gaussian, or delete it and train one with "
                        f"'cvae prior train --checkpoint {run_dir}'")
    why = {"partial": f"is partly trained (finish it: cvae prior train --checkpoint {run_dir} "
                      f"--resume)",
           "stale": "belongs to the run's newest checkpoint, not to this one"}.get(state)
    if why:
        print(f"cvae: note: {path} {why}; sampling from N(0, I)", file=sys.stderr, flush=True)
    return "flow" if state == "complete" else "gaussian"


def _prior_of_newest_checkpoint(run_dir):
    """Whether RUN/prior.cvae was trained for the run's newest checkpoint."""
    from cvae.checkpoint import latest_checkpoint
    from cvae.model import model_from_checkpoint

    newest = latest_checkpoint(run_dir)
    if newest is None:
        return False
    return prior_state(run_dir, model_from_checkpoint(newest, max_batch=16)[0])[0] != "stale"


def open_priors(choice, run_dir, model, threads=1, steps=DEFAULT_STEPS, method=DEFAULT_METHOD,
                guidance=DEFAULT_GUIDANCE):
    """The samplers for --prior: 'flow', 'gaussian', 'both' (flow first) or None (both when
    default_prior is flow, else gaussian)."""
    check_sampling(steps, method, guidance)
    if choice is None:
        choice = "both" if default_prior(run_dir, model) == "flow" else "gaussian"
    if choice not in PRIORS + ("both",):
        raise CvaeError(f"--prior must be flow, gaussian or both, got {choice!r}")
    samplers = []
    if choice in ("flow", "both"):
        path = prior_path(run_dir)
        if not os.path.isfile(path):
            raise CvaeError(f"{run_dir} has no flow prior ({PRIOR_NAME}): train one with 'cvae "
                            f"prior train --checkpoint {run_dir}', or use --prior gaussian")
        prior, _ = load_prior(path, model, threads)
        samplers.append(FlowSampler(prior, path, model.arch.latent, steps, method, guidance))
    if choice in ("gaussian", "both"):
        samplers.append(GaussianPrior(model.arch.latent))
    return samplers


def open_prior(choice, run_dir, model, threads=1, steps=DEFAULT_STEPS, method=DEFAULT_METHOD,
               guidance=DEFAULT_GUIDANCE):
    """The sampler for --prior: 'flow', 'gaussian' or None (default_prior)."""
    if choice is None:
        choice = default_prior(run_dir, model)
    if choice not in PRIORS:
        raise CvaeError(f"--prior must be flow or gaussian, got {choice!r}")
    return open_priors(choice, run_dir, model, threads, steps, method, guidance)[0]


# ---------------------------------------------------------------- training


#: A latent dimension is active when its encoder mean varies over the training images by
#: more than this (Burda et al. 2016's active units). The others hold N(0, 1) noise for
#: every image, so N(0, 1) is already their distribution: the flow models the active ones.
ACTIVE_VARIANCE = 0.01


def active_dims(mu):
    """The active dimensions of codes mu (n, latent); the most varied one if none is."""
    variance = mu.var(axis=0, dtype=np.float64)
    dims = np.flatnonzero(variance > ACTIVE_VARIANCE)
    return tuple(int(d) for d in (dims if len(dims) else [int(np.argmax(variance))]))


def in_dims(codes, dims):
    """Each of the arrays in codes, (n, latent), restricted to the prior's dimensions."""
    return tuple(np.ascontiguousarray(c[:, list(dims)]) for c in codes)


def encode_codes(model, dataset):
    """(mu, logvar) float32 (n, latent) of every image of dataset, in the model's batches."""
    images, labels = dataset.images, dataset.labels
    n, L = len(labels), model.arch.latent
    mu, logvar = np.empty((n, L), np.float32), np.empty((n, L), np.float32)
    for start in range(0, n, model.max_batch):
        stop = min(start + model.max_batch, n)
        mu[start:stop], logvar[start:stop] = model.encode(images[start:stop], labels[start:stop])
    return mu, logvar


@dataclass
class PriorPlan:
    """What determines a prior's training, and where it stands; stored in prior.cvae."""

    arch: PriorArch
    cvae_sha256: str
    cvae_checkpoint: str
    epochs: int
    batch: int
    lr: float
    drop: float
    seed: int
    step: int = 0
    loss_sum: float = 0.0   # of the epoch in progress
    complete: bool = False

    def meta(self, adam_t, losses):
        return {"arch": self.arch.to_json(), "cvae_sha256": self.cvae_sha256,
                "cvae_checkpoint": self.cvae_checkpoint, "epochs": self.epochs,
                "batch": self.batch, "lr": self.lr, "drop": self.drop, "seed": self.seed,
                "step": self.step, "adam_t": int(adam_t), "loss_sum": self.loss_sum,
                "complete": self.complete, "epoch_losses": list(losses)}

    @classmethod
    def from_meta(cls, meta, source):
        try:
            plan = cls(arch=PriorArch.from_json(meta["arch"], source),
                       cvae_sha256=str(meta["cvae_sha256"]),
                       cvae_checkpoint=str(meta["cvae_checkpoint"]), epochs=int(meta["epochs"]),
                       batch=int(meta["batch"]), lr=float(meta["lr"]),
                       drop=float(meta["drop"]), seed=int(meta["seed"]),
                       step=int(meta["step"]), loss_sum=float(meta["loss_sum"]),
                       complete=bool(meta["complete"]))
            losses = [float(x) for x in meta["epoch_losses"]]
        except (KeyError, TypeError, ValueError):
            raise CvaeError(f"{source}: its header lacks the prior's training position or "
                            f"configuration") from None
        if plan.epochs <= 0 or plan.batch <= 0 or plan.step < 0 or not 0 <= plan.drop < 1:
            raise CvaeError(f"{source}: inconsistent prior training settings in its header")
        return plan, losses


def check_checkpoint(meta, sections, path):
    """The validation of a prior file (kind "prior"), run by load_checkpoint: its training
    settings and position, its architecture within bounds and matching the sections."""
    for key in ("epochs", "seed", "step"):
        header_int(meta, key, path)
    header_int(meta, "batch", path, 1, MAX_BATCH)
    header_int(meta, "adam_t", path, required=False)
    header_numbers(meta, "lr", path, 1e-30)
    for key in ("drop", "loss_sum", "epoch_losses"):
        header_numbers(meta, key, path)
    plan, _ = PriorPlan.from_meta(meta, path)
    check_sizes(plan.arch.layers(), max(plan.batch, SAMPLE_BATCH), path)
    check_state_sections(plan.arch.layers(), sections, path)


class PriorTrainer:
    """Trains a FlowPrior on a CVAE's training codes from plan.step to the end (or a stop);
    saves prior.cvae after every epoch and when stopped."""

    def __init__(self, path, plan, prior, codes, labels, losses=(), on_progress=None,
                 on_epoch=None):
        self.path, self.plan, self.prior = path, plan, prior
        self.mu, self.logvar = codes
        self.labels = np.ascontiguousarray(labels, dtype=np.uint8)
        self.losses = list(losses)
        self.per_epoch = -(-len(self.labels) // plan.batch)
        self.total = plan.epochs * self.per_epoch
        self.on_progress, self.on_epoch = on_progress, on_epoch
        self.stop_signal = None
        if plan.step > self.total or len(self.losses) != plan.step // self.per_epoch:
            raise CvaeError(f"{path}: its position (step {plan.step}) does not fit "
                            f"{len(self.labels):,} codes in batches of {plan.batch}: was the "
                            f"data set changed?")

    def request_stop(self, signum):
        self.stop_signal = signum

    def save(self):
        save_checkpoint(self.path, KIND, self.plan.meta(self.prior.adam_t, self.losses),
                        self.prior.state_sections())

    def run(self):
        """'complete' or 'interrupted'."""
        plan, prior, n = self.plan, self.prior, len(self.labels)
        b = plan.batch
        mu_buf = np.empty((b, self.mu.shape[1]), np.float32)
        logvar_buf = np.empty_like(mu_buf)
        label_buf = np.empty(b, np.uint8)
        while plan.step < self.total:
            epoch, first = divmod(plan.step, self.per_epoch)
            order = np.random.default_rng([plan.seed, epoch]).permutation(n)
            start_time = time.perf_counter()
            for k in range(first, self.per_epoch):
                rows = order[k * b:(k + 1) * b]
                m = len(rows)
                np.take(self.mu, rows, axis=0, out=mu_buf[:m])
                np.take(self.logvar, rows, axis=0, out=logvar_buf[:m])
                np.take(self.labels, rows, out=label_buf[:m])
                loss = prior.train_step(mu_buf[:m], logvar_buf[:m], label_buf[:m],
                                        cosine_lr(plan.lr, plan.step, self.total), plan.seed,
                                        plan.step, plan.drop)
                if not math.isfinite(loss):
                    raise CvaeError(f"the prior's training diverged at step {plan.step} (loss "
                                    f"{loss}): try a lower --lr")
                plan.step += 1
                plan.loss_sum += loss * m
                if self.on_progress is not None:
                    self.on_progress(plan.step, loss, m / max(time.perf_counter() - start_time,
                                                              1e-9) * (k + 1 - first))
                if self.stop_signal is not None and k + 1 < self.per_epoch:
                    self.save()
                    return "interrupted"
            self.losses.append(plan.loss_sum / n)
            plan.loss_sum = 0.0
            plan.complete = plan.step >= self.total
            self.save()
            if self.on_epoch is not None:
                self.on_epoch(epoch + 1, self.losses[-1], time.perf_counter() - start_time)
            if self.stop_signal is not None:
                return "interrupted"
        return "complete"


def train_prior(model, train_set, path, arch=None, epochs=DEFAULT_EPOCHS, batch=DEFAULT_BATCH,
                lr=DEFAULT_LR, drop=DEFAULT_DROP, seed=0, threads=1, checkpoint_name="",
                on_progress=None, on_epoch=None, **arch_settings):
    """A fresh PriorTrainer for `model` over the codes of train_set (prior.cvae at path).
    Without arch, a PriorArch over the active dimensions (active_dims) with arch_settings
    (hidden, blocks, n_freq, act)."""
    codes = encode_codes(model, train_set)
    if arch is None:
        dims = active_dims(codes[0])
        arch = PriorArch(latent=len(dims), dims=dims, **arch_settings)
    plan = PriorPlan(arch=arch, cvae_sha256=cvae_digest(model), cvae_checkpoint=checkpoint_name,
                     epochs=epochs, batch=batch, lr=lr, drop=drop, seed=seed)
    prior = FlowPrior(arch, max_batch=max(batch, SAMPLE_BATCH), threads=threads)
    prior.init_params(seed)
    return PriorTrainer(path, plan, prior, in_dims(codes, arch.dims), train_set.labels,
                        on_progress=on_progress,
                        on_epoch=on_epoch)


def resume_prior(model, train_set, path, threads=1, on_progress=None, on_epoch=None):
    """A PriorTrainer continuing prior.cvae at path exactly where it stopped."""
    meta, sections, _ = load_checkpoint(path, expected_kind=KIND)
    plan, losses = PriorPlan.from_meta(meta, path)
    if plan.cvae_sha256 != cvae_digest(model):
        raise CvaeError(f"{path} is the prior of another CVAE (its parameters' digest differs "
                        f"from this checkpoint's): remove it and train a new one")
    if not any(name.startswith("adam_") for name in sections):
        raise CvaeError(f"{path} has no optimizer state, so its training cannot continue")
    prior = FlowPrior(plan.arch, max_batch=max(plan.batch, SAMPLE_BATCH), threads=threads)
    prior.load_state_sections(sections, source=path)
    prior.adam_t = int(meta.get("adam_t", 0))
    if prior.adam_t != plan.step:
        raise CvaeError(f"{path}: Adam's step count {prior.adam_t} does not match its step "
                        f"{plan.step}")
    if max(plan.arch.dims) >= model.arch.latent:
        raise CvaeError(f"{path}: its latent dimensions do not fit this CVAE")
    codes = in_dims(encode_codes(model, train_set), plan.arch.dims)
    return PriorTrainer(path, plan, prior, codes, train_set.labels, losses, on_progress,
                        on_epoch)


# ---------------------------------------------------------------- a run's prior, trained


def prior_progress(mode, total_steps, first_step, epochs):
    """(on_progress, on_epoch, close) for mode 'rich' (a progress bar on stderr), 'json' (one
    object per epoch on stdout) or 'quiet'."""
    if mode == "json":
        def on_epoch(epoch, loss, seconds):
            print(json.dumps({"prior_epoch": epoch, "loss": loss, "seconds": seconds}), flush=True)
        return None, on_epoch, lambda: None
    if mode != "rich":
        return None, None, lambda: None
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    bar = Progress(TextColumn("flow prior"), BarColumn(bar_width=30), MofNCompleteColumn(),
                   TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), console=Console(stderr=True), refresh_per_second=4)
    task = bar.add_task("steps", total=total_steps, completed=first_step, stats="")
    bar.start()

    def on_progress(step, loss, codes_per_s):
        if step % 16 == 0:
            bar.update(task, completed=step, stats=f"loss {loss:.4f} {codes_per_s:,.0f} codes/s")

    def on_epoch(epoch, loss, seconds):
        bar.update(task, completed=epoch * total_steps // epochs)
        bar.console.print(f"prior epoch {epoch}: loss {loss:.4f} ({seconds:.1f} s)")

    return on_progress, on_epoch, bar.stop


def train_run_prior(run_dir, model, train_set, threads, checkpoint_name, settings=None,
                    resume=False, mode="rich"):
    """Train (or with resume, continue) RUN/prior.cvae for `model` on train_set's codes,
    with a progress display and Ctrl-C/SIGTERM stopping after the current step with the prior
    saved. settings: PriorArch fields hidden, blocks, n_freq, act and train_prior's epochs,
    batch, lr, drop, seed (missing: defaults). Returns (status, trainer, seconds)."""
    from cvae.train import stop_on_signals

    path = prior_path(run_dir)
    start = time.perf_counter()
    settings = dict(settings or {})
    if resume:
        trainer = resume_prior(model, train_set, path, threads)
    else:
        trainer = train_prior(model, train_set, path, threads=threads,
                              checkpoint_name=checkpoint_name, **settings)
    trainer.on_progress, trainer.on_epoch, close = prior_progress(
        mode, trainer.total, trainer.plan.step, trainer.plan.epochs)
    say = (lambda text: print(text, file=sys.stderr, flush=True))
    try:
        with stop_on_signals(trainer, say):
            status = trainer.run()
    finally:
        close()
    return status, trainer, time.perf_counter() - start


def stale_prior_error(run_dir):
    """The error for a RUN/prior.cvae of other CVAE parameters than the run's newest."""
    return CvaeError(f"{prior_path(run_dir)} is the prior of other CVAE parameters than the "
                     f"run's newest checkpoint (an earlier checkpoint's?): delete it, and "
                     f"'cvae train --resume {run_dir}' trains a new {PRIOR_NAME} for the "
                     f"finished CVAE")


def complete_run_prior(run_dir, model, train_set, threads, checkpoint_name, settings=None,
                       mode="rich", replace_stale=False):
    """Make RUN/prior.cvae a complete prior of `model`: nothing to do when it is one; a stopped
    one is resumed, a missing one trained (with `settings`, see train_run_prior); one of other
    CVAE parameters is trained anew in its place with replace_stale, else a CvaeError.
    Returns (status, PriorTrainer or None when nothing was done, seconds, the state before)."""
    state, _ = prior_state(run_dir, model)
    if state == "complete":
        return "complete", None, 0.0, state
    if state == "stale" and not replace_stale:
        raise stale_prior_error(run_dir)
    status, trainer, seconds = train_run_prior(run_dir, model, train_set, threads,
                                               checkpoint_name, settings,
                                               resume=state == "partial", mode=mode)
    return status, trainer, seconds, state


def cmd_prior_train(args):
    from cvae.atomic import check_writable
    from cvae.cli import run_data_dir
    from cvae.data import Dataset
    from cvae.sample import checkpoint_digits, open_model, resolve_checkpoint

    path, run_dir = resolve_checkpoint(args.checkpoint)
    out = check_writable(prior_path(run_dir))
    given = {k: getattr(args, k) for k in ("hidden", "blocks", "epochs", "batch", "lr", "drop",
                                           "seed") if getattr(args, k) is not None}
    if args.resume:
        if not os.path.isfile(out):
            raise CvaeError(f"--resume: {run_dir} has no {PRIOR_NAME} to continue")
        if given:
            raise CvaeError(f"--resume continues {out} with its own settings: leave out "
                            + ", ".join(f"--{k}" for k in given))
    elif os.path.exists(out):
        raise CvaeError(f"{run_dir} already has a prior ({PRIOR_NAME}): continue it with "
                        f"--resume, or delete it to train a new one")
    model, meta = open_model(path, args)
    digits = checkpoint_digits(meta, path)
    train_set = Dataset.load(run_data_dir(args, run_dir), "train", digits)
    trained_on = (meta.get("data") or {}).get("train_images")
    if trained_on is not None and trained_on != len(train_set):
        raise CvaeError(f"{path} was trained on {trained_on:,} training images, but the data "
                        f"gives {len(train_set):,}: pass the run's --data")
    mode = "json" if args.json else "quiet" if args.quiet else "rich"
    status, trainer, seconds = train_run_prior(run_dir, model, train_set, model.threads,
                                               os.path.basename(path), given, args.resume, mode)
    return report_prior_training(status, trainer, seconds, mode, model.threads,
                                 f"cvae prior train --checkpoint {run_dir} --resume",
                                 resumed=args.resume)


def report_prior_training(status, trainer, seconds, mode, threads, resume_command,
                          resumed=False, cvae_seconds=None):
    """Say how a prior's training ended and return the exit code: stopped (stderr: where it
    was saved and resume_command; 130/143), or complete (one JSON object in mode 'json', a line
    in 'rich', and with cvae_seconds the CVAE's training time beside the prior's)."""
    from cvae.train import EXIT_SIGNAL

    plan, out = trainer.plan, trainer.path
    if status == "interrupted":
        print(f"cvae: stopped the flow prior at step {plan.step:,} of {trainer.total:,}; saved "
              f"{out}\ncvae: resume with: {resume_command}", file=sys.stderr, flush=True)
        return EXIT_SIGNAL.get(trainer.stop_signal, 130)
    loss = trainer.losses[-1] if trainer.losses else None
    result = {"prior": os.path.abspath(out), "epochs": plan.epochs, "loss": loss,
              "seconds": seconds, "resumed": resumed, "codes": len(trainer.labels),
              "dims": list(plan.arch.dims), "params": plan.arch.n_params(), "threads": threads}
    if cvae_seconds is not None:
        result["cvae_seconds"] = cvae_seconds
    if mode == "json":
        print(json.dumps(result), flush=True)
    elif mode == "rich":
        here = " (resumed: this invocation's time)" if resumed else ""
        print(f"flow prior: {plan.epochs} epoch{'s' * (plan.epochs != 1)} over "
              f"{len(trainer.labels):,} codes ({plan.arch.latent} active latent dimensions), "
              f"loss {loss:.4f}, {seconds:.1f} s{here} on {threads} threads -> {out}", flush=True)
        if cvae_seconds:
            print(f"training time: CVAE {cvae_seconds:.1f} s, flow prior {seconds:.1f} s "
                  f"({seconds / cvae_seconds:.0%} of the CVAE's)", flush=True)
    return 0


# ---------------------------------------------------------------- command line


def add_prior_options(p, both=False):
    """--prior, --steps, --method, --guidance: which prior draws the codes, and how the flow
    is solved (generate, eval, sweep)."""
    choices = PRIORS + (("both",) if both else ())
    p.add_argument("--prior", choices=choices, default=None,
                   help="flow: the run's learned prior (prior.cvae); gaussian: z ~ N(0, T² I)"
                        + ("; both: each, the flow's figures on top" if both else "")
                        + " (default: " + ("both" if both else "flow")
                        + " when the run has prior.cvae, else gaussian)")
    p.add_argument("--steps", dest="ode_steps", type=int, default=DEFAULT_STEPS, metavar="N",
                   help=f"ODE steps from t = 0 to 1 for the flow prior (default: {DEFAULT_STEPS})")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help=f"ODE solver for the flow prior (default: {DEFAULT_METHOD})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, metavar="W",
                   help="classifier-free guidance for the flow prior: (1 + W)·v(z, t, y) - "
                        f"W·v(z, t, none); 0 is none (default: {DEFAULT_GUIDANCE:g})")


def register(subparsers):
    from cvae.cli import (Formatter, Parser, _number_type, non_negative_int, positive_float,
                          positive_int, probability)

    blocks = _number_type(int, "an integer", lambda v: 1 <= v <= 8, "an integer from 1 to 8")

    p = subparsers.add_parser(
        "prior", formatter_class=Formatter,
        help="train a run's flow-matching prior (better samples than N(0, I))",
        description="A learned prior over a trained CVAE's latent codes: conditional flow "
                    "matching, see the README's\n'The flow prior'. 'generate', 'eval' and "
                    "'report' use it once the run has prior.cvae.")
    sub = p.add_subparsers(dest="prior_command", metavar="ACTION", parser_class=Parser)
    sub.required = True
    q = sub.add_parser(
        "train", formatter_class=Formatter, help="train RUN/prior.cvae",
        description="Encode the run's training images once, then train the velocity network "
                    "v(z_t, t, y) on\nz_t = (1 - t)·z0 + t·z1, target z1 - z0, z1 = mu + "
                    "sigma·eps a code, z0 ~ N(0, I), t ~ U[0, 1),\nin the latent dimensions "
                    "whose mu varies over the training images (the others are N(0, 1)\n"
                    "noise for every image already).\nSaves RUN/prior.cvae after every epoch; "
                    "Ctrl-C (or SIGTERM) saves and exits 130 (143); continue\nwith --resume.")
    q.add_argument("--checkpoint", required=True, metavar="RUN",
                   help="a run directory (its last.cvae) or a .cvae checkpoint; the prior is "
                        "written beside it as prior.cvae")
    q.add_argument("--data", metavar="DIR", default=None,
                   help="MNIST directory (default: $CVAE_DATA, else the run's, else the cache)")
    q.add_argument("--epochs", type=positive_int, default=None,
                   help=f"passes over the codes (default: {DEFAULT_EPOCHS})")
    q.add_argument("--batch", type=positive_int, default=None,
                   help=f"codes per step (default: {DEFAULT_BATCH})")
    q.add_argument("--lr", type=positive_float, default=None,
                   help=f"peak learning rate, cosine decay to 0 (default: {DEFAULT_LR:g})")
    q.add_argument("--hidden", type=positive_int, default=None,
                   help=f"width of the velocity network (default: {DEFAULT_HIDDEN})")
    q.add_argument("--blocks", type=blocks, default=None,
                   help=f"residual blocks, 1 to 8 (default: {DEFAULT_BLOCKS})")
    q.add_argument("--drop", type=probability, default=None,
                   help="probability that a training label is replaced by the null label, for "
                        f"--guidance (default: {DEFAULT_DROP:g})")
    q.add_argument("--seed", type=non_negative_int, default=None,
                   help="seed of the initialisation, order and noise (default: 0)")
    q.add_argument("--threads", type=positive_int, default=None,
                   help="OpenMP threads (default: the CPUs available to this process)")
    q.add_argument("--resume", action="store_true",
                   help="continue RUN/prior.cvae where it stopped, with its settings")
    group = q.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="one JSON object per line")
    group.add_argument("--quiet", action="store_true", help="print only errors")
    q.set_defaults(func=cmd_prior_train)

