"""What the unpaired baselines' trainers share (CycleGAN, UNIT, U-GAT-IT): the data, the options
every one has, the image pool, checkpoints, sample grids and the whole run.

Data. The same (image, S's synthesized sketch) cache that E, H and pix2pix train on, but unpaired,
as the paper trains these models: each step draws its sketches and its images by two independent
random choices, so a sketch and the image it came from meet in a batch only by chance. Each domain
is mirrored left-right at random on its own (`xflip`). Both domains are 3-channel images in
[-1, 1]; a sketch is its grey drawing (`generation.sketch.sketch_as_image`).

Randomness (batches, flips, pool choices, sampling noise) is reseeded every step from (seed, step,
rank), and the image pools are part of the checkpoint, so a resumed run repeats the uninterrupted
one exactly. Runs unchanged under `torchrun --nproc_per_node N`: each rank takes batch / N
sketches and images and keeps its own pools; gradients are averaged across ranks (the networks
have no running statistics), so the ranks' weights stay identical (checked at every snapshot).

Bundle layout (out), NAME one of cyclegan, unit, ugatit:
    NAME.safetensors / .json     the network that translates sketches (with its config and a
                                 training summary; written at the end)
    NAME_checkpoint.safetensors / .json   every network, optimiser, pool and the step (every snapshot; resume)
    samples/NAME/step0000500.png rows: sketch | translated (the sketch -> image direction) | its own image
    NAME_metrics.jsonl           one line per snapshot: step, lr, mean losses, seconds
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from generation.checkpoints import load_checkpoint, save_checkpoint
from generation.device import Distributed
from generation.errors import InputError
from generation.images import image_grid
from generation.registry import network_config
from generation.sketch import sketch_as_image, sketch_to_tensor
from training.driver import check_pairs, data_on_device, run_image_training
from training.loop import TrainResult, assert_same_weights, average_gradients, broadcast_module


@dataclass
class UnpairedOptions:
    """The options every unpaired trainer has; each trainer's own dataclass adds its loss weights."""

    steps: int = 3000
    batch: int = 4  # total over all ranks
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0  # Adam's L2 term
    lr_decay: bool = True  # linear decay to 0 over the second half of the steps
    xflip: bool = True  # mirror each domain's images left-right at random, independently
    snap_every: int = 250  # sample grid + checkpoint + metrics line every this many steps
    seed: int = 0

    def validate(self, world_size: int) -> None:
        if self.batch < 1 or self.batch % world_size:
            raise InputError(f"--batch {self.batch}: must be a positive multiple of the {world_size} processes")
        if self.steps < 1 or self.snap_every < 1:
            raise InputError("--steps and --snap-every must be positive")
        if self.lr <= 0 or self.weight_decay < 0 or not all(0 <= b < 1 for b in self.betas):
            raise InputError("--lr must be positive, the weight decay not negative, and betas in [0, 1)")
        weights = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("lambda_")}
        for name, value in weights.items():
            if value < 0:
                raise InputError(f"{name} {value}: loss weights must not be negative")

    def lr_at(self, step: int) -> float:
        """Constant, then linear decay over the second half (never exactly 0 on a step that runs)."""
        half = self.steps // 2
        if not self.lr_decay or step < half:
            return self.lr
        return self.lr * (self.steps - step) / (self.steps - half)


def lsgan_loss(outputs: Tensor | list[Tensor], target_real: bool) -> Tensor:
    """Least squares against 1 or 0, the mean over each output, summed over a list of outputs (scales)."""
    outputs = outputs if isinstance(outputs, list) else [outputs]
    target = 1.0 if target_real else 0.0
    return sum(((o - target) ** 2).mean() for o in outputs)


