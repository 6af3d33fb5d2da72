"""Self-check of attention against the float64 reference (the flash-attention accuracy rule)."""

from __future__ import annotations

import torch

from ..backend import use_backend
from ..ops import attention, reference
from ..testing import Accuracy, accuracy, rounding_floor
from . import Result

BACKENDS = ("triton", "cpp", "torch")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (B, H, N, d, M) dense cases, M = tokens in the view (None: all, in order)
DENSE = ((1, 2, 197, 64, 197), (2, 3, 50, 32, 29), (1, 2, 1, 32, None), (1, 1, 20, 128, None))
PACKED = ((49, 147, 0, 5, 1), 2, 64)  # sequence lengths, H, d


def compare(dtype, inputs64, grad64, **kwargs) -> dict[str, Accuracy]:
    """Output and dq/dk/dv of smsd.ops.attention (current backend) under the accuracy rule.

    ``inputs64`` are float64 q, k, v; the kernel and the plain-PyTorch baseline (the
    reference, i.e. gather + ``F.scaled_dot_product_attention``, run in ``dtype``) get
    them rounded to ``dtype``; the reference gets those rounded values in float64. The
    fp32 rounding floor uses the longest accumulation, ``max(view length, d)``.
    """
    rounded = [t.to(dtype).double() for t in (*inputs64, grad64)]
    runs = {
        "kernel": _run(attention, dtype, rounded, kwargs),
        "plain": _run(reference.attention, dtype, rounded, kwargs),
        "reference": _run(reference.attention, torch.float64, rounded, kwargs),
    }
    n = max(_longest_view(inputs64[0], **kwargs), inputs64[0].shape[-1])
    floors = rounding_floor(
        lambda *xs: _run(reference.attention, torch.float64, xs, kwargs), rounded, n)
    results = {}
    for i, label in enumerate(("out", "dq", "dk", "dv")):
        results[label] = accuracy(runs["kernel"][i], runs["plain"][i], runs["reference"][i],
                                  floor=floors[i])
    if _longest_view(inputs64[0], **kwargs) == 1:
        for i, label in ((1, "dq"), (2, "dk")):
            results[label] = _cancellation_bound(runs["kernel"][i], inputs64, grad64, dtype,
                                                 kwargs)
    return results


def _run(fn, dtype, tensors, kwargs) -> list[torch.Tensor]:
    """``fn(q, k, v, **kwargs)`` in ``dtype`` and its gradients for upstream ``grad``."""
    *qkv, grad = tensors
    leaves = [t.detach().to(dtype, copy=True).requires_grad_(True) for t in qkv]
    out = fn(*leaves, **kwargs)
    out.backward(grad.to(dtype))
    return [out.detach(), *(t.grad for t in leaves)]


def _longest_view(q, *, index=None, cu_seqlens=None, scale=None) -> int:
    if cu_seqlens is not None:
        return int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
    return index.shape[1] if index is not None else q.shape[2]


def _cancellation_bound(grad, inputs64, grad64, dtype, kwargs) -> Accuracy:
    """dq and dk of 1-token views are exactly 0 (softmax of one score is constant), but
    every implementation gets them as p * (dO·v - dO·o) times k or q: two equal dot
    products rounded differently. There the rule's "1 ulp of the output scale" is 0, so
    the ulp is taken of the cancelling terms: 2 eps * d * |dO| |V| * max(|Q|, |K|) * scale."""
    q, k, v = inputs64
    d = q.shape[-1]
    scale = kwargs.get("scale") or d**-0.5
    qk = max(float(q.abs().max()), float(k.abs().max()))
    terms = d * grad64.abs().max() * v.abs().max() * qk * scale
    bound = 2 * torch.finfo(dtype).eps * float(terms)
    return Accuracy(float(grad.detach().double().abs().max()), 0.0, bound)


def _random_case(B, H, N, d, M, gen, device):
    q, k, v = (torch.randn(B, H, N, d, generator=gen, dtype=torch.float64) for _ in range(3))
    index = None if M is None else torch.rand(B, N, generator=gen).argsort(1)[:, :M]
    grad = torch.randn(B, H, N if M is None else M, d, generator=gen, dtype=torch.float64)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [move(t) for t in (q, k, v)], move(index), move(grad)


def checks(backend: str, device: torch.device) -> list[Result]:
    results = []
    gen = torch.Generator(device="cpu").manual_seed(4)
    for dtype in DTYPES:
        cases = []
        for B, H, N, d, M in DENSE:
            qkv, index, grad = _random_case(B, H, N, d, M, gen, device)
            view = "" if M is None else f" index M={M}"
            cases.append((f"B={B} H={H} N={N} d={d}{view}", qkv, grad, {"index": index}))
        lengths, H, d = PACKED
        T = sum(lengths)
        qkv = [torch.randn(T, H, d, generator=gen, dtype=torch.float64).to(device)
               for _ in range(3)]
        grad = torch.randn(T, H, d, generator=gen, dtype=torch.float64).to(device)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        cases.append((f"packed {list(lengths)} H={H} d={d}", qkv, grad,
                      {"cu_seqlens": cu.to(device)}))
        for label, qkv, grad, kwargs in cases:
            with use_backend(backend):
                acc = compare(dtype, qkv, grad, **kwargs)
            worst = max(acc.items(), key=lambda kv: kv[1].error / max(kv[1].bound, 1e-30))
            results.append(Result("attention", backend, device.type,
                                  str(dtype).removeprefix("torch."), label,
                                  all(a.ok for a in acc.values()), f"worst {worst[0]}: {worst[1]}"))
    return results
