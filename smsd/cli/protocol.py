"""The protocol's commands: ``encode``, ``pretrain``, ``finetune`` (``evaluate``: its own
module). Every check that can fail runs before the work starts."""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from dataclasses import replace

from ..errors import SmsdError
from .common import (
    add_command,
    add_device_arg,
    add_dp_args,
    add_loader_arg,
    add_model_args,
    add_progress_arg,
    check_output_dir,
    check_output_file,
    dp_config,
    folder_loader,
    fraction,
    model_config,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_device,
)
from .sealing import add_seal_to_args, add_unseal_key_arg, recipients, unseal_key

__all__ = ["add_encode", "add_finetune", "add_pretrain"]

log = logging.getLogger("smsd")


def _folder_source(data: str):
    """The labeled folder ``data``, with one line on what it holds and what was skipped."""
    from ..data import ImageSource
    from ..data.folder import skipped_files

    source = ImageSource.from_folder(data)
    skipped = skipped_files(data)
    counts = ", ".join(f"{name} {int((source.labels == i).sum())}"
                       for i, name in enumerate(source.classes))
    log.info("%s: %d images in %d classes (%s)", data, len(source), len(source.classes), counts)
    if skipped:
        reasons = Counter(why for _, why in skipped)
        detail = "; ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
        log.warning("%s: skipped %d file(s): %s (first: %s)", data, len(skipped), detail,
                    skipped[0][0])
    return source


