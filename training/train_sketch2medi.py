"""Phase 1 (E with the latent discriminator) and phase 2 (H with E frozen); S, C and G stay frozen.

Both phases train on the cached pairs (x, S(x)) of `training.sketch_cache`, minimise the paper's
L_sim (`training.losses`), and share one loop: checkpoints every `snap_every` steps with exact
resume, metrics lines, sample grids, a graceful stop on SIGINT/SIGTERM, and torchrun (gradients
averaged over ranks, every rank on its own batches).

Bundle files written (BUNDLE = --bundle):
    encoder.safetensors / .json, refiner.safetensors / .json   the trained networks (at the end)
    encoder_checkpoint.*, refiner_checkpoint.*                  training state (resume)
    encoder_metrics.jsonl, refiner_metrics.jsonl                mean losses per `log_every` steps
    samples/encoder-STEP.png, samples/refiner-STEP.png          sketch | output(s) | real rows
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from generation.checkpoints import checkpoint_exists, load_checkpoint, save_checkpoint
from generation.device import Distributed, init_distributed, pick_device
from generation.encoder import LatentDiscriminator, SketchEncoder
from generation.errors import InputError
from generation.freehand import MAX_STRENGTH, freehand_sketch
from generation.images import image_grid, save_png
from generation.moco import FeatureNetwork
from generation.refiner import Refiner, accumulate
from generation.registry import load_network, network_config, network_exists, network_training, save_network
from generation.resnet import load_backbone_weights
from generation.sketch import sketch_to_tensor
from generation.stylegan2 import Generator
from training.loop import StopFlag, TrainResult, append_metrics, autocast, broadcast_module, optimise
from training.losses import SimilarityLoss, SimilarityWeights, d_logistic_loss, d_r1_loss, g_nonsaturating_loss, info_nce_loss
from training.sketch_cache import SketchCache, sketch_cache


@dataclass
class PhaseOptions:
    """Options of one phase; the defaults are the paper's (via e4e and HyperStyle)."""

    steps: int = 3000
    batch: int = 8  # global (summed over torchrun processes)
    lr: float = 1e-4  # e4e and HyperStyle use Ranger at 1e-4; we use Adam (Ranger is not in torch)
    l2: float = 1.0
    perceptual: float = 0.8
    cosine: float = 0.5
    perceptual_backend: str = "domain"  # "domain" (LPIPS-C) | "lpips" (needs the lpips extra + trunk)
    # Phase 1 only: the latent discriminator.
    adversarial: float = 0.1
    d_lr: float = 2e-5  # e4e's w-discriminator learning rate
    r1_gamma: float = 10.0
    r1_interval: int = 16  # lazy R1, as in e4e
    freehand: float = 0.0  # probability of training on a simulated free-hand sketch (off: the paper)
    freehand_strength: float = 1.0  # free-hand strengths are drawn uniformly from [0, this] (2: from memory)
    # Phase 1 only, not in the paper: InfoNCE between E's codes (minus G's mean w) of two free-hand
    # versions of each sketch, so that E's code can serve as a retrieval key for sloppy drawings.
    contrastive: float = 0.0
    contrastive_temperature: float = 0.1
    # Free-hand drawings per image drawn once before training (0: a fresh drawing every time). The
    # simulator costs about 20 ms a drawing on one CPU core, as much as a training step's networks.
    freehand_pool: int = 0
    # Phase 2 only.
    refine_steps: int = 3  # T
    init_from_c: bool = True  # initialise E's / H's trunk from C where the shapes allow
    bf16: bool = False  # bfloat16 autocast of the forward passes on CUDA (weights and optimisers stay float32)
    log_every: int = 25
    snap_every: int = 500
    seed: int = 0

    def validate(self, world_size: int) -> None:
        if self.batch % world_size:
            raise InputError(f"--batch {self.batch} must be a multiple of the {world_size} torchrun processes")
        if self.steps < 1 or self.batch < 1 or self.refine_steps < 1:
            raise InputError("steps, batch and refinement steps must be positive")
        if not 0 <= self.freehand <= 1:
            raise InputError(f"--freehand {self.freehand}: a probability between 0 and 1")
        if not 0 <= self.freehand_strength <= MAX_STRENGTH:
            raise InputError(f"--freehand-strength {self.freehand_strength}: between 0 and {MAX_STRENGTH:g}")
        if self.freehand_pool < 0:
            raise InputError("--freehand-pool must be >= 0")
        if self.contrastive < 0 or self.contrastive_temperature <= 0:
            raise InputError("--contrastive must be >= 0 and its temperature > 0")

    @property
    def weights(self) -> SimilarityWeights:
        return SimilarityWeights(self.l2, self.perceptual, self.cosine)


