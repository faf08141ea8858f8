"""The catalog on SQLite and PostgreSQL: contents, aliases, masks, ids, schema versions and migrations."""

from __future__ import annotations

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import fresh_postgres_database

import indexing.catalog as catalog_module
from generation.errors import InputError
from indexing.catalog import Catalog, FileMeta, decode_label_map, encode_label_map


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh, empty database: a SQLite file, or a new database on the test PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.sqlite'}"
        return
    with fresh_postgres_database() as url:
        yield url


def add(catalog: Catalog, name: str, seed: int, path: str | None = None, frame: int = 0) -> int:
    rng = np.random.default_rng(seed)
    image_id = catalog.add_image(
        sha256=f"{seed:064x}", frame=frame, width=40 + seed, height=30, modality="PNG",
        vector=rng.normal(size=8).astype(np.float32), label_map=rng.integers(0, 4, (13, 17)).astype(np.uint8),
    )  # fmt: skip
    catalog.add_file(path or f"/archive/{name}.png", frame, image_id, size=1000 + seed, mtime_ns=seed * 10**9)
    return image_id


def test_a_new_catalog_is_stamped_and_reopens_as_itself(db_url):
    with Catalog(db_url) as catalog:
        assert catalog.get_meta("schema_version") == str(catalog_module.schema_version())
        first_id = catalog.catalog_id
        assert len(catalog) == 0 and len(catalog.ids()) == 0
        catalog.set_meta("dim", "8")
        catalog.set_meta("dim", "9")
    with Catalog(db_url, create=False) as catalog:
        assert catalog.catalog_id == first_id and catalog.get_meta("dim") == "9"


def test_contents_round_trip(db_url):
    rng = np.random.default_rng(0)
    with Catalog(db_url) as catalog:
        catalog.set_meta("dim", "8")
        vector = rng.normal(size=8).astype(np.float32)
        label_map = rng.integers(0, 5, (37, 23)).astype(np.uint8)
        label_map[:5] = 0
        image_id = catalog.add_image(
            sha256="ab" * 32, frame=2, width=640, height=480, modality="DICOM:CT", vector=vector, label_map=label_map
        )
        catalog.add_file("/archive/ct.dcm", 2, image_id, size=123456, mtime_ns=1_700_000_000_123_456_789)
        record = catalog.records([image_id, -1, 999])[image_id]
        assert len(catalog.records([image_id, -1, 999])) == 1  # FAISS's -1 padding and unknown ids are left out
        assert (record.path, record.frame, record.sha256, record.size) == ("/archive/ct.dcm", 2, "ab" * 32, 123456)
        assert record.mtime_ns == 1_700_000_000_123_456_789  # nanoseconds survive (BIGINT)
        assert (record.width, record.height, record.modality, record.aliases) == (640, 480, "DICOM:CT", ())
        assert record.added_at.tzinfo is not None
        ids, vectors = catalog.vectors()
        np.testing.assert_array_equal(ids, [image_id])
        np.testing.assert_array_equal(vectors[0], vector)  # bit-exact float32
        np.testing.assert_array_equal(catalog.label_maps([image_id])[image_id], label_map)
        assert catalog.find("ab" * 32, 2) == image_id and catalog.find("ab" * 32, 0) is None


def test_an_image_without_foreground_keeps_its_mask_shape(db_url):
    with Catalog(db_url) as catalog:
        image_id = catalog.add_image(sha256="0" * 64, frame=0, width=4, height=4, modality="PNG",
                                     vector=np.ones(8, np.float32), label_map=np.zeros((6, 9), np.uint8))  # fmt: skip
        empty = catalog.label_maps([image_id])[image_id]
        assert empty.shape == (6, 9) and not empty.any()


