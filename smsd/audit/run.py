"""Audit an existing shard: the attacks that apply to what the server has.

The auditor plays the server. It knows the public model config and the head it believes
in; with public images of the same kind the prior-aware, blind and learned attacks run
too; with the client's key (ground truth of the order) and the original images it can
score how much leaked.
"""

from __future__ import annotations

import time
from os import PathLike

import torch

from ..crypto import PermutationKey
from ..models import PatchHead, ViTConfig, head_fingerprint, load_pretrained
from ..protocol.shard import inspect_shard, read_shard
from .catalog import ATTACKS
from .inputs import AuditError
from .knowledge import Attempt, Knowledge
from .plan import AuditPlan
from .references import mean_image
from .report import AuditReport, AuditRow, verdict
from .suite import _Scorer, attack_names

__all__ = ["attacker_head", "audit_shard"]

_NEEDS_PUBLIC = {"prior + linear MMSE", "blind", "inverse network"}


def attacker_head(config: ViTConfig, checkpoint: str | PathLike | None = None) -> PatchHead:
    """The head the server believes in: a timm/DINO checkpoint, or the config's seeded one."""
    if checkpoint is None:
        return PatchHead(config).eval()
    return load_pretrained(checkpoint).head.eval()


def audit_shard(shard: str | PathLike, head: PatchHead, *, key: PermutationKey | None = None,
                images: torch.Tensor | None = None, ids=None,
                public: torch.Tensor | None = None, public_labels: torch.Tensor | None = None,
                limit: int | None = None, noise_std: float = 0.0,
                pixel_range: tuple[float, float] = (-1.0, 1.0),
                plan: AuditPlan | None = None) -> AuditReport:
    """Attack a shard (its first ``limit`` images) with ``head``; ``public`` images enable
    the attacks that learn from them; ``key`` and ``images`` (with their ``ids``) score it.
    ``noise_std``: the noise the client added (the attacks' model of the shard)."""
    plan = plan or AuditPlan()
    config = head.config
    tokens = read_shard(shard, grid=config.grid, embed_dim=config.embed_dim)
    if limit is not None:
        tokens = tokens[:limit]
    n = len(tokens)
    if images is not None and len(images) != n:
        raise AuditError(f"--images has {len(images)} images, the shard {n} "
                         "(use --limit to audit the first N of both)")
    truth = None
    if key is not None:
        truth = key.permutations(ids if ids is not None else range(n), config.n_tokens)
    same_head = inspect_shard(shard).head_fingerprint == head_fingerprint(head)
    image_shape = (config.in_chans, config.img_size, config.img_size)
    placeholder = public if public is not None else torch.zeros(0, *image_shape)
    knowledge = Knowledge(config, head, placeholder, public_labels, noise_std, pixel_range)
    originals = images if images is not None else torch.zeros(n, *image_shape)
    score = _Scorer(originals, config, plan, pixel_range)
    rows: list[AuditRow] = []
    mean_row = None
    if public is not None and images is not None:
        mean_row = score(mean_image(n, knowledge), None, defence="reference",
                         attack="mean image", server_knows="public images", reference=True)
        rows.append(mean_row)
    defence = "this shard"
    for name in attack_names(plan):
        spec, fn = ATTACKS[name]
        if not spec.applies(knowledge) or (name in _NEEDS_PUBLIC and public is None):
            continue
        t0 = time.perf_counter()
        attempt = fn(tokens, knowledge, plan)
        if images is None:
            attempt = Attempt(attempt.positions, None)
        rows.append(score(attempt, truth, defence=defence, attack=name,
                          server_knows=spec.knowledge_used(knowledge),
                          seconds=time.perf_counter() - t0))
    verdicts = [verdict(defence, rows, mean_row, config.n_tokens)] if mean_row else []
    context = {"images": n, "tokens_per_image": config.n_tokens, "embed_dim": config.embed_dim,
               "patch_values": config.in_chans * config.patch_size**2,
               "noise_std": noise_std, "shard_head_is_server_head": same_head,
               "scored_positions": truth is not None, "scored_pixels": images is not None,
               "pixel_range": list(pixel_range)}
    return AuditReport(rows, verdicts, {}, context)
