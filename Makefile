# sdxl-serve: `make demo` runs a local cluster, `make test` runs the suite, `make check` runs what CI runs.
# All of them install what they need.
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8000
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
INSTALLED := $(VENV)/.installed
# The runtime alone (gateway, worker, `sdxl-serve up`): what `make demo` needs. INSTALLED adds the developer's tools.
RUNTIME := $(VENV)/.runtime
# The GPU images run Python 3.12 and jax 0.11: the code that meets them is tested there too (test-py312).
VENV312 ?= .venv-py312
INSTALLED312 := $(VENV312)/.installed
PY312_TESTS := tests/test_pipeline.py tests/test_engine.py tests/test_parity.py tests/test_schedulers.py \
	tests/test_lora.py tests/test_img2img.py
# The packages, then everything `make check` lints and type-checks. $(wildcard) leaves out a package that is not
# there yet, so a checkout without testkit/ is still checked whole.
PACKAGES := $(wildcard common gateway worker sdxl_serve testkit)
CODE := $(PACKAGES) $(wildcard bench tests) .ci/function_sizes.py

.PHONY: test-py312 full-arch install demo check test test-fast lint typecheck imports sizes bench clean redis-server redis-sentinel chromium

# Everything a developer needs: the runtime, then the test, lint and type-check tools, the browser and Sentinel.
install: $(INSTALLED) redis-server redis-sentinel chromium

# Each step says what it does: a newcomer waits here for minutes on a fresh clone.
$(RUNTIME): pyproject.toml
	@echo "[1/2] making the virtualenv $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	@echo "[2/2] installing sdxl-serve with the worker's libraries (JAX, Flax, diffusers, transformers): a few minutes"
	$(VENV)/bin/pip install --progress-bar off -e ".[worker]"
	touch $@

$(INSTALLED): $(RUNTIME) pyproject.toml
	@echo "installing the developer's tools (pytest, ruff, mypy, Playwright, schemathesis, SeaweedFS, ...)"
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	# The watermark tests' decoder, without the torch it lists for a method it has and nothing here uses.
	$(VENV)/bin/pip install --quiet --no-deps "invisible-watermark==0.2.0"
	touch $@

# Made once, as the main venv is: the worker's pins (diffusers, transformers, huggingface-hub) with the newest
# jax 0.11 release and only what the pipeline's tests need. .ci/python312 finds the interpreter.
$(INSTALLED312): pyproject.toml
	rm -rf $(VENV312)
	"$$(.ci/python312)" -m venv $(VENV312)
	$(VENV312)/bin/pip install --quiet --upgrade pip
	$(VENV312)/bin/pip install --quiet -e ".[worker]" "jax>=0.11,<0.12" "pytest>=8" "pytest-asyncio>=0.24" \
		"pytest-timeout>=2.3"
	touch $@

# Tests and `sdxl-serve up` start their own redis-server; install Debian's when there is none.
redis-server:
	@command -v redis-server >/dev/null || { \
		echo "installing redis-server with apt-get"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

# A replicated Redis that fails over (tests, benchmarks and Sentinel deployments) is watched by Debian's sentinel.
redis-sentinel:
	@command -v redis-sentinel >/dev/null || { \
		echo "installing redis-sentinel with apt-get"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-sentinel >/dev/null; }

# The demo page is tested in headless Chromium driven by Playwright; Debian's build, not Playwright's download.
chromium:
	@command -v chromium >/dev/null || { \
		echo "installing chromium with apt-get"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# The demo needs the runtime and redis-server only: no test tools, no browser.
demo: $(RUNTIME) redis-server
	$(VENV)/bin/sdxl-serve up --port $(PORT)

# What CI runs (.ci/run): lint and format, strict types over the code and the tests, the import contract, the
# function sizes (fails on a function over 50 lines not listed with its reason), then the tests, and the pipeline's
# tests again on Python 3.12 with jax 0.11.
check: lint typecheck imports sizes test test-py312 full-arch

# The real SDXL architecture (random weights) at 256x256, 2 steps, on one CPU device: minutes and ~9 GiB, so a
# step of its own after the suite.
full-arch: install
	SDXL_SERVE_FULL_ARCH=1 $(VENV)/bin/pytest -q tests/test_full_architecture.py

test: install
	$(VENV)/bin/pytest

# The edit loop's tier: the suite less its worker processes (e2e), fault schedules (nemesis), the browser, the
# real architecture and in-process compiles of the pipeline (markers in pyproject.toml). Everything it leaves out
# still runs in `make test`; `pytest -m compile` runs the pipeline's own tests.
test-fast: install
	$(VENV)/bin/pytest -m "not e2e and not nemesis and not browser and not arch and not compile"

# The pipeline, parity and scheduler tests on Python 3.12 with jax 0.11 (the capped instruction set ran in `test`).
test-py312: $(INSTALLED312)
	$(VENV312)/bin/pytest -q $(PY312_TESTS) -k "not capped_instruction_set"

lint: install
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)

typecheck: install
	$(VENV)/bin/mypy $(CODE)

# The contracts are in pyproject.toml: imports run one way, and the gateway never imports the worker's libraries.
imports: install
	$(VENV)/bin/lint-imports

sizes: install
	$(VENV)/bin/python .ci/function_sizes.py $(PACKAGES) bench

bench: install
	$(VENV)/bin/python bench/overhead.py --requests 20

clean:
	rm -rf $(VENV) $(VENV312) .pytest_cache .mypy_cache .ruff_cache artifacts
