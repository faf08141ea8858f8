"""Train the StyleGAN2 generator G (with its discriminator D) on a folder of images.

StyleGAN2 recipe: non-saturating logistic loss; lazy R1 on reals every 16 D steps; optional lazy
path-length regularisation every 4 G steps on half batches; optional style mixing; Adam (lr 0.0025,
betas (0, 0.99), both adjusted for lazy regularisation); an exponential moving average G_ema that is
what we ship; DiffAugment on reals and fakes for small datasets.

Runs unchanged under `torchrun --nproc_per_node N`: every rank computes on batch / N images, and
gradients, w_avg and the path-length mean are averaged across ranks before each update, so the
ranks' weights stay identical (checked at every snapshot).

Bundle layout (BUNDLE = --out):
    generator.safetensors / .json   G_ema and its config + training summary (written at the end)
    discriminator.safetensors / .json   D, so that a later run can continue from the bundle (--init-from)
    generator_checkpoint.*          G, D, G_ema, optimisers, progress (every snapshot; --resume)
    samples/reals.png, samples/kimg00100.000.png   fixed-z sample grids of G_ema
    generator_metrics.jsonl         one line per snapshot: kimg, mean losses, timing, FD_C
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from generation.checkpoints import checkpoint_exists, load_checkpoint, save_checkpoint
from generation.device import Distributed, init_distributed, pick_device
from generation.errors import InputError
from generation.images import image_grid, save_png
from generation.registry import load_network, network_config, network_exists, network_training, save_network
from generation.stylegan2 import Discriminator, Generator, StyleGAN2Config
from training.diffaugment import diff_augment, parse_policy, random_xflip
from training.loop import StopFlag, TrainResult, append_metrics, assert_same_weights, autocast, broadcast_module, optimise
from training.losses import d_logistic_loss, d_r1_loss, g_nonsaturating_loss, g_path_length_loss

CHECKPOINT = "generator_checkpoint"
METRICS = "generator_metrics.jsonl"


# --------------------------------------------------------------------------------------------
# Losses.


# --------------------------------------------------------------------------------------------
# Options and the training state.


@dataclass
class TrainOptions:
    kimg: float = 200.0  # stop after this many thousand real images shown to D
    batch: int = 16  # total over all ranks
    gamma: float | None = None  # R1 weight; None: 0.0002 * resolution^2 / batch (ADA heuristic)
    pl_weight: float = 2.0  # 0 disables path-length regularisation
    mixing: float = 0.9  # style-mixing probability; 0 disables
    lr: float = 0.0025
    r1_interval: int = 16
    pl_interval: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    ema_kimg: float = 10.0  # half-life of G_ema
    ema_rampup: float | None = 0.05  # early on, half-life = ema_rampup * images seen (None: off)
    augment: str = "color,translation,cutout"  # DiffAugment policy; "" disables
    xflip: bool = False  # mirror reals left-right at random
    snap_kimg: float = 4.0  # sample grid + checkpoint + log line every this many kimg
    bf16: bool = False  # bfloat16 autocast of the forward passes on CUDA (weights, optimiser and EMA stay float32)
    seed: int = 0

    def r1_gamma(self, resolution: int) -> float:
        return self.gamma if self.gamma is not None else 0.0002 * resolution**2 / self.batch

    def validate(self, world_size: int) -> None:
        if self.batch < 1 or self.batch % world_size:
            raise InputError(f"--batch {self.batch}: must be a positive multiple of the {world_size} processes")
        if self.kimg <= 0 or self.snap_kimg <= 0:
            raise InputError("--kimg and --snap-kimg must be positive")
        if not 0.0 <= self.mixing <= 1.0:
            raise InputError(f"--mixing {self.mixing}: a probability between 0 and 1")
        if (self.gamma is not None and self.gamma < 0) or self.pl_weight < 0:
            raise InputError("--gamma and --pl-weight must not be negative")
        parse_policy(self.augment)


def lazy_adam(params, lr: float, interval: int) -> torch.optim.Adam:
    """Adam whose lr and betas are scaled so that regularising every `interval` steps (with its own
    optimiser step) matches regularising every step (StyleGAN2 appendix B)."""
    ratio = interval / (interval + 1) if interval > 0 else 1.0
    return torch.optim.Adam(params, lr=lr * ratio, betas=(0.0, 0.99**ratio), eps=1e-8)


class GANTrainer:
    """G, D, G_ema, their optimisers and counters; `step()` runs one full iteration."""

    def __init__(self, config: StyleGAN2Config, options: TrainOptions, reals: Tensor,
                 device: torch.device | str = "cpu", dist: Distributed = Distributed()):
        """reals: uint8 (N, 3, R, R) images (any device; moved to `device`)."""
        options.validate(dist.world_size)
        assert reals.dtype == torch.uint8 and reals.shape[1:] == (3, config.resolution, config.resolution), \
            f"reals must be uint8 (N, 3, {config.resolution}, {config.resolution}), got {reals.dtype} {tuple(reals.shape)}"
        self.config, self.options, self.dist = config, options, dist
        self.device = torch.device(device)
        # oneDNN's CPU convolutions are ~15% faster on NHWC activations (measured at the cpu preset)
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.reals = reals.to(self.device).contiguous(memory_format=self.memory_format)
        self.batch = options.batch // dist.world_size  # per rank
        self.gamma = options.r1_gamma(config.resolution)

        torch.manual_seed(options.seed)  # same initial weights on every rank (also broadcast below)
        self.G = Generator(config).to(self.device, memory_format=self.memory_format).train()
        self.D = Discriminator(config).to(self.device, memory_format=self.memory_format).train()
        for module in (self.G, self.D):
            broadcast_module(module, dist)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.G_opt = lazy_adam(self.G.parameters(), options.lr, options.pl_interval if options.pl_weight > 0 else 0)
        self.D_opt = lazy_adam(self.D.parameters(), options.lr, options.r1_interval if self.gamma > 0 else 0)
        self.pl_mean = torch.zeros([], device=self.device)
        self.step_count = 0
        self.nimg = 0
        self.reseed()

    # -- randomness: a function of (seed, rank, step), so a run resumed from a snapshot repeats the
    # uninterrupted run exactly, and ranks draw different samples.
    def reseed(self) -> None:
        seed = (self.options.seed * 1_000_003 + self.step_count) * 1009 + self.dist.rank
        self.rng = torch.Generator(self.device).manual_seed(seed)
        torch.manual_seed(seed + 1)  # G's random noise and the path-length noise

    @property
    def kimg(self) -> float:
        return self.nimg / 1000

    def real_batch(self) -> Tensor:
        index = torch.randint(len(self.reals), (self.batch,), device=self.device, generator=self.rng)
        images = (self.reals[index].to(torch.float32) / 127.5 - 1).contiguous(memory_format=self.memory_format)
        return random_xflip(images, self.rng) if self.options.xflip else images

    def augment(self, images: Tensor) -> Tensor:
        return diff_augment(images, self.options.augment, self.rng) if self.options.augment else images

    def step(self) -> dict[str, float]:
        """One iteration: D step (+ R1 every r1_interval), G step (+ path length every pl_interval), EMA."""
        opts, G, D = self.options, self.G, self.D
        stats: dict[str, float] = {}

        # D: tell reals from fakes.
        G.requires_grad_(False)
        D.requires_grad_(True)
        reals = self.real_batch()
        with autocast(self.device, opts.bf16):
            with torch.no_grad():
                fakes = G(G.sample_ws(self.batch, opts.mixing, generator=self.rng), noise_mode="random")
            real_logits, fake_logits = D(self.augment(reals)), D(self.augment(fakes))
            loss = d_logistic_loss(real_logits.float(), fake_logits.float())
        optimise(D, self.D_opt, loss, self.dist)
        stats.update(d_loss=loss.item(), real_score=real_logits.mean().item(), fake_score=fake_logits.mean().item())
        if self.gamma > 0 and self.step_count % opts.r1_interval == 0:
            reals = reals.detach().requires_grad_(True)
            with autocast(self.device, opts.bf16):
                r1 = d_r1_loss(D(self.augment(reals)).float(), reals)
            optimise(D, self.D_opt, r1 * (self.gamma / 2 * opts.r1_interval), self.dist)
            stats["r1"] = r1.item()

        # G: fool D.
        G.requires_grad_(True)
        D.requires_grad_(False)
        ws = G.sample_ws(self.batch, opts.mixing, generator=self.rng)
        G.mapping.update_w_avg(self.dist.all_reduce_mean(ws[:, 0].detach().mean(dim=0)))
        with autocast(self.device, opts.bf16):
            loss = g_nonsaturating_loss(D(self.augment(G(ws, noise_mode="random"))).float())
        optimise(G, self.G_opt, loss, self.dist)
        stats["g_loss"] = loss.item()
        if opts.pl_weight > 0 and self.step_count % opts.pl_interval == 0:
            ws = G.sample_ws(max(1, self.batch // opts.pl_batch_shrink), opts.mixing, generator=self.rng)
            with autocast(self.device, opts.bf16):
                fakes = G(ws, noise_mode="random").float()
            penalty, self.pl_mean = g_path_length_loss(fakes, ws, self.pl_mean, opts.pl_decay, self.dist.all_reduce_mean)
            optimise(G, self.G_opt, penalty * (opts.pl_weight * opts.pl_interval), self.dist)
            stats.update(pl_penalty=penalty.item(), pl_mean=self.pl_mean.item())
        G.requires_grad_(False)

        self.step_count += 1
        self.nimg += opts.batch
        self.update_ema()
        return stats

    @torch.no_grad()
    def update_ema(self) -> None:
        opts = self.options
        ema_nimg = opts.ema_kimg * 1000
        if opts.ema_rampup is not None:
            ema_nimg = min(ema_nimg, self.nimg * opts.ema_rampup)
        beta = 0.5 ** (opts.batch / max(ema_nimg, 1e-8))
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.copy_(p.lerp(p_ema, beta))
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)

    # -- checkpoints
    def state(self) -> tuple[dict, dict]:
        states = {"G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
                  "G_opt": self.G_opt.state_dict(), "D_opt": self.D_opt.state_dict()}
        meta = {"config": asdict(self.config), "options": asdict(self.options), "nimg": self.nimg,
                "step": self.step_count, "pl_mean": self.pl_mean.item(), "world_size": self.dist.world_size}
        return states, meta

    def save(self, directory: str | Path) -> None:
        states, meta = self.state()
        save_checkpoint(directory, CHECKPOINT, states, meta)

    def load(self, directory: str | Path) -> None:
        states, meta = load_checkpoint(directory, CHECKPOINT)
        if StyleGAN2Config.from_dict(meta["config"]) != self.config:
            raise InputError(f"{directory}: the checkpoint was trained with {meta['config']}; pass the same --preset")
        for key, module in (("G", self.G), ("D", self.D), ("G_ema", self.G_ema)):
            module.load_state_dict(states[key])
        self.G_opt.load_state_dict(states["G_opt"])
        self.D_opt.load_state_dict(states["D_opt"])
        self.pl_mean.fill_(meta["pl_mean"])
        self.nimg, self.step_count = int(meta["nimg"]), int(meta["step"])
        self.reseed()

    def continue_from(self, bundle: Path) -> str:
        """Start from the bundle's exported G (into G and G_ema) and D; returns what was loaded."""
        G = load_network("generator", bundle)
        if G.config != self.config:
            raise InputError(f"{bundle}: its G was trained with {asdict(G.config)}; pass the same --preset to continue it")
        for module in (self.G, self.G_ema):
            module.load_state_dict(G.state_dict())
        self.nimg = round(float(network_training("generator", bundle).get("kimg", 0.0)) * 1000)
        if not network_exists(bundle, "discriminator"):
            return "G; D starts untrained: the bundle has no discriminator.safetensors"
        self.D.load_state_dict(load_network("discriminator", bundle).state_dict())
        return "G and D"

    def check_consistency(self) -> None:
        assert_same_weights((self.G, self.D, self.G_ema), self.dist)


