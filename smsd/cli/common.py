"""Options and helpers several commands share (parsing only)."""

from __future__ import annotations

import argparse

from ..errors import SmsdError

__all__ = ["add_dp_args", "add_loader_arg", "add_model_args", "devices", "dp_config",
           "folder_loader", "model_config"]


def devices(choice: str) -> list:
    """``--device cpu|cuda|all`` as torch devices; a CUDA device that is absent is an error."""
    import torch

    if choice == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if choice == "cuda" and not torch.cuda.is_available():
        raise SmsdError("--device cuda was asked for but no CUDA device is visible")
    return [torch.device(choice)]


def add_model_args(p: argparse.ArgumentParser) -> None:
    from ..models import list_models

    g = p.add_argument_group("model (public config: every client and the server use the same)")
    g.add_argument("--model", choices=list_models(), default="demo",
                   help="demo: 4 blocks, dim 64, for 32×32 images with 4×4 patches")
    g.add_argument("--img-size", type=int, default=None)
    g.add_argument("--patch-size", type=int, default=None)
    g.add_argument("--in-chans", type=int, default=None)
    g.add_argument("--head-seed", type=int, default=0, help="seed of the shared head init")
    g.add_argument("--patch-embed-gain", type=float, default=None,
                   help="scale of the seeded patch embedding (default: the preset's)")
    g.add_argument("--pos-embed-scale", type=float, default=None,
                   help="scale of the sin-cos position embedding (default: the preset's)")


def model_config(args: argparse.Namespace):
    """The :class:`~smsd.models.ViTConfig` the model options describe."""
    from ..models import model_config as preset

    given = {"img_size": args.img_size, "patch_size": args.patch_size,
             "in_chans": args.in_chans, "patch_embed_gain": args.patch_embed_gain,
             "pos_embed_scale": args.pos_embed_scale}
    return preset(args.model, head_seed=args.head_seed,
                  **{k: v for k, v in given.items() if v is not None})


def add_loader_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loader", choices=("auto", "dali", "torch"), default="auto",
                   help="image loader: NVIDIA DALI pipelines, or Pillow/pydicom + torch; "
                   "auto = DALI when it imports (the choice is logged)")


def folder_loader(args: argparse.Namespace, config, mode: str = "eval"):
    """A loader over ``args.data`` in the model's image size and channels."""
    from ..data import ImageSource, make_loader

    return make_loader(ImageSource.from_folder(args.data), img_size=config.img_size,
                       in_chans=config.in_chans, mode=mode, loader=args.loader)


def add_dp_args(p: argparse.ArgumentParser) -> None:
    from ..protocol.privacy import DPConfig

    d = DPConfig(noise_multiplier=1.0)
    g = p.add_argument_group("differentially private pre-training (DP-SGD over images; "
                             "smsd.protocol.privacy)")
    g.add_argument("--dp-epsilon", type=float, default=None, metavar="E",
                   help="spend at most this ε over the whole run (noise calibrated to it)")
    g.add_argument("--dp-noise-multiplier", type=float, default=None, metavar="Z",
                   help="instead of --dp-epsilon: this noise multiplier (ε is reported)")
    g.add_argument("--dp-delta", type=float, default=d.delta, help="δ of the guarantee")
    g.add_argument("--dp-clip", type=float, default=d.clip,
                   help="per-image gradient clipping bound (L2)")
    g.add_argument("--dp-center-clip", type=float, default=d.center_clip,
                   help="per-image bound on its contribution to DINO's center (L2)")


def dp_config(args: argparse.Namespace):
    """The :class:`~smsd.protocol.privacy.DPConfig` the DP options describe, or None."""
    from ..protocol.privacy import DPConfig

    if args.dp_epsilon is None and args.dp_noise_multiplier is None:
        return None
    from ..extras import require

    require("dp", purpose="--dp-epsilon / --dp-noise-multiplier (the accountant)")
    return DPConfig(epsilon=args.dp_epsilon, delta=args.dp_delta,
                    noise_multiplier=args.dp_noise_multiplier, clip=args.dp_clip,
                    center_clip=args.dp_center_clip)
