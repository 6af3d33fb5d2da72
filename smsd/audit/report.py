"""Run every attack on one shard and tabulate what leaked."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

from ..models import PatchHead
from .attacks import reconstruct, unshuffle_known_head, unshuffle_known_positions
from .metrics import position_accuracy, psnr, ssim

__all__ = ["AuditRow", "audit_tokens", "format_table", "to_json"]


@dataclass(frozen=True)
class AuditRow:
    """One attack's result; a metric is ``None`` where the auditor gave no ground truth or
    the attack cannot produce it (no head weights, no pixels)."""

    attack: str
    server_knows: str
    positions_correct: float | None
    psnr_db: float | None
    ssim: float | None


def _chance_positions(n: int, n_pos: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n_pos, generator=gen) for _ in range(n)])


def audit_tokens(tokens: torch.Tensor, head: PatchHead, *, truth: torch.Tensor | None = None,
                 originals: torch.Tensor | None = None,
                 pixel_range: tuple[float, float] = (-1.0, 1.0), refine_steps: int = 3,
                 seed: int = 0) -> list[AuditRow]:
    """Attack ``tokens`` ``[n, N, D]`` (a shard, slots in secret order) with ``head`` (what
    the server believes the head is).

    ``truth`` ``[n, N]``: each slot's true patch position (from the client's key);
    ``originals`` ``[n, C, H, W]``: the encoded images. Rows: chance (a random order),
    the known-head attack with inversion, the known-position attacks (no ``W``), and the
    inversion at the true order (the ceiling of any un-shuffling attack).
    """
    n, n_pos, _ = tokens.shape
    if truth is not None and tuple(truth.shape) != (n, n_pos):
        raise ValueError(f"truth must have shape [{n}, {n_pos}], got {list(truth.shape)}")
    if originals is not None and originals.shape[0] != n:
        raise ValueError(f"originals has {originals.shape[0]} images, the shard {n}")
    data_range = pixel_range[1] - pixel_range[0]

    def row(attack: str, knows: str, guess: torch.Tensor, invert: bool) -> AuditRow:
        acc = position_accuracy(guess, truth) if truth is not None else None
        quality: tuple[float | None, float | None] = (None, None)
        if invert and originals is not None:
            images = reconstruct(tokens, guess, head, pixel_range).to(originals.dtype)
            quality = (psnr(images, originals, data_range), ssim(images, originals, data_range))
        return AuditRow(attack, knows, acc, *quality)

    patch_dim = head.patch_embed.proj.weight[0].numel()
    pos = head.pos_embed.detach()[0]
    rows = [
        row("chance (random order)", "nothing", _chance_positions(n, n_pos, seed), True),
        row("known head + inversion", "head weights",
            unshuffle_known_head(tokens, head, pixel_range), True),
        row("nearest position", "position embedding",
            unshuffle_known_positions(tokens, pos, patch_dim), False),
    ]
    if refine_steps:
        rows.append(row(f"nearest position + {refine_steps} refits", "position embedding",
                        unshuffle_known_positions(tokens, pos, patch_dim, refine_steps), False))
    if truth is not None:
        rows.append(row("inversion at the true order", "head weights + key", truth, True))
    return rows


def _cell(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "—" if value is None or math.isnan(value) else f"{value * scale:.{digits}f}"


def format_table(rows: list[AuditRow]) -> str:
    """A Markdown table: positions correct (%), PSNR (dB) and SSIM of each attack."""
    lines = ["| attack | server knows | positions correct % | PSNR dB | SSIM |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {r.attack} | {r.server_knows} | {_cell(r.positions_correct, 100)} | "
              f"{_cell(r.psnr_db)} | {_cell(r.ssim, digits=3)} |" for r in rows]
    return "\n".join(lines)


def to_json(rows: list[AuditRow], **context: object) -> str:
    return json.dumps({**context, "rows": [asdict(r) for r in rows]}, indent=2)
