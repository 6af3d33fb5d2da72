"""End-to-end training-step benchmark: smsd's :class:`~smsd.protocol.distill.DistillStep`
against the plain PyTorch step, in the same run (issue 9).

Every variant runs the server's full step on the same shapes: draw the views, gather
them, EMA teacher on the 2 global views, student on all views, DINO head and loss,
backward, AdamW (fused on CUDA), EMA and center updates. Variants:

* ``smsd``: DistillStep with packed varlen attention, one fused gather of all views and
  the fused head + loss (``fused_linear_dino_loss``); ``smsd+compile`` compiles
  the step's whole forward with ``torch.compile(fullgraph=True)`` (``compile_step``: the
  smsd ops are custom ops inside the graph); ``smsd+ckpt`` checkpoints the first
  ``--checkpoint-blocks`` student blocks (activation memory for time); ``smsd-unfused``:
  DistillStep with only
  ``packed=True`` (what the server ran before this benchmark).
* ``torch-eager``: the anchor's step (``/work/shared/anchors/anchors_vit.py``): timm-style
  blocks with SDPA, views of one size batched together, eager DINO loss.
* ``torch-compile``: the same with ``torch.compile`` on body and head (static shapes).
* ``torch-loop``: the naive loop, one forward per view.

For each: median step time, img/s, peak memory (CUDA) and, in a separate pass with a
synchronizing timer between phases, the per-phase breakdown (:data:`PHASES`).

    python benchmarks/train_step.py --preset vit_small --preset vit_base   # a GPU
    python benchmarks/train_step.py --tiny --steps 2                       # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_write_bytes
from ..models import DINOHead, ViTBody, ViTConfig, vit_base, vit_small, vit_tiny
from ..nn import DINOLoss
from ..ops import reference, sample_views
from ..protocol.distill import PHASES, DistillStep, StepSchedule, StudentModel
from .runner import environment

__all__ = ["PRESETS", "VARIANTS", "Preset", "benchmark", "main", "run_preset"]

# 2 global views of 75% and 8 local views of 25% of the tokens: 2 x 147 + 8 x 49 at N=196
KEEP = (0.75,) * 2 + (0.25,) * 8


@dataclass(frozen=True)
class Preset:
    config: ViTConfig
    batch: int
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256


PRESETS = {
    "vit_small": Preset(vit_small(), 256),
    "vit_base": Preset(vit_base(), 128),
    # CPU sizes: "tiny" for CI (seconds), "cpu_small" a ViT-Ti/16 with a 16,384-way head
    "tiny": Preset(ViTConfig(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2),
                   4, out_dim=1024, hidden_dim=128, bottleneck_dim=32),
    "cpu_small": Preset(vit_tiny(), 4, out_dim=16384, hidden_dim=512, bottleneck_dim=128),
}
VARIANTS = ("smsd", "smsd+compile", "smsd+ckpt", "smsd-unfused", "torch-eager",
            "torch-compile", "torch-loop")
DEFAULT_VARIANTS = ("smsd", "smsd+compile", "smsd-unfused", "torch-eager", "torch-compile",
                    "torch-loop")

Mark = Callable[[str], None]


# ---------------------------------------------------------------- the plain PyTorch step
class PlainAttention(nn.Module):
    """timm's ViT attention: one qkv projection and ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class PlainBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PlainAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()  # timm names: mlp.fc1, mlp.fc2
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PlainBody(nn.Module):
    """timm's ViT body on position-free tokens (the anchor's ``body``); loads a
    :class:`~smsd.models.ViTBody` state dict (same names)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.blocks = nn.ModuleList(
            PlainBlock(config.embed_dim, config.num_heads, config.mlp_ratio, config.qkv_bias)
            for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


class PlainStep:
    """The anchor's step, plus the EMA teacher update the server also does.

    ``grouped``: views of one size go through body and head together (the anchor);
    otherwise one forward per view (the naive loop). ``compiled``: ``torch.compile``
    on body and head with static shapes (the loss stays eager, as in the anchor).
    """

    def __init__(self, body: ViTBody, head: DINOHead, preset: Preset, device: torch.device,
                 *, grouped: bool = True, compiled: bool = False) -> None:
        self.student = nn.ModuleDict({"body": PlainBody(body.config), "head": head}).to(device)
        self.student["body"].load_state_dict(body.state_dict())
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.grouped = grouped
        self.device = device
        self.center = torch.zeros(1, preset.out_dim, device=device)
        self.optimizer = _adamw(self.student.parameters(), device)
        self._student_params = list(self.student.parameters())
        self._teacher_params = list(self.teacher.parameters())
        self.bodies = {name: model["body"] for name, model in
                       (("student", self.student), ("teacher", self.teacher))}
        self.heads = {name: model["head"] for name, model in
                      (("student", self.student), ("teacher", self.teacher))}
        if compiled:
            for table in (self.bodies, self.heads):
                for name, module in table.items():
                    table[name] = torch.compile(module, dynamic=False)

    def _outputs(self, who: str, views: Sequence[torch.Tensor]) -> torch.Tensor:
        body, head = self.bodies[who], self.heads[who]
        if not self.grouped:
            return torch.cat([head(body(v)) for v in views]).float()
        out, start = [], 0
        while start < len(views):  # consecutive views of one size: one batch
            stop = start
            while stop < len(views) and views[stop].shape[1] == views[start].shape[1]:
                stop += 1
            out.append(head(body(torch.cat(views[start:stop]))))
            start = stop
        return torch.cat(out).float()

    def __call__(self, x: torch.Tensor, index: Sequence[torch.Tensor], schedule: StepSchedule,
                 mark: Mark) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = schedule.lr, schedule.weight_decay
        autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                                  enabled=self.device.type == "cuda")
        with autocast:
            views = [torch.gather(x, 1, i[..., None].expand(-1, -1, x.shape[-1]))
                     for i in index]
            mark("sampling")
            with torch.no_grad():
                teacher_out = self._outputs("teacher", views[:2])
            mark("teacher_fwd")
            student_out = self._outputs("student", views)
            mark("student_fwd")
        loss = reference.dino_loss(student_out, teacher_out, self.center,
                                   n_student_views=len(index), teacher_temp=0.04)
        mark("loss")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self._teacher_params, self._student_params,
                                 1.0 - schedule.momentum)
        mark("optimizer_ema")
        return loss.detach()


def _adamw(params, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")


# ---------------------------------------------------------------- variants
def _build(variant: str, preset: Preset, device: torch.device, checkpoint_blocks: int):
    """``step(x, index, schedule, mark)`` for one variant, on freshly seeded models."""
    torch.manual_seed(0)
    cfg = preset.config
    body = ViTBody(cfg)
    head = DINOHead(cfg.embed_dim, preset.out_dim, preset.hidden_dim, preset.bottleneck_dim)
    if variant.startswith("torch-"):
        return PlainStep(body, head, preset, device,
                         grouped=variant != "torch-loop", compiled=variant == "torch-compile")
    student = StudentModel(body, head).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    loss_fn = DINOLoss(preset.out_dim, len(KEEP), 0.04, 0.04, 0, 1).to(device)
    fast = variant != "smsd-unfused"
    step = DistillStep(student, teacher, loss_fn, _adamw(student.parameters(), device),
                       packed=True, fused_gather=fast, fused_head_loss=fast,
                       compile_step=variant == "smsd+compile",
                       checkpoint_blocks=checkpoint_blocks if variant == "smsd+ckpt" else 0)

    def run(x, index, schedule, mark: Mark):
        step.on_phase = mark
        return step(x, index, schedule)

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _no_mark(_phase: str) -> None:
    pass


class _Bench:
    """One variant, built on freshly seeded models, with its own data and view draws."""

    def __init__(self, variant: str, preset: Preset, device: torch.device,
                 checkpoint_blocks: int) -> None:
        cfg = preset.config
        self.variant, self.preset, self.device = variant, preset, device
        self.step = _build(variant, preset, device, min(checkpoint_blocks, cfg.depth))
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.x = torch.randn(preset.batch, cfg.n_tokens, cfg.embed_dim, device=device,
                             generator=self.gen)
        self.schedule = StepSchedule(epoch=0, lr=1e-4, weight_decay=0.04, momentum=0.996)
        self.times: list[float] = []
        self.phases = _PhaseTimer(device)
        self.loss = torch.zeros(())

    def one(self, mark: Mark = _no_mark) -> torch.Tensor:
        cfg = self.preset.config
        index = sample_views(self.preset.batch, cfg.n_tokens, KEEP, generator=self.gen,
                             device=self.device)
        self.loss = self.step(self.x, index, self.schedule, mark)
        return self.loss

    def timed(self) -> None:
        """One step timed as a whole (CUDA events on a GPU)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.one()
            end.record()
            end.synchronize()
            self.times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            self.one()
            self.times.append((time.perf_counter() - t0) * 1e3)

    def timed_phases(self) -> None:
        """One step with the device synchronized at every phase boundary."""
        self.phases.start()
        self.one(self.phases)

    def row(self, peak_gib: float | None) -> dict:
        ms = statistics.median(self.times)
        return {"variant": self.variant, "ms": ms, "img_per_s": self.preset.batch / ms * 1e3,
                "peak_gib": peak_gib, "loss": float(self.loss),
                "phases_ms": {p: statistics.median(t) for p, t in self.phases.times.items()
                              if t}}


