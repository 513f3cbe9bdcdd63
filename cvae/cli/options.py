"""What every command's parser shares: one-line errors, help that names defaults, the option
types (each failure a one-line error), and the option groups several commands take."""

import argparse
import math
import re
import sys

from cvae.data import parse_digits
from cvae.errors import CvaeError
from cvae.model import ACTIVATIONS, VARIANTS
from cvae.prior import DEFAULT_GUIDANCE, DEFAULT_METHOD, DEFAULT_STEPS, METHODS, PRIORS


class UsageError(CvaeError):
    pass


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (`cvae: error: ...`, exit 2) instead of usage + error."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Raw descriptions; every option's help ends with its default unless it names one already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("(default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def add_parser(subparsers, name, **kwargs):
    """A subcommand with the shared formatter and one-line errors."""
    return subparsers.add_parser(name, formatter_class=Formatter, **kwargs)


def add_subcommands(parser, dest, metavar="ACTION"):
    sub = parser.add_subparsers(dest=dest, metavar=metavar, parser_class=Parser)
    sub.required = True
    return sub


# ---------------------------------------------------------------- option types


def number_type(convert, noun, accept, rule):
    """An argparse type: convert the text, then check it; both failures are one-line errors."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    return parse


positive_int = number_type(int, "an integer", lambda v: v > 0, "a positive integer")
non_negative_int = number_type(int, "an integer", lambda v: v >= 0, "a non-negative integer")
positive_float = number_type(float, "a number", lambda v: math.isfinite(v) and v > 0,
                             "a positive number")
non_negative_float = number_type(float, "a number", lambda v: math.isfinite(v) and v >= 0,
                                 "a non-negative number")
probability = number_type(float, "a number", lambda v: 0 <= v < 1, "at least 0 and below 1")


def hidden_sizes(text):
    parts = text.split(",")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two sizes like 640,320") from None
    if len(sizes) != 2 or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two positive sizes like 640,320")
    return sizes


def digits_type(text):
    try:
        return parse_digits(text)
    except CvaeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def list_type(parse_item, example):
    """An argparse type for a comma-separated list: no empty items, no duplicates."""

    def parse(text):
        items = text.split(",")
        if any(not item.strip() for item in items):
            raise argparse.ArgumentTypeError(f"{text!r} has an empty item: give a list like "
                                             f"{example}")
        values = []
        for item in items:
            value = parse_item(item.strip())
            if value in values:
                raise argparse.ArgumentTypeError(f"{text!r} lists {item.strip()} twice")
            values.append(value)
        return tuple(values)

    return parse


def latent_item(text):
    if not re.fullmatch(r"\d+", text) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (e.g. 128,256)")
    return int(text)


def hidden_item(text):
    match = re.fullmatch(r"(\d+)x(\d+)", text, flags=re.IGNORECASE)
    if not match or min(int(match.group(1)), int(match.group(2))) <= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a pair of hidden sizes H1xH2: give e.g. 640x320,512x256")
    return int(match.group(1)), int(match.group(2))


def choice_item(choices, what):
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} (choose from "
                                             f"{','.join(choices)})")
        return text

    return parse


# ---------------------------------------------------------------- option groups


def add_arch_options(p, variant_default="full"):
    sizes = "; ".join(f"{name}: {v['h1']},{v['h2']} latent {v['latent']}" if "h1" in v else
                      f"{name}: channels {','.join(map(str, v['channels']))}, {v['hidden']} "
                      f"latent {v['latent']}" for name, v in VARIANTS.items())
    p.add_argument("--variant", choices=tuple(VARIANTS), default=variant_default,
                   help=f"model size ({sizes})" + ("" if variant_default else " (default: full)"))
    p.add_argument("--hidden", type=hidden_sizes, metavar="H1,H2",
                   help="hidden layer sizes, overriding the variant's")
    p.add_argument("--latent", type=positive_int, metavar="L",
                   help="latent size, overriding the variant's")
    p.add_argument("--act", choices=ACTIVATIONS, default=None,
                   help="hidden activation (default: elu)")


def add_threads(p, default=None, help="OpenMP threads (default: the CPUs available to this "
                                      "process)"):
    p.add_argument("--threads", type=positive_int, default=default, metavar="N", help=help)


def add_checkpoint(p, metavar="PATH"):
    p.add_argument("--checkpoint", required=True, metavar=metavar,
                   help="a .cvae checkpoint, or a run directory (its last.cvae, else its latest "
                        "epoch-NNNN.cvae)")


def add_data(p, what="MNIST directory with the test files",
             default="$CVAE_DATA, else the cache"):
    p.add_argument("--data", metavar="DIR", default=None, help=f"{what} (default: {default})")


def add_output_mode(p, json_help="one JSON object per line",
                    quiet_help="print only errors"):
    group = p.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help=json_help)
    group.add_argument("--quiet", action="store_true", help=quiet_help)


def add_prior_options(p, both=False):
    """--prior, --steps, --method, --guidance: which prior draws the codes, and how the flow
    is solved (generate, eval)."""
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


def add_precision(p, default, what="the GEMMs"):
    """--precision fp32|bf16|auto (cvae.kernels.resolve_precision)."""
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default=default,
                   help=f"of {what}: fp32; bf16 (inputs rounded to bf16, products summed in "
                        f"fp32: twice the speed where the CPU has a fast bf16 dot product, "
                        f"emulated elsewhere); auto: bf16 where it is faster, else fp32")


# ---------------------------------------------------------------- printing


def mode(args):
    """'json', 'quiet' or 'rich': how a command with --json and --quiet shows its progress."""
    return "json" if getattr(args, "json", False) else (
        "quiet" if getattr(args, "quiet", False) else "rich")


def say(args):
    """Progress lines: nothing with --quiet, on stderr with --json (stdout holds the JSON)."""
    if getattr(args, "quiet", False):
        return lambda text: None
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    return lambda text: print(text, file=stream, flush=True)


def notice(args):
    """A line that is said even with --quiet (on stderr then, and with --json)."""
    quiet = getattr(args, "json", False) or getattr(args, "quiet", False)
    stream = sys.stderr if quiet else sys.stdout
    return lambda text: print(text, file=stream, flush=True)

