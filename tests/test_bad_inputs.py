"""A corpus of bad inputs through every command and the server.

Each bad input must give one line saying what is wrong, a non-zero exit (or a 4xx answer), no
traceback, and leave the catalog and the index exactly as they were.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import sqlite3
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from generation.dataset import ImageDataset
from generation.phantom import phantom_sample

runner = CliRunner()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds none: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """name -> a bad file (or a path that is not one)."""
    root = tmp_path_factory.mktemp("corpus")
    image, _ = phantom_sample(5, 128)
    good = png_bytes(image)
    files = {
        "empty.png": b"",
        "text.png": b"hello, this is not a picture\n",
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "truncated.png": good[: len(good) // 2],
        "bomb.png": png_header_only(20000, 20000),
        "too_wide.png": png_bytes(np.full((4, 9000), 255, np.uint8)),
        "fake.jpg": b"\xff\xd8\xff\xe0 not a jpeg",
    }
    corpus = {}
    for name, data in files.items():
        (root / name).write_bytes(data)
        corpus[name] = root / name
    (root / "a_folder.png").mkdir()
    corpus["a_folder.png"] = root / "a_folder.png"
    corpus["missing.png"] = root / "missing.png"
    return corpus


@pytest.fixture(scope="module")
def not_sketches(tmp_path_factory, tiny_chain) -> dict[str, Path]:
    """Valid images that are not sketches: a blank canvas and photographs (colour and grey)."""
    root = tmp_path_factory.mktemp("not_sketches")
    photo = ImageDataset(tiny_chain[0]).image(0)
    images = {
        "blank.png": np.full((256, 256), 255, np.uint8),
        "photo.png": photo,
        "grey_photo.png": np.asarray(Image.fromarray(photo).convert("L")),
    }
    for name, pixels in images.items():
        Image.fromarray(pixels).save(root / name)
    return {name: root / name for name in images}


@pytest.fixture(scope="module")
def workspace(tiny_chain, tmp_path_factory) -> Path:
    data, bundle, _ = tiny_chain
    archive = tmp_path_factory.mktemp("archive") / "images"
    shutil.copytree(data / "images", archive)
    workspace = archive.parent / "ws"
    result = runner.invoke(app, ["index", str(archive), "--workspace", str(workspace), "--bundle", str(bundle), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return workspace


def stored_state(workspace: Path) -> str:
    """Everything the workspace stores: the catalog's rows and the index file's digest."""
    with sqlite3.connect(workspace / "catalog.sqlite") as connection:
        rows = "\n".join(connection.iterdump())
    index_files = sorted(p for p in workspace.iterdir() if p.suffix in (".faiss", ".index"))
    return rows + "".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in index_files)


def assert_one_line_failure(result, *words: str) -> None:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no uncaught exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


BAD_FILES = ["empty.png", "text.png", "corrupt.png", "truncated.png", "bomb.png", "too_wide.png", "fake.jpg",
             "a_folder.png", "missing.png"]


@pytest.mark.parametrize("name", BAD_FILES)
def test_search_with_a_bad_sketch_file(workspace, corpus, name, tmp_path):
    before = stored_state(workspace)
    result = runner.invoke(app, ["search", str(corpus[name]), "--workspace", str(workspace), "--device", "cpu"])
    assert_one_line_failure(result, str(corpus[name]))
    assert stored_state(workspace) == before


@pytest.mark.parametrize("name", ["blank.png", "photo.png", "grey_photo.png"])
def test_search_with_what_is_not_a_sketch(workspace, not_sketches, name):
    before = stored_state(workspace)
    result = runner.invoke(app, ["search", str(not_sketches[name]), "--workspace", str(workspace), "--device", "cpu"])
    assert_one_line_failure(result)
    assert stored_state(workspace) == before


@pytest.mark.parametrize("name", BAD_FILES)
def test_generate_and_normalize_with_a_bad_sketch_file(tiny_chain, corpus, name, tmp_path):
    bundle = tiny_chain[1]
    for args in (["generate", str(corpus[name]), "--out", str(tmp_path / "g.png"), "--bundle", str(bundle), "--device", "cpu"],
                 ["normalize", str(corpus[name]), "--out", str(tmp_path / "n.png")]):
        assert_one_line_failure(runner.invoke(app, args), str(corpus[name]))
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "n.png").exists()


@pytest.mark.parametrize("name", BAD_FILES)
def test_sketch_and_freehand_with_a_bad_file(tiny_chain, corpus, name, tmp_path):
    bundle = tiny_chain[1]
    for args in (["sketch", str(corpus[name]), "--out", str(tmp_path / "s"), "--bundle", str(bundle), "--device", "cpu"],
                 ["freehand", str(corpus[name]), "--out", str(tmp_path / "f")]):
        result = runner.invoke(app, args)
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in result.output and str(corpus[name]) in result.output


def test_index_of_the_corpus_skips_each_file_with_its_reason_and_keeps_the_archive(tiny_chain, workspace, corpus, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in BAD_FILES:
        if corpus[name].is_file():
            shutil.copy(corpus[name], folder / name)
    before = stored_state(workspace)
    result = runner.invoke(app, ["index", str(folder), "--workspace", str(workspace), "--bundle", str(tiny_chain[1]), "--device", "cpu"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "added 0" in result.output
    for path in folder.iterdir():
        assert f"skipped {path}" in result.output or f"{path}:" in result.output, path.name
    assert stored_state(workspace) == before


@pytest.mark.parametrize("target", ["missing", "file_not_image"])
def test_index_of_a_wrong_path_stores_nothing(tiny_chain, workspace, corpus, target):
    path = corpus["missing.png"] if target == "missing" else corpus["text.png"]
    before = stored_state(workspace)
    result = runner.invoke(app, ["index", str(path), "--workspace", str(workspace), "--bundle", str(tiny_chain[1]), "--device", "cpu"])
    assert "Traceback" not in result.output
    assert result.exit_code != 0 or "skipped" in result.output, result.output
    assert stored_state(workspace) == before


def test_server_answers_each_bad_upload_with_one_line(workspace, corpus, not_sketches):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from retrieval.search import Retriever
    from retrieval.server import create_app

    before = stored_state(workspace)
    with Retriever(workspace, device="cpu") as retriever, TestClient(create_app(retriever)) as client:
        for path in [*corpus.values(), *not_sketches.values()]:
            data = path.read_bytes() if path.is_file() else b""
            response = client.post("/api/search", files={"sketch": (path.name, data, "image/png")}, data={"k": "3"})
            assert 400 <= response.status_code < 500, (path.name, response.status_code)
            error = response.json()["error"]
            assert error and "\n" not in error and "Traceback" not in error, (path.name, error)
    assert stored_state(workspace) == before


def test_a_damaged_bundle_is_refused_by_every_command_that_loads_it(tiny_chain, workspace, tmp_path):
    data, bundle, _ = tiny_chain
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged, ignore=shutil.ignore_patterns("cache", "samples", "*checkpoint*"))
    with open(damaged / "encoder.safetensors", "r+b") as handle:  # one flipped bit in the last weight
        handle.seek(-3, 2)
        byte = handle.read(1)
        handle.seek(-3, 2)
        handle.write(bytes([byte[0] ^ 0x10]))
    sketch = tmp_path / "sketch.png"
    Image.fromarray(np.pad(np.full((60, 60), 255, np.uint8), 34)).save(sketch)
    before = stored_state(workspace)
    for args in (["generate", str(sketch), "--out", str(tmp_path / "g.png"), "--bundle", str(damaged), "--device", "cpu"],
                 ["index", str(data / "images"), "--workspace", str(tmp_path / "new_ws"), "--bundle", str(damaged), "--device", "cpu"],
                 ["search", str(sketch), "--workspace", str(workspace), "--bundle", str(damaged), "--device", "cpu"]):
        assert_one_line_failure(runner.invoke(app, args), "encoder.safetensors", "re-download")
    assert stored_state(workspace) == before
    assert not (tmp_path / "new_ws" / "catalog.sqlite").exists()


def test_serve_refuses_an_audit_log_it_cannot_append_to_before_loading(workspace, tmp_path):
    pytest.importorskip("fastapi")
    result = runner.invoke(app, ["serve", "--workspace", str(workspace), "--audit-log", str(tmp_path), "--port", "8799"])
    assert_one_line_failure(result, "is a folder; give --audit-log a file")