PHASE_PRESETS = {  # per preset, the options that differ from PhaseOptions' defaults
    "tiny": {"encoder": dict(steps=60, batch=4, lr=1e-3, d_lr=1e-4, log_every=5, snap_every=30),
             "refiner": dict(steps=40, batch=4, lr=1e-3, log_every=5, snap_every=20)},
    # Sized to about 20 minutes (E) and 30 minutes (H) on 2 CPU cores (measured times in docs/RESULTS.md);
    # a larger learning rate than the paper's since the runs are 100x shorter.
    "cpu": {"encoder": dict(steps=2000, batch=8, lr=3e-4, d_lr=5e-5),
            "refiner": dict(steps=1000, batch=8, lr=2e-4)},
    "paper": {"encoder": dict(), "refiner": dict()},
    # One data-centre GPU, about 10 minutes for the whole chain at 256 px (training.train_all); the
    # step counts are estimates of throughput, not measurements (docs/TRAINING.md).
    "gpu": {"encoder": dict(steps=2000, batch=32, lr=3e-4, d_lr=5e-5, bf16=True, snap_every=1000),  # 64k sketches, 4x cpu's; ~1.5 min
            "refiner": dict(steps=1000, batch=16, lr=2e-4, bf16=True, snap_every=500)},  # 16k pairs x T=3, 2x cpu's; ~1.5 min
}


def phase_options(preset: str, phase: str, **overrides) -> PhaseOptions:
    if preset not in PHASE_PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PHASE_PRESETS)}")
    values = {**PHASE_PRESETS[preset][phase], **{k: v for k, v in overrides.items() if v is not None}}
    return replace(PhaseOptions(), **values)


