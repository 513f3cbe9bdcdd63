"""`cvae report RUN_DIR`: one self-contained HTML page about a training run.

RUN_DIR/report.html (or --out) holds, in this order: a summary, the test-set metrics of
eval.json (every key it has; `cvae eval --checkpoint RUN_DIR` writes it), the last epoch's
training metrics (and every epoch's, folded), the training curves (curves.png), the latent
picture (latent.png), every digit sheet of the run directory (*.pgm, with its sidecar's
"what" as the caption) and the configuration (config.json). A run with a flow prior
(prior.cvae) shows its two sample sheets side by side, samples.pgm (N(0, I)) and
samples-flow.pgm (the same draws carried by the flow), each captioned with its prior's figures
of eval.json's by_prior, which the metrics section also tabulates prior by prior.

Every picture is embedded as a `data:image/png;base64,...` URI and the style sheet is inline:
the page loads nothing else (no scripts, no network, no other file), so it can be copied or
mailed alone. Sheets are converted from PGM with cvae.images.png_bytes.

Missing pictures are drawn when possible: curves.png from metrics.jsonl, latent.png from the
newest checkpoint and the MNIST test files (--data, else $CVAE_DATA, else the cache), a
missing (or older than prior.cvae) samples-flow.pgm from the newest checkpoint and prior.cvae;
they are then also saved in the run directory (atomically) when it is writable. Where a picture
cannot be drawn, the page says why. The page has no time stamp: the same run directory gives
the same bytes.
"""

import base64
import html
import math
import os
import shlex
import tempfile

import cvae
from cvae import rundir as R
from cvae.atomic import check_writable, write_bytes_atomic
from cvae.catalogue import CAS_METRICS, EPOCH, EVAL, SAMPLE_METRICS, labels
from cvae.data import has_mnist_files
from cvae.errors import CvaeError
from cvae.fetch import resolve_data_dir
from cvae.images import PNG_SIGNATURE, png_bytes, read_pgm, sidecar_path
from cvae.plots import curves_png
from cvae.prior import sampling_text

FLOW_SAMPLES_NAME = R.FLOW_SAMPLES
EVAL_JSON = R.EVAL

# Sheets the trainer writes at the end of a run, shown first in this order; others follow
# alphabetically.
RUN_SHEETS = ("samples", "samples-flow", "reconstructions", "interpolations",
              "interpolations-classes")

#: The run's sample sheets and the prior that drew each (eval.json's by_prior keys); shown side
#: by side when the run has the flow prior's.
PRIOR_SHEETS = {"samples.pgm": "gaussian", FLOW_SAMPLES_NAME: "flow"}
PRIOR_LABELS = {"gaussian": "N(0, I)", "flow": "flow prior"}

