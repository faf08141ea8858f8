"""The `train` commands of the command line: one per network, and `train all` for the whole chain.

Each is a thin layer over its trainer: parse the options, show a progress bar on the reporting
process, print one summary line of the `TrainResult`. Under torchrun only rank 0 prints.
"""

from __future__ import annotations

from pathlib import Path

import typer

from generation.device import is_main_process, set_threads
from training.console import WholeHelpGroup, finite, literal_printer, progress_bar
from training.loop import TrainResult

train_app = typer.Typer(cls=WholeHelpGroup, no_args_is_help=True, rich_markup_mode=None,
                        help="Train the networks (each writes safetensors + JSON into a bundle folder).")

DEVICE_HELP = "auto (the GPU if there is one) | cpu | cuda | cuda:N"
PRECISION_HELP = ("float32 | bfloat16: S and C on the archive images in bfloat16, on a GPU or a CPU with AVX-512 BF16 or AMX: "
                  "faster indexing, a few of S's masks differ (docs/BENCHMARKS.md, indexing).")
COMPILE_ARCHIVE_HELP = ("Compile S and C with torch.compile for the archive images: faster indexing of large archives, after "
                        "about a minute of compiling the first time (seconds later: the compiled code is cached on disk); a few "
                        "of S's masks differ (docs/BENCHMARKS.md, indexing).")
THREADS_HELP = "CPU threads per process (0 = torch's default; use 1 on a machine shared with other jobs)."
PHASE_HELP = "tiny (tests) | cpu (2 CPU cores) | paper (ResNet-50 E, ResNet-34 H)."


def quiet(message: str) -> None:
    """The log of the processes that do not report (torchrun ranks above 0)."""


def echo_result(result: TrainResult, stopped_at: str, trained: str, network_file: str) -> None:
    """The last line of a training command: where a stopped run resumes, or what a finished one wrote."""
    if result.stopped_early:
        typer.echo(f"stopped at {stopped_at}; checkpoint in {result.out} (continue with --resume)")
    else:
        typer.echo(f"{trained} in {result.seconds / 60:.1f} min; wrote {result.out}/{network_file}")


