"""Protocol: shards (content, privacy, validation), pre-training (determinism, resume),
body files, fine-tuning, simulate."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from smsd.crypto import PermutationKey, invert
from smsd.models import ViTBody, vit_tiny
from smsd.protocol import (
    BodyFileError,
    Client,
    FinetuneConfig,
    PretrainConfig,
    PretrainError,
    RunOptions,
    Server,
    ShardError,
    load_body,
    read_shard,
    save_body,
)
from smsd.protocol.schedules import cosine_schedule
from smsd.protocol.shard import inspect_shard

MODEL = vit_tiny(patch_size=4, img_size=16, in_chans=1, embed_dim=16, depth=1, num_heads=2)
TRAIN = PretrainConfig(epochs=2, batch_size=8, out_dim=32, hidden_dim=16, bottleneck_dim=8,
                       warmup_epochs=1, local_keep=(0.25,) * 3)
RUN = RunOptions(checkpoint_every=1)


def _server(train: PretrainConfig = TRAIN, model=MODEL) -> Server:
    return Server(model, train, options=RUN)


@pytest.fixture
def key():
    return PermutationKey.generate()


@pytest.fixture
def shard(tmp_path, key):
    images = torch.randn(20, 1, 16, 16)
    return Client(MODEL, key).encode(images, tmp_path / "c.safetensors"), images


def test_shard_holds_permuted_head_tokens(shard, key):
    path, images = shard
    client = Client(MODEL, key)
    tokens = read_shard(path, head_fingerprint=client.fingerprint, grid=4, embed_dim=16)
    assert tokens.dtype == torch.float16 and tokens.shape == (20, 16, 16)
    # Undo the secret permutation: the client's tokens come back (within fp16 rounding).
    inv = invert(key.permutations(range(20), 16))
    restored = torch.gather(tokens.float(), 1, inv[..., None].expand(-1, -1, 16))
    torch.testing.assert_close(restored, client.tokens(images), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(tokens.float(), client.tokens(images), atol=1e-2)


@pytest.mark.parametrize("field, value, message", [
    ("grid", 8, "has a 4×4 grid, the model has 8×8"),
    ("embed_dim", 32, "has embed_dim 16, the model has 32"),
    ("head_fingerprint", "0" * 64, "different head"),
])
def test_shard_of_another_model_is_refused(shard, field, value, message):
    path, _ = shard
    for read in (read_shard, inspect_shard):
        with pytest.raises(ShardError, match=message):
            read(path, **{field: value})


def test_shard_metadata_reveals_no_secret(shard, key):
    path, _ = shard
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta, names = handle.metadata(), list(handle.keys())
    assert names == ["tokens"]
    assert set(meta) == {"format", "version", "head_fingerprint", "grid", "embed_dim", "dtype",
                         "count"}
    raw = path.read_bytes()
    assert key._secret.hex().encode() not in raw and key._secret not in raw
    assert meta["count"] == "20" and meta["dtype"] == "float16"


def test_encode_needs_key_and_images():
    with pytest.raises(ValueError, match="key"):
        Client(MODEL, None).encode(torch.randn(2, 1, 16, 16), "x.safetensors")
    with pytest.raises(TypeError, match="PermutationKey"):
        Client(MODEL, "secret")
    with pytest.raises(ValueError, match="empty"):
        Client(MODEL, PermutationKey.generate()).encode(torch.randn(0, 1, 16, 16), "x")


def _rewrite(path, tokens, **meta_changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
    meta.update(meta_changes)
    save_file({"tokens": tokens}, str(path), metadata=meta)


def test_server_rejects_bad_shards_naming_the_file(tmp_path, shard):
    path, _ = shard
    server = _server()
    other = Client(MODEL.replace(head_seed=7), PermutationKey.generate()).encode(
        torch.randn(4, 1, 16, 16), tmp_path / "other.safetensors")
    with pytest.raises(ShardError, match=f"{other}.*different head"):
        server.load_shards([path, other])
    tokens = load_file(str(path))["tokens"]
    cases = {
        "nan": (tokens.clone().index_fill_(0, torch.tensor([3]), float("nan")), {}, "non-finite"),
        "f32": (tokens.float(), {}, "float16"),
        "shape": (tokens[:, :9].contiguous(), {}, "shape"),
        "count": (tokens, {"count": "3"}, "shape"),
        "format": (tokens, {"format": "zip"}, "not a smsd token shard"),
    }
    for name, (bad_tokens, meta, message) in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(path.read_bytes())
        _rewrite(bad, bad_tokens, **meta)
        with pytest.raises(ShardError, match=message) as info:
            server.load_shards([path, bad])
        assert str(bad) in str(info.value), name
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(path.read_bytes()[:5])
    with pytest.raises(ShardError, match=f"{truncated}.*truncated"):
        server.load_shards([truncated])
    with pytest.raises(ShardError, match="does not exist"):
        server.load_shards([tmp_path / "missing.safetensors"])


def test_pretrain_is_deterministic_and_logs(tmp_path, shard):
    path, _ = shard
    a = _server().pretrain([path], work_dir=tmp_path / "a", out=tmp_path / "a.st",
                                       progress=False)
    b = _server().pretrain([path], progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["momentum"] > TRAIN.momentum_teacher
    body, config, fingerprint = load_body(tmp_path / "a.st", MODEL)
    assert config == MODEL and fingerprint == Client(MODEL, None).fingerprint
    torch.testing.assert_close(body.state_dict()["norm.weight"], a.state_dict()["norm.weight"])
    # the trained body differs from its init
    init = ViTBody(MODEL)
    assert not torch.equal(init.blocks[0].attn.qkv.weight, a.blocks[0].attn.qkv.weight)


def test_resume_continues_exactly(tmp_path, shard):
    path, _ = shard
    full = _server().pretrain([path], progress=False)
    _server().pretrain([path], work_dir=tmp_path, stop_after=1, progress=False)
    resumed = _server().pretrain([path], work_dir=tmp_path, resume=True,
                                            progress=False)
    for (name, pa), pb in zip(full.state_dict().items(), resumed.state_dict().values(),
                              strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    other = PretrainConfig(**{**TRAIN.__dict__, "lr": 1e-2})
    with pytest.raises(PretrainError, match="another training config"):
        _server(other).pretrain([path], work_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(PretrainError, match=r"no checkpoint \(checkpoint-\*\.safetensors\)"):
        _server().pretrain([path], work_dir=tmp_path / "new", resume=True)


def test_pretrain_config_validation():
    with pytest.raises(ValueError, match="global_keep"):
        PretrainConfig(global_keep=(0.5,))
    with pytest.raises(ValueError, match="local_keep"):
        PretrainConfig(local_keep=(0.0,))
    with pytest.raises(ValueError, match="epochs"):
        PretrainConfig(epochs=0)


def test_body_file_errors(tmp_path):
    body = ViTBody(MODEL)
    path = save_body(tmp_path / "b.safetensors", body, head_fingerprint="ab" * 32)
    with pytest.raises(BodyFileError, match="another model config"):
        load_body(path, MODEL.replace(depth=2))
    with pytest.raises(BodyFileError, match="does not exist"):
        load_body(tmp_path / "missing")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    with pytest.raises(BodyFileError, match=str(junk)):
        load_body(junk)


def test_finetune_learns_separable_classes():
    torch.manual_seed(0)
    labels = torch.arange(2).repeat(16)
    images = torch.randn(32, 1, 16, 16) * 0.1 + (labels.float() * 2 - 1)[:, None, None, None]
    client = Client(MODEL, None)
    metrics = client.finetune(ViTBody(MODEL), images, labels, num_classes=2,
                              config=FinetuneConfig(epochs=15, batch_size=8),
                              test_images=images, test_labels=labels)
    assert metrics["train_accuracy"] == 1.0 and metrics["test_accuracy"] == 1.0
    frozen = Client(MODEL, None)
    body = ViTBody(MODEL)
    before = body.state_dict()["blocks.0.attn.qkv.weight"].clone()
    frozen.finetune(body, images, labels, num_classes=2,
                    config=FinetuneConfig(epochs=1, freeze_body=True))
    torch.testing.assert_close(frozen.model.body.state_dict()["blocks.0.attn.qkv.weight"], before)
    with pytest.raises(ValueError, match="labels must lie"):
        client.finetune(body, images, labels + 5, num_classes=2)


def test_cosine_schedule():
    values = cosine_schedule(1.0, 0.0, epochs=4, steps_per_epoch=5, warmup_epochs=1)
    assert len(values) == 20 and values[0] == 0.0 and values[5] == pytest.approx(1.0)
    assert values[-1] < 0.05 and all(a >= b for a, b in itertools.pairwise(values[5:]))


def test_koleo_loss_rewards_spread_features():
    from smsd.protocol.server import koleo_loss

    torch.manual_seed(0)
    spread = torch.randn(16, 8)
    close = torch.randn(1, 8) + 0.01 * torch.randn(16, 8)
    assert koleo_loss(spread) < koleo_loss(close)
    x = torch.nn.functional.normalize(torch.randn(5, 3, dtype=torch.float64), dim=-1)
    dist = torch.cdist(x, x) + torch.eye(5, dtype=torch.float64) * 10
    expected = -torch.log(dist.min(dim=1).values).mean()
    torch.testing.assert_close(koleo_loss(x).double(), expected, rtol=1e-5, atol=1e-6)


def test_pretrain_with_koleo_trains(shard):
    path, _ = shard
    cfg = PretrainConfig(**{**TRAIN.__dict__, "koleo_weight": 0.1})
    server = _server(cfg)
    server.pretrain([path], progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in server.history)
    with pytest.raises(ValueError, match="koleo_weight"):
        PretrainConfig(koleo_weight=-1.0)


def test_body_lr_scale():
    torch.manual_seed(0)
    labels = torch.arange(2).repeat(8)
    images = torch.randn(16, 1, 16, 16)
    body = ViTBody(MODEL)
    before = body.state_dict()["blocks.0.attn.qkv.weight"].clone()
    moved = {}
    for scale in (1.0, 1e-3):
        client = Client(MODEL, None)
        client.finetune(body, images, labels, num_classes=2,
                        config=FinetuneConfig(epochs=2, batch_size=8, body_lr_scale=scale))
        after = client.model.body.state_dict()["blocks.0.attn.qkv.weight"]
        moved[scale] = (after - before).abs().max().item()
    assert 0 < moved[1e-3] < moved[1.0] / 10
    with pytest.raises(ValueError, match="body_lr_scale"):
        FinetuneConfig(body_lr_scale=0.0)


def test_token_keep_trains_on_random_token_subsets_and_evaluates_on_all():
    """Every training step shows each image as a fresh subset of round(keep * N) distinct
    tokens of its own; classify sees every token."""
    from smsd.protocol.training import TokenClassifier, classify, train_classifier

    n, n_tokens, dim = 12, 10, MODEL.embed_dim
    # token j of image i holds the value 100 * i + j in every channel
    tokens = (100 * torch.arange(n).view(n, 1, 1) + torch.arange(n_tokens).view(1, -1, 1)
              ).float().expand(n, n_tokens, dim).contiguous()
    labels = torch.arange(n) % 2
    model = TokenClassifier.from_body(ViTBody(MODEL), 2, seed=0)
    seen = []
    model.body.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    train_classifier(model, tokens, labels,
                     FinetuneConfig(epochs=2, batch_size=5, token_keep=0.35, seed=1))
    assert len(seen) == 2 * 3  # 3 batches (5, 5, 2) per epoch
    draws = []
    for batch in seen:
        assert batch.shape[1:] == (4, dim)  # round(0.35 * 10) tokens
        values = batch[:, :, 0].long()
        image = values // 100
        assert (image == image[:, :1]).all()  # every token from the image it belongs to
        assert all(len(set(row.tolist())) == 4 for row in values)  # distinct tokens
        draws.extend(sorted((v % 100).tolist()) for v in values)
    assert len({tuple(d) for d in draws}) > 1  # random subsets, not a fixed one
    seen.clear()
    classify(model, tokens)
    assert seen[0].shape[1] == n_tokens
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="token_keep"):
            FinetuneConfig(token_keep=bad)


def test_simulate_fine_tunes_the_pretrained_body_at_its_own_body_lr(monkeypatch, tmp_path):
    """Without the selection (tests/test_recipe_selection.py) SMSD's clients use
    ``smsd_body_lr_scale`` and the baselines train at the full LR."""
    from dataclasses import replace

    from smsd.experiments import SimulateConfig, methods, simulate
    from smsd.recipe import Recipe

    seen = {}
    original_finetune = Client.finetune
    original_train = methods.train_classifier

    def spy_finetune(self, *args, config, **kwargs):
        seen.setdefault("SMSD", set()).add(config.body_lr_scale)
        return original_finetune(self, *args, config=config, **kwargs)

    def spy_train(model, tokens, labels, config):
        seen.setdefault("baselines", set()).add(config.body_lr_scale)
        return original_train(model, tokens, labels, config)

    monkeypatch.setattr(Client, "finetune", spy_finetune)
    monkeypatch.setattr(methods, "train_classifier", spy_train)
    cfg = SimulateConfig(select=False).quick()
    cfg = replace(cfg, recipe=replace(cfg.recipe, smsd_body_lr_scale=0.25))
    simulate(cfg, None, progress=False, log=lambda _: None)
    assert seen == {"SMSD": {0.25}, "baselines": {1.0}}
    with pytest.raises(ValueError, match="smsd_body_lr_scale"):
        Recipe(smsd_body_lr_scale=0.0)
