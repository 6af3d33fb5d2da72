"""Registers, spills, shared memory and occupancy of every hot Triton kernel on sm_90,
from ``ptxas -v``, with no GPU (issue 16).

    python benchmarks/kernel_resources.py [--json FILE] [--markdown] [--only GROUP ...]

Each kernel is compiled exactly as its real launch specializes it. The public launch
functions of ``kernels/masked_sample.py``, ``kernels/dino_loss.py`` and
``kernels/attention.py`` are called on CPU tensors (``torch.empty``: nothing is filled,
nothing runs) at the goal shapes of the issue, with ``JITFunction.run`` swapped for a
recorder. For each launch the recorder applies what Triton's own ``run`` does for a
CUDA sm_90 target: the argument binder Triton builds from the backend
(``create_function_from_signature`` with ``CUDABackend(GPUTarget("cuda", 90, 32))``:
pointers and ints divisible by 16 get tt.divisibility=16, ints equal to 1 become
constants) and ``JITFunction._pack_args`` (options, signature, constexprs, attributes).
CPU tensors are 64-byte aligned, as CUDA allocations are (512 B), so the pointer
divisibility matches a GPU run. Identical specializations are compiled once.

Each compiled kernel's PTX is run through the ptxas bundled with Triton with the flags
Triton's ``make_cubin`` uses (``-lineinfo``, ``--fmad=false`` when the kernel disables
FP fusion, ``-v``, ``--gpu-name=sm_90a``); the register count is cross-checked against
``cuobjdump -res-usage`` of the cubin Triton itself produced. Occupancy follows the CUDA
occupancy rules for compute capability 9.0 (see ``occupancy``).

Prints one table row per distinct specialization; exits 1 when a 16-bit (fp16 / bf16)
kernel spills or a kernel needs more shared memory than an sm_90 CTA may have, and 2
when a launch cannot be captured or compiled (the message names the kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- sm_90 limits
# CUDA C++ Programming Guide, "Compute Capabilities", technical specifications for 9.0,
# and the occupancy rules of the CUDA Occupancy Calculator (cuda_occupancy.h:
# cudaOccMaxBlocksPerSMRegsLimit / ...SmemLimit / ...WarpsLimit):
#   * registers: 65,536 32-bit registers per SM (and per CTA), at most 255 per thread;
#     allocated per warp, regs/thread x 32 rounded up to the 256-register unit, in 4
#     SM sub-partitions of 16,384 registers each (a warp lives in one sub-partition);
#   * shared memory: up to 228 KB per SM (the largest carveout), at most 227 KB per CTA
#     (opt-in), 1 KB of it reserved per CTA by the system, allocated in 128 B units;
#   * at most 2,048 threads (64 warps) and 32 CTAs resident per SM.
# The occupancy is the minimum over these limits.
SM90 = {
    "regs_per_sm": 65536, "regs_per_cta": 65536, "max_regs_per_thread": 255,
    "reg_alloc_unit": 256, "sub_partitions": 4,
    "smem_per_sm": 228 * 1024, "smem_per_cta": 227 * 1024, "smem_reserved_per_cta": 1024,
    "smem_alloc_unit": 128,
    "max_threads_per_sm": 2048, "max_warps_per_sm": 64, "max_ctas_per_sm": 32,
}
SMS = 132  # SMs of an H100 SXM and an H200: waves = grid CTAs / (SMS x CTAs/SM)


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(registers: int, smem_bytes: int, warps: int) -> dict:
    """Resident CTAs and warps per sm_90 SM for a kernel using ``registers`` per thread,
    ``smem_bytes`` of shared memory (static + dynamic) per CTA and ``warps`` per CTA, and
    which limit binds."""
    lim = SM90
    regs_per_warp = _round_up(max(registers, 1) * 32, lim["reg_alloc_unit"])
    # the per-CTA check counts warps rounded up to the sub-partitions (cuda_occupancy.h)
    regs_per_cta = _round_up(warps, lim["sub_partitions"]) * regs_per_warp
    if registers > lim["max_regs_per_thread"] or regs_per_cta > lim["regs_per_cta"]:
        by_regs = 0
    else:
        warps_per_sub = (lim["regs_per_sm"] // lim["sub_partitions"]) // regs_per_warp
        by_regs = warps_per_sub * lim["sub_partitions"] // warps
    smem = _round_up(smem_bytes + lim["smem_reserved_per_cta"], lim["smem_alloc_unit"])
    by_smem = 0 if smem_bytes > lim["smem_per_cta"] else lim["smem_per_sm"] // smem
    by_warps = min(lim["max_warps_per_sm"], lim["max_threads_per_sm"] // 32) // warps
    limits = {"registers": by_regs, "shared memory": by_smem, "warps": by_warps,
              "CTAs": lim["max_ctas_per_sm"]}
    ctas = min(limits.values())
    binding = [name for name, n in limits.items() if n == ctas]
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * warps, "limited_by": binding,
            "limits": limits}


# ---------------------------------------------------------------- goal shapes
@dataclass
class Scenario:
    group: str  # "masked_sample", "dino_loss", "attention"
    shape: str  # the tensors' shape, as the table shows it
    variant: str  # what else sets the launch apart ("K=147 perm"), or ""
    dtype: str  # "bf16", "fp16", "fp32"
    run: object = field(repr=False)  # () -> None, calls the public launch functions
    hot: bool = True  # False: an opt-in path, reported but never failed

    @property
    def label(self) -> str:
        return f"{self.shape} {self.variant}".strip()


def _dtypes():
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def masked_sample_scenarios() -> list[Scenario]:
    """ViT-S tokens x [256, 196, 384]; K = 147 (75 %) and 49 (25 %); with a permutation
    (the client's path) and without (the server's views, ``unique=True``); forward and
    backward, the backward's gradient contiguous as the op passes it."""
    import inspect

    import torch

    from smsd import _kernels

    B, N, D = 256, 196, 384
    out = []
    for dname in ("bf16", "fp32"):
        for K in (147, 49):
            for with_perm in (True, False):
                def run(dname=dname, K=K, with_perm=with_perm):
                    ms = _kernels.load("masked_sample")
                    dtype = _dtypes()[dname]
                    x = torch.empty(B, N, D, dtype=dtype)
                    # int64 as smsd.ops.sample_views gives it; the values are never read
                    # by a kernel (the CSR of the backward sorts them on the host)
                    index = torch.randint(0, N, (B, K), dtype=torch.int64)
                    perm = (torch.arange(N).expand(B, N).contiguous() if with_perm
                            else None)
                    ms.masked_sample_forward(x, index, perm)
                    grad_out = torch.empty(B, K, D, dtype=dtype)
                    params = inspect.signature(ms.masked_sample_backward).parameters
                    if "unique" in params:
                        for unique in (True, False):
                            ms.masked_sample_backward(grad_out, index, perm, N, unique=unique)
                    else:
                        ms.masked_sample_backward(grad_out, index, perm, N)
                variant = f"K={K} " + ("perm" if with_perm else "no perm")
                out.append(Scenario("masked_sample", f"x[{B},{N},{D}]", variant, dname, run))
    return out


