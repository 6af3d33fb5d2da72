"""A lent GPU's session in three short stages, each one command, each row written the moment
it is measured (JSON lines under ``--out``), so a stage cut off by its timeout keeps what
it measured.

    PYTHONPATH=. timeout 280 python3 benchmarks/device_session.py --stage goals --out $OUT
    PYTHONPATH=. timeout 280 python3 benchmarks/device_session.py --stage correctness --out $OUT
    PYTHONPATH=. timeout 280 python3 benchmarks/device_session.py --stage rest --out $OUT

``goals``: the issue's goal rows with their baselines in the same run: the token gather
(masked_sample fwd / bwd), the DINO loss at 640 x 65,536 (fp32, bf16), permuted attention
at ViT-S B = 256, then the ViT-S/16 masked-sampling step (``smsd``, ``smsd+compile`` and
the compiled plain PyTorch step). ``correctness``: smsd's kernels against the fp64
reference on CUDA at those shapes (K = 65,536 included). ``rest``: every other benchmark
row and train-step variant, then ``smsd check``'s own cases. After each group, the
registers and spills of every Triton kernel compiled so far (``n_regs`` / ``n_spills``
of the loaded kernels). Each stage stops starting new items past ``--budget-s`` (default
240 s, under the 280 s timeout). Needs torch and triton only: no compiled extension.
``--smoke`` runs the plumbing at tiny shapes on the CPU (Triton's interpreter), as the
test suite does.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

STAGES = ("goals", "correctness", "rest")


class Stage:
    """Rows of one stage, appended to ``<out>/<stage>.jsonl`` as they come."""

    def __init__(self, name: str, out: Path, budget_s: float, device: torch.device,
                 smoke: bool):
        self.name, self.device, self.smoke = name, device, smoke
        self.deadline = time.monotonic() + budget_s
        self.start = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / f"{name}.jsonl"
        self._file = self.path.open("a", encoding="utf-8")

    def emit(self, kind: str, **row) -> None:
        row = {"stage": self.name, "kind": kind, "t_s": round(time.monotonic() - self.start, 1),
               **row}
        line = json.dumps(row, default=str)
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        print(line, flush=True)

    def time_left(self) -> bool:
        return time.monotonic() < self.deadline

    def item(self, label: str, fn: Callable[[], None]) -> None:
        """Run one item unless the budget is spent; an error is a row, not the end."""
        if not self.time_left():
            self.emit("skipped", item=label, why="stage budget spent")
            return
        try:
            fn()
        except Exception as exc:  # report and go on: the other items still count
            self.emit("error", item=label, error=f"{type(exc).__name__}: {exc}"[:400],
                      trace=traceback.format_exc()[-1500:])
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


# ------------------------------------------------------------------ kernel resources
def _loaded_kernels() -> Iterator[tuple[str, object]]:
    from triton.runtime.jit import JITFunction

    from smsd import _kernels

    for group in ("masked_sample", "dino_loss", "attention"):
        module = _kernels.load(group)
        for name, fn in vars(module).items():
            if not isinstance(fn, JITFunction):
                continue
            for caches in getattr(fn, "device_caches", {}).values():
                for compiled in caches[0].values():
                    yield f"{group}.{name}", compiled


def kernel_resources(stage: Stage, seen: set) -> None:
    """One row per compiled Triton kernel not reported yet: registers, spills, shared memory
    as the driver loaded them."""
    for name, compiled in _loaded_kernels():
        if id(compiled) in seen:
            continue
        seen.add(id(compiled))
        meta = getattr(compiled, "metadata", None)
        stage.emit("kernel", kernel=name, n_regs=getattr(compiled, "n_regs", None),
                   n_spills=getattr(compiled, "n_spills", None),
                   shared=getattr(meta, "shared", None), num_warps=getattr(meta, "num_warps", None),
                   constants={k: v for k, v in (getattr(meta, "constants", None) or {}).items()
                              if isinstance(v, (int, float, bool))} if meta else None)


# ------------------------------------------------------------------ benchmarks
def bench_cases(stage: Stage, label: str, cases: list) -> None:
    from smsd.bench.runner import measure_cases

    budget = 0.2 if stage.smoke else 0.5
    for row in measure_cases(cases, stage.device, stage.ceiling, budget):
        stage.emit("bench", item=label, **row)


def _goal_cases(stage: Stage) -> dict[str, Callable[[], list]]:
    from smsd.bench import attention as attention_bench
    from smsd.bench import dino_loss as dino_bench
    from smsd.bench import masked_sample as gather_bench

    dev = stage.device
    kernels = ["triton"]
    if stage.smoke:
        gather_shapes = [(2, 20, 16, 0.5, torch.float32)]
        dino_shapes = [(2, 4, 2, 600, torch.float32)]
        size = "quick"
    else:
        gather_shapes = [gather_bench.SHAPES[("cuda", "full")][0]]
        dino_shapes = dino_bench.SHAPES[("cuda", "full")]
        size = "full"
    return {
        "gather": lambda: [c for s in gather_shapes
                           for c in gather_bench._shape_cases(dev, [*kernels, "torch"], *s)],
        "dino_loss": lambda: [c for s in dino_shapes
                              for c in dino_bench._shape_cases(dev, [*kernels, "torch"], *s)],
        "attention": lambda: attention_bench._dense_cases(dev, size, kernels),
    }


def train_steps(stage: Stage, variants: tuple[str, ...], presets: tuple[str, ...]) -> None:
    from smsd.bench.train_step import PRESETS, measure

    steps, warmup = (2, 1) if stage.smoke else (10, 3)
    for preset in presets:
        for variant in variants:
            def one(variant=variant, preset=preset):
                row = measure(variant, PRESETS[preset], stage.device, steps=steps,
                              warmup=warmup)
                stage.emit("train_step", preset=preset, batch=PRESETS[preset].batch, **row)
            stage.item(f"train_step {preset} {variant}", one)


def stage_goals(stage: Stage, seen: set) -> None:
    for label, cases in _goal_cases(stage).items():
        stage.item(label, lambda label=label, cases=cases: bench_cases(stage, label, cases()))
        kernel_resources(stage, seen)
    preset = "tiny" if stage.smoke else "vit_small"
    train_steps(stage, ("smsd", "smsd+compile", "torch-compile"), (preset,))
    kernel_resources(stage, seen)


# ------------------------------------------------------------------ correctness
def stage_correctness(stage: Stage, seen: set) -> None:
    """The self-check's cases at the goal shapes, on the Triton backend."""
    from smsd.selfcheck import attention, dino_loss, masked_sample

    if stage.smoke:
        shapes = {masked_sample: {"SHAPES": ((2, 20, 16, 10, False),)},
                  dino_loss: {"SHAPES": ((4, 2, 600),), "FUSED_SHAPES": ()},
                  attention: {"DENSE": ((1, 2, 20, 32, 20),), "PACKED": ((7, 9), 2, 32)}}
    else:
        shapes = {
            # (B, N, D, K, repeats): ViT-S tokens, 75 % and 25 % views
            masked_sample: {"SHAPES": ((256, 196, 384, 147, False), (256, 196, 384, 49, False),
                                       (64, 196, 384, 147, True))},
            # (views, B, K): the goal's 10 + 2 views of 64 images, K = 65,536
            dino_loss: {"SHAPES": ((10, 64, 65536),), "FUSED_SHAPES": ((10, 2, 64, 65536),)},
            # (B, H, N, d, M): ViT-S, dense and permuted; the multi-crop packed layout
            attention: {"DENSE": ((256, 6, 197, 64, None), (256, 6, 197, 64, 197),
                                  (256, 6, 197, 64, 148)),
                        "PACKED": ((148,) * 2 + (50,) * 8, 6, 64)},
        }
    for module, patch in shapes.items():
        def one(module=module, patch=patch):
            saved = {k: getattr(module, k) for k in patch}
            try:
                for k, v in patch.items():
                    setattr(module, k, v)
                for result in module.checks("triton", stage.device):
                    stage.emit("check", **dataclasses.asdict(result))
            finally:
                for k, v in saved.items():
                    setattr(module, k, v)
        stage.item(f"check {module.__name__}", one)
        kernel_resources(stage, seen)