@train_app.command("moco")
def train_moco_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder (images/ or a plain archive of images)."),
    out: Path = typer.Option(..., "--out", help="Bundle folder for moco.safetensors/.json, checkpoints, metrics."),
    preset: str = typer.Option("cpu", "--preset", help="tiny (tests), cpu (small archive, < 1 h CPU), paper (ResNet-50, 224 px)."),
    size: int = typer.Option(None, "--size", min=16, max=512, help="Training crop size in pixels (default: preset's)."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Epochs (default: preset's)."),
    steps: int = typer.Option(None, "--steps", min=1, help="Optimiser steps; overrides --epochs."),
    batch: int = typer.Option(None, "--batch", min=2, help="Global batch size (summed over torchrun processes)."),
    queue: int = typer.Option(None, "--queue", min=1, help="Queue length K (shrunk to fit small archives)."),
    lr: float = typer.Option(None, "--lr", min=0.0, callback=finite, help="SGD learning rate (cosine-decayed)."),
    split: str = typer.Option(None, "--split", help="Only this split of split.csv (default: train if present, else all)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT/moco_checkpoint if there is one."),
    seed: int = typer.Option(None, "--seed", help="Seed (weights, batches, augmentations)."),
):
    """Train C, the domain feature network (MoCo v2); works under torchrun for DDP."""
    from generation.registry import network_config
    from training.train_moco import default_split, train_moco

    config = network_config("moco", preset, image_size=size, epochs=epochs, steps=steps, batch_size=batch, queue_size=queue,
                            lr=lr, seed=seed)
    split = split if split is not None else default_split(data)
    if not is_main_process():
        train_moco(data, out, config, split=split, device=device, resume=resume)
        return
    with progress_bar() as progress:
        task = progress.add_task(f"moco ({preset})", total=None)

        def on_step(step: int, total: int) -> None:
            progress.update(task, completed=step, total=total)

        result = train_moco(
            data, out, config, split=split, device=device, resume=resume, on_step=on_step, on_note=literal_printer(progress.console)
        )
    metrics = result.metrics
    summary = f"loss {metrics['loss']:.3f}, acc1 {metrics['acc1']:.1f}%" if metrics else "no steps logged"
    typer.echo(f"trained C for {result.steps} steps ({summary}); wrote {out}/moco.safetensors")


@train_app.command("synthesizer")
def train_synthesizer_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder with images/ and masks/ (split.csv optional)."),
    out: Path = typer.Option(..., "--out", help="Bundle folder for synthesizer.safetensors/.json and metrics."),
    size: int = typer.Option(128, "--size", min=32, max=1024, help="Square input side, a multiple of 32."),
    preset: str = typer.Option("cpu", "--preset", help="tiny | cpu (narrow ResNet-18) | paper (ResNet-101)."),
    split: str = typer.Option("train", "--split", help="Training split of split.csv ('all' = every image)."),
    val_split: str = typer.Option("val", "--val-split", help="Split for per-epoch DICE and best-model selection ('none' = off)."),
    epochs: int = typer.Option(60, "--epochs", min=1),
    batch: int = typer.Option(8, "--batch", min=1, help="Images per step and process."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, callback=finite, help="AdamW peak learning rate."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out."),
    init_from: Path | None = typer.Option(None, "--init-from", help="Bundle with a trained C (moco.*) to initialise the backbone."),
    seed: int = typer.Option(0, "--seed"),
):
    """Train the sketch synthesizer S (SOLOv2) on images with class-index masks."""
    from training.train_synthesizer import SynthesizerTraining, train_synthesizer

    options = SynthesizerTraining(
        data=str(data), out=str(out), size=size, preset=preset, split=None if split == "all" else split,
        val_split=None if val_split == "none" else val_split, epochs=epochs, batch=batch, lr=lr, device=device,
        resume=resume, init_from=str(init_from) if init_from else None, seed=seed,
    )
    if not is_main_process():
        train_synthesizer(options, log=quiet)
        return
    with progress_bar() as progress:
        task = progress.add_task("synthesizer", total=None)
        result = train_synthesizer(
            options, on_step=lambda step, total, loss: progress.update(task, completed=step, total=total, description=f"synthesizer loss {loss:.3f}"),
            log=literal_printer(progress.console),
        )
    best = result.metrics["best_val_dice"]
    typer.echo(f"synthesizer: {result.metrics['epochs']} epochs; " + (f"best val DICE {best:.2f}; " if best is not None else "") + f"wrote {out}/synthesizer.safetensors")


@train_app.command("evaluate-synthesizer")
def evaluate_synthesizer_command(
    bundle: Path = typer.Option(..., "--bundle", help="Bundle folder with synthesizer.safetensors/.json."),
    data: Path = typer.Option(..., "--data", help="Dataset folder with images/ and masks/."),
    split: str = typer.Option("test", "--split", help="Split of split.csv to evaluate ('all' = every image)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """Mean DICE (x100, overall and per class) of the synthesizer's masks on a dataset split."""
    import json

    from training.train_synthesizer import evaluate_synthesizer

    typer.echo(json.dumps(evaluate_synthesizer(bundle, data, None if split == "all" else split, device), indent=1))


@train_app.command("generator")
def train_generator_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder (images/ or a plain archive of images)."),
    out: Path = typer.Option(..., "--out", help="Bundle folder for generator.safetensors/.json, checkpoint, samples/."),
    preset: str = typer.Option("cpu", "--preset", help="tiny (tests, 32 px) | cpu (64 px, 2 CPU cores) | paper (256 px, config-f)."),
    kimg: float = typer.Option(200.0, "--kimg", min=0.001, callback=finite, help="Stop after this many thousand real images shown to D."),
    batch: int = typer.Option(16, "--batch", min=1, help="Global batch size (summed over torchrun processes)."),
    split: str = typer.Option(None, "--split", help="Only this split of split.csv (default: every image)."),
    gamma: float = typer.Option(None, "--gamma", min=0.0, callback=finite, help="R1 weight (default 0.0002 * resolution^2 / batch)."),
    pl_weight: float = typer.Option(2.0, "--pl-weight", min=0.0, callback=finite, help="Path-length regularisation weight (0 = off)."),
    mixing: float = typer.Option(0.9, "--mixing", min=0.0, max=1.0, callback=finite, help="Style-mixing probability (0 = off)."),
    augment: str = typer.Option("color,translation,cutout", "--augment", help="DiffAugment policy ('' = off)."),
    xflip: bool = typer.Option(False, "--xflip/--no-xflip", help="Mirror the training images left-right at random."),
    snap_kimg: float = typer.Option(4.0, "--snap-kimg", min=0.001, callback=finite, help="Sample grid + checkpoint every this many kimg."),
    fd_bundle: Path = typer.Option(None, "--fd-bundle", help="Bundle with C (moco.*) for FD_C at snapshots (default: --out)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the checkpoint in --out."),
    init_from: Path = typer.Option(None, "--init-from", help="Bundle whose exported G (and D) to continue training; "
                                   "--kimg is then the total, counting its kimg."),
    seed: int = typer.Option(0, "--seed"),
):
    """Train the StyleGAN2 generator G; works under torchrun for DDP."""
    from training.train_generator import TrainOptions, train_generator

    set_threads(threads)
    options = TrainOptions(kimg=kimg, batch=batch, gamma=gamma, pl_weight=pl_weight, mixing=mixing,
                           augment=augment, xflip=xflip, snap_kimg=snap_kimg, seed=seed)
    run = dict(data=data, out=out, preset=preset, options=options, split=split, device=device, resume=resume, fd_bundle=fd_bundle,
               init_from=init_from)
    if not is_main_process():
        train_generator(**run, log=quiet)
        return
    with progress_bar() as progress:
        task = progress.add_task(f"G ({preset})", total=round(kimg * 1000))  # counted in images

        def on_step(done_kimg: float, stats: dict[str, float]) -> None:
            losses = f"G {stats['g_loss']:.3f} D {stats['d_loss']:.3f}"
            progress.update(task, completed=round(min(done_kimg, kimg) * 1000), description=f"G {done_kimg:.2f} kimg, {losses}")

        result = train_generator(**run, on_step=on_step, log=literal_printer(progress.console))
    done = result.metrics["kimg"]
    echo_result(result, f"{done:.2f} kimg", f"trained G to {done:.2f} kimg", "generator.safetensors")


def _train_phase_command(phase: str, data: Path, bundle: Path, preset: str, steps: int | None, batch: int | None,
                         lr: float | None, split: str | None, device: str, threads: int, resume: bool, init_from: Path | None = None,
                         **extra) -> None:
    from training.train_sketch2medi import phase_options, train_phase

    set_threads(threads)
    options = phase_options(preset, phase, steps=steps, batch=batch, lr=lr, **extra)
    run = dict(data=data, bundle=bundle, preset=preset, options=options, split=split, device=device, resume=resume, init_from=init_from)
    if not is_main_process():
        train_phase(phase, **run, log=quiet)
        return
    with progress_bar() as progress:
        cache_task = progress.add_task("sketch cache", total=None, visible=False)
        task = progress.add_task(f"{phase} ({preset})", total=options.steps)

        def on_cache(done: int, total: int) -> None:
            progress.update(cache_task, completed=done, total=total, visible=True)

        def on_step(step: int, stats: dict[str, float]) -> None:
            progress.update(task, completed=step, description=f"{phase} loss {stats['loss']:.3f}")

        result = train_phase(phase, **run, on_step=on_step, on_cache=on_cache, log=literal_printer(progress.console))
    echo_result(result, f"step {result.steps}", f"trained {phase} for {result.steps} steps", f"{phase}.safetensors")


# Shared by E's and H's trainers: both learn from simulated free-hand sketches the same way.
FREEHAND_OPTION = typer.Option(None, "--freehand", min=0.0, max=1.0, callback=finite,
                               help="Probability of a simulated free-hand sketch per pair (default 0, as in the paper).")
FREEHAND_STRENGTH_OPTION = typer.Option(None, "--freehand-strength", min=0.0, max=2.0, callback=finite,
                                        help="Largest free-hand strength drawn (default 1; 2 adds drawing from memory).")
FREEHAND_POOL_OPTION = typer.Option(None, "--freehand-pool", min=0,
                                    help="Free-hand drawings per image drawn once before training (default 0: fresh ones every step; faster on CPU).")


@train_app.command("encoder")
def train_encoder_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder (the images G was trained on)."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle with C, S and G; E is written into it."),
    preset: str = typer.Option("cpu", "--preset", help=PHASE_HELP),
    steps: int = typer.Option(None, "--steps", min=1, help="Training steps (default: the preset's)."),
    batch: int = typer.Option(None, "--batch", min=1, help="Global batch size."),
    lr: float = typer.Option(None, "--lr", min=0.0, callback=finite, help="E's learning rate."),
    freehand: float = FREEHAND_OPTION,
    freehand_strength: float = FREEHAND_STRENGTH_OPTION,
    contrastive: float = typer.Option(None, "--contrastive", min=0.0, callback=finite,
                                      help="Weight of InfoNCE between E's codes of two free-hand drawings of one image (default 0, as in the paper)."),
    freehand_pool: int = FREEHAND_POOL_OPTION,
    adversarial: float = typer.Option(None, "--adversarial", min=0.0, callback=finite, help="Weight of the latent discriminator's loss (paper: 0.1)."),
    split: str = typer.Option("train", "--split", help="Split of split.csv to train on."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the encoder checkpoint in --bundle."),
    init_from: Path = typer.Option(None, "--init-from", help="Bundle whose exported E to continue training (its latent discriminator "
                                   "and optimiser start afresh); --steps is then the total, counting its steps."),
):
    """Phase 1: train the sketch encoder E with the latent discriminator; works under torchrun."""
    _train_phase_command("encoder", data, bundle, preset, steps, batch, lr, split, device, threads, resume, init_from,
                         freehand=freehand, freehand_strength=freehand_strength, freehand_pool=freehand_pool,
                         contrastive=contrastive, adversarial=adversarial)


@train_app.command("refiner")
def train_refiner_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder (the images G was trained on)."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle with C, S, G and E; H is written into it."),
    preset: str = typer.Option("cpu", "--preset", help=PHASE_HELP),
    steps: int = typer.Option(None, "--steps", min=1, help="Training steps (default: the preset's)."),
    batch: int = typer.Option(None, "--batch", min=1, help="Global batch size."),
    lr: float = typer.Option(None, "--lr", min=0.0, callback=finite, help="H's learning rate."),
    refine_steps: int = typer.Option(None, "--refine-steps", min=1, help="Refinement steps T (paper: 3)."),
    freehand: float = FREEHAND_OPTION,
    freehand_strength: float = FREEHAND_STRENGTH_OPTION,
    freehand_pool: int = FREEHAND_POOL_OPTION,
    split: str = typer.Option("train", "--split", help="Split of split.csv to train on."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the refiner checkpoint in --bundle."),
    init_from: Path = typer.Option(None, "--init-from", help="Bundle whose exported H to continue training (its optimiser starts "
                                   "afresh); --steps is then the total, counting its steps."),
):
    """Phase 2: train the refiner H with E, G, S frozen; works under torchrun."""
    _train_phase_command("refiner", data, bundle, preset, steps, batch, lr, split, device, threads, resume, init_from,
                         refine_steps=refine_steps, freehand=freehand, freehand_strength=freehand_strength, freehand_pool=freehand_pool)