class PhaseTrainer:
    """What both phases share: data sampling, L_sim, optimisation, checkpoints and samples."""

    name: str  # "encoder" | "refiner"

    def __init__(self, G: Generator, C: FeatureNetwork, cache: SketchCache, options: PhaseOptions,
                 device: torch.device, dist: Distributed):
        options.validate(dist.world_size)
        if cache.resolution != G.config.resolution:
            raise InputError(f"sketch cache at {cache.resolution} px but G makes {G.config.resolution} px images")
        self.G, self.C, self.cache, self.options, self.device, self.dist = G.to(device), C.to(device), cache, options, device, dist
        self.similarity = SimilarityLoss(self.C, options.weights, options.perceptual_backend)
        self.batch = options.batch // dist.world_size
        # The pairs live on the device once, as uint8: a batch is an index, not a copy from the host.
        self.images = torch.from_numpy(cache.images).to(device).permute(0, 3, 1, 2)
        self.sketches = torch.from_numpy(cache.sketches).to(device)
        self.step_count = 0
        self.pool = self.draw_pool() if options.freehand_pool and (options.freehand or options.contrastive) else None
        self.reseed()

    def draw_pool(self) -> np.ndarray:
        """(N, K, R, R) uint8: K free-hand drawings of each training mask, a function of the seed only."""
        rng = np.random.default_rng(self.options.seed + 7919)
        pool = np.empty((len(self.cache), self.options.freehand_pool, *self.cache.sketches.shape[1:]), np.uint8)
        for i, mask in enumerate(self.cache.label_maps):
            for k in range(pool.shape[1]):
                pool[i, k] = freehand_sketch(mask, float(rng.uniform(0, self.options.freehand_strength)), rng)
        return pool

    def reseed(self) -> None:
        """Randomness as a function of (seed, step, rank): a resumed run repeats the uninterrupted one."""
        seed = (self.options.seed * 1_000_003 + self.step_count) * 1009 + self.dist.rank
        self.rng = torch.Generator().manual_seed(seed)
        self.np_rng = np.random.default_rng(seed)
        torch.manual_seed(seed + 1)

    def batch_of(self, indices: Tensor, freehand: float = 0.0) -> tuple[Tensor, Tensor]:
        """(sketches (B, 1, R, R) ink 1 / paper 0, images (B, 3, R, R) in [-1, 1]) on the device.

        Each sketch is replaced, with probability `freehand`, by a simulated free-hand drawing of its
        mask at a strength drawn uniformly from [0, options.freehand_strength] (from the pool, if any)."""
        sketches = self.sketches[indices.to(self.device)]
        if freehand:
            for row, i in enumerate(indices.tolist()):
                if self.np_rng.random() < freehand:
                    if self.pool is not None:
                        drawn = self.pool[i, self.np_rng.integers(self.pool.shape[1])]
                    else:
                        strength = float(self.np_rng.uniform(0, self.options.freehand_strength))
                        drawn = freehand_sketch(self.cache.label_maps[i], strength, self.np_rng)
                    sketches[row] = torch.from_numpy(drawn).to(self.device)
        images = self.images[indices.to(self.device)].float() / 127.5 - 1
        return sketch_to_tensor(sketches), images

    def sample_indices(self) -> Tensor:
        return torch.randint(len(self.cache), (self.batch,), generator=self.rng)

    # -- subclasses
    def step(self) -> dict[str, float]:
        raise NotImplementedError

    def states(self) -> dict[str, dict]:
        raise NotImplementedError

    def load_states(self, states: dict[str, dict]) -> None:
        raise NotImplementedError

    def outputs(self, sketches: Tensor) -> list[Tensor]:
        """Images to show for a sample grid, one (N, 3, R, R) tensor per column group."""
        raise NotImplementedError

    # -- checkpoints and samples
    def save(self, bundle: Path) -> None:
        meta = {"options": asdict(self.options), "step": self.step_count, "world_size": self.dist.world_size}
        save_checkpoint(bundle, f"{self.name}_checkpoint", self.states(), meta)

    def continue_from(self, bundle: Path) -> int:
        """Start from the bundle's exported network (E or H) and its recorded step count; the
        optimiser (and E's latent discriminator, which is not exported) start afresh. Returns the step."""
        network = self.network()
        exported = load_network(self.name, bundle, self.device)
        if exported.config != network.config:
            raise InputError(f"{bundle}: its {self.name} was trained with another configuration; pass the same --preset to continue it")
        network.load_state_dict(exported.state_dict())
        broadcast_module(network, self.dist)
        self.step_count = int(network_training(self.name, bundle).get("steps", 0))
        self.reseed()
        return self.step_count

    def network(self) -> torch.nn.Module:
        """The network this phase trains."""
        raise NotImplementedError

    def load(self, bundle: Path) -> None:
        states, meta = load_checkpoint(bundle, f"{self.name}_checkpoint")
        self.load_states(states)
        self.step_count = int(meta["step"])
        self.reseed()

    @torch.no_grad()
    def sample_grid(self, count: int = 8) -> np.ndarray:
        """Rows: sketch | output image(s) | real image, for the first `count` training pairs."""
        indices = torch.arange(min(count, len(self.cache)))
        sketches, reals = self.batch_of(indices)
        columns = [sketches.expand(-1, 3, -1, -1) * -2 + 1, *self.outputs(sketches), reals]  # sketch drawn black on white
        return image_grid(torch.stack(columns, dim=1).flatten(0, 1).cpu(), len(columns))


