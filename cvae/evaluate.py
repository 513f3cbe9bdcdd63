"""The quality figures of a model (`cvae eval`), each defined here, in cvae.catalogue and in the
README.

Over the test images of the checkpoint's trained digits (meta["digits"]), in the order of the
test file:

* neg_elbo (rec, kl): negative ELBO at β = 1 in nats per image, rec = BCE-with-logits summed
  over the 784 continuous pixels (bytes/255), kl = the analytic KL(q(z|x, y) || N(0, I)), one
  ε per image keyed by (seed, EVAL_STEP, image index): the trainer's per-epoch test figure.
* iwae_nll (k): the importance-weighted bound (Burda et al. 2016) with k samples,
  -mean_i log((1/k) Σ_j w_ij), log w_ij = -rec_ij - (log q(z_ij|x_i) - log p(z_ij)), sample j
  of image i keyed by (seed, IWAE_STEP + j, image index). The log-sum-exp over j is streamed
  (a running maximum and a scaled sum per image, float64), so any k needs memory for one
  batch only.
* ssim, ssim_per_digit: SSIM (Wang et al. 2004) of each reconstruction (decoder mean at
  z = mu) against its original (bytes/255): 11×11 Gaussian window σ = 1.5, K1 = 0.01,
  K2 = 0.03, data range 1, population (co)variances, averaged over the 18×18 valid window
  positions of a 28×28 image; then the mean over all images, and over the images of each digit.

* cond_accuracy, cond_accuracy_per_digit (samples, temperature): `samples` digits per trained
  digit drawn from the prior with the label given, z ~ N(0, temperature² I) (numpy
  default_rng(seed)), decoded to the decoder mean as bytes (what the sheets show), then
  classified by the project's classifier (cvae.classifier) over all ten classes; the share
  classified as the digit they were generated as.
* fid, fid_test_floor: the Fréchet distance |mu_1 - mu_2|² + tr(C_1 + C_2 - 2 (C_1 C_2)^½)
  between Gaussians fitted to the classifier's last hidden layer (256 features) of two image
  sets; the trace of the square root is exact, from the eigenvalues of the symmetric
  C_1^½ C_2 C_1^½ (numpy eigh). The test images are split into seeded random halves A and B;
  fid compares one generated digit per image of B (B's labels, z ~ N(0, T² I)) with A, and
  fid_test_floor compares B itself with A: same sizes, same digit mix, so the floor is what
  real digits score and the gap is the generator's. Without a classifier for the data both
  are None, and classifier_note says why.
* cas, cas_per_digit (`cvae eval --cas`, composed in cvae.workflows): accuracy_by_digit of a
  classifier trained on generated digits, on the real test images.

Every loop here is per batch (or per importance sample of a batch), never per image.
"""

import math

import numpy as np

from cvae.catalogue import SAMPLE_METRICS
from cvae.data import IMAGE_SIDE, NUM_DIGITS
from cvae.errors import CvaeError
from cvae.model import decode_images
from cvae.prior import GaussianPrior

#: Noise key of the test-set ELBO: (seed, EVAL_STEP, image index), a step far above any
#: training step, so the test ELBO of a given model is deterministic, does not depend on the
#: evaluation batch size and never reuses a training draw.
EVAL_STEP = 2 ** 62
#: Importance sample j of the IWAE bound uses step IWAE_STEP + j: below EVAL_STEP by far more
#: than any k, above any training step.
IWAE_STEP = 2 ** 61
EVAL_BATCH = 64
DEFAULT_K = 100
DEFAULT_SAMPLES = 1000  # generated digits per digit for the conditional accuracy and FID
DEFAULT_TEMPERATURE = 1.0  # the model's own prior

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------- ELBO


