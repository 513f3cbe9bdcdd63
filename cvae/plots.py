"""A run's pictures, as PNG bytes: its per-epoch metrics (curves.png) and the test set's latent
means projected to 2-D by PCA (latent.png). cvae.rundir writes them into the run.

matplotlib is imported inside the functions, never at module level, so `cvae --help` and every
command that draws nothing never load it. Only the Agg canvas is used (no pyplot, no GUI
backend, no global figure state). Figures are rendered into memory under matplotlib's default
style (whatever a matplotlibrc says); PNG metadata carries no software
version or time stamp, so the same inputs give the same bytes with the same matplotlib.
"""

import io

import numpy as np

from cvae.errors import CvaeError

DPI = 100
#: PNG metadata: none of matplotlib's "Software" key (its version), so no run-specific bytes.
PNG_METADATA = {"Software": None}
#: latent.png: points are drawn in one shuffled order (this seed), so no digit hides the others.
SCATTER_SEED = 0

_TRAIN_STYLE = {"color": "tab:blue", "marker": "o", "markersize": 3, "linewidth": 1.5}
_TEST_STYLE = {"color": "tab:orange", "marker": "s", "markersize": 3, "linewidth": 1.5}
_PHASE_COLOURS = ("#e8f0fb", "#fbf1e4", "#e9f6e9", "#f3e9f6", "#f6f6e0")


# ---------------------------------------------------------------- matplotlib plumbing


def _matplotlib():
    """The matplotlib module, with what _render needs imported (a clear error without it)."""
    try:
        import matplotlib
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
        import matplotlib.style  # noqa: F401
    except ImportError as e:
        raise CvaeError(f"drawing the run's pictures needs matplotlib ({e}): pip install "
                        f"matplotlib") from None
    return matplotlib


