"""`train all`: the whole chain into one bundle, in order, each stage skipped once complete.

    C (MoCo v2)  ->  S (SOLOv2, needs masks)  ->  G (StyleGAN2)  ->  sketch cache (x, S(x))
                 ->  E + latent discriminator (phase 1)  ->  H (phase 2)

A stage is complete when its network file is final (for S: its last epoch is done). An interrupted
run, re-run with the same command, resumes the unfinished stage from its checkpoint. The budgets
per preset are below; `cpu` stages each fit in one session on 2 cores (measured times in
docs/RESULTS.md), `paper` follows the paper (100 epochs of E and H).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from generation.bundle import write_manifest
from generation.dataset import ImageDataset
from generation.errors import InputError
from generation.registry import network_config, network_exists

# Per preset: C steps (None = preset's), S epochs from a budget of images shown, G kimg.
BUDGETS = {
    # tiny: S gets enough steps to outline the phantom's organs, so tests can check retrieval.
    "tiny": dict(moco_steps=4, synthesizer_images=900, synthesizer_size=64, generator_kimg=0.064,
                 synthesizer_options=dict(batch=4, lr=3e-3, warmup_steps=5)),
    "cpu": dict(moco_steps=None, synthesizer_images=40_000, synthesizer_size=128, generator_kimg=120.0, synthesizer_options={}),
    "paper": dict(moco_steps=None, synthesizer_images=400_000, synthesizer_size=256, generator_kimg=6000.0, synthesizer_options={}),
}
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


def train_all(data: str | Path, out: str | Path, preset: str = "cpu", split: str | None = "train", val_split: str | None = "val",
              device: str = "auto", command: str = "", progress: Progress | None = None,
              log: Callable[[str], None] = print) -> list[StageReport]:
    """Train every missing stage of the bundle `out` on `data`; returns what each stage did."""
    from generation.device import pick_device
    from training.sketch_cache import sketch_cache
    from training.train_generator import TrainOptions, train_generator
    from training.train_moco import train_moco
    from training.train_sketch2medi import phase_options, train_phase
    from training.train_synthesizer import SynthesizerTraining, train_synthesizer

    if preset not in BUDGETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(BUDGETS)}")
    budget = BUDGETS[preset]
    out = Path(out)
    dataset = ImageDataset(data, split)
    if not dataset.has_masks and not network_exists(out, "synthesizer"):
        raise InputError(f"{data}: S needs training masks (masks/ folder; see docs/DATA.md), or put a trained synthesizer.safetensors in {out}")
    out.mkdir(parents=True, exist_ok=True)
    report = (lambda stage: (lambda done, total=None: progress(stage, done, total))) if progress else (lambda stage: None)
    reports: list[StageReport] = []

    def run(stage: str, complete: bool, train: Callable[[], str]) -> None:
        if complete:
            reports.append(StageReport(stage, "done before", 0.0, "skipped: already complete"))
            log(f"{stage}: already complete, skipped")
            return
        start = time.time()
        detail = train()
        reports.append(StageReport(stage, "trained", time.time() - start, detail))
        write_manifest(out, data={"path": str(data), "split": split, "images": len(dataset)}, preset=preset,
                       command=command or None, stages={r.stage: r.status for r in reports})
        log(f"{stage}: {detail} ({(time.time() - start) / 60:.1f} min)")

    def train_c() -> str:
        on_step = report("C")
        summary = train_moco(data, out, network_config("moco", preset, steps=budget["moco_steps"]), split=split, device=device,
                             resume=True, on_step=(lambda step, total: on_step(step, total)) if on_step else None, on_note=log)
        return f"{summary['step']} steps"

    epochs = synthesizer_epochs(budget["synthesizer_images"], len(dataset))

    def train_s() -> str:
        on_step = report("S")
        # S starts from C's trunk when the presets give them the same trunk width (cpu, paper).
        shares_trunk = network_config("moco", preset).backbone.width == network_config("synthesizer", preset, num_classes=1).backbone.width
        options = SynthesizerTraining(data=str(data), out=str(out), size=budget["synthesizer_size"], preset=preset, split=split,
                                      val_split=val_split, epochs=epochs, device=device, resume=True,
                                      init_from=str(out) if shares_trunk else None, **budget["synthesizer_options"])
        result = train_synthesizer(options, on_step=(lambda step, total, loss: on_step(step, total)) if on_step else None, log=log)
        return f"{result['epochs']} epochs, best val DICE {result['best_val_dice']}"

    def train_g() -> str:
        on_step = report("G")
        kimg = budget["generator_kimg"]
        result = train_generator(data, out, preset, TrainOptions(kimg=kimg), split=split, device=device, resume=True,
                                 on_step=(lambda done, stats: on_step(done, kimg)) if on_step else None, log=log)
        if result.stopped_early:
            raise InputError(f"G stopped at {result.kimg:.2f} kimg; run the same command again to resume")
        return f"{result.kimg:.2f} kimg"

    resolution = network_config("generator", preset).resolution

    def build_cache() -> str:
        cache = sketch_cache(data, out, resolution, split, pick_device(device), on_progress=report("sketches"))
        return f"{len(cache)} synthesized sketches at {resolution} px"

    def train_phase_stage(phase: str) -> Callable[[], str]:
        def train() -> str:
            on_step = report({"encoder": "E", "refiner": "H"}[phase])
            options = phase_options(preset, phase)
            result = train_phase(phase, data, out, preset, options, split, device, resume=True,
                                 on_step=(lambda step, stats: on_step(step, options.steps)) if on_step else None, log=log)
            if result.stopped_early:
                raise InputError(f"{phase} stopped at step {result.steps}; run the same command again to resume")
            if phase == "encoder":
                return f"{result.steps} steps, L_sim {result.first['sim_total']} (first window) -> {result.last['sim_total']} (last)"
            final = result.last[f"sim_step{options.refine_steps}"]
            return f"{result.steps} steps, last window L_sim {result.last['sim_step0']} (E alone) -> {final} (step {options.refine_steps})"
        return train

    run("C", network_exists(out, "moco"), train_c)
    run("S", _synthesizer_complete(out, epochs), train_s)
    run("G", network_exists(out, "generator"), train_g)
    run("sketches", network_exists(out, "refiner"), build_cache)  # reloads the cache when it is still valid
    run("E", network_exists(out, "encoder"), train_phase_stage("encoder"))
    run("H", network_exists(out, "refiner"), train_phase_stage("refiner"))
    write_manifest(out, data={"path": str(data), "split": split, "images": len(dataset)}, preset=preset)
    return reports
