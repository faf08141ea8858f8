"""What the command lines (cli.py and the train sub-app) print and check: progress, result tables,
literal printing, numeric options and output paths. File names are printed as written: `[bold]x.png`
is a name, not rich markup."""

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


def progress_bar(rate_unit: str | None = None):
    """A terminal progress bar; with `rate_unit` (e.g. "images") it also shows the rate, "12.3 images/s"
    (rich's estimate over the last 30 s)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text("" if task.speed is None else f"{task.speed:.1f} {rate_unit}/s")

    columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               *([RateColumn()] if rate_unit else []), TimeRemainingColumn()]
    return Progress(*columns)


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


SEARCH_STAGES = {"normalize": "sketch normalisation", "E": "E (encoder)", "G": "G (generator)", "H": "H (refinement)",
                 "C": "C (embedding)", "faiss": "the FAISS search", "S": "S (masks)", "rerank": "re-ranking"}


def print_results(hits, labels: list[str], note: str | None = None) -> None:
    """The results as a table, one label (path or name) per hit, printed literally and never wrapped."""
    from rich.table import Table
    from rich.text import Text

    table = Table("rank", "id", "score", "similarity", "DICE", "quality")  # the id is what --like and --unlike take
    table.add_column("path", no_wrap=True)
    for hit, label in zip(hits, labels):
        table.add_row(str(hit.rank), str(hit.id), f"{hit.score:.4f}", f"{hit.similarity:.4f}", "-" if hit.dice is None else f"{hit.dice:.1f}",
                      "-" if hit.quality is None else f"{hit.quality:.3f}", Text(label))
    if note:
        typer.echo(note)
    _print_wide(table)


def _print_wide(table) -> None:
    """A wider table rather than cut or wrapped paths, so that they can be copied."""
    from rich.console import Console
    from rich.measure import Measurement

    console = Console()
    width = Measurement.get(console, console.options.update(max_width=100_000), table).maximum
    if width > console.width:
        console = Console(width=width)
    console.print(table)


def print_groups(groups) -> None:
    """Grouped results (`retrieval.grouping.Group`) as a table: one row per patient, study or series
    with its best frames; every identifier and path printed literally."""
    from rich.table import Table
    from rich.text import Text

    table = Table("rank", "score", "group", "patient", "date", "modality", "frames")
    table.add_column("best frames (x near-duplicates)", no_wrap=True)
    for g in groups:
        best = "\n".join(h.hit.path + (f" [frame {h.hit.frame}]" if h.hit.frame else "") + (f" x{h.count}" if h.count > 1 else "")
                         for h in g.hits)  # fmt: skip
        table.add_row(str(g.rank), f"{g.score:.4f}", Text(f"{g.by} {g.key}"), Text(g.meta.patient_id or "-"), Text(g.meta.study_date or "-"),
                      Text(g.meta.modality or "-"), str(g.frames), Text(best))  # fmt: skip
    _print_wide(table)


def shortened_paths(paths: list[str]) -> tuple[str | None, list[str]]:
    """(the folder every path lies under, the paths relative to it), or (None, the paths) when they share none."""
    import os

    try:
        common = os.path.commonpath([os.path.dirname(path) for path in paths]) if len(paths) > 1 else ""
    except ValueError:  # absolute and relative paths mixed
        common = ""
    if common in ("", os.sep):
        return None, paths
    return common, [path[len(common):].lstrip(os.sep) for path in paths]


def timing_line(timings_ms: dict[str, float]) -> str:
    """'searched in 7.7 s, most of it in G (generator): 5.2 s'; H's refinement steps count as one stage.
    (On a cold start the first call of each network dominates: torch's one-time set-up.)"""
    stages: dict[str, float] = {}
    for stage, ms in timings_ms.items():
        if stage != "total":
            name = "H" if stage[:1] == "H" and stage[1:].isdigit() else stage
            stages[name] = stages.get(name, 0.0) + ms
    slowest = max(stages, key=stages.get)
    return f"searched in {duration(timings_ms['total'])}, most of it in {SEARCH_STAGES.get(slowest, slowest)}: {duration(stages[slowest])}"


def duration(ms: float) -> str:
    return f"{ms / 1000:.1f} s" if ms >= 1000 else f"{ms:.0f} ms"


def report_skipped(skipped: list[tuple[Path, str]]) -> None:
    """One line per input that failed; exit 1 once all the others were done."""
    for path, why in skipped:
        typer.echo(f"  skipped {path}: {why}")
    if skipped:
        raise typer.Exit(1)


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
