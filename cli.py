"""sketch2medi command line: thin wrappers over library functions (also `python cli.py ...`)."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.core import TyperGroup

from generation.errors import InputError
from retrieval.defaults import DEFAULT_LAMBDA


class UserErrorGroup(TyperGroup):
    """Turns the library's `InputError`s into one line on stderr and exit code 2, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as error:
            typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2)


app = typer.Typer(
    cls=UserErrorGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Sketch-based medical image retrieval with the Sketch2MedI generator.",
)
train_app = typer.Typer(no_args_is_help=True, help="Train the networks (each writes safetensors + JSON into a bundle folder).")
app.add_typer(train_app, name="train")


def progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


PROGRESS_LINE_EVERY_S = 5.0


class ProgressLines:
    """A progress bar's calls as a line every PROGRESS_LINE_EVERY_S seconds, for output that is not a
    terminal (a log), where rich would draw the bar only at the end."""

    def start(self) -> None:
        import time

        self.last = time.monotonic()

    def add_task(self, description: str, total: int | None = None) -> int:
        return 0

    def update(self, task: int, completed: int, total: int | None, description: str) -> None:
        import time

        if time.monotonic() - self.last >= PROGRESS_LINE_EVERY_S:
            typer.echo(f"{description}: {completed}/{total}")
            self.last = time.monotonic()

    def stop(self) -> None:
        pass


@app.command()
def phantom(
    out: Path = typer.Argument(..., help="Folder to write images/, masks/, classes.json, split.csv into."),
    n: int = typer.Option(2000, "--n", min=1, help="Number of images."),
    size: int = typer.Option(256, "--size", min=32, max=512, help="Image side in pixels (32-512)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed; the same seed gives the same images."),
):
    """Generate the procedural pharyngeal phantom dataset (images, exact masks, splits)."""
    from generation.phantom import write_phantom_dataset

    with progress_bar() as progress:
        task = progress.add_task("phantom", total=n)
        write_phantom_dataset(out, n=n, size=size, seed=seed, on_image=lambda: progress.advance(task))
    typer.echo(f"wrote {n} phantom images of {size}x{size} px to {out}")