def test_elbo(model, dataset, seed, advance=None):
    """(neg_elbo, rec, kl) in nats per image at β = 1, one eps draw per image keyed by
    (seed, EVAL_STEP, image index). advance(n) is called after each batch of n images."""
    images, labels = dataset.images, dataset.labels
    n = len(labels)
    size = min(EVAL_BATCH, model.max_batch)
    rec_sum = kl_sum = 0.0
    for start in range(0, n, size):
        rec, kl = model.evaluate(images[start:start + size], labels[start:start + size],
                                 seed, EVAL_STEP, first_index=start)
        rec_sum += float(rec.sum(dtype=np.float64))
        kl_sum += float(kl.sum(dtype=np.float64))
        if advance is not None:
            advance(len(rec))
    rec_mean, kl_mean = rec_sum / n, kl_sum / n
    return rec_mean + kl_mean, rec_mean, kl_mean


# ---------------------------------------------------------------- IWAE


def log_weights(model, pixels, labels, seed, step, first_index=0):
    """log w = log p(x|z) + log p(z) - log q(z|x) (float64, one per image) of one forward pass
    with eps keyed by (seed, step, first_index + image)."""
    rec, _ = model.evaluate(pixels, labels, seed, step, first_index=first_index)
    acts = model.acts
    mu = acts["mu"].astype(np.float64)
    logvar = acts["logvar"].astype(np.float64)
    z = acts["z"].astype(np.float64)
    log_q = -0.5 * (_LOG_2PI + logvar + ((z - mu) / np.exp(0.5 * logvar)) ** 2).sum(axis=1)
    log_p = -0.5 * (_LOG_2PI + z * z).sum(axis=1)
    return -rec.astype(np.float64) - (log_q - log_p)


class StreamingLogSumExp:
    """log Σ_j exp(x_j) per row, fed one x_j (n,) at a time: a running maximum and the sum
    scaled by exp(-maximum), in float64. Memory is O(n) whatever the number of terms."""

    def __init__(self, n):
        self.max = np.full(n, -np.inf)
        self.sum = np.zeros(n)
        self.count = 0

    def add(self, x):
        x = np.asarray(x, dtype=np.float64)
        new = np.maximum(self.max, x)
        shift = np.where(np.isneginf(new), 0.0, new)  # all terms -inf so far: keep the sum 0
        self.sum = self.sum * np.exp(self.max - shift) + np.exp(x - shift)
        self.max = new
        self.count += 1

    def result(self):
        with np.errstate(divide="ignore"):
            return self.max + np.log(self.sum)


def iwae_log_likelihood(model, pixels, labels, seed, k, first_index=0, advance=None):
    """Per-image IWAE estimate of log p(x|y) with k samples: LSE_j log w_j - log k (float64)."""
    lse = StreamingLogSumExp(len(labels))
    for j in range(k):
        lse.add(log_weights(model, pixels, labels, seed, IWAE_STEP + j, first_index))
        if advance is not None:
            advance(len(labels))
    return lse.result() - math.log(k)


def iwae_nll(model, dataset, seed, k, advance=None):
    """The IWAE negative log-likelihood bound in nats per image: -mean_i log p̂_k(x_i | y_i)."""
    if k <= 0:
        raise CvaeError(f"--k must be a positive integer, got {k}")
    images, labels = dataset.images, dataset.labels
    n = len(labels)
    size = model.max_batch
    total = 0.0
    for start in range(0, n, size):
        stop = min(start + size, n)
        ll = iwae_log_likelihood(model, images[start:stop], labels[start:stop], seed, k,
                                 first_index=start, advance=advance)
        total += float(ll.sum())
    return -total / n


# ---------------------------------------------------------------- SSIM


