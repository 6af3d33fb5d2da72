"""The defences smsd offers a client, as the audit simulates them.

A :class:`Defence` says how a client encodes its upload: the secret permutation always;
optionally Gaussian noise on every token value, a secret head seed (the patch-embedding
weights are then unknown to the server), or no position embedding at all
(``pos_embed_scale = 0``, public). :func:`simulate_upload` encodes images the way a
client would, in memory, for attacks that learn from public images encoded under the
same defence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import PatchHead, ViTConfig

__all__ = ["DEFAULT_DEFENCES", "Defence", "simulate_upload"]


@dataclass(frozen=True)
class Defence:
    """One way to encode an upload (the permutation is always applied)."""

    name: str
    noise_std: float = 0.0
    secret_head: bool = False
    position_embedding: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.noise_std, bool) or not 0 <= self.noise_std < float("inf"):
            raise ValueError(f"noise_std must be a finite number >= 0, got {self.noise_std!r}")

    @classmethod
    def noise(cls, std: float) -> Defence:
        """The noise defence at ``std`` (named ``noise σ=<std>``)."""
        return cls(f"noise σ={std:g}", noise_std=std)

    def public_config(self, config: ViTConfig) -> ViTConfig:
        """The config every party knows: without a position embedding when the defence
        drops it (that choice is public: the server trains on it)."""
        return config if self.position_embedding else config.replace(pos_embed_scale=0.0)

    def client_config(self, config: ViTConfig, secret_seed: int) -> ViTConfig:
        """The config the client encodes with: the public one, with ``secret_seed`` as
        its head seed when the head is secret."""
        public = self.public_config(config)
        return public.replace(head_seed=secret_seed) if self.secret_head else public


# The rows of the default audit: every defence smsd offers, and the noise levels
# docs/privacy.md measures the accuracy cost of.
DEFAULT_DEFENCES: tuple[Defence, ...] = (
    Defence("permutation only"),
    Defence.noise(0.25),
    Defence.noise(0.5),
    Defence.noise(1.0),
    Defence("secret head seed", secret_head=True),
    Defence("no position embedding", position_embedding=False),
)


@torch.no_grad()
def simulate_upload(images: torch.Tensor, head: PatchHead, noise_std: float = 0.0,
                    generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``images`` ``[n, C, H, W]`` as a client would: tokens ``[n, N, D]`` in a
    fresh random order per image, plus noise, rounded to the shard's fp16.

    Returns ``(tokens, positions)``; ``positions[b, slot]`` is the grid position of the
    token at ``slot`` (what an attack must guess).
    """
    tokens = head(images.float())
    n, n_tokens, _ = tokens.shape
    positions = torch.argsort(torch.rand(n, n_tokens, generator=generator), dim=1)
    shuffled = torch.gather(tokens, 1, positions[..., None].expand_as(tokens))
    if noise_std > 0:
        noise = torch.randn(shuffled.shape, generator=generator)
        shuffled = shuffled + noise_std * noise
    return shuffled.half().float(), positions