class EncoderTrainer(PhaseTrainer):
    name = "encoder"

    def __init__(self, G, C, cache, options, device, dist, preset: str):
        super().__init__(G, C, cache, options, device, dist)
        torch.manual_seed(options.seed)  # identical initial weights on every rank
        config = network_config("encoder", preset, resolution=G.config.resolution, w_dim=G.config.w_dim)
        self.E = SketchEncoder(config, G.w_avg).to(device).train()
        self.init_loaded = load_backbone_weights(self.E.backbone, C.backbone_state()) if options.init_from_c else []
        self.D = LatentDiscriminator(config.w_dim, config.discriminator_layers).to(device).train()
        for module in (self.E, self.D):
            broadcast_module(module, dist)
        self.E_opt = torch.optim.Adam(self.E.parameters(), lr=options.lr)
        self.D_opt = torch.optim.Adam(self.D.parameters(), lr=options.d_lr)

    def step(self) -> dict[str, float]:
        opts, stats = self.options, {}
        indices = self.sample_indices()
        sketches, reals = self.batch_of(indices, opts.freehand)

        if opts.adversarial > 0:  # D: codes from mapping(z) are real, E's codes are fake
            self.D.requires_grad_(True)
            with torch.no_grad(), autocast(self.device, opts.bf16):
                real_w = self.G.mapping(torch.randn(self.batch, self.G.config.z_dim, device=self.device)).float()
                fake_w = self.E(sketches).float()
            loss = d_logistic_loss(self.D(real_w), self.D(fake_w))
            optimise(self.D, self.D_opt, loss, self.dist)
            stats["d_loss"] = loss.item()
            if self.step_count % opts.r1_interval == 0:
                real_w = real_w.detach().requires_grad_(True)
                r1 = d_r1_loss(self.D(real_w), real_w)
                optimise(self.D, self.D_opt, r1 * (opts.r1_gamma / 2 * opts.r1_interval), self.dist)
                stats["r1"] = r1.item()
            self.D.requires_grad_(False)

        with autocast(self.device, opts.bf16):
            w = self.E(sketches).float()
            terms = {k: v.float() for k, v in self.similarity(reals, self.G(w, fused_modconv=False)).items()}
        loss = terms["total"]
        if opts.adversarial > 0:
            adversarial = g_nonsaturating_loss(self.D(w))
            loss = loss + opts.adversarial * adversarial
            stats["adversarial"] = adversarial.item()
        if opts.contrastive > 0:  # a second, always free-hand, drawing of the same masks
            others, _ = self.batch_of(indices, freehand=1.0)
            with autocast(self.device, opts.bf16):
                w_other = self.E(others).float()
            contrastive = info_nce_loss(w - self.G.w_avg, w_other - self.G.w_avg, opts.contrastive_temperature)
            loss = loss + opts.contrastive * contrastive
            stats["contrastive"] = contrastive.item()
        optimise(self.E, self.E_opt, loss, self.dist)
        stats.update({f"sim_{k}": v.item() for k, v in terms.items()}, loss=loss.item())
        self.step_count += 1
        return stats

    def network(self):
        return self.E

    def states(self):
        return {"E": self.E.state_dict(), "D": self.D.state_dict(), "E_opt": self.E_opt.state_dict(), "D_opt": self.D_opt.state_dict()}

    def load_states(self, states):
        self.E.load_state_dict(states["E"])
        self.D.load_state_dict(states["D"])
        self.E_opt.load_state_dict(states["E_opt"])
        self.D_opt.load_state_dict(states["D_opt"])

    def outputs(self, sketches):
        self.E.eval()
        try:
            return [self.G(self.E(sketches))]
        finally:
            self.E.train()

    @torch.no_grad()
    def set_code_mean(self, batch_size: int = 64) -> None:
        """E's mean code over the (synthesized, not augmented) training sketches."""
        self.E.eval()
        total = torch.zeros_like(self.E.code_mean)
        for start in range(0, len(self.cache), batch_size):
            sketches, _ = self.batch_of(torch.arange(start, min(start + batch_size, len(self.cache))))
            total += self.E(sketches).sum(dim=0)
        self.E.code_mean.copy_(total / len(self.cache))
        self.E.train()

    def finish(self, bundle: Path, summary: dict) -> None:
        broadcast_module(self.E, self.dist)  # BN running statistics differ per rank; ship rank 0's
        self.set_code_mean()
        if self.dist.is_main:
            save_network("encoder", self.E, bundle, {"training": summary})


