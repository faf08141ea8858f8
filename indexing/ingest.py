"""Indexing an image archive into a workspace, and opening a workspace for search.

A workspace folder (`resolve_workspace`) holds:

    catalog.sqlite          the catalog (unless --db-url names another database): the source of truth
    index-<catalog_id>.faiss  the FAISS index, a cache derived from the catalog's vectors
    workspace.json          the bundle the vectors were made with, their dimension, where the catalog is
    .lock                   held by the one index run writing the workspace

Crash safety. An index run works in batches: embed the batch's new files, commit them to the
catalog in one transaction (vectors, masks, file rows, removals of changed files), then update
the in-memory FAISS index, then report progress. So whatever was reported as indexed is committed,
and a kill -9 at any moment loses at most the batch in flight. The FAISS file is only a cache: it is
written atomically (temp file + os.replace) every few thousand new vectors and at the end, and
every opening, for indexing or for search, compares its ids with the catalog's and patches it (adds
the missing vectors from the catalog, drops ids the catalog no longer has). This is sound because
catalog ids are never reused, so an id always names the same vector, and because the file is named
after the catalog's uuid, so it cannot be mistaken for another catalog's. A search that opens the
workspace while a run is writing sees every batch committed so far (SQLite in WAL mode lets it read
during the writes).

Incremental runs: a file whose (path, size, mtime) are unchanged is not read; one whose mtime changed
is hashed, and only a changed hash re-indexes it (its old entry is replaced). Identical content under
a second path is recorded as an alias of the first entry, not embedded again. Files that vanished
from a folder being indexed are removed from the catalog.

Under torchrun, rank 0 plans every batch and is the only process touching the workspace; each rank
loads and embeds its share of the batch's new files, and rank 0 gathers the results.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch.distributed

from generation.device import Distributed, init_distributed
from generation.errors import InputError
from indexing.catalog import Catalog, FileEntry, ImageRecord, masked_url
from indexing.files import FileRecord, discover, file_stat, load, probe, reason
from indexing.vector_index import AUTO_THRESHOLD, KINDS, VectorIndex, auto_kind

ENV_WORKSPACE = "SKETCH2MEDI_WORKSPACE"
CATALOG_FILE = "catalog.sqlite"
INFO_FILE = "workspace.json"
LOCK_FILE = ".lock"
# The FAISS file is rewritten after this many new vectors, or a quarter of the index if more: a
# kill loses no data either way, only the time to patch the file again from the catalog.
SAVE_EVERY = 4096


@dataclass
class EmbeddedBatch:
    vectors: np.ndarray  # float32 (N, dim), L2-normalised
    label_maps: list[np.ndarray]  # uint8 (h, w) each: S's masks, 0 = background, c = class c


class Embedder(Protocol):
    bundle_id: str  # names the model bundle; a workspace indexed with another bundle is refused
    dim: int
    # Optional: `bundle_path`, the bundle folder, recorded in workspace.json for `search`.

    def embed_images(self, images: list[np.ndarray]) -> EmbeddedBatch:
        """uint8 (H, W, 3) images of any size -> their vectors and S's label maps."""
        ...


@dataclass
class IndexSummary:
    """What a run did, counted in entries (one per file, or per frame of a multi-frame DICOM)."""

    added: int = 0  # embedded and stored (new or changed files)
    unchanged: int = 0
    duplicates: int = 0  # recorded as another path of an entry with the same content
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable files, with the reason
    total: int = 0  # added + unchanged + duplicates + skipped
    removed: int = 0  # entries deleted because their file changed or vanished


# -- workspace -----------------------------------------------------------------------------------


def default_workspace() -> Path:
    """$SKETCH2MEDI_WORKSPACE, else $XDG_DATA_HOME/sketch2medi/workspace (~/.local/share/...)."""
    if os.environ.get(ENV_WORKSPACE):
        return Path(os.environ[ENV_WORKSPACE]).expanduser()
    return Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share").expanduser() / "sketch2medi" / "workspace"


def resolve_workspace(path: str | Path | None = None) -> Path:
    """The workspace folder: `path`, else the default; absolute. It need not exist yet."""
    workspace = (Path(path).expanduser() if path not in (None, "") else default_workspace()).absolute()
    if workspace.exists() and not workspace.is_dir():
        raise InputError(f"{workspace}: is a file, not a workspace folder; choose another --workspace")
    return workspace


def catalog_url(workspace: Path, db_url: str | None = None) -> str:
    return db_url or f"sqlite:///{workspace / CATALOG_FILE}"


