"""SplitViT: config, seeded head, order invariance of the body, packed views, DINO head,
checkpoint loading."""

from __future__ import annotations

import pytest
import torch

from smsd.models import (
    DINOHead,
    PatchHead,
    SplitViT,
    ViTBody,
    ViTConfig,
    head_fingerprint,
    load_pretrained,
    vit_base,
    vit_small,
    vit_tiny,
)
from smsd.models.pretrained import CheckpointError

TINY = vit_tiny(patch_size=4, img_size=16, in_chans=3, embed_dim=32, depth=2, num_heads=4)


def test_constructors_and_overrides():
    assert vit_tiny().embed_dim == 192 and vit_small().embed_dim == 384
    assert vit_base(patch_size=8, img_size=64, in_chans=1).n_tokens == 64
    assert TINY.grid == 4 and TINY.n_tokens == 16
    assert ViTConfig.from_json(TINY.to_json()) == TINY


@pytest.mark.parametrize("bad, match", [
    (dict(img_size=30, patch_size=4), "multiple of patch_size"),
    (dict(embed_dim=30, num_heads=4), "divisible by num_heads"),
    (dict(depth=0), "depth"),
    (dict(in_chans=True), "in_chans"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**bad)


def test_head_is_seeded_and_identical_everywhere():
    torch.manual_seed(123)  # the global RNG must not matter
    a = PatchHead(TINY)
    torch.manual_seed(456)
    b = PatchHead(TINY)
    assert head_fingerprint(a) == head_fingerprint(b)
    assert head_fingerprint(PatchHead(TINY.replace(head_seed=1))) != head_fingerprint(a)


def test_head_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match="images must have shape"):
        PatchHead(TINY)(torch.randn(2, 1, 16, 16))


# The attention op computes in fp32 at most: order-invariance then holds up to fp32
# summation-order rounding (~1e-6 on O(1) features), while any positional leak would
# change the features by O(1).
FP32_ORDER_TOL = {"rtol": 1e-5, "atol": 1e-5}


def test_cls_output_invariant_to_token_order(backend):
    body = ViTBody(TINY).eval()
    tokens = torch.randn(3, TINY.n_tokens, TINY.embed_dim)
    perm = torch.stack([torch.randperm(TINY.n_tokens) for _ in range(3)])
    shuffled = torch.gather(tokens, 1, perm[..., None].expand_as(tokens))
    with torch.no_grad():
        torch.testing.assert_close(body(shuffled), body(tokens), **FP32_ORDER_TOL)
        # Patch outputs are permuted the same way (equivariance).
        out, out_shuffled = body(tokens, return_all=True), body(shuffled, return_all=True)
    torch.testing.assert_close(out_shuffled[:, 1:],
                               torch.gather(out[:, 1:], 1, perm[..., None].expand_as(tokens)),
                               **FP32_ORDER_TOL)


def test_forward_views_packed_matches_dense_and_per_view(backend):
    body = ViTBody(TINY).eval()
    views = [torch.randn(b, k, TINY.embed_dim) for b, k in ((2, 8), (2, 8), (2, 3), (1, 5))]
    expected = torch.cat([body(v) for v in views])
    torch.testing.assert_close(body.forward_views(views), expected, **FP32_ORDER_TOL)
    torch.testing.assert_close(body.forward_views(views, packed=True), expected, **FP32_ORDER_TOL)


def test_forward_views_gradients_match(backend):
    body = ViTBody(TINY)
    views = [torch.randn(2, k, TINY.embed_dim) for k in (6, 3)]
    grads = []
    for packed in (False, True):
        body.zero_grad()
        body.forward_views(views, packed=packed).square().sum().backward()
        grads.append(body.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], **FP32_ORDER_TOL)


def test_body_rejects_wrong_width():
    with pytest.raises(ValueError, match="D=32"):
        ViTBody(TINY)(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="at least one"):
        ViTBody(TINY).forward_views([])