class RefinerTrainer(PhaseTrainer):
    name = "refiner"

    def __init__(self, G, C, cache, options, device, dist, preset: str, E: SketchEncoder, layers: list[str] | None = None):
        super().__init__(G, C, cache, options, device, dist)
        torch.manual_seed(options.seed)
        self.E = E.to(device).eval().requires_grad_(False)
        config = replace(network_config("refiner", preset, G=G, layers=layers), steps=options.refine_steps)
        self.H = Refiner(config).to(device).train()
        self.init_loaded = load_backbone_weights(self.H.trunk, C.backbone_state()) if options.init_from_c else []
        broadcast_module(self.H, dist)
        self.H_opt = torch.optim.Adam(self.H.parameters(), lr=options.lr)

    def step(self) -> dict[str, float]:
        """T refinement steps on one batch; L_sim at every step, as in the paper.

        As in HyperStyle, each step sees the previous image and offsets detached, so step t's loss
        trains H's step-t prediction; the gradients of all T losses are summed into one update.
        """
        sketches, reals = self.batch_of(self.sample_indices(), self.options.freehand)
        with torch.no_grad(), autocast(self.device, self.options.bf16):
            w = self.E(sketches).float()
            image = self.G(w)
            reference = self.similarity.reference(reals)
            stats = {"sim_step0": self.similarity(reals, image, reference)["total"].item()}
        self.H_opt.zero_grad(set_to_none=True)
        total = None
        for t in range(1, self.options.refine_steps + 1):
            with autocast(self.device, self.options.bf16):
                offsets = accumulate(total, self.H(sketches, image))
                image = self.G(w, weight_deltas=offsets)
                terms = self.similarity(reals, image, reference)
            terms["total"].float().backward()
            stats[f"sim_step{t}"] = terms["total"].item()
            total = {name: delta.detach() for name, delta in offsets.items()}
            image = image.detach()
        stats["loss"] = sum(stats[f"sim_step{t}"] for t in range(1, self.options.refine_steps + 1))
        optimise(self.H, self.H_opt, None, self.dist)  # the T backward passes above accumulated the gradients
        self.step_count += 1
        return stats

    def network(self):
        return self.H

    def states(self):
        return {"H": self.H.state_dict(), "H_opt": self.H_opt.state_dict()}

    def load_states(self, states):
        self.H.load_state_dict(states["H"])
        self.H_opt.load_state_dict(states["H_opt"])

    def outputs(self, sketches):
        from generation.refiner import refine

        self.H.eval()
        try:
            return refine(self.G, self.H, sketches, self.E(sketches), self.options.refine_steps)
        finally:
            self.H.train()

    def finish(self, bundle: Path, summary: dict) -> None:
        broadcast_module(self.H, self.dist)
        if self.dist.is_main:
            save_network("refiner", self.H, bundle, {"training": summary})


