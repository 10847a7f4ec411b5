# ngx_anythingllm: build and test entry points.
#
#   make run        a local gateway on 127.0.0.1:8080 (see README)
#   make build      the module for Debian's nginx (build dependencies only)
#   make test       every suite: unit, fuzz smoke, pytest (Debian's nginx
#                   and mainline with the module compiled in), node, asan,
#                   the build matrix, nginx's own tests with the module
#   make test-asan  the pytest suite against an ASan/UBSan build
#   make test-matrix      the module against Debian's, stable and mainline
#                         nginx, dynamic and compiled in, gcc and clang
#   make test-nginx-suite nginx-tests without and with the module loaded
#   make fuzz       long fuzzing: FUZZ_RUNS (10 million) executions per
#                   target; FUZZ_TARGETS="fuzz_route ..." picks some
#   make soak       10 minutes (SOAK_SECONDS) of mixed traffic, reloads
#                   and Redis restarts; checks logs, RSS and fds
#   make bench      the performance report: ratios to plain nginx, p99,
#                   the re-framer, memory per stream (BENCH_* settings:
#                   dev/bench.py)
#   make deb        the Debian package libnginx-mod-http-anythingllm

PYTHON      ?= /usr/bin/python3
PYTEST      ?= $(PYTHON) -m pytest
FUZZ_RUNS   ?= 10000000
SOAK_SECONDS ?= 600

MODULE      := build/module/ngx_http_anythingllm_module.so
ASAN_MODULE := build/asan/ngx_http_anythingllm_module.so
SOURCES     := config $(wildcard ngx_anythingllm_module/*.[ch])
SOURCES     += VERSION scripts/build-module.sh
# the matrix build the mainline pytest pass runs: module compiled in
MAINLINE    := build/matrix/1.31.4-static-gcc/objs/nginx

.PHONY: all deps deps-test deps-bench build build-asan test test-unit \
        test-fuzz test-pytest test-pytest-mainline test-matrix \
        test-nginx-suite test-node test-asan fuzz soak bench run clean

all: build

# building needs only nginx-dev, hiredis, cJSON and OpenSSL; nothing
# here starts, stops or disables a service
deps:
	@dev/install-deps.sh build

deps-test:
	@dev/install-deps.sh test

deps-bench:
	@dev/install-deps.sh bench

build: deps $(MODULE)

$(MODULE): $(SOURCES)
	scripts/build-module.sh

build-asan: deps-test $(ASAN_MODULE)

$(ASAN_MODULE): $(SOURCES)
	scripts/build-module.sh --asan

test: deps-test build
	$(MAKE) test-unit
	$(MAKE) test-fuzz
	$(MAKE) test-pytest
	$(MAKE) test-pytest-mainline
	$(MAKE) test-node
	$(MAKE) test-asan
	$(MAKE) test-matrix
	$(MAKE) test-nginx-suite
	$(MAKE) test-deb
	@echo "make test: all suites passed"

test-unit: deps-test
	$(MAKE) -C t/unit

test-fuzz: deps-test
	$(MAKE) -C t/fuzz run FUZZ_SECONDS=15 FUZZ_RUNS=

fuzz: deps-test
	$(MAKE) -C t/fuzz run FUZZ_RUNS=$(FUZZ_RUNS)

soak: deps-test build
	SOAK_SECONDS=$(SOAK_SECONDS) $(PYTHON) t/soak.py

test-pytest: deps-test build
	$(PYTEST) -q -p no:cacheprovider t

# the same suite against nginx mainline built from source with the
# module compiled in: no load_module (ALM_MODULE empty)
test-pytest-mainline: deps-test build
	dev/build-matrix.sh 1.31.4-static-gcc
	ALM_NGINX=$(CURDIR)/$(MAINLINE) ALM_MODULE= \
	    $(PYTEST) -q -p no:cacheprovider t

test-matrix: deps-test
	dev/build-matrix.sh

test-nginx-suite: deps-test build
	dev/nginx-tests.sh

test-node: deps-test build
	$(PYTHON) t/stack.py -- sh -c 'cd t/client && npm ci --no-audit \
	    --no-fund --loglevel=error && node --test'

test-asan: build-asan
	ALM_ASAN=1 ALM_MODULE=$(CURDIR)/$(ASAN_MODULE) \
	    $(PYTEST) -q -p no:cacheprovider t

# the Debian package, into build/deb (README, "Debian package"); test-deb
# installs it into the machine's nginx and purges it again: root only
.PHONY: deb test-deb

deb:
	dev/build-deb.sh

test-deb: deps-test deb
	$(PYTEST) -q -p no:cacheprovider t/deb

bench: deps-bench build
	$(PYTHON) dev/bench.py

run: deps-test build
	@$(PYTHON) dev/run.py

clean:
	rm -rf build
	-$(MAKE) -C t/unit clean
	-$(MAKE) -C t/fuzz clean
