"""What the command lines (cli.py and the train sub-app) share: the progress bar, literal printing, and the checks of numeric
options and output paths. File names are printed as written: `[bold]x.png` is a name, not rich markup."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import typer
from typer.core import TyperGroup

from generation.errors import InputError


class WholeHelpGroup(TyperGroup):
    """A command group whose --help lists each command's first paragraph whole, wrapped to the
    terminal, where click would cut it to one line."""

    def format_commands(self, ctx, formatter) -> None:
        commands = [(name, self.get_command(ctx, name)) for name in self.list_commands(ctx)]
        rows = [(name, " ".join((command.help or "").split("\n\n")[0].split())) for name, command in commands
                if command is not None and not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


def literal_printer(console) -> Callable[[str], None]:
    """`console.print` for messages that hold user-controlled text (paths): no markup."""
    return lambda message: console.print(message, markup=False, soft_wrap=True)  # soft_wrap: long paths stay on one line


def finite(param: typer.CallbackParam, value: float | None) -> float | None:
    """Callback of every float option: NaN and infinities pass the range checks, so they are refused here."""
    if value is not None and not math.isfinite(value):
        raise InputError(f"{param.opts[0]} {value}: give a finite number")
    return value


def _check_parents(path: Path) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"--out {path}: {parent} is a file, not a folder")
            return


def check_image_out(path: Path) -> None:
    """`--out` naming an image file to write: not a folder, in a format PIL can write."""
    from PIL import Image

    if path.is_dir():
        raise InputError(f"--out {path}: is a folder; give a file name such as {path / 'image.png'}")
    Image.init()
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        raise InputError(f"--out {path}: unknown image type {path.suffix or '(no extension)'}; end the name in .png, .jpg, .tif or .bmp")
    _check_parents(path)


def check_folder_out(path: Path) -> None:
    """`--out` naming a folder to write into (created if missing): not an existing file."""
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {path}: is a file; give a folder (it is created if missing)")
    _check_parents(path)
