"""``smsd audit``: the privacy audit (every defence against every attack), or one shard."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

from ..extras import require
from .common import (
    HelpFormatter,
    add_device_arg,
    add_model_args,
    check_output_dir,
    model_config,
    resolve_device,
)

__all__ = ["add_audit"]

DEFENCE_KEYS = ("permutation", "noise", "secret-head", "no-position")
DEFAULT_NOISE = (0.25, 0.5, 1.0)
QUICK_IMAGES = 300

EXAMPLES = """examples:
  smsd audit --images digits --out audit-results      # the full audit (docs/privacy.md)
  smsd audit --images digits --quick                  # CI: a few minutes, fails if an attack breaks
  smsd audit --shard s.safetensors --key c.key --images x.npz --public-images digits
"""


def add_audit(sub: argparse._SubParsersAction) -> None:
    from ..audit.catalog import ATTACKS

    p = sub.add_parser(
        "audit", help="privacy audit: the strongest attacks we have against every defence, "
        "with reference levels and ε", formatter_class=HelpFormatter,
        epilog=EXAMPLES,
        description=textwrap.fill(
            "Without --shard: the auditor plays a client, encodes --images under every "
            "defence smsd offers and attacks each upload as the server could, with public "
            "images of the same kind as side information (every other image of --images, or "
            "--public-images). With --shard: attack that shard (--key and --images score "
            "it).", 88))
    p.add_argument("--images", default=None,
                   help="the attacked images: 'digits', an image folder or a .npz ('images' "
                   "[n, C, H, W] in the model's pixel range, optional 'ids', 'labels')")
    p.add_argument("--public-images", default=None,
                   help="the attacker's public images (same forms; disjoint from --images). "
                   "Default without --shard: every other image of --images is public, the "
                   "rest attacked")
    p.add_argument("--shard", default=None, help="an existing token shard to attack")
    p.add_argument("--key", default=None,
                   help="with --shard: the client's key file (ground truth of the order)")
    p.add_argument("--head", default=None,
                   help="with --shard: the head the server believes in, a timm/DINO "
                   "checkpoint (default: the seeded head of the model config)")
    p.add_argument("--defences", nargs="+", choices=DEFENCE_KEYS, default=list(DEFENCE_KEYS),
                   metavar="DEFENCE", help=f"which defences to audit (of {', '.join(DEFENCE_KEYS)}"
                   "; default: all)")
    p.add_argument("--noise-std", type=float, nargs="+", default=None, metavar="S",
                   help="the noise defence's levels (default: 0.25 0.5 1.0); with --shard: "
                   "the one level the shard was encoded with (default 0)")
    p.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=None,
                   metavar="ATTACK", help=f"which attacks (of: {'; '.join(ATTACKS)}; default: "
                   "all)")
    p.add_argument("--limit", type=int, default=None,
                   help="attack at most N images (and use at most N public ones)")
    p.add_argument("--quick", action="store_true",
                   help=f"CI: {QUICK_IMAGES} images, a small inverse network, fewer restarts, "
                   "the blind attack and the inverse network only where they are checked; "
                   "exits 1 if an attack no longer breaks a defence it is known to break")
    p.add_argument("--seed", type=int, default=0,
                   help="the simulated client's secrets and the attacks' restarts")
    add_device_arg(p, "the inverse network trains")
    p.add_argument("--pixel-range", type=float, nargs=2, default=(-1.0, 1.0),
                   metavar=("LOW", "HIGH"), help="the model's input range (the attacks' prior)")
    p.add_argument("--out", default=None,
                   help="folder for audit.json, audit.md and audit.png (originals vs the best "
                   "attack's reconstructions per defence)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_args(p)
    p.set_defaults(func=_cmd_audit)


def _check_args(args: argparse.Namespace) -> None:
    from ..audit.inputs import AuditError

    if args.shard is None and args.images is None:
        raise AuditError("give --images (to encode and attack) or --shard (a shard to attack)")
    if args.shard is None and args.key is not None:
        raise AuditError("--key is the ground truth of --shard; without --shard the audit "
                         "makes its own key")
    if args.shard is None and args.head is not None:
        raise AuditError("--head is the head the server believes in for --shard; without "
                         "--shard the audit knows each defence's head")
    if args.shard is not None and args.noise_std is not None and len(args.noise_std) != 1:
        raise AuditError("with --shard give one --noise-std: the level the shard was made with")
    if any(not 0 <= s < float("inf") for s in args.noise_std or ()):
        raise AuditError(f"--noise-std must be finite numbers >= 0, got {args.noise_std}")
    if args.limit is not None and args.limit < 1:
        raise AuditError(f"--limit must be >= 1, got {args.limit}")
    if not args.pixel_range[0] < args.pixel_range[1]:
        raise AuditError(f"--pixel-range must be LOW < HIGH, got {args.pixel_range}")
    args.device = resolve_device(args.device)
    if args.out is not None:
        check_output_dir(args.out, "--out")


def _defences(args: argparse.Namespace):
    from ..audit.defences import Defence

    chosen = []
    for key in args.defences:
        if key == "permutation":
            chosen.append(Defence("permutation only"))
        elif key == "noise":
            levels = args.noise_std if args.noise_std is not None else DEFAULT_NOISE
            chosen += [Defence.noise(s) for s in levels if s > 0]
        elif key == "secret-head":
            chosen.append(Defence("secret head seed", secret_head=True))
        else:
            chosen.append(Defence("no position embedding", position_embedding=False))
    return tuple(dict.fromkeys(chosen))


def _require_for(args: argparse.Namespace) -> None:
    """Every optional dependency this run needs, before any work."""
    require("audit")
    for spec in (args.images, args.public_images):
        if spec == "digits":
            require("data", "sklearn", purpose="--images digits")
        elif spec is not None and not spec.endswith(".npz"):
            require("data", "PIL", purpose="an image folder")


def _cmd_audit(args: argparse.Namespace) -> int:
    from ..audit.inputs import load_images
    from ..audit.suite import AuditPlan

    _check_args(args)
    _require_for(args)
    config = model_config(args)
    limit = QUICK_IMAGES if args.quick and args.limit is None else args.limit
    images = load_images(args.images, config) if args.images is not None else None
    public = load_images(args.public_images, config) if args.public_images else None
    plan = AuditPlan(defences=_defences(args), attacks=tuple(args.attacks or ()) or None,
                     quick=args.quick, seed=args.seed, device=args.device,
                     expensive_only_on=_checked_pairs() if args.quick else None)
    start = time.perf_counter()
    if args.shard is not None:
        report = _audit_shard(args, config, images, public, limit, plan)
    else:
        if public is None:  # every other image is public, the rest attacked
            public, images = images.subset(slice(1, None, 2)), images.subset(slice(0, None, 2))
        if limit is not None:
            images, public = images.subset(slice(0, limit)), public.subset(slice(0, limit))
        report = _audit_images(images, public, config, plan, tuple(args.pixel_range))
    report.context["seconds"] = round(time.perf_counter() - start, 1)
    written = report.write(Path(args.out)) if args.out is not None else []
    print(report.to_json() if args.json else _summary(report))
    for path in written:  # with --json, stdout holds the JSON alone
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return _check_expectations(report) if args.quick else 0


def _audit_images(images, public, config, plan, pixel_range):
    from ..audit.suite import run_audit

    return run_audit(images.images, public.images, config, labels=images.labels,
                     public_labels=public.labels, plan=plan, pixel_range=pixel_range,
                     log=lambda line: print(f"  {line}", file=sys.stderr, flush=True))


def _audit_shard(args, config, images, public, limit, plan):
    from ..audit.run import attacker_head, audit_shard
    from ..crypto import PermutationKey

    head = attacker_head(config, args.head)
    key = PermutationKey.load(args.key) if args.key is not None else None
    if images is not None and limit is not None:
        images = images.subset(slice(0, limit))
    return audit_shard(args.shard, head, key=key,
                       images=None if images is None else images.images,
                       ids=None if images is None else images.ids,
                       public=None if public is None else public.images,
                       public_labels=None if public is None else public.labels,
                       limit=limit, noise_std=args.noise_std[0] if args.noise_std else 0.0,
                       pixel_range=tuple(args.pixel_range), plan=plan)


def _summary(report) -> str:
    from ..audit.report import format_table

    c = report.context
    lines = [f"{c['images']} images × {c['tokens_per_image']} tokens × {c['embed_dim']} "
             f"(patch values {c['patch_values']}), {c['seconds']} s"]
    if "shard_head_is_server_head" in c:
        lines.append("the shard's head " + (
            "is the head the server has" if c["shard_head_is_server_head"] else
            "is NOT the server's head (a secret head): head rows use the wrong head"))
        if not c["scored_positions"] or not c["scored_pixels"]:
            lines.append("(no --key: positions are not scored; no --images: no PSNR/SSIM)")
    lines.append(format_table(report))
    return "\n".join(lines)


def _checked_pairs() -> tuple[tuple[str, str], ...]:
    from ..audit.expectations import EXPECTATIONS

    return tuple((e.defence, e.attack) for e in EXPECTATIONS)


def _check_expectations(report) -> int:
    from ..audit.expectations import failed_expectations

    failures = failed_expectations(report)
    for line in failures:
        print(f"FAILED: {line}")
    if failures:
        print("an attack no longer breaks a defence it is known to break: a broken attack "
              "must not look like privacy")
        return 1
    print("every attack still breaks the defences it is known to break")
    return 0
