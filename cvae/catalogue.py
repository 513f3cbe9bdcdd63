"""Every figure cvae reports, once: its key (as in eval.json, metrics.jsonl and sweep.jsonl),
its label, a short column header, its unit, how many decimals a table shows, and what it is.

`cvae eval`'s table and --help, the run report and the sweep's table all read their labels
and definitions from here, so a figure is described the same way wherever it appears. The
figures themselves are computed in cvae.evaluate (test set and generated digits) and
cvae.train (per epoch).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    label: str           # in sentences and key/value tables
    header: str          # a table column's heading
    places: int          # decimals in a table (None: as it comes)
    unit: str            # "nats", "" ...
    definition: str      # what it is


def _m(label, definition, header=None, places=None, unit=""):
    return Metric(label, header or label, places, unit, definition)


#: eval.json (cvae eval). The keys of generated digits (SAMPLE_METRICS) are per prior.
EVAL = {
    "neg_elbo": _m("negative ELBO", "test-set negative ELBO at β = 1, nats per image: rec + KL, "
                   "one ε per image; lower is better", "−ELBO", 2, "nats"),
    "rec": _m("reconstruction", "−log p(x|z): BCE with logits over the 784 continuous pixels, "
              "nats per image", "rec", 2, "nats"),
    "kl": _m("KL", "analytic KL(q(z|x,y) ‖ N(0, I)), nats per image", "KL", 2, "nats"),
    "iwae_nll": _m("IWAE NLL", "importance-weighted bound on −log p(x|y) with k samples per "
                   "image, nats per image (tighter than −ELBO)", "IWAE NLL", 2, "nats"),
    "k": _m("k", "importance samples per image of the IWAE bound", "k", 0),
    "ssim": _m("SSIM", "mean SSIM of the reconstructions at z = μ against the test digits "
               "(11×11 Gaussian window, σ = 1.5); higher is better", "SSIM", 4),
    "ssim_per_digit": _m("SSIM per digit", "the same, averaged over each digit's images"),
    "prior": _m("prior", "the prior that drew the generated digits of the figures below (flow: "
                "the run's prior.cvae; gaussian: N(0, I))"),
    "prior_settings": _m("prior settings", "how that prior drew the codes"),
    "cond_accuracy": _m("conditional accuracy", "the share of generated digits that the "
                        "project's classifier reads as the digit they were generated for",
                        "cond. acc.", 4),
    "cond_accuracy_per_digit": _m("conditional accuracy per digit", "the same, for each digit"),
    "fid": _m("FID", "Fréchet distance in the classifier's 256-feature space between generated "
              "digits and half of the test digits; lower is better", "FID", 2),
    "fid_test_floor": _m("FID floor", "the same distance from the other half of the test "
                         "digits (same size, same digit mix): what real digits score",
                         "FID floor", 2),
    "diversity": _m("diversity", "mean distance in the classifier's feature space between two "
                    "generated digits of the same label (averaged over the digits): low is mode "
                    "collapse", "diversity", 3),
    "diversity_per_digit": _m("diversity per digit", "the same, for each digit"),
    "diversity_test": _m("test digits' diversity", "the same distance between two test digits "
                         "of a label: what real digits score", "test diversity", 3),
    "diversity_test_per_digit": _m("test digits' diversity per digit",
                                   "the same, for each digit"),
    "cas": _m("CAS", "classification accuracy score (Ravuri & Vinyals 2019): the accuracy on "
              "the real test digits of the project's classifier trained, with its usual recipe, "
              "on generated digits only, as many as the real training set holds of each digit; "
              "higher is better", "CAS", 4),
    "cas_per_digit": _m("CAS per digit", "the same, on each digit's test images"),
    "cas_real": _m("CAS of real digits", "the same recipe trained on the real training digits: "
                   "what a generator's CAS is compared with", "CAS real", 4),
    "cas_real_per_digit": _m("CAS of real digits per digit", "the same, for each digit"),
    "cas_images": _m("CAS training digits", "generated digits each CAS classifier is trained "
                     "on (per prior): the size and digit counts of the real training set"),
    "cas_recipe": _m("CAS recipe", "how every CAS classifier is trained: the judging "
                     "classifier's recipe (epochs, batch, lr, seed, max shift, arch, precision)"),
    "cas_real_source": _m("CAS real reference", "where cas_real comes from: the judging "
                          "classifier itself (trained with that recipe on the same real "
                          "digits) or a classifier trained for it"),
    "cas_seconds": _m("CAS seconds", "time the CAS took: generating and training for each "
                      "prior, and the real reference"),
    "by_prior": _m("by prior", "the generated digits' figures of each prior judged"),
    "temperature": _m("temperature", "standard deviation T of the draws z ~ N(0, T² I) of the "
                      "generated digits (the flow prior carries them on)", "T", 2),
    "samples": _m("samples", "generated digits per digit"),
    "n_images": _m("test images", "images of the trained digits in the test file"),
    "digits": _m("digits", "the checkpoint's trained digits"),
    "seed": _m("seed", "noise seed of the evaluation"),
    "checkpoint": _m("checkpoint", "the evaluated checkpoint"),
    "threads": _m("threads", "OpenMP threads"),
    "seconds": _m("seconds", "time the evaluation took"),
}

#: The figures of generated digits: one set per prior (eval.json's by_prior).
SAMPLE_METRICS = ("cond_accuracy", "cond_accuracy_per_digit", "fid", "fid_test_floor",
                  "diversity", "diversity_per_digit")

#: The figures of `cvae eval --cas` that are per prior (by_prior, the first prior's also at the
#: top level); cas_real ... cas_seconds are the whole evaluation's. None of them without --cas.
CAS_METRICS = ("cas", "cas_per_digit")

#: metrics.jsonl (cvae train, one object per epoch).
EPOCH = {
    "epoch": _m("epoch", ""),
    "step": _m("step", "optimizer steps so far"),
    "phase": _m("phase", "of the β / learning-rate schedule"),
    "beta": _m("β", "weight of the KL term in the training loss"),
    "lr": _m("learning rate", "Adam"),
    "train_loss": _m("train loss", "rec + β·KL, mean over the epoch's batches, nats per image"),
    "train_rec": _m("train reconstruction", "mean over the epoch's batches, nats per image"),
    "train_kl": _m("train KL", "mean over the epoch's batches, nats per image"),
    "test_neg_elbo": _m("test negative ELBO", "at β = 1 after the epoch, nats per image"),
    "test_rec": _m("test reconstruction", "after the epoch, nats per image"),
    "test_kl": _m("test KL", "after the epoch, nats per image"),
    "img_per_s": _m("images per second", "training throughput of the epoch"),
    "seconds": _m("seconds", "the epoch's wall time, test ELBO included"),
}

#: The columns of a sweep's table, in order.
SWEEP_COLUMNS = ("neg_elbo", "rec", "kl", "iwae_nll", "k", "ssim", "cond_accuracy", "fid",
                 "fid_test_floor", "diversity", "diversity_test", "temperature")


def labels(catalogue):
    """{key: (label, definition)}: the form tables of key/value pairs take."""
    return {key: (m.label, m.definition) for key, m in catalogue.items()}


def help_text(keys, indent="  "):
    """One line per figure, 'key: definition', for a command's --help."""
    return "\n".join(f"{indent}{key}: {EVAL[key].definition}" for key in keys)
