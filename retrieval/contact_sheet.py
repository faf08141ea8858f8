"""Pictures of a search: the normalised sketch, the generated image and a contact sheet of results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from generation.errors import InputError
from retrieval.search import SearchResult

THUMBNAIL = 128
DISPLAY = 256  # side that sketch.png and generated.png are enlarged to
CAPTION = 28  # pixels under each tile for its caption


def _tile(image: np.ndarray, size: int) -> Image.Image:
    """The image scaled (up or down) to fit a size x size tile; sketches keep crisp lines."""
    sketch = image.ndim == 2
    picture = Image.fromarray(np.repeat(image[:, :, None], 3, axis=2) if sketch else image)
    scale = size / max(picture.size)
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                             Image.NEAREST if sketch else Image.LANCZOS)
    tile = Image.new("RGB", (size, size), "white")
    tile.paste(picture, ((size - picture.width) // 2, (size - picture.height) // 2))
    return tile


def contact_sheet(result: SearchResult, columns: int = 6, size: int = THUMBNAIL) -> Image.Image:
    """Row 1: query sketch and generated image; then the results in rank order, captioned."""
    from indexing.files import load

    blank = Image.new("RGB", (size, size), (200, 200, 200))  # a query by archive id has no sketch or image of its own
    tiles: list[tuple[Image.Image, str]] = [(blank if result.sketch is None else _tile(result.sketch, size), "sketch"),
                                            (blank if result.image is None else _tile(result.image, size), "generated")]
    for hit in result.results:
        try:
            picture = _tile(load(Path(hit.path), hit.frame), size)
        except (InputError, OSError):  # moved or deleted since indexing: keep its place in the sheet
            picture = Image.new("RGB", (size, size), (200, 200, 200))
        dice = "" if hit.dice is None else f" D{hit.dice:.0f}"
        tiles.append((picture, f"#{hit.rank} {hit.score:.3f}{dice}"))
    rows = 1 + -(-len(result.results) // columns)
    sheet = Image.new("RGB", (columns * size, rows * (size + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    positions = [(0, 0), (1, 0)] + [(i % columns, 1 + i // columns) for i in range(len(result.results))]
    for (tile, caption), (column, row) in zip(tiles, positions):
        x, y = column * size, row * (size + CAPTION)
        sheet.paste(tile, (x, y))
        draw.text((x + 4, y + size + 6), caption, fill="black")
    return sheet


def save_for_display(picture: np.ndarray, path: Path, size: int = DISPLAY) -> None:
    """Save `picture` enlarged by a whole factor to about `size` px (each pixel a block, nothing
    invented); its own size is written into the PNG's "raw size" text field."""
    from PIL.PngImagePlugin import PngInfo

    height, width = picture.shape[:2]
    factor = max(1, round(size / max(height, width)))
    info = PngInfo()
    info.add_text("raw size", f"{width}x{height}")
    Image.fromarray(picture).resize((width * factor, height * factor), Image.NEAREST).save(path, pnginfo=info)


def write_search_outputs(result: SearchResult, out: str | Path) -> list[Path]:
    """sketch.png (the query as normalised) and generated.png (the image made from it), both
    enlarged for display, where the query has them, and results.png, the contact sheet."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, picture in (("sketch.png", result.sketch), ("generated.png", result.image)):
        if picture is not None:
            save_for_display(picture, out / name)
            written.append(out / name)
    contact_sheet(result).save(out / "results.png")
    return [*written, out / "results.png"]
