"""Training the flow prior (cvae.prior) on a trained CVAE's codes, by conditional flow matching.

Every training image is encoded once (mu, logvar); each step draws fresh z1 = mu + sigma·eps,
z0 ~ N(0, I) and t ~ U[0, 1) inside the kernels, keyed by (seed, step, sample), so a stopped
and resumed training is bit-identical to an uninterrupted one. The prior's file is written
through the `save(meta, sections)` the caller gives (cvae.rundir owns where it goes).
"""

import math
import time
from dataclasses import dataclass

import numpy as np

from cvae.errors import CvaeError
from cvae.model import PRECISIONS, encode_all
from cvae.checkpoint import register_kind_check
from cvae.prior import (DEFAULT_BATCH, DEFAULT_DROP, DEFAULT_EPOCHS, DEFAULT_LR, KIND,
                        SAMPLE_BATCH, FlowPrior, PriorArch, cvae_digest)
from cvae.schedule import cosine_lr
from cvae.signals import exit_code


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
    precision: str = "fp32"
    step: int = 0
    loss_sum: float = 0.0   # of the epoch in progress
    complete: bool = False

    def meta(self, adam_t, losses):
        return {"arch": self.arch.to_json(), "cvae_sha256": self.cvae_sha256,
                "cvae_checkpoint": self.cvae_checkpoint, "epochs": self.epochs,
                "batch": self.batch, "lr": self.lr, "drop": self.drop, "seed": self.seed,
                "precision": self.precision,
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
                       complete=bool(meta["complete"]),
                       precision=str(meta.get("precision", "fp32")))
            losses = [float(x) for x in meta["epoch_losses"]]
        except (KeyError, TypeError, ValueError):
            raise CvaeError(f"{source}: its header lacks the prior's training position or "
                            f"configuration") from None
        if (plan.epochs <= 0 or plan.batch <= 0 or plan.step < 0 or not 0 <= plan.drop < 1
                or plan.precision not in PRECISIONS):
            raise CvaeError(f"{source}: inconsistent prior training settings in its header")
        return plan, losses


def check_training_position(meta, sections, path):
    """What load_checkpoint checks of a prior file after the network's check (cvae.prior):
    its training position and settings (a PriorPlan)."""
    PriorPlan.from_meta(meta, path)


register_kind_check(KIND, check_training_position)


class PriorTrainer:
    """Trains a FlowPrior on a CVAE's training codes from plan.step to the end (or a stop);
    saves prior.cvae after every epoch and when stopped."""

    def __init__(self, save, plan, prior, codes, labels, losses=(), on_progress=None,
                 on_epoch=None, source="prior.cvae"):
        """save(meta, sections) writes prior.cvae (the run directory's writer)."""
        self._save, self.plan, self.prior = save, plan, prior
        self.mu, self.logvar = codes
        self.labels = np.ascontiguousarray(labels, dtype=np.uint8)
        self.losses = list(losses)
        self.per_epoch = -(-len(self.labels) // plan.batch)
        self.total = plan.epochs * self.per_epoch
        self.on_progress, self.on_epoch = on_progress, on_epoch
        self.stop_signal = None
        if plan.step > self.total or len(self.losses) != plan.step // self.per_epoch:
            raise CvaeError(f"{source}: its position (step {plan.step}) does not fit "
                            f"{len(self.labels):,} codes in batches of {plan.batch}: was the "
                            f"data set changed?")

    def request_stop(self, signum):
        self.stop_signal = signum

    def exit_code(self):
        """The exit code of a training stopped by a signal."""
        return exit_code(self.stop_signal)

    def save(self):
        if not self.prior.finite():
            raise CvaeError(f"the prior's training diverged by step {self.plan.step}: a "
                            f"parameter is not finite; nothing was saved: try a lower --lr")
        self._save(self.plan.meta(self.prior.adam_t, self.losses), self.prior.state_sections())

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
                if not math.isfinite(loss) or prior.nonfinite():
                    raise CvaeError(f"the prior's training diverged at step {plan.step} (loss "
                                    f"{loss}, {prior.nonfinite()} non-finite gradients or "
                                    f"parameters): try a lower --lr")
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


def train_prior(model, train_set, save, arch=None, epochs=DEFAULT_EPOCHS, batch=DEFAULT_BATCH,
                lr=DEFAULT_LR, drop=DEFAULT_DROP, seed=0, threads=1, checkpoint_name="",
                on_progress=None, on_epoch=None, precision="fp32", **arch_settings):
    """A fresh PriorTrainer for `model` over the codes of train_set; save(meta, sections)
    writes its file; precision: the velocity network's GEMMs (fp32 or bf16).
    Without arch, a PriorArch over the active dimensions (active_dims) with arch_settings
    (hidden, blocks, n_freq, act)."""
    codes = encode_all(model, train_set.images, train_set.labels)
    if arch is None:
        dims = active_dims(codes[0])
        arch = PriorArch(latent=len(dims), dims=dims, **arch_settings)
    plan = PriorPlan(arch=arch, cvae_sha256=cvae_digest(model), cvae_checkpoint=checkpoint_name,
                     epochs=epochs, batch=batch, lr=lr, drop=drop, seed=seed, precision=precision)
    prior = FlowPrior(arch, max_batch=max(batch, SAMPLE_BATCH), threads=threads,
                      precision=precision)
    prior.init_params(seed)
    return PriorTrainer(save, plan, prior, in_dims(codes, arch.dims), train_set.labels,
                        on_progress=on_progress, on_epoch=on_epoch)


def resume_prior(model, train_set, meta, sections, path, save, threads=1, on_progress=None,
                 on_epoch=None):
    """A PriorTrainer continuing a prior (its file's meta and sections, read from path)
    exactly where it stopped."""
    plan, losses = PriorPlan.from_meta(meta, path)
    if plan.cvae_sha256 != cvae_digest(model):
        raise CvaeError(f"{path} is the prior of another CVAE (its parameters' digest differs "
                        f"from this checkpoint's): remove it and train a new one")
    if not any(name.startswith("adam_") for name in sections):
        raise CvaeError(f"{path} has no optimizer state, so its training cannot continue")
    prior = FlowPrior(plan.arch, max_batch=max(plan.batch, SAMPLE_BATCH), threads=threads,
                      precision=plan.precision)
    prior.load_state_sections(sections, source=path)
    prior.adam_t = int(meta.get("adam_t", 0))
    if prior.adam_t != plan.step:
        raise CvaeError(f"{path}: Adam's step count {prior.adam_t} does not match its step "
                        f"{plan.step}")
    if max(plan.arch.dims) >= model.arch.latent:
        raise CvaeError(f"{path}: its latent dimensions do not fit this CVAE")
    codes = in_dims(encode_all(model, train_set.images, train_set.labels), plan.arch.dims)
    return PriorTrainer(save, plan, prior, codes, train_set.labels, losses, on_progress,
                        on_epoch, source=path)