# ------------------------------------------------------------------ encode
def add_encode(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "encode", help="client: embed an image folder and write a permuted "
                    "token shard (the only upload)", examples="""
  smsd encode --data site-a/images --key site-a.key --out site-a.safetensors
  smsd encode --data site-a/images --key site-a.key --out site-a.sealed --seal-to server.pub""")
    p.add_argument("--data", required=True, help="image folder (ROOT/<class>/<image>; PNG, "
                   "JPEG, DICOM; other files and nested folders are skipped and counted)")
    p.add_argument("--key", required=True, help="this client's key file (smsd keygen)")
    p.add_argument("--out", required=True, help="shard file to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    add_model_args(p)
    add_loader_arg(p)
    p.add_argument("--noise-std", type=non_negative_float, default=0.0,
                   help="Gaussian noise on the uploaded tokens (privacy mitigation; smsd audit)")
    add_seal_to_args(p, "the server (its .pub)", attestation=True)
    add_progress_arg(p)
    p.set_defaults(func=_cmd_encode)


def _cmd_encode(args: argparse.Namespace) -> int:
    from ..crypto import PermutationKey
    from ..protocol.client import Client

    key = PermutationKey.load(args.key)  # before reading data: fail fast on a bad key
    check_output_file(args.out, "--out", force=args.force)
    seal_to = recipients(args)
    config = model_config(args)
    # The loader's ids are the file paths relative to --data: they pick each image's
    # permutation and stay here, not in the shard.
    loader = folder_loader(args, _folder_source(args.data), config, "encode")
    path = Client(config, key, noise_std=args.noise_std).encode(
        loader, args.out, seal_to=seal_to, progress=not args.no_progress)
    sealed = f", sealed to {', '.join(k.name for k in seal_to)}" if seal_to else ", UNSEALED"
    print(f"wrote {path}: {loader.num_samples} images × {config.n_tokens} tokens × "
          f"{config.embed_dim} ({loader.name} loader{sealed})")
    return 0


# ---------------------------------------------------------------- pretrain
def add_pretrain(sub: argparse._SubParsersAction) -> None:
    from ..protocol.server import RunOptions
    from ..recipe import Recipe

    d, r = Recipe().pretrain, RunOptions()
    p = add_command(
        sub, "pretrain", help="server: masked sampling distillation on token shards",
        description="server: masked sampling distillation on token shards. The defaults are "
        "the recipe smsd simulate measured (smsd.recipe.Recipe), its schedule sized to the "
        "shards' image count (smsd.recipe.scale_to_data).", examples="""
  smsd pretrain --shards site-a.safetensors site-b.safetensors --out body.safetensors
  smsd pretrain --shards s1.sealed s2.sealed --unseal-key server.key --seal-to a.pub b.pub \\
      --out body.sealed
  smsd pretrain --shards ... --out body.safetensors --resume     # after an interruption""")
    p.add_argument("--shards", nargs="+", required=True, metavar="SHARD",
                   help="the clients' token shards (smsd encode), in a fixed order")
    p.add_argument("--out", required=True, help="body file to write (.safetensors)")
    p.add_argument("--work-dir", default=None,
                   help="checkpoints and metrics.jsonl (default: OUT + '.work')")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in the work dir from its newest checkpoint "
                       "(same shards, by content, and same settings)")
    again.add_argument("--overwrite", "--force", action="store_true", dest="overwrite",
                       help="start over: delete the work dir's earlier run and replace --out")
    g = p.add_argument_group("schedule (default: the recipe's, sized to the data)")
    g.add_argument("--epochs", type=positive_int, default=None,
                   help="passes over the shards (default: about 660 steps, 10 to 1000 epochs)")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="images per step (global, split across torchrun ranks)")
    g.add_argument("--lr", type=positive_float, default=d.lr,
                   help="peak AdamW learning rate (cosine to 1e-6 after the warm-up)")
    g.add_argument("--warmup-epochs", type=non_negative_int, default=None,
                   help="linear lr warm-up epochs (default: 2/30 of --epochs)")
    g.add_argument("--momentum-teacher", type=fraction, default=None,
                   help="start of the teacher's EMA momentum, cosine to 1 (default: 0.99 for "
                   "the recipe's 660 steps, higher for longer runs)")
    g = p.add_argument_group("DINO head and loss")
    g.add_argument("--out-dim", type=positive_int, default=d.out_dim,
                   help="prototypes K of the DINO head (the loss is ln K when collapsed)")
    g.add_argument("--hidden-dim", type=positive_int, default=d.hidden_dim,
                   help="DINO head MLP width")
    g.add_argument("--bottleneck-dim", type=positive_int, default=d.bottleneck_dim,
                   help="DINO head bottleneck")
    g.add_argument("--global-keep", type=fraction, nargs=2, default=list(d.global_keep),
                   metavar="R", help="share of tokens in each of the two global views")
    g.add_argument("--local-keep", type=fraction, nargs="*", default=list(d.local_keep),
                   metavar="R", help="share of tokens in each local view")
    g.add_argument("--teacher-temp", type=positive_float, default=d.teacher_temp,
                   help="teacher softmax temperature (sharper: lower)")
    g.add_argument("--koleo-weight", type=non_negative_float, default=None,
                   help=f"weight of DINOv2's KoLeo term on the student's CLS features "
                   f"(default: {d.koleo_weight:g}; 0 with --dp-*)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of inits and sampling")
    g = p.add_argument_group("operation")
    add_device_arg(g, "training")
    g.add_argument("--checkpoint-every", type=positive_int, default=r.checkpoint_every,
                   help="checkpoint every this many epochs (and at the end)")
    g.add_argument("--checkpoint-every-steps", type=non_negative_int,
                   default=r.checkpoint_every_steps,
                   help="also checkpoint every this many iterations (0 = off), so that a "
                   "killed run resumes at the exact data position")
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True): a resumed run matches "
                   "an uninterrupted one")
    add_progress_arg(g)
    add_unseal_key_arg(p, "the server's")
    add_seal_to_args(p, "the clients (their .pub files): each can open the body",
                     attestation=False)
    add_dp_args(p)
    add_model_args(p)
    p.set_defaults(func=_cmd_pretrain)


