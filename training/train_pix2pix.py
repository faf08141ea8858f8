"""Train the pix2pix baseline (U-Net G + conditional PatchGAN D) on (sketch, image) pairs.

The paper's recipe: per step one D update on (sketch, real) vs (sketch, G(sketch)) with its loss
halved (slows D relative to G), then one G update on the GAN loss plus lambda_l1 * L1 to the real
image; Adam (lr 2e-4, betas (0.5, 0.999)); constant lr for the first half of the steps, then linear
decay towards 0 (the reference code's schedule). Random mirroring of the pair is the only
augmentation (the paper's resize-and-crop jitter is left out).

Randomness (batches, flips, dropout) is reseeded every step from (seed, step, rank), so the step
counter in the checkpoint is the whole RNG state: a resumed run repeats the uninterrupted one
exactly. Runs unchanged under `torchrun --nproc_per_node N`: each rank takes batch / N pairs,
gradients and BatchNorm running statistics are averaged across ranks, so the ranks' weights stay
identical (checked at every snapshot). BatchNorm's batch statistics are per rank, so N ranks do not
compute exactly what one process would.

Bundle layout (out):
    pix2pix.safetensors / .json     G and its config + training summary (written at the end)
    pix2pix_checkpoint.safetensors / .json   G, D, both optimisers, step (every snapshot; resume)
    samples/step0000500.png         rows: sketch | generated (eval mode) | real, fixed pairs
    pix2pix_metrics.jsonl           one line per snapshot: step, lr, mean losses, seconds
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from generation.checkpoints import load_checkpoint, save_checkpoint
from generation.device import Distributed
from generation.errors import InputError
from generation.images import image_grid
from generation.pix2pix import PatchDiscriminator, Pix2PixConfig, UNetGenerator
from generation.registry import network_config
from generation.sketch import sketch_to_tensor
from training.driver import check_pairs, data_on_device, run_image_training
from training.loop import TrainResult, assert_same_weights, broadcast_module, optimise

CHECKPOINT = "pix2pix_checkpoint"
METRICS = "pix2pix_metrics.jsonl"
GanLoss = Literal["vanilla", "lsgan"]


# --------------------------------------------------------------------------------------------
# Losses.


def gan_loss(logits: Tensor, target_real: bool, kind: GanLoss = "vanilla") -> Tensor:
    """Mean over patches: BCE with logits (the paper) or least squares (LSGAN) against 1 or 0."""
    target = torch.full_like(logits, 1.0 if target_real else 0.0)
    if kind == "vanilla":
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.mse_loss(logits, target)


def d_loss(real_logits: Tensor, fake_logits: Tensor, kind: GanLoss = "vanilla") -> Tensor:
    """D's loss, halved as in the paper so that D learns more slowly than G."""
    return 0.5 * (gan_loss(real_logits, True, kind) + gan_loss(fake_logits, False, kind))


def l1_loss(fakes: Tensor, reals: Tensor) -> Tensor:
    return (fakes - reals).abs().mean()


def g_loss(fake_logits: Tensor, fakes: Tensor, reals: Tensor, lambda_l1: float,
           kind: GanLoss = "vanilla") -> tuple[Tensor, Tensor, Tensor]:
    """(total, GAN part, L1 part): fool D, and stay close to the real image in L1."""
    adversarial, l1 = gan_loss(fake_logits, True, kind), l1_loss(fakes, reals)
    return adversarial + lambda_l1 * l1, adversarial, l1


# --------------------------------------------------------------------------------------------
# Options and the training state.