def train_phase(phase: str, data: str | Path, bundle: str | Path, preset: str = "cpu", options: PhaseOptions | None = None,
                split: str | None = "train", device: str = "auto", resume: bool = False, layers: list[str] | None = None,
                init_from: str | Path | None = None,
                on_step: Callable[[int, dict[str, float]], None] | None = None,
                on_cache: Callable[[int, int], None] | None = None,
                log: Callable[[str], None] = print) -> TrainResult:
    """Train E (`phase="encoder"`) or H (`"refiner"`) into `bundle`, which must hold C, S and G
    (and E for the refiner). `init_from`: a bundle whose exported network of this phase the run
    continues, counting its steps (`options.steps` is then the total); its C, S and G must be the
    ones in `bundle`. See the module docstring for what is written. The result's metrics
    hold the mean metrics of the first and the last logged window ("first_window", "last_window")."""
    if phase not in ("encoder", "refiner"):
        raise InputError(f"unknown phase {phase!r}")
    bundle = Path(bundle)
    options = options or phase_options(preset, phase)
    device_ = pick_device(device)
    dist = init_distributed(device_)
    if device_.type == "cuda" and dist.enabled:
        device_ = torch.device("cuda", dist.local_rank)
    for needed, what in (("moco", "C (`train moco`)"), ("synthesizer", "S (`train synthesizer`)"), ("generator", "G (`train generator`)")):
        if not network_exists(bundle, needed):
            raise InputError(f"{bundle}: has no {needed}.safetensors; train {what} into this bundle first")
    if phase == "refiner" and not network_exists(bundle, "encoder"):
        raise InputError(f"{bundle}: has no encoder.safetensors; train E first (`train encoder`)")
    if init_from is not None and not network_exists(init_from, phase):
        raise InputError(f"{init_from}: has no {phase}.safetensors to continue; pass a bundle with a trained {phase}")
    if checkpoint_exists(bundle, f"{phase}_checkpoint") and not resume:
        raise InputError(f"{bundle}: already holds a {phase} training checkpoint; pass --resume to continue it")

    G = load_network("generator", bundle, device_)
    C = load_network("moco", bundle, device_)
    if dist.is_main:  # rank 0 synthesizes the cache; the others then read it
        cache = sketch_cache(data, bundle, G.config.resolution, split, device_, on_progress=on_cache)
    dist.barrier()
    if not dist.is_main:
        cache = sketch_cache(data, bundle, G.config.resolution, split, device_)
    if phase == "encoder":
        trainer: PhaseTrainer = EncoderTrainer(G, C, cache, options, device_, dist, preset)
    else:
        trainer = RefinerTrainer(G, C, cache, options, device_, dist, preset, load_network("encoder", bundle, device_), layers)
    if resume and checkpoint_exists(bundle, f"{phase}_checkpoint"):
        trainer.load(bundle)
        if dist.is_main:
            log(f"resumed {phase} training at step {trainer.step_count}")
    elif init_from is not None:
        continued = trainer.continue_from(Path(init_from))
        if continued >= options.steps:
            raise InputError(f"{init_from}: its {phase} already has {continued} steps; pass a larger --steps (the total)")
        if dist.is_main:
            log(f"continuing {phase} of {init_from} at step {continued}")
    if dist.is_main:
        log(f"training {phase} on {len(cache)} sketch/image pairs at {cache.resolution} px, batch {options.batch} over "
            f"{dist.world_size} process(es), device {device_} ({torch.get_num_threads()} threads); "
            f"trunk initialised from C: {len(trainer.init_loaded)} tensors")

    metrics_path = bundle / f"{phase}_metrics.jsonl"
    window: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    start = time.time()
    stopped_early = False
    with StopFlag() as stop:
        while trainer.step_count < options.steps:
            stats = trainer.step()
            for key, value in stats.items():
                window.setdefault(key, []).append(value)
            if dist.is_main and on_step is not None:
                on_step(trainer.step_count, stats)
            stop_now = stop.agreed(dist, device_)
            done = trainer.step_count
            if done % options.log_every == 0 or done == options.steps or stop_now:
                last = {k: round(sum(v) / len(v), 5) for k, v in window.items()}
                first = first or last
                if dist.is_main:
                    append_metrics(metrics_path, {"step": done, "seconds": round(time.time() - start, 1), **last})
                window = {}
            if done % options.snap_every == 0 or done == options.steps or stop_now:
                if dist.is_main:
                    trainer.save(bundle)
                    save_png(trainer.sample_grid(), bundle / "samples" / f"{phase}-{done:06d}.png")
                trainer.reseed()  # a resume from this snapshot repeats the uninterrupted run
            if stop_now:
                stopped_early = True
                break
    seconds = time.time() - start
    if not stopped_early:
        summary = {"steps": trainer.step_count, "seconds": round(seconds, 1), "pairs": len(cache), "data": str(data),
                   "split": split, "preset": preset, "world_size": dist.world_size, "options": asdict(options),
                   "first_window": first, "last_window": last}
        if init_from is not None:
            summary["continued_from"] = str(init_from)
        trainer.finish(bundle, summary)
    dist.barrier()
    return TrainResult(trainer.step_count, seconds, bundle, stopped_early, {"first_window": first, "last_window": last})

