"""The command line on bad input: user-controlled text printed as written, bad numbers and output
paths refused in one line (exit 2), folders done despite a bad file (exit 1), and the texts a new
user reads first."""

import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from generation.sketch import sketch_from_mask

runner = CliRunner()


def refused(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def line_sketch(path, side: int = 128) -> None:
    sketch = np.full((side, side), 255, np.uint8)
    sketch[side // 4 : 3 * side // 4, side // 2] = 0
    sketch[side // 2, side // 4 : 3 * side // 4] = 0
    Image.fromarray(sketch).save(path)


def two_region_mask(side: int = 64) -> np.ndarray:
    mask = np.zeros((side, side), np.uint8)
    mask[8:40, 8:40] = 1
    mask[30:60, 20:50] = 2
    return mask


LONG_NAME = "a_file_name_long_enough_to_need_more_than_the_eighty_columns_of_a_terminal.png"


def test_paths_print_as_written_whole_and_unwrapped(tiny_chain, tmp_path):
    data, bundle, _ = tiny_chain
    archive = tmp_path / "archive"
    images = sorted((data / "images").glob("*.png"))
    (archive / "scan[").mkdir(parents=True)
    shutil.copy(images[0], archive / "scan[" / "1].png")  # the path holds "[/1]", a closing tag to rich
    shutil.copy(images[1], archive / "[bold red]x.png")
    shutil.copy(images[2], archive / LONG_NAME)
    workspace = ["--workspace", str(tmp_path / "ws"), "--device", "cpu"]
    indexed = runner.invoke(app, ["index", str(archive), "--bundle", str(bundle), *workspace])
    assert indexed.exit_code == 0 and "added 3" in indexed.output, indexed.output
    sketch = tmp_path / "query.png"
    line_sketch(sketch)
    result = runner.invoke(app, ["search", str(sketch), "-k", "3", *workspace])
    assert result.exit_code == 0, result.output
    assert f"paths under {archive}/" in result.output
    for name in ("scan[/1].png", "[bold red]x.png", LONG_NAME):
        assert name in result.output, result.output
    assert "searched in " in result.output and ", most of it in " in result.output


@pytest.mark.parametrize("args, message", [
    (["train", "generator", "--data", "d", "--out", "o", "--kimg", "inf"], "--kimg inf: give a finite number"),
    (["train", "moco", "--data", "d", "--out", "o", "--lr", "inf"], "--lr inf: give a finite number"),
    (["evaluate", "--data", "d", "--strengths", "0,nan"], "--strengths '0,nan': give numbers between 0 and 2"),
])
def test_non_finite_numbers_are_refused(args, message):
    refused(runner.invoke(app, args), message)


def test_nan_in_a_bounded_option_is_a_usage_error():
    result = runner.invoke(app, ["search", "q.png", "--lambda", "nan"])
    assert result.exit_code == 2 and "Invalid value for '--lambda'" in result.output and "Traceback" not in result.output


def test_non_finite_vector_weights_are_refused(tiny_chain, tmp_path):
    _, bundle, _ = tiny_chain
    result = runner.invoke(app, ["index", str(tmp_path), "--workspace", str(tmp_path / "ws"), "--bundle", str(bundle),
                                 "--weights", "sketch=nan,code=1,image=1", "--device", "cpu"])
    refused(result, "every weight must be a finite number")
    assert not (tmp_path / "ws").exists()


def test_bad_output_paths_are_one_line_errors(tmp_path):
    sketch = tmp_path / "sketch.png"
    line_sketch(sketch)
    folder, file = tmp_path / "folder", tmp_path / "file.txt"
    folder.mkdir()
    file.write_text("not a folder")
    refused(runner.invoke(app, ["normalize", str(sketch), "--out", str(folder)]), f"--out {folder}: is a folder")
    refused(runner.invoke(app, ["normalize", str(sketch), "--out", str(tmp_path / "x.xyz")]), "unknown image type .xyz")
    refused(runner.invoke(app, ["normalize", str(sketch), "--out", str(file / "x.png")]), f"{file} is a file, not a folder")
    refused(runner.invoke(app, ["generate", str(sketch), "--out", str(folder)]), f"--out {folder}: is a folder")
    refused(runner.invoke(app, ["search", str(sketch), "--out", str(file)]), f"--out {file}: is a file")
    refused(runner.invoke(app, ["sketch", str(sketch), "--out", str(file)]), f"--out {file}: is a file")
    refused(runner.invoke(app, ["freehand", str(sketch), "--out", str(file)]), f"--out {file}: is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder", "sketch.png"]


def test_freehand_skips_a_bad_file_and_does_the_rest(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "a_broken.png").write_bytes(b"not a png")
    Image.fromarray(two_region_mask()).save(masks / "b.png")
    Image.fromarray(two_region_mask()[::-1]).save(masks / "c.png")
    result = runner.invoke(app, ["freehand", str(masks), "--out", str(tmp_path / "out"), "--strength", "0"])
    assert result.exit_code == 1, result.output
    assert "wrote 2 sketches" in result.output and "skipped 1" in result.output and "a_broken.png" in result.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "b.png")), sketch_from_mask(two_region_mask()))
    assert (tmp_path / "out" / "c.png").is_file() and not (tmp_path / "out" / "a_broken.png").exists()


