# Duplex: the two commands a newcomer needs are `make demo` and `make test`.
# Each installs what is missing (Debian packages, quietly), configures and builds in build/.

BUILD      ?= build
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
JOBS       ?= $(shell nproc)
GENERATOR  := $(shell command -v ninja >/dev/null 2>&1 && echo "-G Ninja")
CTEST_ARGS ?= --output-on-failure -j $(JOBS) --timeout 900

.PHONY: all deps torch build demo test test-asan test-tsan bench bench-gpu clean

all: build

VENV       ?= .venv
PYTHON_DEF := -DPython_EXECUTABLE=$(CURDIR)/$(VENV)/bin/python

# deps: what the build needs; torch (only the tests and the demo need it) installs beside the build in `make test`.
deps:
	@./scripts/install-deps
	@./scripts/install-python $(VENV) base

torch: deps
	@./scripts/install-python $(VENV) torch

$(BUILD)/CMakeCache.txt: | deps
	@cmake -S . -B $(BUILD) $(GENERATOR) -DCMAKE_BUILD_TYPE=RelWithDebInfo $(PYTHON_DEF) >/dev/null

build: deps $(BUILD)/CMakeCache.txt
	@cmake --build $(BUILD) -j $(JOBS)

demo: build
	@./scripts/demo $(BUILD)

# The build and torch's install (mostly disk and network) run side by side; the tests start when both are done.
test: deps $(BUILD)/CMakeCache.txt
	@mkdir -p $(BUILD)
	@./scripts/install-python $(VENV) torch > $(BUILD)/install-torch.log 2>&1 & pid=$$!; \
	cmake --build $(BUILD) -j $(JOBS); built=$$?; \
	wait $$pid || { cat $(BUILD)/install-torch.log; exit 1; }; cat $(BUILD)/install-torch.log; \
	[ $$built -eq 0 ] || exit $$built; \
	cd $(BUILD) && ctest $(CTEST_ARGS)

test-asan: deps
	@cmake -S . -B $(ASAN_BUILD) $(GENERATOR) -DCMAKE_BUILD_TYPE=Debug -DDUPLEX_SANITIZE=ON -DDUPLEX_WITH_CUDA=OFF \
		-DDUPLEX_PYTHON=OFF >/dev/null
	@cmake --build $(ASAN_BUILD) -j $(JOBS)
	@# NOTE: tests labelled `timing` compare wall-clock behaviour (emulate vs simulate within 10%, a killed rank
	@# noticed within seconds) that a sanitizer's 2-10x slowdown distorts; `make test` runs them.
	@cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS=suppressions=$(CURDIR)/.ci/lsan.supp \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest $(CTEST_ARGS) -LE "timing|install"

test-tsan: deps
	@cmake -S . -B $(TSAN_BUILD) $(GENERATOR) -DCMAKE_BUILD_TYPE=Debug -DDUPLEX_TSAN=ON -DDUPLEX_WITH_CUDA=OFF \
		-DDUPLEX_WITH_MPI=OFF -DDUPLEX_WITH_UCX=OFF -DDUPLEX_PYTHON=OFF >/dev/null
	@cmake --build $(TSAN_BUILD) -j $(JOBS)
	@# (Without the `timing` tests, as in test-asan: a slow link that must stand out 100x from the median does not
	@# under ThreadSanitizer's instrumented copies.)
	@cd $(TSAN_BUILD) && TSAN_OPTIONS=halt_on_error=1 ctest $(CTEST_ARGS) -L "core|comm" -LE timing
	@# The executor's threads (F&B helper, expert-service lanes, the compute stream, the per-stage reduce-scatter
	@# worker) on custom, built-in and emulated stages.
	@cd $(TSAN_BUILD) && TSAN_OPTIONS=halt_on_error=1 ctest $(CTEST_ARGS) \
		-R "CustomStage|StageContract|ExpertExchange|ExpertMajor|EmulateMode|dualpipe_pp2_dp4_ep4|Fp64MatchesTheReference/(dualpipev_pp4_dp2_ep2|interleaved_fb_pp4_vpp2_dp2_ep2|1f1b_pp4_dp2_ep2)"

bench: build torch
	@./scripts/bench-comm $(BUILD)
	@./scripts/bench-model $(BUILD)
	@./scripts/bench-ema $(BUILD)
	@./scripts/bench-emulate $(BUILD)
	@./scripts/bench-emulate-v3 $(BUILD)
	@./scripts/bench-dispatch $(BUILD)
	@./scripts/bench-simulate $(BUILD)
	@PYTHONPATH=$(BUILD)/python $(VENV)/bin/python scripts/bench-torch-pipeline.py

bench-gpu: build
	@./scripts/bench-gpu $(BUILD)

clean:
	@rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD)