def pretrain_config(args: argparse.Namespace, n_images: int):
    """The :class:`~smsd.protocol.PretrainConfig` of the options: the recipe sized to
    ``n_images``, then every option the user gave."""
    from ..protocol.server import PretrainConfig
    from ..recipe import Recipe, scale_to_data

    recipe = replace(Recipe().pretrain, batch_size=args.batch_size)
    scaled = scale_to_data(recipe, n_images, args.epochs)
    dp = dp_config(args)
    koleo = args.koleo_weight
    if koleo is None:
        koleo = 0.0 if dp is not None else scaled.koleo_weight
    given = {"warmup_epochs": args.warmup_epochs, "momentum_teacher": args.momentum_teacher}
    # A teacher warms up from DINO's 0.04 unless --teacher-temp is sharper (as
    # PretrainConfig.with_teacher_temp).
    return replace(
        scaled, **{k: v for k, v in given.items() if v is not None}, lr=args.lr,
        teacher_temp=args.teacher_temp,
        warmup_teacher_temp=min(args.teacher_temp, PretrainConfig.warmup_teacher_temp),
        out_dim=args.out_dim, hidden_dim=args.hidden_dim, bottleneck_dim=args.bottleneck_dim,
        global_keep=tuple(args.global_keep), local_keep=tuple(args.local_keep),
        koleo_weight=koleo, seed=args.seed, dp=dp)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from ..protocol.distributed import process_group_from_env
    from ..protocol.server import RunOptions, Server
    from ..protocol.shard import count_images

    device = resolve_device(args.device)
    work = args.work_dir or f"{args.out}.work"
    check_output_file(args.out, "--out", force=args.overwrite or args.resume,
                      force_flag="--overwrite")
    check_output_dir(work, "--work-dir")
    config = model_config(args)
    train = pretrain_config(args, count_images(args.shards))
    log.info("pretrain: %d epochs, batch %d, lr %g (warm-up %d), teacher temperature %g, "
             "momentum %g, K = %d, KoLeo %g, on %s", train.epochs, train.batch_size,
             train.lr, train.warmup_epochs, train.teacher_temp, train.momentum_teacher,
             train.out_dim, train.koleo_weight, device)
    options = RunOptions(device=device, checkpoint_every=args.checkpoint_every,
                         checkpoint_every_steps=args.checkpoint_every_steps,
                         deterministic=args.deterministic)
    server = Server(config, train, options=options, unseal_key=unseal_key(args),
                    seal_body_to=recipients(args))
    args.interrupt_hint = (f"continue it with the same command and --resume (checkpoints in "
                           f"{work}, every {args.checkpoint_every} epoch(s))")
    # Under torchrun (WORLD_SIZE > 1) this process is one rank of a data-parallel job.
    with process_group_from_env(device) as ranks:
        server.pretrain(args.shards, out=args.out, work_dir=work, resume=args.resume,
                        overwrite=args.overwrite, progress=not args.no_progress)
    if ranks.is_main:
        print(f"wrote {args.out} (metrics and checkpoints in {work}"
              + (f"; {ranks.world_size} ranks" if ranks.distributed else "") + ")")
        privacy = server.privacy_record()
        if privacy is not None:
            print(f"differential privacy: (ε = {privacy['epsilon_spent']:.3g}, "
                  f"δ = {privacy['delta']:g}) per image, noise multiplier "
                  f"{privacy['noise_multiplier']:.3g}, clip {privacy['clip']:g} "
                  "(recorded in the body's metadata)")
    return 0