@dataclass
class Pix2PixOptions:
    steps: int = 3000
    batch: int = 16  # total over all ranks
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    lambda_l1: float = 100.0
    gan_loss: GanLoss = "vanilla"
    lr_decay: bool = True  # linear decay to 0 over the second half of the steps
    xflip: bool = True  # mirror the (sketch, image) pair left-right at random
    snap_every: int = 500  # sample grid + checkpoint + metrics line every this many steps
    seed: int = 0

    def validate(self, world_size: int) -> None:
        if self.batch < 1 or self.batch % world_size:
            raise InputError(f"--batch {self.batch}: must be a positive multiple of the {world_size} processes")
        if self.steps < 1 or self.snap_every < 1:
            raise InputError("--steps and --snap-every must be positive")
        if self.gan_loss not in ("vanilla", "lsgan"):
            raise InputError(f"--gan-loss {self.gan_loss!r}: choose 'vanilla' or 'lsgan'")
        if self.lr <= 0 or self.lambda_l1 < 0 or not all(0 <= b < 1 for b in self.betas):
            raise InputError("--lr must be positive, --lambda-l1 not negative, and betas in [0, 1)")

    def lr_at(self, step: int) -> float:
        """Constant, then linear decay over the second half (never exactly 0 on a step that runs)."""
        half = self.steps // 2
        if not self.lr_decay or step < half:
            return self.lr
        return self.lr * (self.steps - step) / (self.steps - half)


