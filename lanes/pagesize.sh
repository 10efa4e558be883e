#!/bin/bash
# Page-size lane: the whole pytest suite under tests/pageshim (LD_PRELOAD), once
# as a 16 KiB-page process and once as a 64 KiB-page one, on this x86-64 host.
#
# Usage: lanes/pagesize.sh [SIZE...] [-- PYTEST-ARGS...]
#   SIZE defaults to "16384 65536"; PYTEST-ARGS default to the whole suite.
#   PYTHON (default .venv/bin/python, made by `make test`) runs pytest.
#
# Cheap (near-native speed) and the main guard for the 8 KiB heap page vs
# big OS page logic.  It checks the real C extension against the big-page
# kernel's rules (EINVAL for misaligned ranges); it complements the OS layer's
# own simulated page size, which tests the Python logic without any shim.
# Before each size, selftest.py proves the shim is loaded and enforcing: a
# shim that silently did nothing would otherwise give a meaningless green.
LANE=pagesize
. "$(dirname "$0")/lib.sh"

sizes=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do sizes+=("$1"); shift; done
[ "${1:-}" = -- ] && shift
[ ${#sizes[@]} -gt 0 ] || sizes=(16384 65536)
pytest_args=("$@")

PYTHON=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PYTHON" ] || die "no $PYTHON: run 'make test' (or 'make test-pagesize') to create .venv"

# Build the shim; a compiler is part of the lane's setup.
command -v gcc >/dev/null || host_install gcc libc6-dev
SHIM=$REPO/tests/pageshim/pageshim.so
src=$REPO/tests/pageshim/pageshim.c
if [ ! -f "$SHIM" ] || [ "$src" -nt "$SHIM" ]; then
    gcc -shared -fPIC -O2 -Wall -Wextra -Werror -o "$SHIM.tmp" "$src" -ldl \
        || die "pageshim.c does not build cleanly"
    mv "$SHIM.tmp" "$SHIM"
fi

cd "$REPO"
rc=0
for size in "${sizes[@]}"; do
    say "=== ${size}-byte pages (LD_PRELOAD=tests/pageshim/pageshim.so PAGESHIM_SIZE=$size)"
    export PAGESHIM_SIZE=$size
    LD_PRELOAD=$SHIM "$PYTHON" tests/pageshim/selftest.py \
        || die "pageshim self-test failed at $size: the shim does not emulate big pages"
    # pip must work under the shim too (the suite's subprocess tests spawn Pythons).
    LD_PRELOAD=$SHIM "$PYTHON" -m pip --version >/dev/null \
        || die "pip does not start under the shim at $size"
    if ! timed "pytest at $size" env LD_PRELOAD="$SHIM" "$PYTHON" -m pytest "${pytest_args[@]}"; then
        say "pytest FAILED under ${size}-byte pages"
        rc=1
    fi
    unset PAGESHIM_SIZE
done
[ $rc = 0 ] || die "the suite failed under the page-size shim (see above)"
say "all sizes passed: ${sizes[*]}"