# --------------------------------------------------------------------------------------------
# Snapshots: sample grids and the optional FD_C hook.


def generate(G: Generator, count: int, seed: int, batch: int = 32, noise_mode: str = "const") -> Tensor:
    """`count` images from fixed latents (float, [-1, 1] roughly), batch by batch."""
    rng = torch.Generator(G.w_avg.device).manual_seed(seed)
    z = torch.randn(count, G.config.z_dim, device=G.w_avg.device, generator=rng)
    return torch.cat([G(G.mapping(z[i : i + batch]), noise_mode=noise_mode) for i in range(0, count, batch)])


def fd_c_hook(c_bundle: Path | None, reals: Tensor, device: torch.device, count: int = 1000,
              seed: int = 1) -> tuple[Callable[[Generator], float] | None, str]:
    """FD_C of G_ema's samples against the reals, in the space of the project's feature network C.

    Returns (measure(G) or None, why not). Skipped when generation.moco / retrieval.metrics are not
    importable or there is no C bundle (BUNDLE/moco.*); real features are computed once.
    """
    if c_bundle is None or not network_exists(c_bundle, "moco"):
        return None, f"no C bundle ({c_bundle}/moco.safetensors)" if c_bundle else "no C bundle"
    try:
        from retrieval.metrics import fd_c
    except ImportError as error:
        return None, f"retrieval.metrics.fd_c not available ({error})"
    network = load_network("moco", c_bundle, device)
    count = min(count, len(reals))
    real_features = network.embed_many(reals[:count])

    def measure(G: Generator) -> float:
        return fd_c(real_features, network.embed_many(generate(G, count, seed=seed)))

    return measure, ""


