"""Load timm / DINO ViT checkpoints into a :class:`SplitViT`."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import SmsdError
from ..safe_files import FLOAT_DTYPES, read_safetensors
from .config import ViTConfig
from .vit import SplitViT

__all__ = ["CheckpointError", "load_pretrained"]


class CheckpointError(SmsdError, ValueError):
    """A checkpoint is missing, unreadable or does not fit the model."""


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        _, state = read_safetensors(path, "checkpoint", error=CheckpointError,
                                    dtypes=FLOAT_DTYPES)
        return _strip_prefixes(state)
    try:
        # Pickled weights are a user's own download, never a file from a client site
        # (those are safetensors only); weights_only=True unpickles tensors and containers.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any parser error means the same thing to the user
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None
    # DINO checkpoints nest the weights ({"teacher": {...}}, {"model": ...}).
    for key in ("teacher", "model", "state_dict", "student"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"checkpoint {path} holds non-finite values in {name!r}")
    return _strip_prefixes(state)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        for prefix in ("module.", "backbone."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = tensor
    return out


def _infer_config(state: dict[str, torch.Tensor], path: Path, **overrides) -> ViTConfig:
    try:
        proj = state["patch_embed.proj.weight"]
        pos = state["pos_embed"]
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {path} has no {exc.args[0]} (not a ViT?)") from None
    try:
        fields = _architecture(state, proj, pos)
        fields.update(overrides)
        return ViTConfig(**fields)
    except (KeyError, IndexError, ValueError, TypeError, ZeroDivisionError) as exc:
        raise CheckpointError(f"checkpoint {path} is not a ViT state dict this loader "
                              f"understands: {exc!r}") from None


def _architecture(state: dict[str, torch.Tensor], proj: torch.Tensor,
                  pos: torch.Tensor) -> dict:
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    depth = len(blocks)
    # The file's own block numbers set the depth: "blocks.1000000.x" must not build
    # a million blocks.
    if blocks != set(range(depth)) or proj.dim() != 4 or pos.dim() != 3:
        raise ValueError("blocks must be numbered 0..depth-1, patch_embed.proj.weight 4-D "
                         "and pos_embed 3-D")
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    # timm's pos_embed has a CLS position first unless the patch count is a square.
    with_cls = pos.shape[1] - 1
    n_patches = with_cls if with_cls > 0 and round(with_cls**0.5) ** 2 == with_cls \
        else pos.shape[1]
    grid = round(n_patches**0.5)
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    fields = dict(img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=dim,
                  depth=depth, num_heads=max(1, dim // 64), mlp_ratio=mlp_ratio,
                  qkv_bias="blocks.0.attn.qkv.bias" in state)
    if "head.weight" in state:
        fields["num_classes"] = state["head.weight"].shape[0]
    return fields


def load_pretrained(
    path: str | os.PathLike, config: ViTConfig | None = None, **overrides
) -> SplitViT:
    """Build a :class:`SplitViT` from a timm/DINO ViT state dict.

    Reads ``.safetensors`` or a ``torch.save`` file (with ``weights_only=True``). Without
    ``config`` the architecture is inferred from the weights; ``num_heads`` cannot be
    and defaults to ``embed_dim // 64`` (timm's ViT-S/B); pass it in ``overrides``
    otherwise. The CLS position embedding is folded into the body's CLS token.
    """
    path = Path(path)
    state = _read_state_dict(path)
    config = config or _infer_config(state, path, **overrides)
    model = SplitViT(config)
    n = config.n_tokens
    try:
        pos = state["pos_embed"]
        cls = state["cls_token"]
    except KeyError as exc:
        raise CheckpointError(f"checkpoint {path} has no {exc.args[0]}") from None
    if tuple(cls.shape) != (1, 1, config.embed_dim) or pos.dim() != 3:
        raise CheckpointError(f"checkpoint {path}: cls_token has shape {list(cls.shape)} and "
                              f"pos_embed {list(pos.shape)}, expected [1, 1, "
                              f"{config.embed_dim}] and [1, N, {config.embed_dim}]")
    mapped: dict[str, torch.Tensor] = {}
    if pos.shape[1] == n + 1:
        mapped["head.pos_embed"] = pos[:, 1:]
        mapped["body.cls_token"] = cls + pos[:, :1]
    elif pos.shape[1] == n:
        mapped["head.pos_embed"] = pos
        mapped["body.cls_token"] = cls
    else:
        raise CheckpointError(
            f"checkpoint {path}: pos_embed has {pos.shape[1]} positions, the model has {n} patches"
        )
    for name, tensor in state.items():
        if name.startswith("patch_embed."):
            mapped["head." + name] = tensor
        elif name.startswith(("blocks.", "norm.")):
            mapped["body." + name] = tensor
        elif name.startswith("head.") and model.tail is not None:
            mapped["tail." + name] = tensor
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks weights for: {', '.join(missing[:5])}")
    unexpected = sorted(set(mapped) - set(expected))
    if unexpected:
        raise CheckpointError(f"checkpoint {path} has weights this model does not have: "
                              f"{', '.join(unexpected[:5])}")
    for name, tensor in mapped.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"checkpoint {path}: {name} has dtype {tensor.dtype}, "
                                  "weights must be floating point")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"checkpoint {path}: {name} has shape {list(tensor.shape)}, "
                f"the model expects {list(expected[name].shape)}"
            )
    model.load_state_dict(mapped)
    return model
