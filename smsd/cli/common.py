"""Options and helpers several commands share (parsing and checks before work starts)."""

from __future__ import annotations

import argparse
import os
import re
import textwrap
from pathlib import Path

from ..errors import SmsdError

__all__ = ["HelpFormatter", "add_command", "add_device_arg", "add_dp_args", "add_loader_arg",
           "add_model_args", "add_progress_arg", "check_output_dir", "check_output_file",
           "devices", "dp_config", "folder_loader", "fraction", "model_config",
           "non_negative_float", "non_negative_int", "positive_float", "positive_int",
           "resolve_device"]


# ------------------------------------------------------------------ help
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                    argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (not for flags, nor where the help text says
    what an absent value means); descriptions and examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or not action.help:
            return action.help
        return super()._get_help_string(action)


def add_command(sub: argparse._SubParsersAction, name: str, *, help: str,
                examples: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose help shows every default and ends with ``examples``."""
    return sub.add_parser(name, help=help, description=textwrap.fill(description or help, 79),
                          formatter_class=HelpFormatter,
                          epilog="examples:\n" + examples.strip("\n"))


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is also off when stderr is not a terminal)")


# ------------------------------------------------------ argument types
def _number(kind: type, test, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a number > 0")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
fraction = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


# --------------------------------------------------------------- devices
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def add_device_arg(p: argparse.ArgumentParser, what: str = "the work") -> None:
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                   help=f"where {what} runs; auto = the GPU when one is visible, else the CPU")


def resolve_device(choice: str, flag: str = "--device") -> str:
    """``auto|cpu|cuda|cuda:N`` as a torch device string; an absent device is an error
    naming ``flag``, raised before any work starts."""
    import torch

    if not _DEVICE.fullmatch(choice):
        raise SmsdError(f"{flag} must be auto, cpu, cuda or cuda:N, got {choice!r}")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SmsdError(f"{flag} {choice}: no CUDA device is visible on this machine "
                            "(use --device cpu or auto)")
        index = int(choice.partition(":")[2] or 0)
        if index >= count:
            raise SmsdError(f"{flag} {choice}: this machine has {count} CUDA device(s), "
                            f"cuda:0..cuda:{count - 1}")
    return choice


def devices(choice: str) -> list:
    """``--device cpu|cuda|all`` as torch devices; a CUDA device that is absent is an error."""
    import torch

    if choice == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(resolve_device(choice))]


# ---------------------------------------------------------------- outputs
def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """``path`` is a folder that exists or can be created (its nearest existing parent is
    a writable folder); checked before any work starts."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise SmsdError(f"{flag} {path}: exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise SmsdError(f"{flag} {path}: the folder is not writable")
        return path
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SmsdError(f"{flag} {path}: cannot create it ({parent} is not a writable folder)")
    return path


def check_output_file(path: str | os.PathLike, flag: str, *, force: bool = False,
                      force_flag: str = "--force") -> Path:
    """``path`` can be written: its folder exists and is writable, and it does not exist
    yet unless ``force``; checked before any work starts, so no work is lost at the end."""
    path = Path(path)
    parent = path.absolute().parent
    if path.is_dir():
        raise SmsdError(f"{flag} {path}: is a folder, expected a file name")
    if not parent.is_dir():
        raise SmsdError(f"{flag} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SmsdError(f"{flag} {path}: the folder {parent} is not writable")
    if path.exists() and not force:
        raise SmsdError(f"{flag} {path} exists; pass {force_flag} to replace it")
    return path


def add_model_args(p: argparse.ArgumentParser) -> None:
    from ..models import list_models

    g = p.add_argument_group("model (public config: every client and the server use the same)")
    g.add_argument("--model", choices=list_models(), default="demo",
                   help="demo: 4 blocks, dim 64, for 32×32 images with 4×4 patches")
    g.add_argument("--img-size", type=positive_int, default=None,
                   help="image side in pixels (default: the preset's; demo: 32)")
    g.add_argument("--patch-size", type=positive_int, default=None,
                   help="patch side in pixels (default: the preset's; demo: 4)")
    g.add_argument("--in-chans", type=positive_int, default=None,
                   help="image channels the head takes (default: the preset's; demo: 1, "
                   "gray: color images are averaged)")
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


def folder_loader(args: argparse.Namespace, source, config, mode: str = "eval"):
    """A ``--loader`` loader over ``source`` in the model's image size and channels."""
    from ..data import make_loader

    return make_loader(source, img_size=config.img_size, in_chans=config.in_chans,
                       mode=mode, loader=args.loader)


def add_dp_args(p: argparse.ArgumentParser) -> None:
    from ..protocol.privacy import DPConfig

    d = DPConfig(noise_multiplier=1.0)
    g = p.add_argument_group("differentially private pre-training (DP-SGD over images; "
                             "smsd.protocol.privacy)")
    g.add_argument("--dp-epsilon", type=positive_float, default=None, metavar="E",
                   help="spend at most this ε over the whole run (noise calibrated to it)")
    g.add_argument("--dp-noise-multiplier", type=positive_float, default=None, metavar="Z",
                   help="instead of --dp-epsilon: this noise multiplier (ε is reported)")
    g.add_argument("--dp-delta", type=positive_float, default=d.delta,
                   help="δ of the guarantee")
    g.add_argument("--dp-clip", type=positive_float, default=d.clip,
                   help="per-image gradient clipping bound (L2)")
    g.add_argument("--dp-center-clip", type=positive_float, default=d.center_clip,
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
