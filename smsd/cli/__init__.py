"""The ``smsd`` command line. ``smsd --help`` lists the commands.

Each module here parses one group of commands and prints their results; the work is
done by the library (:mod:`smsd.protocol`, :mod:`smsd.experiments`, :mod:`smsd.audit`,
:mod:`smsd.bench`), so that everything a command does can also be done from Python.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence

from ..errors import SmsdError
from .audit import add_audit
from .evaluate import add_evaluate
from .ops import add_backends, add_bench, add_check, add_keygen
from .protocol import add_encode, add_finetune, add_pretrain
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


# Library names that a command's flag of another name sets.
_FIELD_FLAGS = {"n_clients": "--clients"}


def in_flag_terms(message: str, command: argparse.ArgumentParser) -> str:
    """``message`` with the library's field names (``batch_size``) replaced by the flags
    the user typed (``--batch-size``): identifiers with an underscore everywhere, one-word
    names where they are the subject (``lr must``, ``epochs:``, ``alpha (``)."""
    flags = dict(_FIELD_FLAGS)
    for action in command._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if long and action.dest not in ("help", "func"):
            flags.setdefault(action.dest, long[0])
    for name, flag in sorted(flags.items(), key=lambda kv: -len(kv[0])):
        # Not inside a path or a word: no letter, dot, slash or dash around it.
        pattern = (rf"(?<![\w./-]){re.escape(name)}(?![\w./-])" if "_" in name
                   else rf"(?<![\w./-]){re.escape(name)}(?=( must|: | \())")
        message = re.sub(pattern, flag, message)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    try:
        return args.func(args)
    except (SmsdError, ValueError, TypeError, OSError) as exc:
        if args.verbose:
            raise
        command = parser._subparsers._group_actions[0].choices[args.command]
        print(f"smsd {args.command}: error: {in_flag_terms(str(exc), command)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # On a line of its own (a progress bar may hold the cursor), with what to do next.
        hint = getattr(args, "interrupt_hint", None)
        print(f"\nsmsd {args.command}: interrupted" + (f"; {hint}" if hint else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
