# goheap developer commands.  Everything installs itself from nothing:
# a fresh machine needs only python3 (>= 3.10, with venv) and a C compiler.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# The C core is rebuilt whenever one of these changes.
BUILD_INPUTS := goheap/_sys.c goheap/_pyfast.c goheap/_nphandler.c goheap/_sys.h goheap/_sys.cdef build_ffi.py setup.py pyproject.toml
PYTEST_ARGS ?=
# Test processes (pytest-xdist): the suite is mostly waiting on syscalls and
# child processes, so two workers halve its wall time on a 2-core machine.
PYTEST_JOBS ?= 2

.PHONY: venv build test demo bench bench-quick bench-deps lint clean

venv: $(VENV)/.venv-ok
$(VENV)/.venv-ok:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools>=77" wheel "cffi>=1.16"
	touch $@

# Editable install: the extension (goheap/_ffi*.so) is built in place, so the
# tests run against this checkout.
build: $(VENV)/.build-ok
$(VENV)/.build-ok: $(VENV)/.venv-ok $(BUILD_INPUTS)
	$(PIP) install --no-build-isolation -e '.[test]'
	touch $@

test: build
	$(PY) -m pytest -n $(PYTEST_JOBS) $(PYTEST_ARGS)

# Platform lanes (lanes/*.sh; README "Platforms").  test-pagesize runs the suite
# as a 16 KiB- and a 64 KiB-page process (LD_PRELOAD shim, tests/pageshim/);
# the emulated lanes need root, install their own tools and cache their Debian
# roots in lanes/work/.  ARM64_PYTEST_ARGS: e.g. "-m pagesize" for the subset.
# PAGESIZES: the shim's page sizes (default both); KERNEL_LANES: arm64-16k
# and/or ppc64el-64k (default both).
.PHONY: test-pagesize test-arm64 test-kernels ci-cold
ARM64_PYTEST_ARGS ?=
PAGESIZES ?=
KERNEL_LANES ?=
test-pagesize: build
	PYTHON=$(PY) bash lanes/pagesize.sh $(PAGESIZES) -- $(PYTEST_ARGS)
test-arm64:
	bash lanes/arm64.sh $(ARM64_PYTEST_ARGS)
test-kernels:
	bash lanes/kernels.sh $(KERNEL_LANES)

# What CI sees on a machine that never ran goheap: HEAD cloned into a temporary
# folder, .ci/run there with an empty lane cache and an empty pip cache, timed.
# (Debian packages the lanes apt-get install stay installed between runs: a
# cold machine pays their download once more; README "Platforms" has the figure.)
ci-cold:
	@tmp=$$(mktemp -d /tmp/goheap-ci-cold.XXXXXX) && \
	git clone -q . "$$tmp/goheap" && \
	echo "ci-cold: $$(git rev-parse --short HEAD) in $$tmp (lane cache $$tmp/lanes, empty)" && \
	t0=$$(date +%s) && rc=0 && \
	{ cd "$$tmp/goheap" && CI=true LANES_WORK="$$tmp/lanes" PIP_CACHE_DIR="$$tmp/pip-cache" \
	  bash .ci/run </dev/null || rc=$$?; } && \
	echo "ci-cold: .ci/run exited $$rc after $$(( $$(date +%s) - t0 ))s wall" && \
	if grep -q " $$tmp/" /proc/mounts; then echo "ci-cold: mounts left under $$tmp; not removed"; \
	else rm -rf --one-file-system "$$tmp"; fi; exit $$rc

demo: build
	$(PY) -m goheap demo

# Benchmarks (issue 6; README "Benchmarks"): the bench extra into the venv, and Debian's
# jemalloc/mimalloc/tcmalloc, and Electric Fence and DUMA for workload (f) (issue 15), when they
# are missing and apt-get is there (a peer that is still missing is skipped by run.py with a
# printed reason).
BENCH_APT := libjemalloc2 libmimalloc2.0 libtcmalloc-minimal4 electric-fence duma
$(VENV)/.bench-ok: $(VENV)/.build-ok pyproject.toml
	$(PIP) install --no-build-isolation -e '.[bench]'
	touch $@

bench-deps: $(VENV)/.bench-ok
	@if ldconfig -p 2>/dev/null | grep -q libjemalloc.so.2 && \
	    ldconfig -p | grep -q libmimalloc.so.2 && ldconfig -p | grep -q libtcmalloc_minimal.so.4 && \
	    ldconfig -p | grep -q libefence.so.0 && ldconfig -p | grep -q libduma.so; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  { apt-get update -qq && apt-get install -y -qq $(BENCH_APT); } >/dev/null 2>&1 || \
	    echo "bench: apt-get install $(BENCH_APT) failed; those peers will be skipped"; \
	else echo "bench: no apt-get; the jemalloc/mimalloc/tcmalloc/efence/duma peers will be skipped"; fi

