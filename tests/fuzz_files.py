"""Valid tiny files of every kind smsd reads from other sites, their loaders, the
byte-level corruptions the fuzz tests apply, an independent decoder that every accepted
file is compared with, and the hypothesis driver the fuzz tests share (used by pytest and
the atheris script)."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smsd.errors import SmsdError
from smsd.models import ClassifierTail, SplitViT, ViTBody, ViTConfig, load_pretrained
from smsd.models.pretrained import CheckpointError
from smsd.protocol.body_io import BodyFileError, load_body, save_body
from smsd.protocol.body_io import read_safetensors as read_any_dtype
from smsd.protocol.classifier_io import load_classifier, save_classifier
from smsd.protocol.shard import ShardError, read_shard, write_shard
from smsd.protocol.training import TokenClassifier
from smsd.safe_files import SafeFileError, read_safetensors

FINGERPRINT = "ab" * 32
CONFIG = ViTConfig(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2,
                   mlp_ratio=2.0)
# Cases per hypothesis test and loader (or file kind); the targets in tests/conftest.py
# (FUZZ_FAMILIES) assume the default.
EXAMPLES = int(os.environ.get("SMSD_FUZZ_EXAMPLES", "60"))


# ------------------------------------------------------------ independent decoder
# The safetensors format as smsd's reader documents it (smsd/safe_files.py), written
# again from the format with json, struct and numpy and without any of smsd's code, so
# that a reader which accepts a lying header is caught by comparing the two.
REFERENCE_DTYPES = {  # name: (numpy dtype of the bytes, torch dtype)
    "F64": ("<f8", torch.float64), "F32": ("<f4", torch.float32),
    "F16": ("<f2", torch.float16), "BF16": ("<u2", torch.bfloat16),
    "I64": ("<i8", torch.int64), "I32": ("<i4", torch.int32), "I16": ("<i2", torch.int16),
    "I8": ("i1", torch.int8), "U8": ("u1", torch.uint8), "BOOL": ("u1", torch.bool),
}
FLOATS = frozenset({"F64", "F32", "F16", "BF16"})


class NotValid(Exception):
    """The independent decoder's reason why a file is not a valid file."""


@dataclass(frozen=True)
class RefTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def torch(self) -> torch.Tensor:
        dtype = REFERENCE_DTYPES[self.dtype][1]
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(bytearray(self.data), dtype=dtype).reshape(self.shape)


@dataclass(frozen=True)
class Reference:
    metadata: dict[str, str]
    tensors: dict[str, RefTensor]


