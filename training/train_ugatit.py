"""Train the U-GAT-IT baseline (CAM attention, AdaLIN) on unpaired sketches and images.

The official recipe: per step one update of the four discriminators (global and local, per
domain) on least-squares losses of their patch logits and of their CAM logits (real 1,
translated 0), then one update of both generators on
    adv_weight * LSGAN(D(translated), 1) for the patch and CAM logits of both discriminators
  + cycle_weight * L1(G_s(G_i(s)), s) and L1(G_i(G_s(x)), x)
  + identity_weight * L1(G_i(x), x) and L1(G_s(s), s)
  + cam_weight * BCE of each generator's own CAM logits: 1 on the other domain's input (what it
    translates), 0 on its own domain's input (the identity pass)
with adv 1, cycle 10, identity 10, CAM 1000; every AdaLIN/LIN rho clipped to [0, 1] after the
update. Adam (lr 1e-4, betas (0.5, 0.999), weight decay 1e-4), constant for the first half of the
steps, then linear decay to 0. The translations the discriminators see are the same the
generators' update uses (the official code recomputes them after the discriminators' update; the
generators are unchanged in between and have no noise, so the values are the same).

Data, randomness, resume, torchrun and the files written: `training.unpaired`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from generation.ugatit import UGATITConfig, UGATITDiscriminator, UGATITGenerator, clip_rho
from training.loop import TrainResult
from training.unpaired import UnpairedOptions, UnpairedTrainer, l1_loss, lsgan_loss, train_unpaired

CHECKPOINT = "ugatit_checkpoint"
METRICS = "ugatit_metrics.jsonl"


@dataclass
class UGATITOptions(UnpairedOptions):
    steps: int = 800  # the cpu preset's: ~26 min on one thread, ~39 with the machine busy (docs/BENCHMARKS.md)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    lambda_adv: float = 1.0
    lambda_cycle: float = 10.0
    lambda_identity: float = 10.0
    lambda_cam: float = 1000.0


def cam_bce(logits: Tensor, target_real: bool) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, logits.new_full(logits.shape, 1.0 if target_real else 0.0))


class UGATITTrainer(UnpairedTrainer):
    name = "ugatit"
    config: UGATITConfig
    options: UGATITOptions

    def build(self) -> dict[str, nn.Module]:
        c = self.config
        return {"G_image": UGATITGenerator(c), "G_sketch": UGATITGenerator(c),
                "D_image_global": UGATITDiscriminator(c, c.d_layers_global), "D_image_local": UGATITDiscriminator(c, c.d_layers_local),
                "D_sketch_global": UGATITDiscriminator(c, c.d_layers_global), "D_sketch_local": UGATITDiscriminator(c, c.d_layers_local)}

    @property
    def translator(self) -> nn.Module:
        return self.networks["G_image"]

    def judge(self, domain: str, x: Tensor, target_real: bool) -> Tensor:
        """The LSGAN loss of both of `domain`'s discriminators, on their patch and their CAM logits."""
        loss = 0
        for scale in ("global", "local"):
            logits, cam_logits, _ = self.networks[f"D_{domain}_{scale}"](x)
            loss = loss + lsgan_loss(logits, target_real) + lsgan_loss(cam_logits, target_real)
        return loss

    def update(self, sketches: Tensor, images: Tensor) -> dict[str, float]:
        o, n = self.options, self.networks
        G_image, G_sketch = n["G_image"], n["G_sketch"]
        to_image, to_image_cam, _ = G_image(sketches)
        to_sketch, to_sketch_cam, _ = G_sketch(images)

        self.set_requires_grad("D", True)
        loss_d = o.lambda_adv * (self.judge("image", images, True) + self.judge("image", to_image.detach(), False)
                                 + self.judge("sketch", sketches, True) + self.judge("sketch", to_sketch.detach(), False))
        self.optimise("D_opt", loss_d)

        self.set_requires_grad("D", False)  # G's update must not touch D's gradients
        adversarial = self.judge("image", to_image, True) + self.judge("sketch", to_sketch, True)
        cycle = l1_loss(G_sketch(to_image)[0], sketches) + l1_loss(G_image(to_sketch)[0], images)
        same_image, same_image_cam, _ = G_image(images)
        same_sketch, same_sketch_cam, _ = G_sketch(sketches)
        identity = l1_loss(same_image, images) + l1_loss(same_sketch, sketches)
        cam = (cam_bce(to_image_cam, True) + cam_bce(same_image_cam, False) + cam_bce(to_sketch_cam, True)
               + cam_bce(same_sketch_cam, False))
        loss_g = o.lambda_adv * adversarial + o.lambda_cycle * cycle + o.lambda_identity * identity + o.lambda_cam * cam
        self.optimise("G_opt", loss_g)
        clip_rho(G_image)
        clip_rho(G_sketch)
        return {"g_gan": adversarial.item(), "g_cycle": cycle.item(), "g_identity": identity.item(), "g_cam": cam.item(),
                "g_loss": loss_g.item(), "d_loss": loss_d.item()}


def train_ugatit(images: np.ndarray, sketches: np.ndarray, out: str | Path, config: str | UGATITConfig = "cpu",
                 options: UGATITOptions | None = None, resume: bool = False, device: str = "auto",
                 on_step: Callable[[int, dict[str, float]], None] | None = None,
                 log: Callable[[str], None] = print) -> TrainResult:
    """Train U-GAT-IT on uint8 images (N, R, R, 3) and canonical sketches (N, R, R), unpaired, into
    `out` (see `training.unpaired.train_unpaired`)."""
    return train_unpaired(UGATITTrainer, images, sketches, out, config, options or UGATITOptions(), resume, device, on_step, log)


OPTIONS, train = UGATITOptions, train_ugatit  # what `train ugatit` calls
