"""The protocol's commands: ``encode``, ``pretrain``, ``finetune``, ``evaluate``, ``simulate``.

``smsd/cli.py`` only registers them; parsers and logic live here.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from ..errors import SmsdError

__all__ = ["add_encode", "add_evaluate", "add_finetune", "add_pretrain", "add_simulate"]

_PRESETS = ("demo", "vit_tiny", "vit_small", "vit_base")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (public config: every client and the server use the same)")
    g.add_argument("--model", choices=_PRESETS, default="demo",
                   help="demo: 4 blocks, dim 64, for 32×32 images with 4×4 patches")
    g.add_argument("--img-size", type=int, default=None)
    g.add_argument("--patch-size", type=int, default=None)
    g.add_argument("--in-chans", type=int, default=None)
    g.add_argument("--head-seed", type=int, default=0, help="seed of the shared head init")
    g.add_argument("--patch-embed-gain", type=float, default=None,
                   help="scale of the seeded patch embedding (default: the preset's)")
    g.add_argument("--pos-embed-scale", type=float, default=None,
                   help="scale of the sin-cos position embedding (default: the preset's)")


def _model_config(args: argparse.Namespace):
    from .. import models
    from .simulate import default_model_config

    sizes = {k: v for k, v in (("img_size", args.img_size), ("patch_size", args.patch_size),
                               ("in_chans", args.in_chans)) if v is not None}
    if args.model == "demo":
        config = default_model_config().replace(**sizes)
    else:
        config = getattr(models, args.model)(**sizes)
    head = {k: v for k, v in (("patch_embed_gain", args.patch_embed_gain),
                              ("pos_embed_scale", args.pos_embed_scale)) if v is not None}
    return config.replace(head_seed=args.head_seed, **head)


def _loader_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto",
                   help="image loader: NVIDIA DALI pipelines, or Pillow/pydicom + torch; "
                   "auto = DALI when it imports (the choice is logged)")


def _folder_loader(args: argparse.Namespace, config, mode: str = "eval"):
    """A loader over ``args.data`` in the model's image size and channels."""
    from ..data import ImageSource, make_loader

    return make_loader(ImageSource.from_folder(args.data), img_size=config.img_size,
                       in_chans=config.in_chans, mode=mode, loader=args.loader)


# ------------------------------------------------------------------ encode
def add_encode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="client: embed an image folder and write a permuted "
                       "token shard (the only upload)")
    p.add_argument("--data", required=True, help="image folder (ROOT/<class>/<image>)")
    p.add_argument("--key", required=True, help="this client's key file (smsd keygen)")
    p.add_argument("--out", required=True, help="shard file to write (.safetensors)")
    _model_args(p)
    _loader_arg(p)
    p.add_argument("--noise-std", type=float, default=0.0,
                   help="Gaussian noise on the uploaded tokens (privacy mitigation; smsd audit)")
    p.set_defaults(func=_cmd_encode)


def _cmd_encode(args: argparse.Namespace) -> int:
    from ..crypto import PermutationKey
    from .client import Client

    key = PermutationKey.load(args.key)  # before reading data: fail fast on a bad key
    config = _model_config(args)
    # The loader's ids are the file paths relative to --data: they pick each image's
    # permutation and stay here, not in the shard.
    loader = _folder_loader(args, config, mode="encode")
    path = Client(config, key, noise_std=args.noise_std).encode(loader, args.out)
    print(f"wrote {path}: {loader.num_samples} images × {config.n_tokens} tokens × "
          f"{config.embed_dim} ({loader.name} loader)")
    return 0