def measure(variant: str, preset: Preset, device: torch.device, *, steps: int,
            warmup: int, checkpoint_blocks: int = 0) -> dict:
    """Median step time, img/s, peak memory (CUDA: everything allocated, as
    ``max_memory_allocated`` reports it) and the phase breakdown of one variant."""
    bench = _Bench(variant, preset, device, checkpoint_blocks)
    for _ in range(warmup):
        bench.one()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        bench.timed()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    for _ in range(steps):
        bench.timed_phases()
    return bench.row(peak)


def measure_interleaved(variants: Sequence[str], preset: Preset, device: torch.device, *,
                        steps: int, warmup: int, checkpoint_blocks: int = 0) -> list[dict]:
    """All variants at once, one step of each in turn: on a shared machine whose load
    drifts, every variant sees the same conditions. No peak memory (all are resident)."""
    benches = [_Bench(v, preset, device, checkpoint_blocks) for v in variants]
    for _ in range(warmup):
        for bench in benches:
            bench.one()
    for _ in range(steps):
        for bench in benches:
            bench.timed()
    for _ in range(steps):
        for bench in benches:
            bench.timed_phases()
    return [bench.row(None) for bench in benches]


class _PhaseTimer:
    """An ``on_phase`` hook: synchronizes the device and records the time since the last
    boundary under the phase that just ended."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, list[float]] = {p: [] for p in PHASES}
        self.last = 0.0

    def start(self) -> None:
        _sync(self.device)
        self.last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.times[phase].append((now - self.last) * 1e3)
        self.last = now


def _echo_row(row: dict, echo: Callable[[str], None]) -> None:
    peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
    phases = " ".join(f"{p}={t:.1f}" for p, t in row["phases_ms"].items())
    echo(f"{row['variant']:<15}{row['ms']:>10.1f}{row['img_per_s']:>10.1f}{peak:>10}  {phases}")


def run_preset(name: str, device: torch.device, variants: Sequence[str], *, steps: int,
               warmup: int, checkpoint_blocks: int = 0, interleave: bool = False,
               batch: int | None = None, echo: Callable[[str], None] = print) -> dict:
    preset = PRESETS[name]
    if batch is not None:
        preset = dataclasses.replace(preset, batch=batch)
    cfg = preset.config
    sizes = [round(k * cfg.n_tokens) for k in KEEP]
    result = {"preset": name, "batch": preset.batch, "embed_dim": cfg.embed_dim,
              "depth": cfg.depth, "n_tokens": cfg.n_tokens, "view_tokens": sizes,
              "out_dim": preset.out_dim, "checkpoint_blocks": checkpoint_blocks,
              "interleaved": interleave, "rows": []}
    echo(f"## {name}: B={preset.batch}, D={cfg.embed_dim}, depth {cfg.depth}, views "
         f"2x{sizes[0]} + {len(sizes) - 2}x{sizes[-1]} tokens, {preset.out_dim}-way head")
    echo(f"{'variant':<15}{'ms':>10}{'img/s':>10}{'peak GiB':>10}  phases (ms, synced pass)")
    if interleave:
        result["rows"] = measure_interleaved(variants, preset, device, steps=steps,
                                             warmup=warmup, checkpoint_blocks=checkpoint_blocks)
        for row in result["rows"]:
            _echo_row(row, echo)
    for variant in variants if not interleave else ():
        row = measure(variant, preset, device, steps=steps, warmup=warmup,
                      checkpoint_blocks=checkpoint_blocks)
        result["rows"].append(row)
        _echo_row(row, echo)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = {r["variant"]: r["img_per_s"] for r in result["rows"]}
    for row in result["rows"]:
        for ref in ("torch-eager", "torch-compile"):
            if ref in base:
                row[f"speedup_vs_{ref}"] = row["img_per_s"] / base[ref]
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when visible, else cpu")
    p.add_argument("--preset", action="append", choices=tuple(PRESETS), default=None,
                   help="repeatable; default vit_small and vit_base on cuda, tiny on cpu")
    p.add_argument("--tiny", action="store_true", help="same as --preset tiny")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    p.add_argument("--checkpoint-blocks", type=int, default=9,
                   help="student blocks smsd+ckpt recomputes in the backward pass (default 9 "
                   "of 12: ViT-S/B activations from ~30 GiB to ~12 GiB)")
    p.add_argument("--batch", type=int, default=None,
                   help="override the presets' batch size (e.g. a quick CPU try of vit_small)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--interleave", action="store_true",
                   help="time all variants round-robin (a shared CPU whose load drifts); "
                   "no peak memory")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is steadier on a busy host")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    return p


def benchmark(device: str | torch.device | None = None, presets: Sequence[str] | None = None,
              variants: Sequence[str] = DEFAULT_VARIANTS, *, batch: int | None = None,
              steps: int = 10, warmup: int = 3, checkpoint_blocks: int = 9,
              interleave: bool = False, json_path: str | os.PathLike | None = None,
              echo=print) -> dict:
    """Time ``variants`` on each preset (default: ViT-S and ViT-B on CUDA, the tiny model
    on the CPU); with ``json_path``, write the report there. Returns the report."""
    if steps < 1 or warmup < 0 or checkpoint_blocks < 0:
        raise ValueError(f"--steps must be >= 1, --warmup and --checkpoint-blocks >= 0, got "
                         f"{steps}, {warmup}, {checkpoint_blocks}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible")
    if batch is not None and batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    presets = list(presets or (["vit_small", "vit_base"] if device.type == "cuda" else ["tiny"]))
    env = environment(device)
    echo(f"# train step on {env['card']}, torch {env['torch']}, {env['date']}")
    report = {"environment": env, "phases": list(PHASES), "steps": steps,
              "results": [run_preset(name, device, list(variants), batch=batch, steps=steps,
                                     warmup=warmup, checkpoint_blocks=checkpoint_blocks,
                                     interleave=interleave, echo=echo)
                          for name in presets]}
    if json_path is not None:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(report, indent=1).encode())
        echo(f"wrote {path}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    benchmark(args.device, ["tiny"] if args.tiny else args.preset, args.variants,
              batch=args.batch, steps=args.steps, warmup=args.warmup,
              checkpoint_blocks=args.checkpoint_blocks, interleave=args.interleave,
              json_path=args.json, echo=lambda s: print(s, flush=True))
    return 0
