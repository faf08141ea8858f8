"""The workspace: where an archive's catalog and FAISS index live, who may write them, and opening them.

A workspace folder (`resolve_workspace`) holds:

    catalog.sqlite          the catalog (unless --db-url names another database): the source of truth
    index-<catalog_id>.faiss  the FAISS index (`faiss_path`), a cache derived from the catalog's vectors
                            (one file for every kind; search maps an ivfpq index's lists from it)
    workspace.json          the bundle the vectors were made with, their dimension, where the catalog is
    .lock                   held by the one index run writing the workspace
                            (and, on PostgreSQL, an advisory lock on the catalog: `Catalog.lock_for_writing`)

The FAISS file is only a cache: it is written atomically (temp file + os.replace), and every opening,
for indexing or for search, compares its ids with the catalog's and patches it (adds the missing
vectors from the catalog, drops ids the catalog no longer has). This is sound because catalog ids are
never reused, so an id always names the same vector, and because the file is named after the
catalog's uuid, so it cannot be mistaken for another catalog's. A search that opens the workspace
while a run is writing sees every batch committed so far (SQLite in WAL mode lets it read during the
writes); a long-running one (`serve`) picks up later batches with `Workspace.refresh`, which follows
the catalog's generation. Either way the index holds only ids read from the catalog, so a search
never returns an id the catalog does not know, and never reads a half-written FAISS file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from generation.errors import InputError
from indexing.catalog import Catalog, ImageRecord, masked_url
from indexing.vector_index import VectorIndex, target_kind, training_size

# Vectors read from the catalog at a time when an index is built batch by batch (ivfpq: 10M vectors
# of 640-d are 25.6 GB, far more than the index's 0.9 GB).
BUILD_BATCH = 100_000

ENV_WORKSPACE = "SKETCH2MEDI_WORKSPACE"
CATALOG_FILE = "catalog.sqlite"
INFO_FILE = "workspace.json"
LOCK_FILE = ".lock"


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


def faiss_path(workspace: Path, catalog: Catalog) -> Path:
    """The workspace's FAISS file for this catalog."""
    return workspace / f"index-{catalog.catalog_id}.faiss"


def check_bundle(
    workspace: Path, indexed_id: str, bundle_id: str, advice: str, *, indexed_path: str | None = None, bundle_path: str | Path | None = None
) -> None:
    """Refuse bundle `bundle_id` for a workspace indexed with `indexed_id`; the message names both bundles."""
    if bundle_id != indexed_id:

        def shown(identity: str, path: str | Path | None) -> str:
            return f"{path} ({identity!r})" if path else repr(identity)

        raise InputError(
            f"{workspace}: was indexed with bundle {shown(indexed_id, indexed_path)}, not {shown(bundle_id, bundle_path)}; {advice}"
        )


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


def _lock_for_writing(workspace: Path) -> IO:
    for _ in range(100):  # a search may hold the lock for a moment while it saves a repaired index
        lock = _try_lock(workspace)
        if lock is not None:
            return lock
        time.sleep(0.1)
    raise InputError(f"{workspace}: another index run is writing this workspace; wait for it to finish")


def _synced_index(workspace: Path, catalog: Catalog, kind: str, use_gpu: bool = False, ef_search: int = 64) -> tuple[VectorIndex, bool]:
    """The workspace's index patched to hold exactly the catalog's vectors; True if it differs from the file."""
    path, dim = faiss_path(workspace, catalog), int(catalog.get_meta("dim") or 0)
    index = None
    if path.is_file():
        try:
            index = VectorIndex.load(path, ef_search=ef_search, use_gpu=use_gpu, exact_vectors=catalog.vectors)
        except InputError:
            index = None  # damaged: rebuilt below
        if index is not None and index.dim != dim:
            index = None
    catalog_ids = catalog.ids()
    wanted = target_kind(kind, index.kind if index else None, len(catalog_ids))
    if index is None or index.kind != wanted:
        return index_from_catalog(catalog, wanted, catalog_ids, ef_search=ef_search, use_gpu=use_gpu), True
    return index, _patch(index, catalog, catalog_ids)