# ---------------------------------------------------------------- finetune
def add_finetune(sub: argparse._SubParsersAction) -> None:
    from ..recipe import Recipe

    d = Recipe().smsd_finetune
    p = add_command(sub, "finetune", help="client: train a classifier on the returned body",
                    description="client: train a classifier on the returned body. The "
                    "defaults are the fine-tuning recipe smsd simulate measured "
                    "(smsd.recipe.Recipe.smsd_finetune).", examples="""
  smsd finetune --body body.safetensors --data site-a/labeled --out site-a-model.safetensors
  smsd finetune --body body.sealed --unseal-key site-a.key --data site-a/labeled --augment
  smsd finetune --body body.safetensors --data site-a/labeled --select""")
    p.add_argument("--body", required=True, help="body file from smsd pretrain")
    p.add_argument("--data", required=True, help="labeled image folder (ROOT/<class>/<image>, "
                   "at least two classes)")
    p.add_argument("--out", default="model.safetensors", help="fine-tuned model to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="training epochs")
    p.add_argument("--lr", type=positive_float, default=d.lr,
                   help="peak AdamW learning rate of the new linear tail")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="images per step")
    p.add_argument("--freeze-body", action="store_true", help="train the linear tail only")
    p.add_argument("--augment", action="store_true",
                   help="train each epoch on freshly augmented images (random resized crop, "
                   "flip, brightness/contrast) from the loader's fine-tuning pipeline")
    p.add_argument("--body-lr-scale", type=positive_float, default=d.body_lr_scale,
                   help="the pre-trained body's LR is lr × this (the new tail uses lr)")
    p.add_argument("--select", action="store_true",
                   help="pick the setting on this client's labels: hold out a stratified "
                   "fifth, try each candidate (body LR ×1, ×0.3, ×0.3 with 30%% of the "
                   "epochs, linear probe, 50%% token subsets, and declining the body for a "
                   "random one of its own), train the best on all images "
                   "(smsd.protocol.recipe_selection; not with --augment/--freeze-body)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the tail and shuffles")
    add_unseal_key_arg(p, "this client's")
    add_loader_arg(p)
    add_progress_arg(p)
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..protocol.body_io import load_body
    from ..protocol.classifier_io import save_classifier
    from ..protocol.client import Client
    from ..protocol.recipe_selection import RETURNED_BODY_CANDIDATES
    from ..recipe import Recipe

    check_output_file(args.out, "--out", force=args.force)
    for flag in ("augment", "freeze_body"):
        if args.select and getattr(args, flag):
            raise SmsdError(f"--select cannot be combined with --{flag.replace('_', '-')}: "
                            + ("the held-out images would reach training through the "
                               "augmented loader" if flag == "augment" else
                               "the linear probe is one of the candidates --select tries"))
    body, config, fingerprint = load_body(args.body, key=unseal_key(args))
    client = Client.for_trained(config, fingerprint, args.body)
    source = _folder_source(args.data)
    classes = list(source.classes)
    if len(classes) < 2:
        raise SmsdError(f"--data {args.data} holds one class ({classes[0]}): a classifier "
                        "needs at least two class folders (ROOT/<class>/<image>)")
    ft = replace(Recipe().smsd_finetune, epochs=args.epochs, lr=args.lr,
                 batch_size=args.batch_size, freeze_body=args.freeze_body,
                 body_lr_scale=args.body_lr_scale, seed=args.seed)
    loader = folder_loader(args, source, config, "eval")
    augment = folder_loader(args, source, config, "finetune") if args.augment else None
    metrics = client.finetune(body, loader, num_classes=len(classes), config=ft,
                              augment=augment,
                              select=RETURNED_BODY_CANDIDATES if args.select else None,
                              progress=not args.no_progress)
    save_classifier(args.out, client.model, classes=classes, head_fingerprint=client.fingerprint)
    if "selection" in metrics:
        _print_selection(metrics["selection"])
    print(f"wrote {args.out}: train loss {metrics['train_loss']:.4f}, "
          f"train accuracy {100 * metrics['train_accuracy']:.2f}% on {len(source)} images, "
          f"{len(classes)} classes (score it on held-out images: smsd evaluate)")
    return 0


def _print_selection(selection: dict) -> None:
    """Each candidate's held-out scores and the pick, one line each."""
    print(f"held out {selection['n_validation']} labeled images to pick the setting:")
    for name, scores in selection["validation"].items():
        mark = "  <- picked" if name == selection["picked"] else ""
        print(f"  {name}: accuracy {100 * scores['accuracy']:.2f}%, "
              f"balanced {100 * scores['balanced']:.2f}%{mark}")
    if selection.get("own_body"):
        print("the returned body was declined: the model trains a random body of its own "
              "(it did better on the held-out labels)")
