"""The prior-aware and the blind attacks, the colluding client, the references, ε and the
quick audit's expectations: each succeeds where it must and is scored as it claims."""

from __future__ import annotations

import math

import pytest
import torch

from smsd.audit import AuditPlan, Defence, Knowledge, estimate_head, run_audit, simulate_upload
from smsd.audit.blind import blind
from smsd.audit.budget import gaussian_epsilon, noise_budget
from smsd.audit.expectations import Expectation, failed_expectations
from smsd.audit.knowledge import images_to_patches, patches_to_images, place
from smsd.audit.metrics import position_accuracy, psnr, ssim
from smsd.audit.prior import prior_mmse
from smsd.audit.references import class_mean_image, mean_image, random_order
from smsd.data import load_digits
from smsd.models import PatchHead, model_config

CONFIG = model_config("demo")


@pytest.fixture(scope="module")
def digits():
    """Attacked (even) and public (odd) demo digits, 200 of each, with their labels."""
    x, y = load_digits(CONFIG.img_size)
    return x[0:400:2], y[0:400:2], x[1:400:2], y[1:400:2]


def _upload(images, head, noise_std=0.0):
    return simulate_upload(images, head, noise_std, torch.Generator().manual_seed(0))


def _mean_psnr(attacked, public):
    return psnr(public.mean(0, keepdim=True).expand_as(attacked), attacked, 2.0)


def test_patches_round_trip_and_place():
    images = torch.randn(3, 2, 8, 8)
    config = CONFIG.replace(img_size=8, in_chans=2, patch_size=4)
    patches = images_to_patches(images, config)
    assert patches.shape == (3, 4, 32)
    torch.testing.assert_close(patches_to_images(patches, config), images, rtol=0, atol=0)
    # The head's convolution reads a patch in the same order.
    head = PatchHead(config.replace(embed_dim=16, num_heads=2)).eval()
    w = head.patch_embed.proj.weight.reshape(16, -1)
    with torch.no_grad():
        expected = head(images) - head.pos_embed - head.patch_embed.proj.bias
    torch.testing.assert_close(patches @ w.T, expected, rtol=1e-5, atol=1e-5)
    perm = torch.stack([torch.randperm(4) for _ in range(3)])
    shuffled = torch.gather(patches, 1, perm[..., None].expand_as(patches))
    torch.testing.assert_close(place(shuffled, perm), patches, rtol=0, atol=0)


@pytest.mark.parametrize("noise_std,positions,over_mean", [(0.0, 0.99, 40.0), (0.5, 0.6, 6.0)])
def test_prior_attack_beats_the_references(digits, noise_std, positions, over_mean):
    attacked, _, public, _ = digits
    head = PatchHead(CONFIG).eval()
    tokens, truth = _upload(attacked, head, noise_std)
    attempt = prior_mmse(tokens, Knowledge(CONFIG, head, public, noise_std=noise_std))
    assert position_accuracy(attempt.positions, truth) > positions
    assert psnr(attempt.images, attacked, 2.0) > _mean_psnr(attacked, public) + over_mean
    # Scored at a wrong (rolled) order the same patches fall to the references' level.
    wrong = place(images_to_patches(attempt.images.double(), CONFIG),
                  torch.roll(attempt.positions, 1, dims=1))
    rolled = patches_to_images(wrong, CONFIG).float()
    assert psnr(rolled, attacked, 2.0) < _mean_psnr(attacked, public) + 3


def test_prior_attack_needs_the_head(digits):
    with pytest.raises(ValueError, match="needs the head weights"):
        prior_mmse(torch.zeros(2, 64, 64), Knowledge(CONFIG, None, digits[2]))


def test_blind_attack_breaks_a_secret_head(digits):
    attacked, _, public, _ = digits
    secret = PatchHead(CONFIG.replace(head_seed=12345)).eval()
    tokens, truth = _upload(attacked, secret)
    attempt = blind(tokens, Knowledge(CONFIG, None, public), quick=True)
    assert position_accuracy(attempt.positions, truth) > 0.9
    assert psnr(attempt.images, attacked, 2.0) > _mean_psnr(attacked, public) + 3
    assert ssim(attempt.images, attacked, 2.0) > 0.4
    with pytest.raises(ValueError, match="at least 32 images"):
        blind(tokens[:10], Knowledge(CONFIG, None, public))


def test_a_colluding_client_gives_the_head_away(digits):
    attacked, _, public, _ = digits
    secret = PatchHead(CONFIG.replace(head_seed=777)).eval()
    with torch.no_grad():
        pairs = secret(public[:50])
    estimated = estimate_head(public[:50], pairs, CONFIG)
    with torch.no_grad():
        torch.testing.assert_close(estimated(attacked), secret(attacked), rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="tokens must have shape"):
        estimate_head(public[:5], pairs[:4], CONFIG)


