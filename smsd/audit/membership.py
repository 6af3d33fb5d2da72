"""Membership inference on the returned body: was this image in pre-training?

The attacker holds the trained :class:`~smsd.models.ViTBody` the server returns and
candidate images encoded as the upload encodes them (token sequences ``[n, N, D]``, any
token order: the body is permutation-invariant), some of which were pre-trained on
(members) and some not (non-members, same distribution). It knows the pre-training recipe
(views are random token subsets) but has no projection head and no training state.

Self-distillation trains the body to give random token-subset views of a training image
the same CLS features, so the attack scores each image by view consistency, the mean
cosine similarity between the CLS features of different random views of it (EncoderMI,
Liu et al., CCS 2021, for contrastive encoders): higher means "member". With
``reference_body`` (a body of the same architecture the attacker trained on images it
knows to be non-members, or holds otherwise), the score is calibrated by the image's
difficulty: target score minus reference score (Watson et al., ICLR 2022).

:func:`membership_inference` reports the ROC AUC of that score over members vs.
non-members: 0.5 means the attacker does no better than a coin flip (no measurable
leakage at this sample size; its DeLong interval says how sure that is), 1.0 means it
separates them perfectly. An AUC well below 0.5 is leakage too (the direction flipped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import positive_int
from ..extras import require
from ..models import ViTBody
from ..ops import sample_views, view_size

__all__ = ["DEFAULT_KEEP", "MembershipResult", "membership_inference", "membership_scores"]

DEFAULT_KEEP = (0.5, 0.5, 0.2, 0.2)
# Each run of _BLOCK consecutive images draws its views from its own generator, seeded by
# (seed, block): an image's views depend only on the seed and its index, not on batch_size.
_BLOCK = 64
_Z95 = 1.959963984540054


@dataclass(frozen=True)
class MembershipResult:
    """The attack's success over ``n_members`` members and ``n_non_members`` non-members.

    ``auc``: ROC AUC (0.5 = chance). ``auc_ci95``: its DeLong 95 % interval (normal
    approximation, clipped to [0, 1]; loose for small sets or an AUC near 0 or 1).
    ``tpr_at_1pct_fpr`` / ``tpr_at_0_1pct_fpr``: the best true-positive rate at a
    false-positive rate of at most 1 % / 0.1 % (with fewer than 100 / 1000 non-members
    that is the TPR at FPR 0). ``advantage``: max(TPR − FPR) over thresholds (Yeom et
    al.'s membership advantage; 0 = chance). ``calibrated``: scores were target minus
    reference body.
    """

    auc: float
    auc_ci95: tuple[float, float]
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    advantage: float
    n_members: int
    n_non_members: int
    calibrated: bool = False

    def to_dict(self) -> dict:
        """Plain JSON-serialisable fields (the interval as a two-element list)."""
        out = asdict(self)
        out["auc_ci95"] = list(self.auc_ci95)
        return out


def _check_body(name: str, body: object) -> ViTBody:
    if not isinstance(body, ViTBody):
        raise TypeError(f"{name} must be a smsd.models.ViTBody, got {type(body).__name__}")
    dtypes = {p.dtype for p in body.parameters()}
    if dtypes - {torch.float32}:
        raise TypeError(f"{name} must have float32 parameters (call .float() on a copy), "
                        f"got {sorted(str(d) for d in dtypes)}")
    return body


def _check_tokens(name: str, tokens: object, dim: int, at_least: int) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or not tokens.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.Tensor [n, N, {dim}]")
    if tokens.dim() != 3 or tokens.shape[2] != dim or tokens.shape[1] < 1:
        raise ValueError(f"{name} must have shape [n, N, {dim}] (the body's embed_dim is "
                         f"{dim}), got {list(tokens.shape)}")
    if tokens.shape[0] < at_least:
        raise ValueError(f"{name} must hold at least {at_least} images, got {tokens.shape[0]}")
    if not torch.isfinite(tokens).all():
        raise ValueError(f"{name} holds non-finite values")
    return tokens


def _check_keep(keep: Sequence[float], n_tokens: int) -> tuple[float, ...]:
    if isinstance(keep, (int, float)) or len(keep) < 2:
        raise ValueError(f"keep must be a sequence of at least 2 view ratios, got {keep!r}")
    for v, ratio in enumerate(keep):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) \
                or not 0.0 < ratio <= 1.0:
            raise ValueError(f"keep[{v}] must be a ratio in (0, 1], got {ratio!r}")
        if view_size(n_tokens, ratio) < 1:
            raise ValueError(f"keep[{v}]={ratio} keeps no token of N={n_tokens}; raise it")
    return tuple(float(r) for r in keep)


def _block_views(seed: int, block: int, size: int, n_tokens: int, keep: tuple[float, ...],
                 draws: int) -> list[list[torch.Tensor]]:
    """Views of one block's ``size`` images: ``[draw][view]`` int64 ``[size, k_view]``."""
    state = np.random.SeedSequence([seed, block]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return [sample_views(size, n_tokens, keep, generator=gen) for _ in range(draws)]


def _views(seed: int, start: int, stop: int, n_tokens: int, keep: tuple[float, ...],
           draws: int) -> list[list[torch.Tensor]]:
    """Views of images ``[start, stop)``: ``[draw][view]`` int64 ``[stop - start, k_view]``."""
    parts = []
    for block in range(start // _BLOCK, (stop - 1) // _BLOCK + 1):
        lo = block * _BLOCK
        views = _block_views(seed, block, _BLOCK, n_tokens, keep, draws)
        a, b = max(start, lo) - lo, min(stop, lo + _BLOCK) - lo
        parts.append([[v[a:b] for v in draw] for draw in views])
    return [[torch.cat([p[d][v] for p in parts]) for v in range(len(keep))]
            for d in range(draws)]


def _consistency(body: ViTBody, tokens: torch.Tensor, views: list[list[torch.Tensor]]
                 ) -> torch.Tensor:
    """Mean cosine similarity over draws and pairs of distinct views: fp32 ``[B]``."""
    b, _, dim = tokens.shape
    n_views = len(views[0])
    upper = torch.triu_indices(n_views, n_views, offset=1, device=tokens.device)
    total = torch.zeros(b, dtype=torch.float32, device=tokens.device)
    for draw in views:
        subsets = [torch.gather(tokens, 1, idx.to(tokens.device)[..., None].expand(-1, -1, dim))
                   for idx in draw]
        feats = body.forward_views(subsets).float().reshape(n_views, b, dim)
        feats = F.normalize(feats, dim=-1)
        sims = torch.einsum("vbd,wbd->vwb", feats, feats)  # [V, V, B]
        total += sims[upper[0], upper[1]].mean(0)
    return total / len(views)


def membership_scores(
    body: ViTBody,
    tokens: torch.Tensor,
    *,
    keep: Sequence[float] = DEFAULT_KEEP,
    draws: int = 8,
    seed: int = 0,
    batch_size: int = 256,
    reference_body: ViTBody | None = None,
) -> torch.Tensor:
    """Membership score of each image of ``tokens`` ``[n, N, D]``: fp32 ``[n]`` on the CPU,
    higher = more likely a member.

    Each of ``draws`` rounds draws one random token subset per ratio of ``keep`` (as
    pre-training does) and averages the cosine similarity of the body's CLS features over
    all pairs of those views; the score is the mean over rounds. With ``reference_body``
    it is that score under ``body`` minus the score under ``reference_body`` on the same
    views. Deterministic given ``seed`` (an image's views depend only on the seed and its
    index, not on ``batch_size`` or the device). Runs in eval mode (restored afterwards)
    without autograd, in fp32 on the body's device; ``batch_size`` images at a time.
    """
    _check_body("body", body)
    if reference_body is not None:
        _check_body("reference_body", reference_body)
        if reference_body.config.embed_dim != body.config.embed_dim:
            raise ValueError(f"reference_body has embed_dim {reference_body.config.embed_dim} "
                             f"but body has {body.config.embed_dim}")
    _check_tokens("tokens", tokens, body.config.embed_dim, 1)
    keep = _check_keep(keep, tokens.shape[1])
    positive_int("draws", draws)
    positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    bodies = [body] if reference_body is None else [body, reference_body]
    modes = [m.training for m in bodies]
    n, n_tokens = tokens.shape[:2]
    out = torch.empty(n, dtype=torch.float32)
    try:
        for m in bodies:
            m.eval()
        with torch.no_grad():
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                views = _views(seed, start, stop, n_tokens, keep, draws)
                scores = []
                for m in bodies:
                    device = next(m.parameters()).device
                    with torch.autocast(device.type, enabled=False):
                        batch = tokens[start:stop].to(device, torch.float32)
                        scores.append(_consistency(m, batch, views).cpu())
                out[start:stop] = scores[0] if len(scores) == 1 else scores[0] - scores[1]
    finally:
        for m, mode in zip(bodies, modes, strict=True):
            m.train(mode)
    return out


def _delong_interval(pos: np.ndarray, neg: np.ndarray, auc: float) -> tuple[float, float]:
    """DeLong's 95 % interval of the AUC from the placement values (ties count half)."""
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    v_pos = (np.searchsorted(neg_sorted, pos, "left")
             + np.searchsorted(neg_sorted, pos, "right")) / (2 * len(neg))
    v_neg = (2 * len(pos) - np.searchsorted(pos_sorted, neg, "left")
             - np.searchsorted(pos_sorted, neg, "right")) / (2 * len(pos))
    se = math.sqrt(v_pos.var(ddof=1) / len(pos) + v_neg.var(ddof=1) / len(neg))
    return max(0.0, auc - _Z95 * se), min(1.0, auc + _Z95 * se)


def membership_inference(
    body: ViTBody,
    members: torch.Tensor,
    non_members: torch.Tensor,
    *,
    reference_body: ViTBody | None = None,
    keep: Sequence[float] = DEFAULT_KEEP,
    draws: int = 8,
    seed: int = 0,
    batch_size: int = 256,
) -> MembershipResult:
    """Run the view-consistency attack on ``members`` and ``non_members`` (each
    ``[n, N, D]``, at least 2 images) and score it (:class:`MembershipResult`); the other
    arguments are :func:`membership_scores`'s (both sets are scored with the same seed)."""
    require("audit", "sklearn", purpose="the membership-inference AUC")
    from sklearn.metrics import roc_auc_score, roc_curve

    _check_body("body", body)
    dim = body.config.embed_dim
    _check_tokens("members", members, dim, 2)
    _check_tokens("non_members", non_members, dim, 2)
    kwargs = dict(keep=keep, draws=draws, seed=seed, batch_size=batch_size,
                  reference_body=reference_body)
    pos = membership_scores(body, members, **kwargs).double().numpy()
    neg = membership_scores(body, non_members, **kwargs).double().numpy()
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    scores = np.r_[pos, neg]
    auc = float(roc_auc_score(labels, scores))
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return MembershipResult(
        auc=auc,
        auc_ci95=_delong_interval(pos, neg, auc),
        tpr_at_1pct_fpr=float(tpr[fpr <= 0.01].max()),
        tpr_at_0_1pct_fpr=float(tpr[fpr <= 0.001].max()),
        advantage=float((tpr - fpr).max()),
        n_members=len(pos),
        n_non_members=len(neg),
        calibrated=reference_body is not None,
    )
