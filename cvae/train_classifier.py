"""Training the project's digit classifier (cvae.classifier), the judge of `cvae eval`.

Training shifts every image by a random whole-pixel offset in [-2, 2]² (zero fill): without
it the MLP stops near 98.2% on the MNIST test set. The learning rate follows a cosine from lr
to 0. For a seed the result is deterministic (the kernels give the same bits for any thread
count; shuffling and shifts come from numpy's default_rng(seed)).
"""

import numpy as np

from cvae.classifier import PREDICT_BATCH, ClassifierArch, DigitClassifier
from cvae.data import IMAGE_SIDE
from cvae.errors import CvaeError
from cvae.model import MAX_BATCH, PRECISIONS
from cvae.schedule import cosine_lr

MAX_SHIFT = 2
DEFAULT_EPOCHS = 20
DEFAULT_BATCH = 128
DEFAULT_LR = 1e-3


def shifted(pixels, rng, max_shift=MAX_SHIFT):
    """Each image moved by its own whole-pixel offset in [-max_shift, max_shift]², zero fill:
    one gather from a zero-padded copy of the batch."""
    n = len(pixels)
    side, m = IMAGE_SIDE, max_shift
    padded = np.zeros((n, side + 2 * m, side + 2 * m), dtype=np.uint8)
    padded[:, m:m + side, m:m + side] = pixels.reshape(n, side, side)
    dy, dx = rng.integers(-m, m + 1, size=(2, n, 1, 1))
    rows = np.arange(side)[None, :, None] + m - dy
    cols = np.arange(side)[None, None, :] + m - dx
    return padded[np.arange(n)[:, None, None], rows, cols].reshape(n, side * side)


def train_classifier(train_set, epochs=DEFAULT_EPOCHS, batch=DEFAULT_BATCH, lr=DEFAULT_LR,
                     seed=0, threads=1, arch=ClassifierArch(), on_epoch=None, precision="fp32"):
    """A classifier trained on train_set; on_epoch(epoch, mean loss) after each epoch."""
    model = DigitClassifier(arch, max_batch=max(batch, PREDICT_BATCH), threads=threads,
                            precision=precision)
    model.init_params(seed)
    rng = np.random.default_rng(seed)
    images, labels = np.asarray(train_set.images), np.asarray(train_set.labels)
    n = len(labels)
    per_epoch = n // batch  # whole batches only: every step has the same size
    if per_epoch == 0:
        raise CvaeError(f"{train_set.name}: {n} images, fewer than one batch of {batch}")
    total = epochs * per_epoch
    step = 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        loss_sum = 0.0
        for b in range(per_epoch):
            rows = np.sort(order[b * batch:(b + 1) * batch])
            x = shifted(np.take(images, rows, axis=0), rng)
            y = np.ascontiguousarray(np.take(labels, rows))
            loss = model.train_step(x, y, cosine_lr(lr, step, total))
            if not np.isfinite(loss) or model.nonfinite():
                raise CvaeError(f"the classifier's training diverged at epoch {epoch}, step "
                                f"{step} (loss {loss}): try a lower --lr")
            loss_sum += loss
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, loss_sum / per_epoch)
    if not model.finite():
        raise CvaeError("the classifier's training diverged: a parameter is not finite; try a "
                        "lower --lr")
    return model


#: The keys of a classifier's training recipe, as `cvae classifier train` records them in the
#: file's header (with "arch" and "precision").
RECIPE_KEYS = ("epochs", "batch", "lr", "seed", "max_shift")


def recipe_of(meta=None, arch=None, source="the classifier"):
    """The training recipe {epochs, batch, lr, seed, max_shift, arch, precision} of a
    classifier file's header (cvae classifier train writes it), this module's defaults for
    what the header lacks; arch: the file's ClassifierArch (default: the default arch). A
    header whose recipe cvae cannot train (a damaged or foreign file) is a CvaeError naming
    source."""
    meta = meta or {}
    defaults = {"epochs": DEFAULT_EPOCHS, "batch": DEFAULT_BATCH, "lr": DEFAULT_LR, "seed": 0,
                "max_shift": MAX_SHIFT}
    recipe = {key: meta.get(key, value) for key, value in defaults.items()}
    recipe["arch"] = (arch or ClassifierArch()).to_json()
    recipe["precision"] = meta.get("precision", "fp32")
    counts = all(type(recipe[k]) is int and 0 < recipe[k] <= limit
                 for k, limit in (("epochs", 10_000), ("batch", MAX_BATCH)))
    lr = recipe["lr"]
    if (not counts or type(recipe["seed"]) is not int or recipe["seed"] < 0
            or type(lr) not in (int, float) or not 0 < lr < 1e3
            or recipe["precision"] not in PRECISIONS
            or recipe["max_shift"] != MAX_SHIFT):  # train_with_recipe shifts by MAX_SHIFT only
        shown = {k: recipe[k] for k in RECIPE_KEYS + ("precision",)}
        raise CvaeError(f"{source}: its header's training recipe {shown!r:.160} is not one "
                        f"cvae can train")
    return recipe


def records_recipe(meta):
    """Whether a classifier's header records its whole recipe (else recipe_of fills in
    defaults that it may not have been trained with). A header without "precision" is of a
    classifier trained before cvae had bf16: fp32."""
    return all(key in (meta or {}) for key in RECIPE_KEYS)


def train_with_recipe(train_set, recipe, threads=1, on_epoch=None):
    """train_classifier with a recipe_of dict (its max_shift must be this module's)."""
    if recipe["max_shift"] != MAX_SHIFT:
        raise CvaeError(f"the recipe shifts images by up to {recipe['max_shift']} pixels; this "
                        f"cvae trains with {MAX_SHIFT}")
    return train_classifier(train_set, epochs=recipe["epochs"], batch=recipe["batch"],
                            lr=recipe["lr"], seed=recipe["seed"], threads=threads,
                            arch=ClassifierArch(**recipe["arch"]), on_epoch=on_epoch,
                            precision=recipe["precision"])
