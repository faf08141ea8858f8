"""The paper's similarity loss L_sim, used for E (phase 1) and at every step of H (phase 2):

    L_sim(x, x_hat) = 1.0 L2(x, x_hat) + 0.8 P(x, x_hat) + 0.5 (1 - cos(C(x), C(x_hat)))

P is the perceptual distance: LPIPS-C (the LPIPS formula on C's features, `domain`, the default
since there are no ImageNet weights here) or the published LPIPS (`lpips`, when installed with its
trunk). C is the project's MoCo v2 network; its pooled, normalised trunk features give the cosine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generation.moco import FeatureNetwork
from retrieval.perceptual import lpips_formula, perceptual_distance


@dataclass(frozen=True)
class SimilarityWeights:
    l2: float = 1.0
    perceptual: float = 0.8
    cosine: float = 0.5


class SimilarityLoss(nn.Module):
    """L_sim between real and generated images (N, 3, H, W) in [-1, 1]; returns each term and the total."""

    def __init__(self, C: FeatureNetwork, weights: SimilarityWeights = SimilarityWeights(), perceptual: str = "domain"):
        super().__init__()
        self.C, self.weights, self.backend = C, weights, perceptual
        # With LPIPS-C one pass of C over an image set gives both its perceptual features and its
        # embedding (the pooled last feature map); the reals need no gradient.
        self.lpips = perceptual_distance("lpips") if perceptual == "lpips" else None

    @torch.no_grad()
    def reference(self, real: Tensor) -> list[Tensor]:
        """C's features of the real images: computed once per batch when several fakes are compared
        with the same reals (H's T steps)."""
        return self.C.features(real)

    def forward(self, real: Tensor, fake: Tensor, reference: list[Tensor] | None = None) -> dict[str, Tensor]:
        assert real.shape == fake.shape and real.shape[1] == 3, f"real {tuple(real.shape)} vs fake {tuple(fake.shape)}"
        real_features = reference if reference is not None else self.reference(real)
        fake_features = self.C.features(fake)
        embeddings = [F.normalize(features[-1].mean(dim=(2, 3)), dim=1) for features in (real_features, fake_features)]
        if self.lpips is None:
            perceptual = lpips_formula(real_features, fake_features).mean()
        else:
            perceptual = self.lpips(real, fake).mean()
        terms = {
            "l2": F.mse_loss(fake, real),
            "perceptual": perceptual,
            "cosine": (1 - (embeddings[0] * embeddings[1]).sum(dim=1)).mean(),
        }
        w = self.weights
        terms["total"] = w.l2 * terms["l2"] + w.perceptual * terms["perceptual"] + w.cosine * terms["cosine"]
        return terms


def info_nce_loss(anchors: Tensor, positives: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE over a batch: row i of `anchors` (N, D) should be nearest to row i of
    `positives` among all N rows (cosine similarity / temperature), and vice versa."""
    assert anchors.shape == positives.shape and anchors.ndim == 2, f"{tuple(anchors.shape)} vs {tuple(positives.shape)}"
    logits = F.normalize(anchors, dim=1) @ F.normalize(positives, dim=1).T / temperature
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def d_logistic_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """D's logistic loss: -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_nonsaturating_loss(fake_logits: Tensor) -> Tensor:
    """-log sigmoid(D(G(z))): strong gradients while D still rejects the fakes."""
    return F.softplus(-fake_logits).mean()


def d_r1_loss(real_logits: Tensor, reals: Tensor) -> Tensor:
    """R1: squared norm of D's gradient at the reals (penalises D for being steep on the data).

    Any real shape: images (N, 3, H, W) here, codes (N, w_dim) for the latent discriminator."""
    (grad,) = torch.autograd.grad(real_logits.sum(), reals, create_graph=True)
    return grad.square().flatten(1).sum(dim=1).mean()


def g_path_length_loss(fakes: Tensor, ws: Tensor, pl_mean: Tensor, decay: float = 0.01,
                       reduce_mean: Callable[[Tensor], Tensor] = lambda t: t) -> tuple[Tensor, Tensor]:
    """Path-length regularisation: a fixed-size step in W should change the image by a fixed amount.

    Returns (penalty, updated running mean of the path lengths). `reduce_mean` averages a scalar
    across ranks so that every rank uses the same target.
    """
    height, width = fakes.shape[2:]
    noise = torch.randn_like(fakes) / math.sqrt(height * width)  # image-size independent scale
    (grad,) = torch.autograd.grad((fakes * noise).sum(), ws, create_graph=True)
    lengths = grad.square().sum(dim=2).mean(dim=1).sqrt()  # (N,)
    pl_mean = pl_mean.lerp(reduce_mean(lengths.mean().detach()), decay)
    return (lengths - pl_mean).square().mean(), pl_mean
