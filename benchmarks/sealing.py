"""Sealing overhead: sealing and unsealing a token shard (MB/s) against a plain read of it.

    python benchmarks/sealing.py [--mib 256] [--repeats 5] [--budget 2]
                                 [--aeads aes-256-gcm chacha20-poly1305] [--dir DIR]
                                 [--core N] [--out benchmarks/results/sealing.json]

Writes a shard of ``--mib`` MiB of fp16 tokens with ``write_shard`` in a temporary folder
under ``--dir`` (the file system being measured), then times, on one pinned core, the
median over repeats (at least ``--repeats``, more while ``--budget`` seconds per row
last) of:

* plain read: ``read_shard(clear)`` (the project's validated reader) and a raw
  ``readinto`` of the file's bytes into a fresh buffer;
* plain write: ``write_shard`` of the tokens in the clear (the baseline of the sealed writes);
* seal, per AEAD: ``seal_tensors`` (what ``write_shard(seal_to=...)`` runs, with the AEAD
  chosen; ``write_shard`` itself for the default AES-256-GCM), ``seal_file`` file → file,
  and ``SealWriter`` over the shard's bytes in memory with the output discarded
  (the cipher alone, no file);
* unseal, per AEAD: ``read_shard(sealed, key=...)`` (decrypt in memory, then the same
  validation as the plain read) and ``unseal_into`` (decrypt and verify only).

MB/s are 10^6 bytes of the clear shard file per second, for every row. Files are read
from the WARM page cache (each was just written, and a warm-up pass reads it once
before timing; no cache is dropped); every file write is ``atomic_write``'s, with an
fsync, so the write rows include the disk. The target (issue 14) is sealing and
unsealing at >= min(1,000 MB/s, 0.5 x the plain read) on one core, per AEAD.
Prints a table and writes the rows as JSON to ``--out``, atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from smsd.bench.cpu_info import _proc_cpuinfo, cpu_summary
from smsd.io import atomic_write_bytes
from smsd.protocol.shard import SHARD_FORMAT, ShardError, read_shard, write_shard
from smsd.safe_files import read_header
from smsd.sealing.files import seal_file, seal_tensors
from smsd.sealing.keys import RecipientPrivateKey
from smsd.sealing.stream import (
    AEADS,
    DEFAULT_CHUNK_BYTES,
    SealWriter,
    read_sealed_header,
    unseal_into,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sealing.json"
GRID, EMBED_DIM = 14, 384  # ViT-S/16 tokens at 224 px: 196 x 384 fp16 per image
TARGET_MBPS, TARGET_RATIO = 1000.0, 0.5
ISA_FLAGS = ("aes", "vaes", "pclmulqdq", "vpclmulqdq", "avx2", "avx512f")
FINGERPRINT = "0" * 64


class _Discard:
    """A write handle that keeps nothing (the cipher's cost without a file)."""

    def write(self, data) -> int:
        return len(data)


def pin(core: int | None) -> list[int] | None:
    """Pin this process to ``core`` (default: the first core of its affinity)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    if core is None:
        core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return sorted(os.sched_getaffinity(0))


def make_tokens(mib: float, seed: int = 0) -> torch.Tensor:
    per_image = GRID * GRID * EMBED_DIM * 2
    n = max(1, round(mib * 2**20 / per_image))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, GRID * GRID, EMBED_DIM, generator=gen).to(torch.float16)


def time_s(fn: Callable[[], object], repeats: int, budget_s: float) -> list[float]:
    """Wall times of ``fn`` after one warm-up call: at least ``repeats``, more while the
    budget lasts (at most 50)."""
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _read_raw(path: Path) -> bytearray:
    buffer = bytearray(path.stat().st_size)
    with open(path, "rb") as handle:
        if handle.readinto(buffer) != len(buffer):
            raise OSError(f"short read of {path}")
    return buffer


def _encrypt_only(data: bytearray, recipients, aead: str) -> None:
    writer = SealWriter(_Discard(), recipients, plaintext_bytes=len(data), content=SHARD_FORMAT,
                        public={}, aead=aead, chunk_bytes=DEFAULT_CHUNK_BYTES)
    view = memoryview(data)
    for start in range(0, len(view), DEFAULT_CHUNK_BYTES):
        writer.write(view[start:start + DEFAULT_CHUNK_BYTES])
    writer.close()


def _shard_reader(path: Path):
    return read_header(path, "shard", error=ShardError)


def build_cases(folder: Path, tokens: torch.Tensor, aeads: Sequence[str],
                ) -> tuple[list[tuple[str, str, str, str, Callable[[], object]]], Path]:
    """``(op, aead, what, baseline, fn)`` per row, after writing the files they read."""
    key = RecipientPrivateKey.generate("bench-server")
    pub = [key.public_key()]
    clear = write_shard(folder / "clear.safetensors", tokens, head_fingerprint=FINGERPRINT,
                        grid=GRID)
    metadata = read_header(clear, "shard", error=ShardError).metadata  # what write_shard wrote
    clear_bytes = _read_raw(clear)
    cases = [
        ("plain read", "-", "read_shard(clear)", "", lambda: read_shard(clear)),
        ("plain read", "-", "readinto (raw bytes)", "", lambda: _read_raw(clear)),
        ("plain write", "-", "write_shard(clear), fsync", "",
         lambda: write_shard(folder / "clear-out.safetensors", tokens,
                             head_fingerprint=FINGERPRINT, grid=GRID)),
    ]
    for aead in aeads:
        sealed = seal_tensors(folder / f"sealed-{aead}.smsd", {"tokens": tokens}, metadata, pub,
                              aead=aead)
        if not torch.equal(read_shard(sealed, key=key), tokens):
            raise AssertionError(f"the {aead} shard does not read back its tokens")
        if aead == "aes-256-gcm":  # write_shard seals with the default AEAD only
            cases.append(("seal", aead, "write_shard(seal_to=[pub]), fsync",
                          "write_shard(clear), fsync",
                          lambda: write_shard(folder / "ws-out.smsd", tokens,
                                              head_fingerprint=FINGERPRINT, grid=GRID,
                                              seal_to=pub)))
        cases += [
            ("seal", aead, "seal_tensors (write_shard's path), fsync",
             "write_shard(clear), fsync",
             lambda a=aead: seal_tensors(folder / f"st-out-{a}.smsd", {"tokens": tokens},
                                         metadata, pub, aead=a)),
            ("seal", aead, "seal_file file→file, fsync", "write_shard(clear), fsync",
             lambda a=aead: seal_file(clear, folder / f"sf-out-{a}.smsd", pub,
                                      read_header=_shard_reader, aead=a, overwrite=True)),
            ("seal", aead, "SealWriter, bytes in memory → discard", "readinto (raw bytes)",
             lambda a=aead: _encrypt_only(clear_bytes, pub, a)),
            ("unseal", aead, "read_shard(sealed, key)", "read_shard(clear)",
             lambda s=sealed: read_shard(s, key=key)),
            ("unseal", aead, "unseal_into (decrypt + verify)", "readinto (raw bytes)",
             lambda s=sealed: unseal_into(read_sealed_header(s), key)),
        ]
    return cases, clear


def verdicts(rows: list[dict], aeads: Sequence[str], plain_read: float) -> dict:
    """Per AEAD: the issue's target, met by sealing (the sealed writer, write_shard's path)
    and by unsealing (read_shard of the sealed shard)?"""
    target = min(TARGET_MBPS, TARGET_RATIO * plain_read)
    out = {"target_MBps": round(target, 1), "plain_read_MBps": round(plain_read, 1)}
    for aead in aeads:
        mine = {r["what"]: r["MBps"] for r in rows if r["aead"] == aead}
        seal = mine["seal_tensors (write_shard's path), fsync"]
        cipher = mine["SealWriter, bytes in memory → discard"]
        unseal = mine["read_shard(sealed, key)"]
        out[aead] = {"seal_MBps": seal, "seal_met": seal >= target,
                     "seal_cipher_only_MBps": cipher, "seal_cipher_only_met": cipher >= target,
                     "unseal_MBps": unseal, "unseal_met": unseal >= target}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, default=256.0, help="shard size (MiB of fp16 tokens)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row (at least)")
    p.add_argument("--budget", type=float, default=2.0,
                   help="seconds per row: repeat beyond --repeats while they last")
    p.add_argument("--aeads", nargs="+", choices=tuple(AEADS), default=list(AEADS))
    p.add_argument("--dir", default=None,
                   help="folder for the shard files (default: the system's temporary folder)")
    p.add_argument("--core", type=int, default=None,
                   help="core to pin to (default: the first of the current affinity)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file")
    args = p.parse_args(argv)
    cores = pin(args.core)
    torch.set_num_threads(1)
    model, flags = _proc_cpuinfo()
    isa = {flag: flag in flags for flag in ISA_FLAGS}
    from cryptography.hazmat.backends.openssl import backend as openssl

    tokens = make_tokens(args.mib)
    rows: list[dict] = []
    print(f"# {cpu_summary()}")
    print(f"# pinned to core {cores}; ISA flags: "
          + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in isa.items())
          + f"; {openssl.openssl_version_text()}, torch {torch.__version__}")
    print("# files read from the WARM page cache (written, then read once before timing; "
          "no cache dropped); writes are fsync'd")
    with tempfile.TemporaryDirectory(prefix="smsd-sealing-", dir=args.dir) as tmp:
        cases, clear = build_cases(Path(tmp), tokens, args.aeads)
        size = clear.stat().st_size
        print(f"# shard: {list(tokens.shape)} fp16 = {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB),"
              f" chunks of {DEFAULT_CHUNK_BYTES // 2**20} MiB, in {tmp}")
        print(f"{'op':<12}{'aead':<19}{'what':<42}{'median ms':>10}{'MB/s':>9}"
              f"{'×plain read':>12}{'×baseline':>10}  n")
        by_what: dict[str, float] = {}
        for op, aead, what, baseline, fn in cases:
            times = time_s(fn, args.repeats, args.budget)
            median = statistics.median(times)
            mbps = size / median / 1e6
            if op.startswith("plain"):
                by_what[what] = mbps
            plain = by_what["read_shard(clear)"]
            row = {"op": op, "aead": aead, "what": what, "median_s": round(median, 5),
                   "min_s": round(min(times), 5), "repeats": len(times),
                   "MBps": round(mbps, 1), "ratio_vs_plain_read": round(mbps / plain, 3),
                   "baseline": baseline or None,
                   "ratio_vs_baseline": round(mbps / by_what[baseline], 3) if baseline else None}
            rows.append(row)
            ratio = f"{row['ratio_vs_baseline']:.2f}" if baseline else "-"
            print(f"{op:<12}{aead:<19}{what:<42}{median * 1e3:>10.1f}{mbps:>9.0f}"
                  f"{row['ratio_vs_plain_read']:>12.2f}{ratio:>10}  {len(times)}", flush=True)
    summary = verdicts(rows, args.aeads, by_what["read_shard(clear)"])
    print(f"# target: >= min({TARGET_MBPS:.0f} MB/s, {TARGET_RATIO} × plain read "
          f"{summary['plain_read_MBps']:.0f} MB/s) = {summary['target_MBps']:.0f} MB/s")
    for aead in args.aeads:
        v = summary[aead]
        print(f"# {aead}: seal {v['seal_MBps']:.0f} MB/s {'met' if v['seal_met'] else 'NOT met'}"
              f" (cipher only {v['seal_cipher_only_MBps']:.0f} MB/s "
              f"{'met' if v['seal_cipher_only_met'] else 'NOT met'}); "
              f"unseal {v['unseal_MBps']:.0f} MB/s {'met' if v['unseal_met'] else 'NOT met'}")
    environment = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu_summary(), "cpu_model": model, "cpu_flags": isa, "cores_pinned": cores,
        "openssl": openssl.openssl_version_text(), "torch": torch.__version__,
        "python": sys.version.split()[0], "page_cache": "warm (no cache dropped)",
        "writes": "atomic_write: fsync of the file and its folder",
        "shard_shape": list(tokens.shape), "shard_bytes": size,
        "chunk_bytes": DEFAULT_CHUNK_BYTES, "MB": "10^6 bytes of the clear shard file",
        "command": "python benchmarks/sealing.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment, "rows": rows, "target": summary}
    atomic_write_bytes(out, (json.dumps(report, indent=1, ensure_ascii=False) + "\n").encode())
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
