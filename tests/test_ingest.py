"""Indexing archives into a workspace: search finds each image, re-runs are incremental, duplicates are
stored once, bad files are skipped, kill -9 loses nothing committed, torchrun gives the same result,
DICOM frames are windowed, and PostgreSQL behaves like SQLite."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import fresh_postgres_database
from PIL import Image

import indexing.vector_index as vector_index
from generation.bundle import write_manifest
from generation.errors import InputError
from indexing import files
from indexing.catalog import Catalog
from indexing.embedding import EmbeddedBatch
from indexing.ingest import IndexSummary, index_folders
from indexing.vector_index import VectorIndex
from indexing.workspace import catalog_url, faiss_path, open_workspace_for_search, open_workspace_for_writing, resolve_workspace

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


class FakeEmbedder:
    """Deterministic stand-in for C and S: the 8x8 grey thumbnail, centred and normalised, and a
    16x16 label map of its bright (1) and dark (2) parts."""

    def __init__(self, bundle_id: str = "fake-bundle", side: int = 8):
        self.bundle_id, self.side, self.dim = bundle_id, side, side * side
        self.calls = self.embedded = 0

    def embed_images(self, images: list[np.ndarray]) -> EmbeddedBatch:
        self.calls += 1
        self.embedded += len(images)
        return EmbeddedBatch(np.stack([self.vector(i) for i in images]), [self.label_map(i) for i in images])

    def vector(self, image: np.ndarray) -> np.ndarray:
        grey = Image.fromarray(image).convert("L").resize((self.side, self.side), Image.BOX)
        vector = np.asarray(grey, np.float32).reshape(-1)
        vector -= vector.mean()
        norm = np.linalg.norm(vector)
        return vector / norm if norm > 0 else np.eye(1, self.dim, dtype=np.float32)[0]

    @staticmethod
    def label_map(image: np.ndarray) -> np.ndarray:
        grey = np.asarray(Image.fromarray(image).convert("L").resize((16, 16), Image.BOX))
        return np.where(grey > 150, 1, np.where(grey < 90, 2, 0)).astype(np.uint8)


def blocky(seed: int, shape: tuple[int, int] = (48, 48)) -> np.ndarray:
    """A distinct image: a random 8x8 colour grid, enlarged."""
    grid = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(grid).resize(shape[::-1], Image.NEAREST))


def write_images(folder: Path, count: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(start, start + count):
        path = folder / f"image_{seed:03d}.png"
        Image.fromarray(blocky(seed)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    """None (the workspace's own SQLite catalog), or a fresh database on the test PostgreSQL server."""
    if request.param == "sqlite":
        yield None
    else:
        with fresh_postgres_database() as url:
            yield url


def assert_consistent(workspace: Path, db_url: str | None, archive_files: list[Path]) -> None:
    """Catalog ids == saved index ids, and every archive file is in the catalog exactly once."""
    with Catalog(catalog_url(workspace, db_url), create=False) as catalog:
        saved = VectorIndex.load(faiss_path(workspace, catalog))
        np.testing.assert_array_equal(saved.ids(), catalog.ids())
        entries = catalog.entries()
        assert sorted(entries) == sorted(str(p) for p in archive_files)
        assert all(len(e) == 1 for e in entries.values())


def test_each_image_ranks_first_for_its_own_vector(tmp_path, db_url):
    archive = tmp_path / "archive"
    paths = write_images(archive, 5) + write_images(archive / "nested" / "deeper", 2, start=5)
    Image.fromarray(blocky(20)).save(archive / "photo.jpg", quality=95)
    Image.fromarray(blocky(21)).save(archive / "scan.tif")
    Image.fromarray(blocky(22)).save(archive / "old.bmp")
    grey16 = (blocky(23)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(archive / "grey16.png")
    paths += [archive / n for n in ("photo.jpg", "scan.tif", "old.bmp", "grey16.png")]
    (archive / "notes.txt").write_text("not an image, not a candidate")
    embedder = FakeEmbedder()

    summary = index_folders(archive, tmp_path / "ws", embedder, db_url=db_url, batch_size=3)
    assert (summary.added, summary.unchanged, summary.duplicates, summary.skipped) == (11, 0, 0, [])
    assert summary.total == 11 and embedder.embedded == 11

    with open_workspace_for_search(tmp_path / "ws", db_url=db_url) as workspace:
        assert workspace.bundle_id == "fake-bundle" and workspace.index.ntotal == 11
        for path in paths:
            image = files.load(path)
            scores, ids = workspace.index.search(embedder.vector(image)[None], 3)
            record = workspace.records_for(ids[0])[int(ids[0, 0])]
            assert record.path == str(path.resolve()) and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
            assert (record.height, record.width, record.size) == (*image.shape[:2], path.stat().st_size)
            np.testing.assert_array_equal(workspace.masks_for(ids[0, :1])[int(ids[0, 0])], embedder.label_map(image))
        modalities = {Path(r.path).suffix: r.modality for r in workspace.records_for(workspace.index.ids()).values()}
        assert modalities == {".png": "PNG", ".jpg": "JPEG", ".tif": "TIFF", ".bmp": "BMP"}


def test_a_second_run_adds_nothing(tmp_path, db_url):
    archive_files = write_images(tmp_path / "archive", 6)
    index_folders(tmp_path / "archive", tmp_path / "ws", FakeEmbedder(), db_url=db_url, batch_size=4)
    with Catalog(catalog_url(tmp_path / "ws", db_url)) as catalog:
        before = catalog.vectors()

    embedder = FakeEmbedder()
    summary = index_folders(tmp_path / "archive", tmp_path / "ws", embedder, db_url=db_url, batch_size=4)
    assert (summary.added, summary.unchanged, summary.total, embedder.embedded) == (0, 6, 6, 0)

    # A new mtime with the same bytes: hashed again, found unchanged, not embedded again.
    os.utime(archive_files[2], ns=(10**18, 10**18))
    summary = index_folders(tmp_path / "archive", tmp_path / "ws", embedder, db_url=db_url)
    assert (summary.added, summary.unchanged, embedder.embedded) == (0, 6, 0)
    with Catalog(catalog_url(tmp_path / "ws", db_url)) as catalog:
        after = catalog.vectors()
        assert catalog.entries()[str(archive_files[2])][0].mtime_ns == 10**18
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert_consistent(tmp_path / "ws", db_url, archive_files)


def test_duplicate_content_is_stored_once(tmp_path, db_url):
    archive = tmp_path / "archive"
    originals = write_images(archive, 4)
    index_folders(archive, tmp_path / "ws", FakeEmbedder(), db_url=db_url)
    shutil.copy(originals[0], archive / "copy_of_0.png")  # same content as an indexed entry
    (archive / "new").mkdir()
    for name in ("twin_a.png", "twin_b.png"):  # two new files with the same content, in one batch
        Image.fromarray(blocky(99)).save(archive / "new" / name)
    embedder = FakeEmbedder()
    summary = index_folders(archive, tmp_path / "ws", embedder, db_url=db_url)
    assert (summary.added, summary.duplicates, summary.unchanged, embedder.embedded) == (1, 2, 4, 1)

    with open_workspace_for_search(tmp_path / "ws", db_url=db_url) as workspace:
        assert workspace.index.ntotal == 5
        _, ids = workspace.index.search(embedder.vector(blocky(0))[None], 2)
        record = workspace.records_for(ids[0])[int(ids[0, 0])]
        assert record.path == str(originals[0]) and record.aliases == (str(archive / "copy_of_0.png"),)
        assert workspace.records_for(ids[0])[int(ids[0, 1])].path != record.path  # the copy is not a second hit

    originals[0].unlink()  # the alias keeps the entry alive, now under the other path
    summary = index_folders(archive, tmp_path / "ws", embedder, db_url=db_url)
    assert (summary.added, summary.removed) == (0, 0)
    with open_workspace_for_search(tmp_path / "ws", db_url=db_url) as workspace:
        assert workspace.records_for([int(ids[0, 0])])[int(ids[0, 0])].path == str(archive / "copy_of_0.png")


def test_unreadable_files_are_skipped_with_a_reason(tmp_path, db_url):
    archive = tmp_path / "archive"
    good = write_images(archive, 3)
    truncated = archive / "truncated.png"
    Image.fromarray(blocky(50, (200, 200))).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    (archive / "letter.png").write_text("Dear colleague, this is not a picture.")
    (archive / "empty.jpg").write_bytes(b"")
    (archive / "fake.dcm").write_bytes(b"\0" * 200)
    summary = index_folders(archive, tmp_path / "ws", FakeEmbedder(), db_url=db_url)
    reasons = {path.name: why for path, why in summary.skipped}
    assert set(reasons) == {"truncated.png", "letter.png", "empty.jpg", "fake.dcm"}
    assert "truncated" in reasons["truncated.png"] and "not an image" in reasons["letter.png"]
    assert all(why and "\n" not in why for why in reasons.values())
    assert (summary.added, summary.total) == (3, 7)
    assert_consistent(tmp_path / "ws", db_url, good)
    # skipped again, not crashed on, by the next run
    again = index_folders(archive, tmp_path / "ws", FakeEmbedder(), db_url=db_url)
    assert (again.unchanged, len(again.skipped)) == (3, 4)


def test_a_changed_file_is_reindexed_and_a_vanished_one_removed(tmp_path, db_url):
    archive_files = write_images(tmp_path / "archive", 5)
    embedder = FakeEmbedder()
    index_folders(tmp_path / "archive", tmp_path / "ws", embedder, db_url=db_url)
    with open_workspace_for_search(tmp_path / "ws", db_url=db_url) as workspace:
        old_id = int(workspace.index.search(embedder.vector(blocky(1))[None], 1)[1][0, 0])

    Image.fromarray(blocky(77)).save(archive_files[1])  # new content under the same name
    archive_files[4].unlink()
    summary = index_folders(tmp_path / "archive", tmp_path / "ws", embedder, db_url=db_url)
    assert (summary.added, summary.unchanged, summary.removed) == (1, 3, 2)
    with open_workspace_for_search(tmp_path / "ws", db_url=db_url) as workspace:
        assert old_id not in workspace.index.ids() and workspace.index.ntotal == 4
        scores, ids = workspace.index.search(embedder.vector(blocky(77))[None], 1)
        assert workspace.records_for(ids[0])[int(ids[0, 0])].path == str(archive_files[1])
        assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        assert workspace.index.search(embedder.vector(blocky(1))[None], 1)[0][0, 0] < 0.9
    assert_consistent(tmp_path / "ws", db_url, archive_files[:4])


def test_a_dataset_folder_indexes_its_images_not_its_masks(tmp_path):
    from generation.phantom import write_phantom_dataset

    write_phantom_dataset(tmp_path / "phantom", n=3, size=64, seed=0)
    summary = index_folders(tmp_path / "phantom", tmp_path / "ws", FakeEmbedder())
    assert summary.added == 3 and not summary.skipped
    assert_consistent(tmp_path / "ws", None, sorted((tmp_path / "phantom" / "images").iterdir()))


def test_progress_is_reported_after_each_commit(tmp_path):
    archive_files = write_images(tmp_path / "archive", 7)
    reports = []

    def on_progress(done: int, total: int, path: Path) -> None:
        with Catalog(catalog_url(tmp_path / "ws"), create=False) as reader:  # another connection
            assert str(path) in reader.entries()  # reported only once committed
        reports.append((done, total, path))

    index_folders(tmp_path / "archive", tmp_path / "ws", FakeEmbedder(), batch_size=3, on_progress=on_progress)
    assert reports == [(i + 1, 7, p) for i, p in enumerate(archive_files)]


def test_a_workspace_of_another_bundle_is_refused(tmp_path):
    write_images(tmp_path / "archive", 2)
    index_folders(tmp_path / "archive", tmp_path / "ws", FakeEmbedder("bundle-a"))
    with pytest.raises(InputError, match="'bundle-a', not 'bundle-b'.*new workspace") as caught:
        index_folders(tmp_path / "archive", tmp_path / "ws", FakeEmbedder("bundle-b"))
    assert "\n" not in str(caught.value)
    with pytest.raises(InputError, match="dimensional"):
        index_folders(tmp_path / "archive", tmp_path / "ws", FakeEmbedder("bundle-a", side=4))
    with pytest.raises(InputError, match="bundle 'bundle-a', not 'bundle-b'"):
        open_workspace_for_search(tmp_path / "ws", bundle_id="bundle-b")
    with open_workspace_for_search(tmp_path / "ws", bundle_id="bundle-a") as workspace:
        assert workspace.index.ntotal == 2


def test_the_index_file_is_repaired_from_the_catalog(tmp_path):
    archive_files = write_images(tmp_path / "archive", 6)
    embedder = FakeEmbedder()
    index_folders(tmp_path / "archive", tmp_path / "ws", embedder)
    with Catalog(catalog_url(tmp_path / "ws"), create=False) as catalog:
        path, catalog_ids = faiss_path(tmp_path / "ws", catalog), catalog.ids()

    stale = VectorIndex.load(path)  # as if saved mid-run, then edited by a later, killed run
    stale.remove(catalog_ids[:2])
    stale.add(np.eye(1, 64, dtype=np.float32), np.array([10**6]))
    stale.save(path)
    with open_workspace_for_search(tmp_path / "ws") as workspace:
        np.testing.assert_array_equal(workspace.index.ids(), catalog_ids)
        _, ids = workspace.index.search(embedder.vector(blocky(0))[None], 1)
        assert workspace.records_for(ids[0])[int(ids[0, 0])].path == str(archive_files[0])
    np.testing.assert_array_equal(VectorIndex.load(path).ids(), catalog_ids)  # and the repair was saved

    for damage in (lambda: path.unlink(), lambda: path.write_bytes(b"garbage")):
        damage()
        with open_workspace_for_search(tmp_path / "ws") as workspace:
            np.testing.assert_array_equal(workspace.index.ids(), catalog_ids)
    summary = index_folders(tmp_path / "archive", tmp_path / "ws", embedder)
    assert summary.unchanged == 6
    assert_consistent(tmp_path / "ws", None, archive_files)


# Run by test_kill_9_in_the_middle_of_a_run: embeds one batch, then blocks in the second until killed.
# The head of a script that a test kills -9: an embedder that blocks in its second batch (after
# touching `blocked`) and a progress report that appends each reported entry to `progress`.
BLOCKING_RUN = """
import sys, time
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from test_ingest import FakeEmbedder

source, workspace, progress, blocked = sys.argv[3:7]

class Blocking(FakeEmbedder):
    def embed_images(self, images):
        if self.calls == 1:
            Path(blocked).touch()
            while True:
                time.sleep(1)
        return super().embed_images(images)

def report(done, total, entry):
    with open(progress, "a") as handle:
        handle.write(f"{entry}\\n")
"""

KILLED_RUN = BLOCKING_RUN + """
from indexing.ingest import index_folders

db_url = sys.argv[7]
index_folders(source, workspace, Blocking(), db_url=None if db_url == "-" else db_url, batch_size=2, on_progress=report)
"""


def test_kill_9_in_the_middle_of_a_run_loses_nothing_reported(tmp_path, db_url):
    archive_files = write_images(tmp_path / "archive", 9)
    workspace, progress, blocked = tmp_path / "ws", tmp_path / "progress.txt", tmp_path / "blocked"
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment["OMP_NUM_THREADS"] = "1"
    arguments = [str(TESTS), str(ROOT), str(tmp_path / "archive"), str(workspace), str(progress), str(blocked), db_url or "-"]
    process = subprocess.Popen([sys.executable, str(script), *arguments], env=environment, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not blocked.exists():
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "the indexing process never reached its second batch"
            time.sleep(0.05)
        reported = progress.read_text().split()
        assert len(reported) == 2

        # A search opened now, while the run holds the workspace, sees the committed batch.
        with open_workspace_for_search(workspace, db_url=db_url) as reader:
            np.testing.assert_array_equal(reader.index.ids(), reader.catalog.ids())
            assert sorted(r.path for r in reader.records_for(reader.index.ids()).values()) == reported
            _, ids = reader.index.search(FakeEmbedder().vector(blocky(1))[None], 1)
            assert reader.records_for(ids[0])[int(ids[0, 0])].path == str(archive_files[1])
    finally:
        process.kill()  # SIGKILL: no cleanup of any kind
        process.wait()

    with Catalog(catalog_url(workspace, db_url), create=False) as catalog:
        assert set(reported) <= set(catalog.entries())  # nothing reported as indexed was lost
    embedder = FakeEmbedder()
    summary = index_folders(tmp_path / "archive", workspace, embedder, db_url=db_url, batch_size=2)
    assert (summary.unchanged, summary.added, embedder.embedded) == (2, 7, 7)
    assert_consistent(workspace, db_url, archive_files)


def test_a_catalog_from_a_newer_version_is_refused(tmp_path):
    write_images(tmp_path / "archive", 2)
    index_folders(tmp_path / "archive", tmp_path / "ws", FakeEmbedder())
    with Catalog(catalog_url(tmp_path / "ws")) as catalog:
        catalog.set_meta("schema_version", "999")
    for attempt in (lambda: index_folders(tmp_path / "archive", tmp_path / "ws", FakeEmbedder()),
                    lambda: open_workspace_for_search(tmp_path / "ws")):  # fmt: skip
        with pytest.raises(InputError, match="newer than this sketch2medi supports"):
            attempt()


def test_postgresql_and_sqlite_give_the_same_results(tmp_path):
    with fresh_postgres_database() as postgres_url:
        results = index_both(tmp_path, postgres_url)
    (summary_a, *a), (summary_b, *b) = results.values()
    assert summary_a == summary_b and summary_a.duplicates == 1 and len(summary_a.skipped) == 1
    for x, y in zip(a, b):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        elif isinstance(x, tuple):
            for u, v in zip(x, y):
                np.testing.assert_array_equal(u, v)
        elif x and isinstance(x[0], np.ndarray):
            for u, v in zip(x, y):
                np.testing.assert_array_equal(u, v)
        else:
            assert x == y


def index_both(tmp_path: Path, postgres_url: str) -> dict:
    archive = tmp_path / "archive"
    write_images(archive, 6)
    shutil.copy(archive / "image_000.png", archive / "again.png")
    (archive / "broken.png").write_text("x")
    results = {}
    for name, url in (("sqlite", None), ("postgresql", postgres_url)):
        summary = index_folders(archive, tmp_path / name, FakeEmbedder(), db_url=url, batch_size=4)
        with open_workspace_for_search(tmp_path / name, db_url=url) as workspace:
            ids, vectors = workspace.catalog.vectors()
            records = workspace.records_for(ids)
            rows = [(records[i].path, records[i].sha256, records[i].aliases, records[i].width) for i in ids]
            hits = workspace.index.search(FakeEmbedder().vector(blocky(3))[None], 7)
            masks = workspace.masks_for(ids)
            results[name] = (summary, ids, vectors, rows, hits, [masks[i] for i in ids])
    return results


def test_workspace_opening_errors(tmp_path, db_url):
    with pytest.raises(InputError, match="no such workspace"):
        open_workspace_for_search(tmp_path / "nowhere", db_url=db_url)
    write_images(tmp_path / "archive", 2)
    index_folders(tmp_path / "archive", tmp_path / "ws", FakeEmbedder(), db_url=db_url)
    if db_url is not None:  # the workspace remembers where its catalog is, without the password
        with pytest.raises(InputError, match="pass that database with --db-url"):
            open_workspace_for_search(tmp_path / "ws")
    with pytest.raises(InputError, match="no such file or folder"):
        index_folders(tmp_path / "missing", tmp_path / "ws", FakeEmbedder(), db_url=db_url)
    with pytest.raises(InputError, match="unknown index kind"):
        index_folders(tmp_path / "archive", tmp_path / "ws", FakeEmbedder(), db_url=db_url, index_kind="exact")


def test_index_kinds_can_be_chosen_and_are_kept(tmp_path):
    archive_files = write_images(tmp_path / "archive", 12)
    embedder = FakeEmbedder()
    index_folders(tmp_path / "archive", tmp_path / "ws", embedder, index_kind="hnsw")
    with open_workspace_for_search(tmp_path / "ws") as workspace:
        assert workspace.index.kind == "hnsw"
    Image.fromarray(blocky(50)).save(archive_files[0])  # a removal, which an HNSW graph handles by rebuilding
    summary = index_folders(tmp_path / "archive", tmp_path / "ws", embedder, index_kind="hnsw", batch_size=2)
    assert (summary.added, summary.removed) == (1, 1)
    assert_consistent(tmp_path / "ws", None, archive_files)
    index_folders(tmp_path / "archive", tmp_path / "ws", embedder, index_kind="ivf")  # rebuilt as ivf
    archive_files += write_images(tmp_path / "archive", 1, start=12)
    index_folders(tmp_path / "archive", tmp_path / "ws", embedder)  # auto keeps the chosen kind
    with open_workspace_for_search(tmp_path / "ws") as workspace:
        assert workspace.index.kind == "ivf" and workspace.index.ntotal == 13
        for seed, path in zip([50, *range(1, 13)], archive_files):
            _, ids = workspace.index.search(embedder.vector(blocky(seed))[None], 1)
            assert workspace.records_for(ids[0])[int(ids[0, 0])].path == str(path)
    assert_consistent(tmp_path / "ws", None, archive_files)


def test_resolve_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("SKETCH2MEDI_WORKSPACE", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert resolve_workspace(None) == tmp_path / "data" / "sketch2medi" / "workspace"
    monkeypatch.setenv("SKETCH2MEDI_WORKSPACE", str(tmp_path / "from_env"))
    assert resolve_workspace(None) == tmp_path / "from_env"
    assert resolve_workspace(tmp_path / "given") == tmp_path / "given"
    (tmp_path / "a_file").write_text("")
    with pytest.raises(InputError, match="is a file"):
        resolve_workspace(tmp_path / "a_file")


def test_a_search_workspace_follows_later_runs_through_the_catalog_generation(tmp_path, db_url):
    archive_files = write_images(tmp_path / "archive", 3)
    embedder = FakeEmbedder()
    index_folders(tmp_path / "archive", tmp_path / "ws", embedder, db_url=db_url, batch_size=2)
    with open_workspace_for_search(tmp_path / "ws", db_url=db_url) as workspace:
        assert workspace.generation == workspace.catalog.generation() == 2  # two batches added images
        assert workspace.refresh() is False
        archive_files += write_images(tmp_path / "archive", 2, start=3)
        Image.fromarray(blocky(50)).save(archive_files[0])  # replaced: its old image is deleted
        index_folders(tmp_path / "archive", tmp_path / "ws", embedder, db_url=db_url, batch_size=2)
        assert workspace.index.ntotal == 3  # what it opened with, until it refreshes
        assert workspace.refresh() is True and workspace.refresh() is False
        np.testing.assert_array_equal(workspace.index.ids(), workspace.catalog.ids())
        for seed, path in zip([50, 1, 2, 3, 4], archive_files):
            _, ids = workspace.index.search(embedder.vector(blocky(seed))[None], 1)
            assert workspace.records_for(ids[0])[int(ids[0, 0])].path == str(path)
        index_folders(tmp_path / "archive", tmp_path / "ws", embedder, db_url=db_url)  # nothing changes: nor does the generation
        assert workspace.refresh() is False


def test_runs_from_two_workspaces_into_one_postgresql_catalog_take_turns(tmp_path):
    write_images(tmp_path / "archive", 2)
    with fresh_postgres_database() as url:
        first = open_workspace_for_writing(tmp_path / "node0", "fake-bundle", 64, db_url=url)
        try:
            with pytest.raises(InputError, match=r": another index run is writing this catalog \(from another workspace or machine\); "
                                                 r"wait for it to finish$"):  # fmt: skip
                index_folders(tmp_path / "archive", tmp_path / "node1", FakeEmbedder(), db_url=url)
        finally:
            first.close()
        assert index_folders(tmp_path / "archive", tmp_path / "node1", FakeEmbedder(), db_url=url).added == 2


# Run under torchrun by test_torchrun_two_ranks_index_like_one_process.
DISTRIBUTED_RUN = """
import json, os, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import torch.distributed
from test_ingest import FakeEmbedder
from indexing.ingest import index_folders

embedder = FakeEmbedder()
summary = index_folders(sys.argv[3], sys.argv[4], embedder, batch_size=2)
with open(os.path.join(sys.argv[5], f"rank{os.environ['RANK']}.json"), "w") as handle:
    json.dump({"added": summary.added, "duplicates": summary.duplicates, "embedded": embedder.embedded}, handle)
torch.distributed.destroy_process_group()
"""


def write_sharded_archive(archive: Path) -> Path:
    """Nine images, a copy of one of them and a broken file: what the ranks of a run share out."""
    write_images(archive, 9)
    shutil.copy(archive / "image_004.png", archive / "same_as_4.png")
    (archive / "broken.png").write_text("x")
    return archive


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
@pytest.mark.slow  # starts two torchrun processes
def test_torchrun_two_ranks_index_like_one_process(tmp_path):
    archive = write_sharded_archive(tmp_path / "archive")
    script = tmp_path / "distributed_run.py"
    script.write_text(DISTRIBUTED_RUN)
    (tmp_path / "out").mkdir()
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script),
               str(TESTS), str(ROOT), str(archive), str(tmp_path / "ws2"), str(tmp_path / "out")]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["added"] == ranks[1]["added"] == 9  # every rank returns the summary
    assert ranks[0]["embedded"] > 0 and ranks[1]["embedded"] > 0  # both ranks embedded a share
    assert ranks[0]["embedded"] + ranks[1]["embedded"] == 9  # disjoint shares, nothing embedded twice

    single = index_folders(archive, tmp_path / "ws1", FakeEmbedder(), batch_size=2)
    assert (single.added, single.duplicates) == (9, 1)
    contents = []
    for name in ("ws1", "ws2"):
        with open_workspace_for_search(tmp_path / name) as workspace:
            ids, vectors = workspace.catalog.vectors()
            records = workspace.records_for(ids)
            contents.append((ids, vectors, [(records[i].path, records[i].sha256, records[i].aliases) for i in ids]))
            np.testing.assert_array_equal(workspace.index.ids(), ids)
    np.testing.assert_array_equal(contents[0][0], contents[1][0])
    np.testing.assert_array_equal(contents[0][1], contents[1][1])
    assert contents[0][2] == contents[1][2]


# Run on each "node" by the two-node tests: argv = tests, repo, archive, workspace, out folder, catalog URL.
# BUNDLE_ID names the bundle this node's embedder claims; on a node with HIDDEN_ARCHIVE set, that folder
# does not exist (as on a machine that does not mount the archive's storage).
MULTI_NODE_RUN = """
import json, os, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import torch.distributed
from test_ingest import FakeEmbedder
from generation.errors import InputError
from indexing.ingest import index_folders

hidden, exists = os.environ.get("HIDDEN_ARCHIVE"), os.path.exists
if hidden:
    os.path.exists = lambda path: not str(path).startswith(hidden) and exists(path)
embedder = FakeEmbedder(os.environ["BUNDLE_ID"])
try:
    summary = index_folders(sys.argv[3], sys.argv[4], embedder, db_url=sys.argv[6], batch_size=2)
    result = {"added": summary.added, "duplicates": summary.duplicates, "skipped": len(summary.skipped), "embedded": embedder.embedded}
except InputError as error:
    result = {"error": str(error)}
with open(os.path.join(sys.argv[5], f"rank{os.environ['RANK']}.json"), "w") as handle:
    json.dump(result, handle)
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_two_nodes(tmp_path: Path, archive: Path, db_url: str, node_env: list[dict[str, str]]) -> list[dict]:
    """`torchrun --nnodes 2` twice on loopback, one process per node, each from its own folder with its
    own environment additions; rank 0 is given tmp_path/ws as the workspace, rank 1 tmp_path/ws_node1."""
    script = tmp_path / "multi_node_run.py"
    script.write_text(MULTI_NODE_RUN)
    (tmp_path / "out").mkdir()
    port, nodes = free_port(), []
    for rank, extra in enumerate(node_env):
        node = tmp_path / f"node{rank}"
        node.mkdir()
        command = [TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                   "--master-port", str(port), str(script), str(TESTS), str(ROOT), str(archive),
                   str(tmp_path / ("ws" if rank == 0 else "ws_node1")), str(tmp_path / "out"), db_url]  # fmt: skip
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "BUNDLE_ID": "fake-bundle", **extra}
        nodes.append(subprocess.Popen(command, cwd=node, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))  # fmt: skip
    try:
        outputs = [node.communicate(timeout=1200)[0] for node in nodes]  # generous: a loaded CI machine starts torch slowly
    finally:
        for node in nodes:  # a launch left waiting for its peer must not outlive the test, nor its workers
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    results = []
    for rank in range(2):
        written = tmp_path / "out" / f"rank{rank}.json"
        assert written.is_file(), outputs[rank][-3000:]
        results.append(json.loads(written.read_text()))
    return results


def catalog_contents(db_url: str) -> tuple:
    """Everything a run writes to the catalog, without the time each image was added."""
    with Catalog(db_url, create=False) as catalog:
        ids, vectors = catalog.vectors()
        records = catalog.records(ids)
        rows = [(r.id, r.path, r.frame, r.sha256, r.size, r.mtime_ns, r.width, r.height, r.modality, r.aliases, r.meta)
                for r in (records[i] for i in ids)]  # fmt: skip
        masks = catalog.label_maps(ids)
        return ids, vectors, rows, catalog.entries(), [masks[i] for i in ids], catalog.get_meta("bundle_id")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
@pytest.mark.slow  # starts two torchrun processes
def test_two_nodes_index_into_one_postgresql_catalog_like_one_process(tmp_path):
    archive = write_sharded_archive(tmp_path / "archive")
    with fresh_postgres_database() as two_nodes, fresh_postgres_database() as one_process:
        ranks = run_two_nodes(tmp_path, archive, two_nodes, [{}, {}])
        embedded = [rank.pop("embedded") for rank in ranks]
        assert ranks[0] == ranks[1] == {"added": 9, "duplicates": 1, "skipped": 1}  # each node returns rank 0's summary
        assert min(embedded) > 0 and sum(embedded) == 9  # both nodes embedded a share, nothing twice
        assert not (tmp_path / "ws_node1").exists()  # only rank 0 opens a workspace
        index_folders(archive, tmp_path / "one", FakeEmbedder(), db_url=one_process, batch_size=2)
        got, want = catalog_contents(two_nodes), catalog_contents(one_process)
        with Catalog(two_nodes, create=False) as catalog:  # the index file on rank 0's node holds the catalog's ids
            np.testing.assert_array_equal(VectorIndex.load(faiss_path(tmp_path / "ws", catalog)).ids(), got[0])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-6)  # the fake embedder is exact; float tolerance for the real one
    assert got[2:4] == want[2:4]
    for a, b in zip(got[4], want[4]):
        np.testing.assert_array_equal(a, b)
    assert got[5] == want[5] == "fake-bundle"


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
@pytest.mark.slow  # starts two torchrun processes
@pytest.mark.parametrize("problem", ["another bundle", "no archive"])
def test_a_node_with_another_bundle_or_without_the_archive_stops_the_run_naming_it(tmp_path, problem):
    archive = tmp_path / "archive"
    write_images(archive, 4)
    node1 = {"BUNDLE_ID": "other-bundle"} if problem == "another bundle" else {"HIDDEN_ARCHIVE": str(archive)}
    with fresh_postgres_database() as url:
        ranks = run_two_nodes(tmp_path, archive, url, [{}, node1])
        with sa.create_engine(url).connect() as connection:
            assert sa.inspect(connection).get_table_names() == []  # stopped before the catalog was opened
    assert ranks[0] == ranks[1]  # every rank stops with the same one-line error
    if problem == "another bundle":
        expected = (r"rank 1 on \S+ embeds with bundle 'other-bundle' \(64 dimensions\), rank 0 on \S+ with 'fake-bundle' \(64\); "
                    r"give every node the same --bundle and --weights")  # fmt: skip
    else:
        expected = (rf"rank 1 on \S+ cannot see {re.escape(str(archive.resolve()))}: every node opens the archive's files by the path "
                    r"rank 0 found them under; put the archive on storage all nodes mount at that path, or index from one node")  # fmt: skip
    assert re.fullmatch(expected, ranks[0]["error"]), ranks[0]["error"]
    assert not (tmp_path / "ws").exists()


# -- DICOM -------------------------------------------------------------------------------------------


def dicom_dataset(modality: str, **tags):
    """An uncompressed Secondary Capture dataset with its file meta, `Modality` and `tags`; no pixels yet."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    dataset.Modality = modality
    for keyword, value in tags.items():
        setattr(dataset, keyword, value)
    return dataset


def write_dicom(path: Path, frames: np.ndarray, photometric: str = "MONOCHROME2", modality: str = "CT", **tags) -> Path:
    """A minimal uncompressed 16-bit signed greyscale DICOM file; `frames` is (H, W) or (F, H, W)."""
    pydicom = pytest.importorskip("pydicom")
    dataset = dicom_dataset(modality, **tags)
    dataset.Rows, dataset.Columns = frames.shape[-2:]
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
    if frames.ndim == 3:
        dataset.NumberOfFrames = frames.shape[0]
    dataset.PixelData = np.ascontiguousarray(frames, "<i2").tobytes()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        dataset.save_as(path, enforce_file_format=True)
    else:
        dataset.is_little_endian, dataset.is_implicit_VR = True, False
        dataset.save_as(path, write_like_original=False)
    return path


def test_dicom_rescale_and_window_from_the_file(tmp_path):
    # stored s -> 2 s - 1000 (Hounsfield units), shown through a window of 400 around 0
    stored = np.array([[0, 500, 550], [1000, 480, 520]], np.int16)
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope="2", RescaleIntercept="-1000",
                       WindowCenter="0", WindowWidth="400")  # fmt: skip
    image = files.load(path)
    assert image.shape == (2, 3, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 2]).all()
    # -1000 HU -> black, 0 -> mid grey, 100 -> 192 (linear in the window), 1000 -> white, -40 -> 102
    np.testing.assert_array_equal(image[..., 0], [[0, 128, 192], [255, 102, 153]])
    [record] = files.probe(path)
    assert (record.frame, record.modality, record.frames) == (0, "DICOM:CT", 1)


