#!/usr/bin/env bash
# A wheel knows its torch: install a wheel built for one torch minor beside another one
# in a fresh venv, and check that smsd.backends() says cpp needs a rebuild while the
# torch and triton backends still run.
#   scripts/check_wheel_torch_mismatch.sh WHEEL [TORCH_VERSION]    (default 2.14.1)
# On x86_64 here torch 2.14.1 is a CUDA build served from local disk (its nvidia
# libraries included: about 5.5 GB in the venv, which is removed afterwards; it runs
# on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 WHEEL [TORCH_VERSION]" >&2; exit 2; }
WHEEL=$(realpath "$1")
TORCH_VERSION=${2:-2.14.1}
PYTHON=${PYTHON:-python3}
VENV=$PWD/build/mismatch-venv
trap 'rm -rf "$VENV"' EXIT  # several GB
start=$(date +%s)

quiet() {  # pip's output only when it fails
  local log; log=$(mktemp)
  "$@" >"$log" 2>&1 || { cat "$log"; rm -f "$log"; return 1; }
  rm -f "$log"
}

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
quiet "$VENV/bin/pip" install -q --upgrade pip
quiet "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" triton numpy safetensors tqdm
# --no-deps: the wheel requires the torch it was built for and would replace this one.
quiet "$VENV/bin/pip" install -q --no-deps "$WHEEL"
installed=$(( $(date +%s) - start ))
size_mb=$(du -sm "$VENV" | cut -f1)

# pip sees the mismatch from the wheel's metadata alone.
if check=$("$VENV/bin/pip" check 2>&1); then
  echo "pip check passed, but the wheel should require another torch:"; echo "$check"; exit 1
fi
echo "$check" | grep -E "^smsd .*torch==[0-9.]+\*.*you have torch $TORCH_VERSION" \
  || { echo "unexpected pip check output:"; echo "$check"; exit 1; }

# Whether smsd._C itself loads is only reported: a subprocess, since it may crash.
cd build
if load=$(env -u PYTHONPATH "$VENV/bin/python" -c "import smsd._C" 2>&1); then
  echo "note: smsd._C loads beside torch $TORCH_VERSION (backends() still refuses it)"
else
  echo "smsd._C fails to load beside torch $TORCH_VERSION: $(echo "$load" | tail -n 1)"
fi

env -u PYTHONPATH TRITON_INTERPRET=1 "$VENV/bin/python" - <<'EOF'
import importlib.metadata
import os
import sys

import torch

import smsd
from smsd._build_info import TORCH_VERSION as built
from smsd.bench.cpu_info import cpu_info

assert os.path.dirname(smsd.__file__).endswith("site-packages/smsd"), smsd.__file__
minor = ".".join(built.split(".")[:2])
assert not torch.__version__.startswith(minor + "."), (built, torch.__version__)
assert importlib.metadata.version("smsd").endswith(f"+torch{minor}")

report = smsd.backends()
print(report)
cpp = report["cpp"]
assert not cpp.available
assert cpp.detail.startswith(f"built for torch {built}, running {torch.__version__}: rebuild")
assert report["torch"].available and report["triton"].available

x = torch.randn(2, 5, 3)
index = torch.tensor([[4, 0], [1, 1]])
want = torch.stack([x[0, [4, 0]], x[1, [1, 1]]])
for name in ("torch", "triton", "auto"):
    with smsd.use_backend(name):
        assert torch.equal(smsd.ops.masked_sample(x, index), want), name
with smsd.use_backend("cpp"):
    try:
        smsd.ops.masked_sample(x, index)
    except smsd.BackendUnavailableError as exc:
        assert "rebuild" in str(exc)
    else:
        raise AssertionError("the cpp backend ran with an extension built for another torch")
assert cpu_info()["smsd_row_loops"].startswith("unavailable (built for")
assert "smsd._C" not in sys.modules, "an extension built for another torch was loaded"
print(f"ok: smsd {importlib.metadata.version('smsd')} beside torch {torch.__version__}")
EOF
echo "wheel-mismatch: passed in $(( $(date +%s) - start )) s" \
  "(venv set up in $installed s, $size_mb MB)"
