"""One audit: the attacks of :mod:`.report` on a shard, or on a client the audit simulates.

The auditor plays the server. It knows the public model config and the head it believes
in; with the client's key (ground truth of the order) and the original images it can
also score how much leaked.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch

from ..crypto import PermutationKey
from ..models import PatchHead, ViTConfig, head_fingerprint, load_pretrained
from ..protocol.client import Client
from ..protocol.shard import inspect_shard, read_shard
from .inputs import AuditError
from .report import AuditRow, audit_tokens

__all__ = ["AuditRun", "attacker_head", "audit_shard", "audit_simulated_client"]


@dataclass
class AuditRun:
    rows: list[AuditRow]
    context: dict  # images, tokens_per_image, embed_dim, patch_values, noise_std, same head
    scored: bool  # the key was known: positions could be scored

    @property
    def same_head(self) -> bool:
        return bool(self.context["shard_head_is_server_head"])


def attacker_head(config: ViTConfig, checkpoint: str | PathLike | None = None) -> PatchHead:
    """The head the server believes in: a timm/DINO checkpoint, or the config's seeded one."""
    if checkpoint is None:
        return PatchHead(config).eval()
    return load_pretrained(checkpoint).head.eval()


def _run(tokens: torch.Tensor, head: PatchHead, shard_fingerprint: str, *,
         key: PermutationKey | None, images: torch.Tensor | None, ids, noise_std: float | None,
         pixel_range: tuple[float, float], refine_steps: int) -> AuditRun:
    config = head.config
    truth = None
    if key is not None:
        truth = key.permutations(ids if ids is not None else range(len(tokens)),
                                 config.n_tokens)
    rows = audit_tokens(tokens, head, truth=truth, originals=images,
                        pixel_range=pixel_range, refine_steps=refine_steps)
    context = {"images": len(tokens), "tokens_per_image": config.n_tokens,
               "embed_dim": config.embed_dim,
               "patch_values": head.patch_embed.proj.weight[0].numel(),
               "noise_std": noise_std,
               "shard_head_is_server_head": shard_fingerprint == head_fingerprint(head)}
    return AuditRun(rows, context, truth is not None)


def audit_shard(shard: str | PathLike, head: PatchHead, *, key: PermutationKey | None = None,
                images: torch.Tensor | None = None, ids=None, limit: int | None = None,
                pixel_range: tuple[float, float] = (-1.0, 1.0),
                refine_steps: int = 3) -> AuditRun:
    """Attack an existing shard (its first ``limit`` images); ``key`` and ``images`` (with
    their ``ids``) give the ground truth."""
    config = head.config
    tokens = read_shard(shard, grid=config.grid, embed_dim=config.embed_dim)
    if limit is not None:
        tokens = tokens[:limit]
    if images is not None and len(images) != len(tokens):
        raise AuditError(f"--images has {len(images)} images, the shard {len(tokens)} "
                         "(use --limit to audit the first N of both)")
    return _run(tokens, head, inspect_shard(shard).head_fingerprint, key=key, images=images,
                ids=ids, noise_std=None, pixel_range=pixel_range, refine_steps=refine_steps)


def audit_simulated_client(images: torch.Tensor, head: PatchHead, *, ids=None,
                           noise_std: float = 0.0, client_head_seed: int | None = None,
                           pixel_range: tuple[float, float] = (-1.0, 1.0),
                           refine_steps: int = 3) -> AuditRun:
    """Play the client: encode ``images`` with a fresh key (with ``noise_std`` and, to
    measure a secret head, ``client_head_seed``), then attack that shard."""
    config = head.config
    key = PermutationKey.generate()
    client_config = config if client_head_seed is None \
        else config.replace(head_seed=client_head_seed)
    client = Client(client_config, key, noise_std=noise_std)
    with tempfile.TemporaryDirectory(prefix="smsd-audit-") as tmp:
        tokens = read_shard(client.encode(images, Path(tmp) / "shard.safetensors",
                                          image_ids=ids))
    return _run(tokens, head, client.fingerprint, key=key, images=images, ids=ids,
                noise_std=noise_std, pixel_range=pixel_range, refine_steps=refine_steps)
