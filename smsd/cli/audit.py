"""``smsd audit``: run the attacks on a shard (or on images the auditor encodes itself)."""

from __future__ import annotations

import argparse

from ..extras import require
from .common import add_model_args, model_config

__all__ = ["add_audit"]


def add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit", help="privacy audit: un-shuffle and reconstruct a shard's images, and "
        "report how much leaked",
        description="Attack a token shard as the server could. With --shard: that shard "
        "(--key and --images give the ground truth). Without: the auditor plays the client, "
        "encodes --images with a fresh key (and --noise-std / --client-head-seed, to "
        "measure a mitigation), then attacks that shard.")
    p.add_argument("--shard", default=None, help="token shard to attack")
    p.add_argument("--head", default=None,
                   help="the head the server believes in: a timm/DINO checkpoint (default: "
                   "the seeded head of the model config)")
    p.add_argument("--images", default=None,
                   help="the original images: 'digits', an image folder or a .npz "
                   "('images' [n, C, H, W] in the model's pixel range, optional 'ids')")
    p.add_argument("--key", default=None,
                   help="the client's key file: ground truth of the token order (with "
                   "--shard; image ids come from --images, else 0..n-1)")
    p.add_argument("--noise-std", type=float, default=0.0,
                   help="without --shard: Gaussian noise the simulated client adds")
    p.add_argument("--client-head-seed", type=int, default=None,
                   help="without --shard: the simulated client's (secret) head seed "
                   "(default: --head-seed, i.e. the head the server knows)")
    p.add_argument("--limit", type=int, default=None, help="audit only the first N images")
    p.add_argument("--pixel-range", type=float, nargs=2, default=(-1.0, 1.0),
                   metavar=("LOW", "HIGH"), help="the model's input range (the attack's prior)")
    p.add_argument("--refine-steps", type=int, default=3,
                   help="refits of the known-position attack (0: none)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_args(p)
    p.set_defaults(func=_cmd_audit)


def _check_args(args: argparse.Namespace) -> None:
    from ..audit.inputs import AuditError

    if args.shard is None and args.images is None:
        raise AuditError("give --shard (a shard to attack) or --images (to encode and attack)")
    if args.shard is None and args.key is not None:
        raise AuditError("--key is the ground truth of --shard; without --shard the audit "
                         "makes its own key")
    if args.shard is not None and (args.noise_std or args.client_head_seed is not None):
        raise AuditError("--noise-std and --client-head-seed describe the client the audit "
                         "simulates; they do not apply to an existing --shard")
    if not 0 <= args.noise_std < float("inf"):
        raise AuditError(f"--noise-std must be a finite number >= 0, got {args.noise_std}")
    if args.limit is not None and args.limit < 1:
        raise AuditError(f"--limit must be >= 1, got {args.limit}")
    if args.refine_steps < 0:
        raise AuditError(f"--refine-steps must be >= 0, got {args.refine_steps}")
    if not args.pixel_range[0] < args.pixel_range[1]:
        raise AuditError(f"--pixel-range must be LOW < HIGH, got {args.pixel_range}")


def _cmd_audit(args: argparse.Namespace) -> int:
    from ..audit.inputs import load_images
    from ..audit.report import format_table, to_json
    from ..audit.run import attacker_head, audit_shard, audit_simulated_client
    from ..crypto import PermutationKey

    _check_args(args)
    require("audit")
    if args.images == "digits":
        require("data", "sklearn", purpose="--images digits")
    head = attacker_head(model_config(args), args.head)
    config = head.config
    images = ids = None
    if args.images is not None:
        images, ids = load_images(args.images, config)
        if args.limit is not None:
            images, ids = images[:args.limit], ids[:args.limit]
    options = {"pixel_range": tuple(args.pixel_range), "refine_steps": args.refine_steps}
    if args.shard is None:
        run = audit_simulated_client(images, head, ids=ids, noise_std=args.noise_std,
                                     client_head_seed=args.client_head_seed, **options)
    else:
        key = PermutationKey.load(args.key) if args.key is not None else None
        run = audit_shard(args.shard, head, key=key, images=images, ids=ids, limit=args.limit,
                          **options)
    if args.json:
        print(to_json(run.rows, **run.context))
        return 0
    c = run.context
    print(f"{c['images']} images × {c['tokens_per_image']} tokens × {c['embed_dim']} "
          f"(patch values {c['patch_values']}); the shard's head "
          + ("is the head the server has" if run.same_head else
             "is NOT the server's head (a secret head): head-weight rows use the wrong head"))
    print(format_table(run.rows))
    if not run.scored:
        print("(no --key: positions correct is unknown; no --images: no PSNR/SSIM)")
    return 0
