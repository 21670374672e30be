# csrproxy: `make demo` runs the main job on loopback; `make test` runs lint and every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all demo test lint unit integration system-deps venv install-plugin-cache bench clean

all: test

system-deps:
	./scripts/install-system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q --config-settings editable_mode=compat -e '.[test,lint]'
	$(MAKE) install-plugin-cache
	touch $(STAMP)

venv: $(STAMP)

# Build Twisted's plugin cache now, so an unprivileged twistd never writes dropin.cache.
install-plugin-cache:
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

lint: venv
	$(VENV)/bin/ruff check csrproxy tests twisted bench
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest -m "not integration" -q

integration: venv system-deps
	$(PY) -m pytest -m integration -q

test: system-deps venv lint
	$(PY) -m pytest -q

demo: system-deps venv
	$(PY) -m csrproxy.testing.demo

bench: system-deps venv
	bench/dns

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache demo-out