# ---------------------------------------------------------------- pretrain
def add_pretrain(sub: argparse._SubParsersAction) -> None:
    from .server import PretrainConfig

    d = PretrainConfig()
    p = sub.add_parser("pretrain", help="server: masked sampling distillation on token shards")
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--out", required=True, help="body file to write (.safetensors)")
    p.add_argument("--work-dir", default=None,
                   help="checkpoints and metrics.jsonl (default: OUT + '.work')")
    p.add_argument("--resume", action="store_true", help="continue from the work dir's checkpoint")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    p.add_argument("--out-dim", type=int, default=d.out_dim)
    p.add_argument("--hidden-dim", type=int, default=d.hidden_dim)
    p.add_argument("--bottleneck-dim", type=int, default=d.bottleneck_dim)
    p.add_argument("--global-keep", type=float, nargs=2, default=list(d.global_keep))
    p.add_argument("--local-keep", type=float, nargs="*", default=list(d.local_keep))
    p.add_argument("--teacher-temp", type=float, default=d.teacher_temp)
    p.add_argument("--momentum-teacher", type=float, default=d.momentum_teacher,
                   help="start of the teacher's EMA momentum (cosine to 1)")
    p.add_argument("--koleo-weight", type=float, default=d.koleo_weight,
                   help="weight of DINOv2's KoLeo term on the student's CLS features")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--checkpoint-every-steps", type=int, default=d.checkpoint_every_steps,
                   help="also checkpoint every this many iterations (0 = off), so that a "
                   "killed run resumes at the exact data position")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True): a resumed run matches "
                   "an uninterrupted one")
    _model_args(p)
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .distributed import process_group_from_env
    from .server import PretrainConfig, Server

    train = PretrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        warmup_epochs=args.warmup_epochs, out_dim=args.out_dim, hidden_dim=args.hidden_dim,
        bottleneck_dim=args.bottleneck_dim, global_keep=tuple(args.global_keep),
        local_keep=tuple(args.local_keep), teacher_temp=args.teacher_temp,
        warmup_teacher_temp=min(args.teacher_temp, PretrainConfig().warmup_teacher_temp),
        momentum_teacher=args.momentum_teacher, koleo_weight=args.koleo_weight,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed, device=args.device,
        checkpoint_every_steps=args.checkpoint_every_steps, deterministic=args.deterministic)
    work = args.work_dir or f"{args.out}.work"
    server = Server(_model_config(args), train)
    # Under torchrun (WORLD_SIZE > 1) this process is one rank of a data-parallel job.
    with process_group_from_env(args.device) as ranks:
        server.pretrain(args.shards, out=args.out, work_dir=work, resume=args.resume,
                        progress=not args.no_progress)
    if ranks.is_main:
        print(f"wrote {args.out} (metrics and checkpoints in {work}"
              + (f"; {ranks.world_size} ranks" if ranks.distributed else "") + ")")
    return 0


# ---------------------------------------------------------------- finetune
def add_finetune(sub: argparse._SubParsersAction) -> None:
    from .training import PRETRAINED_BODY_LR_SCALE, FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="client: train a classifier on the returned body")
    p.add_argument("--body", required=True, help="body file from smsd pretrain")
    p.add_argument("--data", required=True, help="labeled image folder (ROOT/<class>/<image>)")
    p.add_argument("--out", default="model.safetensors", help="fine-tuned model to write")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--freeze-body", action="store_true", help="train the linear tail only")
    p.add_argument("--augment", action="store_true",
                   help="train each epoch on freshly augmented images (random resized crop, "
                   "flip, brightness/contrast) from the loader's fine-tuning pipeline")
    p.add_argument("--body-lr-scale", type=float, default=PRETRAINED_BODY_LR_SCALE,
                   help="the pre-trained body's LR is lr × this (the new tail uses lr)")
    p.add_argument("--seed", type=int, default=d.seed)
    _loader_arg(p)
    p.set_defaults(func=_cmd_finetune)


def _client_for(config, fingerprint: str, source: str):
    from .client import Client

    client = Client(config, None)
    if fingerprint and fingerprint != client.fingerprint:
        raise SmsdError(f"{source} was trained on tokens of a different head than this "
                        "model config's seeded head")
    return client


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .body_io import load_body
    from .classifier_io import save_classifier
    from .training import FinetuneConfig

    body, config, fingerprint = load_body(args.body)
    client = _client_for(config, fingerprint, args.body)
    loader = _folder_loader(args, config)
    classes = list(loader.source.classes)
    ft = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                        freeze_body=args.freeze_body, body_lr_scale=args.body_lr_scale,
                        seed=args.seed)
    augment = _folder_loader(args, config, mode="finetune") if args.augment else None
    metrics = client.finetune(body, loader, num_classes=len(classes), config=ft, augment=augment)
    save_classifier(args.out, client.model, classes=classes, head_fingerprint=client.fingerprint)
    print(f"wrote {args.out}: train loss {metrics['train_loss']:.4f}, "
          f"train accuracy {100 * metrics['train_accuracy']:.2f}%")
    return 0