def _render(matplotlib, draw, figsize):
    """PNG bytes of draw(figure) for a Figure on its own Agg canvas (no pyplot, so no backend
    switching or global figures), under matplotlib's default style (a user's matplotlibrc
    changes nothing)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context():
        matplotlib.style.use("default")
        figure = Figure(figsize=figsize, dpi=DPI)
        FigureCanvasAgg(figure)
        draw(figure)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI, metadata=PNG_METADATA)
    return buffer.getvalue()


# ---------------------------------------------------------------- curves


def _series(records, key):
    """(epochs, values) of the records that have a number under key (NaN and inf kept: they
    show as gaps, never as a crash)."""
    pairs = [(r["epoch"], float(r[key])) for r in records
             if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    if not pairs:
        return np.array([]), np.array([])
    epochs, values = zip(*pairs)
    return np.asarray(epochs), np.asarray(values)


def _phase_spans(records):
    """[(phase, first epoch, last epoch)] of consecutive epochs with the same phase."""
    spans = []
    for r in records:
        phase = r.get("phase")
        if spans and spans[-1][0] == phase:
            spans[-1][2] = r["epoch"]
        else:
            spans.append([phase, r["epoch"], r["epoch"]])
    return [tuple(s) for s in spans if s[0] is not None]


def curves_png(records, title=None):
    """PNG bytes of the per-epoch curves of metrics.jsonl records (see cvae.train): test
    negative ELBO at β = 1, reconstruction and KL (train: mean over the epoch's batches;
    test: after the epoch), β and the learning rate, with the schedule's phases shaded."""
    records = sorted((r for r in records if isinstance(r.get("epoch"), int)),
                     key=lambda r: r["epoch"])
    if not records:
        raise CvaeError("no per-epoch metrics to draw (metrics.jsonl is missing or empty)")
    matplotlib = _matplotlib()
    from matplotlib.ticker import MaxNLocator

    spans = _phase_spans(records)
    phases = list(dict.fromkeys(s[0] for s in spans))
    last = records[-1]["epoch"]
    first = records[0]["epoch"]

    def decorate(ax, ylabel, title_text):
        for phase, start, stop in spans:
            colour = _PHASE_COLOURS[phases.index(phase) % len(_PHASE_COLOURS)]
            ax.axvspan(start - 0.5, stop + 0.5, color=colour, zorder=0, linewidth=0)
        ax.set_xlim(first - 0.5, last + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title_text, fontsize=11)
        ax.grid(True, alpha=0.3)

    def pair(ax, key, ylabel, title_text):
        for name, style in (("train", _TRAIN_STYLE), ("test", _TEST_STYLE)):
            epochs, values = _series(records, f"{name}_{key}")
            if len(epochs):
                label = ("train (mean over the epoch)" if name == "train" else
                         "test (after the epoch)")
                ax.plot(epochs, values, label=label, **style)
        decorate(ax, ylabel, title_text)
        if ax.lines:
            ax.legend(fontsize=8)

    def single(ax, key, ylabel, title_text, colour, log=False):
        epochs, values = _series(records, key)
        if len(epochs):
            ax.plot(epochs, values, color=colour, marker="o", markersize=3, linewidth=1.5)
            if log and np.all(values[np.isfinite(values)] > 0):
                ax.set_yscale("log")
        decorate(ax, ylabel, title_text)

    def draw(figure):
        axes = figure.subplots(2, 3)
        single(axes[0, 0], "test_neg_elbo", "nats per image",
               "test negative ELBO at β = 1", "tab:red")
        epochs, values = _series(records, "test_neg_elbo")
        finite = np.isfinite(values)
        if finite.any():
            best = int(np.argmin(np.where(finite, values, np.inf)))
            axes[0, 0].annotate(f"best {values[best]:.2f} (epoch {epochs[best]})",
                                xy=(epochs[best], values[best]), xytext=(0.98, 0.95),
                                textcoords="axes fraction", ha="right", va="top", fontsize=8,
                                arrowprops={"arrowstyle": "->", "color": "0.4"})
        pair(axes[0, 1], "rec", "nats per image", "reconstruction −log p(x|z)")
        pair(axes[0, 2], "kl", "nats per image", "KL(q(z|x,y) ‖ N(0, I))")
        single(axes[1, 0], "beta", "β", "β (weight of the KL term in training)", "tab:purple")
        single(axes[1, 1], "lr", "learning rate", "learning rate (Adam)", "tab:green", log=True)
        info = axes[1, 2]
        info.axis("off")
        lines = [f"epochs {first}–{last}"]
        for key, label in (("test_neg_elbo", "test −ELBO"), ("test_rec", "test rec"),
                           ("test_kl", "test KL"), ("train_loss", "train loss")):
            value = records[-1].get(key)
            if isinstance(value, (int, float)):
                lines.append(f"last {label}: {value:.2f}")
        info.text(0.02, 0.98, "\n".join(lines), va="top", ha="left", fontsize=10,
                  transform=info.transAxes)
        if spans:
            from matplotlib.patches import Patch

            handles = [Patch(facecolor=_PHASE_COLOURS[i % len(_PHASE_COLOURS)],
                             edgecolor="0.7", label=str(phase)) for i, phase in enumerate(phases)]
            info.legend(handles=handles, title="schedule phase (shading)", loc="lower left",
                        fontsize=9, title_fontsize=9, frameon=False)
        figure.suptitle(title or "training curves (nats per image; test figures at β = 1)",
                        fontsize=13)
        figure.tight_layout()

    return _render(matplotlib, draw, (13, 7.5))


# ---------------------------------------------------------------- latent PCA


def pca_2d(points):
    """(projection (n, 2), explained variance ratio (2,)) of points (n, d): the centred points
    onto their first two principal axes (numpy SVD). Each axis's sign is fixed (its largest
    loading is positive), so the picture does not flip between runs of the same model. With
    d = 1 or n < 2 the missing components are zero."""
    x = np.asarray(points, dtype=np.float64)
    n, d = x.shape
    projection = np.zeros((n, 2))
    ratio = np.zeros(2)
    if n < 2:
        return projection, ratio
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, len(s))
    axes = vt[:k]
    signs = np.sign(axes[np.arange(k), np.argmax(np.abs(axes), axis=1)])
    axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
    projection[:, :k] = centred @ axes.T
    total = float(np.sum(s * s))
    if total > 0:
        ratio[:k] = (s[:k] ** 2) / total
    return projection, ratio


