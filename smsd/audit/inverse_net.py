"""A learned inverse network: the server learns to read pixels and positions off tokens.

The attack assumes what :class:`~smsd.audit.knowledge.Knowledge` states: the public model
config (patch size, ``pos_embed_scale``), the noise level, the head's weights when they
are known, and public images of the same kind as the client's. The server encodes those
public images exactly as a client would (:func:`~smsd.audit.defences.simulate_upload`:
a fresh random order and fresh noise every batch; when the head is secret, a fresh random
head every batch), and trains a network to predict, for every token, its patch pixels
and its grid position.

Architecture: tokens are standardized with statistics of the training tokens, projected
per token to ``width``, and read by a pre-norm transformer encoder without any positional
input, so the network is permutation-equivariant, as it must be for a shuffled set; two
per-token linear outputs give the patch (``C·p·p`` values, regression) and position
logits (``N`` classes). Reconstruction: per image, the one-to-one slot → position map of
maximum summed log-probability (Hungarian, :func:`~smsd.audit.attacks.assign`), then each
slot's predicted patch, clamped to the pixel range, is placed at its position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import non_negative_int, positive_int
from ..models import PatchHead, ViTConfig
from .attacks import assign
from .defences import simulate_upload
from .knowledge import (
    Attempt,
    Knowledge,
    check_tokens,
    images_to_patches,
    patches_to_images,
    place,
)

__all__ = ["InverseNet", "InverseNetConfig", "apply_inverse_net", "inverse_net",
           "train_inverse_net"]

PIXEL_WEIGHT = 1.0  # loss = PIXEL_WEIGHT · MSE(pixels) + POSITION_WEIGHT · CE(positions)
POSITION_WEIGHT = 0.1
_WARMUP = 0.05  # fraction of the steps with a linear LR warm-up, then cosine decay to 0
_STATS_IMAGES = 512  # public images encoded once for the standardization statistics
_INFER_BATCH = 256


@dataclass(frozen=True)
class InverseNetConfig:
    """Size (``width``, ``depth``, ``heads``) and training budget (``steps`` of ``batch``
    public images, AdamW at peak ``lr``) of the inverse network; ``seed`` fixes the
    initialization, the training batches, keys, noise and random heads. The defaults
    train in ~2-3 min on one CPU core for the demo config, :meth:`quick` in ~12 s."""

    width: int = 128
    depth: int = 3
    heads: int = 4
    steps: int = 1200
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "depth", "heads", "steps", "batch"):
            positive_int(name, getattr(self, name))
        non_negative_int("seed", self.seed)
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < float("inf")):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")

    @classmethod
    def large(cls) -> InverseNetConfig:
        """A larger net and budget for a GPU (``smsd audit --device cuda``); minutes there,
        far too slow for a CPU."""
        return cls(width=256, depth=6, heads=8, steps=6000, batch=128, lr=5e-4)

    @classmethod
    def quick(cls) -> InverseNetConfig:
        """A small net and budget: trains in well under a minute on one CPU core (demo)."""
        return cls(width=64, depth=2, heads=4, steps=400, batch=32, lr=2e-3)


class InverseNet(nn.Module):
    """Permutation-equivariant token reader: ``[B, N, D]`` → (pixels ``[B, N, P]``,
    position logits ``[B, N, N]``)."""

    def __init__(self, embed_dim: int, patch_dim: int, n_tokens: int,
                 net_config: InverseNetConfig) -> None:
        super().__init__()
        w = net_config.width
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("std", torch.ones(embed_dim))
        self.embed = nn.Linear(embed_dim, w)
        layer = nn.TransformerEncoderLayer(w, net_config.heads, dim_feedforward=2 * w,
                                           dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, net_config.depth, norm=nn.LayerNorm(w),
                                             enable_nested_tensor=False)
        self.pixels = nn.Linear(w, patch_dim)
        self.positions = nn.Linear(w, n_tokens)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.encoder(self.embed((tokens - self.mean) / self.std))
        return self.pixels(x), self.positions(x)


class _Encoder:
    """Encodes public images as the client would, a fresh head per call if it is secret."""

    def __init__(self, knowledge: Knowledge, generator: torch.Generator) -> None:
        self.knowledge, self.generator = knowledge, generator
        self.patches = images_to_patches(knowledge.public_images.float(), knowledge.config)

    def head(self) -> PatchHead:
        if self.knowledge.head is not None:
            return self.knowledge.head
        seed = int(torch.randint(2**62, (), generator=self.generator))
        return PatchHead(self.knowledge.config.replace(head_seed=seed)).eval()

    def __call__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens ``[b, N, D]``, positions ``[b, N]``, slot-ordered patches ``[b, N, P]``)."""
        tokens, positions = simulate_upload(self.knowledge.public_images[index], self.head(),
                                            self.knowledge.noise_std, self.generator)
        patches = self.patches[index]
        slotted = torch.gather(patches, 1, positions[..., None].expand(-1, -1, patches.shape[2]))
        return tokens, positions, slotted