def test_sketch_skips_a_bad_file_and_does_the_rest(tiny_chain, tmp_path):
    data, bundle, _ = tiny_chain
    source = tmp_path / "images"
    source.mkdir()
    (source / "a_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for image in sorted((data / "images").glob("*.png"))[:2]:
        shutil.copy(image, source / image.name)
    out = tmp_path / "out"
    result = runner.invoke(app, ["sketch", str(source), "--out", str(out), "--bundle", str(bundle), "--size", "64", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "wrote 2 masks and sketches" in result.output and "skipped " in result.output and "a_broken.png" in result.output
    assert len(list((out / "sketches").glob("*.png"))) == len(list((out / "masks").glob("*.png"))) == 2


def test_demo_says_it_reuses_a_folder_and_writes_images_one_can_look_at(tiny_chain, tmp_path):
    _, bundle, _ = tiny_chain
    command = ["demo", "--out", str(tmp_path / "demo"), "--bundle", str(bundle), "--images", "12", "--device", "cpu"]
    first = runner.invoke(app, command)
    assert first.exit_code == 0 and "reusing" not in first.output, first.output
    again = runner.invoke(app, command)
    assert again.exit_code == 0 and f"reusing the phantom archive in {tmp_path / 'demo' / 'archive'}" in again.output
    for name in ("sketch.png", "generated.png"):
        picture = Image.open(tmp_path / "demo" / name)
        width, height = (int(side) for side in picture.text["raw size"].split("x"))
        assert picture.size[0] >= 200 and picture.size[0] % width == 0 and picture.size == (picture.size[0], picture.size[0] * height // width)


def test_help_is_whole_at_80_columns():
    result = runner.invoke(app, ["search", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # help lines wrap between words
    assert "$SKETCH2MEDI_WORKSPACE, else ~/.local/share/sketch2medi/workspace" in text
    assert "DICE / 100" in text and "…" not in text and "<bool>" not in text
    assert "--device <str> auto (the GPU if there is one)" in text
    listing = " ".join(runner.invoke(app, ["--help"], env={"COLUMNS": "80"}, terminal_width=80).output.split())
    assert "demo Generate a phantom archive, index it, sketch one image free-hand, search, show the results." in listing
    assert "train Train the networks (each writes safetensors + JSON into a bundle folder)." in listing


def test_a_device_torch_cannot_use_is_refused_in_one_line(tiny_chain, tmp_path, monkeypatch):
    data, bundle, _ = tiny_chain
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for device, message in (("cuda", "--device cuda: torch sees no CUDA GPU here; use --device cpu (or auto)"),
                            ("cuda:1", "--device cuda:1: torch sees no CUDA GPU here"),
                            ("tpu", "unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
                            ("mps", "unknown device 'mps'")):
        refused(runner.invoke(app, ["index", str(data / "images"), "--workspace", str(tmp_path / "ws"), "--bundle", str(bundle), "--device", device]), message)
    assert not (tmp_path / "ws").exists()