@train_app.command("all")
def train_all_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder with images/ and masks/ (see docs/DATA.md)."),
    out: Path = typer.Option(..., "--out", help="Bundle folder; an existing one is completed where it stopped."),
    preset: str = typer.Option("cpu", "--preset", help="tiny (tests) | cpu (about 4 hours on 2 CPU cores, G the longest) | paper (256 px) "
                               "| gpu (256 px, sized for about 10 minutes on one data-centre GPU; S alone took 7.5 minutes on an H200: docs/TRAINING.md)."),
    split: str = typer.Option("train", "--split", help="Split to train on (the val split, if any, picks S's best epoch)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads (0 = torch's default)."),
):
    """Train the whole chain C, S, G, sketch cache, E, H into one bundle; re-run to resume."""
    import sys

    from training.train_all import STAGES, train_all

    set_threads(threads)
    with progress_bar() as progress:
        tasks = {stage: progress.add_task(stage, total=None, visible=False) for stage in STAGES}

        def on_progress(stage: str, done: float, total: float | None) -> None:
            progress.update(tasks[stage], completed=done, total=total, visible=True)

        reports = train_all(data, out, preset, split=split, device=device, command=" ".join(["sketch2medi", *sys.argv[1:]]),
                            progress=on_progress, log=literal_printer(progress.console))
    for report in reports:
        typer.echo(f"{report.stage:>8}  {report.status:<11}  {report.seconds / 60:6.1f} min  {report.detail}")
    typer.echo(f"bundle ready: {out} (bundle.json lists its networks and training)")