bench: bench-deps
	$(PY) benchmarks/run.py

bench-quick: bench-deps
	$(PY) benchmarks/run.py --quick

# NumPy's own tests (they ship in its wheel) without the pytest plugin, with
# --goheap=normal and with --goheap=sample:100: the same outcomes, and the time
# each run takes (issue 15; README "The pytest plugin").  Minutes; not in make test,
# which runs a few hundred of them (tests/test_pytest_plugin.py).
# NUMPY_SUITE_ARGS: e.g. --quick, or module names.
.PHONY: numpy-suite
NUMPY_SUITE_ARGS ?=
numpy-suite: build
	$(PY) benchmarks/numpy_suite.py $(NUMPY_SUITE_ARGS)

# Reliability (issue 8).  sanitize: the C core built with ASan + UBSan in a
# copy of the tree (build/asan/src, installed editable in its own venv, so the
# pytest plugin's entry point exists as for a user), the test suite run there with
# the ASan runtime preloaded (CPython itself is not instrumented; it leaks by
# design, hence detect_leaks=0; SIGSEGV/SIGBUS are left to the efence tests;
# allocator_may_return_null=1: NumPy's own tests, run by the plugin's, ask
# malloc for 2**63 bytes and expect NULL, where ASan would abort).
# valgrind: tests/cdriver/driver.c drives the fast path, bitmap and span code
# without Python under memcheck, then times the free-list link check (A/B).
# soak: benchmarks/soak.py, minutes, not in CI.
ASAN_DIR   := build/asan
SAN_FLAGS  := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
SANITIZE_PYTEST_ARGS ?= -q -x
.PHONY: sanitize valgrind soak
sanitize:
	@mkdir -p $(ASAN_DIR)/src
	test -x $(ASAN_DIR)/venv/bin/python || $(PYTHON) -m venv $(ASAN_DIR)/venv
	$(ASAN_DIR)/venv/bin/python -m pip --disable-pip-version-check -q install \
	  "setuptools>=77" wheel "cffi>=1.16" "psutil>=5.9" "pytest>=7" "pytest-xdist>=3" "hypothesis>=6.80" "numpy>=1.24"
	tar --exclude=./.venv --exclude=./build --exclude=./lanes/work --exclude=./.git \
	  --exclude='./goheap/_ffi*' -cf - . | tar -xf - -C $(ASAN_DIR)/src
	cd $(ASAN_DIR)/src && GOHEAP_CFLAGS="$(SAN_FLAGS)" GOHEAP_LDFLAGS="-fsanitize=address,undefined" \
	  ../venv/bin/python -m pip --disable-pip-version-check -q install --no-build-isolation --no-deps -e .
	cd $(ASAN_DIR)/src && LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:handle_segv=0:handle_sigbus=0:allow_user_segv_handler=1:allocator_may_return_null=1 \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  ../venv/bin/python -m pytest $(SANITIZE_PYTEST_ARGS) -p no:cacheprovider

valgrind:
	@command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
	@mkdir -p build/cdriver
	gcc -std=c11 -O1 -g -Wall -Wextra -Werror -Igoheap goheap/_sys.c tests/cdriver/driver.c \
	  -o build/cdriver/driver
	valgrind -q --error-exitcode=9 --track-origins=yes build/cdriver/driver
	gcc -std=c11 -O2 -Wall -Wextra -Werror -Igoheap goheap/_sys.c tests/cdriver/driver.c \
	  -o build/cdriver/driver-o2
	sed 's/if (next != 0 && (next == v || !link_ok(h, s, next))) {/if (0) {/' goheap/_sys.c \
	  > build/cdriver/_sys_nolink.c
	gcc -std=c11 -O2 -Wall -Wextra -Werror -Igoheap build/cdriver/_sys_nolink.c \
	  tests/cdriver/driver.c -o build/cdriver/driver-nolink
	@for i in 1 2 3; do printf 'link check on:  '; build/cdriver/driver-o2 bench 20000000; \
	  printf 'link check off: '; build/cdriver/driver-nolink bench 20000000; done

soak: build
	$(PIP) install -q "matplotlib>=3.7"
	$(PY) benchmarks/soak.py $(SOAK_ARGS)

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
