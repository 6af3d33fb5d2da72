"""Hostile and broken files: every loader of a file from another site ends in its own
``SmsdError`` naming the file, never another exception, a hang or a large allocation; a
file it accepts must be valid to an independent decoder (``fuzz_files.reference_decode``)
and what it returns must be what that decoder reads, byte for byte.

Property tests (hypothesis) corrupt valid tiny files of every kind; the number of cases
run is printed in the "fuzz cases run" section at the end of the test output, and
``make test`` fails when a family runs fewer than its target (``tests/conftest.py``).
``SMSD_FUZZ_EXAMPLES`` sets the cases per loader and corruption (default 60).
"""

from __future__ import annotations

import math
import struct

import pytest
from fuzz_files import (
    LOADERS,
    assert_matches_reference,
    flip,
    header_substitutions,
    huge_shape,
    join,
    make_valid_files,
    poison,
    run_cases,
    set_field,
    set_header_size,
    split,
    substitute,
)

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

# The generic readers accept any well-formed safetensors file, so a consistent lie
# (a reshaped tensor, a different float dtype) can be valid for them.
STRICT = ("shard", "body", "classifier", "pretrained")


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, bytes]:
    files = make_valid_files(tmp_path_factory.mktemp("valid"))
    return {name: path.read_bytes() for name, path in files.items()}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "input.safetensors"


def check(loader_name: str, path, data: bytes, *, must_fail: bool = False) -> None:
    """Load ``data`` from ``path``: the loader's own error (naming the file), or, unless
    ``must_fail``, success with exactly what the independent decoder reads from the file
    (a file the decoder rejects must fail)."""
    loader = LOADERS[loader_name]
    path.write_bytes(data)
    try:
        result = loader.load(path)
    except loader.error as exc:
        assert str(path) in str(exc), f"{loader_name}: message does not name the file: {exc}"
        return
    assert not must_fail, f"{loader_name} accepted a broken file"
    assert_matches_reference(loader, data, result)


def test_valid_files_load(valid, target):
    for name in LOADERS:
        check(name, target, valid[name], must_fail=False)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_truncated_files(loader, valid, target, fuzz_count):
    data = valid[loader]
    run_cases("truncated", loader, st.integers(0, len(data) - 1),
              lambda cut: check(loader, target, data[:cut], must_fail=True), fuzz_count)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_flipped_bytes(loader, valid, target, fuzz_count):
    """1-8 flipped bytes, half of the positions in the header: the loader's own error
    unless the flipped file is still valid to the independent decoder (a flip in a float
    payload, a metadata string, a tensor name), and then exactly what that decoder reads."""
    data = valid[loader]
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    positions = st.integers(0, header_end - 1) | st.integers(0, len(data) - 1)
    flips = st.lists(st.tuples(positions, st.integers(1, 255)), min_size=1, max_size=8)
    run_cases("flipped bytes", loader, flips,
              lambda f: check(loader, target, flip(data, f)), fuzz_count)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_flipped_header_bytes_exhaustive(loader, valid, target, fuzz_count):
    """Every one-byte change of a digit or a dtype character in the header, exhaustively
    (``F32`` → ``I32``, a shape or offset digit): these leave headers that parse, so the
    loader must refuse each one the independent decoder finds invalid and return exactly
    the decoded file for the rest."""
    data = valid[loader]
    cases = list(header_substitutions(data))
    for position, byte in cases:
        try:
            check(loader, target, substitute(data, position, byte))
        except AssertionError as exc:
            raise AssertionError(f"header byte {position} {chr(data[position])!r} → "
                                 f"{chr(byte)!r}: {exc}") from None
    fuzz_count(f"exhaustive flipped header bytes ({loader})", len(cases))