@train_app.command("domain")
def train_domain_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder with masks (the archive's anatomy)."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle with G; domain.safetensors is written into it."),
    preset: str = typer.Option("cpu", "--preset", help="tiny (tests) | cpu (about 55 minutes on one thread) | paper (256 px)."),
    steps: int = typer.Option(None, "--steps", min=1, help="Training steps of each tower (default: the preset's)."),
    members: int = typer.Option(None, "--members", min=1, help="Towers whose logits are averaged, each of its own seed (default: the preset's, 3 for cpu)."),
    negatives: str = typer.Option("phantom", "--negatives", help="The other anatomy drawn as out of domain besides scribbles: phantom "
                                  "(generated phantoms), a dataset folder with masks, or none (scribbles alone; for a phantom archive)."),
    negative_seed: int = typer.Option(None, "--negative-seed", min=0, help="Seed of the out-of-domain drawings (default 5)."),
    seed: int = typer.Option(None, "--seed", min=0, help="Seed of the first tower; tower k has seed + k (default 0)."),
    split: str = typer.Option("train", "--split", help="Split of split.csv whose masks are drawn."),
    threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP),
):
    """Train the sketch-domain classifier that lets a search say "no close match" for a sketch of
    another anatomy or a scribble; fit the calibration again afterwards (`python -m retrieval.calibrate fit`)."""
    import sys

    from generation.registry import network_config
    from training.train_domain import domain_options, train_domain

    set_threads(threads)
    options = domain_options(preset, steps=steps, negative_seed=negative_seed, negatives=negatives, seed=seed)
    with progress_bar() as progress:
        towers = members or network_config("domain", preset).members
        task = progress.add_task(f"domain ({preset})", total=options.steps * towers)
        result = train_domain(data, bundle, preset, options, split, command=" ".join(["sketch2medi", *sys.argv[1:]]),
                              on_step=lambda step, loss: progress.update(task, completed=step, description=f"domain loss {loss:.3f}"),
                              log=literal_printer(progress.console), members=towers)
    echo_result(result, f"step {result.steps}", f"trained the sketch-domain classifier for {result.steps} steps", "domain.safetensors")


