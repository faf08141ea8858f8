"""`train all`: the whole chain into one bundle, in order, each stage skipped once complete.

    C (MoCo v2)  ->  S (SOLOv2, needs masks)  ->  G (StyleGAN2)  ->  sketch cache (x, S(x))
                 ->  E + latent discriminator (phase 1)  ->  H (phase 2)

A stage is complete when its network file is final (for S: its last epoch is done). An interrupted
run, re-run with the same command, resumes the unfinished stage from its checkpoint. The budgets
per preset are below; `cpu` takes about 4 hours on 2 CPU cores, G the longest at about 2 hours and
each other stage 10-50 minutes (measured times in docs/RESULTS.md); `paper` follows the paper
(100 epochs of E and H); `gpu` is the whole chain at 256 px sized for about 10 minutes on one
data-centre GPU (H100/H200 class), with the `cpu` preset's networks except a 256 px G.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from generation.bundle import write_manifest
from generation.dataset import ImageDataset
from generation.errors import InputError
from generation.registry import network_config, network_exists

# Per preset: C steps (None = preset's), S epochs from a budget of images shown, G kimg. Optional:
# `networks`, the architecture preset of C, S, E and H (default: the preset itself); `moco_options`,
# `generator_config` (fields replacing that preset's StyleGAN2Config), `generator_options`
# (TrainOptions fields), `encoder_options` / `refiner_options` (PhaseOptions fields over the
# preset's PHASE_PRESETS), `tf32` (TF32 matmuls for the float32 stages on CUDA).
BUDGETS = {
    # tiny: S gets enough steps to outline the phantom's organs, so tests can check retrieval.
    "tiny": dict(moco_steps=4, synthesizer_images=900, synthesizer_size=64, generator_kimg=0.064,
                 synthesizer_options=dict(batch=4, lr=3e-3, warmup_steps=5)),
    "cpu": dict(moco_steps=None, synthesizer_images=40_000, synthesizer_size=128, generator_kimg=120.0, synthesizer_options={}),
    "paper": dict(moco_steps=None, synthesizer_images=400_000, synthesizer_size=256, generator_kimg=6000.0, synthesizer_options={}),
    # Sized from the networks' FLOPs for about 10 minutes on one H100/H200 for the chain at 256 px.
    # Measured on an H200 (docs/TRAINING.md): C 1.7 min, S 7.5 min with the GPU idle, its batches
    # being built on the CPU; bench/gpu_chain.sh logs every stage's wall time to re-size them.
    "gpu": dict(
        networks="cpu",  # C, S, E, H: the cpu preset's ResNet-18s at width 32; wider trunks would not fit 10 min with G at 256 px
        moco_steps=1000,  # ~1.5 min: 256k images (two views each), 6.7x the cpu preset's 38k
        moco_options=dict(batch_size=256, image_size=256),  # the chain's 256 px; a batch that fills the GPU
        synthesizer_images=40_000,  # cpu's budget; estimated ~1.5 min, measured 7.5 on an H200: S builds its targets on the CPU per image
        synthesizer_size=256,  # S sees what the archive holds, at G's resolution
        synthesizer_options=dict(batch=32),  # 4x the cpu preset's 8 images per step
        # G: 256 px, widths 256 (4-32 px), 128, 64, 32 (256 px), 256-d w; ~1/12 of config-f's FLOPs,
        # the only way a 256 px G sees 120 kimg (the cpu preset's budget) in ~4 min.
        generator_config=dict(resolution=256, z_dim=256, w_dim=256, mapping_layers=4, channel_base=8192, channel_max=256),
        generator_kimg=120.0,  # ~4 min at the ~500 images/s expected for these widths in bf16
        generator_options=dict(batch=64, bf16=True, snap_kimg=20.0),  # large batches; 6 snapshots (grid, FD_C, checkpoint)
        tf32=True,  # C and S train in float32: TF32 matmuls and convolutions
    ),
}
BUDGET_KEYS = {"networks", "moco_steps", "moco_options", "synthesizer_images", "synthesizer_size", "synthesizer_options",
               "generator_config", "generator_kimg", "generator_options", "encoder_options", "refiner_options", "tf32"}
STAGES = ("C", "S", "G", "sketches", "E", "H")
Progress = Callable[[str, float, float | None], None]  # (stage, done, total)


@dataclass
class StageReport:
    stage: str
    status: str  # "done before" | "trained" | "stopped"
    seconds: float
    detail: str


def synthesizer_epochs(budget_images: int, count: int) -> int:
    """Epochs that show S about `budget_images` images (at least 2, at most 200)."""
    return max(2, min(200, math.ceil(budget_images / max(count, 1))))


def _synthesizer_complete(bundle: Path, epochs: int) -> bool:
    """S is written while it trains (best epoch so far), so its training state says when it is done;
    an S without a training state was finished elsewhere (e.g. an exported bundle)."""
    state = bundle / "synthesizer_state.json"
    if not network_exists(bundle, "synthesizer"):
        return False
    return not state.is_file() or json.loads(state.read_text()).get("epoch", 0) >= epochs


@dataclass
class _Chain:
    """One `train all` run: the settings every stage shares, and the stages' reports so far."""

    data: str | Path
    out: Path
    preset: str
    split: str | None
    val_split: str | None
    device: str
    command: str
    dataset: ImageDataset
    progress: Progress | None
    log: Callable[[str], None]
    reports: list[StageReport] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)  # budget entries replacing the preset's

    @property
    def budget(self) -> dict:
        return BUDGETS[self.preset] | self.overrides

    @property
    def networks(self) -> str:
        """The architecture preset of C, S, E and H."""
        return self.budget.get("networks", self.preset)

    def generator_config(self):
        """G's StyleGAN2Config: the architecture preset's, with the budget's `generator_config` fields."""
        config = network_config("generator", self.networks)
        return replace(config, **self.budget["generator_config"]) if "generator_config" in self.budget else config

    def on_step(self, stage: str) -> Callable[[float, float | None], None] | None:
        """The progress callback of `stage` (done, total), or None without a progress display."""
        if self.progress is None:
            return None
        return lambda done, total=None: self.progress(stage, done, total)

    def run(self, stage: str, complete: bool, train: Callable[[], str]) -> None:
        if complete:
            self.reports.append(StageReport(stage, "done before", 0.0, "skipped: already complete"))
            self.log(f"{stage}: already complete, skipped")
            return
        start = time.time()
        detail = train()
        self.reports.append(StageReport(stage, "trained", time.time() - start, detail))
        self.write_manifest(command=self.command or None, stages={r.stage: r.status for r in self.reports})
        self.log(f"{stage}: {detail} ({(time.time() - start) / 60:.1f} min)")

    def write_manifest(self, **fields) -> None:
        write_manifest(self.out, data={"path": str(self.data), "split": self.split, "images": len(self.dataset)}, preset=self.preset, **fields)

    def synthesizer_epochs(self) -> int:
        return synthesizer_epochs(self.budget["synthesizer_images"], len(self.dataset))

    def train_c(self) -> str:
        from training.train_moco import train_moco

        on_step = self.on_step("C")
        config = network_config("moco", self.networks, steps=self.budget["moco_steps"], **self.budget.get("moco_options", {}))
        result = train_moco(self.data, self.out, config, split=self.split,
                            device=self.device, resume=True, on_step=(lambda step, total: on_step(step, total)) if on_step else None,
                            on_note=self.log)
        return f"{result.steps} steps"

    def train_s(self) -> str:
        from training.train_synthesizer import SynthesizerTraining, train_synthesizer

        on_step = self.on_step("S")
        # S starts from C's trunk when the presets give them the same trunk width (cpu, paper).
        shares_trunk = network_config("moco", self.networks).backbone.width == network_config("synthesizer", self.networks, num_classes=1).backbone.width
        options = SynthesizerTraining(data=str(self.data), out=str(self.out), size=self.budget["synthesizer_size"], preset=self.networks,
                                      split=self.split, val_split=self.val_split, epochs=self.synthesizer_epochs(), device=self.device,
                                      resume=True, init_from=str(self.out) if shares_trunk else None, **self.budget["synthesizer_options"])
        result = train_synthesizer(options, on_step=(lambda step, total, loss: on_step(step, total)) if on_step else None, log=self.log)
        return f"{result.metrics['epochs']} epochs, best val DICE {result.metrics['best_val_dice']}"

    def train_g(self) -> str:
        from training.train_generator import TrainOptions, train_generator

        on_step = self.on_step("G")
        kimg = self.budget["generator_kimg"]
        options = TrainOptions(kimg=kimg, **self.budget.get("generator_options", {}))
        result = train_generator(self.data, self.out, self.generator_config(), options, split=self.split, device=self.device,
                                 resume=True, on_step=(lambda done, stats: on_step(done, kimg)) if on_step else None, log=self.log)
        if result.stopped_early:
            raise InputError(f"G stopped at {result.metrics['kimg']:.2f} kimg; run the same command again to resume")
        return f"{result.metrics['kimg']:.2f} kimg"

    def build_cache(self) -> str:
        from generation.device import pick_device
        from training.sketch_cache import sketch_cache

        resolution = self.generator_config().resolution
        cache = sketch_cache(self.data, self.out, resolution, self.split, pick_device(self.device), on_progress=self.on_step("sketches"))
        return f"{len(cache)} synthesized sketches at {resolution} px"

    def train_phase(self, phase: str) -> str:
        from training.train_sketch2medi import phase_options, train_phase

        on_step = self.on_step({"encoder": "E", "refiner": "H"}[phase])
        options = phase_options(self.preset, phase, **self.budget.get(f"{phase}_options", {}))
        result = train_phase(phase, self.data, self.out, self.networks, options, self.split, self.device, resume=True,
                             on_step=(lambda step, stats: on_step(step, options.steps)) if on_step else None, log=self.log)
        if result.stopped_early:
            raise InputError(f"{phase} stopped at step {result.steps}; run the same command again to resume")
        first, last = result.metrics["first_window"], result.metrics["last_window"]
        if phase == "encoder":
            return f"{result.steps} steps, L_sim {first['sim_total']} (first window) -> {last['sim_total']} (last)"
        final = last[f"sim_step{options.refine_steps}"]
        return f"{result.steps} steps, last window L_sim {last['sim_step0']} (E alone) -> {final} (step {options.refine_steps})"


