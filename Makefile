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

.PHONY: setup test test-numerics audit-quick mutants mutants-fast demo bench check lint wheel wheels wheel-mismatch clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP) install -q $(TORCH) $(TRITON) ninja
	$(PIP) install -q --no-build-isolation -e '.[test,dali,flower]'
	touch $(STAMP)

setup: $(STAMP)

# A backend that failed to build, a fuzz engine that is missing or a fuzz family that ran
# fewer cases than its target (tests/conftest.py) fails the run instead of being skipped.
test: setup
	SMSD_REQUIRE_BACKENDS=triton,cpp,torch SMSD_REQUIRE_FUZZ=1 $(PY) -m pytest -q tests

# The accuracy tests and `smsd check` again under the numerics of other CPUs, since fp32
# results depend on which kernels a CPU gets: (1) an AVX2-only CPU such as AMD EPYC
# (smsd's AVX2 row loops, torch's AVX2 kernels, MKL's AVX2 code path); (2) the portable
# build on one thread with MKL's conditional numerical reproducibility mode and torch's
# default kernels. Forcing torch below this CPU's ISA makes its oneDNN bf16 paths crash
# (they ask the CPU, not the cap); a CPU without AVX-512 never takes them, so oneDNN is
# off here too (as tests/conftest.py does).
ACCURACY_TESTS := tests/test_attention.py tests/test_dino_loss.py \
	tests/test_fused_linear_dino_loss.py tests/test_masked_sample.py tests/test_sample_views.py \
	tests/test_attention_module.py tests/test_dino_loss_module.py tests/test_testing.py
NUMERIC_ENVS := "SMSD_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2" \
	"SMSD_CPU_ISA=baseline ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1"
CHECK_WITHOUT_ONEDNN := import torch; torch.backends.mkldnn.enabled = False; \
	from smsd.cli import main; raise SystemExit(main(['check', '--triton-interpret']))

test-numerics: setup
	@for e in $(NUMERIC_ENVS); do \
	  echo "== numeric environment: $$e"; \
	  env $$e SMSD_REQUIRE_BACKENDS=triton,cpp,torch $(PY) -m pytest -q $(ACCURACY_TESTS) || exit 1; \
	  out=$$(env $$e $(PY) -c "$(CHECK_WITHOUT_ONEDNN)") || { echo "$$out"; exit 1; }; \
	  echo "$$out" | tail -n 1; \
	done

# Planted bugs the suite must kill (tests/mutants/catalog.py; docs/testing.md): each is
# applied to a copy of the tree and its tests run there; fails unless every one is killed.
mutants: setup
	$(PY) tests/mutants/run.py

mutants-fast: setup
	$(PY) tests/mutants/run.py --fast

demo: setup
	$(VENV)/bin/smsd simulate --out demo-out

# The privacy audit's quick form (CI, ~2 min): fails if an attack stops breaking a defence
# it is known to break. The full audit: smsd audit --images digits --out DIR (docs/privacy.md).
audit-quick: setup
	$(VENV)/bin/smsd audit --images digits --quick --out audit-quick-out

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
	cd build && wheel-venv/bin/python -c "import smsd, smsd._C, smsd.kernels, torch; \
	  from smsd._build_info import TORCH_VERSION; assert TORCH_VERSION == torch.__version__; \
	  report = smsd.backends(); print(report); assert report['cpp'].available, report['cpp']"

# One wheel per torch version, each built in its own fresh venv with that torch, into dist/:
#   make wheels TORCHES="2.13.0 2.14.1"
TORCHES ?= 2.13.0
wheels:
	PYTHON=$(PYTHON) scripts/build_wheels.sh $(TORCHES)

# The wheel from `make wheel` (built for torch 2.13) installed beside another torch minor:
# backends() must say cpp needs a rebuild while torch and triton run. About a minute and
# 5.5 GB of disk while it runs (torch 2.14.1 is a CUDA build, from local disk here).
MISMATCH_TORCH ?= 2.14.1
wheel-mismatch: wheel
	PYTHON=$(PYTHON) scripts/check_wheel_torch_mismatch.sh dist/smsd-*.whl $(MISMATCH_TORCH)

clean:
	rm -rf build dist *.egg-info smsd/_C*.so smsd/_build_info.py .pytest_cache benchmarks/.benchmarks
