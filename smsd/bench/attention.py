"""Benchmark cases of attention (see smsd.bench), fwd+bwd, with PyTorch baselines.

Groups: dense (reference: SDPA), ``index=perm`` (reference: gather + SDPA + un-gather,
what a model without the fused gather runs; plain SDPA shown beside it), and packed
views of mixed sizes in one launch (reference: one SDPA call per view size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import backends, use_backend
from ..ops import attention
from ..validation import validation
from . import Case, usable_backends

# (B, H, N, d, dtype) per device and size; the target shapes.
SHAPES = {
    ("cuda", "full"): (256, 6, 197, 64, torch.bfloat16),
    ("cpu", "full"): (16, 6, 197, 64, torch.float32),
    ("cuda", "quick"): (8, 6, 197, 64, torch.bfloat16),
    ("cpu", "quick"): (2, 2, 50, 32, torch.float32),
}
# views per image in a packed step: (count, tokens); DINO-style 2 global + 8 local
VIEWS = {"full": ((2, 147), (8, 49)), "quick": ((2, 20), (3, 7))}


def _fwd_bwd(fn, inputs, grad):
    def step():
        out = fn(*inputs)
        return torch.autograd.grad(out, inputs, grad)

    return step


def _kernel(backend: str, **kwargs):
    def run(q, k, v):
        # Value checks synchronize; a training loop turns them off, so the benchmark does too.
        with use_backend(backend), validation(False):
            return attention(q, k, v, **kwargs)

    return run


def _leaf(*shape, device, dtype, gen):
    return torch.randn(*shape, device=device, generator=gen).to(dtype).requires_grad_(True)


def _dense_cases(device, size, kernels) -> list[Case]:
    B, H, N, d, dtype = SHAPES[(device.type, size)]
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = [_leaf(B, H, N, d, device=device, dtype=dtype, gen=gen) for _ in range(3)]
    grad = torch.randn(B, H, N, d, device=device, generator=gen).to(dtype)
    perm = torch.rand(B, N, device=device, generator=gen).argsort(1)
    inverse = perm.argsort(1)
    flops = int(3.5 * 4 * B * H * N * N * d)

    def gather(t, p):
        return torch.gather(t, 2, p[:, None, :, None].expand(-1, H, -1, d))

    def gather_sdpa_ungather(q, k, v):
        return gather(F.scaled_dot_product_attention(gather(q, perm), gather(k, perm),
                                                     gather(v, perm)), inverse)

    dense, permuted = f"B={B} H={H} N={N} d={d} dense", f"B={B} H={H} N={N} d={d} perm"
    cases = [
        Case("attention", "fwd+bwd", dense, dtype, "sdpa",
             _fwd_bwd(F.scaled_dot_product_attention, qkv, grad), flops=flops, reference=True),
        Case("attention", "fwd+bwd", permuted, dtype, "gather+sdpa+ungather",
             _fwd_bwd(gather_sdpa_ungather, qkv, grad), flops=flops, reference=True),
        Case("attention", "fwd+bwd", permuted, dtype, "sdpa (no perm)",
             _fwd_bwd(F.scaled_dot_product_attention, qkv, grad), flops=flops),
    ]
    for backend in kernels:
        cases += [
            Case("attention", "fwd+bwd", dense, dtype, backend,
                 _fwd_bwd(_kernel(backend), qkv, grad), flops=flops),
            Case("attention", "fwd+bwd", permuted, dtype, backend,
                 _fwd_bwd(_kernel(backend, index=perm), qkv, grad), flops=flops),
        ]
    return cases


def _packed_cases(device, size, kernels) -> list[Case]:
    B, H, _, d, dtype = SHAPES[(device.type, size)]
    views = VIEWS[size]
    gen = torch.Generator(device=device).manual_seed(1)
    lengths = [n for count, n in views for _ in range(count * B)]
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)
    qkv = [_leaf(T, H, d, device=device, dtype=dtype, gen=gen) for _ in range(3)]
    grad = torch.randn(T, H, d, device=device, generator=gen).to(dtype)
    flops = int(3.5 * sum(4 * H * n * n * d for n in lengths))
    # The same tokens grouped by view size, as a model without varlen attention runs them.
    per_size = [[_leaf(count * B, H, n, d, device=device, dtype=dtype, gen=gen)
                 for _ in range(3)] for count, n in views]
    per_size_grads = [torch.randn(count * B, H, n, d, device=device, generator=gen).to(dtype)
                      for count, n in views]
    steps = [_fwd_bwd(F.scaled_dot_product_attention, inputs, g)
             for inputs, g in zip(per_size, per_size_grads, strict=True)]

    def per_size_sdpa():
        return [step() for step in steps]

    shape = f"B={B} H={H} d={d} {'+'.join(f'{c}x{n}' for c, n in views)}"
    cases = [Case("attention", "fwd+bwd", shape, dtype, "sdpa per view size", per_size_sdpa,
                  flops=flops, reference=True)]
    for backend in kernels:
        run = _kernel(backend, cu_seqlens=cu, max_seqlen=max(lengths))
        cases.append(Case("attention", "fwd+bwd", shape, dtype, backend,
                          _fwd_bwd(run, qkv, grad), flops=flops))
    return cases


def cases(device: torch.device, size: str) -> list[Case]:
    kernels = usable_backends(device)
    if device.type == "cuda" and backends()["xformers"].available:
        kernels.append("xformers")
    return _dense_cases(device, size, kernels) + _packed_cases(device, size, kernels)
