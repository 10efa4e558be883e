# goheap developer commands.  Everything installs itself from nothing:
# a fresh machine needs only python3 (>= 3.10, with venv) and a C compiler.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# The C core is rebuilt whenever one of these changes.
BUILD_INPUTS := goheap/_sys.c goheap/_sys.h goheap/_sys.cdef build_ffi.py setup.py pyproject.toml
PYTEST_ARGS ?=

.PHONY: venv build test demo bench bench-quick bench-deps lint clean

venv: $(VENV)/.venv-ok
$(VENV)/.venv-ok:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=68" wheel "cffi>=1.16"
	touch $@

# Editable install: the extension (goheap/_ffi*.so) is built in place, so the
# tests run against this checkout.
build: $(VENV)/.build-ok
$(VENV)/.build-ok: $(VENV)/.venv-ok $(BUILD_INPUTS)
	$(PIP) install --no-build-isolation -e '.[test]'
	touch $@

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

# Platform lanes (lanes/*.sh; README "Platforms").  test-pagesize runs the suite
# as a 16 KiB- and a 64 KiB-page process (LD_PRELOAD shim, tests/pageshim/);
# the emulated lanes need root, install their own tools and cache their Debian
# roots in lanes/work/.  ARM64_PYTEST_ARGS: e.g. "-m pagesize" for the subset.
.PHONY: test-pagesize test-arm64 test-kernels
ARM64_PYTEST_ARGS ?=
test-pagesize: build
	PYTHON=$(PY) bash lanes/pagesize.sh -- $(PYTEST_ARGS)
test-arm64:
	bash lanes/arm64.sh $(ARM64_PYTEST_ARGS)
test-kernels:
	bash lanes/kernels.sh

demo: build
	$(PY) -m goheap demo

# Benchmarks (issue 6; README "Benchmarks"): the bench extra into the venv, and Debian's
# jemalloc/mimalloc/tcmalloc when they are missing and apt-get is there (a peer that is still
# missing is skipped by run.py with a printed reason).
BENCH_APT := libjemalloc2 libmimalloc2.0 libtcmalloc-minimal4
$(VENV)/.bench-ok: $(VENV)/.build-ok pyproject.toml
	$(PIP) install --no-build-isolation -e '.[bench]'
	touch $@

bench-deps: $(VENV)/.bench-ok
	@if ldconfig -p 2>/dev/null | grep -q libjemalloc.so.2 && \
	    ldconfig -p | grep -q libmimalloc.so.2 && ldconfig -p | grep -q libtcmalloc_minimal.so.4; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  { apt-get update -qq && apt-get install -y -qq $(BENCH_APT); } >/dev/null 2>&1 || \
	    echo "bench: apt-get install $(BENCH_APT) failed; those peers will be skipped"; \
	else echo "bench: no apt-get; the jemalloc/mimalloc/tcmalloc peers will be skipped"; fi

bench: bench-deps
	$(PY) benchmarks/run.py

bench-quick: bench-deps
	$(PY) benchmarks/run.py --quick

lint: build
	$(PIP) install -e '.[lint]' --no-build-isolation
	$(PY) -m ruff check goheap tests build_ffi.py
	$(PY) -m ruff format --check goheap tests build_ffi.py
	$(PY) -m mypy goheap

# Never deletes goheap/_sys.c: only what the build generates.
clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	rm -f goheap/_ffi.c goheap/_ffi*.so goheap/_ffi*.o
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
	rm -rf $(VENV)
