"""The full audit: every defence smsd offers, against every attack and the references.

The auditor plays the client: it encodes the attacked images under each defence (a
fresh key; a fresh secret head seed where the head is secret) through the real shard
path, then plays the server with the knowledge each row states: the public config, the
head weights where they are public, public images of the same kind (disjoint from the
attacked ones) and, for a secret head, optionally a colluding client's known pairs.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..crypto import PermutationKey
from ..models import PatchHead, ViTConfig
from ..protocol.client import Client
from ..protocol.shard import read_shard
from .budget import noise_budget
from .catalog import ATTACKS
from .collusion import estimate_head
from .jigsaw import best_shift, best_shift_positions
from .knowledge import Attempt, Knowledge, images_to_patches
from .metrics import psnr, ssim
from .plan import AuditPlan
from .prior import prior_mmse
from .references import class_mean_image, mean_image, random_order
from .report import AuditReport, AuditRow, verdict

__all__ = ["AuditPlan", "attack_names", "run_audit"]

REFERENCE = "reference"
COLLUSION_ATTACK = "prior + linear MMSE, colluder's head"


def _encode(images: torch.Tensor, config: ViTConfig, noise_std: float, noise_seed: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's real shard of ``images``: (tokens ``[n, N, D]``, true positions)."""
    key = PermutationKey.generate()
    client = Client(config, key, noise_std=noise_std, noise_seed=noise_seed)
    with tempfile.TemporaryDirectory(prefix="smsd-audit-") as tmp:
        tokens = read_shard(client.encode(images, Path(tmp) / "shard.safetensors"))
    return tokens, key.permutations(range(len(images)), config.n_tokens)


class _Scorer:
    """Scores attempts against the originals and the true positions."""

    def __init__(self, originals: torch.Tensor, config: ViTConfig, plan: AuditPlan,
                 pixel_range: tuple[float, float]) -> None:
        self.originals, self.config, self.plan = originals, config, plan
        self.range = pixel_range
        self.textured = images_to_patches(originals.double(), config).var(-1) \
            > plan.textured_variance  # [n, N], grid order

    def __call__(self, attempt: Attempt, truth: torch.Tensor | None, **row) -> AuditRow:
        acc = textured = quality = None
        if attempt.positions is not None and truth is not None:
            hit = attempt.positions == truth  # [n, slot]
            acc = hit.double().mean().item()
            mask = torch.gather(self.textured, 1, truth)  # slot → its true patch textured
            textured = hit[mask].double().mean().item() if mask.any() else None
        if attempt.images is not None:
            width = self.range[1] - self.range[0]
            images = attempt.images.float()
            quality = (psnr(images, self.originals, width), ssim(images, self.originals, width))
        return AuditRow(positions_correct=acc, positions_textured=textured,
                        psnr_db=quality[0] if quality else None,
                        ssim=quality[1] if quality else None, **row)

    def shifted(self, attempt: Attempt, truth: torch.Tensor) -> Attempt:
        """The attempt translated, per image, by its best whole-patch shift."""
        s = self.plan.max_shift
        return Attempt(best_shift_positions(attempt.positions, truth, self.config.grid, s),
                       best_shift(attempt.images, self.originals, self.config, s, self.range[0]))


