"""Train the UNIT baseline (two VAE-GANs with a shared latent space) on unpaired sketches and images.

The official recipe (its unit_*.yaml configs): per step one update of both multi-scale
discriminators on LSGAN losses (real 1, translated 0, summed over scales), then one update of the
generator pair on
    gan_w * LSGAN(D(translated), 1)                      both directions
  + recon_x_w * L1(x_rec, x)                             each domain through its own VAE
  + recon_kl_w * mean(h^2)                               the KL term of each domain's code
  + recon_x_cyc_w * L1(x_cycled, x)                      each domain to the other and back
  + recon_kl_cyc_w * mean(h_cycled^2)                    the KL term of the translated images' codes
with gan_w 1, recon_x_w 10, recon_kl_w 0.01, recon_x_cyc_w 10, recon_kl_cyc_w 0.01; codes sampled
as z = h + N(0, I). Adam (lr 1e-4, betas (0.5, 0.999), weight decay 1e-4), the lr halved every
100,000 steps. The official code draws the discriminators' translations in a separate forward pass
with fresh noise; here the generators' one forward pass serves both updates (the generators do not
change in between; only the noise sample is shared), which saves a third of the compute.

Data, randomness, resume, torchrun and the files written: `training.unpaired`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from generation.errors import InputError
from generation.unit import MultiScaleDiscriminator, UNITConfig, UNITGenerator
from training.loop import TrainResult
from training.unpaired import UnpairedOptions, UnpairedTrainer, l1_loss, lsgan_loss, train_unpaired

CHECKPOINT = "unit_checkpoint"
METRICS = "unit_metrics.jsonl"


@dataclass
class UNITOptions(UnpairedOptions):
    steps: int = 1000  # the cpu preset's: ~25 min on one thread, ~38 with the machine busy (docs/BENCHMARKS.md)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    decay_every: int = 100_000  # the lr halves every this many steps (with lr_decay)
    lambda_gan: float = 1.0  # gan_w
    lambda_recon: float = 10.0  # recon_x_w
    lambda_kl: float = 0.01  # recon_kl_w
    lambda_cycle: float = 10.0  # recon_x_cyc_w
    lambda_kl_cycle: float = 0.01  # recon_kl_cyc_w

    def validate(self, world_size: int) -> None:
        super().validate(world_size)
        if self.decay_every < 1:
            raise InputError(f"decay_every {self.decay_every}: must be positive")

    def lr_at(self, step: int) -> float:
        """The official step policy: halved every `decay_every` steps."""
        return self.lr * 0.5 ** (step // self.decay_every) if self.lr_decay else self.lr


def kl_term(h: Tensor) -> Tensor:
    """The official KL loss of a code with unit variance: mean(h^2)."""
    return (h**2).mean()


class UNITTrainer(UnpairedTrainer):
    name = "unit"
    config: UNITConfig
    options: UNITOptions

    def build(self) -> dict[str, nn.Module]:
        c = self.config
        return {"G": UNITGenerator(c), "D_sketch": MultiScaleDiscriminator(c), "D_image": MultiScaleDiscriminator(c)}

    @property
    def translator(self) -> nn.Module:
        return self.networks["G"]

    def sample(self, h: Tensor) -> Tensor:
        return h + torch.randn(h.shape, device=h.device, generator=self.rng)

    def update(self, sketches: Tensor, images: Tensor) -> dict[str, float]:
        o, G = self.options, self.networks["G"]
        D_sketch, D_image = self.networks["D_sketch"], self.networks["D_image"]
        h_s, h_i = G.encode(sketches, "sketch"), G.encode(images, "image")
        z_s, z_i = self.sample(h_s), self.sample(h_i)
        to_image, to_sketch = G.decode(z_s, "image"), G.decode(z_i, "sketch")  # translations

        self.set_requires_grad("D", True)
        loss_d = o.lambda_gan * (lsgan_loss(D_image(to_image.detach()), False) + lsgan_loss(D_image(images), True)
                                 + lsgan_loss(D_sketch(to_sketch.detach()), False) + lsgan_loss(D_sketch(sketches), True))
        self.optimise("D_opt", loss_d)

        self.set_requires_grad("D", False)  # G's update must not touch D's gradients
        recon = l1_loss(G.decode(z_s, "sketch"), sketches) + l1_loss(G.decode(z_i, "image"), images)
        kl = kl_term(h_s) + kl_term(h_i)
        h_s_cycled, h_i_cycled = G.encode(to_image, "image"), G.encode(to_sketch, "sketch")
        cycle = l1_loss(G.decode(self.sample(h_s_cycled), "sketch"), sketches) + l1_loss(G.decode(self.sample(h_i_cycled), "image"), images)
        kl_cycle = kl_term(h_s_cycled) + kl_term(h_i_cycled)
        adversarial = lsgan_loss(D_image(to_image), True) + lsgan_loss(D_sketch(to_sketch), True)
        loss_g = (o.lambda_gan * adversarial + o.lambda_recon * recon + o.lambda_kl * kl + o.lambda_cycle * cycle
                  + o.lambda_kl_cycle * kl_cycle)
        self.optimise("G_opt", loss_g)
        return {"g_gan": adversarial.item(), "g_recon": recon.item(), "g_kl": kl.item(), "g_cycle": cycle.item(),
                "g_kl_cycle": kl_cycle.item(), "g_loss": loss_g.item(), "d_loss": loss_d.item()}


def train_unit(images: np.ndarray, sketches: np.ndarray, out: str | Path, config: str | UNITConfig = "cpu",
               options: UNITOptions | None = None, resume: bool = False, device: str = "auto",
               on_step: Callable[[int, dict[str, float]], None] | None = None,
               log: Callable[[str], None] = print) -> TrainResult:
    """Train UNIT on uint8 images (N, R, R, 3) and canonical sketches (N, R, R), unpaired, into
    `out` (see `training.unpaired.train_unpaired`)."""
    return train_unpaired(UNITTrainer, images, sketches, out, config, options or UNITOptions(), resume, device, on_step, log)


OPTIONS, train = UNITOptions, train_unit  # what `train unit` calls