def _unique(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise NotValid(f"duplicate keys in {keys}")
    return dict(pairs)


def _non_negative_ints(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def reference_decode(data: bytes, dtypes: frozenset[str]) -> Reference:
    """Decode a safetensors file with ``dtypes`` allowed; :class:`NotValid` if it is not
    valid (header, spans, non-finite floats, bool bytes other than 0/1)."""
    if len(data) < 8:
        raise NotValid("shorter than the 8-byte header length")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise NotValid(f"header length {size} beyond the file")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"), object_pairs_hook=_unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise NotValid(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise NotValid("header is not an object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NotValid("metadata is not an object of strings")
    body = data[8 + size:]
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or sorted(entry) != ["data_offsets", "dtype", "shape"]:
            raise NotValid(f"entry {name!r} is not dtype/shape/data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in dtypes or dtype not in REFERENCE_DTYPES:
            raise NotValid(f"dtype {dtype!r} of {name!r}")
        if not _non_negative_ints(shape):
            raise NotValid(f"shape {shape!r} of {name!r}")
        if not _non_negative_ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise NotValid(f"data_offsets {offsets!r} of {name!r}")
        itemsize = np.dtype(REFERENCE_DTYPES[dtype][0]).itemsize
        if math.prod(shape) * itemsize != offsets[1] - offsets[0]:
            raise NotValid(f"{name!r}: shape {shape} {dtype} is not {offsets}")
        spans.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    tensors: dict[str, RefTensor] = {}
    end = 0
    for begin, stop, name, dtype, shape in sorted(spans):
        if begin != end:
            raise NotValid(f"{name!r} starts at {begin}, not {end}")
        end = stop
        raw = body[begin:stop]
        values = np.frombuffer(raw, dtype=REFERENCE_DTYPES[dtype][0])
        if dtype == "BF16":  # exponent bits all ones: NaN or ±inf
            bad = int(((values & 0x7F80) == 0x7F80).sum())
        elif dtype in FLOATS:
            bad = int((~np.isfinite(values)).sum())
        else:
            bad = int((values > 1).sum()) if dtype == "BOOL" else 0
        if bad:
            raise NotValid(f"{name!r} holds {bad} non-finite or non-0/1 values")
        tensors[name] = RefTensor(dtype, shape, raw)
    if end != len(body):
        raise NotValid(f"spans end at {end} of a {len(body)}-byte data section")
    return Reference(metadata, tensors)


def _bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *,
                        exact_dtype: bool) -> None:
    """Same names, shapes and bytes (``expected`` converted to the dtype of what was
    returned unless ``exact_dtype``: a model keeps its own parameter dtype)."""
    assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
    for name, tensor in got.items():
        want = expected[name]
        if exact_dtype:
            assert tensor.dtype == want.dtype, (name, tensor.dtype, want.dtype)
        want = want.to(tensor.dtype)
        assert tuple(tensor.shape) == tuple(want.shape), (name, tensor.shape, want.shape)
        assert _bytes(tensor) == _bytes(want), f"{name}: returned values differ from the file"


def _file_tensors(ref: Reference) -> dict[str, torch.Tensor]:
    return {name: t.torch() for name, t in ref.tensors.items()}


def _expect_generic(result, ref: Reference) -> None:
    metadata, tensors = result
    assert metadata == ref.metadata, (metadata, ref.metadata)
    assert_same_tensors(tensors, _file_tensors(ref), exact_dtype=True)


def _expect_shard(tokens, ref: Reference) -> None:
    assert_same_tensors({"tokens": tokens}, _file_tensors(ref), exact_dtype=True)


def _expect_body(result, ref: Reference) -> None:
    body, _, fingerprint = result
    assert fingerprint == ref.metadata["head_fingerprint"]
    assert_same_tensors(body.state_dict(), _file_tensors(ref), exact_dtype=False)


def _expect_classifier(result, ref: Reference) -> None:
    model, _, classes, fingerprint = result
    assert fingerprint == ref.metadata["head_fingerprint"]
    assert classes == json.loads(ref.metadata["classes"])
    assert_same_tensors(model.state_dict(), _file_tensors(ref), exact_dtype=False)


def _expect_pretrained(model: SplitViT, ref: Reference) -> None:
    """timm names → SplitViT names; a CLS position embedding is folded into the token."""
    file = _file_tensors(ref)
    state = model.state_dict()
    pos, cls = file["pos_embed"], file["cls_token"]
    expected = {"head.pos_embed": pos, "body.cls_token": cls}
    if pos.shape[1] == state["head.pos_embed"].shape[1] + 1:
        expected = {"head.pos_embed": pos[:, 1:], "body.cls_token": cls + pos[:, :1]}
    for name, tensor in file.items():
        if name.startswith("patch_embed."):
            expected["head." + name] = tensor
        elif name.startswith(("blocks.", "norm.")):
            expected["body." + name] = tensor
    assert_same_tensors(state, expected, exact_dtype=False)


@dataclass(frozen=True)
class Loader:
    name: str
    load: Callable[[Path], object]
    error: type[SmsdError]
    dtypes: frozenset[str]  # the safetensors dtypes this loader may accept
    expect: Callable[[object, Reference], None]  # what it returned vs the decoded file


ALL = frozenset(REFERENCE_DTYPES)
LOADERS = {
    "shard": Loader("shard", read_shard, ShardError, FLOATS, _expect_shard),
    "body": Loader("body", load_body, BodyFileError, frozenset({"F32"}), _expect_body),
    "classifier": Loader("classifier", load_classifier, BodyFileError, frozenset({"F32"}),
                         _expect_classifier),
    "pretrained": Loader("pretrained", lambda p: load_pretrained(p, num_heads=2),
                         CheckpointError, FLOATS, _expect_pretrained),
    "safetensors": Loader("safetensors", lambda p: read_safetensors(p, "file"), SafeFileError,
                          FLOATS, _expect_generic),
    # What other modules call: every dtype allowed (bool and integer state too).
    "any dtype": Loader("any dtype", lambda p: read_any_dtype(p, "file"), BodyFileError, ALL,
                        _expect_generic),
}


def assert_matches_reference(loader: Loader, data: bytes, result: object) -> None:
    """A file ``loader`` accepted must be valid to the independent decoder, and what the
    loader returned must be what that decoder reads from the file, byte for byte."""
    try:
        ref = reference_decode(data, loader.dtypes)
    except NotValid as exc:
        raise AssertionError(f"{loader.name} accepted a file that an independent decoder "
                             f"rejects: {exc}") from None
    try:
        loader.expect(result, ref)
    except (AssertionError, KeyError) as exc:
        raise AssertionError(f"{loader.name} returned other values than the file holds: "
                             f"{exc!r}") from None


# ------------------------------------------------------------------ hypothesis driver
def run_cases(name: str, part: str, strategy, body: Callable[[object], None],
              fuzz_count) -> None:
    """``body`` on ``EXAMPLES`` values of the hypothesis ``strategy``; the cases run are
    counted as ``hypothesis NAME (PART)`` (``tests/conftest.py`` enforces the targets)."""
    from datetime import timedelta

    import hypothesis

    ran = 0

    @hypothesis.settings(max_examples=EXAMPLES, database=None,
                         deadline=timedelta(seconds=10),  # a hang shows as a deadline error
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(strategy)
    def case(value) -> None:
        nonlocal ran
        ran += 1
        body(value)

    case()
    fuzz_count(f"hypothesis {name} ({part})", ran)


def _timm_state(model: SplitViT) -> dict[str, torch.Tensor]:
    state = {"cls_token": model.body.cls_token.detach(),
             "pos_embed": model.head.pos_embed.detach()}
    for name, tensor in model.state_dict().items():
        if name.startswith("head.patch_embed"):
            state[name[len("head."):]] = tensor
        elif name.startswith(("body.blocks", "body.norm")):
            state[name[len("body."):]] = tensor
    return {k: v.contiguous() for k, v in state.items()}


def make_valid_files(folder: Path) -> dict[str, Path]:
    """One valid tiny file per loader (deterministic)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"shard": write_shard(folder / "shard.safetensors", torch.randn(3, 4, 8),
                                  head_fingerprint=FINGERPRINT, grid=2)}
    files["body"] = save_body(folder / "body.safetensors", ViTBody(CONFIG),
                              head_fingerprint=FINGERPRINT)
    classifier = TokenClassifier(ViTBody(CONFIG), ClassifierTail(CONFIG.embed_dim, 2))
    files["classifier"] = save_classifier(folder / "classifier.safetensors", classifier,
                                          classes=["a", "b"], head_fingerprint=FINGERPRINT)
    files["pretrained"] = folder / "pretrained.safetensors"
    save_file(_timm_state(SplitViT(CONFIG)), str(files["pretrained"]))
    files["safetensors"] = files["body"]
    files["any dtype"] = folder / "state.safetensors"
    save_file({"step": torch.tensor([3]), "rng": torch.arange(16, dtype=torch.uint8),
               "mask": torch.tensor([True, False]), "x": torch.randn(4)}, str(files["any dtype"]))
    return files


# ------------------------------------------------------------------ corruptions
def split(data: bytes) -> tuple[dict, bytes]:
    """``(header, data section)`` of a valid file."""
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), data[8 + size:]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def set_field(data: bytes, tensor: int, field: str, value: object) -> bytes:
    """Rewrite one header field of one tensor (the header then lies about the data)."""
    header, body = split(data)
    names = tensor_names(header)
    header[names[tensor % len(names)]][field] = value
    return join(header, body)


def huge_shape(data: bytes, tensor: int, elements: int = 2**40) -> bytes:
    """Declare ``elements`` values for one tensor, with offsets that agree with the shape
    (a consistent lie only the file size contradicts)."""
    header, body = split(data)
    names = tensor_names(header)
    spec = header[names[tensor % len(names)]]
    itemsize = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1}[spec["dtype"]]
    spec["shape"] = [elements]
    spec["data_offsets"] = [spec["data_offsets"][0], spec["data_offsets"][0] + elements * itemsize]
    return join(header, body)


def poison(data: bytes, tensor: int, position: int, value: float) -> bytes:
    """Overwrite one value of one float tensor with ``value`` (NaN, ±inf)."""
    formats = {"F16": ("<e", 2), "F32": ("<f", 4), "F64": ("<d", 8)}
    header, body = split(data)
    names = [n for n in tensor_names(header) if header[n]["dtype"] in formats]
    spec = header[names[tensor % len(names)]]
    fmt, size = formats[spec["dtype"]]
    begin, end = spec["data_offsets"]
    if end == begin:
        return data
    at = begin + (position % ((end - begin) // size)) * size
    body = body[:at] + struct.pack(fmt, value) + body[at + size:]
    return join(header, body)


def flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, mask in flips:
        out[position % len(out)] ^= mask
    return bytes(out)


def set_header_size(data: bytes, size: int) -> bytes:
    return struct.pack("<Q", size) + data[8:]


def header_substitutions(data: bytes) -> Iterator[tuple[int, int]]:
    """``(position, byte)``: every digit of the header replaced by each other digit, and
    every character of a dtype name by each character dtype names use; the one-byte
    changes most likely to leave a header that parses but lies about the data."""
    size = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + size]
    dtype_chars = sorted({ord(c) for name in REFERENCE_DTYPES for c in name})
    seen: set[tuple[int, int]] = set()
    for match in re.finditer(rb'"dtype":\s*"([^"]*)"', header):
        for at in range(match.start(1), match.end(1)):
            seen.update((8 + at, c) for c in dtype_chars if c != header[at])
    for match in re.finditer(rb"[0-9]", header):
        at = match.start()
        seen.update((8 + at, c) for c in b"0123456789" if c != header[at])
    yield from sorted(seen)


def substitute(data: bytes, position: int, byte: int) -> bytes:
    return data[:position] + bytes([byte]) + data[position + 1:]