@pytest.mark.parametrize("loader", list(LOADERS))
def test_lying_header_size(loader, valid, target, fuzz_count):
    data = valid[loader]
    real = struct.unpack("<Q", data[:8])[0]
    sizes = st.one_of(st.integers(0, 2**64 - 1), st.integers(0, len(data) + 64))
    run_cases("lying header size", loader, sizes.filter(lambda s: s != real),
              lambda s: check(loader, target, set_header_size(data, s), must_fail=True),
              fuzz_count)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
FIELD_VALUES = {
    "dtype": st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL",
                              "F8_E4M3", "U64", "C64", "", "f32"]) | JSON_VALUES,
    "shape": st.lists(st.integers(-2, 2**40), max_size=4) | JSON_VALUES,
    "data_offsets": st.lists(st.integers(-2, 2**63), min_size=2, max_size=2) | JSON_VALUES,
}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("field", list(FIELD_VALUES))
def test_lying_tensor_entries(loader, field, valid, target, fuzz_count):
    data = valid[loader]

    def body(args) -> None:
        tensor, value = args
        changed = set_field(data, tensor, field, value)
        must_fail = split(changed)[0] != split(data)[0] and loader in STRICT
        check(loader, target, changed, must_fail=must_fail)

    run_cases(f"lying {field}", loader, st.tuples(st.integers(0, 64), FIELD_VALUES[field]),
              body, fuzz_count)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_huge_declared_shapes_allocate_nothing(loader, valid, target, fuzz_count):
    data = valid[loader]
    # 2**40 elements would be 2-8 TiB: any attempt to allocate fails with a non-smsd error.
    run_cases("huge shape", loader,
              st.tuples(st.integers(0, 64), st.integers(2**20, 2**48)),
              lambda a: check(loader, target, huge_shape(data, *a), must_fail=True), fuzz_count)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_non_finite_payloads(loader, valid, target, fuzz_count):
    data = valid[loader]
    args = st.tuples(st.integers(0, 64), st.integers(0, 2**16),
                     st.sampled_from([math.nan, math.inf, -math.inf]))
    run_cases("nan/inf payload", loader, args,
              lambda a: check(loader, target, poison(data, *a), must_fail=True), fuzz_count)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_arbitrary_headers(loader, valid, target, fuzz_count):
    _, payload = split(valid[loader])
    headers = st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=6)

    def body(args) -> None:
        header, cut = args
        check(loader, target, join(header, payload[:cut]), must_fail=loader in STRICT)

    run_cases("arbitrary header", loader, st.tuples(headers, st.integers(0, len(payload))),
              body, fuzz_count)


@pytest.mark.parametrize("loader", list(LOADERS))
def test_random_bytes(loader, target, fuzz_count):
    run_cases("random bytes", loader, st.binary(max_size=512),
              lambda b: check(loader, target, b, must_fail=True), fuzz_count)


@pytest.mark.parametrize("loader", ["shard", "body", "classifier"])
def test_wrong_dtype_and_metadata(loader, valid, target, fuzz_count):
    """Consistent files with another dtype, or metadata fields added, dropped or changed."""
    import torch
    from safetensors.torch import load, save

    header, _ = split(valid[loader])
    meta = header["__metadata__"]
    tensors = load(valid[loader])
    dtypes = st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16,
                              torch.int32, torch.uint8, torch.bool])
    metas = st.dictionaries(st.sampled_from([*sorted(meta), "extra", "key"]), st.text(max_size=8),
                            max_size=len(meta) + 1)

    def body(args) -> None:
        dtype, changes, drop = args
        new_meta = {k: v for k, v in {**meta, **changes}.items() if k != drop}
        converted = {k: v.to(dtype) for k, v in tensors.items()}
        written = save(converted, metadata=new_meta)
        original_dtype = next(iter(tensors.values())).dtype
        unchanged = new_meta == meta and dtype == original_dtype
        check(loader, target, written, must_fail=not unchanged)

    run_cases("dtype/metadata", loader,
              st.tuples(dtypes, metas, st.sampled_from([None, *sorted(meta)])), body, fuzz_count)
