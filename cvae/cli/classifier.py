"""`cvae classifier train|eval`: the digit classifier that judges generated digits."""

import json
import os
import time

import numpy as np

from cvae.atomic import check_writable
from cvae.classifier import SHIPPED, dataset_digest, load_classifier, save_classifier
from cvae.cli.options import (add_output_mode, add_precision, add_parser, add_subcommands, add_threads,
                              non_negative_int, notice, positive_float, positive_int, say)
from cvae.data import NUM_DIGITS, Dataset
from cvae.fetch import ensure_data, resolve_data_dir
from cvae.kernels import default_threads, resolve_precision
from cvae.train_classifier import (DEFAULT_BATCH, DEFAULT_EPOCHS, DEFAULT_LR, MAX_SHIFT,
                                   train_classifier)


def cmd_train(args):
    out = os.path.abspath(check_writable(args.out))
    data_dir, _ = ensure_data(args.data, say=say(args), notice=notice(args))
    train_set = Dataset.load(data_dir, "train")
    test_set = Dataset.load(data_dir, "test")

    def on_epoch(epoch, loss):
        if not args.quiet:
            print(json.dumps({"epoch": epoch, "train_loss": loss}) if args.json
                  else f"epoch {epoch}/{args.epochs}: train cross-entropy {loss:.4f}", flush=True)

    start = time.perf_counter()
    precision, _ = resolve_precision(args.precision)
    model = train_classifier(train_set, epochs=args.epochs, batch=args.batch, lr=args.lr,
                             seed=args.seed, threads=args.threads, on_epoch=on_epoch,
                             precision=precision)
    seconds = time.perf_counter() - start
    accuracy = model.accuracy(test_set)
    meta = {"seed": args.seed, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
            "max_shift": MAX_SHIFT, "kernels": model.kernel_isa, "precision": precision, "train_images": len(train_set),
            "test_images": len(test_set), "test_accuracy": accuracy,
            "test_digest": dataset_digest(test_set)}
    save_classifier(out, model, meta)
    result = {"classifier": out, "test_accuracy": accuracy, "seconds": seconds,
              "threads": args.threads}
    print(json.dumps(result) if args.json else
          f"test accuracy {100 * accuracy:.2f}% on {len(test_set):,} test images "
          f"({seconds:.0f} s on {args.threads} threads) -> {out}", flush=True)
    return 0


def cmd_eval(args):
    path = args.classifier or SHIPPED
    model, meta = load_classifier(path, args.threads)
    data_dir, _ = resolve_data_dir(args.data)
    test_set = Dataset.load(data_dir, "test")
    logits, _ = model.predict(test_set.images)
    correct = logits.argmax(axis=1) == test_set.labels
    per_digit = {int(d): float(correct[test_set.labels == d].mean())
                 for d in range(NUM_DIGITS) if np.any(test_set.labels == d)}
    result = {"classifier": os.path.abspath(path), "test_accuracy": float(correct.mean()),
              "test_accuracy_per_digit": per_digit, "test_images": len(test_set)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{path}: test accuracy {100 * result['test_accuracy']:.2f}% on "
              f"{len(test_set):,} images; per digit "
              + ", ".join(f"{d}: {100 * v:.1f}%" for d, v in per_digit.items()))
    return 0


def register(subparsers):
    p = add_parser(
        subparsers, "classifier",
        help="train or check the digit classifier that judges generated digits",
        description="The MLP digit classifier (784-512-256-10, trained with cvae's kernels) "
                    "behind `cvae eval`'s conditional accuracy and FID. The one for MNIST "
                    "ships with cvae; train another for other data.")
    sub = add_subcommands(p, "classifier_command")
    q = add_parser(sub, "train", help="train a classifier",
                   description="Train on the data's train split (random ±2-pixel shifts, "
                               "cosine learning rate), report the test accuracy, save.")
    q.add_argument("--out", required=True, metavar="FILE", help="classifier file to write")
    q.add_argument("--data", metavar="DIR", default=None,
                   help="IDX directory (default: $CVAE_DATA, else the MNIST cache)")
    q.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS, help="epochs")
    q.add_argument("--batch", type=positive_int, default=DEFAULT_BATCH, help="minibatch size")
    q.add_argument("--lr", type=positive_float, default=DEFAULT_LR, help="peak learning rate")
    q.add_argument("--seed", type=non_negative_int, default=0, help="seed")
    add_threads(q, default=default_threads(), help="OpenMP threads")
    add_precision(q, "fp32", "the training's GEMMs")
    add_output_mode(q, quiet_help="print only the result")
    q.set_defaults(func=cmd_train)
    q = add_parser(sub, "eval", help="a classifier's test accuracy",
                   description="Accuracy (overall and per digit) on the data's test split.")
    q.add_argument("--classifier", metavar="FILE", default=None,
                   help="classifier file (default: the shipped MNIST classifier)")
    q.add_argument("--data", metavar="DIR", default=None,
                   help="IDX directory (default: $CVAE_DATA, else the MNIST cache)")
    add_threads(q, default=default_threads(), help="OpenMP threads")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=cmd_eval)