def latent_png(mu, labels, title=None):
    """PNG bytes of the 2-D PCA of latent means mu (n, latent), one colour per digit label."""
    mu = np.asarray(mu)
    labels = np.asarray(labels, dtype=np.int64)
    if mu.ndim != 2 or len(mu) != len(labels) or len(mu) == 0:
        raise ValueError(f"need latent means (n, latent) and n labels, got {mu.shape} and "
                         f"{labels.shape}")
    projection, ratio = pca_2d(mu)
    matplotlib = _matplotlib()
    from matplotlib.lines import Line2D

    digits = sorted(set(labels.tolist()))
    colours = matplotlib.colormaps["tab10"]
    order = np.random.default_rng(SCATTER_SEED).permutation(len(labels))
    size = 4 if len(labels) > 2000 else 12

    def draw(figure):
        ax = figure.subplots()
        table = np.array([colours(d) for d in range(10)])  # RGBA per digit
        ax.scatter(projection[order, 0], projection[order, 1], s=size, linewidths=0,
                   c=table[labels[order] % 10], alpha=0.6)
        handles = [Line2D([], [], linestyle="", marker="o", markersize=7,
                          color=colours(d % 10), label=str(d)) for d in digits]
        ax.legend(handles=handles, title="digit", loc="center left", bbox_to_anchor=(1.01, 0.5),
                  frameon=False)
        ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% of the variance of μ)")
        ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% of the variance of μ)")
        ax.set_title(title or f"latent means μ(x, y) of {len(labels):,} test images, "
                              f"PCA to 2-D (latent size {mu.shape[1]})", fontsize=11)
        ax.grid(True, alpha=0.3)
        figure.tight_layout()

    return _render(matplotlib, draw, (8, 6.5))


# ---------------------------------------------------------------- thread scaling


def scaling_png(rows, title=None):
    """PNG bytes of a thread-scaling study (cvae bench rows: variant, batch, threads,
    img_per_s): img/s against threads on the left, speed-up over one thread on the right with
    the ideal line (speed-up = threads), one line per variant and batch."""
    series = {}
    for row in rows:
        series.setdefault((row["variant"], row["batch"], row.get("precision")), []).append(row)
    if not series:
        raise CvaeError("no benchmark rows to draw")
    matplotlib = _matplotlib()
    threads = sorted({r["threads"] for r in rows})

    def draw(figure):
        rate_ax, speed_ax = figure.subplots(1, 2)
        for (variant, batch, precision), points in series.items():
            points = sorted(points, key=lambda r: r["threads"])
            label = f"{variant}, batch {batch}" + (f", {precision}" if precision else "")
            xs = [r["threads"] for r in points]
            rate_ax.plot(xs, [r["img_per_s"] for r in points], marker="o", label=label)
            speedups = [(r["threads"], r["speedup"]) for r in points if r.get("speedup")]
            if speedups:
                speed_ax.plot(*zip(*speedups), marker="o", label=label)
        speed_ax.plot(threads, threads, linestyle="--", color="grey", label="ideal (= threads)")
        for ax in (rate_ax, speed_ax):
            ax.set_xlabel("threads (--threads)")
            ax.set_xticks(threads)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        rate_ax.set_ylabel("training images per second")
        rate_ax.set_ylim(bottom=0)
        speed_ax.set_ylabel("speed-up over 1 thread")
        speed_ax.set_ylim(bottom=0)
        figure.suptitle(title or "cvae bench: thread scaling", fontsize=12)
        figure.tight_layout()

    return _render(matplotlib, draw, (11, 4.5))
