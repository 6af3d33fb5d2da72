"""The ``smsd`` command line. ``smsd --help`` lists the commands.

Each module here parses one group of commands and prints their results; the work is
done by the library (:mod:`smsd.protocol`, :mod:`smsd.experiments`, :mod:`smsd.audit`,
:mod:`smsd.bench`), so that everything a command does can also be done from Python.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from ..errors import SmsdError
from .audit import add_audit
from .ops import add_backends, add_bench, add_check, add_keygen
from .protocol import add_encode, add_evaluate, add_finetune, add_pretrain
from .sealing import add_seal
from .simulate import add_simulate

__all__ = ["build_parser", "main"]

log = logging.getLogger("smsd")


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_backends, add_check, add_bench, add_keygen,
    add_encode, add_pretrain, add_finetune, add_evaluate, add_seal,
    add_simulate, add_audit,
]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

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