@app.command()
def freehand(
    source: Path = typer.Argument(..., help="A mask file, a folder of masks, or a dataset folder with masks/."),
    out: Path = typer.Option(..., "--out", help="Folder for the simulated sketches (NAME.png)."),
    strength: float = typer.Option(0.5, "--strength", min=0.0, max=1.0, help="0 = synthesized sketch, 1 = sloppiest."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random hand."),
):
    """Simulate free-hand sketches drawn from segmentation masks."""
    from generation.freehand import freehand_sketches_from_folder

    count = freehand_sketches_from_folder(source, out, strength=strength, seed=seed)
    typer.echo(f"wrote {count} sketches (strength {strength:g}) to {out}")


@app.command()
def normalize(
    sketch: Path = typer.Argument(..., help="A sketch image file (any polarity, mode and size)."),
    out: Path = typer.Option(..., "--out", help="Where to write the canonical sketch PNG."),
    size: int = typer.Option(256, "--size", min=32, max=1024, help="Side of the canonical sketch."),
):
    """Show what the system sees: bring a drawn sketch to the canonical form."""
    from PIL import Image

    from generation.normalize import normalize_sketch_file

    canonical = normalize_sketch_file(sketch, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canonical).save(out)
    typer.echo(f"wrote {out}")


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
    lr: float = typer.Option(None, "--lr", min=0.0, help="SGD learning rate (cosine-decayed)."),
    split: str = typer.Option(None, "--split", help="Only this split of split.csv (default: train if present, else all)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT/moco_checkpoint if there is one."),
    seed: int = typer.Option(None, "--seed", help="Seed (weights, batches, augmentations)."),
):
    """Train C, the domain feature network (MoCo v2); works under torchrun for DDP."""
    import os

    from training.train_moco import configure_moco, default_split, train_moco

    config = configure_moco(preset, size, epochs, steps, batch, queue, lr, seed)
    split = split if split is not None else default_split(data)
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 talks
        train_moco(data, out, config, split=split, device=device, resume=resume)
        return
    with progress_bar() as progress:
        task = progress.add_task(f"moco ({preset})", total=None)

        def on_step(step: int, total: int) -> None:
            progress.update(task, completed=step, total=total)

        result = train_moco(
            data, out, config, split=split, device=device, resume=resume, on_step=on_step, on_note=progress.console.print
        )
    metrics = result["metrics"]
    summary = f"loss {metrics['loss']:.3f}, acc1 {metrics['acc1']:.1f}%" if metrics else "no steps logged"
    typer.echo(f"trained C for {result['step']} steps ({summary}); wrote {out}/moco.safetensors")


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
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="AdamW peak learning rate."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out."),
    init_from: Path | None = typer.Option(None, "--init-from", help="Bundle with a trained C (moco.*) to initialise the backbone."),
    seed: int = typer.Option(0, "--seed"),
):
    """Train the sketch synthesizer S (SOLOv2) on images with class-index masks."""
    import os

    from training.train_synthesizer import SynthesizerTraining, train_synthesizer

    options = SynthesizerTraining(
        data=str(data), out=str(out), size=size, preset=preset, split=None if split == "all" else split,
        val_split=None if val_split == "none" else val_split, epochs=epochs, batch=batch, lr=lr, device=device,
        resume=resume, init_from=str(init_from) if init_from else None, seed=seed,
    )
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 reports
        train_synthesizer(options, log=lambda _: None)
        return
    with progress_bar() as progress:
        task = progress.add_task("synthesizer", total=None)
        report = train_synthesizer(
            options, on_step=lambda step, total, loss: progress.update(task, completed=step, total=total, description=f"synthesizer loss {loss:.3f}"),
            log=progress.console.print,
        )
    best = report["best_val_dice"]
    typer.echo(f"synthesizer: {report['epochs']} epochs; " + (f"best val DICE {best:.2f}; " if best is not None else "") + f"wrote {out}/synthesizer.safetensors")


@train_app.command("evaluate-synthesizer")
def evaluate_synthesizer_command(
    bundle: Path = typer.Option(..., "--bundle", help="Bundle folder with synthesizer.safetensors/.json."),
    data: Path = typer.Option(..., "--data", help="Dataset folder with images/ and masks/."),
    split: str = typer.Option("test", "--split", help="Split of split.csv to evaluate ('all' = every image)."),
    device: str = typer.Option("auto", "--device"),
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
    kimg: float = typer.Option(200.0, "--kimg", min=0.001, help="Stop after this many thousand real images shown to D."),
    batch: int = typer.Option(16, "--batch", min=1, help="Global batch size (summed over torchrun processes)."),
    split: str = typer.Option(None, "--split", help="Only this split of split.csv (default: every image)."),
    gamma: float = typer.Option(None, "--gamma", min=0.0, help="R1 weight (default 0.0002 * resolution^2 / batch)."),
    pl_weight: float = typer.Option(2.0, "--pl-weight", min=0.0, help="Path-length regularisation weight (0 = off)."),
    mixing: float = typer.Option(0.9, "--mixing", min=0.0, max=1.0, help="Style-mixing probability (0 = off)."),
    augment: str = typer.Option("color,translation,cutout", "--augment", help="DiffAugment policy ('' = off)."),
    xflip: bool = typer.Option(False, "--xflip/--no-xflip", help="Mirror the training images left-right at random."),
    snap_kimg: float = typer.Option(4.0, "--snap-kimg", min=0.001, help="Sample grid + checkpoint every this many kimg."),
    fd_bundle: Path = typer.Option(None, "--fd-bundle", help="Bundle with C (moco.*) for FD_C at snapshots (default: --out)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads per process (0 = torch's default; use 1 on a machine shared with other jobs)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the checkpoint in --out."),
    seed: int = typer.Option(0, "--seed"),
):
    """Train the StyleGAN2 generator G; works under torchrun for DDP."""
    import os

    import torch

    from training.train_generator import TrainOptions, train_generator

    if threads:
        torch.set_num_threads(threads)
    options = TrainOptions(kimg=kimg, batch=batch, gamma=gamma, pl_weight=pl_weight, mixing=mixing,
                           augment=augment, xflip=xflip, snap_kimg=snap_kimg, seed=seed)
    run = dict(data=data, out=out, preset=preset, options=options, split=split, device=device, resume=resume, fd_bundle=fd_bundle)
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 talks
        train_generator(**run, log=lambda message: None)
        return
    with progress_bar() as progress:
        task = progress.add_task(f"G ({preset})", total=round(kimg * 1000))  # counted in images

        def on_step(done_kimg: float, stats: dict[str, float]) -> None:
            losses = f"G {stats['g_loss']:.3f} D {stats['d_loss']:.3f}"
            progress.update(task, completed=round(min(done_kimg, kimg) * 1000), description=f"G {done_kimg:.2f} kimg, {losses}")

        result = train_generator(**run, on_step=on_step, log=progress.console.print)
    if result.stopped_early:
        typer.echo(f"stopped at {result.kimg:.2f} kimg; checkpoint in {out} (continue with --resume)")
    else:
        typer.echo(f"trained G to {result.kimg:.2f} kimg in {result.seconds / 60:.1f} min; wrote {out}/generator.safetensors")