def gaussian_window(size=SSIM_WINDOW, sigma=SSIM_SIGMA):
    """The normalised 1-D Gaussian taps (float64) of the separable SSIM window."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _valid_filter_matrix(side, taps):
    """(side - len(taps) + 1, side) matrix G with G[i, i + t] = taps[t]: G @ X @ G.T is the
    2-D separable filter of X at its valid positions."""
    n_out = side - len(taps) + 1
    g = np.zeros((n_out, side))
    rows = np.arange(n_out)[:, None]
    g[rows, rows + np.arange(len(taps))[None, :]] = taps
    return g


def ssim_map(a, b, data_range=1.0):
    """SSIM at every valid window position, (n, 18, 18) float64, of images a and b ((n, 784) or
    (n, 28, 28), values in [0, data_range]): Gaussian window 11×11 σ = 1.5, K1 = 0.01,
    K2 = 0.03, population (co)variances. The separable filter is two matrix products."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    b = np.asarray(b, dtype=np.float64).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {a.shape} and {b.shape}")
    g = _valid_filter_matrix(IMAGE_SIDE, gaussian_window())
    # The five local moments of every image in one stack: (5, n, 28, 28) -> (5, n, 18, 18).
    maps = np.stack([a, b, a * a, b * b, a * b])
    mu_a, mu_b, e_aa, e_bb, e_ab = g @ maps @ g.T
    var_a = e_aa - mu_a * mu_a
    var_b = e_bb - mu_b * mu_b
    cov = e_ab - mu_a * mu_b
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
         / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)))
    return s


def ssim(a, b, data_range=1.0):
    """Per-image SSIM (float64 (n,)): ssim_map averaged over the valid window positions."""
    return ssim_map(a, b, data_range).mean(axis=(1, 2))


def reconstruction_ssim(model, dataset, advance=None):
    """(per-image SSIM (n,), float64) of the reconstructions sigmoid(decoder(mu(x, y), y))
    against the originals (bytes/255), in batches of the model's max_batch."""
    images, labels = dataset.images, dataset.labels
    n = len(labels)
    out = np.empty(n)
    size = model.max_batch
    for start in range(0, n, size):
        stop = min(start + size, n)
        pixels, batch_labels = images[start:stop], labels[start:stop]
        mu, _ = model.encode(pixels, batch_labels)
        recon = model.decode(mu, batch_labels)
        out[start:stop] = ssim(np.asarray(pixels, dtype=np.float64) / 255.0, recon)
        if advance is not None:
            advance(stop - start)
    return out


def per_digit_means(values, labels, digits):
    """{digit: mean of values over the images of that digit} for each digit in digits."""
    labels = np.asarray(labels, dtype=np.int64)
    sums = np.bincount(labels, weights=values, minlength=NUM_DIGITS)
    counts = np.bincount(labels, minlength=NUM_DIGITS)
    return {int(d): float(sums[d] / counts[d]) for d in digits if counts[d] > 0}


# ---------------------------------------------------------------- generated digits, judged

#: Generated digits per kernel call of decoder and classifier: moments are summed per chunk,
#: so any --samples needs memory for one chunk only.
GENERATE_CHUNK = 4096
#: Generated digits per digit whose features enter the diversity (the first ones drawn).
DIVERSITY_SAMPLES = 2000


class FeatureMoments:
    """Running sum and sum of outer products (float64) of feature vectors: their mean and
    sample covariance without holding them."""

    def __init__(self, dim):
        self.n = 0
        self.sum = np.zeros(dim)
        self.outer = np.zeros((dim, dim))

    def add(self, features):
        f = np.asarray(features, dtype=np.float64)
        self.n += len(f)
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f

    def mean_cov(self):
        mean = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return mean, cov


