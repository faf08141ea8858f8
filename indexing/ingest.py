"""An index run: the images under some folders (`index_folders`), or on a DICOMweb server
(`index_dicomweb`), into a workspace. Both go through one run over a source (`indexing.sources`).

Crash safety. An index run works in batches: embed the batch's new files, commit them to the
catalog in one transaction (vectors, masks, file rows, removals of changed files), then update
the in-memory FAISS index, then report progress. So whatever was reported as indexed is committed,
and a kill -9 at any moment loses at most the batch in flight. The FAISS file, a cache of the
catalog (`indexing.workspace`), is written every few thousand new vectors and at the end.

Incremental runs: a file whose (path, size, mtime, inode, ctime) are unchanged is not read (with
`verify`, every file is); any other is hashed, and only a changed hash re-indexes it (its old entry
is replaced). Identical content under a second path is recorded as an alias of the first entry, not
embedded again. Files known to be gone from a folder being indexed are removed from the catalog;
those of a sub-folder that cannot be listed are kept, and the folder is reported. Each file gets a
tag (`--tag`, else the top folder's name); an unchanged file whose tag differs is re-tagged.

A DICOMweb run is incremental by instance: one already in the catalog is not fetched again, and one
the server no longer lists is removed where the listing covers it (`DicomWebSource.is_gone`). A
server that fails as a whole stops the run with its one-line error, keeping every committed batch,
so that the next run resumes where it stopped.

Under torchrun every rank calls `index_folders` (or `index_dicomweb`); rank 0 does the run and the others embed their
shares of each batch (`indexing.embedding`). Only rank 0 opens the workspace and the catalog, also across machines:
the other nodes need the bundle and the archive (at the same path), not the workspace nor the database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from generation.errors import InputError
from indexing.catalog import FileEntry
from indexing.dicomweb import DicomWebFilters, DicomWebServer
from indexing.embedding import Embedded, Embedder, Item, Key, Ranks
from indexing.files import FileRecord, SourceFailed, Unavailable, reason
from indexing.sources import DicomWebSource, Source, folder_source
from indexing.vector_index import KINDS, target_kind
from indexing.workspace import index_from_catalog, open_workspace_for_writing, resolve_workspace

# The FAISS file is rewritten after this many new vectors, or a quarter of the index if more: a
# kill loses no data either way, only the time to patch the file again from the catalog.
SAVE_EVERY = 4096


@dataclass
class IndexSummary:
    """What a run did, counted in entries (one per file, or per frame of a multi-frame DICOM)."""

    added: int = 0  # embedded and stored (new or changed files)
    unchanged: int = 0
    duplicates: int = 0  # recorded as another path of an entry with the same content
    skipped: list[tuple[Path | str, str]] = field(default_factory=list)  # unreadable files, folders and instances, with the reason
    total: int = 0  # added + unchanged + duplicates + skipped
    removed: int = 0  # entries deleted because their file changed or vanished


@dataclass(frozen=True)
class BatchTiming:
    """Where one committed batch's time went, for `on_batch`."""

    files: int  # files planned in the batch
    embedded: int  # new contents loaded and embedded
    embed_s: float  # loading and embedding them (on every rank, as rank 0 waited for it)
    commit_s: float  # the catalog transaction, the FAISS update and any periodic save of the index file


Progress = Callable[[int, int, Path | str], None]  # (done, total, the path or instance URL last committed)


@dataclass
class _Batch:
    """What rank 0 has planned since the last commit."""

    pending: dict[Key, list[FileRecord]] = field(default_factory=dict)  # new content -> its files
    aliases: list[tuple[FileRecord, int]] = field(default_factory=list)  # file -> existing image id
    touched: list[FileRecord] = field(default_factory=list)  # same content, new stat
    retagged: list[tuple[str, str]] = field(default_factory=list)  # unchanged files whose tag changes: (path, new tag)
    removed_paths: list[str] = field(default_factory=list)  # changed or vanished files
    orphans: list[int] = field(default_factory=list)  # image ids that may be left without a file
    done: list[Path | str] = field(default_factory=list)  # items to report once committed


