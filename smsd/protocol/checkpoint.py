"""Pre-training checkpoints: safetensors files that survive being killed at any moment.

A checkpoint holds tensors (models, optimizer state, DINO center, RNG states, the epoch's
image order) and a JSON ``state`` (format and version, data position, configs, history):
never pickle, so a checkpoint cannot run code. Each file is written atomically
(:func:`smsd.io.write_with`: temporary file, fsync, rename) as
``checkpoint-<iteration>.safetensors``; the one before it is kept, so when the newest is
unreadable (bad disk, a byte flipped) resuming falls back to the previous one with a
warning. A SHA-256 of the tensors catches corruption that still parses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import SmsdError
from ..io import write_with
from .body_io import read_safetensors

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CheckpointError", "checkpoint_paths",
           "load_checkpoint", "load_latest_checkpoint", "load_optimizer",
           "optimizer_tensors", "save_checkpoint"]

CHECKPOINT_FORMAT = "smsd-pretrain-checkpoint"
CHECKPOINT_VERSION = "1"
_NAME = re.compile(r"checkpoint-(\d+)\.safetensors")


class CheckpointError(SmsdError, ValueError):
    """A checkpoint is missing, unreadable, or for another run."""


def checkpoint_paths(work: Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the checkpoints in ``work``, newest first."""
    if not work.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in work.iterdir()
             if (m := _NAME.fullmatch(p.name)) is not None]
    return sorted(found, reverse=True)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_checkpoint(work: Path, iteration: int, tensors: dict[str, torch.Tensor],
                    state: dict[str, Any]) -> Path:
    """Write ``checkpoint-<iteration>.safetensors`` atomically; keep it and the newest older
    one, delete the rest (newer ones are a future abandoned by a resume)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "state": json.dumps(state), "sha256": _digest(tensors)}
    path = work / f"checkpoint-{iteration:09d}.safetensors"
    write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    older = [p for it, p in checkpoint_paths(work) if it < iteration]
    for it, stale in checkpoint_paths(work):
        if it > iteration or (it < iteration and stale != older[0]):
            stale.unlink(missing_ok=True)
    for leftover in work.glob(".checkpoint-*.tmp*"):  # temp files of a killed writer
        with contextlib.suppress(OSError):
            leftover.unlink()
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(state, tensors)`` of one checkpoint, checked (format, version, checksum)."""
    try:
        meta, tensors = read_safetensors(path, "checkpoint")
    except SmsdError as exc:
        raise CheckpointError(str(exc)) from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a smsd pretraining checkpoint "
                              f"(format {meta.get('format')!r})")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')!r}; "
                              f"this smsd reads version {CHECKPOINT_VERSION}")
    if meta.get("sha256") != _digest(tensors):
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensors do not match their "
                              "checksum")
    try:
        state = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has a bad state record: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} has a bad state record")
    return state, tensors


def load_latest_checkpoint(work: Path) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """The newest readable checkpoint in ``work``; an unreadable newer one is skipped with
    a warning naming it."""
    found = checkpoint_paths(work)
    if not found:
        raise CheckpointError(f"no checkpoint (checkpoint-*.safetensors) in {work}")
    problems = []
    for _, path in found:
        try:
            state, tensors = load_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            warnings.warn(f"skipping unreadable checkpoint {path}: {exc}", stacklevel=2)
            continue
        return path, state, tensors
    raise CheckpointError(f"no readable checkpoint in {work}: " + "; ".join(problems))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor],
                                                                  dict[str, Any]]:
    """An optimizer's state dict as tensors ``optimizer/<param>/<name>`` plus a JSON part
    (param groups, non-tensor state)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, param_state in sd["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value
            else:
                scalars[f"{index}/{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   record: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    template = optimizer.state_dict()["param_groups"]
    groups = record["param_groups"]
    if len(groups) != len(template):
        raise CheckpointError(f"checkpoint has {len(groups)} optimizer param groups, "
                              f"the model {len(template)}")
    for group, like in zip(groups, template, strict=True):
        for key, value in like.items():  # JSON made tuples (betas) into lists
            if isinstance(value, tuple) and key in group:
                group[key] = tuple(group[key])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            index, name = key.removeprefix("optimizer/").split("/", 1)
            state.setdefault(int(index), {})[name] = value
    for key, value in record.get("scalars", {}).items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
