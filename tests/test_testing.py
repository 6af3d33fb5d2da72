"""The accuracy rule (smsd.testing) still fails real bugs once the fp32 floor is in.

Each planted bug is a plain-PyTorch stand-in for a kernel with one classic defect, run
in fp32 through the same comparison the tests and ``smsd check`` use. The floor must
stay far below what such a defect does, and it must grow with the accumulation length
and with the problem's conditioning, as its derivation says.
"""

from __future__ import annotations

import pytest
import torch

from smsd.ops import reference
from smsd.selfcheck import attention as attention_check
from smsd.testing import accuracy, rounding_floor


def _qkv(B=1, H=2, N=197, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (torch.randn(B, H, N, d, generator=gen, dtype=torch.float64) for _ in range(4))
    return [q, k, v], g


def _drop_last_key(q, k, v, **kwargs):
    """Off-by-one in the key mask: the last key is never attended to."""
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
    mask[:, -1] = False
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _no_rescale(q, k, v, **kwargs):
    """A blocked softmax that never rescales across key blocks: each half of the keys is
    normalized on its own and the halves averaged, as when the running max/sum of an
    online softmax is not carried from one block to the next."""
    n = k.shape[-2] // 2
    halves = [torch.nn.functional.scaled_dot_product_attention(q, k[..., s, :], v[..., s, :])
              for s in (slice(None, n), slice(n, None))]
    return (halves[0] + halves[1]) / 2


@pytest.mark.parametrize("planted", [_drop_last_key, _no_rescale], ids=lambda f: f.__name__)
def test_attention_rule_fails_planted_bugs(monkeypatch, planted):
    qkv, grad = _qkv()
    monkeypatch.setattr(attention_check, "attention", planted)
    results = attention_check.compare(torch.float32, qkv, grad)
    assert not results["out"].ok, results["out"]
    assert results["out"].error > 100 * results["out"].floor


def test_attention_rule_passes_plain_pytorch(monkeypatch):
    qkv, grad = _qkv()
    monkeypatch.setattr(attention_check, "attention", reference.attention)
    results = attention_check.compare(torch.float32, qkv, grad)
    assert all(acc.ok for acc in results.values()), results


def _dino_inputs(K=1000, rows=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, K, generator=gen, dtype=torch.float64)
    t = torch.randn(4, K, generator=gen, dtype=torch.float64)
    c = torch.randn(1, K, generator=gen, dtype=torch.float64) * 0.1
    return s, t, c


def _dino(s, t, c, student_temp=0.1, center=True):
    leaf = s.detach().clone().requires_grad_(True)
    cc = c.detach().clone() if center else torch.zeros_like(c)
    loss = reference.dino_loss(leaf, t, cc, n_student_views=4, student_temp=student_temp)
    loss.backward()
    return [loss.detach(), leaf.grad]


@pytest.mark.parametrize(
    "planted",
    [
        lambda s, t, c: _dino(s, t, c, center=False),  # the center dropped
        lambda s, t, c: [x * (1 + 1e-4) for x in _dino(s, t, c)],  # off by 0.01 %
        lambda s, t, c: [_dino(s, t, c)[0], _dino(s, t, c)[1] * torch.tensor(  # a row lost
            [1.0] * 7 + [0.0], dtype=s.dtype)[:, None]],
    ],
    ids=["no-center", "scaled-1e-4", "row-dropped"],
)
def test_loss_rule_fails_planted_bugs(planted):
    s64, t64, c64 = _dino_inputs()
    s, t, c = s64.float(), t64.float(), c64.float()
    exact = _dino(s.double(), t.double(), c.double())
    plain = _dino(s, t, c)
    floors = rounding_floor(_dino, [s.double(), t.double(), c.double()], s.shape[1])
    got = planted(s, t, c)
    verdicts = [accuracy(g, p, e, floor=f) for g, p, e, f in zip(got, plain, exact, floors,
                                                                 strict=True)]
    assert not all(v.ok for v in verdicts), verdicts


def test_floor_grows_with_accumulation_length_and_conditioning():
    s, t, c = (x.float().double() for x in _dino_inputs())
    loss_floor = lambda n, temp: rounding_floor(  # noqa: E731
        lambda *xs: _dino(*xs, student_temp=temp), [s, t, c], n)[0]
    # sqrt(n): 16x longer sums, 4x the floor (within the sampling noise of 3 draws)
    assert 2.5 < loss_floor(16_000, 0.1) / loss_floor(1_000, 0.1) < 6.5
    # a sharper softmax amplifies the inputs' rounding: temperature 0.1 -> 0.025
    assert loss_floor(1_000, 0.025) > 2.5 * loss_floor(1_000, 0.1)


def test_floor_rejects_bad_length():
    with pytest.raises(ValueError, match="accumulation_length"):
        rounding_floor(lambda x: [x], [torch.ones(2, dtype=torch.float64)], 0)