def test_multi_frame_dicom_gives_one_entry_per_frame(tmp_path):
    ramp = np.arange(16 * 16, dtype=np.int16).reshape(16, 16)
    frames = np.stack([ramp, ramp.T * 3 + 100, 2000 - ramp * 2])
    archive = tmp_path / "archive"
    archive.mkdir()
    # no suffix: found by the DICM magic; no window: each frame's own min/max; MONOCHROME1: inverted
    path = write_dicom(archive / "series_0001", frames, photometric="MONOCHROME1", modality="MR")
    loaded = [files.load(path, f)[..., 0] for f in range(3)]
    for image, frame in zip(loaded, frames):
        assert image[frame == frame.min()].item() == 255 and image[frame == frame.max()].item() == 0
        assert image.min() == 0 and image.max() == 255
    with pytest.raises(InputError, match="no frame 3"):
        files.load(path, 3)

    embedder = FakeEmbedder()
    summary = index_folders(archive, tmp_path / "ws", embedder)
    assert (summary.added, summary.total) == (3, 3)
    with open_workspace_for_search(tmp_path / "ws") as workspace:
        records = sorted(workspace.records_for(workspace.index.ids()).values(), key=lambda r: r.frame)
        assert [(r.frame, r.modality, r.path) for r in records] == [(f, "DICOM:MR", str(path)) for f in range(3)]
        assert len({r.sha256 for r in records}) == 1
        for frame, record in enumerate(records):
            _, ids = workspace.index.search(embedder.vector(files.load(path, frame))[None], 1)
            assert ids[0, 0] == record.id
    assert index_folders(archive, tmp_path / "ws", embedder).unchanged == 3