class _Writer:
    """Rank 0's side of an index run: the only process that touches the workspace."""

    def __init__(self, workspace: Path, embedder: Embedder, ranks: Ranks, db_url: str | None, index_kind: str, verify: bool,
                 on_progress: Progress | None, on_batch: Callable[[BatchTiming], None] | None):  # fmt: skip
        self.workspace = open_workspace_for_writing(workspace, str(embedder.bundle_id), int(embedder.dim), db_url=db_url,
                                                    bundle_path=getattr(embedder, "bundle_path", None), index_kind=index_kind)  # fmt: skip
        self.catalog, self.ranks, self.index_kind, self.verify = self.workspace.catalog, ranks, index_kind, verify
        self.on_progress, self.on_batch = on_progress, on_batch
        self.unsaved = 0
        self.doomed: list[int] = []  # deleted from the catalog, still in an HNSW index (see _update_index)

    def close(self) -> None:
        self.workspace.close()

    def save(self) -> None:
        self.workspace.index.remove(np.asarray(self.doomed, np.int64))
        self.doomed = []
        self.workspace.save_index()
        self.unsaved = 0

    def run(self, source: Source, chunk: int) -> IndexSummary:
        names = source.names
        known = self.catalog.entries()  # each path is planned once per run, so this stays true
        summary, batch, done = IndexSummary(skipped=list(source.skipped)), _Batch(), 0
        for name in names:
            self._plan(source, name, known.get(str(name), []), batch, summary)
            if sum(map(len, batch.pending.values())) >= chunk or len(batch.done) >= chunk:
                done = self._commit(batch, summary, chunk, done, len(names))
                batch = _Batch()
        seen = {str(name) for name in names}
        for path, entries in known.items():
            if path not in seen and source.is_gone(path):
                batch.removed_paths.append(path)
                batch.orphans += [e.image_id for e in entries]
        self._commit(batch, summary, chunk, done, len(names))
        index = self.workspace.index
        wanted = target_kind(self.index_kind, index.kind, index.ntotal - len(self.doomed))
        if wanted != index.kind:
            self.workspace.index = index_from_catalog(self.catalog, wanted)
            self.unsaved += 1
        if self.unsaved:
            self.save()
        summary.total = summary.added + summary.unchanged + summary.duplicates + len(summary.skipped)
        return summary

    def _plan(self, source: Source, name: Path | str, entries: list[FileEntry], batch: _Batch, summary: IndexSummary) -> None:
        """Sort one item into unchanged / touched / alias / new content, reading it only when needed."""
        batch.done.append(name)
        try:
            records = source.read(name, entries, self.verify)
        except Unavailable as error:
            summary.skipped.append((name, str(error)))
            return
        except SourceFailed:
            raise
        except InputError as error:
            records = []
            summary.skipped.append((name, reason(name, error)))
        if records is None:
            summary.unchanged += len(entries)
            tag = source.tag(name)
            if tag is not None and any(e.tag != tag for e in entries):
                batch.retagged.append((str(name), tag))
            return
        if entries and records and len(records) == len(entries) and {e.sha256 for e in entries} == {records[0].sha256}:
            batch.touched.append(records[0])
            summary.unchanged += len(entries)
            return
        if entries:  # changed (or now unreadable): its old entries go, its new content comes in
            batch.removed_paths.append(str(name))
            batch.orphans += [e.image_id for e in entries]
        for record in records:
            if record.key in batch.pending:
                batch.pending[record.key].append(record)
            elif (image_id := self.catalog.find(*record.key)) is not None:
                batch.aliases.append((record, image_id))
            else:
                batch.pending[record.key] = [record]

    def _commit(self, batch: _Batch, summary: IndexSummary, chunk: int, done: int, total: int) -> int:
        """Embed the batch's new content, commit everything in one transaction, update the index, report."""
        started = time.perf_counter()
        items: list[Item] = [(key, records[0].source, records[0].frame) for key, records in batch.pending.items()]
        results: dict[Key, Embedded] = {}
        for start in range(0, len(items), chunk):
            results.update(self.ranks.embed(items[start : start + chunk]))
        embedded = time.perf_counter()
        with self.catalog.transaction():
            new_ids, new_vectors = self._store(batch, results, summary)
            deleted = self.catalog.prune(batch.orphans)
            if new_ids or deleted:  # the searches following the catalog (`Workspace.refresh`) see this batch
                self.catalog.bump_generation()
        # Committed. The index follows (it is a cache), and only then is the batch reported.
        self._update_index(new_ids, new_vectors, deleted)
        summary.removed += len(deleted)
        if self.on_batch is not None:
            self.on_batch(BatchTiming(len(batch.done), len(items), embedded - started, time.perf_counter() - embedded))
        for path in batch.done:
            done += 1
            if self.on_progress is not None:
                self.on_progress(done, total, path)
        return done

    def _store(self, batch: _Batch, results: dict[Key, Embedded], summary: IndexSummary) -> tuple[list[int], list[np.ndarray]]:
        """The batch's catalog writes (inside the commit's transaction); returns the new ids and vectors."""
        new_ids, new_vectors = [], []
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
                self._add_file(record, image_id)
            new_ids.append(image_id)
            new_vectors.append(vector)
            summary.added += 1
            summary.duplicates += len(records) - 1
        for record, image_id in batch.aliases:
            self._add_file(record, image_id)
            summary.duplicates += 1
        for record in batch.touched:
            stat = record.stat
            self.catalog.touch_file(str(record.path), stat.size, stat.mtime_ns, stat.inode, stat.ctime_ns, record.meta)
        by_tag: dict[str, list[str]] = {}
        for path, tag in batch.retagged:
            by_tag.setdefault(tag, []).append(path)
        for tag, paths in by_tag.items():
            self.catalog.set_tag(paths, tag)
        return new_ids, new_vectors

    def _add_file(self, record: FileRecord, image_id: int) -> None:
        stat = record.stat
        self.catalog.add_file(str(record.path), record.frame, image_id, stat.size, stat.mtime_ns, stat.inode, stat.ctime_ns, record.meta)

    def _update_index(self, new_ids: list[int], new_vectors: list[np.ndarray], deleted: list[int]) -> None:
        index = self.workspace.index
        self.doomed += deleted
        if index.kind != "hnsw":  # an HNSW graph is rebuilt to delete, so that waits for the next save
            index.remove(np.asarray(self.doomed, np.int64))
            self.doomed = []
        if new_ids:
            index.add(np.stack(new_vectors), np.asarray(new_ids, np.int64), known_new=True)  # catalog ids are never reused
        self.unsaved += len(new_ids) + len(deleted)
        if self.unsaved >= max(SAVE_EVERY, index.ntotal // 4):
            self.save()


def _index(
    make_source: Callable[[], Source],
    workspace: str | Path | None,
    embedder: Embedder,
    db_url: str | None,
    batch_size: int,
    index_kind: str,
    verify: bool,
    on_start: Callable[[int], None] | None,
    on_progress: Progress | None,
    on_batch: Callable[[BatchTiming], None] | None,
) -> IndexSummary:
    """One index run over the source `make_source()` gives (made on rank 0, before the workspace is touched)."""
    ranks = Ranks(embedder)
    ranks.agree()
    if not ranks.is_main:
        return ranks.follow()
    with ranks.lead():
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
        if index_kind not in KINDS:
            raise InputError(f"unknown index kind {index_kind!r}; use one of {', '.join(KINDS)}")
        source = make_source()  # before the workspace is touched: a wrong path or server leaves it as it was
        ranks.check_visible(source.roots)
        writer = _Writer(resolve_workspace(workspace), embedder, ranks, db_url, index_kind, verify, on_progress, on_batch)
        try:
            if on_start is not None:
                on_start(len(source.names))
            summary = writer.run(source, int(batch_size) * ranks.world_size)
        finally:
            writer.close()
    ranks.finish(summary)
    return summary


def index_folders(
    paths: str | Path | Iterable[str | Path],
    workspace: str | Path | None,
    embedder: Embedder,
    db_url: str | None = None,
    batch_size: int = 32,
    index_kind: str = "auto",
    verify: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_progress: Progress | None = None,
    on_batch: Callable[[BatchTiming], None] | None = None,
    tag: str | None = None,
) -> IndexSummary:
    """Index the images under `paths` (files or folders) into `workspace`; see the module docstring.

    `batch_size` images go to one `embed_images` call (per rank under torchrun). `verify` re-hashes
    every file, also those whose stat is unchanged. `tag` is recorded with every file (default: the
    name of the top folder it was found under). Once the paths are found and the workspace is
    open (its bundle checked), `on_start(total_files)` is called; each batch is committed before
    `on_progress(done_files, total_files, path)` reports its files, and `on_batch(BatchTiming)` says
    where its time went. Every rank returns the summary.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    return _index(lambda: folder_source(paths, tag), workspace, embedder, db_url, batch_size, index_kind, verify,
                  on_start, on_progress, on_batch)  # fmt: skip


def index_dicomweb(
    url: str,
    workspace: str | Path | None,
    embedder: Embedder,
    *,
    auth: str | None = None,
    filters: DicomWebFilters | None = None,
    timeout: float = 30.0,
    tag: str | None = None,
    db_url: str | None = None,
    batch_size: int = 32,
    index_kind: str = "auto",
    on_start: Callable[[int], None] | None = None,
    on_progress: Progress | None = None,
    on_batch: Callable[[BatchTiming], None] | None = None,
) -> IndexSummary:
    """Index the instances a DICOMweb server lists (`dicomweb+http://HOST:PORT/PATH`) into `workspace`.

    `auth` is `bearer:VARIABLE` or `basic:VARIABLE` (the environment variable holding the secret),
    `filters` narrow the listing (modality, study date range, study UID), and every request must
    be answered within `timeout` seconds. Instances already in the catalog are not fetched again;
    the rest are fetched, embedded and committed `batch_size` at a time, reported as `index_folders`
    reports files (by instance URL). A server failing as a whole raises `SourceFailed` (an
    `InputError`) with what was committed kept: the next run goes on from there.
    """
    return _index(lambda: DicomWebSource(DicomWebServer(url, auth, timeout), filters, tag), workspace, embedder, db_url,
                  batch_size, index_kind, False, on_start, on_progress, on_batch)  # fmt: skip


__all__ = ["BatchTiming", "IndexSummary", "index_dicomweb", "index_folders"]
