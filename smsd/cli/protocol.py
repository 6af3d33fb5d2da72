"""The protocol's commands: ``encode``, ``pretrain``, ``finetune``, ``evaluate``."""

from __future__ import annotations

import argparse

from .common import (
    add_dp_args,
    add_loader_arg,
    add_model_args,
    dp_config,
    folder_loader,
    model_config,
)
from .sealing import add_seal_to_args, add_unseal_key_arg, recipients, unseal_key

__all__ = ["add_encode", "add_evaluate", "add_finetune", "add_pretrain"]


# ------------------------------------------------------------------ encode
def add_encode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="client: embed an image folder and write a permuted "
                       "token shard (the only upload)")
    p.add_argument("--data", required=True, help="image folder (ROOT/<class>/<image>)")
    p.add_argument("--key", required=True, help="this client's key file (smsd keygen)")
    p.add_argument("--out", required=True, help="shard file to write (.safetensors)")
    add_model_args(p)
    add_loader_arg(p)
    p.add_argument("--noise-std", type=float, default=0.0,
                   help="Gaussian noise on the uploaded tokens (privacy mitigation; smsd audit)")
    add_seal_to_args(p, "the server (its .pub)", attestation=True)
    p.set_defaults(func=_cmd_encode)


def _cmd_encode(args: argparse.Namespace) -> int:
    from ..crypto import PermutationKey
    from ..protocol.client import Client

    key = PermutationKey.load(args.key)  # before reading data: fail fast on a bad key
    seal_to = recipients(args)
    config = model_config(args)
    # The loader's ids are the file paths relative to --data: they pick each image's
    # permutation and stay here, not in the shard.
    loader = folder_loader(args, config, mode="encode")
    path = Client(config, key, noise_std=args.noise_std).encode(loader, args.out,
                                                                seal_to=seal_to)
    sealed = f", sealed to {', '.join(k.name for k in seal_to)}" if seal_to else ", UNSEALED"
    print(f"wrote {path}: {loader.num_samples} images × {config.n_tokens} tokens × "
          f"{config.embed_dim} ({loader.name} loader{sealed})")
    return 0


# ---------------------------------------------------------------- pretrain
def add_pretrain(sub: argparse._SubParsersAction) -> None:
    from ..protocol.server import PretrainConfig, RunOptions

    d, r = PretrainConfig(), RunOptions()
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
    p.add_argument("--checkpoint-every", type=int, default=r.checkpoint_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--checkpoint-every-steps", type=int, default=r.checkpoint_every_steps,
                   help="also checkpoint every this many iterations (0 = off), so that a "
                   "killed run resumes at the exact data position")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True): a resumed run matches "
                   "an uninterrupted one")
    add_unseal_key_arg(p, "the server's")
    add_seal_to_args(p, "the clients (their .pub files): each can open the body",
                     attestation=False)
    add_dp_args(p)
    add_model_args(p)
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from ..protocol.distributed import process_group_from_env
    from ..protocol.server import PretrainConfig, RunOptions, Server

    train = PretrainConfig.with_teacher_temp(
        args.teacher_temp, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        warmup_epochs=args.warmup_epochs, out_dim=args.out_dim, hidden_dim=args.hidden_dim,
        bottleneck_dim=args.bottleneck_dim, global_keep=tuple(args.global_keep),
        local_keep=tuple(args.local_keep),
        momentum_teacher=args.momentum_teacher, koleo_weight=args.koleo_weight,
        seed=args.seed, dp=dp_config(args))
    options = RunOptions(device=args.device, checkpoint_every=args.checkpoint_every,
                         checkpoint_every_steps=args.checkpoint_every_steps,
                         deterministic=args.deterministic)
    work = args.work_dir or f"{args.out}.work"
    server = Server(model_config(args), train, options=options, unseal_key=unseal_key(args),
                    seal_body_to=recipients(args))
    # Under torchrun (WORLD_SIZE > 1) this process is one rank of a data-parallel job.
    with process_group_from_env(args.device) as ranks:
        server.pretrain(args.shards, out=args.out, work_dir=work, resume=args.resume,
                        progress=not args.no_progress)
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
    from ..protocol.training import PRETRAINED_BODY_LR_SCALE, FinetuneConfig

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
    add_unseal_key_arg(p, "this client's")
    add_loader_arg(p)
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from ..protocol.body_io import load_body
    from ..protocol.classifier_io import save_classifier
    from ..protocol.client import Client
    from ..protocol.training import FinetuneConfig

    body, config, fingerprint = load_body(args.body, key=unseal_key(args))
    client = Client.for_trained(config, fingerprint, args.body)
    loader = folder_loader(args, config)
    classes = list(loader.source.classes)
    ft = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                        freeze_body=args.freeze_body, body_lr_scale=args.body_lr_scale,
                        seed=args.seed)
    augment = folder_loader(args, config, mode="finetune") if args.augment else None
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
    add_loader_arg(p)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..protocol.evaluate import evaluate_model_file

    result = evaluate_model_file(args.model, args.data, loader=args.loader)
    print(f"accuracy {100 * result.accuracy:.2f}% on {result.images} images ({args.data})")
    return 0