def l1_loss(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().mean()


class ImagePool:
    """The reference image buffer (Shrivastava et al. 2017) that D sees fakes from: until full, each
    new fake is stored and returned; then with probability 1/2 a stored fake is returned in its place
    and the new one stored instead. Storage is one fixed tensor, so it checkpoints and gathers."""

    def __init__(self, size: int, shape: tuple[int, ...], device: torch.device):
        self.size = size
        self.images = torch.zeros((size, *shape), device=device)
        self.count = 0

    def query(self, fakes: Tensor, rng: torch.Generator) -> Tensor:
        if self.size == 0:
            return fakes
        fakes = fakes.detach()
        chosen = []
        for fake in fakes:
            if self.count < self.size:
                self.images[self.count] = fake
                self.count += 1
                chosen.append(fake)
                continue
            swap = torch.rand((), device=fake.device, generator=rng).item() < 0.5
            if swap:
                slot = int(torch.randint(self.size, (), device=fake.device, generator=rng))
                chosen.append(self.images[slot].clone())
                self.images[slot] = fake
            else:
                chosen.append(fake)
        return torch.stack(chosen)


class UnpairedTrainer:
    """Networks, their optimisers, the pools and the step counter; `step()` runs one update of every
    network. Subclasses set `name` (the registry's) and implement `build` and `update`."""

    name: ClassVar[str]

    def __init__(self, config, options: UnpairedOptions, images: np.ndarray, sketches: np.ndarray,
                 device: torch.device | str = "cpu", dist: Distributed = Distributed()):
        options.validate(dist.world_size)
        check_pairs(images, sketches, config.resolution)
        self.config, self.options, self.dist = config, options, dist
        self.device = torch.device(device)
        self.images, self.sketches = data_on_device(images, sketches, self.device)
        self.batch = options.batch // dist.world_size  # per rank
        self.pools: dict[str, ImagePool] = {}

        torch.manual_seed(options.seed)  # same initial weights on every rank (also broadcast below)
        self.networks: dict[str, nn.Module] = {k: m.to(self.device).train() for k, m in self.build().items()}
        for module in self.networks.values():
            broadcast_module(module, dist)
        self.optimisers = {group: torch.optim.Adam([p for k in keys for p in self.networks[k].parameters()], lr=options.lr,
                                                   betas=options.betas, weight_decay=options.weight_decay)
                           for group, keys in self.optimiser_groups().items()}
        self.step_count = 0
        self.rng = torch.Generator(self.device)

    # -- what a subclass provides
    def build(self) -> dict[str, nn.Module]:
        """Every network, by the name its state has in the checkpoint."""
        raise NotImplementedError

    def optimiser_groups(self) -> dict[str, tuple[str, ...]]:
        """One Adam per group of networks (the reference codes: one for the generators, one for the discriminators)."""
        return {"G_opt": tuple(k for k in self.networks if k.startswith("G")), "D_opt": tuple(k for k in self.networks if k.startswith("D"))}

    def update(self, sketches: Tensor, images: Tensor) -> dict[str, float]:
        """One D update and one G update on unpaired batches (n, 3, R, R) in [-1, 1]; the losses."""
        raise NotImplementedError

    @property
    def translator(self) -> nn.Module:
        """The registered network: its `translate` makes images from sketches."""
        raise NotImplementedError

    # -- the step
    def reseed(self) -> None:
        """Randomness as a function of (seed, step, rank): resuming at any step repeats the run."""
        seed = (self.options.seed * 1_000_003 + self.step_count) * 1009 + self.dist.rank
        self.rng = torch.Generator(self.device).manual_seed(seed)
        torch.manual_seed(seed + 1)

    def unpaired_batch(self) -> tuple[Tensor, Tensor]:
        """(sketches, images), each (n, 3, R, R) in [-1, 1], drawn independently of each other."""
        n = len(self.images)
        sketch_index = torch.randint(n, (self.batch,), device=self.device, generator=self.rng)
        image_index = torch.randint(n, (self.batch,), device=self.device, generator=self.rng)
        sketches = sketch_as_image(sketch_to_tensor(self.sketches[sketch_index]))
        images = self.images[image_index].to(torch.float32) / 127.5 - 1
        if self.options.xflip:
            flips = torch.rand(2, self.batch, device=self.device, generator=self.rng) < 0.5
            sketches = torch.where(flips[0][:, None, None, None], sketches.flip(3), sketches)
            images = torch.where(flips[1][:, None, None, None], images.flip(3), images)
        return sketches, images

    def step(self) -> dict[str, float]:
        self.reseed()
        lr = self.options.lr_at(self.step_count)
        for optimiser in self.optimisers.values():
            for group in optimiser.param_groups:
                group["lr"] = lr
        stats = self.update(*self.unpaired_batch())
        self.step_count += 1
        return {**stats, "lr": lr}

    def optimise(self, group: str, loss: Tensor) -> None:
        """One update of optimiser `group`'s networks on `loss`, gradients averaged over ranks."""
        optimiser = self.optimisers[group]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients([self.networks[k] for k in self.optimiser_groups()[group]], self.dist)
        optimiser.step()

    def set_requires_grad(self, prefix: str, flag: bool) -> None:
        for key, module in self.networks.items():
            if key.startswith(prefix):
                module.requires_grad_(flag)

    # -- checkpoints
    def _gathered_pools(self) -> dict[str, Tensor]:
        """Every rank's pools, stacked by rank (rank 0's alone outside torchrun)."""
        states = {}
        for key, pool in self.pools.items():
            count = torch.tensor([pool.count], device=self.device)
            images, counts = pool.images, count
            if self.dist.enabled:
                images_all = [torch.empty_like(pool.images) for _ in range(self.dist.world_size)]
                counts_all = [torch.empty_like(count) for _ in range(self.dist.world_size)]
                torch_dist.all_gather(images_all, pool.images)
                torch_dist.all_gather(counts_all, count)
                images, counts = torch.stack(images_all), torch.cat(counts_all)
            else:
                images = images[None]
            states[f"pool_{key}"], states[f"pool_{key}_count"] = images, counts
        return states

    def state(self) -> tuple[dict, dict]:
        states = {key: module.state_dict() for key, module in self.networks.items()}
        states.update({key: optimiser.state_dict() for key, optimiser in self.optimisers.items()})
        states.update(self._gathered_pools())
        meta = {"config": asdict(self.config), "options": asdict(self.options), "step": self.step_count,
                "world_size": self.dist.world_size}
        return states, meta

    def save(self, directory: str | Path) -> None:
        states, meta = self.state()  # every rank joins the gather
        if self.dist.is_main:
            save_checkpoint(directory, f"{self.name}_checkpoint", states, meta)

    def load(self, directory: str | Path) -> None:
        states, meta = load_checkpoint(directory, f"{self.name}_checkpoint")
        if type(self.config).from_dict(meta["config"]) != self.config:
            raise InputError(f"{directory}: the checkpoint was trained with {meta['config']}; pass the same --preset")
        if self.pools and int(meta.get("world_size", 1)) != self.dist.world_size:
            raise InputError(f"{directory}: the checkpoint ran on {meta['world_size']} process(es); resume it with as many "
                             "(each keeps its own image pool)")
        for key, module in self.networks.items():
            module.load_state_dict(states[key])
        for key, optimiser in self.optimisers.items():
            optimiser.load_state_dict(states[key])
        for key, pool in self.pools.items():
            pool.images.copy_(states[f"pool_{key}"][self.dist.rank])
            pool.count = int(states[f"pool_{key}_count"][self.dist.rank])
        self.step_count = int(meta["step"])

    def check_consistency(self) -> None:
        assert_same_weights(self.networks.values(), self.dist, buffers=True)

    @torch.no_grad()
    def sample_grid(self, count: int = 8) -> np.ndarray:
        """Rows: sketches (black ink on white), their translations, and the images they were drawn from."""
        index = torch.arange(min(count, len(self.images)), device=self.device)
        sketches = sketch_to_tensor(self.sketches[index])
        images = self.images[index].to(torch.float32) / 127.5 - 1
        translated = self.translator.translate(sketches)
        return image_grid(torch.cat([sketch_as_image(sketches), translated, images]), len(index))


def train_unpaired(trainer_type: type[UnpairedTrainer], images: np.ndarray, sketches: np.ndarray, out: str | Path,
                   config, options: UnpairedOptions, resume: bool = False, device: str = "auto",
                   on_step: Callable[[int, dict[str, float]], None] | None = None,
                   log: Callable[[str], None] = print) -> TrainResult:
    """Train `trainer_type`'s networks on uint8 images (N, R, R, 3) and their canonical sketches
    (N, R, R), unpaired, into `out`.

    on_step(step, stats) is called on rank 0 after every step (for a progress bar). The first
    SIGINT/SIGTERM finishes the step, checkpoints and returns with stopped_early; `resume=True`
    continues from the checkpoint in `out`. The result's metrics are the final snapshot's mean losses.
    """
    name = trainer_type.name
    config = network_config(name, config) if isinstance(config, str) else config
    return run_image_training(
        name, lambda device_, dist: trainer_type(config, options, images, sketches, device_, dist), images, sketches,
        out, config, options, resume, device, on_step, log, network=lambda trainer: trainer.translator,
        data_wording=f"{len(images)} unpaired sketches and images",
        data_summary={"images": len(images), "unpaired": True}, samples=Path("samples") / name)
