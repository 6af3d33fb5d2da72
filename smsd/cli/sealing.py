"""Sealing options several commands share, and ``smsd seal`` (parsing and printing only)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import SmsdError
from .common import add_command

__all__ = ["add_seal", "add_seal_to_args", "add_unseal_key_arg", "recipients", "unseal_key"]

log = logging.getLogger("smsd")


def add_seal_to_args(p: argparse.ArgumentParser, whom: str, *, attestation: bool) -> None:
    g = p.add_argument_group("sealing (smsd keygen --recipient; docs/sealing.md)")
    g.add_argument("--seal-to", nargs="+", default=[], metavar="PUB",
                   help=f"seal the file to {whom} (.pub files): only the holders of the "
                   "matching .key files can open it (default: written in the clear)")
    if attestation:
        g.add_argument("--require-attestation", default=None, metavar="POLICY",
                       help="seal only if the recipient's attestation evidence satisfies this "
                       "policy file (docs/confidential-computing.md)")
        g.add_argument("--attestation-evidence", default=None, metavar="FILE",
                       help="the recipient's evidence bundle, checked with "
                       "--require-attestation")


def add_unseal_key_arg(p: argparse.ArgumentParser, whose: str) -> None:
    p.add_argument("--unseal-key", default=None, metavar="KEY",
                   help=f"{whose} private key (.key from smsd keygen --recipient), to open "
                   "sealed inputs")


def recipients(args: argparse.Namespace) -> list:
    """The ``--seal-to`` public keys, attested first when a policy is given; checked
    before any work starts."""
    from ..sealing.keys import RecipientPublicKey

    keys = [RecipientPublicKey.load(path) for path in args.seal_to]
    policy = getattr(args, "require_attestation", None)
    evidence = getattr(args, "attestation_evidence", None)
    if policy is None and evidence is not None:
        raise SmsdError("--attestation-evidence is given without --require-attestation")
    if policy is not None:
        if not keys:
            raise SmsdError("--require-attestation needs --seal-to (the key to attest)")
        if evidence is None:
            raise SmsdError("--require-attestation needs --attestation-evidence FILE")
        if len(keys) != 1:
            raise SmsdError("--require-attestation checks one recipient: give one --seal-to")
        from ..sealing.attestation import require_attestation

        report = require_attestation(keys[0].raw, policy, evidence)
        log.info("attestation of %s accepted: %s", args.seal_to[0], report.summary())
    if not keys:
        log.warning("writing %s UNSEALED: anyone who can read the file (storage, backups, "
                    "transfer) can read it; seal it with --seal-to", getattr(args, "out", "it"))
    return keys


def unseal_key(args: argparse.Namespace):
    """The ``--unseal-key`` private key, or None."""
    from ..sealing.keys import RecipientPrivateKey

    return None if args.unseal_key is None else RecipientPrivateKey.load(args.unseal_key)


# ------------------------------------------------------------------ seal
def add_seal(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "seal", help="seal an existing shard or body file to recipients "
                    "(streamed: the file never has to fit in memory)", examples="""
  smsd seal site-a.safetensors --seal-to server.pub --out site-a.sealed
  smsd seal body.safetensors --seal-to site-a.pub site-b.pub --out body.sealed""")
    p.add_argument("file", help="the clear shard or body file (.safetensors)")
    p.add_argument("--out", required=True, help="sealed file to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_seal_to_args(p, "these recipients", attestation=True)
    p.set_defaults(func=_cmd_seal)


def _cmd_seal(args: argparse.Namespace) -> int:
    from ..safe_files import ALL_DTYPES, read_header
    from ..sealing.files import seal_file

    if not args.seal_to:
        raise SmsdError("smsd seal needs --seal-to PUB")
    keys = recipients(args)
    if Path(args.out).resolve() == Path(args.file).resolve():
        raise SmsdError("--out must differ from the file being sealed")
    try:
        seal_file(args.file, args.out, keys, overwrite=args.force,
                  read_header=lambda path: read_header(path, "file", dtypes=ALL_DTYPES))
    except FileExistsError:
        raise SmsdError(f"{args.out} exists; pass --force to replace it") from None
    names = ", ".join(k.name for k in keys)
    print(f"wrote {args.out}: {args.file} sealed to {names}")
    return 0
