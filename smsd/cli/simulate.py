"""``smsd simulate``: the protocol against its baselines on simulated clients."""

from __future__ import annotations

import argparse
from dataclasses import replace

from ..extras import available, require
from .common import (
    add_command,
    add_dp_args,
    add_loader_arg,
    add_progress_arg,
    check_output_dir,
    dp_config,
    fraction,
    non_negative_float,
    positive_float,
    positive_int,
)

__all__ = ["add_simulate"]


def add_simulate(sub: argparse._SubParsersAction) -> None:
    from ..experiments import SimulateConfig
    from ..experiments.config import METHODS

    d = SimulateConfig()
    s = d.split
    p = add_command(sub, "simulate", help="SMSD vs fine-tune only, FedAvg and centralized "
                    "training on simulated clients (the demo)", examples="""
  smsd simulate --out demo-out                  # the README's table (digits, 4 clients)
  smsd simulate --quick --out /tmp/smoke        # seconds: a smoke test
  smsd simulate --dataset folder:scans --clients 2 --seeds 0 1 2 --out scans-results""")
    p.add_argument("--dataset", default=s.dataset,
                   help="'digits' or 'textures' (bundled) or 'folder:PATH'")
    p.add_argument("--clients", type=positive_int, default=s.clients,
                   help="number of simulated clients (hospitals)")
    p.add_argument("--alpha", type=positive_float, default=s.alpha,
                   help="Dirichlet label skew across clients (smaller: more skewed)")
    p.add_argument("--labeled-fraction", type=fraction, default=s.labeled_fraction,
                   help="share of each client's training images that carry labels")
    p.add_argument("--rounds", type=positive_int, default=d.rounds, help="FedAvg rounds")
    p.add_argument("--local-epochs", type=positive_int, default=d.local_epochs,
                   help="FedAvg: local epochs per round")
    p.add_argument("--pretrain-epochs", type=positive_int, default=None,
                   help="server pre-training epochs (default: the recipe's schedule scaled "
                   "to the data set, smsd.recipe.scale_to_data; 30 on the digits)")
    p.add_argument("--finetune-epochs", type=positive_int, default=d.recipe.finetune.epochs,
                   help="each client's fine-tuning epochs")
    p.add_argument("--smsd-body-lr-scale", type=positive_float,
                   default=d.recipe.smsd_body_lr_scale,
                   help="body LR scale when SMSD's clients fine-tune the pre-trained body")
    p.add_argument("--seed", type=int, default=s.seed,
                   help="seed of the split, the keys, every init and shuffle")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="run once per seed and report mean ± std (overrides --seed)")
    p.add_argument("--out", default="simulate-results",
                   help="folder for results.json/.csv/.png (created; its path is printed)")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test run (seconds)")
    add_progress_arg(p)
    p.add_argument("--engine", choices=("local", "flower"), default="local",
                   help="flower: run the SMSD row through Flower's simulation engine "
                   "(needs smsd[flower])")
    add_loader_arg(p)
    p.add_argument("--noise-std", type=non_negative_float, default=d.recipe.noise_std,
                   help="Gaussian noise on the uploaded tokens (privacy mitigation; smsd audit)")
    p.add_argument("--head-seed", type=int, default=d.recipe.model.head_seed,
                   help="seed of the clients' head (a seed the clients keep from the server "
                   "is the 'secret head seed' defence; smsd audit)")
    p.add_argument("--pos-embed-scale", type=non_negative_float,
                   default=d.recipe.model.pos_embed_scale,
                   help="scale of the head's position embedding (0: none, the 'no position "
                   "embedding' defence; smsd audit)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   metavar="METHOD", help=f"which methods to run (of {', '.join(METHODS)}; "
                   "a defence changes only SMSD's row)")
    p.add_argument("--membership", action="store_true",
                   help="run the membership-inference attack on SMSD's returned body "
                   "(uploaded images vs the never-uploaded test images; AUC in the table)")
    p.add_argument("--no-select", action="store_true",
                   help="fine-tune with the recipe's setting as it is, instead of each "
                   "method picking among a few settings on held-out labels "
                   "(smsd.protocol.recipe_selection)")
    add_dp_args(p)
    p.set_defaults(func=_cmd_simulate)


def _config(args: argparse.Namespace):
    from ..data import DataSplit
    from ..experiments import SimulateConfig

    recipe = SimulateConfig().recipe
    model = recipe.model.replace(head_seed=args.head_seed, pos_embed_scale=args.pos_embed_scale)
    dp = dp_config(args)
    koleo = recipe.pretrain.koleo_weight
    if dp is not None and koleo:
        # KoLeo ties a batch's images together: no per-image clipping bounds it.
        print(f"DP pre-training: KoLeo off (the recipe's {koleo} → 0)")
        koleo = 0.0
    if args.pretrain_epochs is not None:
        recipe = recipe.with_pretrain_epochs(args.pretrain_epochs)
    recipe = replace(
        recipe, model=model, smsd_body_lr_scale=args.smsd_body_lr_scale,
        noise_std=args.noise_std,
        pretrain=replace(recipe.pretrain, dp=dp, koleo_weight=koleo),
        finetune=replace(recipe.finetune, epochs=args.finetune_epochs))
    split = DataSplit(dataset=args.dataset, clients=args.clients, alpha=args.alpha,
                      labeled_fraction=args.labeled_fraction)
    cfg = SimulateConfig(split=split, rounds=args.rounds, local_epochs=args.local_epochs,
                         loader=args.loader, recipe=recipe,
                         methods=tuple(dict.fromkeys(args.methods)),
                         membership=args.membership,
                         select=not args.no_select).with_seed(args.seed)
    return cfg.quick() if args.quick else cfg


def _cmd_simulate(args: argparse.Namespace) -> int:
    from ..experiments import format_summary, format_table, simulate, simulate_seeds
    from ..experiments.targets import format_targets, targets_of_runs

    cfg = _config(args)
    _check_extras(args)
    out = check_output_dir(args.out, "--out").absolute()
    print(f"results go to {out}")
    if args.seeds:
        runs = simulate_seeds(cfg, args.seeds, out, progress=not args.no_progress,
                              engine=args.engine)
        print()
        print(format_summary(runs))
        targets = targets_of_runs(runs)
        if targets is not None:
            print()
            print(format_targets(targets))
        print(f"\nsaved {out}/summary.json, summary.csv"
              + (", targets.json" if targets is not None else "") + " and seed-N/ per run")
        return 0
    results = simulate(cfg, out, progress=not args.no_progress, engine=args.engine)
    print()
    print(format_table(results))
    print(f"\nsaved {out}/results.json and results.csv"
          + (", results.png" if available("matplotlib") else " (no plot: matplotlib missing)"))
    return 0


def _check_extras(args: argparse.Namespace) -> None:
    """What this run will need, checked before minutes of training (the plot alone is
    optional: without matplotlib it is skipped with a warning)."""
    if args.dataset == "digits":
        require("data", "sklearn", purpose="--dataset digits")
    elif args.dataset == "textures":
        require("data", "skimage", "sklearn", "PIL", purpose="--dataset textures")
    elif args.loader != "dali" and not (args.loader == "auto" and available("nvidia.dali")):
        require("data", "PIL", purpose=f"--dataset {args.dataset} with the torch loader")
    if args.engine == "flower":
        require("flower", purpose="--engine flower")