def _patch(index: VectorIndex, catalog: Catalog, catalog_ids: np.ndarray | None = None) -> bool:
    """Make `index` hold exactly the catalog's images (`catalog_ids`, read now if not given); True if it changed.

    Only ids read from the catalog go in, with the vectors the catalog holds for them, so the index
    never holds an id the catalog does not know (one deleted meanwhile is left out of the hits, as
    `Retriever` shows only hits with a catalog record). Vectors are read BUILD_BATCH at a time."""
    catalog_ids = catalog.ids() if catalog_ids is None else catalog_ids
    stored = index.ids()
    extra, missing = np.setdiff1d(stored, catalog_ids), np.setdiff1d(catalog_ids, stored)
    index.remove(extra)
    added = 0
    for start in range(0, len(missing), BUILD_BATCH):
        ids, vectors = catalog.vectors(missing[start : start + BUILD_BATCH])
        index.add(vectors, ids, known_new=True)
        added += len(ids)
    return bool(len(extra) or added)


def index_from_catalog(catalog: Catalog, kind: str, ids: np.ndarray | None = None, *, ef_search: int = 64,
                       use_gpu: bool = False) -> VectorIndex:  # fmt: skip
    """A new index of `kind` over the catalog's vectors (`ids`: the catalog's ids, when known), read
    BUILD_BATCH at a time: the cells and codes are learnt from a random sample, then every vector is added.
    Searches of an ivfpq index re-score their candidates with the catalog's exact vectors."""
    ids = catalog.ids() if ids is None else ids
    dim = int(catalog.get_meta("dim") or 0)
    sample_ids = np.sort(np.random.default_rng(0).permutation(ids)[: training_size(kind, len(ids))])
    _, sample = catalog.vectors(sample_ids) if len(sample_ids) else (None, np.zeros((0, dim), np.float32))
    index = VectorIndex.trained(kind, sample, len(ids), dim, ef_search=ef_search, use_gpu=use_gpu,
                                exact_vectors=catalog.vectors if kind == "ivfpq" else None)  # fmt: skip
    del sample
    for start in range(0, len(ids), BUILD_BATCH):
        batch_ids, vectors = catalog.vectors(ids[start : start + BUILD_BATCH])
        index.add(vectors, batch_ids, known_new=True)
    return index