# ------------------------------------------------------------------ the rest
def stage_rest(stage: Stage, seen: set) -> None:
    from smsd.bench import OPS, cases_for
    from smsd.selfcheck import run_checks

    size = "quick" if stage.smoke else "full"
    for op in OPS:
        stage.item(f"bench {op}", lambda op=op: bench_cases(stage, op, cases_for(
            op, stage.device, size)))
        kernel_resources(stage, seen)
    presets = ("tiny",) if stage.smoke else ("vit_small", "vit_base")
    train_steps(stage, ("smsd+ckpt", "smsd-unfused", "torch-eager", "torch-loop"), presets[:1])
    train_steps(stage, ("smsd", "smsd+compile", "torch-compile"), presets[1:])

    def check() -> None:
        run_checks([stage.device], on_result=lambda r: stage.emit("check",
                                                                  **dataclasses.asdict(r)))
    stage.item("smsd check", check)
    kernel_resources(stage, seen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU (Triton interpreter): the plumbing only")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("no CUDA device visible (use --smoke to test the plumbing)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
    from smsd.bench.runner import copy_ceiling_gbps, environment

    stage = Stage(args.stage, args.out, args.budget_s, device, args.smoke)
    stage.ceiling = copy_ceiling_gbps(device)
    env = environment(device)
    stage.emit("environment", **{"triton": _triton_version(), **env},
               copy_ceiling_GBps=round(stage.ceiling, 1), budget_s=args.budget_s)
    seen: set = set()
    {"goals": stage_goals, "correctness": stage_correctness, "rest": stage_rest}[args.stage](
        stage, seen)
    stage.emit("done", elapsed_s=round(time.monotonic() - stage.start, 1))
    return 0


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