def _check_tokens(tokens: torch.Tensor, config: ViTConfig) -> None:
    check_tokens(tokens, config.n_tokens, config.embed_dim)


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, int(_WARMUP * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_inverse_net(knowledge: Knowledge, net_config: InverseNetConfig,
                      device: torch.device | str = "cpu") -> InverseNet:
    """Train the network on the public images encoded under the knowledge's defence
    (``knowledge.head`` if known, else a fresh random head every batch)."""
    config, images = knowledge.config, knowledge.public_images
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"public_images must be a non-empty [m, C, H, W], got "
                         f"{list(images.shape)}")
    gen = torch.Generator().manual_seed(net_config.seed)
    encode = _Encoder(knowledge, gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(net_config.seed)
        net = InverseNet(config.embed_dim, encode.patches.shape[2], config.n_tokens,
                         net_config)
    sample = torch.randperm(len(images), generator=gen)[:_STATS_IMAGES]
    stats = torch.cat([encode(i)[0] for i in sample.split(net_config.batch)])  # fresh heads
    stats = stats.reshape(-1, config.embed_dim).double()
    net.mean.copy_(stats.mean(0))
    net.std.copy_(stats.std(0).clamp_min(1e-6))
    net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=net_config.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, net_config.steps))
    for _ in range(net_config.steps):
        index = torch.randint(len(images), (net_config.batch,), generator=gen)
        tokens, positions, patches = (t.to(device) for t in encode(index))
        pixels, logits = net(tokens)
        loss = (PIXEL_WEIGHT * F.mse_loss(pixels, patches)
                + POSITION_WEIGHT * F.cross_entropy(logits.flatten(0, 1), positions.flatten()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def apply_inverse_net(net: InverseNet, tokens: torch.Tensor, config: ViTConfig,
                      pixel_range: tuple[float, float] = (-1.0, 1.0)) -> Attempt:
    """Read an upload ``[n, N, D]`` with a trained network: positions and images."""
    _check_tokens(tokens, config)
    device = net.mean.device
    log_probs, pixels = [], []
    for chunk in tokens.split(_INFER_BATCH):
        pix, logits = net(chunk.to(device, torch.float32))
        log_probs.append(logits.log_softmax(-1).cpu())
        pixels.append(pix.clamp(*pixel_range).cpu())
    positions = assign(-torch.cat(log_probs))
    grid = place(torch.cat(pixels), positions)
    return Attempt(positions=positions, images=patches_to_images(grid, config).float())


def inverse_net(tokens: torch.Tensor, knowledge: Knowledge,
                net_config: InverseNetConfig | None = None,
                device: torch.device | str = "cpu") -> Attempt:
    """Train an inverse network on the public images (:func:`train_inverse_net`: with
    ``knowledge.head`` when known, else with fresh random heads; noise
    ``knowledge.noise_std``; the position embedding of ``knowledge.config``), then guess
    every slot's position and reconstruct the images of ``tokens`` ``[n, N, D]``.

    Deterministic given ``net_config.seed`` (on CPU). Returns
    ``Attempt(positions int64 [n, N], images fp32 [n, C, H, W])``.
    """
    _check_tokens(tokens, knowledge.config)
    net = train_inverse_net(knowledge, net_config or InverseNetConfig(), device)
    return apply_inverse_net(net, tokens, knowledge.config, knowledge.pixel_range)
