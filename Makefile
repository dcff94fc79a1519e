# kiban — developer entry points. Everything installs into a local virtualenv.
VENV ?= .venv
PY := $(VENV)/bin/python
KIBAN := $(VENV)/bin/kiban
PYTEST_ARGS ?=

.PHONY: install demo test test-slow lint format bench docs clean

install: $(VENV)/.installed

# torch is pinned to the CPU-usable build that lies on this machine's disk; it is only
# needed by the export extra (services never import it).
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(KIBAN) demo

# pytest exits 5 when it collected no tests: that is a failure here, said plainly.
test: install
	$(PY) -m pytest -m "not slow" --timeout=900 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; fi; exit $$rc

test-slow: install
	$(PY) -m pytest -m slow --timeout=1800 $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check shared services tests bench tools
	$(VENV)/bin/ruff format --check shared services tests bench tools
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format shared services tests bench tools
	$(VENV)/bin/ruff check --fix shared services tests bench tools

bench: install
	$(PY) bench/run_all.py

docs: install
	$(PY) tools/regen_readme.py
	$(PY) tools/regen_schema.py

clean:
	rm -rf .kiban .pytest_cache .mypy_cache .ruff_cache
