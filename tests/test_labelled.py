"""Labelled sketches: the colour table, decoding colour-coded sketches, the simulator's classes and
the per-class matching of `retrieval.labelled`."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from generation.errors import InputError
from generation.freehand import freehand_labelled_sketch, freehand_sketch
from generation.labelled import CLASS_COLOURS, colour_coded, colour_hex, colour_table, decode_labelled_sketch
from generation.normalize import normalize_sketch
from generation.sketch import INK, PAPER
from retrieval.labelled import LabelWeights, class_fields, class_match, labelled_scores, parse_label_weights

SIZE = 64
UNKNOWN = (120, 200, 40)  # a yellow-green no class has


def drawing(side: int = 256, supersample: int = 1, pens: dict | None = None) -> Image.Image:
    """Three strokes on white: a class-1 ring (left), a class-3 ring (right), a black line below;
    drawn at side * supersample and reduced with LANCZOS (anti-aliased edges) when supersample > 1."""
    pens = pens or {"left": CLASS_COLOURS[1], "right": CLASS_COLOURS[3], "line": (0, 0, 0)}
    big = side * supersample
    f = big / 256  # the strokes are laid out on a 256 px page
    image = Image.new("RGB", (big, big), "white")
    draw = ImageDraw.Draw(image)
    width = round(6 * f)
    draw.ellipse((20 * f, 40 * f, 110 * f, 150 * f), outline=pens["left"], width=width)
    draw.ellipse((146 * f, 40 * f, 236 * f, 150 * f), outline=pens["right"], width=width)
    draw.line((30 * f, 210 * f, 226 * f, 210 * f), fill=pens["line"], width=width)
    return image if supersample == 1 else image.resize((side, side), Image.LANCZOS)


def parts(sketch):
    """The canonical ink pixels of the left ring, the right ring and the line (by position)."""
    ink = sketch.sketch == INK
    yy, xx = np.mgrid[:SIZE, :SIZE]
    line = ink & (yy > 0.75 * SIZE)
    return ink & ~line & (xx < SIZE / 2), ink & ~line & (xx >= SIZE / 2), line


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_the_colour_table_is_documented_per_bundle():
    table = colour_table("bundles/vocalfolds")
    assert table[0] == {"index": 0, "name": "unlabelled", "colour": "#000000"}
    assert [(row["index"], row["name"]) for row in table[1:]] == [
        (1, "vocal folds"), (2, "other tissue"), (3, "glottal space"), (4, "pathology"), (5, "surgical tool"), (6, "intubation")]
    assert [row["colour"] for row in table[1:3]] == ["#e40000", "#00a000"] == [colour_hex(1), colour_hex(2)]
    assert len({row["colour"] for row in table}) == len(table)
    # Every colour keeps its coverage as ink (one channel at 0), so coloured strokes normalise as black ones.
    assert all(min(colour) == 0 for colour in CLASS_COLOURS.values())


@pytest.mark.parametrize("supersample, quality", [(1, None), (4, None), (4, 90)], ids=["exact", "anti-aliased", "anti-aliased-jpeg"])
def test_each_stroke_decodes_to_its_class(supersample, quality):
    image = drawing(512 if quality else 256, supersample)
    image = jpeg(image, quality) if quality else image
    sketch = decode_labelled_sketch(image, SIZE, 6)
    assert sketch.drawn == [1, 3]
    np.testing.assert_array_equal(sketch.sketch, normalize_sketch(image, SIZE))  # the same canonical sketch as a plain upload
    left, right, line = parts(sketch)
    assert (sketch.classes[left] == 1).mean() > 0.97 and (sketch.classes[right] == 3).mean() > 0.97
    assert (sketch.classes[line] == 0).all()
    assert (sketch.classes[sketch.sketch == PAPER] == 0).all()


def test_colours_not_in_the_table_are_unlabelled_ink():
    half = tuple((a + b) // 2 for a, b in zip(CLASS_COLOURS[1], CLASS_COLOURS[3]))  # a blend of two pens
    image = drawing(256, 4, {"left": UNKNOWN, "right": half, "line": CLASS_COLOURS[2]})
    sketch = decode_labelled_sketch(jpeg(image, 90), SIZE, 6)
    left, right, line = parts(sketch)
    assert sketch.drawn == [2] and (sketch.classes[left | right] == 0).all() and (sketch.classes[line] == 2).mean() > 0.97


def test_a_plain_black_sketch_is_exactly_a_plain_sketch():
    image = drawing(256, 4, {"left": (0, 0, 0), "right": (90, 90, 90), "line": (0, 0, 0)})  # black and grey pencil
    sketch = decode_labelled_sketch(image, SIZE, 6)
    assert sketch.drawn == [] and not sketch.classes.any()
    np.testing.assert_array_equal(sketch.sketch, normalize_sketch(image, SIZE))


def test_bad_labelled_input_gives_one_line():
    with pytest.raises(InputError, match=r"^sketch: strokes in the colour of class 7 \(#000080\), but the bundle has classes 1-6; "
                                         r"redraw them in black or in one of the colours `python cli.py classes` lists$"):
        decode_labelled_sketch(drawing(256, 4, {"left": CLASS_COLOURS[7], "right": CLASS_COLOURS[1], "line": (0, 0, 0)}), SIZE, 6)
    rng = np.random.default_rng(0)
    smooth = ndimage.gaussian_filter(rng.random((200, 200, 3)), (6, 6, 0))
    photo = ((smooth - smooth.min()) / np.ptp(smooth) * 255).astype(np.uint8)
    with pytest.raises(InputError, match="looks like a photograph"):
        decode_labelled_sketch(photo, SIZE, 6)
    with pytest.raises(InputError, match="the sketch is empty"):
        decode_labelled_sketch(np.full((100, 100, 3), 255, np.uint8), SIZE, 6)
    with pytest.raises(InputError, match="label weight 1.5: must be between 0 and 1"):
        parse_label_weights("1.5")
    with pytest.raises(InputError, match=r"expected WEIGHT\[:DICE\] pairs"):
        parse_label_weights("0.3:high")


def blobs_mask(side: int = 256) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    mask = np.zeros((side, side), np.uint8)
    mask[(yy - 100) ** 2 / 60**2 + (xx - 90) ** 2 / 50**2 < 1] = 1
    mask[(yy - 110) ** 2 / 40**2 + (xx - 190) ** 2 / 40**2 < 1] = 3
    mask[200:240, 40:220] = 2
    return mask


@pytest.mark.parametrize("strength", [0.0, 1.0, 2.0])
def test_the_simulator_knows_each_strokes_class_without_changing_its_sketch(strength):
    mask = blobs_mask()
    sketch, classes = freehand_labelled_sketch(mask, strength, 7)
    np.testing.assert_array_equal(sketch, freehand_sketch(mask, strength, 7))
    assert (classes[sketch == PAPER] == 0).all() and set(np.unique(classes[sketch < PAPER])) <= {0, 1, 2, 3}
    if strength == 0:  # the synthesized sketch: every line lies on the border of the class it outlines
        for c in (1, 2, 3):
            region = ndimage.binary_dilation(mask == c, iterations=2) & ~ndimage.binary_erosion(mask == c, iterations=2)
            assert region[(classes == c) & (sketch < PAPER)].all()
    # Colour-coded and decoded as an upload: the plain query's canonical sketch, and the classes drawn.
    decoded = decode_labelled_sketch(colour_coded(sketch, classes), SIZE, 3)
    np.testing.assert_array_equal(decoded.sketch, normalize_sketch(sketch, SIZE))
    assert set(decoded.drawn) <= {1, 2, 3} and len(decoded.drawn) >= 2


def two_blob_labels(left: int, right: int, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.uint8)
    labels[np.hypot(yy - 32, xx - 16) < 10] = left
    labels[np.hypot(yy - 32, xx - 48) < 10] = right
    return labels


def test_a_labelled_query_ranks_its_image_first_where_the_plain_one_does_not():
    """Two candidates with the same outlines, classes swapped: the plain score (they share one
    sketch field) puts the wrong one first; the per-class field puts the drawn one first."""
    truth, swapped = two_blob_labels(1, 2), two_blob_labels(2, 1)
    ink = np.full((SIZE, SIZE), PAPER, np.uint8)
    classes = np.zeros((SIZE, SIZE), np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for cx, c in ((16, 1), (48, 2)):
        ring = np.abs(np.hypot(yy - 32, xx - cx) - 10) < 0.8
        ink[ring], classes[ring] = INK, c
    from generation.labelled import LabelledSketch

    sketch = LabelledSketch(ink, classes)
    plain = np.array([0.80, 0.81])  # [truth, swapped]: a near-tie the plain score breaks the wrong way
    assert int(np.argmax(plain)) == 1
    candidates = [truth, swapped]
    fields = class_fields(candidates, sketch.drawn, SIZE)
    weights = LabelWeights(weight=0.3, dice=0.0)
    match = class_match(sketch, np.zeros_like(truth), fields, candidates, weights)
    assert match[0] > 0.9 > 0.5 > match[1]
    assert int(np.argmax(labelled_scores(plain, match, weights))) == 0
    # Per-class DICE alone (g = 1) against S(x_hat) = the truth's masks says the same.
    dice_only = class_match(sketch, truth, fields, candidates, LabelWeights(weight=0.3, dice=1.0))
    assert dice_only.tolist() == [1.0, 0.0]


def test_labelled_search_in_python_and_on_the_command_line(tiny_chain, tmp_path):
    """Retriever end to end: a sketch of an archive image's stored outlines, each in its class,
    finds that image first by the class match alone; black strokes with --labelled search exactly
    as a plain sketch; a class the bundle lacks is one line, exit code 2."""
    from typer.testing import CliRunner

    from cli import app
    from generation.labelled import LabelledSketch
    from indexing.ingest import index_folders
    from retrieval.labelled import class_outlines
    from retrieval.models import SystemModels
    from retrieval.search import JSON_SCHEMA_VERSION, Retriever
    from retrieval.vector import ArchiveEmbedder

    data, bundle, _ = tiny_chain
    models = SystemModels(bundle, "cpu")
    index_folders(data / "images", tmp_path / "ws", ArchiveEmbedder(models), batch_size=8)
    size = models.resolution
    with Retriever(tmp_path / "ws", models=models) as retriever:
        ids, _ = retriever.workspace.catalog.vectors()
        target = int(ids[3])
        stored = retriever.workspace.masks_for([target])[target]
        present = [int(c) for c in np.unique(stored) if c]
        ink = np.full((size, size), PAPER, np.uint8)
        classes = np.zeros((size, size), np.uint8)
        for c in present:
            lines = class_outlines(stored, c, size) == INK
            ink[lines], classes[lines] = INK, c
        sketch = LabelledSketch(ink, classes)
        result = retriever.search(sketch, k=5, candidates=len(ids), label_weights=LabelWeights(weight=1.0))
        assert result.results[0].id == target and result.classes_drawn == tuple(sketch.drawn) == tuple(present)
        assert result.results[0].class_match == max(hit.class_match for hit in result.results)
        assert [hit.score for hit in result.results] == sorted((hit.score for hit in result.results), reverse=True)
        payload = result.to_json()
        assert payload["schema_version"] == JSON_SCHEMA_VERSION == 3 and payload["classes_drawn"] == present
        assert set(payload["results"][0]) == {"rank", "id", "path", "frame", "score", "similarity", "dice", "aligned_chamfer", "class_match", "quality"}

        black = Image.fromarray(ink)
        plain, labelled = retriever.search(black, k=5), retriever.search(black, k=5, labelled=True)
        assert [(h.id, h.score) for h in labelled.results] == [(h.id, h.score) for h in plain.results]
        assert all(h.class_match is None for h in labelled.results) and labelled.classes_drawn == ()

        with pytest.raises(InputError, match=r"^sketch: strokes of class 5, but the bundle has classes 1-4; "):
            retriever.search(LabelledSketch(ink, np.where(ink == INK, 5, 0).astype(np.uint8)))

    wrong = tmp_path / "class7.png"
    Image.fromarray(colour_coded(ink, np.where(ink == INK, 7, 0).astype(np.uint8))).resize((256, 256), Image.NEAREST).save(wrong)
    result = CliRunner().invoke(app, ["search", str(wrong), "--labelled", "--workspace", str(tmp_path / "ws"), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"error: {wrong}: strokes in the colour of class 7 (#000080), but the bundle has "
                                                  "classes 1-4; redraw them in black or in one of the colours `python cli.py classes` lists"]
    listed = CliRunner().invoke(app, ["classes", "--bundle", str(bundle)])
    assert listed.exit_code == 0 and listed.output.splitlines()[:2] == ["  0  #000000  unlabelled", "  1  #e40000  uvula"]