def dino_loss_scenarios() -> list[Scenario]:
    """640 student rows (10 views x B = 64) x K = 65,536, 128 teacher rows (2 views), the
    center fp32 [1, K]; student and teacher in fp32 and bf16. Calls what smsd.ops runs on
    a GPU: ``forward`` / ``backward`` where the kernel module has them (the GPU path
    writes the gradient in the backward), and ``teacher_stats`` / ``student_loss_grad``
    where it has those (fused_linear_dino_loss: chunks of rows whose logits are
    overwritten by their gradient)."""
    import torch

    from smsd import _kernels

    S_VIEWS, T_VIEWS, B, K = 10, 2, 64, 65536
    ts, tt = 0.1, 0.04
    n_pairs = T_VIEWS * (S_VIEWS - 1)
    scale = 1.0 / (n_pairs * B)
    out = []
    for dname in ("bf16", "fp32"):
        def run(dname=dname):
            dl = _kernels.load("dino_loss")
            dtype = _dtypes()[dname]
            student = torch.empty(S_VIEWS * B, K, dtype=dtype)
            teacher = torch.empty(T_VIEWS * B, K, dtype=dtype)
            center = torch.empty(1, K, dtype=torch.float32)
            found = False
            if hasattr(dl, "forward") and hasattr(dl, "backward"):
                found = True
                fwd = dl.forward(student, teacher, center, batch=B, n_teacher_views=T_VIEWS,
                                 student_temp=ts, teacher_temp=tt)
                dl.backward(torch.ones((), dtype=torch.float32), student, teacher, center,
                            fwd.row_stats, fwd.teacher_max, fwd.teacher_inv_sum, batch=B,
                            n_teacher_views=T_VIEWS, student_temp=ts, teacher_temp=tt,
                            grad_scale=scale)
            if hasattr(dl, "teacher_stats") and hasattr(dl, "student_loss_grad"):
                found = True
                stats, _ = dl.teacher_stats(teacher, center, tt)
                try:
                    from smsd.ops.fused_linear_dino_loss import default_chunk_rows
                    chunk = default_chunk_rows(student.shape[0], K, student.element_size())
                except Exception:  # mid-edit: the 16 MiB-of-logits rule of that module
                    chunk = max(1, 16 * 2**20 // (K * student.element_size()))
                for start in range(0, student.shape[0], chunk):
                    logits = student[start:start + chunk]
                    dl.student_loss_grad(
                        logits, teacher, center, stats, logits, row_offset=start, batch=B,
                        n_teacher_views=T_VIEWS, student_temp=ts, teacher_temp=tt,
                        grad_scale=scale)
            if not found:
                raise RuntimeError("kernels/dino_loss.py has neither forward/backward nor "
                                   "teacher_stats/student_loss_grad")
        out.append(Scenario("dino_loss", f"student[{S_VIEWS * B},{K}] teacher[{T_VIEWS * B},{K}]",
                            "", dname, run))
    return out


def attention_scenarios() -> list[Scenario]:
    """ViT-S attention, H = 6, d = 64, as smsd.ops.attention_qkv hands the kernels their
    tensors: q, k, v views of one ``[B, N, 3, H, d]`` / ``[T, 3, H, d]`` projection, the
    gradients written into views of one buffer of that layout (``out=``), index int64
    contiguous, cu_seqlens int32. Layouts: B = 256, N = 197 dense with no index, with a
    full-permutation index (M = 197) and with a K = 148 index; packed views of the
    multi-crop step, per image 2 x (147 + 1) + 8 x (49 + 1) tokens (T = 178,176,
    max_seqlen 148). Forward and backward."""
    import torch

    from smsd import _kernels

    B, N, H, d = 256, 197, 6, 64
    lengths = [148, 148, *[50] * 8] * B
    layouts = {"dense": None, "index M=197": N, "index M=148": 148, "packed": "packed"}
    out = []
    for dname in ("bf16", "fp16", "fp32"):
        for name, kind in [*layouts.items(), ("dense TMA (opt-in)", "tma")]:
            def run(dname=dname, kind=kind):
                att = _kernels.load("attention")
                dtype = _dtypes()[dname]
                scale = d ** -0.5
                if kind == "packed":
                    T = sum(lengths)
                    qkv = torch.empty(T, 3, H, d, dtype=dtype)
                    q, k, v = qkv.unbind(1)
                    grads = torch.empty_like(qkv).unbind(1)
                    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
                    cu[1:] = torch.tensor(lengths).cumsum(0)
                    index, max_seqlen = None, max(lengths)
                    shape = (T, H, d)
                else:
                    qkv = torch.empty(B, N, 3, H, d, dtype=dtype)
                    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
                    grads = tuple(t.transpose(1, 2) for t in torch.empty_like(qkv).unbind(2))
                    cu, max_seqlen = None, 0
                    index = (None if kind in (None, "tma") else
                             torch.argsort(torch.rand(B, N), dim=1)[:, :kind].contiguous())
                    shape = (B, H, index.shape[1] if index is not None else N, d)
                if kind == "tma":  # the descriptor forward, where attention_forward has it
                    att.attention_forward(q, k, v, None, None, 0, scale, tma=True)
                    return
                o, lse = att.attention_forward(q, k, v, index, cu, max_seqlen, scale)
                grad_out = torch.empty(shape, dtype=dtype)
                att.attention_backward(grad_out, q, k, v, o, lse, index, cu, max_seqlen, scale,
                                       out=grads)
            if kind == "tma":
                import inspect

                params = inspect.signature(_kernels.load("attention").attention_forward)
                if "tma" not in params.parameters or dname == "fp32":
                    continue
            shape = (f"H={H} d={d} packed T={sum(lengths)} (S={len(lengths)}, max_seqlen=148)"
                     if kind == "packed" else f"H={H} d={d} B={B} N={N}")
            out.append(Scenario("attention", shape, "" if kind == "packed" else name, dname,
                                run, hot=kind != "tma"))
    return out


SCENARIOS = {"masked_sample": masked_sample_scenarios, "dino_loss": dino_loss_scenarios,
             "attention": attention_scenarios}


# ---------------------------------------------------------------- capture
class CaptureError(RuntimeError):
    pass


@dataclass
class Spec:
    """One distinct specialization of one kernel, and the launches that gave it."""
    kernel: str  # the @triton.jit function's name
    module: str
    group: str
    dtype: str
    labels: list  # [(shape, variant)] of the launches
    grids: list
    hot: bool
    signature: dict
    constexprs: dict  # name -> value (tl.constexpr parameters)
    constants: dict  # other parameters the binder made constants (ints equal to 1, None)
    divisible: list  # parameters with tt.divisibility=16
    options: dict
    fn: object = field(repr=False, default=None)
    packed: tuple = field(repr=False, default=None)  # (signature, constexprs, attrs, options)


def _key(fn, signature, constexprs, attrs, options) -> str:
    return repr((fn.fn.__module__, fn.fn.__qualname__, sorted(signature.items()),
                 sorted(constexprs.items(), key=repr), sorted(attrs.items(), key=repr),
                 sorted(options.__dict__.items(), key=repr)))


def capture(scenarios: list[Scenario], capability: int = 90) -> list[Spec]:
    """Run each scenario with ``JITFunction.run`` recording instead of launching."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import autotuner
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binders: dict = {}
    specs: dict[str, Spec] = {}
    current: list[Scenario] = []
    launches = [0]

    def record(fn, *args, grid, warmup, **kwargs):
        sc = current[0]
        launches[0] += 1
        # what JITFunction.run adds before binding
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if fn not in binders:
            binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(
            backend, kwargs, bound, specialization, options)
        if callable(grid):
            grid = grid(bound)
        grid = tuple(int(g) for g in grid)
        # per dtype of the scenario too: a kernel whose inputs are all fp32 whatever the
        # logits' dtype (a combine of partials) gets a row under each dtype it serves
        key = sc.dtype + _key(fn, signature, constexprs, attrs, options)
        names = fn.arg_names
        label = (sc.shape, sc.variant)
        if key in specs:
            spec = specs[key]
            if label not in spec.labels:
                spec.labels.append(label)
            if grid not in spec.grids:
                spec.grids.append(grid)
            spec.hot = spec.hot or sc.hot
            return None
        kinds = {p.name: p.is_constexpr for p in fn.params}
        named = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
        specs[key] = Spec(
            kernel=fn.fn.__name__, module=fn.fn.__module__, group=sc.group, dtype=sc.dtype,
            labels=[label], grids=[grid], hot=sc.hot, signature=dict(signature),
            constexprs={n: v for n, v in named.items() if kinds[n]},
            constants={n: v for n, v in named.items() if not kinds[n]},
            divisible=sorted(names[path[0]] for path, a in attrs.items()
                             if any(k == "tt.divisibility" for k, _ in a)),
            options={k: v for k, v in options.__dict__.items()
                     if k in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion",
                              "maxnreg", "arch")},
            fn=fn, packed=(signature, constexprs, attrs, options),
        )
        return None

    def refuse_autotune(self, *args, **kwargs):
        raise CaptureError(f"{self.fn.fn.__name__} is autotuned: the config a GPU picks is "
                           "unknown without one")

    saved = JITFunction.run, autotuner.Autotuner.run
    JITFunction.run = record
    autotuner.Autotuner.run = refuse_autotune
    try:
        for sc in scenarios:
            current[:] = [sc]
            launches[0] = 0
            try:
                sc.run()
            except CaptureError:
                raise
            except Exception as exc:
                raise CaptureError(f"{sc.group} {sc.dtype} {sc.label}: launch not captured: "
                                   f"{type(exc).__name__}: {exc}") from exc
            if not launches[0]:
                raise CaptureError(f"{sc.group} {sc.dtype} {sc.label}: no Triton launch seen")
    finally:
        JITFunction.run, autotuner.Autotuner.run = saved
    return list(specs.values())


def defined_kernels(groups) -> set[str]:
    """Names of the launchable @triton.jit kernels (``*_kernel``) the modules define."""
    from triton.runtime.jit import JITFunction

    from smsd import _kernels

    names = set()
    for group in groups:
        module = _kernels.load(group)
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                names.add(name)
    return names


# ---------------------------------------------------------------- compile + ptxas
def _ptxas_flags(options) -> list[str]:
    """The flags of triton.backends.nvidia.compiler.CUDABackend.make_cubin (Triton 3.6)."""
    from triton import knobs

    if knobs.compilation.disable_line_info:
        flags = ["-lineinfo", "-suppress-debug-info"]
    elif knobs.nvidia.disable_ptxas_opt:
        flags = ["-g"]
    else:
        flags = ["-lineinfo"]
    if not options.enable_fp_fusion:
        flags.append("--fmad=false")
    flags.append("-v")
    if knobs.nvidia.disable_ptxas_opt:
        flags += ["--opt-level", "0"]
    if options.ptx_options:
        flags += options.ptx_options.split(" ")
    return flags


def _number(pattern: str, text: str) -> int:
    found = re.search(pattern, text)
    return int(found.group(1)) if found else 0


def measure(spec: Spec, capability: int = 90) -> dict:
    """Compile ``spec`` for sm_<capability> and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = spec.packed
    target = GPUTarget("cuda", capability, 32)
    compiled = triton.compile(ASTSource(spec.fn, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    ptx = compiled.asm["ptx"]
    arch = sm_arch_from_capability(capability)
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(capability).path, *_ptxas_flags(options), f"--gpu-name={arch}", src,
               "-o", cubin]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        triton_cubin = os.path.join(tmp, "triton.cubin")
        with open(triton_cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        cuobjdump = Path(get_ptxas(capability).path).with_name("cuobjdump")
        res = (subprocess.run([str(cuobjdump), "-res-usage", triton_cubin], capture_output=True,
                              text=True, check=True).stdout if cuobjdump.exists() else "")
    if "Used" not in log:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    use = {
        "registers": _number(r"Used (\d+) registers", log),
        "spill_stores": _number(r"(\d+) bytes spill stores", log),
        "spill_loads": _number(r"(\d+) bytes spill loads", log),
        "stack_frame": _number(r"(\d+) bytes stack frame", log),
        "static_smem": _number(r"(\d+) bytes smem", log),
        "dynamic_smem": int(compiled.metadata.shared),
        "cubin_registers": _number(r"REG:(\d+)", res) if res else None,
        "ptxas_log": log.strip(),
    }
    if use["cubin_registers"] is not None and use["cubin_registers"] != use["registers"]:
        raise RuntimeError(f"ptxas -v says {use['registers']} registers but Triton's cubin has "
                           f"{use['cubin_registers']}")
    use["smem"] = use["static_smem"] + use["dynamic_smem"]
    warps = options.num_warps * options.num_ctas
    use["threads"] = 32 * options.num_warps
    use.update(occupancy(use["registers"], use["smem"], warps))
    return use


# ---------------------------------------------------------------- report
def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def shape_text(labels) -> str:
    """``[(shape, variant)]`` as "shape: variant, variant; shape: ..."."""
    by_shape: dict[str, list[str]] = {}
    for shape, variant in labels:
        by_shape.setdefault(shape, [])
        if variant:
            by_shape[shape].append(variant)
    return "; ".join(f"{shape}: {', '.join(v)}" if v else shape for shape, v in by_shape.items())


def constexpr_summary(spec: Spec) -> str:
    """BLOCK sizes and set flags; false flags and None are left out."""
    parts = []
    for name, value in spec.constexprs.items():
        if value is None or value is False:
            continue
        parts.append(name if value is True else f"{name}={_fmt_value(value)}")
    return " ".join(parts)


COLUMNS = ("kernel", "dtype", "shape", "constexprs", "warps", "stages", "regs", "spill st/ld B",
           "smem B", "CTAs/SM", "warps/SM", "grid")


def rows(results: list[dict]) -> list[list[str]]:
    out = []
    for r in results:
        grids = r["grids"]
        ctas = max(g[0] * (g[1] if len(g) > 1 else 1) * (g[2] if len(g) > 2 else 1)
                   for g in grids)
        grid = "×".join(str(g) for g in max(grids, key=lambda g: (len(g), g)))
        waves = ctas / (SMS * max(r["ctas_per_sm"], 1))
        out.append([
            r["kernel"], r["dtype"], r["shape"], r["constexpr_summary"],
            str(r["options"]["num_warps"]), str(r["options"]["num_stages"]),
            str(r["registers"]), f"{r['spill_stores']}/{r['spill_loads']}",
            (f"{r['static_smem']}+{r['dynamic_smem']}" if r["static_smem"]
             else str(r["dynamic_smem"])),
            str(r["ctas_per_sm"]) + (" (regs)" if r["limited_by"] == ["registers"] else
                                     " (smem)" if r["limited_by"] == ["shared memory"] else ""),
            str(r["warps_per_sm"]),
            f"{grid} ({waves:.1f} waves)" if len(grids) == 1 else f"≤{grid} ({waves:.1f} waves)",
        ])
    return out


def markdown(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows(results):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def plain(results: list[dict]) -> str:
    table = [list(COLUMNS), *rows(results)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in table)


def failures(results: list[dict]) -> list[str]:
    bad = []
    for r in results:
        name = f"{r['kernel']} {r['dtype']} [{r['shape']}]"
        if (r["hot"] and r["dtype"] in ("bf16", "fp16")
                and (r["spill_stores"] or r["spill_loads"])):
            bad.append(f"{name}: spills {r['spill_stores']}/{r['spill_loads']} B")
        if r["smem"] > SM90["smem_per_cta"] or r["ctas_per_sm"] == 0:
            bad.append(f"{name}: does not fit an sm_90 SM ({r['smem']} B smem, "
                       f"{r['registers']} registers x {r['threads']} threads)")
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write every result (and ptxas logs) here")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table as Markdown (as BENCHMARKS.md has it)")
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS),
                        help="kernel groups to measure (default: all)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print each compile's time to stderr")
    args = parser.parse_args(argv)
    # the kernels must be JITFunctions, which is decided when they are defined
    if (os.environ.pop("TRITON_INTERPRET", "0") not in ("", "0")
            and any(m.startswith("smsd.kernels") for m in sys.modules)):
        sys.exit("run without TRITON_INTERPRET: the kernels were already interpreted")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.manual_seed(0)
    groups = args.only or list(SCENARIOS)
    t0 = time.perf_counter()
    try:
        scenarios = [sc for g in groups for sc in SCENARIOS[g]()]
        specs = capture(scenarios)
    except CaptureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t_capture = time.perf_counter() - t0
    captured = {s.kernel for s in specs}
    missing = sorted(defined_kernels(groups) - captured)
    results = []
    for spec in specs:
        t = time.perf_counter()
        try:
            use = measure(spec)
        except Exception as exc:
            print(f"error: {spec.kernel} ({spec.dtype}; {shape_text(spec.labels)}) failed to "
                  f"compile for sm_90: {type(exc).__name__}: {str(exc)[-2000:]}",
                  file=sys.stderr)
            return 2
        row = {f.name: getattr(spec, f.name) for f in fields(spec)
               if f.name not in ("fn", "packed")}
        row["shape"] = shape_text(spec.labels)
        row["constexpr_summary"] = constexpr_summary(spec)
        row["compile_s"] = round(time.perf_counter() - t, 2)
        row.update(use)
        results.append(row)
        if args.verbose:
            print(f"  compiled {spec.kernel} {spec.dtype} in {row['compile_s']:.1f} s",
                  file=sys.stderr)
    bad = failures(results)
    import triton

    report = {
        "triton": triton.__version__, "torch": torch.__version__, "target": "cuda sm_90a",
        "sm90_limits": SM90, "capture_s": round(t_capture, 2),
        "total_s": round(time.perf_counter() - t0, 2),
        "captured_kernels": sorted(captured), "uncaptured_kernels": missing,
        "failures": bad, "results": results,
    }
    print(markdown(results) if args.markdown else plain(results))
    print(f"{len(results)} specializations of {len(captured)} kernels from "
          f"{len(scenarios)} launch scenarios in {report['total_s']:.0f} s", file=sys.stderr)
    if missing:
        print(f"\nnote: kernels defined but never launched at the goal shapes: "
              f"{', '.join(missing)}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    if bad:
        print("\nFAIL:\n" + "\n".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