def test_aliases_and_pruning(db_url):
    with Catalog(db_url) as catalog:
        first = add(catalog, "a", 1)
        catalog.add_file("/archive/copy_of_a.png", 0, first, size=1001, mtime_ns=5)
        second = add(catalog, "b", 2)
        record = catalog.records([first])[first]
        assert record.path == "/archive/a.png" and record.aliases == ("/archive/copy_of_a.png",)
        assert sorted(catalog.entries()) == ["/archive/a.png", "/archive/b.png", "/archive/copy_of_a.png"]

        catalog.remove_files(["/archive/a.png"])
        assert catalog.prune([first]) == []  # still shown by its alias
        assert catalog.records([first])[first].path == "/archive/copy_of_a.png"
        catalog.remove_files(["/archive/copy_of_a.png"])
        assert catalog.prune([first, second]) == [first]
        np.testing.assert_array_equal(catalog.ids(), [second])
        assert catalog.label_maps([first]) == {} and catalog.records([first]) == {}


def test_ids_are_never_reused(db_url):
    # The FAISS index is patched by comparing id sets, which is only sound if an id names one vector forever.
    with Catalog(db_url) as catalog:
        add(catalog, "a", 1)
        last = add(catalog, "b", 2)
        catalog.remove_files(["/archive/b.png"])
        catalog.prune([last])
        assert add(catalog, "c", 3) > last


def test_a_transaction_commits_all_or_nothing(db_url):
    with Catalog(db_url) as catalog:
        with pytest.raises(sa.exc.IntegrityError):
            with catalog.transaction():
                add(catalog, "a", 1)
                add(catalog, "duplicate", 1)  # same content key: refused
        assert len(catalog) == 0 and catalog.entries() == {}
        with catalog.transaction():
            add(catalog, "a", 1)
            add(catalog, "b", 2)
        assert len(catalog) == 2


def test_touch_file_updates_size_and_mtime(db_url):
    with Catalog(db_url) as catalog:
        add(catalog, "a", 1)
        catalog.touch_file("/archive/a.png", 77, 88)
        [entry] = catalog.entries()["/archive/a.png"]
        assert (entry.size, entry.mtime_ns) == (77, 88)


def test_a_newer_schema_version_is_refused(db_url):
    with Catalog(db_url) as catalog:
        catalog.set_meta("schema_version", "99")
    with pytest.raises(InputError, match="schema version 99 is newer") as caught:
        Catalog(db_url)
    assert "\n" not in str(caught.value) and "upgrade sketch2medi" in str(caught.value)


def test_an_older_catalog_is_migrated_on_open(db_url, monkeypatch):
    with Catalog(db_url) as catalog:
        image_id = add(catalog, "a", 1)
    old_version = catalog_module.schema_version()
    calls = []

    def add_note(connection: sa.Connection) -> None:
        calls.append(1)
        connection.execute(sa.text("ALTER TABLE images ADD COLUMN note TEXT"))
        connection.execute(sa.text("UPDATE images SET note = 'migrated'"))

    monkeypatch.setattr(catalog_module, "MIGRATIONS", [*catalog_module.MIGRATIONS, add_note])
    with Catalog(db_url) as catalog:
        assert catalog.get_meta("schema_version") == str(old_version + 1)
        with catalog.engine.connect() as connection:
            assert connection.execute(sa.text("SELECT note FROM images")).scalar() == "migrated"
        assert catalog.records([image_id])[image_id].path == "/archive/a.png"  # data kept
    with Catalog(db_url):
        pass
    assert len(calls) == 1  # applied once


def test_a_failing_migration_leaves_the_catalog_as_it_was(db_url, monkeypatch):
    with Catalog(db_url) as catalog:
        add(catalog, "a", 1)
    old_version = catalog_module.schema_version()

    def broken(connection: sa.Connection) -> None:
        connection.execute(sa.text("ALTER TABLE images ADD COLUMN note TEXT"))
        raise RuntimeError("bug in a migration")

    monkeypatch.setattr(catalog_module, "MIGRATIONS", [*catalog_module.MIGRATIONS, broken])
    with pytest.raises(RuntimeError, match="bug in a migration"):
        Catalog(db_url)
    monkeypatch.undo()
    with Catalog(db_url) as catalog:
        assert catalog.get_meta("schema_version") == str(old_version) and len(catalog) == 1
        with catalog.engine.connect() as connection:
            assert "note" not in {c["name"] for c in sa.inspect(connection).get_columns("images")}


