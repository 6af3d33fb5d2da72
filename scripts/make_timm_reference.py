"""Write tests/data/timm_reference.safetensors: timm's own outputs, which
tests/test_timm_reference.py compares smsd's ViT and Attention with where timm is not
installed (CI: timm imports torchvision, and no torchvision wheel on the registry loads
beside the CPU torch the project pins).

It runs where timm runs, in a venv of its own, and never imports smsd (the reference must
come from timm alone). The torch there may be any build, a CUDA one included; it runs on
the CPU:

    python3 -m venv /tmp/timm-venv
    /tmp/timm-venv/bin/pip install torch torchvision timm safetensors
    env -u PYTHONPATH OMP_NUM_THREADS=1 /tmp/timm-venv/bin/python scripts/make_timm_reference.py
    rm -r /tmp/timm-venv

For each case a small timm model is built and every parameter is redrawn from a seeded
generator, at scales where each part of the block shows: attention logits of O(1) (a
wrong scale or q/k layout moves the outputs by O(1)), MLP inputs of O(1) (timm's own
init, std 0.02, keeps them near 0, where a tanh GELU matches the exact one: that planted
bug passes the live timm test), and in the second ViT embeddings of 0.01, so that its
first LayerNorm sees a variance of ~1e-4 and an eps other than timm's 1e-6 shows. Its
fp32 state dict (timm's key names), the seeded input and timm's fp32 outputs are saved
under ``CASE/state/KEY``, ``CASE/input`` and ``CASE/out/NAME``. The metadata records the
timm and torch versions, the date, the command, each case's constructor arguments, and
the spreads that size the test's tolerance: timm fp32 vs fp64, and timm's fused (SDPA)
vs its plain attention. The tensors are the same on every run with the same timm and
torch (made with timm 1.0.31, torch 2.14.1: ``pip install torch==2.14.1
torchvision==0.29.1 timm==1.0.31 safetensors``); the file is ~160 KB.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import Attention, VisionTransformer

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "timm_reference.safetensors"
FORMAT = "smsd-timm-reference/1"

# The live test's ViT (tests/test_models.py: test_matches_timm_vit), and a second one with
# the other loader branches: no qkv bias, no classifier, one input channel, mlp_ratio 2 and
# no CLS position (no_embed_class, as DeiT-3 and DINOv2 checkpoints have).
VIT_CASES = {
    "vit": dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2,
                num_heads=4, global_pool="token"),
    "vit_no_embed_class": dict(img_size=8, patch_size=4, in_chans=1, num_classes=0,
                               embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
                               qkv_bias=False, no_embed_class=True, global_pool="token"),
}
# Scale of the patch embedding, CLS token and position embedding per case (redraw).
EMBED_SCALE = {"vit": 1.0, "vit_no_embed_class": 0.01}
# The live test's timm Attention (tests/test_attention_module.py) at half the width.
ATTN_CASE = dict(dim=32, num_heads=2, qkv_bias=True)
ATTN_TOKENS = 17
BATCH = 2
SEED = 0


@torch.no_grad()
def redraw(model: torch.nn.Module, gen: torch.Generator, embed_scale: float = 1.0) -> None:
    """Every parameter from ``gen``: weights with std fan_in**-0.5, norm gains 1 ± 0.2,
    biases 0.2, CLS token and position embedding 1; the last two and the patch
    embedding times ``embed_scale``."""
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        noise = torch.randn(param.shape, generator=gen)
        if leaf in ("cls_token", "pos_embed"):
            value = noise
        elif param.dim() >= 2:
            value = noise * param[0].numel() ** -0.5
        elif leaf == "weight":  # LayerNorm gain
            value = 1 + 0.2 * noise
        else:
            value = 0.2 * noise
        embedding = name.startswith("patch_embed.") or leaf in ("cls_token", "pos_embed")
        param.copy_(value * embed_scale if embedding else value)
    if any(True for _ in model.buffers()):
        raise RuntimeError("the model has buffers this script does not redraw")


def set_fused(model: torch.nn.Module, fused: bool) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = fused
    return model


def max_abs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@torch.no_grad()
def run_case(model: torch.nn.Module, x: torch.Tensor, outputs) -> tuple[dict, dict]:
    """fp32 outputs, and the spreads of timm's fp64 and plain-attention outputs from them."""
    model.eval()
    out = outputs(model, x)
    ref64 = outputs(copy.deepcopy(model).double(), x.double())
    plain = outputs(set_fused(copy.deepcopy(model), False), x)
    fused = any(m.fused_attn for m in model.modules() if isinstance(m, Attention))
    return out, {"fused_attn": fused, "max_abs_vs_fp64": max_abs(out, ref64),
                 "max_abs_fused_vs_plain": max_abs(out, plain),
                 "max_abs_output": max(float(v.abs().max()) for v in out.values())}


def vit_outputs(model: VisionTransformer, images: torch.Tensor) -> dict[str, torch.Tensor]:
    tokens = model.forward_features(images)  # [B, 1 + N, D] after the final norm
    out = {"tokens": tokens, "features": model.forward_head(tokens, pre_logits=True)}
    if model.num_classes:
        out["logits"] = model.forward_head(tokens)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tensors: dict[str, torch.Tensor] = {}
    cases: dict[str, dict] = {}
    spreads: dict[str, dict] = {}

    def store(case: str, model, x, out) -> None:
        for key, value in model.state_dict().items():
            tensors[f"{case}/state/{key}"] = value
        tensors[f"{case}/input"] = x
        for key, value in out.items():
            tensors[f"{case}/out/{key}"] = value

    for i, (case, kwargs) in enumerate(VIT_CASES.items()):
        gen = torch.Generator().manual_seed(SEED + i)
        model = VisionTransformer(**kwargs)
        redraw(model, gen, EMBED_SCALE[case])
        c = kwargs
        images = torch.randn(BATCH, c["in_chans"], c["img_size"], c["img_size"], generator=gen)
        out, spreads[case] = run_case(model, images, vit_outputs)
        cases[case] = {"class": "timm.models.vision_transformer.VisionTransformer", **kwargs,
                       "embed_scale": EMBED_SCALE[case]}
        store(case, model, images, out)

    gen = torch.Generator().manual_seed(SEED + len(VIT_CASES))
    attn = Attention(**ATTN_CASE)
    redraw(attn, gen)
    x = torch.randn(BATCH, ATTN_TOKENS, ATTN_CASE["dim"], generator=gen)
    out, spreads["attn"] = run_case(attn, x, lambda m, t: {"out": m(t)})
    cases["attn"] = {"class": "timm.models.vision_transformer.Attention", **ATTN_CASE}
    store("attn", attn, x, out)

    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "timm": timm.__version__,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["env", "-u", "PYTHONPATH", "OMP_NUM_THREADS=1", "python",
                               "scripts/make_timm_reference.py",
                               *(sys.argv[1:] if argv is None else argv)]),
        "seed": str(SEED),
        "cases": json.dumps(cases, sort_keys=True),
        "spreads": json.dumps(spreads, sort_keys=True),
    }
    assert "smsd" not in sys.modules, "the reference must not depend on smsd"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(tensors)} tensors)")
    print(json.dumps(spreads, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
