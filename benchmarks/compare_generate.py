"""`cvae generate` against a plain PyTorch script (torch_generate.py), whole processes, interleaved.

    python benchmarks/compare_generate.py --checkpoint RUN --per-digit 10000 --threads 2 --rounds 4 [--json]

Each round times, from start to exit, `cvae generate --checkpoint RUN --per-digit N --threads T
--out DIR/x.pgm` (under --cvae-python) and `torch_generate.py --per-digit N --threads T --out
DIR/x.pgm` (under --peer-python), alternating which goes first. Both decode N per digit for every
digit of the model from N(0, I) and write sheets of the same geometry (cvae's defaults: up to
20 columns, --max-rows 50 rows per sheet); cvae also writes a JSON sidecar per sheet and
fsyncs every file, the script neither. Each run writes into an empty directory (under --work,
default a temporary one) that is removed, untimed, after the run; the first round also checks
that both wrote the same PGM names and sizes. Prints the best and the median seconds of each
and the speed-up of cvae (torch / cvae); with --json, one object per line.

Before the rounds (untimed) both sides' Python sources are byte-compiled (compileall, into
their __pycache__ directories): cvae's package and this directory (torch_cvae.py), as pip
does for an installed package and torch's files are. Without it, an editable install run
with PYTHONDONTWRITEBYTECODE set compiles every cvae module from source in every process
(about 0.1 s); --no-compile measures that case.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PEER_PYTHON = "/work/bench-venv/bin/python"


def pgm_sizes(directory):
    return sorted((name, os.path.getsize(os.path.join(directory, name)))
                  for name in os.listdir(directory) if name.endswith(".pgm"))


def timed(argv, directory):
    """Seconds for the whole process, and the PGM files it left; raises SystemExit on failure."""
    os.makedirs(directory)
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"compare_generate: {' '.join(argv)} failed: "
                         f"{(done.stderr.strip().splitlines() or ['exit code %d' % done.returncode])[-1]}")
    files = pgm_sizes(directory)
    shutil.rmtree(directory)
    return seconds, files, done.stdout.strip()


def byte_compile(cvae_python, peer_python):
    """__pycache__ for cvae's package (found by the Python that runs it) and for this directory."""
    where = subprocess.run([cvae_python, "-c", "import cvae, os; print(os.path.dirname(cvae.__file__))"],
                           capture_output=True, text=True)
    if where.returncode:
        raise SystemExit(f"compare_generate: {cvae_python} cannot import cvae: {where.stderr.strip()}")
    for python, directory in ((cvae_python, where.stdout.strip()), (peer_python, HERE)):
        done = subprocess.run([python, "-m", "compileall", "-q", directory], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"compare_generate: compileall {directory} failed: {done.stdout.strip()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="a run directory or checkpoint")
    p.add_argument("--variant", choices=("full", "mini", "mid"), default="full",
                   help="the checkpoint's variant, for the PyTorch script (default: full)")
    p.add_argument("--per-digit", type=int, default=10000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-rows", type=int, default=50, help="rows per sheet, for both (cvae's default)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--work", default=None, help="where the sheets go (default: a temporary directory)")
    p.add_argument("--cvae-python", default=sys.executable,
                   help="the Python where cvae is installed (default: this one)")
    p.add_argument("--peer-python", default=DEFAULT_PEER_PYTHON,
                   help=f"the Python with torch (default: {DEFAULT_PEER_PYTHON})")
    p.add_argument("--cvae-option", action="append", default=[], metavar="OPTION",
                   help="an option passed on to cvae generate (repeatable), e.g. "
                        "--cvae-option=--prior=gaussian --cvae-option=--precision=bf16: the "
                        "PyTorch script draws from N(0, I) in fp32")
    p.add_argument("--no-compile", action="store_true",
                   help="do not byte-compile cvae's package and torch_cvae.py first")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.per_digit < 1 or args.threads < 1:
        p.error("--rounds, --per-digit and --threads must be positive")
    for name in ("cvae_python", "peer_python"):
        path = getattr(args, name)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            p.error(f"--{name.replace('_', '-')} {path}: not an executable file")

    if not args.no_compile:
        byte_compile(args.cvae_python, args.peer_python)
    common = ["--per-digit", str(args.per_digit), "--threads", str(args.threads), "--max-rows", str(args.max_rows)]
    work = tempfile.mkdtemp(prefix="compare-generate-", dir=args.work)
    plans = {
        "cvae": lambda d: [args.cvae_python, "-m", "cvae", "generate", "--checkpoint", args.checkpoint,
                           "--out", os.path.join(d, "x.pgm")] + common + args.cvae_option,
        "torch": lambda d: [args.peer_python, os.path.join(HERE, "torch_generate.py"), "--variant", args.variant,
                            "--out", os.path.join(d, "x.pgm")] + common,
    }
    seconds = {impl: [] for impl in plans}
    try:
        for r in range(args.rounds):
            order = list(plans) if r % 2 == 0 else list(plans)[::-1]
            files = {}
            for impl in order:
                out = os.path.join(work, f"{impl}-{r}")
                s, files[impl], said = timed(plans[impl](out), out)
                seconds[impl].append(round(s, 3))
                if not args.json:
                    print(f"  round {r + 1} {impl}: {s:.3f} s" + (f"  ({said})" if said else ""),
                          file=sys.stderr, flush=True)
            if r == 0 and files["cvae"] != files["torch"]:
                raise SystemExit(f"compare_generate: the two wrote different sheets: cvae "
                                 f"{len(files['cvae'])} PGMs, {sum(n for _, n in files['cvae']):,} bytes; "
                                 f"torch {len(files['torch'])}, {sum(n for _, n in files['torch']):,} bytes")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for impl, runs in seconds.items():
        rows.append({"kind": "result", "impl": impl, "per_digit": args.per_digit, "threads": args.threads,
                     "best_s": min(runs), "median_s": round(statistics.median(runs), 3), "runs": runs})
    best = {row["impl"]: row["best_s"] for row in rows}
    median = {row["impl"]: row["median_s"] for row in rows}
    ratio = {"kind": "ratio", "per_digit": args.per_digit, "threads": args.threads, "rounds": args.rounds,
             "best_speedup": round(best["torch"] / best["cvae"], 3),
             "median_speedup": round(median["torch"] / median["cvae"], 3)}
    if args.json:
        for row in rows + [ratio]:
            print(json.dumps(row))
    else:
        print(f"--per-digit {args.per_digit}, {args.threads} threads, {args.rounds} interleaved rounds; "
              f"seconds for the whole process")
        for row in rows:
            print(f"{row['impl']:<8} best {row['best_s']:.3f} s  median {row['median_s']:.3f} s  "
                  f"runs {', '.join(f'{x:.3f}' for x in row['runs'])}")
        print(f"speed-up of cvae (torch seconds / cvae seconds): {ratio['best_speedup']:.2f}x best, "
              f"{ratio['median_speedup']:.2f}x median")
    return 0


if __name__ == "__main__":
    sys.exit(main())
