"""The learned inverse network: trained on public digits it unshuffles and reconstructs an
undefended upload of other digits; it is deterministic and rejects malformed tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from smsd.audit.defences import simulate_upload
from smsd.audit.inverse_net import InverseNetConfig, inverse_net
from smsd.audit.knowledge import Knowledge, images_to_patches, patches_to_images, place
from smsd.audit.metrics import position_accuracy, psnr, ssim
from smsd.data import load_digits
from smsd.models import PatchHead, model_config

pytest.importorskip("scipy")
pytest.importorskip("sklearn")

RANGE = 2.0  # pixels in [-1, 1]


@pytest.fixture(scope="module")
def demo():
    """The demo config, its public seeded head, 600 public digits and 100 others uploaded
    without a defence (and their true positions)."""
    torch.set_num_threads(1)
    config = model_config("demo")
    images = load_digits(config.img_size)[0]
    public, attacked = images[:600], images[600:700]
    head = PatchHead(config).eval()
    tokens, truth = simulate_upload(attacked, head, 0.0, torch.Generator().manual_seed(1))
    return Knowledge(config, head, public), tokens, truth, attacked


def _random_order_psnr(images, config):
    """PSNR of the true patches put at random positions (what a wrong order gives)."""
    patches = images_to_patches(images, config)
    shuffled = torch.argsort(torch.rand(patches.shape[:2],
                                        generator=torch.Generator().manual_seed(2)), dim=1)
    return psnr(patches_to_images(place(patches, shuffled), config), images, RANGE)


def test_undefended_upload_is_unshuffled_and_reconstructed(demo):
    knowledge, tokens, truth, attacked = demo
    config = knowledge.config
    mean_image = knowledge.public_images.mean(0, keepdim=True).expand_as(attacked)
    mean_psnr = psnr(mean_image, attacked, RANGE)  # ~13 dB
    random_psnr = _random_order_psnr(attacked, config)  # ~9 dB

    attempt = inverse_net(tokens, knowledge, InverseNetConfig.quick())
    assert attempt.positions.dtype == torch.int64 and attempt.positions.shape == truth.shape
    assert attempt.images.dtype == torch.float32 and attempt.images.shape == attacked.shape
    assert attempt.images.min() >= -1 and attempt.images.max() <= 1
    # Measured (quick): 100% of positions, ~35 dB, SSIM ~0.98.
    assert position_accuracy(attempt.positions, truth) > 0.95
    got = psnr(attempt.images, attacked, RANGE)
    assert got > mean_psnr + 12 and got > random_psnr + 15
    assert ssim(attempt.images, attacked, RANGE) > 0.9

    # The thresholds tell a working attack from broken ones: its own patches placed at
    # shuffled positions, and a net trained for a single step.
    grid = images_to_patches(attempt.images, config)
    shuffled = torch.roll(grid, 1, dims=1)
    assert psnr(patches_to_images(shuffled, config), attacked, RANGE) < mean_psnr + 12
    untrained = inverse_net(tokens, knowledge,
                            dataclasses.replace(InverseNetConfig.quick(), steps=1))
    assert position_accuracy(untrained.positions, truth) < 0.5
    assert psnr(untrained.images, attacked, RANGE) < mean_psnr + 12


def test_same_seed_same_result(demo):
    knowledge, tokens, _, _ = demo
    tiny = Knowledge(knowledge.config, None, knowledge.public_images[:64])  # secret head
    net = InverseNetConfig(width=16, depth=1, heads=2, steps=4, batch=8, seed=3)
    first, again = inverse_net(tokens[:4], tiny, net), inverse_net(tokens[:4], tiny, net)
    assert torch.equal(first.positions, again.positions)
    assert torch.equal(first.images, again.images)
    other = inverse_net(tokens[:4], tiny, dataclasses.replace(net, seed=4))
    assert not torch.equal(first.images, other.images)


@pytest.mark.parametrize("shape", [(2, 63, 64), (2, 64, 32), (64, 64)])
def test_wrong_token_shape_is_rejected(demo, shape):
    knowledge = demo[0]
    with pytest.raises(ValueError, match=r"\[n, 64, 64\]"):
        inverse_net(torch.zeros(shape), knowledge, InverseNetConfig.quick())


def test_config_is_checked():
    with pytest.raises(ValueError, match="heads"):
        InverseNetConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="steps"):
        InverseNetConfig(steps=0)
