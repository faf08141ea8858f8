import pytest
import torch

from generation.errors import InputError
from generation.moco import FeatureNetwork, MocoConfig
from generation.resnet import ResNetConfig
from retrieval.perceptual import (
    DOMAIN_NAME,
    BackendUnavailable,
    lpips_formula,
    lpips_unavailable_reason,
    perceptual_distance,
)


@pytest.fixture(scope="module")
def network() -> FeatureNetwork:
    torch.set_num_threads(1)
    config = MocoConfig(backbone=ResNetConfig(depth=18, width=8), dim=16, image_size=32, load_size=32)
    return FeatureNetwork.random(config, seed=0)


def test_identity_gives_zero(network):
    distance = perceptual_distance("domain", network=network)
    assert distance.name == DOMAIN_NAME
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    assert torch.equal(distance(images, images), torch.zeros(3))


def test_distance_grows_with_noise(network):
    distance = perceptual_distance("domain", network=network)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=generator) * 2 - 1
    noise = torch.randn(images.shape, generator=generator)
    values = [distance(images, (images + level * noise).clamp(-1, 1)).mean().item() for level in (0.05, 0.2, 0.8)]
    assert 0 < values[0] < values[1] < values[2]


def test_differentiable_and_finite_gradient(network):
    distance = perceptual_distance("domain", network=network)
    target = torch.rand(2, 3, 48, 48) * 2 - 1  # resized inside to C's 32 px
    fake = torch.full((2, 3, 48, 48), 0.3, requires_grad=True)  # flat image: many all-zero ReLU features
    distance(fake, target).sum().backward()
    assert fake.grad is not None and torch.isfinite(fake.grad).all() and fake.grad.abs().sum() > 0
    black = torch.zeros(1, 3, 32, 32, requires_grad=True)  # every feature exactly zero
    distance(black, target[:1, :, :32, :32]).sum().backward()
    assert torch.isfinite(black.grad).all()
    assert all(p.grad is None for p in network.parameters())


def test_formula_matches_hand_computation():
    a = [torch.tensor([[[[3.0]], [[4.0]]]])]  # one layer, 2 channels, 1x1: unit vector (0.6, 0.8)
    b = [torch.tensor([[[[0.0]], [[2.0]]]])]  # unit vector (0, 1)
    expected = 0.6**2 + 0.2**2
    assert lpips_formula(a, b).item() == pytest.approx(expected, rel=1e-6)


def test_domain_needs_c():
    with pytest.raises(InputError):
        perceptual_distance("domain")
    with pytest.raises(InputError):
        perceptual_distance("nonsense")


def test_lpips_backend_reports_unavailable_cleanly():
    reason = lpips_unavailable_reason("alex")
    if reason is None:
        pytest.skip("standard LPIPS is available on this machine")
    with pytest.raises(BackendUnavailable) as error:
        perceptual_distance("lpips")
    message = str(error.value)
    assert "\n" not in message and ("lpips" in message.lower() or "trunk" in message)
    assert "unknown" in lpips_unavailable_reason("resnet")
