"""Every attack of the audit, with what it needs and what it returns.

An attack runs on a defence's upload only when the attacker has what it needs (the head
weights, a public position embedding); the table states the knowledge of every row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..models import PatchHead
from .attacks import reconstruct, unshuffle_known_head, unshuffle_known_positions
from .blind import blind
from .inverse_net import InverseNetConfig, inverse_net
from .jigsaw import jigsaw
from .knowledge import Attempt, Knowledge
from .prior import prior_mmse

if TYPE_CHECKING:
    from .plan import AuditPlan

__all__ = ["ATTACKS", "AttackSpec", "attack_names"]


@dataclass(frozen=True)
class AttackSpec:
    """``needs_head``: the head weights; ``needs_position_embedding``: a public one;
    ``uses_head_if_known``: uses the head when the attacker has it (else does without);
    ``uses_public_images``: learns from public images."""

    name: str
    summary: str
    needs_head: bool
    needs_position_embedding: bool = False
    expensive: bool = False  # minutes on the full audit: --quick runs it only where checked
    uses_head_if_known: bool = False
    uses_public_images: bool = True
    shift_tolerant: bool = False  # also scored up to a small shift (no position information)

    def applies(self, knowledge: Knowledge) -> bool:
        return (knowledge.head_known or not self.needs_head) and \
            (knowledge.has_position_embedding or not self.needs_position_embedding)

    def knowledge_used(self, knowledge: Knowledge) -> str:
        """What this attack uses of ``knowledge``, for the table's "server knows"."""
        head = self.needs_head or (self.uses_head_if_known and knowledge.head_known)
        parts = ["config", "head" if head else "no head"]
        if self.uses_public_images:
            parts.append("public images")
        if knowledge.noise_std:
            parts.append("σ")
        return " + ".join(parts)


def _pseudo_inverse(tokens: torch.Tensor, knowledge: Knowledge, plan: AuditPlan) -> Attempt:
    positions = unshuffle_known_head(tokens, knowledge.head, knowledge.pixel_range)
    return Attempt(positions, reconstruct(tokens, positions, knowledge.head,
                                          knowledge.pixel_range))


def _nearest_position(tokens: torch.Tensor, knowledge: Knowledge, plan: AuditPlan) -> Attempt:
    config = knowledge.config
    pos = PatchHead(config).pos_embed.detach()[0]  # the public table: no head seed in it
    patch_dim = config.in_chans * config.patch_size**2
    return Attempt(positions=unshuffle_known_positions(tokens, pos, patch_dim, refine_steps=3))


def inverse_net_config(plan: AuditPlan) -> InverseNetConfig:
    """The inverse network's size: small for ``--quick``, larger on a GPU."""
    if plan.quick:
        return InverseNetConfig.quick()
    return InverseNetConfig.large() if plan.device.startswith("cuda") else InverseNetConfig()


def _inverse_net(tokens: torch.Tensor, knowledge: Knowledge, plan: AuditPlan) -> Attempt:
    return inverse_net(tokens, knowledge, inverse_net_config(plan), device=plan.device)


Attack = Callable[[torch.Tensor, Knowledge, "AuditPlan"], Attempt]

ATTACKS: dict[str, tuple[AttackSpec, Attack]] = {
    spec.name: (spec, fn) for spec, fn in (
        (AttackSpec("pseudo-inverse", "box-constrained un-shuffling, then the head's "
                    "pseudo-inverse", needs_head=True, uses_public_images=False),
         _pseudo_inverse),
        (AttackSpec("nearest position", "nearest public position embedding, 3 refits of "
                    "W's span (positions only)", needs_head=False,
                    needs_position_embedding=True, uses_public_images=False),
         _nearest_position),
        (AttackSpec("prior + linear MMSE", "per-position Gaussian likelihood un-shuffling, "
                    "Wiener reconstruction with a prior from public images", needs_head=True),
         lambda t, k, plan: prior_mmse(t, k)),
        (AttackSpec("blind", "cross-image position clustering, content subspace, graph "
                    "matching to the grid, moment matching", needs_head=False, expensive=True),
         lambda t, k, plan: blind(t, k, seed=plan.seed, quick=plan.quick)),
        (AttackSpec("jigsaw", "pseudo-inverse patches placed by a jigsaw solver (prediction "
                    "compatibility, greedy growth)", needs_head=True, uses_public_images=False,
                    shift_tolerant=True),
         lambda t, k, plan: jigsaw(t, k)),
        (AttackSpec("inverse network", "a permutation-equivariant transformer trained on "
                    "public images encoded under the same defence (fresh random heads when "
                    "the head is secret)", needs_head=False, uses_head_if_known=True,
                    expensive=True),
         _inverse_net),
    )
}


def attack_names() -> list[str]:
    return list(ATTACKS)
