"""Commands about the kernels and keys: ``backends``, ``check``, ``bench``, ``keygen``."""

from __future__ import annotations

import argparse
import datetime
import os

from ..errors import SmsdError
from .common import devices

__all__ = ["add_backends", "add_bench", "add_check", "add_keygen"]


# ---------------------------------------------------------------- backends
def add_backends(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backends", help="show which backends can run here, and why not")
    p.set_defaults(func=_cmd_backends)


def _cmd_backends(args: argparse.Namespace) -> int:
    from ..backend import backends
    from ..data import loader_statuses
    from ..extras import extra_statuses

    print(backends())
    for status in loader_statuses().values():
        mark = "yes" if status.available else "no"
        print(f"loader {status.name:<6}  {mark:<9}  {status.detail}")
    for extra in extra_statuses().values():
        mark = "yes" if extra.installed else "no"
        print(f"extra  {extra.name:<6}  {mark:<9}  {extra.detail}")
    return 0


# ---------------------------------------------------------------- check
def add_check(sub: argparse._SubParsersAction) -> None:
    from ..selfcheck import OPS

    p = sub.add_parser("check", help="validate every op and backend against the reference")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--triton-interpret", action="store_true",
                   help="also run the Triton kernels on CPU tensors (TRITON_INTERPRET=1; slow)")
    p.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    if args.triton_interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
    from ..backend import backends
    from ..selfcheck import run_checks

    print(backends(), end="\n\n")
    print(f"{'op':<24}{'backend':<9}{'device':<8}{'dtype':<10}{'case':<30}{'result':<8}detail")

    def show(r) -> None:
        mark = "pass" if r.passed else "FAIL"
        if r.detail.startswith("skipped"):
            mark = "skip"
        print(f"{r.op:<24}{r.backend:<9}{r.device:<8}{r.dtype:<10}{r.case:<30}{mark:<8}{r.detail}",
              flush=True)

    results = run_checks(devices(args.device), tuple(args.ops), on_result=show)
    failed = [r for r in results if not r.passed]
    ran = [r for r in results if not r.detail.startswith("skipped")]
    print(f"\n{len(ran) - len(failed)} passed, {len(failed)} failed, "
          f"{len(results) - len(ran)} skipped")
    return 1 if failed else 0


# ---------------------------------------------------------------- bench
def add_bench(sub: argparse._SubParsersAction) -> None:
    from ..bench import OPS

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

    from ..bench.runner import run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    devices(device)
    if args.train_step:
        from ..bench.train_step import benchmark

        quick = {"presets": ["tiny"], "steps": 2, "warmup": 1,
                 "variants": ["smsd", "torch-eager", "torch-loop"]} if args.size == "quick" else {}
        json_path = None
        if args.out != "-":
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            json_path = os.path.join(args.out, f"{stamp}-{device}-train_step.json")
        benchmark(device, json_path=json_path, echo=lambda s: print(s, flush=True), **quick)
        return 0
    run(device, args.ops, size=args.size, budget_s=args.budget,
        out_dir=None if args.out == "-" else args.out)
    return 0


# ---------------------------------------------------------------- keygen
def add_keygen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", help="create a client's secret permutation key, or with "
                       "--recipient a key pair files are sealed to (secret files mode 0600)")
    p.add_argument("--out", required=True,
                   help="key file to create; with --recipient the prefix of OUT.pub and OUT.key")
    p.add_argument("--recipient", action="store_true",
                   help="a recipient key pair (X25519): OUT.pub to hand out, OUT.key to keep")
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    p.set_defaults(func=_cmd_keygen)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from ..crypto import PermutationKey

    if args.recipient:
        from ..sealing.keys import generate_recipient

        try:
            public, private = generate_recipient(args.out, overwrite=args.force)
        except FileExistsError as exc:
            raise SmsdError(f"{exc}; pass --force to replace that key pair") from None
        print(f"wrote {public} (give it to whoever seals to you) and {private} (secret, "
              "mode 0600)")
        return 0
    key = PermutationKey.generate()
    try:
        key.save(args.out, overwrite=args.force)
    except FileExistsError:
        raise SmsdError(f"{args.out} exists; pass --force to replace that key") from None
    print(f"wrote {args.out} ({key!r})")
    return 0