def test_timm_parameter_names():
    names = set(SplitViT(TINY.replace(num_classes=3)).state_dict())
    for name in ("head.patch_embed.proj.weight", "head.pos_embed", "body.cls_token",
                 "body.blocks.1.norm1.weight", "body.blocks.0.attn.qkv.weight",
                 "body.blocks.0.attn.proj.bias", "body.blocks.0.norm2.bias",
                 "body.blocks.0.mlp.fc1.weight", "body.blocks.0.mlp.fc2.weight",
                 "body.norm.weight", "tail.head.weight"):
        assert name in names, name


def test_dino_head_shapes_and_fixed_norm():
    head = DINOHead(32, out_dim=50, hidden_dim=24, bottleneck_dim=8)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 50)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    # With unit gain, each output is a dot product of unit vectors: |out| <= 1.
    assert out.abs().max() <= 1 + 1e-5
    assert DINOHead(32, 50, 24, 8, norm_last_layer=False) \
        .last_layer.parametrizations.weight.original0.requires_grad
    with pytest.raises(ValueError, match="out_dim"):
        DINOHead(32, out_dim=0)


def _timm_style_state(model: SplitViT) -> dict[str, torch.Tensor]:
    """What a timm ViT with these weights would save (CLS position embedding separate)."""
    cls_pos = torch.randn(1, 1, model.config.embed_dim)
    state = {"cls_token": model.body.cls_token.detach() - cls_pos,
             "pos_embed": torch.cat([cls_pos, model.head.pos_embed.detach()], dim=1)}
    for name, tensor in model.state_dict().items():
        if name.startswith("head.patch_embed"):
            state[name[len("head."):]] = tensor
        elif name.startswith(("body.blocks", "body.norm")):
            state[name[len("body."):]] = tensor
        elif name.startswith("tail."):
            state[name[len("tail."):]] = tensor
    return state


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "dino"])
def test_load_pretrained_round_trip(tmp_path, fmt):
    config = TINY.replace(num_heads=4, num_classes=5)
    model = SplitViT(config).eval()
    state = _timm_style_state(model)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        payload = {"teacher": {f"backbone.{k}": v for k, v in state.items()}} \
            if fmt == "dino" else state
        torch.save(payload, path)
    loaded = load_pretrained(path, num_heads=4).eval()
    assert loaded.config == config
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(images), model(images))


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(bad)):
        load_pretrained(bad)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"patch_embed\.proj\.weight"):
        load_pretrained(tmp_path / "other.pth")


def test_matches_timm_vit():
    timm = pytest.importorskip("timm", reason="no timm here (CI cannot import it: no CPU "
                               "torchvision); tests/test_timm_reference.py covers this")
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2,
        num_heads=4, global_pool="token").eval()
    state = {k: v for k, v in ref.state_dict().items()}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, f"{tmp}/timm.pth")
        ours = load_pretrained(f"{tmp}/timm.pth", num_heads=4).eval()
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ours(images), ref(images), rtol=1e-5, atol=1e-5)


def test_head_gain_and_pos_scale_scale_the_seeded_head():
    base, scaled = PatchHead(TINY), PatchHead(TINY.replace(patch_embed_gain=3.0,
                                                           pos_embed_scale=0.5))
    torch.testing.assert_close(scaled.patch_embed.proj.weight,
                               3.0 * base.patch_embed.proj.weight)
    torch.testing.assert_close(scaled.pos_embed, 0.5 * base.pos_embed)
    assert head_fingerprint(scaled) != head_fingerprint(base)
    with pytest.raises(ValueError, match="pos_embed_scale"):
        TINY.replace(pos_embed_scale=-1.0)


def test_body_init_std():
    torch.manual_seed(0)
    wide = ViTBody(TINY.replace(init_std=0.2))
    std = wide.blocks[0].mlp.fc1.weight.std().item()
    assert 0.17 < std < 0.23
    with pytest.raises(ValueError, match="init_std"):
        TINY.replace(init_std=float("nan"))
    # 0 is allowed (a body file's config may say so): zero weights, not a ZeroDivisionError
    assert not ViTBody(TINY.replace(init_std=0.0)).blocks[0].mlp.fc1.weight.any()