@dataclass
class Workspace:
    """An opened workspace: the catalog, the FAISS index and the bundle it was built with.

    Opened for search, or for one index run, which then holds the writer lock until `close()`.
    """

    path: Path
    catalog: Catalog
    index: VectorIndex
    bundle_id: str
    dim: int
    bundle_path: str | None = None  # the bundle folder the index was built with, when recorded
    lock: IO | None = None  # held while an index run writes
    generation: int = 0  # the catalog's generation the index was last made to match (`refresh`)

    def masks_for(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        """S's label maps (uint8, 0 = background) of these image ids; unknown ids (-1) are left out."""
        return self.catalog.label_maps(ids)

    def records_for(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        """The catalog records (path, aliases, size, modality, ...) of these image ids."""
        return self.catalog.records(ids)

    def refresh(self) -> bool:
        """Pick up what index runs committed since this workspace was opened or last refreshed: if the
        catalog's generation moved, patch the in-memory index to the catalog's images (the FAISS file
        is not read: it may lag the catalog). True if the generation moved.

        One small read when nothing changed; when something did, the catalog's ids are compared with
        the index's and the new vectors read, so the cost grows with the archive (docs/SCALING.md).
        Not safe to run while another thread searches this index: the server runs it on its model thread."""
        generation = self.catalog.generation()  # before the ids: a batch committed in between is picked up next time
        if generation == self.generation:
            return False
        _patch(self.index, self.catalog)
        self.generation = generation
        return True

    def save_index(self) -> None:
        """Write the FAISS index to its file (atomically)."""
        self.index.save(faiss_path(self.path, self.catalog))

    def close(self) -> None:
        self.catalog.close()
        if self.lock is not None:
            self.lock.close()

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
    info = _read_info(path)
    if db_url is None and info.get("catalog"):
        raise InputError(f"{path}: its catalog is in {info['catalog']}; pass that database with --db-url")
    catalog = Catalog(catalog_url(path, db_url), create=False)
    try:
        stored_bundle, dim = catalog.get_meta("bundle_id"), int(catalog.get_meta("dim") or 0)
        if stored_bundle is None:
            raise InputError(f"{path}: nothing is indexed there yet; index a folder into it first")
        if bundle_id is not None:
            check_bundle(path, stored_bundle, bundle_id, "search with that bundle or re-index into a new workspace",
                         indexed_path=info.get("bundle_path"))  # fmt: skip
        generation = catalog.generation()  # before the index is synced: see `Workspace.refresh`
        index, changed = _synced_index(path, catalog, "auto", use_gpu, ef_search)
        if changed:  # save the repair for the next search, unless an index run is writing right now
            lock = _try_lock(path)
            if lock is not None:
                with lock:
                    index.save(faiss_path(path, catalog))
    except BaseException:
        catalog.close()
        raise
    return Workspace(path, catalog, index, stored_bundle, dim, info.get("bundle_path"), generation=generation)


def open_workspace_for_writing(
    workspace: Path, bundle_id: str, dim: int, *, bundle_path: str | Path | None = None, db_url: str | None = None, index_kind: str = "auto"
) -> Workspace:
    """Open (creating it if need be) a workspace for one index run: take the writer lock, bind the
    workspace to the bundle or refuse another one, and patch the index to the catalog."""
    bundle_path = str(Path(bundle_path).resolve()) if bundle_path else None  # lets `search` find the bundle
    workspace.mkdir(parents=True, exist_ok=True)
    lock = _lock_for_writing(workspace)
    try:
        catalog = Catalog(catalog_url(workspace, db_url))
    except BaseException:
        lock.close()
        raise
    try:
        if not catalog.lock_for_writing():
            raise InputError(f"{catalog.shown}: another index run is writing this catalog (from another workspace or machine); "
                             f"wait for it to finish")
        _bind_bundle(workspace, catalog, bundle_id, dim, bundle_path, db_url)
        for stale in workspace.glob(".*.tmp*"):  # left by a killed save
            stale.unlink(missing_ok=True)
        for other in workspace.glob("index-*.faiss"):  # another catalog's cache
            if other != faiss_path(workspace, catalog):
                other.unlink(missing_ok=True)
        index, changed = _synced_index(workspace, catalog, index_kind)
        opened = Workspace(workspace, catalog, index, bundle_id, dim, bundle_path, lock)
        if changed:
            opened.save_index()
    except BaseException:
        catalog.close()
        lock.close()
        raise
    return opened


def _bind_bundle(workspace: Path, catalog: Catalog, bundle_id: str, dim: int, bundle_path: str | None, db_url: str | None) -> None:
    """Record the bundle in a new workspace; in one already indexed, refuse another bundle."""
    info = _read_info(workspace)
    with catalog.transaction():
        stored_bundle, stored_dim = catalog.get_meta("bundle_id"), catalog.get_meta("dim")
        if stored_bundle is None:
            catalog.set_meta("bundle_id", bundle_id)
            catalog.set_meta("dim", str(dim))
        else:
            check_bundle(workspace, stored_bundle, bundle_id, "index into a new workspace or pass the same bundle",
                         indexed_path=info.get("bundle_path"), bundle_path=bundle_path)  # fmt: skip
            if int(stored_dim or 0) != dim:
                raise InputError(
                    f"{workspace}: holds {stored_dim}-dimensional vectors but bundle {bundle_id!r} makes "
                    f"{dim}-dimensional ones; index into a new workspace"
                )
    wanted = {"bundle_id": bundle_id, "dim": dim, "catalog": masked_url(db_url) if db_url else None, "catalog_id": catalog.catalog_id}
    if bundle_path:
        wanted["bundle_path"] = bundle_path
    if info != wanted:
        _write_info(workspace, wanted)
