"""The privacy audit: the attacks recover an unprotected shard, noise lowers what they
recover, the metrics match closed forms, and the CLI reports and rejects bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from smsd.audit import (
    AuditPlan,
    Knowledge,
    audit_shard,
    position_accuracy,
    psnr,
    reconstruct,
    ssim,
    unshuffle_known_head,
    unshuffle_known_positions,
)
from smsd.audit.references import random_order
from smsd.cli import main
from smsd.crypto import PermutationKey
from smsd.data import load_digits
from smsd.models import PatchHead, ViTConfig, model_config
from smsd.protocol import Client, read_shard

N_IMAGES = 12
CHANCE = 1 / 64  # 64 tokens per image in the demo model


def _rows(tmp_path, noise_std=0.0, client_config=None):
    """The known-head attacks' rows on the demo model's shard of a few digits, and a
    random order's (the originals' patches shuffled)."""
    config = model_config("demo")
    images = load_digits(config.img_size)[0][:N_IMAGES]
    key = PermutationKey.generate()
    client = Client(client_config or config, key, noise_std=noise_std, noise_seed=1)
    shard = client.encode(images, tmp_path / "shard.safetensors")
    plan = AuditPlan(attacks=("pseudo-inverse", "nearest position"))
    report = audit_shard(shard, PatchHead(config), key=key, images=images,
                         noise_std=noise_std, plan=plan)
    rows = {r.attack: r for r in report.rows}
    shuffled = random_order(images, Knowledge(config, None, images)).images
    rows["random order"] = SimpleNamespace(positions_correct=0.0,
                                           psnr_db=psnr(shuffled, images, 2.0),
                                           ssim=ssim(shuffled, images, 2.0))
    return rows


def test_unprotected_shard_is_unshuffled_and_reconstructed(tmp_path):
    rows = _rows(tmp_path)
    chance, known = rows["random order"], rows["pseudo-inverse"]
    assert known.positions_correct > 0.95 > 20 * CHANCE
    assert rows["nearest position"].positions_correct > 0.9
    # fp16 shards leave ~1e-3 error: tens of dB above a random order's reconstruction.
    assert known.psnr_db > chance.psnr_db + 30
    assert known.ssim > 0.95 > chance.ssim + 0.5


def test_noise_lowers_what_the_attacks_recover(tmp_path):
    clean = _rows(tmp_path)
    noisy = _rows(tmp_path, noise_std=1.0)
    for attack in ("pseudo-inverse", "nearest position"):
        assert noisy[attack].positions_correct < 0.5 * clean[attack].positions_correct
    assert noisy["pseudo-inverse"].psnr_db < clean["pseudo-inverse"].psnr_db - 30
    assert noisy["pseudo-inverse"].ssim < 0.3


def test_secret_head_seed_hides_pixels_not_positions(tmp_path):
    config = model_config("demo")
    rows = _rows(tmp_path, client_config=config.replace(head_seed=12345))
    assert rows["nearest position"].positions_correct > 0.9  # the sin-cos table is public
    assert rows["pseudo-inverse"].psnr_db < rows["random order"].psnr_db + 5


@pytest.mark.parametrize("in_chans,img_size,patch,dim", [(2, 12, 4, 48), (1, 10, 5, 36)])
def test_exact_tokens_are_put_back_and_inverted_exactly(in_chans, img_size, patch, dim):
    # Odd grids (3×3, 2×2), 2 channels; patch values (32, 25) < embed_dim: exact recovery.
    config = ViTConfig(img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=dim,
                       depth=1, num_heads=4)
    head = PatchHead(config).eval()
    images = torch.rand(5, in_chans, img_size, img_size) * 2 - 1
    with torch.no_grad():
        tokens = head(images)
    perm = torch.stack([torch.randperm(config.n_tokens) for _ in range(5)])
    shuffled = torch.gather(tokens, 1, perm[..., None].expand_as(tokens))
    guess = unshuffle_known_head(shuffled.transpose(0, 1).contiguous().transpose(0, 1), head)
    assert position_accuracy(guess, perm) == 1.0
    torch.testing.assert_close(reconstruct(shuffled, guess, head), images, atol=1e-4, rtol=0)


def test_patch_wider_than_embedding_uses_the_pixel_prior():
    # 48 patch values > embed_dim 16: nothing lies outside W's span; the attack still runs.
    config = model_config("demo", img_size=16, in_chans=3).replace(embed_dim=16, num_heads=2)
    head = PatchHead(config).eval()
    with torch.no_grad():
        tokens = head(torch.rand(3, 3, 16, 16) * 2 - 1)
    guess = unshuffle_known_head(tokens, head)
    assert sorted(guess[0].tolist()) == list(range(config.n_tokens))  # a permutation
    pos = head.pos_embed.detach()[0]
    assert unshuffle_known_positions(tokens, pos, 48, refine_steps=2).shape == (3, 16)


def test_metrics_match_closed_forms():
    x = torch.rand(3, 2, 16, 16) * 2 - 1
    assert psnr(x, x + 0.1, data_range=2.0) == pytest.approx(10 * np.log10(4 / 0.01), abs=1e-6)
    assert psnr(x, x, data_range=2.0) == pytest.approx(100.0)
    assert ssim(x, x, data_range=2.0) == pytest.approx(1.0)
    # Constant images (values exact in fp32): only SSIM's luminance term is left.
    a, b = torch.full((1, 1, 12, 12), 0.25), torch.full((1, 1, 12, 12), -0.125)
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * 0.25 * -0.125 + c1) / (0.25**2 + 0.125**2 + c1)
    assert ssim(a, b, data_range=2.0) == pytest.approx(expected, abs=1e-9)
    # An 11×11 image is one window: SSIM from Gaussian-weighted moments, written out.
    u, v = np.random.default_rng(0).uniform(-1, 1, (2, 11, 11))
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mu, mv = (w * u).sum(), (w * v).sum()
    vu, vv, cuv = (w * u * u).sum() - mu**2, (w * v * v).sum() - mv**2, (w * u * v).sum() - mu * mv
    c2 = (0.03 * 2.0) ** 2
    expected = ((2 * mu * mv + c1) * (2 * cuv + c2)) / ((mu**2 + mv**2 + c1) * (vu + vv + c2))
    assert ssim(torch.from_numpy(u)[None, None], torch.from_numpy(v)[None, None],
                data_range=2.0) == pytest.approx(expected, abs=1e-12)
    assert position_accuracy(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 2, 1]])) == \
        pytest.approx(1 / 3)


def test_bad_inputs_raise_clear_errors():
    config = model_config("demo", img_size=8, in_chans=1, patch_size=4, embed_dim=16,
                          num_heads=2)
    head = PatchHead(config)
    tokens = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match=r"tokens must have shape \[n, 4, 16\]"):
        unshuffle_known_head(torch.randn(2, 5, 16), head)
    with pytest.raises(TypeError, match="tokens must be a floating-point"):
        unshuffle_known_head(tokens.long(), head)
    with pytest.raises(ValueError, match="pixel_range"):
        unshuffle_known_head(tokens, head, pixel_range=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 4\)"):
        reconstruct(tokens, torch.full((2, 4), 4), head)
    with pytest.raises(ValueError, match="refine_steps"):
        unshuffle_known_positions(tokens, head.pos_embed[0], 16, refine_steps=-1)
    with pytest.raises(ValueError, match="data_range"):
        psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), data_range=0)
    with pytest.raises(ValueError, match="noise_std"):
        Client(config, None, noise_std=-1.0)


def test_noise_without_a_seed_is_fresh(tmp_path):
    config = model_config("demo", img_size=8, in_chans=1, patch_size=4, embed_dim=16,
                          num_heads=2)
    key, images = PermutationKey.generate(), torch.rand(2, 1, 8, 8)
    shards = [read_shard(Client(config, key, noise_std=0.1).encode(images, tmp_path / f"{i}"))
              for i in range(2)]
    assert not torch.equal(shards[0], shards[1])


# ---------------------------------------------------------------- CLI
MODEL_ARGS = ["--img-size", "16", "--patch-size", "4", "--in-chans", "1"]


def test_cli_audits_its_own_encoding_as_json(tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(["audit", "--images", "digits", "--limit", "40", "--json", "--defences",
                 "permutation", "noise", "--noise-std", "0.1", "--attacks", "pseudo-inverse",
                 "prior + linear MMSE", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 40 and report["public_images"] == 40
    rows = {(r["defence"], r["attack"]): r for r in report["rows"]}
    assert {"random order", "mean image", "class-mean image"} <= {a for _, a in rows}
    known = rows[("permutation only", "pseudo-inverse")]
    assert known["positions_textured"] > 0.95 and known["psnr_db"] > 40
    assert rows[("noise σ=0.1", "prior + linear MMSE")]["psnr_db"] > 20
    assert report["budgets"]["noise σ=0.1"]["epsilon_per_patch"] > 0
    assert all(not v["at_chance"] for v in report["verdicts"])
    assert json.loads((out / "audit.json").read_text())["rows"] == report["rows"]
    assert "| permutation only | pseudo-inverse |" in (out / "audit.md").read_text()
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_audits_a_shard_with_key_and_npz_images(tmp_path, capsys):
    config = model_config("demo", img_size=16, in_chans=1)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    key_file, shard, npz = tmp_path / "c.key", tmp_path / "s.safetensors", tmp_path / "x.npz"
    key = PermutationKey.generate()
    key.save(key_file)
    Client(config, key).encode(images, shard, image_ids=["a", "b", "c", "d"])
    np.savez(npz, images=images.numpy(), ids=np.array(["a", "b", "c", "d"]))
    assert main(["audit", "--shard", str(shard), "--key", str(key_file), "--images", str(npz),
                 "--attacks", "pseudo-inverse", "nearest position", *MODEL_ARGS]) == 0
    out = capsys.readouterr().out
    assert "is the head the server has" in out
    assert "| this shard | pseudo-inverse | config + head | 100.0 |" in out
    # Without ground truth the attacks still run; the table says what is unknown.
    assert main(["audit", "--shard", str(shard), *MODEL_ARGS, "--head-seed", "4",
                 "--attacks", "pseudo-inverse"]) == 0
    out = capsys.readouterr().out
    assert "NOT the server's head" in out and "no --key" in out


@pytest.mark.parametrize("extra,message", [
    ([], "give --images"),
    (["--images", "digits", "--key", "k.key"], "--key is the ground truth of --shard"),
    (["--images", "digits", "--head", "h.pt"], "--head is the head the server believes in"),
    (["--images", "digits", "--limit", "0"], "--limit must be >= 1"),
    (["--images", "digits", "--noise-std", "-1"], "--noise-std must be"),
    (["--shard", "s", "--noise-std", "0.1", "0.2"], "give one --noise-std"),
    (["--images", "nowhere"], "--images must be 'digits'"),
    (["--shard", "missing.safetensors"], "does not exist"),
    (["--shard", "s.safetensors", "--head", "missing.pt"], "checkpoint missing.pt does not exist"),
    (["--images", "digits", "--pixel-range", "1", "0"], "--pixel-range must be LOW < HIGH"),
])
def test_cli_rejects_bad_arguments(extra, message, capsys):
    assert main(["audit", *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_mismatched_images(tmp_path, capsys):
    config = model_config("demo", img_size=16, in_chans=1)
    shard, npz = tmp_path / "s.safetensors", tmp_path / "x.npz"
    Client(config, PermutationKey.generate()).encode(torch.rand(3, 1, 16, 16), shard)
    np.savez(npz, images=np.zeros((2, 1, 16, 16), np.float32))
    assert main(["audit", "--shard", str(shard), "--images", str(npz), *MODEL_ARGS]) == 2
    assert "--images has 2 images, the shard 3" in capsys.readouterr().err
    np.savez(npz, pixels=np.zeros((3, 1, 16, 16), np.float32))
    assert main(["audit", "--shard", str(shard), "--images", str(npz), *MODEL_ARGS]) == 2
    assert "has no 'images' array" in capsys.readouterr().err
    np.savez(npz, images=np.zeros((3, 1, 8, 8), np.float32))
    assert main(["audit", "--shard", str(shard), "--images", str(npz), *MODEL_ARGS]) == 2
    assert "must be a float array [n, 1, 16, 16]" in capsys.readouterr().err
    np.savez(npz, images=np.zeros((3, 1, 16, 16), np.float32), labels=np.zeros(2, np.int64))
    assert main(["audit", "--shard", str(shard), "--images", str(npz), *MODEL_ARGS]) == 2
    assert "'labels' must be integers [3]" in capsys.readouterr().err


def test_simulate_quick_with_a_defence(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["simulate", "--quick", "--no-progress", "--noise-std", "0.5", "--methods",
                 "smsd", "--head-seed", "3", "--pos-embed-scale", "0", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    recipe = result["config"]["recipe"]
    assert recipe["noise_std"] == 0.5
    assert recipe["model"]["head_seed"] == 3 and recipe["model"]["pos_embed_scale"] == 0
    assert [r["method"] for r in result["results"]] == ["SMSD"]
    with pytest.raises(SystemExit) as refused:  # the parser refuses it, naming the flag
        main(["simulate", "--quick", "--pos-embed-scale", "-1"])
    assert refused.value.code == 2
    assert "argument --pos-embed-scale: must be a number >= 0" in capsys.readouterr().err


def test_simulate_config_rejects_unknown_methods():
    from smsd.experiments import SimulateConfig

    with pytest.raises(ValueError, match="methods must be distinct names among smsd"):
        SimulateConfig(methods=("smsd", "fedprox"))
