"""Coverage-guided fuzzing (atheris/libFuzzer) of every loader of a file from another site.

    python tests/atheris_loaders.py CORPUS_DIR -runs=2000 -timeout=20

The first byte of an input picks the loader, the rest is the file. An empty corpus is
seeded with one valid file per loader, which libFuzzer then mutates. Any exception but
the loader's own ``SmsdError`` is a crash (non-zero exit, input saved as ``crash-*``
under ``-artifact_prefix``), and so is a file the loader accepts that an independent
decoder rejects or reads differently (``fuzz_files.assert_matches_reference``);
the address space is capped so that a header lying about a huge tensor cannot be
allocated quietly, and ``-timeout`` catches hangs. ``tests/test_fuzz_loaders_atheris.py``
runs this in a subprocess and reports the run count.
"""

from __future__ import annotations

import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import atheris
import numpy  # noqa: F401  (imported before instrumentation: only smsd is instrumented)
import safetensors  # noqa: F401
import torch  # noqa: F401

with atheris.instrument_imports(include=["smsd", "fuzz_files"]):
    from fuzz_files import LOADERS, assert_matches_reference, make_valid_files

NAMES = sorted(LOADERS)
SCRATCH = Path(tempfile.mkdtemp(prefix="smsd-atheris-"))
TARGET = SCRATCH / "input.safetensors"
# Headroom over what the process maps already; a tensor a lying header declares
# (2**40 elements) is far larger, so an attempt shows as a MemoryError crash.
EXTRA_ADDRESS_SPACE = 2 * 1024**3


def _mapped_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def test_one_input(data: bytes) -> None:
    if not data:
        return
    loader = LOADERS[NAMES[data[0] % len(NAMES)]]
    TARGET.write_bytes(data[1:])
    try:
        result = loader.load(TARGET)
    except loader.error as exc:
        if str(TARGET) not in str(exc):
            raise AssertionError(f"{loader.name}: message does not name the file: {exc}") from exc
        return
    assert_matches_reference(loader, data[1:], result)


def _seed(corpus: Path) -> None:
    if corpus.is_dir() and any(corpus.iterdir()):
        return
    corpus.mkdir(parents=True, exist_ok=True)
    files = make_valid_files(SCRATCH / "valid")
    for i, name in enumerate(NAMES):
        (corpus / f"seed-{name}").write_bytes(bytes([i]) + files[name].read_bytes())


def main() -> None:
    corpora = [a for a in sys.argv[1:] if not a.startswith("-")]
    for corpus in corpora:
        _seed(Path(corpus))
    if sys.platform.startswith("linux"):
        limit = _mapped_bytes() + EXTRA_ADDRESS_SPACE
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
