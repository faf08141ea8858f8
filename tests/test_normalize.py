import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import morphology

from generation import normalize
from generation.errors import InputError
from generation.images import open_image
from generation.normalize import WORK_SIDE, normalize_sketch, normalize_sketch_file, reduce_to_work_side
from generation.sketch import INK, PAPER, line_width, sketch_from_mask

ROOT = Path(__file__).resolve().parents[1]
MODES = ["1", "L", "P", "RGB", "RGBA", "I;16"]


def render(mode: str, dark_on_light: bool, width: int, height: int, strokes, stroke_width: int) -> Image.Image:
    """A test sketch in any file mode and polarity, strokes given as ((x0, y0), (x1, y1))."""
    ink, paper = (0, 255) if dark_on_light else (255, 0)
    if mode == "RGBA":  # strokes on a transparent layer
        image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        colour = (20, 30, 200, 255) if dark_on_light else (250, 250, 250, 255)
    else:
        image = Image.new("L", (width, height), paper)
        colour = ink
    draw = ImageDraw.Draw(image)
    for start, end in strokes:
        draw.line([start, end], fill=colour, width=stroke_width)
    if mode == "I;16":
        return Image.fromarray((np.asarray(image, dtype=np.uint16) * 257).astype(np.uint16))
    return image if mode in ("L", "RGBA") else image.convert(mode)


