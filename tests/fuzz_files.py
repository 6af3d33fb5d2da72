"""Valid tiny files of every kind smsd reads from other sites, their loaders, and the
byte-level corruptions the fuzz tests apply (shared by pytest and the atheris script)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class Loader:
    name: str
    load: Callable[[Path], object]
    error: type[SmsdError]


LOADERS = {
    "shard": Loader("shard", read_shard, ShardError),
    "body": Loader("body", load_body, BodyFileError),
    "classifier": Loader("classifier", load_classifier, BodyFileError),
    "pretrained": Loader("pretrained", lambda p: load_pretrained(p, num_heads=2), CheckpointError),
    "safetensors": Loader("safetensors", lambda p: read_safetensors(p, "file"), SafeFileError),
    # What other modules call: every dtype allowed (bool and integer state too).
    "any dtype": Loader("any dtype", lambda p: read_any_dtype(p, "file"), BodyFileError),
}


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
