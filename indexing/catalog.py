"""The catalog: the archive's images, their files, S's masks and their vectors, in one SQL database.

The catalog is the source of truth; the FAISS index (`indexing.vector_index`) is a cache derived
from the vectors stored here and can always be rebuilt from them. Any SQLAlchemy URL works;
SQLite (the default, in the workspace) runs in WAL mode so that a search process reads while an
index run writes.

Tables:
    meta     key -> value: schema_version, catalog_id (a uuid), bundle_id, dim, generation (bumped by
             each committed batch that adds or deletes images, so that a search process can tell
             cheaply that it has something to pick up; absent, 0, in a catalog never written since)
    images   one row per distinct content (sha256 of the file bytes, frame): pixel size, modality,
             time added, the float32 vector as bytes, the mask shape. Ids are never reused
             (AUTOINCREMENT / sequences), so an id always names the same vector.
    files    (path, frame) -> image id, with the file's size, mtime, inode and ctime (NULL when
             written before schema 2); a second path with the same content is a second row here
             (an alias), not a second image. Also, where known (`FileMeta`, schema 3): the DICOM
             PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, Modality, StudyDate
             and BodyPartExamined, and the file's tag (its folder's, or the run's `--tag`)
    masks    (image id, class index) -> np.packbits + zlib of that class's binary mask

Schema changes: bump by appending a function to `MIGRATIONS`; catalogs are upgraded on open.
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

import numpy as np
import sqlalchemy as sa

from generation.errors import InputError
from indexing.filters import SearchFilter

# MIGRATIONS[n - 1] upgrades a catalog from schema version n to n + 1 (inside the opening
# transaction) and must leave the tables as the definitions below describe them, e.g.
#     lambda conn: conn.execute(sa.text("ALTER TABLE images ADD COLUMN note TEXT"))


def _add_file_identity(connection: sa.Connection) -> None:
    # 1 -> 2: inode and ctime, which change when a file is replaced by one of the same size and
    # mtime; left NULL, so the next index run re-hashes each file once and records them.
    for column in ("inode", "ctime_ns"):
        connection.execute(sa.text(f"ALTER TABLE files ADD COLUMN {column} BIGINT"))


def _add_file_meta(connection: sa.Connection) -> None:
    # 2 -> 3: the DICOM identifiers and the tag. A DICOM file's inode is forgotten, so the next
    # index run re-reads it once (as for schema 2) and records its identifiers; a plain file gets
    # its tag from the next run without being read.
    for column in FileMeta.COLUMNS:
        connection.execute(sa.text(f"ALTER TABLE files ADD COLUMN {column} VARCHAR(64)"))
    connection.execute(sa.text("UPDATE files SET inode = NULL WHERE image_id IN (SELECT id FROM images WHERE modality LIKE 'DICOM%')"))


MIGRATIONS: list[Callable[[sa.Connection], None]] = [_add_file_identity, _add_file_meta]

# The PostgreSQL advisory lock an index run holds on its catalog's database ("sketch2m" in ASCII).
WRITER_LOCK_KEY = 0x736B65746368326D


@dataclass(frozen=True)
class FileMeta:
    """What the catalog records about a file beyond its content: DICOM identifiers (None where
    unknown, as for plain image files) and a tag. Nothing else from a DICOM header is kept."""

    patient_id: str | None = None  # PatientID
    study_uid: str | None = None  # StudyInstanceUID
    series_uid: str | None = None  # SeriesInstanceUID
    sop_uid: str | None = None  # SOPInstanceUID
    modality: str | None = None  # Modality: 'CT', 'MR', 'ES', ...
    study_date: str | None = None  # StudyDate, as DICOM writes it: YYYYMMDD
    body_part: str | None = None  # BodyPartExamined
    tag: str | None = None  # the top folder indexed, or the index run's --tag

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "patient_id", "study_uid", "series_uid", "sop_uid", "modality", "study_date", "body_part", "tag",
    )  # fmt: skip

    def values(self) -> dict[str, str | None]:
        return {column: getattr(self, column) for column in self.COLUMNS}


def schema_version() -> int:
    """The schema version this code writes: 1 plus the number of migrations."""
    return 1 + len(MIGRATIONS)


metadata = sa.MetaData()
# BIGINT ids on servers; SQLite needs INTEGER for its rowid alias (and AUTOINCREMENT so ids are never reused).
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
meta_table = sa.Table(
    "meta", metadata, sa.Column("key", sa.String(64), primary_key=True), sa.Column("value", sa.Text, nullable=False)
)
images_table = sa.Table(
    "images",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("frame", sa.Integer, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("modality", sa.String(64), nullable=False),
    sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("vector", sa.LargeBinary, nullable=False),
    sa.Column("mask_height", sa.Integer, nullable=False),
    sa.Column("mask_width", sa.Integer, nullable=False),
    sa.UniqueConstraint("sha256", "frame", name="images_content"),
    sqlite_autoincrement=True,
)
files_table = sa.Table(
    "files",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),  # order of arrival: the lowest is the primary path
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("frame", sa.Integer, nullable=False),
    sa.Column("image_id", _ID, sa.ForeignKey("images.id"), nullable=False, index=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("mtime_ns", sa.BigInteger, nullable=False),
    sa.Column("inode", sa.BigInteger),
    sa.Column("ctime_ns", sa.BigInteger),
    *(sa.Column(column, sa.String(64)) for column in FileMeta.COLUMNS),
    sa.UniqueConstraint("path", "frame", name="files_path_frame"),
    sqlite_autoincrement=True,
)
masks_table = sa.Table(
    "masks",
    metadata,
    sa.Column("image_id", _ID, sa.ForeignKey("images.id"), primary_key=True),
    sa.Column("class_index", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)


@dataclass(frozen=True)
class FileEntry:
    """One (path, frame) of the catalog and the content it shows."""

    path: str
    frame: int
    image_id: int
    size: int
    mtime_ns: int
    sha256: str
    inode: int | None  # None: recorded before the catalog kept it
    ctime_ns: int | None
    tag: str | None = None


@dataclass(frozen=True)
class ImageRecord:
    id: int
    path: str  # the first path this content was indexed under
    frame: int
    sha256: str
    size: int
    mtime_ns: int
    width: int
    height: int
    modality: str  # 'PNG', 'JPEG', 'TIFF', 'BMP', 'DICOM:CT', ...
    added_at: datetime
    aliases: tuple[str, ...]  # other paths with the same content
    meta: FileMeta = field(default_factory=FileMeta)  # of the first path


# The statements an index run executes per file, built once: bound parameters instead of values
# baked into a new statement each time, whose cache key SQLAlchemy would otherwise rebuild per row.
_INSERT_IMAGE = images_table.insert()
_INSERT_FILE = files_table.insert()
_FIND_IMAGE = sa.select(images_table.c.id).where(
    images_table.c.sha256 == sa.bindparam("sha256"), images_table.c.frame == sa.bindparam("frame")
)


def encode_label_map(label_map: np.ndarray) -> list[tuple[int, bytes]]:
    """(class index, zlib(packbits(mask))) for each class present in a uint8 label map (0 = background)."""
    return [
        (int(c), zlib.compress(np.packbits(label_map == c).tobytes()))
        for c in np.unique(label_map)
        if c != 0
    ]


def decode_label_map(shape: tuple[int, int], masks: Iterable[tuple[int, bytes]]) -> np.ndarray:
    label_map = np.zeros(shape, np.uint8)
    count = shape[0] * shape[1]
    for class_index, data in masks:
        bits = np.unpackbits(np.frombuffer(zlib.decompress(data), np.uint8), count=count)
        label_map[bits.reshape(shape).astype(bool)] = class_index
    return label_map


def masked_url(url: str | sa.URL) -> str:
    """The URL as it may be printed: without its password."""
    return sa.make_url(url).render_as_string(hide_password=True)


def _chunks(values: list[int], size: int = 500) -> Iterator[list[int]]:
    # SQLite limits bound parameters per statement; IN lists go in slices.
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Catalog:
    """One catalog database. Methods run in their own transaction, or in `transaction()`'s."""

    def __init__(self, url: str, create: bool = True):
        self.url = url
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError:
            raise InputError(f"{url!r} is not a database URL; use e.g. sqlite:///catalog.sqlite or postgresql+psycopg://user@host/db")
        self.shown = masked_url(parsed)
        options: dict = {}
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database or ""
            if database not in ("", ":memory:") and not create and not Path(database).is_file():
                raise InputError(f"{database}: no catalog there; index a folder into this workspace first")
            options["connect_args"] = {"timeout": 60}  # wait for a writer's lock instead of failing at once
        try:
            self.engine = sa.create_engine(url, **options)
        except (sa.exc.ArgumentError, ImportError) as error:
            raise InputError(f"{self.shown}: cannot use this database ({_first_line(error)}); install its driver or fix --db-url")
        if parsed.get_backend_name() == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN"))
        self._connection: sa.Connection | None = None
        self._writer: sa.Connection | None = None  # holds the PostgreSQL writer lock (`lock_for_writing`)
        try:
            with self.engine.begin() as connection:
                self.catalog_id = self._open(connection, create)
        except sa.exc.SQLAlchemyError as error:
            self.engine.dispose()
            raise InputError(f"{self.shown}: cannot open the catalog ({_first_line(error)}); check --db-url and the server")
        except InputError:
            self.engine.dispose()
            raise

    def _open(self, connection: sa.Connection, create: bool) -> str:
        inspector = sa.inspect(connection)
        if not inspector.has_table("meta"):
            if inspector.get_table_names():
                raise InputError(f"{self.shown}: holds tables that are not a sketch2medi catalog; use an empty database")
            if not create:
                raise InputError(f"{self.shown}: no catalog there; index a folder into this workspace first")
            metadata.create_all(connection)
            catalog_id = uuid.uuid4().hex
            connection.execute(
                meta_table.insert(),
                [{"key": "schema_version", "value": str(schema_version())}, {"key": "catalog_id", "value": catalog_id}],
            )
            return catalog_id
        values = dict(connection.execute(sa.select(meta_table.c.key, meta_table.c.value)).all())
        version = int(values.get("schema_version", "0"))
        if version > schema_version():
            raise InputError(
                f"{self.shown}: catalog schema version {version} is newer than this sketch2medi supports "
                f"({schema_version()}); upgrade sketch2medi"
            )
        if version < 1:
            raise InputError(f"{self.shown}: not a sketch2medi catalog (no schema version); use an empty database")
        for step in range(version, schema_version()):
            MIGRATIONS[step - 1](connection)
            connection.execute(
                meta_table.update().where(meta_table.c.key == "schema_version").values(value=str(step + 1))
            )
        return values["catalog_id"]

    def close(self) -> None:
        if self._writer is not None:  # ending the session releases its advisory lock
            self._writer.close()
            self._writer = None
        self.engine.dispose()

    def lock_for_writing(self) -> bool:
        """Take the catalog's writer lock for the index run that opened it, until `close()`; False if
        another run holds it. On PostgreSQL this is a session advisory lock, so that runs from several
        machines (several workspaces) into one database take turns; elsewhere the workspace's lock
        file guards the catalog beside it, and this is always True."""
        if self.engine.dialect.name != "postgresql" or self._writer is not None:
            return True
        connection = self.engine.connect()
        if connection.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": WRITER_LOCK_KEY}).scalar():
            connection.commit()
            self._writer = connection
            return True
        connection.close()
        return False

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group calls into one transaction: all of them are committed, or none."""
        with self.engine.begin() as connection:
            self._connection = connection
            try:
                yield
            finally:
                self._connection = None

    @contextmanager
    def _connect(self) -> Iterator[sa.Connection]:
        if self._connection is not None:
            yield self._connection
        else:
            with self.engine.begin() as connection:
                yield connection

    # -- meta --------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._connect() as c:
            return c.execute(sa.select(meta_table.c.value).where(meta_table.c.key == key)).scalar()

    def set_meta(self, key: str, value: str) -> None:
        with self._connect() as c:
            if c.execute(meta_table.update().where(meta_table.c.key == key).values(value=value)).rowcount == 0:
                c.execute(meta_table.insert().values(key=key, value=value))

    def generation(self) -> int:
        """The catalog's generation: how many committed batches changed its set of images (`bump_generation`)."""
        return int(self.get_meta("generation") or 0)

    def bump_generation(self) -> None:
        """Count a change of the set of images; called inside the batch's transaction, so that the new
        generation is seen with the images that make it."""
        self.set_meta("generation", str(self.generation() + 1))

    # -- writing -----------------------------------------------------------------------------

    def add_image(
        self, *, sha256: str, frame: int, width: int, height: int, modality: str, vector: np.ndarray, label_map: np.ndarray
    ) -> int:
        """Store one content entry (no file yet; see `add_file`) and return its new id."""
        vector = np.ascontiguousarray(vector, dtype="<f4").reshape(-1)
        label_map = np.asarray(label_map, np.uint8)
        with self._connect() as c:
            image_id = c.execute(
                _INSERT_IMAGE,
                dict(sha256=sha256, frame=frame, width=width, height=height, modality=modality,
                     added_at=datetime.now(timezone.utc), vector=vector.tobytes(),
                     mask_height=label_map.shape[0], mask_width=label_map.shape[1]),
            ).inserted_primary_key[0]  # fmt: skip
            masks = encode_label_map(label_map)
            if masks:
                c.execute(
                    masks_table.insert(), [{"image_id": image_id, "class_index": k, "data": d} for k, d in masks]
                )
        return int(image_id)

    def add_file(
        self, path: str, frame: int, image_id: int, size: int, mtime_ns: int, inode: int | None = None, ctime_ns: int | None = None,
        meta: FileMeta | None = None,
    ) -> None:  # fmt: skip
        with self._connect() as c:
            c.execute(
                _INSERT_FILE,
                dict(path=path, frame=frame, image_id=image_id, size=size, mtime_ns=mtime_ns, inode=inode, ctime_ns=ctime_ns,
                     **(meta or FileMeta()).values()),
            )  # fmt: skip

    def touch_file(
        self, path: str, size: int, mtime_ns: int, inode: int | None = None, ctime_ns: int | None = None, meta: FileMeta | None = None
    ) -> None:
        """Record a new size/mtime/inode/ctime (and, when given, what is known about it) for a file
        whose content did not change."""
        known = meta.values() if meta is not None else {}
        with self._connect() as c:
            c.execute(
                files_table.update().where(files_table.c.path == path)
                .values(size=size, mtime_ns=mtime_ns, inode=inode, ctime_ns=ctime_ns, **known)
            )  # fmt: skip

    def set_tag(self, paths: Iterable[str], tag: str | None) -> None:
        """Tag these paths (all frames)."""
        with self._connect() as c:
            for chunk in _chunks(list(paths)):
                c.execute(files_table.update().where(files_table.c.path.in_(chunk)).values(tag=tag))

    def remove_files(self, paths: Iterable[str]) -> None:
        """Forget these paths (all frames); their images stay until `prune()`."""
        with self._connect() as c:
            for chunk in _chunks(list(paths)):
                c.execute(files_table.delete().where(files_table.c.path.in_(chunk)))

    def prune(self, image_ids: Iterable[int]) -> list[int]:
        """Delete those of these images that no file shows any more; returns the deleted ids."""
        deleted = []
        with self._connect() as c:
            for chunk in _chunks(sorted(set(int(i) for i in image_ids))):
                kept = set(c.execute(sa.select(files_table.c.image_id).where(files_table.c.image_id.in_(chunk))).scalars())
                gone = [i for i in chunk if i not in kept]
                if gone:
                    c.execute(masks_table.delete().where(masks_table.c.image_id.in_(gone)))
                    c.execute(images_table.delete().where(images_table.c.id.in_(gone)))
                    deleted += gone
        return deleted

    # -- reading -----------------------------------------------------------------------------

    def find(self, sha256: str, frame: int) -> int | None:
        """The id of the image with this content, if any."""
        with self._connect() as c:
            return c.execute(_FIND_IMAGE, {"sha256": sha256, "frame": frame}).scalar()

    def entries(self) -> dict[str, list[FileEntry]]:
        """Every indexed path and its entries (one per frame)."""
        query = (
            sa.select(files_table.c.path, files_table.c.frame, files_table.c.image_id, files_table.c.size,
                      files_table.c.mtime_ns, images_table.c.sha256, files_table.c.inode, files_table.c.ctime_ns,
                      files_table.c.tag)
            .join(images_table, images_table.c.id == files_table.c.image_id)
            .order_by(files_table.c.path, files_table.c.frame)
        )  # fmt: skip
        result: dict[str, list[FileEntry]] = {}
        with self._connect() as c:
            for row in c.execute(query):
                result.setdefault(row[0], []).append(FileEntry(*row))
        return result

    def __len__(self) -> int:
        with self._connect() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(images_table)).scalar())

    def ids(self) -> np.ndarray:
        """All image ids, sorted, int64."""
        with self._connect() as c:
            ids = c.execute(sa.select(images_table.c.id).order_by(images_table.c.id)).scalars().all()
        return np.asarray(ids, np.int64)

    def ids_matching(self, search_filter: SearchFilter) -> np.ndarray:
        """The ids of the images with a file that matches the filter, sorted, int64."""
        query = sa.select(files_table.c.image_id).where(search_filter.condition(files_table.c)).distinct()
        with self._connect() as c:
            ids = c.execute(query).scalars().all()
        return np.sort(np.asarray(ids, np.int64))

    def vectors(self, ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (N,), vectors float32 (N, dim)) for these ids (all when None), sorted by id."""
        dim = int(self.get_meta("dim") or 0)
        query = sa.select(images_table.c.id, images_table.c.vector).order_by(images_table.c.id)
        with self._connect() as c:
            if ids is None:
                rows = c.execute(query).all()
            else:
                rows = [r for chunk in _chunks(sorted(set(int(i) for i in ids))) for r in c.execute(query.where(images_table.c.id.in_(chunk)))]
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return np.array([r[0] for r in rows], np.int64), np.stack([np.frombuffer(r[1], "<f4") for r in rows]).astype(np.float32)

    def records(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        """The records of these image ids (unknown ids, such as FAISS's -1 padding, are left out)."""
        wanted = sorted(set(int(i) for i in ids if int(i) >= 0))
        images, files = images_table.c, files_table.c
        result: dict[int, ImageRecord] = {}
        with self._connect() as c:
            for chunk in _chunks(wanted):
                paths: dict[int, list[tuple]] = {}
                meta_columns = [files[column] for column in FileMeta.COLUMNS]
                for row in c.execute(
                    sa.select(files.image_id, files.path, files.size, files.mtime_ns, *meta_columns)
                    .where(files.image_id.in_(chunk)).order_by(files.id)
                ):  # fmt: skip
                    paths.setdefault(int(row[0]), []).append(row[1:])
                query = sa.select(images.id, images.frame, images.sha256, images.width, images.height, images.modality,
                                  images.added_at).where(images.id.in_(chunk))  # fmt: skip
                for image_id, frame, sha256, width, height, modality, added_at in c.execute(query):
                    shown = paths.get(int(image_id)) or [("", 0, 0, *[None] * len(FileMeta.COLUMNS))]
                    (path, size, mtime_ns, *meta), aliases = shown[0], tuple(row[0] for row in shown[1:])
                    if added_at.tzinfo is None:  # SQLite keeps no time zone; it was written as UTC
                        added_at = added_at.replace(tzinfo=timezone.utc)
                    result[int(image_id)] = ImageRecord(
                        int(image_id), path, frame, sha256, size, mtime_ns, width, height, modality, added_at, aliases, FileMeta(*meta)
                    )
        return result

    def label_maps(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        """S's masks of these images as uint8 label maps (0 = background); unknown ids are left out."""
        wanted = sorted(set(int(i) for i in ids if int(i) >= 0))
        result: dict[int, np.ndarray] = {}
        with self._connect() as c:
            for chunk in _chunks(wanted):
                masks: dict[int, list[tuple[int, bytes]]] = {}
                query = sa.select(masks_table.c.image_id, masks_table.c.class_index, masks_table.c.data)
                for image_id, class_index, data in c.execute(query.where(masks_table.c.image_id.in_(chunk))):
                    masks.setdefault(int(image_id), []).append((class_index, data))
                query = sa.select(images_table.c.id, images_table.c.mask_height, images_table.c.mask_width)
                for image_id, height, width in c.execute(query.where(images_table.c.id.in_(chunk))):
                    result[int(image_id)] = decode_label_map((height, width), masks.get(int(image_id), []))
        return result


def _sqlite_connect(dbapi_connection, _record) -> None:
    # Python's sqlite3 commits DDL on its own; taking over BEGIN makes migrations all-or-nothing
    # and gives readers one snapshot per transaction (the SQLAlchemy recipe for pysqlite).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
