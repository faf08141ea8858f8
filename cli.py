"""sketch2medi command line: thin wrappers over library functions (also `python cli.py ...`)."""

from __future__ import annotations

from pathlib import Path

import click
import typer
from typer.core import TyperGroup

from generation.images import InputError


class UserErrorGroup(TyperGroup):
    """Turns the library's `InputError`s into one line on stderr and exit code 2, no traceback."""

    def invoke(self, ctx: click.Context):
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


@app.command()
def phantom(
    out: Path = typer.Argument(..., help="Folder to write images/, masks/, classes.json, split.csv into."),
    n: int = typer.Option(2000, "--n", min=1, help="Number of images."),
    size: int = typer.Option(256, "--size", min=32, max=512, help="Image side in pixels (32-512)."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same images."),
):
    """Generate the procedural pharyngeal phantom dataset (images, exact masks, splits)."""
    from training.phantom import write_phantom_dataset

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


if __name__ == "__main__":
    app()