def test_a_database_of_something_else_is_refused(db_url):
    engine = sa.create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE patients (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(InputError, match="not a sketch2medi catalog"):
        Catalog(db_url)


def test_unusable_urls_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not a database URL"):
        Catalog("no url at all")
    with pytest.raises(InputError, match="driver"):
        Catalog("nosuchdb+nodriver://user@host/db")
    with pytest.raises(InputError, match="no catalog there"):
        Catalog(f"sqlite:///{tmp_path / 'missing.sqlite'}", create=False)
    assert not (tmp_path / "missing.sqlite").exists()  # opening for reading creates nothing


def test_sqlite_catalogs_use_wal(tmp_path):
    with Catalog(f"sqlite:///{tmp_path / 'c.sqlite'}") as catalog:
        with catalog.engine.connect() as connection:
            assert connection.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (64, 64), (31, 45)])
def test_label_maps_compress_losslessly(shape):
    rng = np.random.default_rng(sum(shape))
    label_map = (rng.integers(0, 7, shape) * (rng.random(shape) < 0.7)).astype(np.uint8)
    masks = encode_label_map(label_map)
    assert [c for c, _ in masks] == sorted(set(np.unique(label_map)) - {0})
    np.testing.assert_array_equal(decode_label_map(shape, masks), label_map)


def test_a_version_1_catalog_gains_inode_and_ctime(db_url):
    with Catalog(db_url) as catalog:
        image_id = add(catalog, "a", 1)
        with catalog.engine.begin() as connection:  # the schema before inodes and ctimes were kept
            for column in ("inode", "ctime_ns", *FileMeta.COLUMNS):
                connection.execute(sa.text(f"ALTER TABLE files DROP COLUMN {column}"))
            connection.execute(sa.text("UPDATE meta SET value = '1' WHERE key = 'schema_version'"))
    with Catalog(db_url) as catalog:
        assert catalog.get_meta("schema_version") == str(catalog_module.schema_version())
        [entry] = catalog.entries()["/archive/a.png"]
        assert (entry.image_id, entry.size, entry.inode, entry.ctime_ns) == (image_id, 1001, None, None)
        catalog.touch_file("/archive/a.png", 1001, 10**9, inode=42, ctime_ns=7)
        assert catalog.entries()["/archive/a.png"][0].inode == 42


def test_a_version_2_catalog_gains_the_dicom_identifiers_and_the_tag(db_url):
    with Catalog(db_url) as catalog:
        png_id = add(catalog, "a", 1)
        dicom_id = catalog.add_image(sha256="d" * 64, frame=0, width=4, height=4, modality="DICOM:CT",
                                     vector=np.ones(8, np.float32), label_map=np.zeros((2, 2), np.uint8))  # fmt: skip
        catalog.add_file("/archive/ct.dcm", 0, dicom_id, 99, 10**9, inode=5, ctime_ns=6)
        catalog.touch_file("/archive/a.png", 1001, 10**9, inode=42, ctime_ns=7)
        with catalog.engine.begin() as connection:  # the schema before the identifiers were kept
            for column in FileMeta.COLUMNS:
                connection.execute(sa.text(f"ALTER TABLE files DROP COLUMN {column}"))
            connection.execute(sa.text("UPDATE meta SET value = '2' WHERE key = 'schema_version'"))
    with Catalog(db_url) as catalog:
        assert catalog.get_meta("schema_version") == "3" == str(catalog_module.schema_version())
        entries = catalog.entries()
        # the DICOM file is re-read by the next run (its inode forgotten), the PNG is not
        assert (entries["/archive/ct.dcm"][0].inode, entries["/archive/a.png"][0].inode) == (None, 42)
        assert catalog.records([png_id])[png_id].meta == FileMeta()
        meta = FileMeta(patient_id="P1", study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.4", modality="CT",
                        study_date="20240131", body_part="LARYNX", tag="clinic-a")  # fmt: skip
        catalog.touch_file("/archive/ct.dcm", 99, 10**9, inode=5, ctime_ns=6, meta=meta)
        assert catalog.records([dicom_id])[dicom_id].meta == meta
        catalog.set_tag(["/archive/a.png"], "clinic-b")
        assert catalog.entries()["/archive/a.png"][0].tag == "clinic-b"