#: Known eval.json and metrics.jsonl keys: (label, description). Unknown keys are shown under
#: their own name.
EVAL_KEYS = labels(EVAL)
EPOCH_KEYS = labels(EPOCH)
#: Keys whose values are paths: shown relative to the run directory.
PATH_KEYS = ("checkpoint", "classifier", "prior_file", "data_dir", "eval_json")

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 1.5em auto; max-width: 76em; padding: 0 1em; color: #1b1b1b; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
nav a { margin-right: 1em; }
code, .path { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.92em; }
.path { color: #555; word-break: break-all; }
table { border-collapse: collapse; margin: 0.4em 0; }
th, td { border: 1px solid #d6d6d6; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.desc { color: #555; font-size: 0.9em; }
table.mini th, table.mini td { padding: 0.1em 0.45em; font-size: 0.9em; }
.note { background: #fff7e0; border-left: 4px solid #e0b000; padding: 0.4em 0.8em; }
figure { margin: 1em 0 1.6em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
img.sheet { image-rendering: pixelated; image-rendering: crisp-edges; background: #000; }
.pair { display: flex; flex-wrap: wrap; gap: 0 2em; align-items: flex-start; }
.pair figure { flex: 1 1 22em; min-width: 0; margin-top: 0.4em; }
figcaption { color: #333; font-size: 0.92em; margin-top: 0.3em; max-width: 60em; }
details summary { cursor: pointer; color: #225; margin: 0.5em 0; }
footer { margin-top: 2.5em; color: #666; font-size: 0.85em; }
"""


# ---------------------------------------------------------------- formatting


def _e(text):
    return html.escape(str(text), quote=True)


def format_number(value):
    """A number for a table: ints whole (thousands separated from 10,000), floats with 2
    decimals from 10 up, else 4 significant digits; non-finite as written by Python."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 10:
        return f"{value:,.2f}"
    return f"{value:.4g}"


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_scalar(value):
    return value is None or isinstance(value, (str, int, float, bool))


#: How deep format_value shows nested JSON (a run's files are two levels deep at most; a
#: damaged or hostile one may nest thousands of levels).
MAX_DEPTH = 8


def format_value(value, per_row=10, depth=0):
    """HTML for one value of a JSON document: None as an em dash, numbers by format_number,
    dicts keyed by digits as a table with the digits as headers (per_row digits a row), other
    dicts as a key/value table, lists of scalars comma-separated; nesting past MAX_DEPTH as
    an ellipsis."""
    if depth > MAX_DEPTH and isinstance(value, (dict, list, tuple)):
        return "…"
    if value is None:
        return "—"
    if isinstance(value, bool) or _is_number(value):
        return _e(format_number(value))
    if isinstance(value, str):
        return _e(value)
    if isinstance(value, dict):
        if not value:
            return "—"
        keys = list(value)
        if all(str(k).isdigit() for k in keys) and all(_is_scalar(v) for v in value.values()):
            keys.sort(key=lambda k: (len(str(k).lstrip("0")), str(k).lstrip("0")))
            rows = []
            for start in range(0, len(keys), per_row):
                part = keys[start:start + per_row]
                rows.append("<tr>" + "".join(f"<th>{_e(k)}</th>" for k in part) + "</tr><tr>"
                            + "".join(f'<td class="num">'
                                      f'{format_value(value[k], depth=depth + 1)}</td>'
                                      for k in part) + "</tr>")
            return f'<table class="mini">{"".join(rows)}</table>'
        rows = "".join(f"<tr><th>{_e(k)}</th><td{_num_class(v)}>"
                       f"{format_value(v, depth=depth + 1)}</td></tr>" for k, v in value.items())
        return f'<table class="mini">{rows}</table>'
    if isinstance(value, (list, tuple)):
        if not value:
            return "—"
        if all(_is_scalar(v) for v in value):
            return ", ".join(format_value(v, depth=depth + 1) for v in value)
        return "<br>".join(format_value(v, depth=depth + 1) for v in value)
    return _e(value)


def _num_class(value):
    return ' class="num"' if _is_number(value) else ""


def key_value_table(document, known, order_known_first=True):
    """Rows (label, value, description) for every key of a JSON object; keys in `known` first
    in its order, then the others in the document's order."""
    keys = list(document)
    if order_known_first:
        keys = [k for k in known if k in document] + [k for k in keys if k not in known]
    rows = []
    for key in keys:
        label, description = known.get(key, (key, ""))
        value = document[key]
        rows.append(f"<tr><th title=\"{_e(key)}\">{_e(label)}</th>"
                    f"<td{_num_class(value)}>{format_value(value)}</td>"
                    f"<td class=\"desc\">{_e(description)}</td></tr>")
    return ("<table><tr><th>metric</th><th>value</th><th>what it is</th></tr>"
            + "".join(rows) + "</table>")


def _note(text):
    return f'<p class="note">{text}</p>'


def data_uri(png):
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def png_size(png):
    """(width, height) from a PNG's IHDR chunk, or None if it is not a PNG."""
    if len(png) < 24 or not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        return None
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _figure(png, alt, caption, css_class="", scale=1):
    width, height = png_size(png)
    cls = f' class="{css_class}"' if css_class else ""
    return (f'<figure><img{cls} src="{data_uri(png)}" alt="{_e(alt)}" width="{width * scale}" '
            f'height="{height * scale}"><figcaption>{caption}</figcaption></figure>')


# ---------------------------------------------------------------- reading the run


def _read_png(path):
    """The bytes of a PNG file, or (None, problem)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"cannot read {os.path.basename(path)}: {e.strerror or e}"
    if png_size(data) is None:
        return None, f"{os.path.basename(path)} is not a PNG image"
    return data, None


def _relative(document, run_dir, depth=0):
    """A JSON document of the run with its absolute paths (PATH_KEYS, down to MAX_DEPTH)
    shown relative to the run directory: the page names no machine's directories."""
    if depth > MAX_DEPTH:
        return document  # format_value shows no deeper
    if isinstance(document, dict):
        return {k: (R.portable(v, run_dir) if k in PATH_KEYS and isinstance(v, str)
                    and os.path.isabs(v) else _relative(v, run_dir, depth + 1))
                for k, v in document.items()}
    if isinstance(document, list):
        return [_relative(v, run_dir, depth + 1) for v in document]
    return document


def check_run_dir(run_dir):
    """A CvaeError unless run_dir is a readable directory holding config.json or a checkpoint.
    Returns the checkpoint the latent picture would be drawn from (None without one)."""
    if not os.path.exists(run_dir):
        raise CvaeError(f"run directory {run_dir} does not exist")
    if not os.path.isdir(run_dir):
        raise CvaeError(f"{run_dir} is not a directory: give a run directory (cvae train --out)")
    checkpoints = R.list_checkpoints(run_dir)  # CvaeError when unreadable
    if not checkpoints and not os.path.isfile(R.path(run_dir, R.CONFIG)):
        raise CvaeError(f"{run_dir} is not a run directory: it holds neither {R.CONFIG} nor "
                        f"a checkpoint (*.cvae)")
    return R.latest_checkpoint(run_dir) or (checkpoints[-1] if checkpoints else None)


def report_path(out, run_dir):
    """--out, else RUN_DIR/report.html; a CvaeError now if it cannot be written."""
    return check_writable(os.fspath(out) if out else R.path(run_dir, R.REPORT))


def _writable(directory):
    return os.access(directory, os.W_OK | os.X_OK)


def _test_data(data):
    """(data directory or None, its source): None when the test files are not there. With
    --data given, missing test files are an error (the user asked for that directory)."""
    data_dir, source = resolve_data_dir(data)
    if has_mnist_files(data_dir, splits=("test",)):
        return data_dir, source
    if source == "--data":
        raise CvaeError(f"--data {data_dir}: no MNIST test files there (t10k-images-idx3-ubyte "
                        f"and t10k-labels-idx1-ubyte, raw or .gz)")
    return None, source


# ---------------------------------------------------------------- the sections


class Report:
    """Collects the page's sections; `images` counts the <img> elements."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.sections = []
        self.images = 0
        self.notes = []
        self.saved = []

    def note(self, text):
        self.notes.append(text)
        return _note(_e(text))

    def figure(self, png, alt, caption, **kwargs):
        self.images += 1
        return _figure(png, alt, caption, **kwargs)

    def add(self, anchor, title, body):
        self.sections.append((anchor, title, body))

    def save_picture(self, name, png):
        """Also keep a picture drawn for the page in the run directory, when it is writable."""
        path = os.path.join(self.run_dir, name)
        if not _writable(self.run_dir):
            return "drawn for this page (the run directory is not writable, so it was not saved)"
        try:
            write_bytes_atomic(path, png)
        except CvaeError as e:
            return f"drawn for this page (not saved: {e})"
        self.saved.append(path)
        return f"drawn for this page and saved as {name}"


def _summary(config, records, evaluation, checkpoint, run_dir):
    rows = []
    if isinstance(config, dict):
        arch = R.arch_text(config.get("arch"))
        if arch:
            rows.append(("architecture", _e(arch)))
        if _is_number(config.get("n_params")):
            rows.append(("parameters", f"{config['n_params']:,}"))
        if config.get("digits") is not None:
            rows.append(("digits", format_value(config["digits"])))
    planned = config.get("epochs") if isinstance(config, dict) else None
    if records:
        done = records[-1]["epoch"]
        status = (f"{done} of {planned} epochs" if _is_number(planned) else f"{done} epochs")
        if _is_number(planned):
            status += " (complete)" if done >= planned else " (stopped or still training)"
        rows.append(("trained", _e(status)))
        best = min((r for r in records if _is_number(r.get("test_neg_elbo"))),
                   key=lambda r: r["test_neg_elbo"], default=None)
        if best is not None:
            rows.append(("best test negative ELBO (β = 1)",
                         f"<b>{format_number(best['test_neg_elbo'])}</b> nats per image "
                         f"(epoch {best['epoch']})"))
    elif _is_number(planned):
        rows.append(("trained", f"no epoch finished yet (of {planned})"))
    prior = _prior_row(run_dir)
    if prior:
        rows.append(("flow prior", prior))
    if isinstance(evaluation, dict):
        t = evaluation.get("temperature")
        tempered = f", T = {format_value(t)}" if t is not None else ""
        by_prior = _by_prior(evaluation)
        for key in ("neg_elbo", "iwae_nll", "ssim", "cond_accuracy", "fid", "cas"):
            if key in evaluation:
                label = EVAL_KEYS[key][0]
                at = tempered if key in ("cond_accuracy", "fid", "cas") else ""
                value = f"<b>{format_value(evaluation[key])}</b>"
                if by_prior and key in SAMPLE_METRICS + CAS_METRICS:
                    value = ", ".join((f"<b>{format_value(f.get(key))}</b>" if i == 0 else
                                       format_value(f.get(key))) + f" ({_e(_prior_label(n))})"
                                      for i, (n, f) in enumerate(by_prior.items()))
                rows.append((f"{label} (eval.json{at})", value))
    if checkpoint:
        rows.append(("newest checkpoint", f"<code>{_e(os.path.basename(checkpoint))}</code>"))
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _metrics_section(report, evaluation, problem, run_dir):
    if problem:
        return report.note(f"{problem}; run 'cvae eval --checkpoint {run_dir}' to rewrite it")
    if evaluation is None:
        return report.note(f"No eval.json: this run has not been evaluated. Run "
                           f"'cvae eval --checkpoint {run_dir}' (it writes {EVAL_JSON} into the "
                           f"run directory), then make the report again.")
    if not isinstance(evaluation, dict):
        return report.note("eval.json does not hold a JSON object")
    by_prior = _by_prior(evaluation)
    known = EVAL_KEYS
    if by_prior:  # the top-level sample figures are the first prior's: say which
        first = _prior_label(evaluation.get("prior", next(iter(by_prior))))
        known = {**EVAL_KEYS, **{key: (f"{EVAL_KEYS[key][0]} ({first})", EVAL_KEYS[key][1])
                                 for key in SAMPLE_METRICS + CAS_METRICS}}
    # by_prior is tabulated prior by prior below (with one prior, it is the top level's figures)
    document = {k: v for k, v in evaluation.items()
                if not (k == "by_prior" and isinstance(v, dict))}
    table = key_value_table(document, known)
    return table + (_by_prior_table(by_prior, evaluation) if by_prior else "")


# ---------------------------------------------------------------- the priors


def _prior_label(name):
    return PRIOR_LABELS.get(name, str(name))


def _by_prior(evaluation):
    """{prior: its figures} of eval.json's by_prior (cvae.rundir.read_eval) when the run's
    generated digits were judged with a flow prior (or several priors); None for a run with
    N(0, I) only, whose by_prior repeats the top level."""
    by_prior = evaluation.get("by_prior") if isinstance(evaluation, dict) else None
    if not by_prior:
        return None
    return by_prior if "flow" in by_prior or len(by_prior) > 1 else None


def _prior_heading(name, figures):
    """A by-prior column's heading: the prior, and for the flow how its ODE was solved."""
    if name != "flow":
        return _prior_label(name)
    how = sampling_text(figures)
    return _prior_label(name) + (f" ({how})" if how else "")


def _by_prior_table(by_prior, evaluation):
    """The generated digits' figures with one column per prior, and the test digits' diversity
    they compare with. (What each figure is, the table above says: two per-digit columns leave
    no room for it here.)"""
    head = "".join(f"<th>{_e(_prior_heading(n, f))}</th>" for n, f in by_prior.items())
    rows = []
    cas = any(f.get("cas") is not None for f in by_prior.values())  # cvae eval --cas
    for key in SAMPLE_METRICS + (CAS_METRICS if cas else ()):
        label = EVAL_KEYS.get(key, (key, ""))[0]
        # Per-digit figures five digits a row: two priors' ten digits side by side would not
        # fit a 1280-pixel page.
        cells = "".join(f"<td{_num_class(f.get(key))}>{format_value(f.get(key), per_row=5)}</td>"
                        for f in by_prior.values())
        rows.append(f"<tr><th title=\"{_e(key)}\">{_e(label)}</th>{cells}</tr>")
    for key in ("diversity_test", "diversity_test_per_digit") + (
            ("cas_real", "cas_real_per_digit") if cas else ()):
        if evaluation.get(key) is not None:
            value = evaluation[key]
            rows.append(f"<tr><th title=\"{_e(key)}\">{_e(EVAL_KEYS[key][0])}</th>"
                        f"<td{_num_class(value)} colspan=\"{len(by_prior)}\">"
                        f"{format_value(value, per_row=5)}</td></tr>")
    return ("<h3>generated digits by prior</h3><table><tr><th>metric</th>" + head + "</tr>"
            + "".join(rows) + "</table>")


def _percent(value):
    return f"{100 * value:.1f}%" if _is_number(value) else "—"


def _prior_figures(evaluation, name, run_dir):
    """HTML: a sample sheet's prior and its figures of eval.json (conditional accuracy and its
    lowest digit, FID beside its floor, diversity beside the test digits', with --cas its CAS
    beside the real digits'), or why there are none."""
    label = f"<b>{_e(_prior_label(name))}</b>"
    again = f"run 'cvae eval --checkpoint {run_dir}'"
    if not isinstance(evaluation, dict):
        return f"{label}: " + _e(f"no figures yet: {again} (it judges each prior's samples)")
    figures = evaluation["by_prior"].get(name)
    if not figures:
        return f"{label}: " + _e(f"eval.json has no figures of this prior: {again} again")
    accuracy = figures.get("cond_accuracy")
    if accuracy is None and not _is_number(figures.get("cas")):
        return f"{label}: " + _e("eval.json has no figures of generated digits (no classifier "
                                 "judged them)")
    parts = []
    if accuracy is not None:
        text = f"conditional accuracy <b>{_percent(accuracy)}</b>"
        per_digit = figures.get("cond_accuracy_per_digit")
        if isinstance(per_digit, dict):
            judged = [(d, v) for d, v in per_digit.items() if _is_number(v)]
            if judged:
                digit, lowest = min(judged, key=lambda item: item[1])
                text += f" (lowest: digit {_e(digit)}, {_percent(lowest)})"
        parts.append(text)
    if _is_number(figures.get("fid")):
        floor = figures.get("fid_test_floor")
        parts.append(f"FID <b>{format_number(figures['fid'])}</b>"
                     + (f" (floor {format_number(floor)})" if _is_number(floor) else ""))
    if _is_number(figures.get("diversity")):
        test = evaluation.get("diversity_test")
        parts.append(f"diversity <b>{format_number(figures['diversity'])}</b>"
                     + (f" (test digits: {format_number(test)})" if _is_number(test) else ""))
    if _is_number(figures.get("cas")):  # cvae eval --cas
        real = evaluation.get("cas_real")
        parts.append(f"CAS <b>{_percent(figures['cas'])}</b>"
                     + (f" (real digits: {_percent(real)})" if _is_number(real) else ""))
    t = evaluation.get("temperature")
    at = f", T = {format_value(t)}" if t is not None else ""
    return f"{label} (eval.json{at}): " + "; ".join(parts)


def _prior_row(run_dir):
    """The summary's line about RUN/prior.cvae (None without one)."""
    try:
        summary = R.prior_summary(run_dir)
    except CvaeError as e:
        return _e(f"prior.cvae: {e}")
    if summary is None:
        return None
    plan, losses = summary
    arch = plan.arch
    what = (f"prior.cvae, {arch.n_params():,} parameters ({arch.blocks} residual blocks of "
            f"{arch.hidden}) over {arch.latent} active latent dimensions")
    if plan.complete:
        loss = f", final loss {format_number(losses[-1])}" if losses else ""
        return _e(f"{what}: trained, {plan.epochs} epochs{loss}")
    return _e(f"{what}: stopped after {len(losses)} of {plan.epochs} epochs; finish it with "
              f"'cvae prior train --checkpoint {run_dir} --resume'")


def _training_section(report, records):
    if not records:
        return report.note("No per-epoch metrics (metrics.jsonl is missing or empty): no epoch "
                           "has finished yet.")
    last = records[-1]
    body = f"<h3>last epoch ({_e(last['epoch'])})</h3>" + key_value_table(last, EPOCH_KEYS)
    columns = list(dict.fromkeys(k for r in records for k in r))
    head = "".join(f"<th title=\"{_e(EPOCH_KEYS.get(k, (k, ''))[1])}\">{_e(EPOCH_KEYS.get(k, (k,))[0])}"
                   f"</th>" for k in columns)
    rows = "".join("<tr>" + "".join(f"<td{_num_class(r.get(k))}>{format_value(r.get(k))}</td>"
                                    for k in columns) + "</tr>" for r in records)
    body += (f"<details><summary>every epoch ({len(records)})</summary>"
             f"<table class=\"mini\"><tr>{head}</tr>{rows}</table></details>")
    return body


def _curves_section(report, records):
    run_dir = report.run_dir
    path = R.path(run_dir, R.CURVES)
    caption = ("Per epoch: the test set's negative ELBO at β = 1, reconstruction and KL (train: "
               "mean over the epoch's batches at that epoch's β; test: after the epoch, at "
               "β = 1), β and the learning rate; shading marks the schedule's phases.")
    png, problem = (None, None)
    existing = os.path.exists(path)
    if existing:
        png, problem = _read_png(path)
        stale = R.is_older(path, R.path(run_dir, R.METRICS))
        if png is not None and not (stale and records):
            return report.figure(png, "training curves", _e(caption + " (curves.png)"))
    if records:
        try:
            png = curves_png(records, title=R.curves_title(run_dir))
        except CvaeError as e:  # no matplotlib here: the page goes on without the curves
            return report.note(f"No training curves: {e}")
        why = ("curves.png was older than metrics.jsonl" if existing and problem is None
               else problem or "the run has no curves.png")
        saved = report.save_picture(R.CURVES, png)
        return report.figure(png, "training curves", _e(f"{caption} ({why}: {saved}.)"))
    return report.note((problem + "; " if problem else "")
                       + "No training curves: metrics.jsonl is missing or has no finished "
                         "epoch.")


def _latent_section(report, checkpoint, data, threads):
    run_dir = report.run_dir
    path = R.path(run_dir, R.LATENT)
    caption = ("The test set's latent means μ(x, y) (the encoder's output for each test image "
               "of the trained digits), projected onto their first two principal components, "
               "one colour per digit. In a conditional VAE the decoder is told the digit, so z "
               "need not separate the digits: overlapping classes mean z encodes style "
               "(slant, thickness) shared across digits.")
    old, problem = (None, None)
    if os.path.exists(path):
        old, problem = _read_png(path)
        stale = checkpoint is not None and R.is_older(path, checkpoint)
        if old is not None and not stale:
            return report.figure(old, "latent means, PCA", _e(caption + " (latent.png)"))
    why = ("latent.png is older than the newest checkpoint" if old is not None
           else problem or "the run has no latent.png")
    if checkpoint is None:
        reason = "there is no checkpoint to encode the test set with"
    else:
        data_dir, source = data
        if data_dir is None:
            reason = (f"the MNIST test files are not in the {source} directory: give "
                      f"'cvae report {run_dir} --data DIR' to draw it")
        else:
            try:
                png = _draw_latent(checkpoint, data_dir, threads)
            except CvaeError as e:
                reason = f"drawing it failed: {e}"
            else:
                saved = report.save_picture(R.LATENT, png)
                return report.figure(png, "latent means, PCA",
                                     _e(f"{caption} ({why}: {saved}, from "
                                        f"{os.path.basename(checkpoint)} and the test files in "
                                        f"{data_dir}.)"))
    if old is not None:
        return report.figure(old, "latent means, PCA",
                             _e(f"{caption} (latent.png, which may be out of date: {why}, and "
                                f"{reason}.)"))
    return report.note(f"No latent picture: {why}, and {reason}.")


def _draw_latent(checkpoint, data_dir, threads):
    model, meta = R.open_model(checkpoint, threads)
    digits = R.checkpoint_digits(meta, checkpoint)
    return R.latent_picture(model, R.load_split(data_dir, digits).restrict(digits))


def _sheet_order(name):
    stem = os.path.splitext(name)[0]
    return (RUN_SHEETS.index(stem), "") if stem in RUN_SHEETS else (len(RUN_SHEETS), name)


def _load_sheet(path):
    """(pixels, sidecar or None, the sidecar's problem or None); a CvaeError for a bad PGM."""
    pixels = read_pgm(path)
    sidecar, problem = R.read_json(sidecar_path(path))
    return pixels, sidecar, problem


def _sheet_figure(report, name, pixels, sidecar, problem, more=""):
    """A digit sheet's figure, captioned from its sidecar (then `more`, HTML)."""
    extra = sidecar.get("extra") if isinstance(sidecar, dict) else None
    extra = extra if isinstance(extra, dict) else {}
    details = [f"<code>{_e(name)}</code>, {pixels.shape[1]}×{pixels.shape[0]} pixels"]
    for key in ("seed", "temperature", "steps", "method", "pairs", "per_digit", "sheet"):
        if key in extra and extra[key] is not None:
            value = extra[key]
            if key == "sheet" and "sheets" in extra:
                value = f"{value} of {extra['sheets']}"
            details.append(f"{_e(key.replace('_', ' '))} {format_value(value)}")
    if isinstance(extra.get("checkpoint"), str):
        details.append(f"checkpoint <code>{_e(os.path.basename(extra['checkpoint']))}</code>")
    what = extra.get("what")
    caption = (_e(what[0].upper() + what[1:]) + ". " if isinstance(what, str) and what
               else (f"({_e(problem)}) " if problem else "(no sidecar) "))
    return report.figure(png_bytes(pixels), name, caption + "; ".join(details) + "." + more,
                         css_class="sheet", scale=2)


def _flow_sheet(report, checkpoint, threads):
    """Draw samples-flow.pgm when the run has prior.cvae but not that sheet (or one older than
    the prior), from the newest checkpoint and the prior, as the trainer would have; save it
    in the run directory when it is writable. Returns {} when there is nothing to draw, else
    "how" (the flow sheet's caption: how it was drawn, or why it may be out of date), "sheet"
    ((pixels, sidecar, problem) of a sheet drawn but not saved) or "note" (why none)."""
    run_dir = report.run_dir
    prior, path = R.prior_path(run_dir), R.path(run_dir, FLOW_SAMPLES_NAME)
    exists = os.path.exists(path)
    if not os.path.isfile(prior) or R.flow_sheet_problem(run_dir) is None:
        return {}
    why = (f"{FLOW_SAMPLES_NAME} was older than {R.PRIOR}" if exists
           else f"the run had no {FLOW_SAMPLES_NAME}")
    if checkpoint is None:
        reason = "there is no checkpoint to decode its codes with"
    else:
        source = f"from {os.path.basename(checkpoint)} and {R.PRIOR}"
        try:
            if _writable(run_dir):
                drawn = _draw_flow_sheet(checkpoint, run_dir, run_dir, threads)
                report.saved += [drawn, sidecar_path(drawn)]
                return {"how": f"{why}: drawn for this page {source} and saved as "
                               f"{FLOW_SAMPLES_NAME}"}
            with tempfile.TemporaryDirectory() as scratch:
                sheet = _load_sheet(_draw_flow_sheet(checkpoint, run_dir, scratch, threads))
            return {"sheet": sheet, "how": f"{why}: drawn for this page {source} (the run "
                                           f"directory is not writable, so it was not saved)"}
        except CvaeError as e:
            reason = f"drawing it failed: {e}"
        except OSError as e:
            reason = f"drawing it failed: {e.strerror or e}"
    if exists:
        return {"how": f"{FLOW_SAMPLES_NAME} may be out of date: {why}, and {reason}"}
    return {"note": report.note(f"No flow prior sheet: {why}, and {reason}.")}


def _draw_flow_sheet(checkpoint, run_dir, directory, threads):
    """directory/samples-flow.pgm (and sidecar) of run_dir's flow prior, as the trainer draws
    it (cvae.sample.write_run_images: 10 per digit at T = 1, the run's seed); its path."""
    model, meta = R.open_model(checkpoint, threads)
    digits = R.checkpoint_digits(meta, checkpoint)
    flow = R.open_prior("flow", run_dir, model, model.threads)
    seed = meta.get("seed") if isinstance(meta.get("seed"), int) else 0
    return R.write_flow_samples(model, run_dir, seed, digits, flow, directory)[0]


def _sheets_section(report, evaluation=None, checkpoint=None, threads=None):
    run_dir = report.run_dir
    flow = _flow_sheet(report, checkpoint, threads)
    try:
        names = sorted((n for n in os.listdir(run_dir)
                        if n.lower().endswith(".pgm") and not n.startswith(".")
                        and os.path.isfile(os.path.join(run_dir, n))), key=_sheet_order)
    except OSError as e:
        return report.note(f"cannot list {run_dir}: {e.strerror or e}")
    if "sheet" in flow:
        names = sorted(names + [FLOW_SAMPLES_NAME], key=_sheet_order)
    if not names:
        return flow.get("note", "") + report.note(
            "No digit sheets (*.pgm) in the run directory: the trainer writes them at the end of "
            "a complete run (unless --no-images); 'cvae generate / reconstruct / interpolate "
            "--checkpoint RUN_DIR' write more.")
    # With the flow prior's sheet, the two priors' sample sheets side by side, each with its
    # figures.
    paired = [n for n in PRIOR_SHEETS if n in names] if FLOW_SAMPLES_NAME in names else []
    parts, pair = [flow.get("note", "")], []
    for name in names:  # per sheet
        try:
            pixels, sidecar, problem = (flow["sheet"] if name == FLOW_SAMPLES_NAME and "sheet"
                                        in flow else _load_sheet(os.path.join(run_dir, name)))
        except CvaeError as e:
            (pair if name in paired else parts).append(report.note(f"{name}: {e}"))
            continue
        more = ""
        if name in paired:
            extra = sidecar.get("extra") if isinstance(sidecar, dict) else None
            prior = extra.get("prior") if isinstance(extra, dict) else None
            prior = prior if prior in PRIOR_LABELS else PRIOR_SHEETS[name]
            more = "<br>" + _prior_figures(evaluation, prior, run_dir)
            if name == FLOW_SAMPLES_NAME and "how" in flow:
                more += f" ({_e(flow['how'])})"
            more += "."
        figure = _sheet_figure(report, name, pixels, sidecar, problem, more)
        if name in paired:
            if not pair:
                parts.append(None)  # where the pair goes
            pair.append(figure)
        else:
            parts.append(figure)
    if pair:
        block = ("<h3>samples of N(0, I) and of the flow prior</h3><p>The same draws z0 ~ "
                 "N(0, I) for both sheets, one row per digit: the left sheet decodes them as they "
                 "are, the right one after the flow prior carries them to where the encoder puts "
                 "that digit's codes.</p>" f'<div class="pair">{"".join(pair)}</div>')
        parts[parts.index(None)] = block
    return "".join(parts)


def _config_section(report, config, problem):
    if problem:
        return report.note(problem)
    if config is None:
        return report.note("No config.json in the run directory.")
    if not isinstance(config, dict):
        return report.note("config.json does not hold a JSON object")
    body = ""
    argv = config.get("argv")
    if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
        body += f"<p>Command: <code>{_e('cvae ' + shlex.join(argv))}</code></p>"
    rows = "".join(f"<tr><th>{_e(k)}</th><td{_num_class(v)}>{format_value(v)}</td></tr>"
                   for k, v in config.items())
    return body + f"<table>{rows}</table>"


# ---------------------------------------------------------------- the page


def build_report(run_dir, data=None, threads=None, checkpoint=None):
    """(HTML text of the page, Report) for a run directory already checked by check_run_dir.
    data: (test data directory or None, its source), as _test_data gives."""
    report = Report(run_dir)
    config, config_problem = R.read_json(R.path(run_dir, R.CONFIG))
    config = _relative(config, run_dir)
    evaluation, eval_problem = R.read_eval(run_dir)
    evaluation = _relative(evaluation, run_dir)
    damaged = []  # lines of metrics.jsonl left out, each named in a note
    records = R.read_metrics(run_dir, problems=damaged)

    report.add("summary", "Summary", _summary(config, records, evaluation, checkpoint, run_dir))
    report.add("metrics", "Test-set metrics (eval.json)",
               _metrics_section(report, evaluation, eval_problem, run_dir))
    report.add("training", "Training metrics (metrics.jsonl)",
               "".join(report.note(problem) for problem in damaged)
               + _training_section(report, records))
    report.add("curves", "Training curves", _curves_section(report, records))
    report.add("latent", "Latent space", _latent_section(report, checkpoint, data or (None, "cache"),
                                                         threads))
    report.add("sheets", "Digit sheets", _sheets_section(report, evaluation, checkpoint, threads))
    report.add("config", "Configuration (config.json)",
               _config_section(report, config, config_problem))

    name = os.path.basename(os.path.abspath(run_dir))
    nav = " ".join(f'<a href="#{anchor}">{_e(title)}</a>' for anchor, title, _ in report.sections)
    sections = "\n".join(f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>'
                         for anchor, title, body in report.sections)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>cvae run report: {_e(name)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>cvae run report: {_e(name)}</h1>\n"
        f"<nav>{nav}</nav>\n"
        f"{sections}\n"
        f"<footer>Written by <code>cvae report</code> (cvae {_e(cvae.__version__)}) from the "
        f"files of the run directory. This page is self-contained: its {report.images} "
        f"picture(s) are embedded, it loads nothing else, so it can be copied or mailed "
        f"alone.</footer>\n</body>\n</html>\n")
    return page, report


def write_report(run_dir, out=None, data=None, threads=None):
    """Check the inputs, build the page and write it atomically; returns (path, Report)."""
    run_dir = os.fspath(run_dir)
    checkpoint = check_run_dir(run_dir)
    path = report_path(out, run_dir)
    if threads is not None and threads <= 0:
        raise CvaeError(f"--threads must be a positive integer, got {threads}")
    test_data = _test_data(data)
    page, report = build_report(run_dir, data=test_data, threads=threads, checkpoint=checkpoint)
    write_bytes_atomic(path, page.encode("ascii", "xmlcharrefreplace"))
    return path, report