def _train_phase_command(phase: str, data: Path, bundle: Path, preset: str, steps: int | None, batch: int | None,
                         lr: float | None, split: str | None, device: str, threads: int, resume: bool, **extra) -> None:
    import os

    import torch

    from training.train_sketch2medi import phase_options, train_phase

    if threads:
        torch.set_num_threads(threads)
    options = phase_options(preset, phase, steps=steps, batch=batch, lr=lr, **extra)
    run = dict(data=data, bundle=bundle, preset=preset, options=options, split=split, device=device, resume=resume)
    if os.environ.get("RANK", "0") != "0":  # torchrun: only rank 0 talks
        train_phase(phase, **run, log=lambda message: None)
        return
    with progress_bar() as progress:
        cache_task = progress.add_task("sketch cache", total=None, visible=False)
        task = progress.add_task(f"{phase} ({preset})", total=options.steps)

        def on_cache(done: int, total: int) -> None:
            progress.update(cache_task, completed=done, total=total, visible=True)

        def on_step(step: int, stats: dict[str, float]) -> None:
            progress.update(task, completed=step, description=f"{phase} loss {stats['loss']:.3f}")

        result = train_phase(phase, **run, on_step=on_step, on_cache=on_cache, log=progress.console.print)
    if result.stopped_early:
        typer.echo(f"stopped at step {result.steps}; checkpoint in {bundle} (continue with --resume)")
    else:
        typer.echo(f"trained {phase} for {result.steps} steps in {result.seconds / 60:.1f} min; wrote {bundle}/{phase}.safetensors")


PHASE_HELP = "tiny (tests) | cpu (2 CPU cores) | paper (ResNet-50 E, ResNet-34 H)."


@train_app.command("encoder")
def train_encoder_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder (the images G was trained on)."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle with C, S and G; E is written into it."),
    preset: str = typer.Option("cpu", "--preset", help=PHASE_HELP),
    steps: int = typer.Option(None, "--steps", min=1, help="Training steps (default: the preset's)."),
    batch: int = typer.Option(None, "--batch", min=1, help="Global batch size."),
    lr: float = typer.Option(None, "--lr", min=0.0, help="E's learning rate."),
    freehand: float = typer.Option(None, "--freehand", min=0.0, max=1.0, help="Probability of a simulated free-hand sketch per pair (default 0, as in the paper)."),
    adversarial: float = typer.Option(None, "--adversarial", min=0.0, help="Weight of the latent discriminator's loss (paper: 0.1)."),
    split: str = typer.Option("train", "--split", help="Split of split.csv to train on."),
    device: str = typer.Option("auto", "--device"),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads per process (0 = torch's default)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the encoder checkpoint in --bundle."),
):
    """Phase 1: train the sketch encoder E with the latent discriminator; works under torchrun."""
    _train_phase_command("encoder", data, bundle, preset, steps, batch, lr, split, device, threads, resume,
                         freehand=freehand, adversarial=adversarial)


