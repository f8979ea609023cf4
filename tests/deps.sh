#!/bin/sh
# tests/deps.sh: makes sure what the test suite needs is installed, for the Python
# the tests use ($PYTHON, default /usr/bin/python3). Silent when nothing is missing.
# Installs what is missing when run as root or with password-less sudo (Debian's
# packages; the `tokenizers` reference from PyPI, with that same Python's pip);
# otherwise prints the one command that would, and exits 1.
#
#   numpy        the reference model (tests/ref_opt.py) and every oracle
#   torch        writes and reads PyTorch .bin checkpoints (tests/mkckpt.py)
#   tokenizers   Hugging Face's tokenizer, the reference for `opt tokenize`
#   glpsol       GLPK, the reference for `opt lp`
#   unicode-data the Unicode tables unicode_tab.h is checked against
#   OpenBLAS     so that numpy's reference is fast (its pthread build)
#   Open MPI     mpicc and mpirun, for the pipeline build (make opt-mpi) and its tests
#   libFuzzer    clang's, for the fuzz group's short run; optional: without it and without
#                root, one line says so and the group skips that run
set -u
PYTHON=${PYTHON:-/usr/bin/python3}

missing_apt="" missing_pip=""
has_py() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }
# Debian's own Python takes Debian's packages; any other takes PyPI's.
debian_py=0
[ "$(readlink -f "$PYTHON" 2>/dev/null)" = "$(readlink -f /usr/bin/python3 2>/dev/null)" ] && debian_py=1

command -v "$PYTHON" >/dev/null 2>&1 || [ -x "$PYTHON" ] || missing_apt="$missing_apt python3"
for m in numpy torch; do
    has_py $m && continue
    if [ $debian_py = 1 ]; then missing_apt="$missing_apt python3-$m"; else missing_pip="$missing_pip $m"; fi
done
has_py tokenizers || missing_pip="$missing_pip tokenizers"
if [ -n "$missing_pip" ] && ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    [ $debian_py = 1 ] && missing_apt="$missing_apt python3-pip"
fi
command -v glpsol >/dev/null 2>&1 || missing_apt="$missing_apt glpk-utils"
[ -f /usr/share/unicode/UnicodeData.txt ] || missing_apt="$missing_apt unicode-data"
{ command -v mpicc && command -v mpirun; } >/dev/null 2>&1 || missing_apt="$missing_apt openmpi-bin libopenmpi-dev"
if [ $debian_py = 1 ] && ! ls /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas*.so* >/dev/null 2>&1 &&
   ! ls /usr/lib/*/openblas-pthread/libopenblas*.so* >/dev/null 2>&1; then
    missing_apt="$missing_apt libopenblas0-pthread"
fi
missing_opt=""
echo 'int LLVMFuzzerTestOneInput(const char *d, long n) { (void)d; (void)n; return 0; }' |
    ${CLANG:-clang} -fsanitize=fuzzer -x c - -o /dev/null >/dev/null 2>&1 || missing_opt=" clang libclang-rt-dev"
[ -z "$missing_apt$missing_pip$missing_opt" ] && exit 0

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
fi
# PEP 668: Debian marks its Python as externally managed; tokenizers has no Debian package
brk=""; [ $debian_py = 1 ] && brk=" --break-system-packages"
if [ "$SUDO" = none ] && [ -z "$missing_apt$missing_pip" ]; then
    echo "tests/deps.sh: no clang with libFuzzer, so the fuzz group skips its short run; as root: apt-get install -y$missing_opt" >&2
    exit 0
fi
missing_apt="$missing_apt$missing_opt"
cmd=""
[ -z "$missing_apt" ] || cmd="apt-get update -qq && apt-get install -y -qq --no-install-recommends$missing_apt"
[ -z "$missing_pip" ] || cmd="${cmd:+$cmd && }$PYTHON -m pip install -q$brk$missing_pip"
if [ "$SUDO" = none ]; then
    echo "tests/deps.sh: the tests need:$missing_apt$missing_pip; install them as root with:" >&2
    echo "  sudo sh -c '$cmd'" >&2
    exit 1
fi
echo "tests/deps.sh: installing what the tests need:$missing_apt$missing_pip" >&2
log=$(mktemp) || exit 1
trap 'rm -f "$log"' EXIT
if ! $SUDO env DEBIAN_FRONTEND=noninteractive PIP_ROOT_USER_ACTION=ignore sh -c "$cmd" >"$log" 2>&1; then
    cat "$log" >&2
    echo "tests/deps.sh: failed: $cmd" >&2
    exit 1
fi
for m in numpy torch tokenizers; do
    has_py $m || { echo "tests/deps.sh: $PYTHON still cannot import $m" >&2; exit 1; }
done
