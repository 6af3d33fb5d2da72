"""The accuracy rule (``smsd.testing``) applied to each op, for the CPU tests and the GPU checks.

Every check runs the op on the active backend in ``dtype`` and compares it with the
float64 formula of ``tests/oracles.py`` on the same rounded inputs. The baseline is plain
PyTorch in the precision the implementation computes in:

* the kernels (``triton``, ``cpp``) accumulate in fp32 whatever the input dtype, so their
  baseline is the formula in fp32 on the inputs upcast to fp32; outputs they store in
  fp16/bf16 are allowed one rounding per element, and attention (which, like
  flash-attention, rounds P and dS to the input dtype before its products) the
  first-order bound of those roundings;
* the ``torch`` backend computes in the input dtype, so its baseline is the formula in
  that dtype (flash-attention's rule) -- an independent implementation, never itself.

Run as a script (``python tests/numerics.py CASE``, without ``TRITON_INTERPRET``) it is
the GPU check the ``@pytest.mark.gpu`` tests start in a fresh process: the test process
runs the Triton interpreter, which would replace the compiled GPU kernels.
"""

from __future__ import annotations

import sys

import oracles
import torch

import smsd
from smsd.ops import attention, dino_loss, fused_linear_dino_loss, masked_sample, reference
from smsd.testing import Accuracy, accuracy, max_error, rounding_floor, summation_floor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def computes_in(backend: str, dtype: torch.dtype) -> torch.dtype:
    """The precision ``backend`` computes in for ``dtype`` inputs (the baseline's)."""
    return dtype if backend == "torch" or dtype == torch.float64 else torch.float32


def floors(fn, inputs, accumulation_length, backend, dtype) -> list[float]:
    """The fp32 rounding floor of each output of the fp64 oracle ``fn``; for the ``torch``
    backend in fp16/bf16 (which computes in that dtype) at least the change one rounding
    of each input to the dtype makes, the floor of an implementation that rounds a few
    times per element and accumulates in fp32 (PyTorch's low-precision reductions do):
    two such implementations' errors are each of that size and their ratio is chance
    (the reference's bf16 loss was 7.5x the formula's at K=4097)."""
    result = rounding_floor(fn, inputs, accumulation_length)
    if computes_in(backend, dtype) == dtype and dtype in (torch.float16, torch.bfloat16):
        low = rounding_floor(fn, inputs, 1, unit_roundoff=torch.finfo(dtype).eps / 2)
        result = [max(a, b) for a, b in zip(result, low, strict=True)]
    return result


def loss_floor(loss: float, n_terms: int, backend: str, dtype: torch.dtype) -> float:
    """The floor of a loss that sums ``n_terms`` non-negative terms ``-q log p`` (their
    absolute values add up to the loss): an fp32 sum's (``summation_floor``), and for the
    ``torch`` backend in fp16/bf16, which rounds each log-probability to the dtype once,
    ``u_dtype`` times the loss (the perturbation floor misses both when the teacher is
    one-hot)."""
    floor = summation_floor(loss, n_terms)
    if computes_in(backend, dtype) == dtype and dtype in (torch.float16, torch.bfloat16):
        floor = max(floor, summation_floor(loss, 1, unit_roundoff=torch.finfo(dtype).eps / 2))
    return floor


def assert_all_ok(results: dict[str, Accuracy], label: str = "") -> None:
    bad = {name: str(acc) for name, acc in results.items() if not acc.ok}
    assert not bad, f"{label} {bad}" if label else bad


# ---------------------------------------------------------------- dino_loss
def _run_loss(student, teacher, center, **opts):
    s = student.detach().clone().requires_grad_(True)
    c = center.detach().clone()
    loss = dino_loss(s, teacher.detach().clone(), c, **opts)
    loss.backward()
    return loss.detach(), s.grad, c


def check_dino_loss(student64, teacher64, center64, dtype, backend, **opts):
    """Loss, student gradient and updated center of ``dino_loss`` on ``backend``."""
    s, t = student64.to(dtype), teacher64.to(dtype)
    c = center64.float()
    with smsd.use_backend(backend):
        got = _run_loss(s, t, c, **opts)
    formula_opts = {k: v for k, v in opts.items() if k != "update_center"}
    exact = oracles.dino_loss(s.double(), t.double(), c.double(), **formula_opts)
    low = computes_in(backend, dtype)
    base = oracles.dino_loss(s.to(low), t.to(low), c, **formula_opts)
    floor = floors(lambda *xs: oracles.dino_loss(*xs, **formula_opts),
                   [s.double(), t.double(), c.double()], s.shape[1], backend, dtype)
    floor[0] = max(floor[0], loss_floor(float(exact[0]), s.numel(), backend, dtype))
    return {name: accuracy(value, b, ref, floor=f)
            for name, value, b, ref, f in zip(("loss", "grad", "center"), got, base, exact,
                                              floor, strict=True)}