class Pix2PixTrainer:
    """G, D, their optimisers and the step counter; `step()` runs one D update and one G update."""

    def __init__(self, config: Pix2PixConfig, options: Pix2PixOptions, images: np.ndarray, sketches: np.ndarray,
                 device: torch.device | str = "cpu", dist: Distributed = Distributed()):
        options.validate(dist.world_size)
        check_pairs(images, sketches, config.resolution)
        self.config, self.options, self.dist = config, options, dist
        self.device = torch.device(device)
        self.images, self.sketches = data_on_device(images, sketches, self.device)
        self.batch = options.batch // dist.world_size  # per rank

        torch.manual_seed(options.seed)  # same initial weights on every rank (also broadcast below)
        self.G = UNetGenerator(config).to(self.device).train()
        self.D = PatchDiscriminator(config).to(self.device).train()
        for module in (self.G, self.D):
            broadcast_module(module, dist)
        self.G_opt = torch.optim.Adam(self.G.parameters(), lr=options.lr, betas=options.betas)
        self.D_opt = torch.optim.Adam(self.D.parameters(), lr=options.lr, betas=options.betas)
        self.step_count = 0

    def reseed(self) -> None:
        """Randomness as a function of (seed, step, rank): resuming at any step repeats the run."""
        seed = (self.options.seed * 1_000_003 + self.step_count) * 1009 + self.dist.rank
        self.rng = torch.Generator(self.device).manual_seed(seed)
        torch.manual_seed(seed + 1)  # dropout

    @torch.no_grad()
    def _sync_buffers(self) -> None:
        """Average BatchNorm running statistics so every rank holds the same buffers."""
        if not self.dist.enabled:
            return
        for module in (self.G, self.D):
            for buffer in module.buffers():
                if buffer.is_floating_point():
                    buffer.copy_(self.dist.all_reduce_mean(buffer))

    def pair_batch(self, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(sketches (n, 1, R, R) ink 1, images (n, 3, R, R) in [-1, 1]); random unless `index` is given."""
        if index is None:
            index = torch.randint(len(self.images), (self.batch,), device=self.device, generator=self.rng)
        sketches = sketch_to_tensor(self.sketches[index])
        images = self.images[index].to(torch.float32) / 127.5 - 1
        return sketches, images

    def step(self) -> dict[str, float]:
        opts, G, D = self.options, self.G, self.D
        self.reseed()
        lr = opts.lr_at(self.step_count)
        for optimiser in (self.G_opt, self.D_opt):
            for group in optimiser.param_groups:
                group["lr"] = lr
        sketches, reals = self.pair_batch()
        if opts.xflip:  # the same flip for sketch and image
            flip = (torch.rand(len(reals), device=self.device, generator=self.rng) < 0.5)[:, None, None, None]
            sketches, reals = torch.where(flip, sketches.flip(3), sketches), torch.where(flip, reals.flip(3), reals)
        fakes = G(sketches)

        D.requires_grad_(True)
        real_logits, fake_logits = D(sketches, reals), D(sketches, fakes.detach())
        loss_d = d_loss(real_logits, fake_logits, opts.gan_loss)
        optimise(D, self.D_opt, loss_d, self.dist)

        D.requires_grad_(False)  # G's update must not touch D's gradients
        loss_g, adversarial, l1 = g_loss(D(sketches, fakes), fakes, reals, opts.lambda_l1, opts.gan_loss)
        optimise(G, self.G_opt, loss_g, self.dist)
        self._sync_buffers()

        self.step_count += 1
        return {"d_loss": loss_d.item(), "g_gan": adversarial.item(), "g_l1": l1.item(),
                "d_real": real_logits.mean().item(), "d_fake": fake_logits.mean().item(), "lr": lr}

    # -- checkpoints
    def state(self) -> tuple[dict, dict]:
        states = {"G": self.G.state_dict(), "D": self.D.state_dict(),
                  "G_opt": self.G_opt.state_dict(), "D_opt": self.D_opt.state_dict()}
        meta = {"config": asdict(self.config), "options": asdict(self.options), "step": self.step_count,
                "world_size": self.dist.world_size}
        return states, meta

    def save(self, directory: str | Path) -> None:
        states, meta = self.state()
        if self.dist.is_main:
            save_checkpoint(directory, CHECKPOINT, states, meta)

    def load(self, directory: str | Path) -> None:
        states, meta = load_checkpoint(directory, CHECKPOINT)
        if Pix2PixConfig.from_dict(meta["config"]) != self.config:
            raise InputError(f"{directory}: the checkpoint was trained with {meta['config']}; pass the same --preset")
        self.G.load_state_dict(states["G"])
        self.D.load_state_dict(states["D"])
        self.G_opt.load_state_dict(states["G_opt"])
        self.D_opt.load_state_dict(states["D_opt"])
        self.step_count = int(meta["step"])

    def check_consistency(self) -> None:
        assert_same_weights((self.G, self.D), self.dist, buffers=True)  # BN statistics are averaged each step

    @torch.no_grad()
    def sample_grid(self, count: int = 8) -> np.ndarray:
        """Rows: sketches (black ink on white), G's images in eval mode, the real images."""
        index = torch.arange(min(count, len(self.images)), device=self.device)
        sketches, reals = self.pair_batch(index)
        self.G.eval()
        fakes = self.G(sketches)
        self.G.train()
        paper = (1 - 2 * sketches).expand(-1, 3, -1, -1)
        return image_grid(torch.cat([paper, fakes, reals]), len(index))


# --------------------------------------------------------------------------------------------
# The whole run.


def train_pix2pix(images: np.ndarray, sketches: np.ndarray, out: str | Path, config: str | Pix2PixConfig = "cpu",
                  options: Pix2PixOptions | None = None, resume: bool = False, device: str = "auto",
                  on_step: Callable[[int, dict[str, float]], None] | None = None,
                  log: Callable[[str], None] = print) -> TrainResult:
    """Train pix2pix on uint8 images (N, R, R, 3) and their canonical sketches (N, R, R) into `out`.

    on_step(step, stats) is called on rank 0 after every step (for a progress bar). The first
    SIGINT/SIGTERM finishes the step, checkpoints and returns with stopped_early; `resume=True`
    continues from the checkpoint in `out`. The result's metrics are the final snapshot's mean losses.
    """
    options = options or Pix2PixOptions()
    config = network_config("pix2pix", config) if isinstance(config, str) else config
    return run_image_training(
        "pix2pix", lambda device_, dist: Pix2PixTrainer(config, options, images, sketches, device_, dist), images, sketches,
        out, config, options, resume, device, on_step, log, network=lambda trainer: trainer.G,
        data_wording=f"{len(images)} pairs", data_summary={"pairs": len(images)}, samples=Path("samples"))
