# sdxl-serve: `make demo` runs a local cluster, `make test` runs the suite. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8000
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
INSTALLED := $(VENV)/.installed

.PHONY: install demo test lint typecheck bench clean redis-server chromium

install: $(INSTALLED) redis-server chromium

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $@

# Tests and `sdxl-serve up` start their own redis-server; install Debian's when there is none.
redis-server:
	@command -v redis-server >/dev/null || { \
		echo "installing redis-server with apt-get"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

# The demo page is tested in headless Chromium driven by Playwright; Debian's build, not Playwright's download.
chromium:
	@command -v chromium >/dev/null || { \
		echo "installing chromium with apt-get"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(VENV)/bin/sdxl-serve up --port $(PORT)

test: install
	$(VENV)/bin/pytest

lint: install
	$(VENV)/bin/ruff check common gateway worker sdxl_serve tests bench

typecheck: install
	$(VENV)/bin/mypy

bench: install
	$(VENV)/bin/python bench/overhead.py --requests 20

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache artifacts