def dino_inputs(S, T, B, K, *, teacher_scale=0.1, student_scale=1.0, seed=0, device="cpu"):
    """Student, teacher and center logits in float64. With ``teacher_scale=0.1`` the
    teacher softmax at temperature 0.04 is soft (top probability 0.1-0.9 at these K) and
    the center (same scale) moves about half of its mass, so a wrong center or target
    shows in the loss; ``teacher_scale=1`` gives DINO's nearly one-hot late teachers."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(S * B, K, generator=gen, dtype=torch.float64) * student_scale
    teacher = torch.randn(T * B, K, generator=gen, dtype=torch.float64) * teacher_scale
    center = torch.randn(1, K, generator=gen, dtype=torch.float64) * teacher_scale
    return student.to(device), teacher.to(device), center.to(device)


# ---------------------------------------------------------------- fused_linear_dino_loss
def _run_fused(sf, tf, weight, center, **opts):
    s = sf.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    c = center.detach().clone()
    loss = fused_linear_dino_loss(s, tf, w, c, **opts)
    loss.backward()
    return loss.detach(), s.grad, w.grad, c


def fused_formula(sf, tf, weight, center, in_dtype, teacher_weight=None, **opts):
    """(loss, grad_feats, grad_weight, center) of dino_loss(feats @ weight.T, ...) in the
    precision of ``sf`` etc., the logits as the op defines them: in fp16/bf16
    (``in_dtype``) the matmul's result rounded to that dtype, a rounding every
    implementation shares and that would otherwise swamp what the tests compare; in fp32
    exact (in the oracle: an fp32 matmul's rounding depends on the BLAS kernel and the rows
    it is given, so no implementation shares it)."""
    tw = weight if teacher_weight is None else teacher_weight

    def logits(x, w):
        if in_dtype == torch.float32:
            return x @ w.T
        return (x.to(in_dtype) @ w.to(in_dtype).T).to(x.dtype)

    loss, dlogits, new_center = oracles.dino_loss(logits(sf, weight), logits(tf, tw),
                                                  center.to(sf.dtype), **opts)
    return loss, dlogits @ weight, dlogits.T @ sf, new_center, dlogits


def check_fused_linear(sf64, tf64, w64, c64, dtype, backend, teacher_weight64=None, **opts):
    """Loss, grad_feats, grad_weight and center of ``fused_linear_dino_loss``. The kernels
    compute the loss from the logits in fp32, but write the logits' gradient in place
    into the (fp16/bf16) logits and multiply it in that dtype, adding a chunk's
    ``grad_weight`` in fp32 after rounding it: grad_feats may be off by that rounding
    of dlogits (``eps |dlogits| |W|``), grad_weight by it and the chunks' roundings
    (``2 eps |dlogits|^T |feats|``), each output by one rounding of its own."""
    sf, tf, w = (x.to(dtype) for x in (sf64, tf64, w64))
    tw = None if teacher_weight64 is None else teacher_weight64.to(dtype)
    c = c64.float()
    formula_opts = {k: v for k, v in opts.items() if k not in ("update_center", "chunk_rows")}
    with smsd.use_backend(backend):
        got = _run_fused(sf, tf, w, c, teacher_weight=tw, **opts)
    exact = fused_formula(*(x.double() for x in (sf, tf, w, c)), dtype,
                          None if tw is None else tw.double(), **formula_opts)
    low = computes_in(backend, dtype)
    base = fused_formula(*(x.to(low) for x in (sf, tf, w)), c, dtype,
                         None if tw is None else tw.to(low), **formula_opts)
    K, D = w.shape

    def oracle(s, t, w_, tw_, c_):
        return fused_formula(s, t, w_, c_, dtype, tw_, **formula_opts)[:4]

    inputs = [x.double() for x in (sf, tf, w, w if tw is None else tw, c)]
    floor = floors(oracle, inputs, max(K, D), backend, dtype)
    floor[0] = max(floor[0], loss_floor(float(exact[0]), sf.shape[0] * K, backend, dtype))
    by_design = low != dtype
    eps = torch.finfo(dtype).eps
    dlogits = exact[4].abs()
    rounding = [None, eps * dlogits @ w.double().abs(), 2 * eps * dlogits.T @ sf.double().abs(),
                None] if by_design else [None] * 4
    names = ("loss", "grad_feats", "grad_weight", "center")
    return {name: accuracy(got[i], base[i], exact[i], floor=floor[i], rounding=rounding[i])
            for i, name in enumerate(names)}


# ---------------------------------------------------------------- attention
def _run_attention(fn, dtype, qkv, grad, kwargs):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in qkv]
    out = fn(*leaves, **kwargs)
    out.backward(grad.to(dtype))
    return [out.detach(), *(t.grad for t in leaves)]


def longest_view(q, *, index=None, cu_seqlens=None, scale=None) -> int:
    if cu_seqlens is not None:
        return int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
    return index.shape[1] if index is not None else q.shape[2]


def _cancellation(grad, qkv, grad_out, dtype, scale) -> Accuracy:
    """dq and dk of 1-token views are exactly 0 (a softmax of one score is constant), but
    an implementation that takes delta = rowsum(dO * O) gets p * (dO.v - dO.o): two equal
    dot products rounded differently. The ulp of those terms bounds it:
    2 eps * d * |dO| |V| * max(|Q|, |K|) * scale."""
    q, k, v = qkv
    d = q.shape[-1]
    qk = max(float(q.abs().max()), float(k.abs().max()))
    terms = d * float(grad_out.abs().max()) * float(v.abs().max()) * qk * scale
    return Accuracy(float(grad.detach().double().abs().max()), 0.0,
                    2 * torch.finfo(dtype).eps * terms)


def check_attention(dtype, qkv64, grad64, backend, **kwargs) -> dict[str, Accuracy]:
    """out, dq, dk, dv of ``attention`` on ``backend`` under the rule (module docstring).

    For the kernels in fp16/bf16 the flash-attention rule (2x the error of plain PyTorch,
    ``F.scaled_dot_product_attention`` in the same dtype) must hold as well (``*_flash``),
    so the per-element bound never admits more than the rule it replaced.
    """
    rounded = [t.to(dtype).double() for t in (*qkv64, grad64)]
    with smsd.use_backend(backend):
        got = _run_attention(attention, dtype, rounded[:3], rounded[3], kwargs)
    exact, magnitudes = oracles.attention(*rounded, **kwargs)
    low = computes_in(backend, dtype)
    base, _ = oracles.attention(*(t.to(low) for t in rounded), **kwargs)
    view = longest_view(qkv64[0], **kwargs)
    floor = floors(lambda *xs: oracles.attention(*xs, **kwargs)[0], rounded,
                   max(view, qkv64[0].shape[-1]), backend, dtype)
    by_design = low != dtype  # a kernel rounding P and dS to dtype by design
    eps = torch.finfo(dtype).eps
    plain = (_run_attention(reference.attention, dtype, rounded[:3], rounded[3], kwargs)
             if by_design else None)
    results = {}
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        results[name] = accuracy(got[i], base[i], exact[i], floor=floor[i],
                                 rounding=eps * magnitudes[i] if by_design else None)
        if by_design:
            results[f"{name}_flash"] = accuracy(got[i], plain[i], exact[i], floor=floor[i])
    if view == 1:
        scale = kwargs.get("scale") or qkv64[0].shape[-1] ** -0.5
        for i, name in ((1, "dq"), (2, "dk")):
            results[name] = _cancellation(got[i], rounded[:3], rounded[3], dtype, scale)
            results.pop(f"{name}_flash", None)
    return results


def cu_seqlens(lengths, device="cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


# ---------------------------------------------------------------- masked_sample
def check_masked_sample(x64, index, perm, grad64, dtype, backend) -> dict[str, Accuracy]:
    """Forward (a copy: exact) and gradient. Without repeated indices each gradient row
    is a copy or zero (exact); with repeats the rows are sums: the rule, with the fp32
    baseline for the kernels (they add in fp32 and round once)."""
    x = x64.detach().to(dtype, copy=True).requires_grad_(True)
    with smsd.use_backend(backend):
        out = masked_sample(x, index, perm)
    g = grad64.to(dtype)
    out.backward(g)
    cpu = [t if t is None else t.cpu() for t in (x.detach(), index, perm, g)]
    expected = oracles.masked_sample(cpu[0], cpu[1], cpu[2])
    results = {"out": Accuracy(max_error(out, expected), 0.0, 0.0)}
    exact = oracles.masked_sample_grad(cpu[3].double(), cpu[1], cpu[2], x.shape[1])
    src = index if perm is None else torch.gather(perm.long(), 1, index.long())
    repeats = bool((src.sort(1).values.diff(dim=1) == 0).any()) if src.shape[1] > 1 else False
    if not repeats:
        results["grad"] = Accuracy(max_error(x.grad, exact), 0.0, 0.0)
        return results
    low = computes_in(backend, dtype)
    base = oracles.masked_sample_grad(cpu[3].to(low), cpu[1], cpu[2], x.shape[1])
    count = int(torch.stack([torch.bincount(r, minlength=x.shape[1]) for r in src.cpu()]).max())
    def fn(t):
        return [oracles.masked_sample_grad(t, cpu[1], cpu[2], x.shape[1])]

    if low == torch.float64:  # an fp64 kernel: the floor of fp64 sums
        floor = rounding_floor(fn, [cpu[3].double()], count, unit_roundoff=2.0**-53)[0]
    else:
        floor = floors(fn, [cpu[3].double()], count, backend, dtype)[0]
    results["grad"] = accuracy(x.grad, base, exact, floor=floor)
    return results


# ---------------------------------------------------------------- GPU checks (script)
def _gpu_attention(case: str) -> None:
    gen = torch.Generator().manual_seed(7)
    for dtype in DTYPES:
        for d in (64, 128):  # d=128 (and fp32): the wide tiles
            if case == "packed":
                lengths = [197, 49, 1, 0, 130, 98]
                shape, kwargs = (sum(lengths), 6, d), {"cu_seqlens": cu_seqlens(lengths, "cuda")}
                grad_shape = shape
            else:
                B, H, N, M = 2, 6, 197, 98
                shape = (B, H, N, d)
                index = torch.rand(B, N, generator=gen).argsort(1)[:, :M].cuda()
                kwargs = {"index": index} if case == "index" else {}
                grad_shape = (B, H, M if case == "index" else N, d)
            qkv = [torch.randn(shape, generator=gen, dtype=torch.float64).cuda()
                   for _ in range(3)]
            grad = torch.randn(grad_shape, generator=gen, dtype=torch.float64).cuda()
            results = check_attention(dtype, qkv, grad, "triton", **kwargs)
            assert_all_ok(results, f"attention {case} {dtype} d={d}:")
            print(f"attention {case} {dtype} d={d}: ok", flush=True)


def _gpu_masked_sample() -> None:
    gen = torch.Generator().manual_seed(3)
    for dtype in (*DTYPES, torch.float64):
        for B, N, D, K, repeats in ((4, 197, 384, 98, False), (2, 50, 33, 50, True)):
            x = torch.randn(B, N, D, generator=gen, dtype=torch.float64).cuda()
            index = (torch.randint(0, N, (B, K), generator=gen) if repeats
                     else torch.rand(B, N, generator=gen).argsort(1)[:, :K]).cuda()
            perm = torch.rand(B, N, generator=gen).argsort(1).cuda()
            grad = torch.randn(B, K, D, generator=gen, dtype=torch.float64).cuda()
            results = check_masked_sample(x, index, perm, grad, dtype, "triton")
            assert_all_ok(results, f"masked_sample {dtype} repeats={repeats}:")
            print(f"masked_sample {dtype} B={B} N={N} D={D} K={K}: ok", flush=True)


def _gpu_dino_loss() -> None:
    for K in (65536, 60000):
        for teacher_scale in (0.1, 1.0):
            student, teacher, center = dino_inputs(10, 2, 4, K, teacher_scale=teacher_scale,
                                                   device="cuda")
            for dtype in DTYPES:
                results = check_dino_loss(student, teacher, center, dtype, "triton",
                                          n_student_views=10)
                assert_all_ok(results, f"dino_loss K={K} {dtype}:")
                print(f"dino_loss K={K} teacher_scale={teacher_scale} {dtype}: ok", flush=True)


GPU_CASES = {
    "attention-dense": lambda: _gpu_attention("dense"),
    "attention-index": lambda: _gpu_attention("index"),
    "attention-packed": lambda: _gpu_attention("packed"),
    "masked-sample": _gpu_masked_sample,
    "dino-loss": _gpu_dino_loss,
}


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    assert not smsd.backend.triton_interpret_mode(), "run without TRITON_INTERPRET"
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 baseline must be fp32
    GPU_CASES[sys.argv[1]]()
