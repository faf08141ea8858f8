"""The W-space inversion behind the ceiling (`training.invert`)."""

import pytest
import torch

from generation.errors import InputError
from generation.moco import FeatureNetwork
from generation.registry import network_config
from generation.stylegan2 import Generator
from training.invert import invert


def tiny_parts() -> tuple[Generator, FeatureNetwork]:
    torch.manual_seed(0)
    G = Generator(network_config("generator", "tiny")).eval().requires_grad_(False)
    with torch.no_grad():
        G.mapping.w_avg.copy_(G.mapping(torch.randn(2000, G.config.z_dim)).mean(0))
    return G, FeatureNetwork.random(network_config("moco", "tiny"))


@pytest.mark.parametrize("space", ["w", "w+"])
def test_inversion_recovers_images_that_G_made(space):
    G, C = tiny_parts()
    torch.manual_seed(0)  # G's noise inputs: the run must not depend on what ran before it
    with torch.no_grad():
        w0 = G.mapping(torch.randn(4, G.config.z_dim, generator=torch.Generator().manual_seed(1)))
        targets = G(w0)
        start_error = (G(G.w_avg.expand(4, -1)) - targets).square().mean()
    result = invert(G, C, targets, steps=300, space=space)
    error = (result.images - targets).square().mean()
    assert result.last_loss < 0.25 * result.first_loss
    assert error < 0.1 * start_error  # the reconstruction, not only the loss, approaches G(w0)
    assert result.ws.shape == ((4, G.config.w_dim) if space == "w" else (4, G.num_ws, G.config.w_dim))


def test_inversion_refuses_an_unknown_space():
    G, C = tiny_parts()
    with pytest.raises(InputError, match="unknown latent space 'z'; use one of w, w\\+"):
        invert(G, C, torch.zeros(1, 3, 32, 32), steps=1, space="z")