def attack_names(plan: AuditPlan) -> tuple[str, ...]:
    """The plan's attacks, checked against the catalog (default: all of it)."""
    if plan.attacks is None:
        return tuple(ATTACKS)
    unknown = [a for a in plan.attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
    return plan.attacks


def run_audit(attacked: torch.Tensor, public: torch.Tensor, config: ViTConfig, *,
              labels: torch.Tensor | None = None, public_labels: torch.Tensor | None = None,
              plan: AuditPlan | None = None, pixel_range: tuple[float, float] = (-1.0, 1.0),
              log: Callable[[str], None] = lambda _: None) -> AuditReport:
    """Audit every defence of ``plan`` on ``attacked`` ``[n, C, H, W]`` with ``public``
    (disjoint) images as the attacker's side information."""
    plan = plan or AuditPlan()
    start_all = time.perf_counter()
    n = len(attacked)
    names = attack_names(plan)
    score = _Scorer(attacked, config, plan, pixel_range)
    base = Knowledge(config, PatchHead(config).eval(), public, public_labels,
                     pixel_range=pixel_range)
    mean_row = score(mean_image(n, base), None, defence=REFERENCE, attack="mean image",
                     server_knows="public images", reference=True)
    rows = [score(random_order(attacked, base, plan.seed), None, defence=REFERENCE,
                  attack="random order", server_knows="the true patches, not their order",
                  reference=True), mean_row]
    if labels is not None and public_labels is not None:
        rows.append(score(class_mean_image(labels, base), None, defence=REFERENCE,
                          attack="class-mean image",
                          server_knows="public images + each image's class", reference=True))
    k = min(plan.figure_images, n)
    figure = {"original": attacked[:k]}
    verdicts, budgets = [], {}
    # The simulated client's secrets (head seed, noise) come from the plan's seed, so an
    # audit can be rerun; its key is fresh (no attack depends on the order it hides).
    secret_seeds = np.random.default_rng(plan.seed).integers(1, 2**31, size=(2, len(plan.defences)))
    for i, defence in enumerate(plan.defences):
        public_config = defence.public_config(config)
        client_config = defence.client_config(config, int(secret_seeds[0, i]))
        client_head = PatchHead(client_config).eval()
        tokens, truth = _encode(attacked, client_config, defence.noise_std,
                                int(secret_seeds[1, i]))
        knowledge = Knowledge(public_config,
                              None if defence.secret_head else PatchHead(public_config).eval(),
                              public, public_labels, defence.noise_std, pixel_range)
        defence_rows: list[tuple[AuditRow, Attempt]] = []
        for name in names:
            spec, fn = ATTACKS[name]
            if not spec.applies(knowledge) or not plan.runs(defence.name, name, spec.expensive):
                continue
            t0 = time.perf_counter()
            attempt = fn(tokens, knowledge, plan)
            seconds = time.perf_counter() - t0
            row = dict(defence=defence.name, server_knows=spec.knowledge_used(knowledge),
                       seconds=seconds)
            defence_rows.append((score(attempt, truth, attack=name, **row), attempt))
            if spec.shift_tolerant and attempt.images is not None:
                shifted = score.shifted(attempt, truth)
                defence_rows.append((score(shifted, truth, **row,
                                           attack=f"{name}, best shift ≤ {plan.max_shift}"),
                                     shifted))
            log(f"{defence.name}: {name} done in {seconds:.0f} s")
        if defence.secret_head and plan.colluder_images:
            t0 = time.perf_counter()
            pairs = public[:plan.colluder_images]
            with torch.no_grad():
                pair_tokens = client_head(pairs.float())
            colluded = Knowledge(public_config, estimate_head(pairs, pair_tokens, public_config),
                                 public, public_labels, defence.noise_std, pixel_range)
            attempt = prior_mmse(tokens, colluded)
            defence_rows.append((score(
                attempt, truth, defence=defence.name, attack=COLLUSION_ATTACK,
                server_knows=f"config + public images + a colluding client's "
                f"{len(pairs)} image–token pairs", seconds=time.perf_counter() - t0), attempt))
        rows += [r for r, _ in defence_rows]
        v = verdict(defence.name, [r for r, _ in defence_rows], mean_row, config.n_tokens)
        verdicts.append(v)
        best = max(((r, a) for r, a in defence_rows if r.psnr_db is not None),
                   key=lambda ra: ra[0].psnr_db, default=None)
        if best is not None:
            figure[f"{defence.name}\n{best[0].attack}"] = best[1].images[:k]
        if defence.noise_std:
            budgets[defence.name] = asdict(noise_budget(client_head, defence.noise_std,
                                                        pixel_range))
    context = {"images": n, "public_images": len(public), "tokens_per_image": config.n_tokens,
               "embed_dim": config.embed_dim,
               "patch_values": config.in_chans * config.patch_size**2,
               "textured_variance": plan.textured_variance, "max_shift": plan.max_shift,
               "quick": plan.quick, "attacks": list(names), "pixel_range": list(pixel_range),
               "seconds": round(time.perf_counter() - start_all, 1)}
    return AuditReport(rows, verdicts, budgets, context, figure)
