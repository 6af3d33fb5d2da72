"""Commands about the kernels and keys: ``backends``, ``check``, ``bench``, ``keygen``."""

from __future__ import annotations

import argparse
import datetime
import os

from ..errors import SmsdError
from .common import (
    add_command,
    add_device_arg,
    check_output_dir,
    check_output_file,
    devices,
    positive_float,
    resolve_device,
)

__all__ = ["add_backends", "add_bench", "add_check", "add_keygen"]


# ---------------------------------------------------------------- backends
def add_backends(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "backends", help="show which backends, loaders and extras can run "
                    "here, and why not", examples="  smsd backends")
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

    p = add_command(sub, "check", help="validate every op and backend against the reference",
                    examples="""
  smsd check                                # every op, every backend that runs here
  smsd check --triton-interpret --ops dino_loss""")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                   help="where to check; all = the CPU and the GPU when one is visible")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), metavar="OP",
                   help=f"which ops (of {', '.join(OPS)})")
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

    p = add_command(sub, "bench", help="benchmark every backend against the reference "
                    "(a table)", examples="""
  smsd bench --size quick --out -           # a smoke test, no files
  smsd bench --ops dino_loss --budget 3     # one op, 3 s of timing per row
  smsd bench --train-step""")
    add_device_arg(p, "the benchmark")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), metavar="OP",
                   help=f"which ops (of {', '.join(OPS)})")
    p.add_argument("--size", choices=("full", "quick"), default="full",
                   help="full: the shapes the targets name; quick: tiny shapes (smoke test)")
    p.add_argument("--budget", type=positive_float, default=1.0,
                   help="seconds of timing per row")
    p.add_argument("--out", default="benchmarks/results",
                   help="folder for the JSON rows, created; its path is printed ('-' writes "
                   "none)")
    p.add_argument("--train-step", action="store_true",
                   help="benchmark the full training step against the plain PyTorch step "
                   "instead (quick: the tiny model; more options: benchmarks/train_step.py)")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.runner import run

    device = resolve_device(args.device)
    if args.out != "-":
        args.out = str(check_output_dir(args.out, "--out").absolute())  # printed at the end
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
    p = add_command(sub, "keygen", help="create a client's secret permutation key, or with "
                    "--recipient a key pair files are sealed to (secret files mode 0600)",
                    examples="""
  smsd keygen --out site-a.key                     # a client's permutation key
  smsd keygen --recipient --out server             # server.pub (hand out), server.key""")
    p.add_argument("--out", required=True,
                   help="key file to create; with --recipient the prefix of OUT.pub and OUT.key")
    p.add_argument("--recipient", action="store_true",
                   help="a recipient key pair (X25519): OUT.pub to hand out, OUT.key to keep")
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    p.set_defaults(func=_cmd_keygen)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from ..crypto import PermutationKey

    if args.recipient:
        check_output_file(f"{args.out}.key", "--out", force=True)  # its folder, first
        from ..sealing.keys import generate_recipient

        try:
            public, private = generate_recipient(args.out, overwrite=args.force)
        except FileExistsError as exc:
            raise SmsdError(f"{exc}; pass --force to replace that key pair") from None
        print(f"wrote {public} (give it to whoever seals to you) and {private} (secret, "
              "mode 0600)")
        return 0
    check_output_file(args.out, "--out", force=True)
    key = PermutationKey.generate()
    try:
        key.save(args.out, overwrite=args.force)
    except FileExistsError:
        raise SmsdError(f"{args.out} exists; pass --force to replace that key") from None
    print(f"wrote {args.out} ({key!r})")
    return 0
