"""The hardened safetensors reader: each check on its own, with the message it gives."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save

from smsd.safe_files import (
    FLOAT_DTYPES,
    MAX_HEADER_BYTES,
    SafeFileError,
    count_non_finite,
    read_header,
    read_safetensors,
)

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


def raw_file(header: dict | str, data: bytes = b"") -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    return struct.pack("<Q", len(text.encode())) + text.encode() + data


def entry(dtype="F32", shape=(2,), begin=0, end=8) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def test_round_trip_of_every_float_dtype(tmp_path):
    tensors = {name: torch.randn(3, 5).to(dtype) for name, dtype in (
        ("a", torch.float64), ("b", torch.float32), ("c", torch.float16), ("d", torch.bfloat16))}
    tensors["empty"] = torch.empty(0, 4)
    path = tmp_path / "ok.safetensors"
    path.write_bytes(save(tensors, metadata={"format": "x"}))
    meta, loaded = read_safetensors(path, "file")
    assert meta == {"format": "x"} and sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


CASES = {
    "duplicate key": (f'{{"a": {json.dumps(entry())}, "a": {json.dumps(entry())}}}',
                      b"\0" * 8, "duplicate key 'a'"),
    "deep nesting": ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", b"", "bad header|nested"),
    "not an object": ("[1, 2]", b"", "not a JSON object"),
    "not utf-8": (b"\xff\xfe".decode("latin-1"), b"", "UTF-8|JSON"),
    "metadata not strings": ({"__metadata__": {"a": 1}}, b"", "malformed metadata"),
    "extra entry key": ({"a": {**entry(), "x": 1}}, b"\0" * 8, "malformed entry"),
    "bool shape": ({"a": entry(shape=(True, 2), end=8)}, b"\0" * 8, "malformed shape"),
    "float offsets": ({"a": {**entry(), "data_offsets": [0.0, 8.0]}}, b"\0" * 8,
                      "malformed data_offsets"),
    "reversed offsets": ({"a": entry(begin=8, end=0)}, b"\0" * 8, "malformed data_offsets"),
    "span != shape": ({"a": entry(shape=(3,))}, b"\0" * 8, "gives it 8 bytes"),
    "overlap": ({"a": entry(), "b": entry(begin=4, end=12)}, b"\0" * 12, "overlapping"),
    "gap": ({"a": entry(), "b": entry(begin=12, end=20)}, b"\0" * 20, "gapped"),
    "trailing bytes": ({"a": entry()}, b"\0" * 12, "trailing"),
    "truncated data": ({"a": entry()}, b"\0" * 5, "truncated"),
    "not allowed dtype": ({"a": entry(dtype="I32")}, b"\0" * 8, "dtype 'I32'"),
    "unknown dtype": ({"a": entry(dtype="F8_E4M3", end=2)}, b"\0" * 2, "dtype 'F8_E4M3'"),
    "nan": ({"a": entry()}, struct.pack("<ff", 1.0, float("nan")), "1 non-finite"),
    "inf": ({"a": entry(dtype="F64", end=16)}, struct.pack("<dd", float("inf"), -float("inf")),
            "2 non-finite"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_check(case, tmp_path):
    header, data, message = CASES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw_file(header, data))
    with pytest.raises(SafeFileError, match=message) as info:
        read_safetensors(path, "upload")
    assert str(info.value).startswith(f"upload {path} ")


def test_header_size_limit_is_checked_before_reading(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b" " * 64)
    with pytest.raises(SafeFileError, match="limit"):
        read_header(path, "upload")
    path.write_bytes(struct.pack("<Q", 64) + b"{}")
    with pytest.raises(SafeFileError, match="64-byte header in a 10-byte file"):
        read_header(path, "upload")


def test_missing_folder_and_unknown_allowed_dtype(tmp_path):
    with pytest.raises(SafeFileError, match="does not exist"):
        read_header(tmp_path / "nope", "upload")
    with pytest.raises(SafeFileError, match="is a folder"):
        read_header(tmp_path, "upload")
    with pytest.raises(ValueError, match="F7"):
        read_header(tmp_path / "nope", "upload", dtypes={"F7"})


def test_error_class_is_the_callers(tmp_path):
    class MyError(SafeFileError):
        pass

    path = tmp_path / "x"
    path.write_bytes(b"abc")
    with pytest.raises(MyError):
        read_safetensors(path, "upload", error=MyError)


SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, 65504.0, 1e300]


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    st.lists(st.one_of(st.sampled_from(SPECIALS), st.floats(allow_nan=True)), max_size=64),
)
def test_count_non_finite_matches_isfinite(dtype, values):
    tensor = torch.tensor(values, dtype=torch.float64).to(dtype)
    assert count_non_finite(tensor) == int((~torch.isfinite(tensor)).sum())
    assert count_non_finite(tensor[::2]) == int((~torch.isfinite(tensor[::2])).sum())


def test_count_non_finite_across_chunks(monkeypatch):
    import smsd.safe_files as sf

    monkeypatch.setattr(sf, "_CHECK_CHUNK", 7)
    tensor = torch.randn(10, 5).half()
    tensor[9, 4] = float("nan")
    tensor[0, 0] = float("inf")
    assert count_non_finite(tensor) == 2
    assert count_non_finite(torch.arange(5)) == 0
    assert set(FLOAT_DTYPES) == {"F64", "F32", "F16", "BF16"}


def test_integer_and_bool_tensors_when_allowed(tmp_path):
    from smsd.protocol.body_io import BodyFileError
    from smsd.protocol.body_io import read_safetensors as read_any

    tensors = {"step": torch.tensor([7], dtype=torch.int64), "rng": torch.arange(9).to(torch.uint8),
               "mask": torch.tensor([True, False, True]), "x": torch.randn(2, 3)}
    path = tmp_path / "state.safetensors"
    path.write_bytes(save(tensors))
    _, loaded = read_any(path, "checkpoint")
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    with pytest.raises(BodyFileError, match="dtype 'I64'"):
        read_any(path, "checkpoint", dtypes=FLOAT_DTYPES)
    data = bytearray(path.read_bytes())
    header_end = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    begin = json.loads(bytes(data[8:header_end]))["mask"]["data_offsets"][0]
    data[header_end + begin] = 2  # a bool byte that is neither 0 nor 1
    path.write_bytes(bytes(data))
    with pytest.raises(BodyFileError, match="other than 0/1"):
        read_any(path, "checkpoint")


def test_a_body_config_cannot_ask_for_a_bigger_model(tmp_path):
    """The config in a body file's metadata is bounded by the weights the file holds,
    so a lying config (depth 10**6, width 10**5) builds nothing."""
    from safetensors.torch import load_file, save_file

    from smsd.models import ViTBody, ViTConfig
    from smsd.protocol.body_io import BodyFileError, load_body, save_body

    config = ViTConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2)
    path = save_body(tmp_path / "b.safetensors", ViTBody(config), head_fingerprint="ab" * 32)
    assert load_body(path)[1] == config
    header = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    meta = header["__metadata__"]
    for lie in (dict(depth=10**6), dict(embed_dim=10**5, num_heads=1), dict(mlp_ratio=1e30),
                dict(depth=2), dict(embed_dim=16)):
        lying = {**meta, "model_config": config.replace(**lie).to_json()}
        bad = tmp_path / "lying.safetensors"
        save_file(load_file(str(path)), str(bad), metadata=lying)
        with pytest.raises(BodyFileError, match=f"{bad}.*(larger than|does not fit)"):
            load_body(bad)
