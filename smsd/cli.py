"""The ``smsd`` command line. ``smsd --help`` lists the commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from .errors import SmsdError

log = logging.getLogger("smsd")

Command = Callable[[argparse.Namespace], int]


def _devices(choice: str) -> list:
    import torch

    if choice == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if choice == "cuda" and not torch.cuda.is_available():
        raise SmsdError("--device cuda was asked for but no CUDA device is visible")
    return [torch.device(choice)]


# ---------------------------------------------------------------- backends
def _add_backends(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backends", help="show which backends can run here, and why not")
    p.set_defaults(func=_cmd_backends)


def _cmd_backends(args: argparse.Namespace) -> int:
    from .backend import backends
    from .data import loader_statuses

    print(backends())
    for status in loader_statuses().values():
        mark = "yes" if status.available else "no"
        print(f"loader {status.name:<6}  {mark:<9}  {status.detail}")
    return 0


# ---------------------------------------------------------------- check
def _add_check(sub: argparse._SubParsersAction) -> None:
    from .selfcheck import OPS

    p = sub.add_parser("check", help="validate every op and backend against the reference")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--triton-interpret", action="store_true",
                   help="also run the Triton kernels on CPU tensors (TRITON_INTERPRET=1; slow)")
    p.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    if args.triton_interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
    from .backend import backends
    from .selfcheck import run_checks

    print(backends(), end="\n\n")
    print(f"{'op':<24}{'backend':<9}{'device':<8}{'dtype':<10}{'case':<30}{'result':<8}detail")

    def show(r) -> None:
        mark = "pass" if r.passed else "FAIL"
        if r.detail.startswith("skipped"):
            mark = "skip"
        print(f"{r.op:<24}{r.backend:<9}{r.device:<8}{r.dtype:<10}{r.case:<30}{mark:<8}{r.detail}",
              flush=True)

    results = run_checks(_devices(args.device), tuple(args.ops), on_result=show)
    failed = [r for r in results if not r.passed]
    ran = [r for r in results if not r.detail.startswith("skipped")]
    print(f"\n{len(ran) - len(failed)} passed, {len(failed)} failed, "
          f"{len(results) - len(ran)} skipped")
    return 1 if failed else 0


# ---------------------------------------------------------------- bench
def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .bench import OPS

    p = sub.add_parser("bench", help="benchmark every backend against the reference (a table)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when visible, else cpu")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--size", choices=("full", "quick"), default="full",
                   help="full: the shapes the targets name; quick: tiny shapes (smoke test)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per row")
    p.add_argument("--out", default="benchmarks/results",
                   help="folder for the JSON rows ('-' writes none)")
    p.add_argument("--train-step", action="store_true",
                   help="benchmark the full training step against the plain PyTorch step "
                   "instead (quick: the tiny model; more options: benchmarks/train_step.py)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench.runner import run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _devices(device)
    if args.train_step:
        from .bench.train_step import main as train_step_main

        return train_step_main(train_step_args(device, args.size, args.out))
    run(device, args.ops, size=args.size, budget_s=args.budget,
        out_dir=None if args.out == "-" else args.out)
    return 0


def train_step_args(device: str, size: str, out: str) -> list[str]:
    """``smsd bench --train-step`` options as ``benchmarks/train_step.py`` arguments."""
    import datetime

    quick = ["--tiny", "--steps", "2", "--warmup", "1",
             "--variants", "smsd", "torch-eager", "torch-loop"]
    argv = ["--device", device] + (quick if size == "quick" else [])
    if out != "-":
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        argv += ["--json", os.path.join(out, f"{stamp}-{device}-train_step.json")]
    return argv


# ---------------------------------------------------------------- keygen
def _add_keygen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", help="create a client's secret permutation key (mode 0600)")
    p.add_argument("--out", required=True, help="key file to create")
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    p.set_defaults(func=_cmd_keygen)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from .crypto import PermutationKey

    key = PermutationKey.generate()
    try:
        key.save(args.out, overwrite=args.force)
    except FileExistsError:
        raise SmsdError(f"{args.out} exists; pass --force to replace that key") from None
    print(f"wrote {args.out} ({key!r})")
    return 0


# ---------------------------------------------------------------- protocol
def _add_encode(sub: argparse._SubParsersAction) -> None:
    from .protocol.cli import add_encode

    add_encode(sub)


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    from .protocol.cli import add_pretrain

    add_pretrain(sub)


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    from .protocol.cli import add_finetune

    add_finetune(sub)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from .protocol.cli import add_evaluate

    add_evaluate(sub)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    from .protocol.cli import add_simulate

    add_simulate(sub)


def _add_audit(sub: argparse._SubParsersAction) -> None:
    from .audit.cli import add_audit

    add_audit(sub)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_backends,
    _add_check,
    _add_bench,
    _add_keygen,
    _add_encode,
    _add_pretrain,
    _add_finetune,
    _add_evaluate,
    _add_simulate,
    _add_audit,
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="smsd",
        description="Single-round self-supervised distributed ViT training "
        "(masked sampling distillation) with fused kernels.",
    )
    parser.add_argument("--version", action="version", version=f"smsd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    try:
        return args.func(args)
    except (SmsdError, ValueError, TypeError, FileNotFoundError, PermissionError,
            FileExistsError) as exc:
        if args.verbose:
            raise
        print(f"smsd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("smsd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
