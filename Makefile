# ngx_anythingllm: build and test entry points.
#
#   make run        a local gateway on 127.0.0.1:8080 (see README)
#   make test       every suite: unit, fuzz smoke, pytest, node, asan
#   make test-asan  the pytest suite against an ASan/UBSan build
#   make fuzz       long fuzzing: FUZZ_RUNS (10 million) executions per
#                   target; FUZZ_TARGETS="fuzz_route ..." picks some
#   make soak       10 minutes (SOAK_SECONDS) of mixed traffic, reloads
#                   and Redis restarts; checks logs, RSS and fds
#   make bench      gateway overhead as ratios against plain nginx
#   make deb        the Debian package libnginx-mod-http-anythingllm

PYTHON      ?= /usr/bin/python3
PYTEST      ?= $(PYTHON) -m pytest
FUZZ_RUNS   ?= 10000000
SOAK_SECONDS ?= 600

MODULE      := build/module/ngx_http_anythingllm_module.so
ASAN_MODULE := build/asan/ngx_http_anythingllm_module.so
SOURCES     := config $(wildcard ngx_anythingllm_module/*.[ch])
SOURCES     += VERSION

.PHONY: all deps build build-asan test test-unit test-fuzz test-pytest \
        test-node test-asan fuzz soak bench run clean

all: build

deps:
	@scripts/install-deps.sh

build: deps $(MODULE)

$(MODULE): $(SOURCES)
	scripts/build-module.sh

build-asan: deps $(ASAN_MODULE)

$(ASAN_MODULE): $(SOURCES)
	scripts/build-module.sh --asan

test: build
	$(MAKE) test-unit
	$(MAKE) test-fuzz
	$(MAKE) test-pytest
	$(MAKE) test-node
	$(MAKE) test-asan
	@echo "make test: all suites passed"

test-unit: deps
	$(MAKE) -C t/unit

test-fuzz: deps
	$(MAKE) -C t/fuzz run FUZZ_SECONDS=15 FUZZ_RUNS=

fuzz: deps
	$(MAKE) -C t/fuzz run FUZZ_RUNS=$(FUZZ_RUNS)

soak: build
	SOAK_SECONDS=$(SOAK_SECONDS) $(PYTHON) t/soak.py

test-pytest: build
	$(PYTEST) -q -p no:cacheprovider t

test-node: build
	$(PYTHON) t/stack.py -- sh -c 'cd t/client && npm ci --no-audit \
	    --no-fund --loglevel=error && node --test'

test-asan: build-asan
	ALM_ASAN=1 ALM_MODULE=$(CURDIR)/$(ASAN_MODULE) \
	    $(PYTEST) -q -p no:cacheprovider t

# the Debian package, into build/deb (README, "Debian package"); test-deb
# installs it into the machine's nginx and purges it again: root only
.PHONY: deb test-deb

deb:
	scripts/build-deb.sh

test-deb: deb
	$(PYTEST) -q -p no:cacheprovider t/deb

bench: build
	$(PYTHON) scripts/bench.py

run: build
	@$(PYTHON) scripts/run.py

clean:
	rm -rf build
	-$(MAKE) -C t/unit clean
	-$(MAKE) -C t/fuzz clean