def test_references(digits):
    attacked, labels, public, public_labels = digits
    knowledge = Knowledge(CONFIG, None, public, public_labels)
    mean = mean_image(len(attacked), knowledge).images
    torch.testing.assert_close(mean[3], public.mean(0))
    by_class = class_mean_image(labels, knowledge).images
    torch.testing.assert_close(by_class[0], public[public_labels == labels[0]].mean(0))
    assert psnr(by_class, attacked, 2.0) > psnr(mean, attacked, 2.0)
    shuffled = random_order(attacked, knowledge)
    assert sorted(shuffled.positions[0].tolist()) == list(range(64))
    assert psnr(shuffled.images, attacked, 2.0) < psnr(mean, attacked, 2.0)
    with pytest.raises(ValueError, match="public_labels"):
        class_mean_image(labels, Knowledge(CONFIG, None, public))


def test_epsilon_comes_from_the_accountant():
    # A Gaussian mechanism with noise multiplier 1 at δ = 1e-5: the tight (PLD) ε is 4.38;
    # the RDP accountant's bound lies a little above it.
    assert 4.38 < gaussian_epsilon(1.0) < 5.0
    assert gaussian_epsilon(2.0) < gaussian_epsilon(1.0) < gaussian_epsilon(0.5)
    assert math.isinf(gaussian_epsilon(0.0))
    head = PatchHead(CONFIG).eval()
    budget = noise_budget(head, 1.0)
    w = head.patch_embed.proj.weight.detach().double().reshape(64, -1)
    assert budget.patch_sensitivity == pytest.approx(torch.linalg.matrix_norm(w, 2).item() * 8)
    assert budget.image_sensitivity == pytest.approx(budget.patch_sensitivity * 8)
    assert budget.epsilon_per_image > budget.epsilon_per_patch > 0


def test_audit_suite_and_its_expectations(digits, tmp_path):
    attacked, labels, public, public_labels = (t[:60] for t in digits)
    plan = AuditPlan(defences=(Defence("permutation only"), Defence.noise(0.5)),
                     attacks=("pseudo-inverse", "prior + linear MMSE"), quick=True)
    report = run_audit(attacked, public, CONFIG, labels=labels, public_labels=public_labels,
                       plan=plan)
    rows = {(r.defence, r.attack): r for r in report.rows}
    assert rows[("permutation only", "pseudo-inverse")].positions_textured > 0.95
    assert rows[("reference", "class-mean image")].psnr_db > rows[("reference",
                                                                   "mean image")].psnr_db
    assert [v.at_chance for v in report.verdicts] == [False, False]
    assert set(report.budgets) == {"noise σ=0.5"}
    assert failed_expectations(report) == []
    # A bound the attack cannot reach fails, naming the row; a missing row fails too.
    strict = (Expectation("noise σ=0.5", "prior + linear MMSE", positions=1.01),
              Expectation("permutation only", "pseudo-inverse, best shift ≤ 2", positions=0.5))
    failures = failed_expectations(report, strict)
    assert len(failures) == 2 and "noise σ=0.5 / prior + linear MMSE" in failures[0]
    assert "row is missing" in failures[1]
    written = report.write(tmp_path)
    assert [p.name for p in written] == ["audit.json", "audit.md", "audit.png"]


def test_inverse_network_size_follows_the_plan():
    from smsd.audit.catalog import inverse_net_config
    from smsd.audit.inverse_net import InverseNetConfig

    assert inverse_net_config(AuditPlan(quick=True)) == InverseNetConfig.quick()
    assert inverse_net_config(AuditPlan()) == InverseNetConfig()
    large = inverse_net_config(AuditPlan(device="cuda"))
    assert large == InverseNetConfig.large() and large.width > InverseNetConfig().width


def test_the_figure_shows_what_the_best_row_scores(digits):
    attacked, _, public, _ = (t[:8] for t in digits)
    plan = AuditPlan(defences=(Defence("no position embedding", position_embedding=False),),
                     attacks=("jigsaw",), figure_images=8)
    report = run_audit(attacked, public, CONFIG, plan=plan)
    best = max((r for r in report.rows if not r.reference), key=lambda r: r.psnr_db)
    assert best.attack == "jigsaw, best shift ≤ 2"
    shown = report.figure_images[f"no position embedding\n{best.attack}"]
    assert psnr(shown, attacked, 2.0) == pytest.approx(best.psnr_db)
