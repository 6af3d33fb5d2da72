#!/usr/bin/env bash
# Build one smsd wheel per torch version into dist/ (or $DIST), each from a clean copy of
# the tree in its own fresh venv with that torch, so no object compiled against another
# torch is reused:   scripts/build_wheels.sh 2.13.0 2.14.1
# Each wheel is named for its torch: smsd-0.1.0+torch2.13-...whl requires torch==2.13.*.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DIST=$(mkdir -p "${DIST:-dist}" && cd "${DIST:-dist}" && pwd)
WORK=build/wheels
[ $# -gt 0 ] || { echo "usage: $0 TORCH_VERSION..." >&2; exit 2; }

quiet() {  # pip's output only when it fails
  local log; log=$(mktemp)
  "$@" >"$log" 2>&1 || { cat "$log"; rm -f "$log"; return 1; }
  rm -f "$log"
}

for torch_version in "$@"; do
  start=$(date +%s)
  echo "== smsd wheel for torch $torch_version"
  rm -rf "$WORK" && mkdir -p "$WORK/src"
  # Tracked and new files only: no build/, .venv, compiled extension or build info.
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done |
    xargs -0 cp --parents -t "$WORK/src"
  "$PYTHON" -m venv "$WORK/venv"
  quiet "$WORK/venv/bin/pip" install -q --upgrade pip setuptools wheel
  quiet "$WORK/venv/bin/pip" install -q "torch==$torch_version" ninja
  (cd "$WORK/src" && quiet ../venv/bin/pip wheel -q --no-build-isolation --no-deps -w ../dist .)
  # The wheel installs beside its torch (its torch==X.Y.* is met) and smsd._C loads there.
  quiet "$WORK/venv/bin/pip" install -q "$WORK"/dist/smsd-*.whl
  (cd "$WORK" && venv/bin/python -c "import smsd, smsd._C; cpp = smsd.backends()['cpp']; \
    assert cpp.available, cpp; print('  ', smsd._C.__file__.split('/')[-1], cpp.detail)")
  mv "$WORK"/dist/smsd-*.whl "$DIST"/
  rm -rf "$WORK"  # a CUDA build of torch makes the venv several GB
  echo "   built in $(( $(date +%s) - start )) s"
done
ls -l "$DIST"
