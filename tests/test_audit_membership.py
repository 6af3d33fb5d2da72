"""Membership inference on the returned body: chance on a body that never saw the members,
a clear signal on one that memorised them, and the reference-calibrated score."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from smsd.audit.membership import MembershipResult, membership_inference, membership_scores
from smsd.models import ViTBody, model_config
from smsd.ops import sample_views

DIM = 16
# 16 tokens per image; init_std ~ dim ** -0.5 so that a narrow body's CLS output depends on
# its input (ViTConfig's note) and an untrained body's scores are not all ~1.
CONFIG = model_config("demo", img_size=16).replace(embed_dim=DIM, depth=1, num_heads=2,
                                                    init_std=DIM**-0.5)
N = CONFIG.n_tokens


def _auc_se(n1: int, n2: int) -> float:
    """Standard error of the AUC of an uninformative score (Mann-Whitney U under H0)."""
    return math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))


def _body(seed: int) -> ViTBody:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTBody(CONFIG)


def _gaussian(n: int, gen: torch.Generator, easy: float = 0.0) -> torch.Tensor:
    """``n`` images of i.i.d. Gaussian tokens (fp16, as uploaded); with ``easy``, the first
    half share a per-image offset of that std across their tokens, so that any body finds
    their views consistent (easy images, in Watson et al.'s sense)."""
    x = torch.randn(n, N, DIM, generator=gen)
    scale = torch.zeros(n, 1, 1)
    scale[: n // 2] = easy
    return (x + scale * torch.randn(n, 1, DIM, generator=gen)).half()


def _memorise(images: torch.Tensor, steps: int, seed: int, lr: float = 3e-3) -> ViTBody:
    """A body trained (Adam, InfoNCE at temperature 0.1) to give two random token subsets
    (1/2 and 1/5 of the tokens) of each of ``images`` the same CLS features, and those of
    different images different ones."""
    body = _body(seed)
    opt = torch.optim.Adam(body.parameters(), lr=lr)
    x, n = images.float(), len(images)
    gen, target = torch.Generator().manual_seed(seed + 100), torch.arange(n)
    for _ in range(steps):
        views = [torch.gather(x, 1, idx[..., None].expand(-1, -1, DIM))
                 for idx in sample_views(n, N, (0.5, 0.2), generator=gen)]
        feats = F.normalize(body.forward_views(views), dim=-1)
        logits = feats[:n] @ feats[n:].T / 0.1
        loss = F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    body.zero_grad(set_to_none=True)
    return body


@pytest.fixture(scope="module")
def memorised():
    gen = torch.Generator().manual_seed(1)
    members, non_members = _gaussian(32, gen), _gaussian(32, gen)
    return _memorise(members, steps=600, seed=0), members, non_members


def test_untrained_body_is_at_chance():
    gen = torch.Generator().manual_seed(3)
    n = 128
    members, non_members = _gaussian(n, gen), _gaussian(n, gen)
    result = membership_inference(_body(0), members, non_members)
    # Members and non-members are exchangeable here, so the AUC is that of a random
    # score: SE = sqrt((n1 + n2 + 1) / (12 n1 n2)) = 0.036; 4 SE = 0.144.
    assert abs(result.auc - 0.5) < 4 * _auc_se(n, n), result
    low, high = result.auc_ci95
    assert 0.0 <= low < result.auc < high <= 1.0
    assert high - low < 0.3
    assert (result.n_members, result.n_non_members, result.calibrated) == (n, n, False)
    assert 0.0 <= result.tpr_at_0_1pct_fpr <= result.tpr_at_1pct_fpr <= 1.0
    assert 0.0 <= result.advantage < 0.3


def test_memorising_body_is_detected(memorised):
    body, members, non_members = memorised
    result = membership_inference(body, members, non_members)
    # Measured: AUC 0.970, TPR 0.72 at FPR 0 (0.97-0.998 over body seeds 0-3; 0.92-0.94
    # after 300 steps).
    assert result.auc >= 0.8, result
    assert result.auc_ci95[0] > 0.5
    assert result.advantage > 0.5
    assert result.tpr_at_1pct_fpr > 0.2
    scores_in, scores_out = membership_scores(body, members), membership_scores(body, non_members)
    assert scores_in.mean() > scores_out.mean()
    assert scores_in.dtype == torch.float32 and scores_in.shape == (32,)


def test_result_to_dict_is_json(memorised):
    body, members, non_members = memorised
    result = membership_inference(body, members[:4], non_members[:3], draws=2)
    assert isinstance(result, MembershipResult)
    out = json.loads(json.dumps(result.to_dict()))
    assert out["auc"] == result.auc and out["auc_ci95"] == list(result.auc_ci95)
    assert (out["n_members"], out["n_non_members"]) == (4, 3)
    with pytest.raises(AttributeError):
        result.auc = 0.5  # frozen


def test_scores_are_deterministic_given_seed(memorised):
    body, members, _ = memorised
    body.train()
    rng = torch.random.get_rng_state()
    weights = {k: v.clone() for k, v in body.state_dict().items()}
    first = membership_scores(body, members, seed=5)
    assert torch.equal(first, membership_scores(body, members, seed=5))
    assert not torch.equal(first, membership_scores(body, members, seed=6))
    # An image's views depend on the seed and its index only, not on the batching.
    assert torch.allclose(first, membership_scores(body, members, seed=5, batch_size=7),
                          atol=1e-5)
    assert torch.equal(first[10:], membership_scores(body, members, seed=5)[10:])
    # fp16 uploads are computed in fp32.
    assert torch.equal(first, membership_scores(body, members.float(), seed=5))
    assert body.training  # mode restored
    assert torch.equal(rng, torch.random.get_rng_state())  # the global RNG is untouched
    assert all(p.grad is None for p in body.parameters())  # no autograd
    assert all(torch.equal(v, weights[k]) for k, v in body.state_dict().items())


def test_reference_calibrated_score(memorised):
    body, members, non_members = memorised
    reference = _body(9)
    calibrated = membership_scores(body, members, seed=2, reference_body=reference)
    expected = membership_scores(body, members, seed=2) \
        - membership_scores(reference, members, seed=2)
    assert torch.allclose(calibrated, expected, atol=1e-6)
    assert torch.equal(membership_scores(body, members, reference_body=body),
                       torch.zeros(len(members)))
    result = membership_inference(body, members, non_members, reference_body=reference)
    assert result.calibrated


def test_calibration_removes_image_difficulty():
    # Half of every set is "easy" (views consistent under any body); the attacker trains a
    # reference body the same way on shadow images it knows, of the same distribution.
    gen = torch.Generator().manual_seed(1)
    members, non_members, shadow = (_gaussian(32, gen, easy=1.0) for _ in range(3))
    target, reference = _memorise(members, 300, seed=0), _memorise(shadow, 300, seed=1)
    plain = membership_inference(target, members, non_members)
    calibrated = membership_inference(target, members, non_members, reference_body=reference)
    # Measured: 0.69 → 0.84 (over seeds 0-2 and easy = 1 or 3: gains of 0.09 to 0.20).
    assert calibrated.auc >= plain.auc + 0.05, (plain, calibrated)
    assert calibrated.auc >= 0.75


def test_input_validation(memorised):
    body, members, non_members = memorised
    with pytest.raises(TypeError, match=r"body must be a smsd\.models\.ViTBody"):
        membership_scores(torch.nn.Linear(DIM, DIM), members)
    with pytest.raises(TypeError, match="float32"):
        membership_scores(_body(0).double(), members)
    with pytest.raises(TypeError, match="tokens must be a floating-point"):
        membership_scores(body, members.long())
    with pytest.raises(ValueError, match=r"tokens must have shape \[n, N, 16\]"):
        membership_scores(body, members[0])
    with pytest.raises(ValueError, match=r"members must have shape \[n, N, 16\]"):
        membership_inference(body, members[..., :8], non_members)
    with pytest.raises(ValueError, match=r"non_members must have shape"):
        membership_inference(body, members, non_members[..., :8])
    with pytest.raises(ValueError, match="members must hold at least 2 images"):
        membership_inference(body, members[:1], non_members)
    with pytest.raises(ValueError, match="non_members must hold at least 2 images"):
        membership_inference(body, members, non_members[:1])
    bad = members.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="tokens holds non-finite"):
        membership_scores(body, bad)
    with pytest.raises(ValueError, match="keep must be a sequence of at least 2"):
        membership_scores(body, members, keep=(0.5,))
    with pytest.raises(ValueError, match=r"keep\[1\]"):
        membership_scores(body, members, keep=(0.5, 1.5))
    with pytest.raises(ValueError, match=r"keep\[0\]=0.01 keeps no token"):
        membership_scores(body, members, keep=(0.01, 0.5))
    with pytest.raises(ValueError, match="draws must be a positive int"):
        membership_scores(body, members, draws=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        membership_scores(body, members, batch_size=0)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        membership_scores(body, members, seed=-1)
    wide = ViTBody(CONFIG.replace(embed_dim=32))
    with pytest.raises(ValueError, match="reference_body has embed_dim 32"):
        membership_inference(body, members, non_members, reference_body=wide)