# --------------------------------------------------------------------------------------------
# The whole run.


def train_generator(data: str | Path, out: str | Path, preset: str | StyleGAN2Config = "cpu",
                    options: TrainOptions | None = None, split: str | None = None, device: str = "auto",
                    resume: bool = False, fd_bundle: str | Path | None = None, init_from: str | Path | None = None,
                    on_step: Callable[[float, dict[str, float]], None] | None = None,
                    log: Callable[[str], None] = print) -> TrainResult:
    """Train G on the images of `data` into the bundle folder `out` (see the module docstring).

    on_step(kimg, stats) is called on rank 0 after every iteration (for a progress bar). The
    result's metrics hold "kimg", the thousands of real images shown to D.

    init_from: a bundle whose trained G (and D, where it was exported beside G) this run continues:
    its kimg count carries on from theirs, so `options.kimg` is the total. Without an exported D, D
    starts untrained. Optimiser states are not exported, so Adam starts afresh.
    """
    from generation.dataset import ImageDataset

    options = options or TrainOptions()
    config = network_config("generator", preset) if isinstance(preset, str) else preset
    out = Path(out)
    device_ = pick_device(device)
    dist = init_distributed(device_)
    if device_.type == "cuda" and dist.enabled:
        device_ = torch.device("cuda", dist.local_rank)
    options.validate(dist.world_size)
    if checkpoint_exists(out, CHECKPOINT) and not resume:
        raise InputError(f"{out}: already holds a training checkpoint; pass --resume to continue it or choose another --out")

    images, _ = ImageDataset(data, split).arrays(config.resolution)
    reals = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    trainer = GANTrainer(config, options, reals, device_, dist)
    if resume and checkpoint_exists(out, CHECKPOINT):
        trainer.load(out)
        if dist.is_main:
            log(f"resumed {out} at {trainer.kimg:.1f} kimg (step {trainer.step_count})")
    elif init_from is not None:
        continued = trainer.continue_from(Path(init_from))
        if dist.is_main:
            log(f"continuing G of {init_from} at {trainer.kimg:.1f} kimg ({continued})")
    # FD_C needs C: from --fd-bundle, or from this bundle when C was trained into the same folder.
    fd_c, why_not = fd_c_hook(Path(fd_bundle) if fd_bundle else out, reals, device_) if dist.is_main else (None, "")
    if dist.is_main:
        log(f"training G {config} on {len(reals)} images, batch {options.batch} over {dist.world_size} "
            f"process(es), R1 gamma {trainer.gamma:g}, device {device_} ({torch.get_num_threads()} threads); "
            f"FD_C: {'on' if fd_c else why_not}")
        save_png(image_grid(reals[:32].float() / 127.5 - 1, 8), out / "samples" / "reals.png")

    def snapshot(totals: dict[str, list[float]], seconds: float) -> None:
        trainer.check_consistency()
        if not dist.is_main:
            return
        fakes = generate(trainer.G_ema, 32, seed=options.seed)
        save_png(image_grid(fakes, 8), out / "samples" / f"kimg{trainer.kimg:09.3f}.png")
        entry = {"kimg": round(trainer.kimg, 3), "step": trainer.step_count, "seconds": round(seconds, 1)}
        entry.update({k: round(sum(v) / len(v), 5) for k, v in totals.items() if v})
        if fd_c is not None:
            try:
                entry["fd_c"] = round(fd_c(trainer.G_ema), 4)
            except Exception as error:  # a metric failure must not end a long run
                entry["fd_c_error"] = f"{type(error).__name__}: {error}"
        trainer.save(out)
        append_metrics(out / METRICS, entry)

    start, totals = time.time(), {}
    next_snap = (math.floor(trainer.kimg / options.snap_kimg) + 1) * options.snap_kimg
    stopped_early = False
    with StopFlag() as stop:
        while trainer.kimg < options.kimg:
            stats = trainer.step()
            for key, value in stats.items():
                totals.setdefault(key, []).append(value)
            if dist.is_main and on_step is not None:
                on_step(trainer.kimg, stats)
            stop_now = stop.agreed(dist, device_)
            if trainer.kimg >= next_snap or trainer.kimg >= options.kimg or stop_now:
                snapshot(totals, time.time() - start)
                totals = {}
                next_snap = (math.floor(trainer.kimg / options.snap_kimg) + 1) * options.snap_kimg
                trainer.reseed()  # makes a resume from this snapshot repeat the uninterrupted run
            if stop_now:
                stopped_early = True
                break
    seconds = time.time() - start
    if dist.is_main and not stopped_early:
        summary = {"kimg": trainer.kimg, "steps": trainer.step_count, "seconds": round(seconds, 1),
                   "images": len(reals), "data": str(data), "split": split, "world_size": dist.world_size,
                   "options": dataclasses.asdict(options), "r1_gamma": trainer.gamma}
        if init_from is not None:
            summary["continued_from"] = str(init_from)
        save_network("generator", trainer.G_ema, out, {"training": summary})
        save_network("discriminator", trainer.D, out, {"training": summary})
    dist.barrier()
    return TrainResult(trainer.step_count, seconds, out, stopped_early, {"kimg": trainer.kimg})