@train_app.command("refiner")
def train_refiner_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder (the images G was trained on)."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle with C, S, G and E; H is written into it."),
    preset: str = typer.Option("cpu", "--preset", help=PHASE_HELP),
    steps: int = typer.Option(None, "--steps", min=1, help="Training steps (default: the preset's)."),
    batch: int = typer.Option(None, "--batch", min=1, help="Global batch size."),
    lr: float = typer.Option(None, "--lr", min=0.0, help="H's learning rate."),
    refine_steps: int = typer.Option(None, "--refine-steps", min=1, help="Refinement steps T (paper: 3)."),
    split: str = typer.Option("train", "--split", help="Split of split.csv to train on."),
    device: str = typer.Option("auto", "--device"),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads per process (0 = torch's default)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the refiner checkpoint in --bundle."),
):
    """Phase 2: train the refiner H with E, G, S frozen; works under torchrun."""
    _train_phase_command("refiner", data, bundle, preset, steps, batch, lr, split, device, threads, resume,
                         refine_steps=refine_steps)


@train_app.command("all")
def train_all_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder with images/ and masks/ (see docs/DATA.md)."),
    out: Path = typer.Option(..., "--out", help="Bundle folder; an existing one is completed where it stopped."),
    preset: str = typer.Option("cpu", "--preset", help="tiny (tests) | cpu (2 CPU cores; stages fit a session each) | paper (256 px)."),
    split: str = typer.Option("train", "--split", help="Split to train on (the val split, if any, picks S's best epoch)."),
    device: str = typer.Option("auto", "--device"),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads (0 = torch's default)."),
):
    """Train the whole chain C, S, G, sketch cache, E, H into one bundle; re-run to resume."""
    import sys

    import torch

    from training.train_all import STAGES, train_all

    if threads:
        torch.set_num_threads(threads)
    with progress_bar() as progress:
        tasks = {stage: progress.add_task(stage, total=None, visible=False) for stage in STAGES}

        def on_progress(stage: str, done: float, total: float | None) -> None:
            progress.update(tasks[stage], completed=done, total=total, visible=True)

        reports = train_all(data, out, preset, split=split, device=device, command=" ".join(["sketch2medi", *sys.argv[1:]]),
                            progress=on_progress, log=progress.console.print)
    for report in reports:
        typer.echo(f"{report.stage:>8}  {report.status:<11}  {report.seconds / 60:6.1f} min  {report.detail}")
    typer.echo(f"bundle ready: {out} (bundle.json lists its networks and training)")