def index_path(workspace: Path, catalog: Catalog) -> Path:
    return workspace / f"index-{catalog.catalog_id}.faiss"


def _read_info(workspace: Path) -> dict[str, Any]:
    try:
        return json.loads((workspace / INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_info(workspace: Path, info: dict[str, Any]) -> None:
    tmp = workspace / f".{INFO_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, workspace / INFO_FILE)


def _try_lock(workspace: Path) -> IO | None:
    """The workspace's writer lock if it is free (an open file holding flock), else None."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): running one index run at a time is up to the user
        return open(os.devnull)
    try:
        handle = open(workspace / LOCK_FILE, "a")
    except OSError:  # a read-only workspace: nobody writes it
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def _target_kind(requested: str, current: str | None, count: int) -> str:
    """The index kind to have: an explicit request, else the current one, upgraded to HNSW when large."""
    if count == 0:
        return "flat"  # ivf cannot be trained on nothing; it is built once there are vectors
    if requested != "auto":
        return requested
    if current is None:
        return auto_kind(count)
    return "hnsw" if current == "flat" and count >= AUTO_THRESHOLD else current


def _synced_index(workspace: Path, catalog: Catalog, kind: str, use_gpu: bool = False, ef_search: int = 64) -> tuple[VectorIndex, bool]:
    """The workspace's index patched to hold exactly the catalog's vectors; True if it differs from the file."""
    path, dim = index_path(workspace, catalog), int(catalog.get_meta("dim") or 0)
    index = None
    if path.is_file():
        try:
            index = VectorIndex.load(path, ef_search=ef_search, use_gpu=use_gpu)
        except InputError:
            index = None  # damaged: rebuilt below
        if index is not None and index.dim != dim:
            index = None
    catalog_ids = catalog.ids()
    wanted = _target_kind(kind, index.kind if index else None, len(catalog_ids))
    if index is None or index.kind != wanted:
        ids, vectors = catalog.vectors()
        index = VectorIndex.build(vectors, ids, wanted, ef_search=ef_search, use_gpu=use_gpu)
        return index, True
    stored = index.ids()
    extra, missing = np.setdiff1d(stored, catalog_ids), np.setdiff1d(catalog_ids, stored)
    index.remove(extra)
    ids, vectors = catalog.vectors(missing)
    index.add(vectors, ids)
    return index, bool(len(extra) or len(ids))


@dataclass
class Workspace:
    """An opened workspace for search: the catalog, the FAISS index and the bundle it was built with."""

    path: Path
    catalog: Catalog
    index: VectorIndex
    bundle_id: str
    dim: int
    bundle_path: str | None = None  # the bundle folder the index was built with, when recorded

    def masks_for(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        """S's label maps (uint8, 0 = background) of these image ids; unknown ids (-1) are left out."""
        return self.catalog.label_maps(ids)

    def records_for(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        """The catalog records (path, aliases, size, modality, ...) of these image ids."""
        return self.catalog.records(ids)

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_workspace_for_search(
    workspace: str | Path | None = None,
    db_url: str | None = None,
    *,
    bundle_id: str | None = None,
    use_gpu: bool = False,
    ef_search: int = 64,
) -> Workspace:
    """Open a workspace to search it, also while an index run writes it (it then shows the committed batches).

    `bundle_id`, when given, must be the bundle the workspace was indexed with.
    """
    path = resolve_workspace(workspace)
    if not path.is_dir():
        raise InputError(f"{path}: no such workspace; index a folder into it first")
    shown = _read_info(path).get("catalog")
    if db_url is None and shown:
        raise InputError(f"{path}: its catalog is in {shown}; pass that database with --db-url")
    catalog = Catalog(catalog_url(path, db_url), create=False)
    try:
        stored_bundle, dim = catalog.get_meta("bundle_id"), int(catalog.get_meta("dim") or 0)
        if stored_bundle is None:
            raise InputError(f"{path}: nothing is indexed there yet; index a folder into it first")
        if bundle_id is not None and bundle_id != stored_bundle:
            raise InputError(
                f"{path}: was indexed with bundle {stored_bundle!r}, not {bundle_id!r}; "
                "search with that bundle or re-index into a new workspace"
            )
        index, changed = _synced_index(path, catalog, "auto", use_gpu, ef_search)
        if changed:  # save the repair for the next search, unless an index run is writing right now
            lock = _try_lock(path)
            if lock is not None:
                with lock:
                    index.save(index_path(path, catalog))
    except BaseException:
        catalog.close()
        raise
    return Workspace(path, catalog, index, stored_bundle, dim, _read_info(path).get("bundle_path"))


# -- the index run -------------------------------------------------------------------------------

Key = tuple[str, int]  # (sha256, frame)
Item = tuple[Key, Path, int]  # an entry to load and embed: (key, path, frame)
Embedded = tuple[np.ndarray, np.ndarray, tuple[int, int]] | str  # (vector, label map, (height, width)) or why not
EmbedFn = Callable[[list[Item]], dict[Key, Embedded]]
Progress = Callable[[int, int, Path], None]


@dataclass
class _Batch:
    """What rank 0 has planned since the last commit."""

    pending: dict[Key, list[FileRecord]] = field(default_factory=dict)  # new content -> its files
    aliases: list[tuple[FileRecord, int]] = field(default_factory=list)  # file -> existing image id
    touched: list[FileRecord] = field(default_factory=list)  # same content, new mtime
    removed_paths: list[str] = field(default_factory=list)  # changed or vanished files
    orphans: list[int] = field(default_factory=list)  # image ids that may be left without a file
    done: list[Path] = field(default_factory=list)  # files to report once committed


class _Writer:
    """Rank 0's side of an index run: the only process that touches the workspace."""

    def __init__(self, workspace: Path, embedder: Embedder, db_url: str | None, index_kind: str):
        workspace.mkdir(parents=True, exist_ok=True)
        self.workspace, self.index_kind = workspace, index_kind
        for _ in range(100):  # a search may hold the lock for a moment while it saves a repaired index
            self.lock = _try_lock(workspace)
            if self.lock is not None:
                break
            time.sleep(0.1)
        else:
            raise InputError(f"{workspace}: another index run is writing this workspace; wait for it to finish")
        try:
            self.catalog = Catalog(catalog_url(workspace, db_url))
        except BaseException:
            self.lock.close()
            raise
        self.unsaved = 0
        self.doomed: list[int] = []  # deleted from the catalog, still in an HNSW index (see _commit)
        try:
            self._check_bundle(embedder, db_url)
            for stale in workspace.glob(".*.tmp*"):  # left by a killed save
                stale.unlink(missing_ok=True)
            for other in workspace.glob("index-*.faiss"):  # another catalog's cache
                if other != index_path(workspace, self.catalog):
                    other.unlink(missing_ok=True)
            self.index, changed = _synced_index(workspace, self.catalog, index_kind)
            if changed:
                self.save()
        except BaseException:
            self.close()
            raise

    def _check_bundle(self, embedder: Embedder, db_url: str | None) -> None:
        bundle_id, dim = str(embedder.bundle_id), int(embedder.dim)
        with self.catalog.transaction():
            stored_bundle, stored_dim = self.catalog.get_meta("bundle_id"), self.catalog.get_meta("dim")
            if stored_bundle is None:
                self.catalog.set_meta("bundle_id", bundle_id)
                self.catalog.set_meta("dim", str(dim))
            elif stored_bundle != bundle_id:
                raise InputError(
                    f"{self.workspace}: was indexed with bundle {stored_bundle!r}, not {bundle_id!r}; "
                    "index into a new workspace or pass the same bundle"
                )
            elif int(stored_dim or 0) != dim:
                raise InputError(
                    f"{self.workspace}: holds {stored_dim}-dimensional vectors but bundle {bundle_id!r} makes "
                    f"{dim}-dimensional ones; index into a new workspace"
                )
        info = {"bundle_id": bundle_id, "dim": dim, "catalog": masked_url(db_url) if db_url else None,
                "catalog_id": self.catalog.catalog_id}  # fmt: skip
        if getattr(embedder, "bundle_path", None):  # lets `search` find the bundle without --bundle
            info["bundle_path"] = str(Path(embedder.bundle_path).resolve())
        if _read_info(self.workspace) != info:
            _write_info(self.workspace, info)

    def close(self) -> None:
        self.catalog.close()
        self.lock.close()

    def save(self) -> None:
        self.index.remove(np.asarray(self.doomed, np.int64))
        self.doomed = []
        self.index.save(index_path(self.workspace, self.catalog))
        self.unsaved = 0

    def run(
        self,
        paths: list[Path],
        chunk: int,
        embed: EmbedFn,
        on_progress: Progress | None,
    ) -> IndexSummary:
        files = discover(paths)
        known = self.catalog.entries()  # each path is planned once per run, so this stays true
        summary, batch, done = IndexSummary(), _Batch(), 0
        for path in files:
            self._plan(path, known.get(str(path), []), batch, summary)
            if sum(map(len, batch.pending.values())) >= chunk or len(batch.done) >= chunk:
                done = self._commit(batch, summary, chunk, embed, on_progress, done, len(files))
                batch = _Batch()
        # files that vanished from the folders being indexed
        seen = {str(p) for p in files}
        folders = [str(Path(p).expanduser().resolve()) + os.sep for p in paths if Path(p).is_dir()]
        for path, entries in known.items():
            if path not in seen and path.startswith(tuple(folders)):
                batch.removed_paths.append(path)
                batch.orphans += [e.image_id for e in entries]
        self._commit(batch, summary, chunk, embed, on_progress, done, len(files))
        wanted = _target_kind(self.index_kind, self.index.kind, self.index.ntotal - len(self.doomed))
        if wanted != self.index.kind:
            ids, vectors = self.catalog.vectors()
            self.index = VectorIndex.build(vectors, ids, wanted)
            self.unsaved += 1
        if self.unsaved:
            self.save()
        summary.total = summary.added + summary.unchanged + summary.duplicates + len(summary.skipped)
        return summary

    def _plan(self, path: Path, entries: list[FileEntry], batch: _Batch, summary: IndexSummary) -> None:
        """Sort one file into unchanged / touched / alias / new content, reading it only when needed."""
        batch.done.append(path)
        try:
            size, mtime_ns = file_stat(path)
        except OSError as error:  # vanished since discovery
            summary.skipped.append((path, f"cannot read ({error.strerror or error})"))
            return
        if entries and all(e.size == size and e.mtime_ns == mtime_ns for e in entries):
            summary.unchanged += len(entries)
            return
        try:
            records = probe(path)
        except InputError as error:
            records = []
            summary.skipped.append((path, reason(path, error)))
        if entries and records and len(records) == len(entries) and {e.sha256 for e in entries} == {records[0].sha256}:
            batch.touched.append(records[0])
            summary.unchanged += len(entries)
            return
        if entries:  # changed (or now unreadable): its old entries go, its new content comes in
            batch.removed_paths.append(str(path))
            batch.orphans += [e.image_id for e in entries]
        for record in records:
            if record.key in batch.pending:
                batch.pending[record.key].append(record)
            elif (image_id := self.catalog.find(*record.key)) is not None:
                batch.aliases.append((record, image_id))
            else:
                batch.pending[record.key] = [record]

    def _commit(
        self, batch: _Batch, summary: IndexSummary, chunk: int, embed: EmbedFn, on_progress: Progress | None, done: int, total: int
    ) -> int:
        """Embed the batch's new content, commit everything in one transaction, update the index, report."""
        items = [(key, records[0].path, records[0].frame) for key, records in batch.pending.items()]
        results: dict[Key, Embedded] = {}
        for start in range(0, len(items), chunk):
            results.update(embed(items[start : start + chunk]))
        new_ids, new_vectors = [], []
        with self.catalog.transaction():
            self.catalog.remove_files(batch.removed_paths)
            for key, records in batch.pending.items():
                result = results[key]
                if isinstance(result, str):
                    for record in records:
                        where = f"frame {record.frame}: " if record.frames > 1 else ""
                        summary.skipped.append((record.path, where + result))
                    continue
                vector, label_map, (height, width) = result
                image_id = self.catalog.add_image(
                    sha256=key[0], frame=key[1], width=width, height=height, modality=records[0].modality,
                    vector=vector, label_map=label_map,
                )  # fmt: skip
                for record in records:
                    self.catalog.add_file(str(record.path), record.frame, image_id, record.size, record.mtime_ns)
                new_ids.append(image_id)
                new_vectors.append(vector)
                summary.added += 1
                summary.duplicates += len(records) - 1
            for record, image_id in batch.aliases:
                self.catalog.add_file(str(record.path), record.frame, image_id, record.size, record.mtime_ns)
                summary.duplicates += 1
            for record in batch.touched:
                self.catalog.touch_file(str(record.path), record.size, record.mtime_ns)
            deleted = self.catalog.prune(batch.orphans)
        # Committed. The index follows (it is a cache), and only then is the batch reported.
        summary.removed += len(deleted)
        self.doomed += deleted
        if self.index.kind != "hnsw":  # an HNSW graph is rebuilt to delete, so that waits for the next save
            self.index.remove(np.asarray(self.doomed, np.int64))
            self.doomed = []
        if new_ids:
            self.index.add(np.stack(new_vectors), np.asarray(new_ids, np.int64))
        self.unsaved += len(new_ids) + len(deleted)
        if self.unsaved >= max(SAVE_EVERY, self.index.ntotal // 4):
            self.save()
        for path in batch.done:
            done += 1
            if on_progress is not None:
                on_progress(done, total, path)
        return done


# -- embedding, on one process or on every rank ----------------------------------------------------


def _embed_shard(embedder: Embedder, items: list[Item]) -> dict[Key, Embedded]:
    """Load and embed some entries; an unreadable one gives the reason instead."""
    results: dict[Key, Embedded] = {}
    keys, images = [], []
    for key, path, frame in items:
        try:
            images.append(load(path, frame))
            keys.append(key)
        except InputError as error:
            results[key] = reason(path, error)
        except Exception as error:  # an odd file must not end the run
            results[key] = f"cannot read ({type(error).__name__}: {error})"
    if not images:
        return results
    batch = embedder.embed_images(images)
    vectors = np.asarray(batch.vectors, np.float32)
    if vectors.shape != (len(images), embedder.dim) or len(batch.label_maps) != len(images):
        raise RuntimeError(
            f"the embedder returned vectors {vectors.shape} and {len(batch.label_maps)} label maps "
            f"for {len(images)} images of dimension {embedder.dim}"
        )
    for key, image, vector, label_map in zip(keys, images, vectors, batch.label_maps):
        results[key] = (vector, np.asarray(label_map, np.uint8), image.shape[:2])
    return results


def _share(dist: Distributed, message: Any = None) -> Any:
    """Rank 0's message, on every rank."""
    if not dist.enabled:
        return message
    box = [message]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _embed_everywhere(dist: Distributed, embedder: Embedder, items: list[Item]) -> dict[Key, Embedded]:
    """Each rank embeds its share of `items`; rank 0 gets all the results."""
    if not dist.enabled:
        return _embed_shard(embedder, items)
    share = [items[i] for i in dist.shard(len(items))]
    try:
        mine: tuple[dict, str | None] = (_embed_shard(embedder, share), None)
    except Exception as error:  # reported to rank 0, which stops every rank
        mine = ({}, f"{type(error).__name__}: {error}")
    gathered = [None] * dist.world_size if dist.is_main else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    results: dict[Key, Embedded] = {}
    for rank, (part, error) in enumerate(gathered or []):
        if error is not None:
            raise RuntimeError(f"embedding failed on rank {rank}: {error}")
        results.update(part)
    return results


def index_paths(
    paths: str | Path | Iterable[str | Path],
    workspace: str | Path | None,
    embedder: Embedder,
    db_url: str | None = None,
    batch_size: int = 32,
    index_kind: str = "auto",
    on_progress: Progress | None = None,
) -> IndexSummary:
    """Index the images under `paths` (files or folders) into `workspace`; see the module docstring.

    `batch_size` images go to one `embed_images` call (per rank under torchrun), and each batch is
    committed before `on_progress(done_files, total_files, path)` reports its files. Every rank
    returns the summary.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    dist = init_distributed()
    chunk = int(batch_size) * dist.world_size
    if not dist.is_main:  # follow rank 0's plan: embed what it sends until it is done
        while True:
            verb, payload = _share(dist)
            if verb == "embed":
                _embed_everywhere(dist, embedder, payload)
            elif verb == "done":
                return payload
            else:
                raise (InputError if verb == "input" else RuntimeError)(payload)
    try:
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
        if index_kind not in KINDS:
            raise InputError(f"unknown index kind {index_kind!r}; use one of {', '.join(KINDS)}")
        if not paths:
            raise InputError("no paths to index; name image files or folders")
        writer = _Writer(resolve_workspace(workspace), embedder, db_url, index_kind)
        try:
            def embed(items: list[Item]) -> dict[Key, Embedded]:
                _share(dist, ("embed", items))
                return _embed_everywhere(dist, embedder, items)

            summary = writer.run([Path(p) for p in paths], chunk, embed, on_progress)
        finally:
            writer.close()
    except InputError as error:
        _share(dist, ("input", str(error)))
        raise
    except BaseException as error:
        _share(dist, ("error", f"rank 0 failed: {type(error).__name__}: {error}"))
        raise
    _share(dist, ("done", summary))
    return summary


__all__ = [
    "EmbeddedBatch", "Embedder", "IndexSummary", "Workspace", "catalog_url", "default_workspace",
    "index_paths", "open_workspace_for_search", "resolve_workspace",
]  # fmt: skip