def _sqrt_psd(matrix):
    """The symmetric square root of a symmetric positive semi-definite matrix (eigh)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mean_a, cov_a, mean_b, cov_b):
    """|mean_a - mean_b|² + tr(cov_a + cov_b - 2 (cov_a cov_b)^½), with
    tr (cov_a cov_b)^½ = Σ sqrt(eigenvalues of cov_a^½ cov_b cov_a^½)."""
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mean_a - mean_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def _moments(classifier, images):
    moments = FeatureMoments(classifier.arch.h2)
    for start in range(0, len(images), GENERATE_CHUNK):
        moments.add(classifier.predict(images[start:start + GENERATE_CHUNK])[1])
    return moments


def _generated(model, classifier, labels, temperature, rng, per_chunk, prior):
    """Decode one draw of the prior (at temperature T) per label, chunk by chunk, and hand
    each chunk's labels, classifier logits and features to per_chunk."""
    for start in range(0, len(labels), GENERATE_CHUNK):
        chunk = labels[start:start + GENERATE_CHUNK]
        z = prior.draw(chunk, rng, temperature)
        per_chunk(start, chunk, *classifier.predict(decode_images(model, z, chunk)))


def mean_pairwise_distance(features):
    """Mean Euclidean distance over all unordered pairs of distinct rows (float64), from
    |a - b|² = |a|² + |b|² - 2 a·b in blocks of rows."""
    f = np.asarray(features, dtype=np.float64)
    n = len(f)
    if n < 2:
        return float("nan")
    norms = (f * f).sum(axis=1)
    total = 0.0
    for start in range(0, n, 1024):
        block = f[start:start + 1024]
        d2 = norms[start:start + 1024, None] + norms[None, :] - 2 * block @ f.T
        total += float(np.sqrt(np.clip(d2, 0, None)).sum())
    # The diagonal adds zeros (up to rounding); every pair is counted twice.
    return total / (n * (n - 1))


def diversity_by_digit(features, labels, digits):
    """{digit: mean_pairwise_distance of the features of that digit's images}."""
    labels = np.asarray(labels)
    return {int(d): mean_pairwise_distance(features[labels == d]) for d in digits}


def test_halves(n, seed):
    """Two disjoint random halves (sorted row indices) of n test images, seeded."""
    order = np.random.default_rng([seed, 2]).permutation(n)
    half = n // 2
    return np.sort(order[:half]), np.sort(order[half:2 * half])


def judge_samples(model, classifier, digits, samples, temperature, seed, test_set, prior=None,
                  advance=None):
    """{cond_accuracy, cond_accuracy_per_digit, fid, fid_test_floor, diversity,
    diversity_per_digit} of the prior's samples (default: N(0, I)); see the module docstring.

    The test set is split into random halves A and B. The FID compares one generated digit
    per image of B, with B's label, against A; the floor compares B itself against A: the
    same sizes and the same digit mix, so the two figures differ only by the generator."""
    if prior is None:
        prior = GaussianPrior(model.arch.latent)
    labels = np.repeat(np.asarray(digits, dtype=np.uint8), samples)
    correct = np.zeros(len(labels), dtype=bool)
    kept = min(samples, DIVERSITY_SAMPLES)
    features = np.empty((kept * len(digits), classifier.arch.h2), dtype=np.float32)

    def count(start, chunk, logits, chunk_features):
        correct[start:start + len(chunk)] = logits.argmax(axis=1) == chunk
        number = (start + np.arange(len(chunk))) % samples  # the sample's number in its digit
        rows = (start + np.arange(len(chunk))) // samples * kept + number
        features[rows[number < kept]] = chunk_features[number < kept]
        if advance is not None:
            advance(len(chunk))

    _generated(model, classifier, labels, temperature, np.random.default_rng(seed), count, prior)
    per_digit = per_digit_means(correct.astype(np.float64), labels, digits)
    diversity = diversity_by_digit(features, np.repeat(np.asarray(digits), kept), digits)

    half_a, half_b = test_halves(len(test_set.labels), seed)
    generated = FeatureMoments(classifier.arch.h2)
    _generated(model, classifier, np.ascontiguousarray(np.take(test_set.labels, half_b)),
               temperature, np.random.default_rng([seed, 1]),
               lambda start, chunk, logits, features: generated.add(features), prior)
    real_a = _moments(classifier, np.take(test_set.images, half_a, axis=0)).mean_cov()
    real_b = _moments(classifier, np.take(test_set.images, half_b, axis=0)).mean_cov()
    if advance is not None:
        advance(len(test_set.labels) + len(half_b))
    return {"cond_accuracy": float(correct.mean()), "cond_accuracy_per_digit": per_digit,
            "fid": frechet_distance(*generated.mean_cov(), *real_a),
            "fid_test_floor": frechet_distance(*real_b, *real_a),
            "diversity": float(np.mean(list(diversity.values()))),
            "diversity_per_digit": diversity}