@app.command()
def generate(
    sketch: Path = typer.Argument(..., help="A sketch image (any polarity, mode and size; normalised first)."),
    out: Path = typer.Option(..., "--out", help="PNG to write: the image, or with --strip every refinement step."),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle made by `train all` (default: $SKETCH2MEDI_BUNDLE, else the shipped one)."),
    steps: int = typer.Option(None, "--steps", min=0, help="Refinement steps T (default: as trained, 3; 0 = E alone)."),
    strip: bool = typer.Option(False, "--strip", help="Write sketch | x_0 | x_1 | ... | x_T side by side."),
    device: str = typer.Option("auto", "--device"),
):
    """Generate a realistic image from one sketch with E, G and H."""
    import numpy as np
    from PIL import Image

    from generation.bundle import default_bundle
    from generation.images import tensor_to_images
    from generation.normalize import normalize_sketch_file
    from generation.pipeline import Sketch2MedI

    model = Sketch2MedI.from_bundle(bundle or default_bundle(), device)
    canonical = normalize_sketch_file(sketch, model.resolution)
    result = model.generate(canonical[None], steps=steps)
    if strip:
        pictures = [np.repeat(canonical[:, :, None], 3, axis=2)] + [tensor_to_images(image)[0] for image in result.steps]
        picture = np.concatenate(pictures, axis=1)
    else:
        picture = tensor_to_images(result.images)[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(out)
    typer.echo(f"wrote {out} ({len(result.steps) - 1} refinement steps)")


@app.command()
def sketch(
    source: Path = typer.Argument(..., help="An image file or a folder of images."),
    out: Path = typer.Option(..., "--out", help="Folder for masks/NAME.png (class indices) and sketches/NAME.png."),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle folder with the trained synthesizer (default: as for `generate`)."),
    size: int = typer.Option(256, "--size", min=32, max=1024, help="Side of the square outputs (images are centre-cropped)."),
    threshold: float = typer.Option(0.35, "--threshold", min=0.0, max=1.0, help="Minimum instance confidence (the paper's delta)."),
    device: str = typer.Option("auto", "--device"),
):
    """Synthesize sketches: segment each image with S and draw its instances' contours."""
    from generation.bundle import default_bundle
    from generation.solov2 import sketch_folder

    with progress_bar() as progress:
        task = progress.add_task("sketch", total=None)
        count = sketch_folder(source, out, bundle or default_bundle(), size=size, threshold=threshold, device=device,
                              on_image=lambda done, total: progress.update(task, completed=done, total=total))
    typer.echo(f"wrote {count} masks and sketches to {out}")


@train_app.command("pix2pix")
def train_pix2pix_command(
    data: Path = typer.Option(..., "--data", help="Dataset folder (the images G was trained on)."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle with S and G; its sketch cache gives the pairs; pix2pix is written into it."),
    preset: str = typer.Option("cpu", "--preset", help="tiny (tests) | cpu (64 px) | paper (U-Net-256)."),
    steps: int = typer.Option(None, "--steps", min=1, help="Training steps (default 3000)."),
    batch: int = typer.Option(None, "--batch", min=1, help="Global batch size (default 16)."),
    split: str = typer.Option("train", "--split", help="Split of split.csv to train on."),
    device: str = typer.Option("auto", "--device"),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads (0 = torch's default)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the pix2pix checkpoint in --bundle."),
):
    """Train the pix2pix baseline on the same (synthesized sketch, image) pairs as E and H."""
    import torch

    from generation.device import pick_device
    from generation.stylegan2 import load_generator
    from training.sketch_cache import sketch_cache
    from training.train_pix2pix import Pix2PixOptions, train_pix2pix

    if threads:
        torch.set_num_threads(threads)
    resolution = load_generator(bundle).config.resolution  # pairs at G's resolution: a like-for-like baseline
    cache = sketch_cache(data, bundle, resolution, split, pick_device(device))
    options = Pix2PixOptions(**{k: v for k, v in dict(steps=steps, batch=batch).items() if v is not None})
    with progress_bar() as progress:
        task = progress.add_task(f"pix2pix ({preset})", total=options.steps)
        result = train_pix2pix(cache.images, cache.sketches, bundle, preset, options, resume=resume, device=device,
                               on_step=lambda step, stats: progress.update(task, completed=step), log=progress.console.print)
    if result.stopped_early:
        typer.echo(f"stopped at step {result.steps}; checkpoint in {bundle} (continue with --resume)")
    else:
        typer.echo(f"trained pix2pix for {result.steps} steps in {result.seconds / 60:.1f} min; wrote {bundle}/pix2pix.safetensors")


@app.command()
def evaluate(
    data: Path = typer.Option(..., "--data", help="Dataset folder: every image is the archive, the split's images are queried."),
    split: str = typer.Option("test", "--split", help="Split whose images are the right answers."),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle to evaluate (default: as for `generate`)."),
    strengths: str = typer.Option("0,0.5,1", "--strengths", help="Free-hand simulator strengths, comma-separated."),
    seeds: int = typer.Option(2, "--seeds", min=1, help="Simulated sketches per image and strength."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N images of the split."),
    candidates: int = typer.Option(100, "--candidates", min=1),
    lam: float = typer.Option(DEFAULT_LAMBDA, "--lambda", min=0.0, max=1.0, help="score = lambda * similarity + (1 - lambda) * DICE."),
    weights: str = typer.Option(None, "--weights", help="Vector weights as for `index` (default sketch=0.9,code=0.05,image=0.05)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON."),
    out: Path = typer.Option(None, "--out", help="Also write the JSON report to this file."),
    device: str = typer.Option("auto", "--device"),
):
    """Measure retrieval (Recall@k, MRR, median rank) and generation quality against ablations and baselines."""
    import json

    from retrieval.evaluate import EvaluationOptions
    from retrieval.evaluate import evaluate as run_evaluation
    from retrieval.search import VectorRecipe

    try:
        levels = tuple(float(value) for value in strengths.split(","))
    except ValueError:
        raise InputError(f"--strengths {strengths!r}: give numbers between 0 and 1, e.g. 0,0.5,1")
    options = EvaluationOptions(strengths=levels, seeds=tuple(range(seeds)), candidates=candidates, lam=lam, limit=limit,
                                recipe=VectorRecipe.parse(weights) if weights else VectorRecipe())
    with progress_bar() as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        report = run_evaluation(data, split, bundle, options, device, on_progress)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    from retrieval.evaluate import markdown_tables

    typer.echo(markdown_tables(report))


@app.command()
def export(
    bundle: Path = typer.Argument(..., help="A bundle folder made by `train all` (or the `train` commands)."),
    out: Path = typer.Option(..., "--out", help="Folder for the exported bundle: networks and bundle.json only."),
    half: bool = typer.Option(True, "--half/--full", help="Store weights as float16 (half the size) or as trained."),
):
    """Copy a bundle's networks without its training scratch, e.g. to ship or commit it."""
    from generation.bundle import export_bundle

    manifest = export_bundle(bundle, out, half)
    size = sum(entry["bytes"] for entry in manifest["networks"].values()) / 1e6
    typer.echo(f"wrote {out}: {', '.join(manifest['networks'])} ({size:.1f} MB), bundle id {manifest['bundle_id']}")


WORKSPACE_HELP = "Workspace folder (default: $SKETCH2MEDI_WORKSPACE, else ~/.local/share/sketch2medi/workspace)."
DB_HELP = "SQLAlchemy URL of the catalog (default: SQLite inside the workspace), e.g. postgresql+psycopg://user@host/db."


@app.command()
def index(
    paths: list[str] = typer.Argument(..., help="Image files or folders (PNG, JPEG, TIFF, BMP, DICOM), searched recursively; "
                                      "or one DICOMweb server, dicomweb+http(s)://HOST:PORT/PATH (needs the pacs extra)."),
    workspace: Path = typer.Option(None, "--workspace", help=WORKSPACE_HELP),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle made by `train all` (default: $SKETCH2MEDI_BUNDLE, else the shipped one)."),
    db_url: str = typer.Option(None, "--db-url", "--db", help=DB_HELP),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per batch (each batch is committed before it is reported)."),
    index_kind: str = typer.Option("auto", "--index", help="auto (exact up to 100k images, then HNSW) | flat | ivf | hnsw."),
    weights: str = typer.Option(None, "--weights", help="Vector weights, e.g. sketch=0.9,code=0.05,image=0.05 (the default; docs/SEARCH.md)."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash every file, also those whose size, mtime, inode and ctime are unchanged."),
    tag: str = typer.Option(None, "--tag", help="Tag recorded with every file (default: the top folder's name) or instance (default: none)."),
    auth: str = typer.Option(None, "--auth", help="DICOMweb: bearer:VARIABLE or basic:VARIABLE, the environment variable holding the token or user:password."),
    modality: list[str] = typer.Option(None, "--modality", help="DICOMweb: only series of this modality (CT, MR, ES, ...); repeatable."),
    study_date: str = typer.Option(None, "--study-date", help="DICOMweb: only studies of these dates: YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD."),
    study_uid: str = typer.Option(None, "--study-uid", help="DICOMweb: only this study (StudyInstanceUID)."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.001, help="DICOMweb: seconds the server has to answer each request."),
    device: str = typer.Option("auto", "--device"),
):
    """Add images to the archive: S's masks, the synthesized sketch's field and E's code, C's embedding; incremental."""
    import functools
    import os

    from indexing.dicomweb import DicomWebFilters, is_dicomweb
    from indexing.ingest import index_dicomweb, index_folders
    from retrieval.search import ArchiveEmbedder, SystemModels, VectorRecipe

    servers = [path for path in paths if is_dicomweb(path)]
    if servers and (len(paths) > 1 or verify):
        raise InputError("index one DICOMweb server at a time, without folders or --verify")
    if not servers and (auth or modality or study_date or study_uid):
        raise InputError("--auth, --modality, --study-date and --study-uid are for a DICOMweb server (dicomweb+http://...)")
    filters = DicomWebFilters(tuple(modality or ()), study_date, study_uid)  # checked before any network is loaded
    embedder = ArchiveEmbedder(SystemModels(bundle, device), VectorRecipe.parse(weights) if weights else VectorRecipe())
    options = dict(db_url=db_url, batch_size=batch_size, index_kind=index_kind, tag=tag)
    if servers:
        run = functools.partial(index_dicomweb, servers[0], workspace, embedder, auth=auth, filters=filters, timeout=timeout, **options)
    else:
        run = functools.partial(index_folders, paths, workspace, embedder, verify=verify, **options)
    if os.environ.get("RANK", "0") != "0":  # torchrun: the other ranks embed their shares quietly
        run()
        return
    from rich.console import Console

    progress = progress_bar() if Console().is_terminal else ProgressLines()  # started once the workspace is open and checked
    task = None

    def on_start(total: int) -> None:
        nonlocal task
        progress.start()
        task = progress.add_task("index", total=total)

    def on_progress(done: int, total: int, path: Path | str) -> None:
        name = path.name if isinstance(path, Path) else path.rsplit("/", 1)[-1]
        progress.update(task, completed=done, total=total, description=f"index {name[:40]}")

    try:
        summary = run(on_start=on_start, on_progress=on_progress)
    finally:
        if task is not None:
            progress.stop()
    typer.echo(f"added {summary.added}, unchanged {summary.unchanged}, duplicates {summary.duplicates}, "
               f"skipped {len(summary.skipped)}, removed {summary.removed}")
    for path, why in summary.skipped:
        typer.echo(f"  skipped {path}: {why}")


@app.command()
def search(
    sketch: Path = typer.Argument(..., help="The sketch (any polarity, mode and size)."),
    k: int = typer.Option(10, "-k", "--top", min=1, help="How many results."),
    workspace: Path = typer.Option(None, "--workspace", help=WORKSPACE_HELP),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle (default: the one the workspace was indexed with)."),
    db_url: str = typer.Option(None, "--db-url", "--db", help=DB_HELP),
    candidates: int = typer.Option(100, "--candidates", min=1, help="FAISS candidates re-ranked by DICE."),
    rerank: bool = typer.Option(True, "--rerank/--no-rerank", help="Re-rank the candidates by the DICE of S's masks."),
    lam: float = typer.Option(DEFAULT_LAMBDA, "--lambda", min=0.0, max=1.0, help="score = lambda * similarity + (1 - lambda) * DICE."),
    steps: int = typer.Option(None, "--steps", min=0, help="Refinement steps (default: as trained, 3)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (schema in docs/SEARCH.md) instead of a table."),
    out: Path = typer.Option(None, "--out", help="Folder for sketch.png, generated.png and results.png (contact sheet)."),
    group: str = typer.Option(None, "--group", help="patient | study | series | none: the top k groups with their best frames "
                                                    "(default: study where studies are known, else none)."),
    device: str = typer.Option("auto", "--device"),
):
    """Find the archive images that look like the sketch."""
    import json

    from retrieval.grouping import grouped_search
    from retrieval.search import Retriever

    with Retriever(workspace, bundle, db_url, device) as retriever:
        result, groups = grouped_search(retriever, sketch, k=k, group=group, candidates=candidates, rerank=rerank, lam=lam, steps=steps)
        if out is not None:
            from retrieval.contact_sheet import write_search_outputs

            write_search_outputs(result, out)
    if as_json:
        payload = result.to_json()
        if groups is not None:
            payload["groups"] = [g.to_json() for g in groups]
        typer.echo(json.dumps(payload, indent=1))
    elif groups is not None:
        from rich.console import Console
        from rich.table import Table

        table = Table("rank", "score", "group", "patient", "date", "modality", "frames")
        table.add_column("best frames (x near-duplicates)", overflow="fold")
        for g in groups:
            best = "\n".join(f"{h.hit.path}" + (f" [frame {h.hit.frame}]" if h.hit.frame else "") + (f" x{h.count}" if h.count > 1 else "")
                             for h in g.hits)  # fmt: skip
            table.add_row(str(g.rank), f"{g.score:.4f}", f"{g.by} {g.key}", g.meta.patient_id or "-", g.meta.study_date or "-",
                          g.meta.modality or "-", str(g.frames), best)  # fmt: skip
        Console().print(table)
        typer.echo(f"{result.timings_ms['total']:.0f} ms" + (f"; wrote {out}" if out else ""))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("rank", "score", "similarity", "DICE")
        table.add_column("path", overflow="fold")  # wrap long paths rather than cut them
        for hit in result.results:
            table.add_row(str(hit.rank), f"{hit.score:.4f}", f"{hit.similarity:.4f}",
                          "-" if hit.dice is None else f"{hit.dice:.1f}", hit.path + (f" [frame {hit.frame}]" if hit.frame else ""))
        Console().print(table)
        typer.echo(f"{result.timings_ms['total']:.0f} ms" + (f"; wrote {out}" if out else ""))


@app.command()
def serve(
    workspace: Path = typer.Option(None, "--workspace", help=WORKSPACE_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs --token."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle (default: the one the workspace was indexed with)."),
    db_url: str = typer.Option(None, "--db-url", "--db", help=DB_HELP),
    token: str = typer.Option(None, "--token", help="Access token every request must carry (default: $SKETCH2MEDI_TOKEN)."),
    max_concurrent: int = typer.Option(32, "--max-concurrent", min=1, help="Searches admitted at once (one computes, the rest queue); more get 503."),
    device: str = typer.Option("cpu", "--device", help="cpu (default) | auto | cuda | cuda:N"),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads for torch (0 = torch's default)."),
):
    """Serve the draw-to-search web page and its JSON API (needs the `serve` extra)."""
    import os

    try:
        from retrieval.server import ENV_TOKEN, check_bind
        from retrieval.server import serve as run_server
    except ImportError as error:
        raise InputError(f"the web app needs the serve extra ({error.name} is missing): pip install 'sketch2medi[serve]'")
    check_bind(host, token or os.environ.get(ENV_TOKEN))  # before loading any network
    import torch

    if threads:
        torch.set_num_threads(threads)
    run_server(workspace, host, port, bundle, db_url, token, device, max_concurrent)


@app.command()
def demo(
    out: Path = typer.Option(Path("sketch2medi-demo"), "--out", help="Folder for the archive, workspace, sketch and contact sheet."),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle (default: $SKETCH2MEDI_BUNDLE, else the shipped phantom bundle)."),
    images: int = typer.Option(200, "--images", min=10, help="Phantom images in the demo archive."),
    strength: float = typer.Option(0.5, "--strength", min=0.0, max=1.0, help="Sloppiness of the simulated free-hand sketch."),
    device: str = typer.Option("auto", "--device"),
):
    """Generate a phantom archive, index it, sketch one image free-hand, search, show the results."""
    from rich.console import Console
    from rich.table import Table

    from retrieval.demo import run_demo

    console = Console()
    result = run_demo(out, bundle, images=images, strength=strength, device=device, log=console.print)
    table = Table("rank", "score", "similarity", "DICE")
    table.add_column("path", overflow="fold")
    for hit in result.search.results:
        mark = " <- sketched" if result.rank == hit.rank else ""
        table.add_row(str(hit.rank), f"{hit.score:.4f}", f"{hit.similarity:.4f}", f"{hit.dice:.1f}", Path(hit.path).name + mark)
    console.print(table)
    found = f"found at rank {result.rank}" if result.rank else f"not in the top {len(result.search.results)}"
    typer.echo(f"sketched {result.target.name} ({found}); sketch {result.sketch}; contact sheet {out / 'results.png'}")


if __name__ == "__main__":
    app()
