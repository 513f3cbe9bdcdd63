"""`cvae eval`: a checkpoint's quality figures, as a table or one JSON object."""

import json

from cvae.catalogue import EVAL, help_text
from cvae.cli.options import (add_checkpoint, add_data, add_parser, add_precision,
                              add_prior_options,
                              add_threads, non_negative_float, non_negative_int, positive_int)
from cvae.data import digits_text
from cvae.evaluate import DEFAULT_K, DEFAULT_SAMPLES, DEFAULT_TEMPERATURE
from cvae.prior import sampling_text
from cvae.workflows import run_eval


def cmd_eval(args):
    result = run_eval(args.checkpoint, data=args.data, k=args.k, samples=args.samples,
                      temperature=args.temperature, seed=args.seed, threads=args.threads,
                      classifier=args.classifier, progress=not args.json, prior=args.prior,
                      steps=args.ode_steps, method=args.method, guidance=args.guidance,
                      precision=args.precision, cas=args.cas)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print_table(result)
    return 0


def print_table(r):
    """The figures of run_eval's result, each with its definition (cvae.catalogue)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    table = Table(title=f"{r['checkpoint']}: {r['n_images']:,} test images of digits "
                        f"{digits_text(r['digits'])}, seed {r['seed']}",
                  title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("definition", ratio=1)

    def row(key, label, value, bold=True, definition=None):
        text = f"{value:.{EVAL[key].places}f}" if isinstance(value, float) else str(value)
        table.add_row(label, f"[bold]{text}[/bold]" if bold else text,
                      EVAL[key].definition if definition is None else definition)

    row("neg_elbo", EVAL["neg_elbo"].label, r["neg_elbo"])
    row("rec", "  " + EVAL["rec"].label, r["rec"], bold=False)
    row("kl", "  " + EVAL["kl"].label, r["kl"], bold=False)
    row("iwae_nll", f"IWAE NLL (k = {r['k']})", r["iwae_nll"])
    row("ssim", "SSIM", r["ssim"])
    for d, v in r["ssim_per_digit"].items():
        table.add_row(f"  SSIM digit {d}", f"{v:.4f}", "")
    t = f"T = {r['temperature']:g}"
    if r["cond_accuracy"] is None:
        table.add_row(f"conditional accuracy ({t})", "—", r["classifier_note"])
        table.add_row("FID", "—", "")
    for name, p in r["by_prior"].items():
        if p["cond_accuracy"] is None:
            continue
        how = f"flow prior ({sampling_text(p)})" if name == "flow" else "N(0, T² I)"
        # With one prior the label names the temperature; with two each figure needs its prior.
        at = f"{name}, T = {r['temperature']:g}" if len(r["by_prior"]) > 1 else t
        table.add_section()
        row("cond_accuracy", f"conditional accuracy ({at})",
            f"{100 * p['cond_accuracy']:.2f}%",
            definition=f"{r['samples']} samples per digit from the {how}: "
                       + EVAL["cond_accuracy"].definition)
        for d, v in p["cond_accuracy_per_digit"].items():
            table.add_row(f"  accuracy digit {d}", f"{100 * v:.1f}%", "")
        row("fid", f"FID ({at})", p["fid"])
        row("fid_test_floor", "  FID test-halves floor", p["fid_test_floor"], bold=False)
        row("diversity", f"diversity ({at})", p["diversity"],
            definition=f"{EVAL['diversity'].definition}; test digits: "
                       f"{r['diversity_test']:.3f}")
    for name, p in r["by_prior"].items():
        if p.get("cas") is not None:
            at = f"{name}, T = {r['temperature']:g}" if len(r["by_prior"]) > 1 else t
            table.add_section()
            row("cas", f"CAS ({at})", f"{100 * p['cas']:.2f}%",
                definition=f"{r['cas_images']:,} generated digits: " + EVAL["cas"].definition)
            _per_digit(table, p["cas_per_digit"], r["cas_real_per_digit"])
    if r.get("cas_real") is not None:
        table.add_section()
        recipe = r["cas_recipe"]
        row("cas_real", EVAL["cas_real"].label, f"{100 * r['cas_real']:.2f}%",
            definition=f"{EVAL['cas_real'].definition} ({recipe['epochs']} epochs, batch "
                       f"{recipe['batch']}, lr {recipe['lr']:g}, seed {recipe['seed']}, "
                       f"{recipe['precision']}; CAS took {r['cas_seconds']:.0f} s)")
    console.print(table)
    console.print(f"{r['seconds']:.1f} s on {r['threads']} threads -> {r['eval_json']}")


def _per_digit(table, cas, real):
    """CAS digit by digit, beside the real digits' figure of the same digit."""
    for d, v in cas.items():
        table.add_row(f"  CAS digit {d}", f"{100 * v:.1f}%", f"real digits: {100 * real[d]:.1f}%")


def register(subparsers):
    figures = ("neg_elbo", "rec", "kl", "iwae_nll", "ssim", "cond_accuracy", "fid",
               "fid_test_floor", "diversity", "diversity_test", "cas", "cas_real")
    p = add_parser(
        subparsers, "eval",
        help="test-set negative ELBO, IWAE bound, SSIM, conditional accuracy and FID of a checkpoint",
        description="Over the test images of the checkpoint's trained digits:\n"
                    + help_text(figures) + "\n"
                    "The samples come from the run's flow prior and from N(0, I) when it has one "
                    "(--prior).\nThe results are also written to eval.json beside the checkpoint. "
                    "See the README's 'Quality metrics'.")
    add_checkpoint(p)
    add_data(p)
    p.add_argument("--k", type=positive_int, default=DEFAULT_K, metavar="K",
                   help=f"importance samples per image for the IWAE bound (default: {DEFAULT_K})")
    p.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES, metavar="N",
                   help=f"generated digits per digit for the conditional accuracy and FID "
                        f"(default: {DEFAULT_SAMPLES})")
    p.add_argument("--temperature", type=non_negative_float, default=DEFAULT_TEMPERATURE,
                   metavar="T",
                   help="prior draws z0 ~ N(0, T² I) (the flow carries them on); 1 is the "
                        "model's own prior (default: 1)")
    p.add_argument("--classifier", metavar="FILE", default=None,
                   help="classifier that judges the samples (default: the shipped one, on the "
                        "MNIST test set only; see 'cvae classifier')")
    p.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                   help="noise seed; the same seed gives the same figures (default: 0)")
    add_threads(p)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of the table (no progress bar)")
    p.add_argument("--cas", action="store_true",
                   help="also the classification accuracy score of each prior (cas, "
                        "cas_per_digit): a classifier trained with the judging classifier's "
                        "recipe on generated digits (as many of each digit as the real "
                        "training split holds: it needs the train files), tested on the real "
                        "test digits, beside the same recipe trained on real digits (cas_real): "
                        "one classifier training per prior, as long as 'cvae classifier train'")
    add_prior_options(p, both=True)
    add_precision(p, None, "the CVAE's and the flow prior's GEMMs (the classifier judges in "
                           "fp32; default: the one the run was trained in), and given, of the "
                           "CAS classifiers' training (default: the judging classifier's "
                           "recipe, fp32)")
    p.set_defaults(func=cmd_eval)
