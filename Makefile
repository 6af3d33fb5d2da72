# smsd: two commands for a fresh machine.
#   make test   set up .venv, build the extension, run the tests
#   make demo   set up .venv, build the extension, run the main job (smsd simulate)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Pinned here, not in pyproject: a loose torch requirement can pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
TRITON ?= triton==3.6.0
STAMP  := $(VENV)/.smsd-installed

.PHONY: setup test demo bench check lint wheel clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP) install -q $(TORCH) $(TRITON) ninja
	$(PIP) install -q --no-build-isolation -e '.[test,dali,flower]'
	touch $(STAMP)

setup: $(STAMP)

test: setup
	SMSD_REQUIRE_BACKENDS=triton,cpp,torch $(PY) -m pytest -q tests

demo: setup
	$(VENV)/bin/smsd simulate --out demo-out

check: setup
	$(VENV)/bin/smsd check --triton-interpret

bench: setup
	$(PY) benchmarks/run.py

lint: setup
	$(VENV)/bin/ruff check .

# Build a wheel and prove it installs and imports in a fresh virtual environment.
wheel: setup
	rm -rf dist
	$(PIP) wheel -q --no-build-isolation --no-deps -w dist .
	rm -rf build/wheel-venv
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/pip install -q $(TORCH) dist/smsd-*.whl
	cd build && wheel-venv/bin/python -c "import smsd, smsd._C, smsd.kernels; print(smsd.backends())"

clean:
	rm -rf build dist *.egg-info smsd/_C*.so .pytest_cache benchmarks/.benchmarks