def accuracy_by_digit(classifier, test_set, digits):
    """(accuracy, {digit: accuracy}) of a classifier on test_set's images of the given digits,
    its argmax over all ten classes: the CAS of a classifier trained on generated digits,
    and its reference trained on real ones (cvae.workflows)."""
    dataset = test_set.restrict(digits)
    logits, _ = classifier.predict(dataset.images)
    correct = (logits.argmax(axis=1) == dataset.labels).astype(np.float64)
    return float(correct.mean()), per_digit_means(correct, dataset.labels, digits)


def test_diversity(classifier, test_set, digits):
    """(diversity, per digit) of the real test images: the figure samples should match."""
    _, features = classifier.predict(test_set.images)
    per_digit = diversity_by_digit(features, test_set.labels, digits)
    return float(np.mean(list(per_digit.values()))), per_digit


# ---------------------------------------------------------------- everything


def evaluate_model(model, dataset, digits, seed, k, classifier=None, samples=DEFAULT_SAMPLES,
                   temperature=1.0, priors=None, advance=None, relative_to=None):
    """The metrics dict of a model over a dataset holding only the given digits: neg_elbo,
    rec, kl, iwae_nll, k, ssim, ssim_per_digit, n_images; with a classifier the test set's
    diversity and, per prior sampler in `priors` (default: N(0, I)), its SAMPLE_METRICS
    under by_prior[name], the first prior's also at the top level (else those are None).
    relative_to: the directory the result is written to (a flow prior's file is named
    relative to it)."""
    if k <= 0:
        raise CvaeError(f"--k must be a positive integer, got {k}")
    priors = priors or [GaussianPrior(model.arch.latent)]
    neg_elbo, rec, kl = test_elbo(model, dataset, seed, advance=advance)
    per_image_ssim = reconstruction_ssim(model, dataset, advance=advance)
    nll = iwae_nll(model, dataset, seed, k, advance=advance)
    result = {"neg_elbo": neg_elbo, "rec": rec, "kl": kl, "iwae_nll": nll, "k": k,
              "ssim": float(per_image_ssim.mean()),
              "ssim_per_digit": per_digit_means(per_image_ssim, dataset.labels, digits),
              "n_images": len(dataset), "samples": samples, "temperature": temperature,
              "prior": priors[0].name, "prior_settings": priors[0].describe(relative_to),
              **dict.fromkeys(SAMPLE_METRICS), "diversity_test": None,
              "diversity_test_per_digit": None,
              "by_prior": {p.name: {**p.describe(relative_to), **dict.fromkeys(SAMPLE_METRICS)}
                           for p in priors}}
    if classifier is not None:
        result["diversity_test"], result["diversity_test_per_digit"] = test_diversity(
            classifier, dataset, digits)
        for prior in priors:
            judged = judge_samples(model, classifier, digits, samples, temperature, seed,
                                   dataset, prior, advance=advance)
            result["by_prior"][prior.name] = {**prior.describe(relative_to), **judged}
        result.update({key: result["by_prior"][priors[0].name][key] for key in SAMPLE_METRICS})
    return result


def evaluation_work(n_images, k, samples, digits, priors, judged):
    """The forward passes evaluate_model reports through advance(): the progress bar's total."""
    work = n_images * (k + 2)
    if judged:
        work += priors * (samples * digits + n_images + n_images // 2)
    return work
