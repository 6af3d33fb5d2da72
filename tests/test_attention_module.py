"""smsd.nn.Attention against a hand-written timm-style attention block with the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smsd.nn import Attention


class TimmStyleAttention(nn.Module):
    """What timm's ViT Attention computes (non-fused path), written out."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * (C // self.num_heads) ** -0.5) @ k.transpose(-2, -1)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


def _pair(dim=64, heads=2):
    ours = Attention(dim, num_heads=heads)
    theirs = TimmStyleAttention(dim, heads).double()
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours, theirs


def test_state_dict_keys_match_timm():
    assert set(Attention(64, 2).state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight",
                                                  "proj.bias"}


def test_dense_matches_timm_style(backend):
    ours, theirs = _pair()
    x = torch.randn(2, 37, 64)
    out = ours(x)
    assert out.shape == x.shape
    x64 = x.double().requires_grad_(True)
    ref = theirs(x64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(ours.qkv.weight.grad.double(), theirs.qkv.weight.grad,
                               rtol=1e-4, atol=1e-4)


def test_packed_matches_per_sequence(backend):
    ours, theirs = _pair()
    lengths = [21, 1, 40]
    x = torch.randn(sum(lengths), 64)
    cu = torch.tensor([0, 21, 22, 62], dtype=torch.int32)
    out = ours(x, cu_seqlens=cu, max_seqlen=40)
    assert out.shape == x.shape
    start = 0
    for n in lengths:
        ref = theirs(x[start:start + n].double()[None])[0]
        torch.testing.assert_close(out[start:start + n].double(), ref, rtol=1e-4, atol=1e-5)
        start += n


def test_attn_drop_in_training_is_dropout():
    torch.manual_seed(0)
    block = Attention(32, num_heads=2, attn_drop=0.5)
    x = torch.randn(1, 9, 32)
    block.eval()
    assert torch.equal(block(x), block(x))
    block.train()
    assert not torch.allclose(block(x), block.eval()(x))


def test_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, num_heads=4)
    with pytest.raises(ValueError, match=r"\[B, N, dim\]"):
        Attention(32, 2)(torch.randn(5, 32))
    with pytest.raises(ValueError, match=r"\[T, dim\]"):
        Attention(32, 2)(torch.randn(1, 5, 32), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


def test_loads_into_timm_if_available():
    timm_vit = pytest.importorskip("timm.models.vision_transformer",
                                   reason="no timm here (CI cannot import it: no CPU "
                                   "torchvision); tests/test_timm_reference.py covers this")
    theirs = timm_vit.Attention(64, num_heads=2, qkv_bias=True).eval()
    ours = Attention(64, num_heads=2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 17, 64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)