def train_all(data: str | Path, out: str | Path, preset: str = "cpu", split: str | None = "train", val_split: str | None = "val",
              device: str = "auto", command: str = "", progress: Progress | None = None,
              log: Callable[[str], None] = print, overrides: dict | None = None) -> list[StageReport]:
    """Train every missing stage of the bundle `out` on `data`; returns what each stage did.
    `overrides`: budget entries replacing the preset's (see BUDGETS), e.g. small sizes in tests."""
    if preset not in BUDGETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(BUDGETS)}")
    unknown = set(overrides or {}) - BUDGET_KEYS
    if unknown:
        raise InputError(f"unknown budget entries {sorted(unknown)}; choose from {', '.join(sorted(BUDGET_KEYS))}")
    out = Path(out)
    dataset = ImageDataset(data, split)
    if not dataset.has_masks and not network_exists(out, "synthesizer"):
        raise InputError(f"{data}: S needs training masks (masks/ folder; see docs/DATA.md), or put a trained synthesizer.safetensors in {out}")
    out.mkdir(parents=True, exist_ok=True)
    chain = _Chain(data, out, preset, split, val_split, device, command, dataset, progress, log, overrides=dict(overrides or {}))
    if chain.budget.get("tf32"):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    chain.run("C", network_exists(out, "moco"), chain.train_c)
    chain.run("S", _synthesizer_complete(out, chain.synthesizer_epochs()), chain.train_s)
    chain.run("G", network_exists(out, "generator"), chain.train_g)
    chain.run("sketches", network_exists(out, "refiner"), chain.build_cache)  # reloads the cache when it is still valid
    chain.run("E", network_exists(out, "encoder"), lambda: chain.train_phase("encoder"))
    chain.run("H", network_exists(out, "refiner"), lambda: chain.train_phase("refiner"))
    chain.write_manifest()
    return chain.reports