def test_enhanced_dicom_windows_each_frame_with_its_own_window(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def group(**values) -> Dataset:
        item = Dataset()
        for keyword, value in values.items():
            setattr(item, keyword, value)
        return item

    per_frame = []
    for center in ("0", "300"):
        window = group(WindowCenter=center, WindowWidth="400")
        per_frame.append(group(FrameVOILUTSequence=Sequence([window])))
    shared = group(PixelValueTransformationSequence=Sequence([group(RescaleSlope="1", RescaleIntercept="0")]))
    path = write_dicom(tmp_path / "enhanced.dcm", np.zeros((2, 4, 4), np.int16),
                       PerFrameFunctionalGroupsSequence=Sequence(per_frame),
                       SharedFunctionalGroupsSequence=Sequence([shared]))  # fmt: skip
    assert pydicom.dcmread(path).NumberOfFrames == 2
    assert (files.load(path, 0) == 128).all()  # 0 is the centre of frame 0's window
    assert (files.load(path, 1) == 0).all()  # and below frame 1's


def test_scan_reports_entries_and_reasons(tmp_path):
    write_images(tmp_path, 2)
    (tmp_path / "bad.png").write_text("no")
    found = list(files.scan([tmp_path]))
    records = [f for f in found if isinstance(f, files.FileRecord)]
    assert [r.path.name for r in records] == ["image_000.png", "image_001.png"]
    assert all(len(r.sha256) == 64 and r.size == r.path.stat().st_size for r in records)
    [(path, why)] = [f for f in found if not isinstance(f, files.FileRecord)]
    assert path.name == "bad.png" and "not an image" in why


def test_summary_is_a_plain_dataclass():
    assert IndexSummary().total == 0 and IndexSummary().skipped == []


# -- what is found, what is kept, what is pruned --------------------------------------------------


def index_entries(workspace: Path) -> list[str]:
    with Catalog(catalog_url(workspace), create=False) as catalog:
        return sorted(catalog.entries())


def test_a_folder_that_cannot_be_listed_is_reported_and_its_entries_kept(tmp_path, monkeypatch):
    archive = tmp_path / "archive"
    kept = write_images(archive / "a", 2) + write_images(archive / "b", 3, start=2)
    index_folders(archive, tmp_path / "ws", FakeEmbedder())
    blocked, listdir = archive / "b", os.scandir

    def scandir(path="."):  # as a permission change or a failing network mount would
        if Path(path) == blocked:
            raise PermissionError(13, "Permission denied", str(path))
        return listdir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    summary = index_folders(archive, tmp_path / "ws", FakeEmbedder())
    assert (summary.removed, summary.unchanged) == (0, 2)
    assert summary.skipped == [(blocked, "cannot list this folder (Permission denied); its indexed files are kept")]
    assert_consistent(tmp_path / "ws", None, kept)
    monkeypatch.undo()
    shutil.rmtree(blocked)  # a folder that is really gone takes its entries with it
    summary = index_folders(archive, tmp_path / "ws", FakeEmbedder())
    assert (summary.removed, summary.skipped) == (3, [])
    assert_consistent(tmp_path / "ws", None, kept[:2])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root lists folders whatever their permissions")
def test_a_folder_without_permissions_keeps_its_entries(tmp_path):
    archive = tmp_path / "archive"
    kept = write_images(archive / "a", 2) + write_images(archive / "b", 3, start=2)
    index_folders(archive, tmp_path / "ws", FakeEmbedder())
    (archive / "b").chmod(0)
    try:
        summary = index_folders(archive, tmp_path / "ws", FakeEmbedder())
    finally:
        (archive / "b").chmod(0o755)
    assert summary.removed == 0 and [path for path, _ in summary.skipped] == [archive / "b"]
    assert_consistent(tmp_path / "ws", None, kept)


def write_png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height pixels, a few hundred bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_skipped_and_pruning_still_runs(tmp_path):
    archive = tmp_path / "archive"
    good = write_images(archive, 3)
    index_folders(archive, tmp_path / "ws", FakeEmbedder())
    good.pop().unlink()
    bomb = write_png_header(archive / "bomb.png", 20000, 20000)
    summary = index_folders(archive, tmp_path / "ws", FakeEmbedder())
    assert summary.skipped == [(bomb, "too many pixels to decode safely; downscale the image first")]
    assert (summary.unchanged, summary.removed) == (2, 1)
    assert_consistent(tmp_path / "ws", None, good)


def test_a_replacement_with_the_same_size_and_mtime_is_reindexed(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    path = archive / "scan.bmp"  # BMP: every 48 x 48 image has the same size
    Image.fromarray(blocky(1)).save(path)
    embedder = FakeEmbedder()
    index_folders(archive, tmp_path / "ws", embedder)
    before = path.stat()
    Image.fromarray(blocky(2)).save(tmp_path / "new.bmp")
    os.utime(tmp_path / "new.bmp", ns=(before.st_atime_ns, before.st_mtime_ns))  # as cp -p, rsync or tar keep it
    os.replace(tmp_path / "new.bmp", path)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    summary = index_folders(archive, tmp_path / "ws", embedder)
    assert (summary.added, summary.removed) == (1, 1)
    with open_workspace_for_search(tmp_path / "ws") as workspace:
        scores, _ = workspace.index.search(embedder.vector(blocky(2))[None], 1)
        assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert index_folders(archive, tmp_path / "ws", embedder).unchanged == 1  # and then it is known


def test_verify_rehashes_files_whose_stat_is_unchanged(tmp_path):
    archive_files = write_images(tmp_path / "archive", 3)
    index_folders(tmp_path / "archive", tmp_path / "ws", FakeEmbedder())
    with Catalog(catalog_url(tmp_path / "ws")) as catalog, catalog.engine.begin() as connection:
        connection.execute(sa.text("UPDATE images SET sha256 = :wrong WHERE id = 1"), {"wrong": "0" * 64})  # the catalog no longer matches
    assert index_folders(tmp_path / "archive", tmp_path / "ws", FakeEmbedder()).unchanged == 3
    summary = index_folders(tmp_path / "archive", tmp_path / "ws", FakeEmbedder(), verify=True)
    assert (summary.added, summary.unchanged, summary.removed) == (1, 2, 1)
    assert_consistent(tmp_path / "ws", None, archive_files)


def test_a_symlink_is_indexed_under_its_own_path_and_pruned_with_it(tmp_path):
    archive, outside = tmp_path / "archive", tmp_path / "elsewhere"
    write_images(archive, 1)
    [target] = write_images(outside, 1, start=5)
    (archive / "link.png").symlink_to(target)
    index_folders(archive, tmp_path / "ws", FakeEmbedder())
    assert index_entries(tmp_path / "ws") == [str(archive / "image_000.png"), str(archive / "link.png")]
    (archive / "link.png").unlink()
    assert index_folders(archive, tmp_path / "ws", FakeEmbedder()).removed == 1
    assert index_entries(tmp_path / "ws") == [str(archive / "image_000.png")]


def test_a_missing_path_leaves_no_workspace_behind(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        index_folders(tmp_path / "missing", tmp_path / "ws", FakeEmbedder())
    assert not (tmp_path / "ws").exists()


def test_a_device_is_skipped_with_its_reason(tmp_path):
    summary = index_folders(Path("/dev/zero"), tmp_path / "ws", FakeEmbedder())
    assert summary.skipped == [(Path("/dev/zero"), "not a regular file or folder (a device, pipe or socket); name image files or folders")]
    assert summary.total == 1 and summary.added == 0


def test_another_bundle_is_refused_before_the_run_starts_naming_both_bundles(tmp_path):
    write_images(tmp_path / "archive", 2)
    first, second = FakeEmbedder("bundle-a"), FakeEmbedder("bundle-b")
    first.bundle_path, second.bundle_path = tmp_path / "bundles" / "a", tmp_path / "bundles" / "b"
    index_folders(tmp_path / "archive", tmp_path / "ws", first)
    started = []
    with pytest.raises(InputError) as caught:
        index_folders(tmp_path / "archive", tmp_path / "ws", second, on_start=started.append)
    assert str(caught.value) == (
        f"{tmp_path / 'ws'}: was indexed with bundle {tmp_path / 'bundles' / 'a'} ('bundle-a'), "
        f"not {tmp_path / 'bundles' / 'b'} ('bundle-b'); index into a new workspace or pass the same bundle"
    )
    assert started == []
    index_folders(tmp_path / "archive", tmp_path / "ws", first, on_start=started.append)
    assert started == [2]


def test_each_batch_reports_where_its_time_went(tmp_path):
    write_images(tmp_path / "archive", 5)
    batches = []
    index_folders(tmp_path / "archive", tmp_path / "ws", FakeEmbedder(), batch_size=2, on_batch=batches.append)
    assert [(b.files, b.embedded) for b in batches] == [(2, 2), (2, 2), (1, 1)]
    assert all(b.embed_s >= 0 and b.commit_s >= 0 for b in batches)


def test_cli_index_refuses_another_bundle_before_any_progress_bar(tiny_chain, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    _, bundle, _ = tiny_chain
    other = tmp_path / "other"  # the same networks but a retrained E: another bundle
    shutil.copytree(bundle, other, ignore=shutil.ignore_patterns("cache", "samples"))
    with open(other / "encoder.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x00\x80\x3f")
    write_manifest(other)  # as retraining does: the manifest records the new weights
    write_images(tmp_path / "archive", 2)
    runner, options = CliRunner(), ["--workspace", str(tmp_path / "ws"), "--device", "cpu"]
    assert runner.invoke(app, ["index", str(tmp_path / "archive"), *options, "--bundle", str(bundle)]).exit_code == 0
    result = runner.invoke(app, ["index", str(tmp_path / "archive"), *options, "--bundle", str(other)])
    assert result.exit_code == 2 and result.output.count("\n") == 1  # the message alone, no bar
    assert result.output.startswith(f"error: {tmp_path / 'ws'}: was indexed with bundle {bundle.resolve()} (")
    assert f", not {other.resolve()} (" in result.output
    result = runner.invoke(app, ["index", str(tmp_path / "missing"), "--workspace", str(tmp_path / "new"), "--bundle", str(bundle), "--device", "cpu"])
    assert result.exit_code == 2 and "no such file or folder" in result.output and not (tmp_path / "new").exists()


def test_cli_index_without_a_terminal_prints_progress_lines(tiny_chain, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import cli
    from training import console

    _, bundle, _ = tiny_chain
    write_images(tmp_path / "archive", 3)
    monkeypatch.setattr(console, "PROGRESS_LINE_EVERY_S", 0.0)  # a line at each report
    result = CliRunner().invoke(cli.app, ["index", str(tmp_path / "archive"), "--workspace", str(tmp_path / "ws"),
                                          "--bundle", str(bundle), "--device", "cpu", "--batch-size", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "index image_000.png: 1/3", "index image_001.png: 2/3", "index image_002.png: 3/3",
        "added 3, unchanged 0, duplicates 0, skipped 0, removed 0",
    ]  # fmt: skip


def test_files_are_tagged_with_their_top_folder_or_the_given_tag(tmp_path):
    write_images(tmp_path / "clinic-a" / "2024", 2)
    write_images(tmp_path / "clinic-b", 1, start=5)
    single = write_images(tmp_path / "loose", 1, start=9)[0]
    workspace = tmp_path / "ws"

    def tags() -> dict[str, str | None]:
        with Catalog(catalog_url(workspace), create=False) as catalog:
            return {Path(path).relative_to(tmp_path).as_posix(): entries[0].tag for path, entries in catalog.entries().items()}

    index_folders([tmp_path / "clinic-a", tmp_path / "clinic-b", single], workspace, FakeEmbedder())
    assert tags() == {"clinic-a/2024/image_000.png": "clinic-a", "clinic-a/2024/image_001.png": "clinic-a",
                      "clinic-b/image_005.png": "clinic-b", "loose/image_009.png": "loose"}  # fmt: skip
    embedder = FakeEmbedder()
    summary = index_folders(tmp_path / "clinic-b", workspace, embedder, tag="archive-2")  # unchanged, not read, re-tagged
    assert (summary.unchanged, embedder.embedded) == (1, 0)
    assert tags()["clinic-b/image_005.png"] == "archive-2" and tags()["loose/image_009.png"] == "loose"


def test_dicom_files_record_their_identifiers_also_in_a_migrated_catalog(tmp_path):
    from indexing.catalog import FileMeta

    archive = tmp_path / "archive"
    archive.mkdir()
    path = write_dicom(archive / "ct.dcm", np.arange(64, dtype=np.int16).reshape(8, 8), PatientID="P7", PatientName="Doe^John",
                       StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.4", StudyDate="20240229", BodyPartExamined="LARYNX")  # fmt: skip
    sop_uid = str(files._read_dicom(path, path.stat().st_size, path.stat().st_mtime_ns).SOPInstanceUID)
    expected = FileMeta("P7", "1.2.3", "1.2.3.4", sop_uid, "CT", "20240229", "LARYNX", "archive")
    workspace = tmp_path / "ws"
    index_folders(archive, workspace, FakeEmbedder())
    with open_workspace_for_search(workspace) as ws:
        [record] = ws.records_for(ws.index.ids()).values()
        assert record.meta == expected
    with Catalog(catalog_url(workspace), create=False) as catalog, catalog.engine.begin() as connection:
        for column in FileMeta.COLUMNS:  # back to schema 2, which did not keep them
            connection.execute(sa.text(f"ALTER TABLE files DROP COLUMN {column}"))
        connection.execute(sa.text("UPDATE meta SET value = '2' WHERE key = 'schema_version'"))
    embedder = FakeEmbedder()
    summary = index_folders(archive, workspace, embedder)  # the upgrade makes this run re-read the file, not re-embed it
    assert (summary.unchanged, summary.added, embedder.embedded) == (1, 0, 0)
    with open_workspace_for_search(workspace) as ws:
        [record] = ws.records_for(ws.index.ids()).values()
        assert record.meta == expected


# -- large images --------------------------------------------------------------------------------


def box_mean(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each factor x factor block (the sides are multiples of factor)."""
    h, w = pixels.shape[:2]
    return pixels.reshape(h // factor, factor, w // factor, factor, -1).mean(axis=(1, 3))


@pytest.mark.parametrize("kind", ["rgb", "grey16", "palette", "rgba"])
def test_a_large_image_is_reduced_while_loading_keeping_its_own_size(tmp_path, kind):
    side = files.INDEX_SIDE
    rgb = blocky(7, (3 * side, 2 * side + 8))  # shorter side 2048 + 8: reduced by 2
    image = {"rgb": Image.fromarray(rgb), "grey16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
             "palette": Image.fromarray(rgb).quantize(16), "rgba": Image.fromarray(rgb).convert("RGBA")}[kind]
    path = tmp_path / f"{kind}.png"
    image.save(path)

    pixels, size = files.load_reduced(path)
    assert size == (3 * side, 2 * side + 8) and pixels.dtype == np.uint8
    assert pixels.shape == (3 * side // 2, side + 4, 3)
    np.testing.assert_allclose(pixels, box_mean(files.load(path), 2), atol=1)


def test_a_large_jpeg_decodes_at_a_reduced_scale(tmp_path):
    path = tmp_path / "large.jpg"
    Image.fromarray(blocky(8, (4 * files.INDEX_SIDE + 40, 4 * files.INDEX_SIDE))).save(path, quality=95)
    pixels, size = files.load_reduced(path)
    assert size == (4 * files.INDEX_SIDE + 40, 4 * files.INDEX_SIDE)
    assert pixels.shape == (files.INDEX_SIDE + 10, files.INDEX_SIDE, 3)  # libjpeg's 1/4 scale


def test_images_under_twice_the_index_side_load_unreduced(tmp_path):
    for name, shape in (("square.png", (1024, 1024)), ("wide.jpg", (2047, 8000)), ("tall.tif", (2100, 2047))):
        Image.fromarray(blocky(9, shape)).save(tmp_path / name)
        pixels, size = files.load_reduced(tmp_path / name)
        assert size == shape
        np.testing.assert_array_equal(pixels, files.load(tmp_path / name))


def test_a_large_dicom_frame_is_reduced_after_decoding(tmp_path):
    stored = np.tile(np.arange(2048 + 16, dtype=np.int16)[None] % 1000, (2048, 1))
    path = write_dicom(tmp_path / "large.dcm", stored)
    pixels, size = files.load_reduced(path)
    assert size == (2048, 2048 + 16) and pixels.shape == (1024, 1024 + 8, 3)
    np.testing.assert_allclose(pixels, box_mean(files.load(path), 2), atol=1)


def test_a_large_image_is_recorded_with_its_own_size(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    Image.fromarray(blocky(10, (2 * files.INDEX_SIDE, 3 * files.INDEX_SIDE))).save(archive / "large.png")
    embedder = FakeEmbedder()
    assert index_folders(archive, tmp_path / "ws", embedder).added == 1
    with open_workspace_for_search(tmp_path / "ws") as workspace:
        [record] = workspace.records_for(workspace.index.ids()).values()
        assert (record.height, record.width) == (2 * files.INDEX_SIDE, 3 * files.INDEX_SIDE)
        reduced, _ = files.load_reduced(archive / "large.png")
        assert workspace.index.search(embedder.vector(reduced)[None], 1)[0][0, 0] == pytest.approx(1.0, abs=1e-5)


def test_an_ivfpq_index_is_built_patched_and_rescored_from_the_catalog(tmp_path, monkeypatch):
    archive_files = write_images(tmp_path / "archive", 300)
    embedder = FakeEmbedder()
    index_folders(tmp_path / "archive", tmp_path / "ws", embedder, index_kind="ivfpq", batch_size=100)
    assert_consistent(tmp_path / "ws", None, archive_files)
    for path in archive_files[:5]:
        path.unlink()
    archive_files = archive_files[5:] + write_images(tmp_path / "archive", 5, start=300)
    summary = index_folders(tmp_path / "archive", tmp_path / "ws", embedder)  # auto keeps ivfpq and patches it
    assert (summary.added, summary.removed) == (5, 5)
    assert_consistent(tmp_path / "ws", None, archive_files)
    with open_workspace_for_search(tmp_path / "ws") as workspace:
        assert workspace.index.kind == "ivfpq" and workspace.index.ntotal == 300
        firsts, seeds = [], range(5, 305)
        for seed, path in zip(seeds, archive_files):
            scores, ids = workspace.index.search(embedder.vector(blocky(seed))[None], 5)
            firsts.append(workspace.records_for(ids[0, :1]).get(int(ids[0, 0])).path == str(path) and abs(scores[0, 0] - 1) < 1e-5)
        assert np.mean(firsts) >= 0.9  # found first, with the exact score re-computed from the catalog's vector

    monkeypatch.setattr(vector_index, "IVFPQ_THRESHOLD", 200)  # so that `auto` needs no millions of images
    index_folders(tmp_path / "archive", tmp_path / "auto", embedder)
    with open_workspace_for_search(tmp_path / "auto") as workspace:
        assert workspace.index.kind == "ivfpq"