# ---------------------------------------------------------------- evaluate
def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="accuracy of a fine-tuned model on a labeled folder")
    p.add_argument("--model", required=True, help="file from smsd finetune")
    p.add_argument("--data", required=True, help="labeled image folder (ROOT/<class>/<image>)")
    _loader_arg(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from ..data import collect
    from .classifier_io import load_classifier
    from .training import accuracy

    model, config, classes, fingerprint = load_classifier(args.model)
    client = _client_for(config, fingerprint, args.model)
    loader = _folder_loader(args, config)
    found = list(loader.source.classes)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise SmsdError(f"{args.data} has classes the model was not trained on: {unknown}")
    # Map this folder's label numbers onto the model's class order.
    remap = torch.tensor([classes.index(name) for name in found])
    batch = collect(loader)
    labels = batch.labels
    acc = accuracy(model, client.tokens(batch.images), remap[labels])
    print(f"accuracy {100 * acc:.2f}% on {len(labels)} images ({args.data})")
    return 0


# ---------------------------------------------------------------- simulate
def add_simulate(sub: argparse._SubParsersAction) -> None:
    from .simulate import SimulateConfig

    d = SimulateConfig()
    p = sub.add_parser("simulate", help="SMSD vs fine-tune only, FedAvg and centralized "
                       "training on simulated clients (the demo)")
    p.add_argument("--dataset", default=d.dataset, help="'digits' (bundled) or 'folder:PATH'")
    p.add_argument("--clients", type=int, default=d.clients)
    p.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet label skew")
    p.add_argument("--labeled-fraction", type=float, default=d.labeled_fraction)
    p.add_argument("--rounds", type=int, default=d.rounds, help="FedAvg rounds")
    p.add_argument("--local-epochs", type=int, default=d.local_epochs, help="FedAvg")
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain.epochs)
    p.add_argument("--finetune-epochs", type=int, default=d.finetune.epochs)
    p.add_argument("--smsd-body-lr-scale", type=float, default=d.smsd_body_lr_scale,
                   help="body LR scale when SMSD's clients fine-tune the pre-trained body")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="run once per seed and report mean ± std (overrides --seed)")
    p.add_argument("--out", default="simulate-results", help="folder for JSON/CSV/PNG")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test run (seconds)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--engine", choices=("local", "flower"), default="local",
                   help="flower: run the SMSD row through Flower's simulation engine "
                   "(needs smsd[flower])")
    _loader_arg(p)
    p.add_argument("--noise-std", type=float, default=d.noise_std,
                   help="Gaussian noise on the uploaded tokens (privacy mitigation; smsd audit)")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import (
        SimulateConfig,
        format_summary,
        format_table,
        quick_config,
        simulate,
        simulate_seeds,
    )

    cfg = SimulateConfig()
    cfg = replace(
        cfg, dataset=args.dataset, clients=args.clients, alpha=args.alpha,
        labeled_fraction=args.labeled_fraction, rounds=args.rounds,
        local_epochs=args.local_epochs, seed=args.seed, loader=args.loader,
        smsd_body_lr_scale=args.smsd_body_lr_scale,
        pretrain=replace(cfg.pretrain, epochs=args.pretrain_epochs, seed=args.seed),
        finetune=replace(cfg.finetune, epochs=args.finetune_epochs, seed=args.seed))
    cfg = replace(cfg, noise_std=args.noise_std)
    if args.quick:
        cfg = quick_config(cfg)
    if args.seeds:
        runs = simulate_seeds(cfg, args.seeds, args.out, progress=not args.no_progress,
                              engine=args.engine)
        print()
        print(format_summary(runs))
        print(f"\nsaved {args.out}/summary.json, summary.csv and seed-N/ per run")
        return 0
    results = simulate(cfg, args.out, progress=not args.no_progress, engine=args.engine)
    print()
    print(format_table(results))
    print(f"\nsaved {args.out}/results.json, results.csv, results.png")
    return 0
