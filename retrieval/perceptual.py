"""Perceptual distance between images, with two backends.

`domain` (default) -- "LPIPS-C (domain)": the LPIPS formula evaluated on the feature maps of the
project's own feature network C (MoCo on the archive): per layer, unit-normalise every feature
vector over channels, take the squared difference, sum over channels (unit weights: there are no
learned linear heads here), average over space, and sum over layers. It is a perceptual distance for
this image domain, NOT the standard LPIPS number; report it under its own name.

`lpips` -- the standard LPIPS (`lpips` package). Its learned heads ship with the package, but the
ImageNet trunk comes from torchvision's weight download. We never download: the backend is
available only if `lpips` and `torchvision` import and the trunk weights are already in the torch
hub cache; otherwise constructing it raises `BackendUnavailable` saying what is missing.

Inputs: float images (N, 3, H, W) in [-1, 1] (both backends' convention). Output: (N,) distances.
Both backends are differentiable with respect to the images (used as a training loss).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from generation.errors import InputError
from generation.moco import FeatureNetwork
from generation.registry import load_network

DOMAIN_NAME = "LPIPS-C (domain)"
BACKENDS = ("domain", "lpips")
# torchvision's file names for the ImageNet trunks the lpips package builds on.
LPIPS_TRUNK_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


class BackendUnavailable(InputError):
    """The requested perceptual backend cannot run on this machine (message says why)."""


def channel_normalize(features: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit L2 norm over channels at every position. eps inside the root keeps the gradient
    finite where a feature vector is exactly zero (all-ReLU-off positions)."""
    return features * torch.rsqrt(features.pow(2).sum(dim=1, keepdim=True) + eps)


def lpips_formula(features_a: list[Tensor], features_b: list[Tensor]) -> Tensor:
    """Unit-weight LPIPS over a list of layers: sum_l mean_hw sum_c (n(a_l) - n(b_l))^2 -> (N,)."""
    assert len(features_a) == len(features_b) and features_a, "need the same non-empty list of layers"
    total = None
    for a, b in zip(features_a, features_b):
        assert a.shape == b.shape, f"layer shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
        layer = (channel_normalize(a) - channel_normalize(b)).pow(2).sum(dim=1).mean(dim=(1, 2))
        total = layer if total is None else total + layer
    return total  # type: ignore[return-value]


class DomainPerceptualDistance(nn.Module):
    """LPIPS-C (domain): the LPIPS formula on C's [stem, C2, C3, C4, C5] feature maps."""

    name = DOMAIN_NAME

    def __init__(self, network: FeatureNetwork, layers: tuple[int, ...] | None = None):
        super().__init__()
        self.network = network
        self.layers = layers  # indices into [stem, C2, C3, C4, C5]; None = all five

    def _features(self, images: Tensor) -> list[Tensor]:
        features = self.network.features(images)
        return features if self.layers is None else [features[i] for i in self.layers]

    def forward(self, images_a: Tensor, images_b: Tensor) -> Tensor:
        assert images_a.shape == images_b.shape, f"image shapes differ: {tuple(images_a.shape)} vs {tuple(images_b.shape)}"
        # One pass over both sets: half the Python overhead, and BN is frozen so batching is exact.
        features = self._features(torch.cat([images_a, images_b], dim=0))
        count = images_a.shape[0]
        return lpips_formula([f[:count] for f in features], [f[count:] for f in features])


def lpips_unavailable_reason(net: str = "alex") -> str | None:
    """None if the standard LPIPS backend can be built offline, else a one-line reason."""
    if net not in LPIPS_TRUNK_FILES:
        return f"unknown LPIPS trunk {net!r}; use one of {sorted(LPIPS_TRUNK_FILES)}"
    try:
        import lpips  # noqa: F401
    except Exception as error:  # ImportError, or torchvision failing inside it
        return f"the `lpips` package does not import ({type(error).__name__}: {error}); use --perceptual domain"
    try:
        import torchvision  # noqa: F401
    except Exception as error:
        return f"torchvision does not import ({type(error).__name__}); standard LPIPS needs it; use --perceptual domain"
    trunk = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_TRUNK_FILES[net]
    if not trunk.is_file():
        return (
            f"standard LPIPS needs the ImageNet {net} trunk at {trunk}, which is not there and is never "
            "downloaded here; copy it there or use --perceptual domain (LPIPS-C)"
        )
    return None


class StandardLpips(nn.Module):
    """The published LPIPS (linear heads on an ImageNet trunk), frozen."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        reason = lpips_unavailable_reason(net)
        if reason is not None:
            raise BackendUnavailable(reason)
        import lpips

        self.name = f"LPIPS ({net})"
        self.model = lpips.LPIPS(net=net, pretrained=True, verbose=False).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def forward(self, images_a: Tensor, images_b: Tensor) -> Tensor:
        return self.model(images_a, images_b, normalize=False).flatten()


def perceptual_distance(
    backend: str = "domain",
    network: FeatureNetwork | None = None,
    bundle: str | Path | None = None,
    device: torch.device | str = "cpu",
    lpips_net: str = "alex",
) -> nn.Module:
    """Build a perceptual distance module (`.name` says which metric it is).

    `domain` needs C: pass `network`, or the `bundle` holding moco.safetensors/.json.
    """
    if backend == "domain":
        if network is None:
            if bundle is None:
                raise InputError("the domain perceptual distance needs C: pass a bundle with moco.safetensors")
            network = load_network("moco", bundle, device)
        return DomainPerceptualDistance(network)
    if backend == "lpips":
        return StandardLpips(lpips_net).to(device)
    raise InputError(f"unknown perceptual backend {backend!r}; use one of {', '.join(BACKENDS)}")