def expected_position(point, width: int, height: int, size: int) -> tuple[float, float]:
    side = max(width, height)
    scale = size / side
    # Pixel centres map as (x + 0.5) * scale - 0.5.
    return tuple((p + offset + 0.5) * scale - 0.5 for p, offset in zip(point, ((side - width) // 2, (side - height) // 2)))


def distance_to_ink(sketch: np.ndarray) -> np.ndarray:
    return ndimage.distance_transform_edt(sketch != INK)


@st.composite
def sketch_cases(draw):
    width = draw(st.integers(48, 700))
    height = draw(st.integers(48, 700))
    side = max(width, height)
    x0, x1 = draw(st.integers(0, width - 1)), draw(st.integers(0, width - 1))
    y0, y1 = draw(st.integers(0, height - 1)), draw(st.integers(0, height - 1))
    if np.hypot(x1 - x0, y1 - y0) < 0.15 * side:  # too short to be a real stroke at any size
        x0, y0, x1, y1 = 0, height // 2, width - 1, height // 2
    return dict(
        mode=draw(st.sampled_from(MODES)),
        dark_on_light=draw(st.booleans()),
        width=width,
        height=height,
        stroke=((x0, y0), (x1, y1)),
        stroke_width=draw(st.integers(1, max(1, side // 60))),
        size=draw(st.sampled_from([64, 128, 256])),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sketch_cases())
def test_any_mode_polarity_and_size_gives_canonical_sketch_keeping_the_stroke(case):
    image = render(case["mode"], case["dark_on_light"], case["width"], case["height"], [case["stroke"]], case["stroke_width"])
    sketch = normalize_sketch(image, case["size"])
    size = case["size"]
    assert sketch.shape == (size, size) and sketch.dtype == np.uint8
    assert set(np.unique(sketch)) <= {INK, PAPER}
    # The drawn stroke survives where it should be: both ends and the middle lie near ink.
    distances = distance_to_ink(sketch)
    (x0, y0), (x1, y1) = case["stroke"]
    for t in (0.1, 0.5, 0.9):
        point = (x0 + t * (x1 - x0), y0 + t * (y1 - y0))
        x, y = expected_position(point, case["width"], case["height"], size)
        row, col = min(max(round(y), 0), size - 1), min(max(round(x), 0), size - 1)
        assert distances[row, col] <= 3.0, (case, t, distances[row, col])
    # Strokes are thinned and redrawn: ink covers at most the canonical width along the line.
    assert (sketch == INK).sum() <= 3 * line_width(size) * size


@settings(max_examples=30, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    dark_on_light=st.booleans(),
    width=st.integers(16, 900),
    height=st.integers(16, 900),
)
def test_empty_canvas_is_rejected(mode, dark_on_light, width, height):
    image = render(mode, dark_on_light, width, height, [], 1)
    with pytest.raises(InputError, match="empty"):
        normalize_sketch(image)


def test_polarity_is_detected_both_ways_give_the_same_sketch():
    strokes = [((10, 10), (100, 90)), ((20, 100), (110, 30))]
    dark = normalize_sketch(render("L", True, 120, 120, strokes, 2), 128)
    light = normalize_sketch(render("L", False, 120, 120, strokes, 2), 128)
    np.testing.assert_array_equal(dark, light)


def test_thick_marker_and_fine_pen_give_nearly_the_same_sketch():
    strokes = [((40, 40), (460, 400)), ((60, 450), (450, 60))]
    fine = normalize_sketch(render("L", True, 500, 500, strokes, 2), 128)
    thick = normalize_sketch(render("L", True, 500, 500, strokes, 12), 128)
    assert distance_to_ink(fine)[thick == INK].max() <= 2.5
    assert distance_to_ink(thick)[fine == INK].max() <= 2.5


def test_synthesized_sketch_is_already_canonical():
    yy, xx = np.mgrid[:256, :256]
    mask = np.zeros((256, 256), np.uint8)
    mask[(yy - 100) ** 2 / 60**2 + (xx - 128) ** 2 / 80**2 < 1] = 1
    mask[(yy - 200) ** 2 / 30**2 + (xx - 60) ** 2 / 30**2 < 1] = 2
    sketch = sketch_from_mask(mask)
    again = normalize_sketch(sketch, 256)
    assert distance_to_ink(sketch)[again == INK].max() <= 1.5
    assert distance_to_ink(again)[sketch == INK].max() <= 1.5


def test_photograph_is_rejected():
    rng = np.random.default_rng(0)
    smooth = ndimage.gaussian_filter(rng.random((200, 200, 3)), (6, 6, 0))
    photo = ((smooth - smooth.min()) / np.ptp(smooth) * 255).astype(np.uint8)
    with pytest.raises(InputError, match="photograph"):
        normalize_sketch(photo)


def test_filled_shapes_are_rejected():
    image = Image.new("L", (200, 200), 255)
    ImageDraw.Draw(image).ellipse((30, 30, 170, 170), fill=0)
    with pytest.raises(InputError, match="photograph or filled shapes"):
        normalize_sketch(image)


def stroke_mask(side: int, width: int, shape: str) -> np.ndarray:
    image = Image.new("1", (side, side), 0)
    draw = ImageDraw.Draw(image)
    if shape == "lines":
        for k in range(1, 4):
            draw.line([(side * k // 4, side // 8), (side * k // 5, side * 7 // 8)], fill=1, width=width)
    else:
        draw.ellipse((side // 4, side // 4, side * 3 // 4, side * 3 // 4), fill=1)
    return np.asarray(image, dtype=bool)


@pytest.mark.parametrize("side, width", [(1024, 3), (1024, 24), (700, 9)])
def test_large_drawings_stroke_width_is_measured_within_the_reduction_factor(side, width):
    strokes = stroke_mask(side, width, "lines")
    full = strokes.sum() / morphology.thin(strokes).sum()
    assert abs(normalize.mean_stroke_width(strokes) - full) <= side // normalize.WIDTH_SIDE
    small = stroke_mask(250, width, "lines")
    assert normalize.mean_stroke_width(small) == small.sum() / morphology.thin(small).sum()  # measured as it is


def test_a_large_filled_shape_measures_wider_than_any_stroke():
    assert normalize.mean_stroke_width(stroke_mask(1024, 0, "disc")) > 0.05 * 1024


def test_large_filled_shapes_are_rejected_and_large_drawings_kept():
    image = Image.new("L", (1500, 1200), 255)
    ImageDraw.Draw(image).ellipse((300, 300, 1200, 900), fill=0)
    with pytest.raises(InputError, match="photograph or filled shapes"):
        normalize_sketch(image)
    lines = Image.fromarray(np.where(stroke_mask(1500, 4, "lines"), 0, 255).astype(np.uint8))
    assert (normalize_sketch(lines, 64) == INK).any()


def test_real_endoscopy_image_is_rejected_as_sketch(vocalfolds):
    path = sorted((vocalfolds / "images").glob("*.png"))[0]
    with pytest.raises(InputError, match="photograph"):
        normalize_sketch_file(path)


def test_grey_phantoms_are_rejected_as_photographs():
    from generation.phantom import image_seed, phantom_sample

    for index in range(50):
        grey = Image.fromarray(phantom_sample(image_seed(7, index), 128)[0]).convert("L")
        with pytest.raises(InputError, match="photograph"):
            normalize_sketch(grey, 64)


def test_grey_frames_are_photographs_and_free_hand_sketches_stay_sketches(vocalfolds):
    import io

    for path in sorted((vocalfolds / "images").glob("*.png"))[::4]:
        with pytest.raises(InputError, match="photograph"):
            normalize_sketch(Image.open(path).convert("L"), 64)
    sketches = sorted((vocalfolds.parent / "vocalfolds256-sketches" / "sketches").glob("*.png"))
    rng = np.random.default_rng(0)
    for path in sketches:
        drawn = np.asarray(Image.open(path).convert("L"))
        noisy = np.clip(drawn + rng.normal(0, 0.03 * 255, drawn.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(drawn).save(buffer, "JPEG", quality=40)
        for variant in (drawn, noisy, Image.open(io.BytesIO(buffer.getvalue()))):  # as drawn, scanned, compressed
            normalize_sketch(variant, 64)
    assert len(sketches) == 33


def test_specks_alone_are_an_empty_sketch():
    canvas = np.full((256, 256), 255, np.uint8)
    canvas[[10, 100, 200], [20, 150, 30]] = 0
    with pytest.raises(InputError, match="empty"):
        normalize_sketch(canvas)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"this is not an image", "not an image"),
        ("truncated", "corrupt or truncated"),
        ("huge", "over the 8192-pixel limit"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "sketch.png"
    if content == "truncated":
        render("L", True, 300, 300, [((0, 0), (299, 299))], 3).save(path)
        path.write_bytes(path.read_bytes()[:200])
    elif content == "huge":
        Image.new("1", (9000, 8)).save(path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message) as error:
        normalize_sketch_file(path)
    assert "\n" not in str(error.value)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        open_image(tmp_path)


def test_cli_bad_sketch_exits_nonzero_with_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "normalize", str(bad), "--out", str(tmp_path / "out.png")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "not an image" in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_cli_normalize_writes_canonical_sketch(tmp_path):
    source = tmp_path / "drawn.png"
    render("RGBA", True, 400, 300, [((20, 20), (380, 280))], 6).save(source)
    out = tmp_path / "canonical.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "normalize", str(source), "--out", str(out), "--size", "128"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    written = np.asarray(Image.open(out))
    assert written.shape == (128, 128) and (written == INK).any()


def test_large_images_are_reduced_in_strips_to_the_same_pixels_as_at_once():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (WORK_SIDE + 37, 2 * WORK_SIDE + 5, 4), np.uint8)
    palette = Image.fromarray(rgba[..., 0]).convert("P")
    palette.info["transparency"] = 7
    for image, mode in ((Image.fromarray(rgba, "RGBA"), "RGBA"), (Image.fromarray(rgba[..., 0]), "RGB"), (palette, "RGBA")):
        reduced = reduce_to_work_side(image)
        assert max(reduced.size) <= WORK_SIDE and reduced.mode == mode
        assert np.array_equal(np.asarray(reduced), np.asarray(image.convert(mode).reduce(3)))
    small = Image.fromarray(rgba[:100, :100])
    assert reduce_to_work_side(small) is small
