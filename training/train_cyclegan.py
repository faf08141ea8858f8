"""Train the CycleGAN baseline (two ResNet generators, two PatchGANs) on unpaired sketches and images.

The reference recipe: per step one update of both generators on the least-squares GAN loss of
each direction + lambda_cycle * the cycle losses L1(G_s(G_i(s)), s) and L1(G_i(G_s(x)), x) +
lambda_identity * lambda_cycle * the identity losses L1(G_i(x), x) and L1(G_s(s), s) (weight 0.5
of the cycle weight, as the reference code scales it); then one update of both discriminators,
each on half the sum of its LSGAN losses on real images and on fakes from a pool of the last 50
(`training.unpaired.ImagePool`). Adam (lr 2e-4, betas (0.5, 0.999)), constant for the first half
of the steps, then linear decay to 0. The reference batch is 1; the default here is 4 (instance
norm makes the per-image computation the same, the gradient an average of 4).

Data, randomness, resume, torchrun and the files written: `training.unpaired`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from generation.cyclegan import CHANNELS, CycleGANConfig, PatchDiscriminator, ResnetGenerator
from generation.errors import InputError
from training.loop import TrainResult
from training.unpaired import ImagePool, UnpairedOptions, UnpairedTrainer, l1_loss, lsgan_loss, train_unpaired

CHECKPOINT = "cyclegan_checkpoint"
METRICS = "cyclegan_metrics.jsonl"


@dataclass
class CycleGANOptions(UnpairedOptions):
    steps: int = 1500  # the cpu preset's: ~24 min on one thread, ~40 with the machine busy (docs/BENCHMARKS.md)
    lambda_cycle: float = 10.0  # the reference lambda_A = lambda_B
    lambda_identity: float = 0.5  # times lambda_cycle (the reference's scaling)
    pool_size: int = 50

    def validate(self, world_size: int) -> None:
        super().validate(world_size)
        if self.pool_size < 0:
            raise InputError(f"pool_size {self.pool_size}: must not be negative (0 = no pool)")


class CycleGANTrainer(UnpairedTrainer):
    name = "cyclegan"
    config: CycleGANConfig
    options: CycleGANOptions

    def build(self) -> dict[str, nn.Module]:
        c = self.config
        networks = {"G_image": ResnetGenerator(c), "G_sketch": ResnetGenerator(c), "D_image": PatchDiscriminator(c),
                    "D_sketch": PatchDiscriminator(c)}
        shape = (CHANNELS, c.resolution, c.resolution)
        self.pools = {"image": ImagePool(self.options.pool_size, shape, self.device),
                      "sketch": ImagePool(self.options.pool_size, shape, self.device)}
        return networks

    @property
    def translator(self) -> nn.Module:
        return self.networks["G_image"]

    def update(self, sketches: Tensor, images: Tensor) -> dict[str, float]:
        o, n = self.options, self.networks
        G_image, G_sketch, D_image, D_sketch = n["G_image"], n["G_sketch"], n["D_image"], n["D_sketch"]
        fake_images, fake_sketches = G_image(sketches), G_sketch(images)

        self.set_requires_grad("D", False)  # G's update must not touch D's gradients
        adversarial = lsgan_loss(D_image(fake_images), True) + lsgan_loss(D_sketch(fake_sketches), True)
        cycle = l1_loss(G_sketch(fake_images), sketches) + l1_loss(G_image(fake_sketches), images)
        identity = torch.zeros((), device=self.device)
        if o.lambda_identity > 0:  # each generator fed its own output domain should change nothing
            identity = l1_loss(G_image(images), images) + l1_loss(G_sketch(sketches), sketches)
        loss_g = adversarial + o.lambda_cycle * cycle + o.lambda_identity * o.lambda_cycle * identity
        self.optimise("G_opt", loss_g)

        self.set_requires_grad("D", True)
        pooled_images = self.pools["image"].query(fake_images, self.rng)
        pooled_sketches = self.pools["sketch"].query(fake_sketches, self.rng)
        loss_d_image = 0.5 * (lsgan_loss(D_image(images), True) + lsgan_loss(D_image(pooled_images), False))
        loss_d_sketch = 0.5 * (lsgan_loss(D_sketch(sketches), True) + lsgan_loss(D_sketch(pooled_sketches), False))
        self.optimise("D_opt", loss_d_image + loss_d_sketch)
        return {"g_gan": adversarial.item(), "g_cycle": cycle.item(), "g_identity": identity.item(), "g_loss": loss_g.item(),
                "d_image": loss_d_image.item(), "d_sketch": loss_d_sketch.item()}


def train_cyclegan(images: np.ndarray, sketches: np.ndarray, out: str | Path, config: str | CycleGANConfig = "cpu",
                   options: CycleGANOptions | None = None, resume: bool = False, device: str = "auto",
                   on_step: Callable[[int, dict[str, float]], None] | None = None,
                   log: Callable[[str], None] = print) -> TrainResult:
    """Train CycleGAN on uint8 images (N, R, R, 3) and canonical sketches (N, R, R), unpaired, into
    `out` (see `training.unpaired.train_unpaired`)."""
    return train_unpaired(CycleGANTrainer, images, sketches, out, config, options or CycleGANOptions(), resume, device,
                          on_step, log)


OPTIONS, train = CycleGANOptions, train_cyclegan  # what `train cyclegan` calls