@train_app.command("pix2pix")
def train_pix2pix_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder (the images G was trained on)."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle with S and G; its sketch cache gives the pairs; pix2pix is written into it."),
    preset: str = typer.Option("cpu", "--preset", help="tiny (tests) | cpu (64 px) | paper (U-Net-256)."),
    steps: int = typer.Option(None, "--steps", min=1, help="Training steps (default 3000)."),
    batch: int = typer.Option(None, "--batch", min=1, help="Global batch size (default 16)."),
    split: str = typer.Option("train", "--split", help="Split of split.csv to train on."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads (0 = torch's default)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the pix2pix checkpoint in --bundle."),
):
    """Train the pix2pix baseline on the same (synthesized sketch, image) pairs as E and H."""
    from generation.device import pick_device
    from generation.registry import load_network
    from training.sketch_cache import sketch_cache
    from training.train_pix2pix import Pix2PixOptions, train_pix2pix

    set_threads(threads)
    resolution = load_network("generator", bundle).config.resolution  # pairs at G's resolution: a like-for-like baseline
    cache = sketch_cache(data, bundle, resolution, split, pick_device(device))
    options = Pix2PixOptions(**{k: v for k, v in dict(steps=steps, batch=batch).items() if v is not None})
    with progress_bar() as progress:
        task = progress.add_task(f"pix2pix ({preset})", total=options.steps)
        result = train_pix2pix(cache.images, cache.sketches, bundle, preset, options, resume=resume, device=device,
                               on_step=lambda step, stats: progress.update(task, completed=step), log=literal_printer(progress.console))
    echo_result(result, f"step {result.steps}", f"trained pix2pix for {result.steps} steps", "pix2pix.safetensors")


UNPAIRED_PRESET_HELP = "tiny (tests) | cpu (G's resolution, sized for 2 CPU cores) | paper (256 px, the reference networks)."


def _train_unpaired_command(name: str, data: Path, bundle: Path, preset: str, steps: int | None, batch: int | None,
                            split: str, device: str, threads: int, resume: bool) -> None:
    """The unpaired baselines' commands: S's sketches and the images of the sketch cache, unpaired."""
    import importlib

    from generation.device import pick_device
    from generation.registry import load_network, network_config
    from training.sketch_cache import sketch_cache

    trainer = importlib.import_module(f"training.train_{name}")
    set_threads(threads)
    # tiny and cpu at G's resolution (a like-for-like baseline, as pix2pix); paper at its own 256 px
    resolution = None if preset == "paper" else load_network("generator", bundle).config.resolution
    config = network_config(name, preset, resolution=resolution)
    cache = sketch_cache(data, bundle, config.resolution, split, pick_device(device))
    options = trainer.OPTIONS(**{k: v for k, v in dict(steps=steps, batch=batch).items() if v is not None})
    run = dict(config=config, options=options, resume=resume, device=device)
    if not is_main_process():
        trainer.train(cache.images, cache.sketches, bundle, **run, log=quiet)
        return
    with progress_bar() as progress:
        task = progress.add_task(f"{name} ({preset})", total=options.steps)

        def on_step(step: int, stats: dict[str, float]) -> None:
            progress.update(task, completed=step, description=f"{name} G {stats['g_loss']:.3f}")

        result = trainer.train(cache.images, cache.sketches, bundle, **run, on_step=on_step, log=literal_printer(progress.console))
    echo_result(result, f"step {result.steps}", f"trained {name} for {result.steps} steps", f"{name}.safetensors")


def _unpaired_command(name: str, title: str, default_steps: int):
    def command(
        data: Path = typer.Option(..., "--data", help="Dataset folder (the images G was trained on)."),
        bundle: Path = typer.Option(..., "--bundle", help=f"Bundle with S and G; its sketch cache gives the sketches and images; {name} is written into it."),
        preset: str = typer.Option("cpu", "--preset", help=UNPAIRED_PRESET_HELP),
        steps: int = typer.Option(None, "--steps", min=1, help=f"Training steps (default {default_steps})."),
        batch: int = typer.Option(None, "--batch", min=1, help="Global batch size (default 4)."),
        split: str = typer.Option("train", "--split", help="Split of split.csv to train on."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
        threads: int = typer.Option(0, "--threads", min=0, help=THREADS_HELP),
        resume: bool = typer.Option(False, "--resume", help=f"Continue the {name} checkpoint in --bundle."),
    ):
        _train_unpaired_command(name, data, bundle, preset, steps, batch, split, device, threads, resume)

    command.__doc__ = f"Train the {title} baseline on S's sketches and the images, unpaired; works under torchrun."
    return command


train_app.command("cyclegan")(_unpaired_command("cyclegan", "CycleGAN", 1500))
train_app.command("unit")(_unpaired_command("unit", "UNIT", 1000))
train_app.command("ugatit")(_unpaired_command("ugatit", "U-GAT-IT", 800))
