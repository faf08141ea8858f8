"""`--where` filters: the parser and its one-line errors, the catalog's matching images, and the
filtered vector search, which equals an exact search over the matching subset at any selectivity."""

from __future__ import annotations

import numpy as np
import pytest

from generation.errors import InputError
from indexing.catalog import Catalog, FileMeta
from indexing.filters import Clause, SearchFilter
from indexing.vector_index import VectorIndex

COUNT, DIM = 10_000, 32


def test_where_parses_fields_lists_and_date_ranges():
    parsed = SearchFilter.parse("modality=es,XA; date>=2020-01-01; date<20210101 ; body=Larynx; tag=clinic-a;")
    assert parsed.clauses == (
        Clause("modality", "=", ("ES", "XA")), Clause("date", ">=", ("20200101",)), Clause("date", "<", ("20210101",)),
        Clause("body", "=", ("LARYNX",)), Clause("tag", "=", ("clinic-a",)),
    )  # fmt: skip


@pytest.mark.parametrize("text, message", [
    ("", "--where '': no clause; write e.g."),
    ("colour=red", "--where clause 'colour=red': unknown field 'colour'; use one of modality, date, body, tag, patient, study, series"),
    ("modality ES", "--where clause 'modality ES': expected FIELD=VALUE[,VALUE...] or date>=YYYY-MM-DD"),
    ("tag>=a", "--where clause 'tag>=a': only date takes <, <=, >, >=; write tag=VALUE"),
    ("modality=ES,", "--where clause 'modality=ES,': a value is missing; write modality=VALUE[,VALUE...]"),
    ("date>=2020-13-01", "--where clause 'date>=2020-13-01': '2020-13-01' is not a date; write YYYY-MM-DD"),
    ("date>=2020-01-01,2021-01-01", "--where clause 'date>=2020-01-01,2021-01-01': >= takes one date"),
])  # fmt: skip
def test_bad_clauses_are_one_line_errors(text, message):
    with pytest.raises(InputError) as error:
        SearchFilter.parse(text)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def meta_of(i: int) -> FileMeta:
    """Half the images are tagged 'even'; 1 % are XA (the rest ES); one is a LARYNX; dates step by day."""
    return FileMeta(modality="XA" if i % 100 == 7 else "ES", body_part="LARYNX" if i == 1234 else "CHEST", tag="even" if i % 2 == 0 else "odd",
                    study_date=f"2020{1 + i % 12:02d}{1 + i % 28:02d}", patient_id=f"P{i % 50}")  # fmt: skip


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """10,000 catalog rows with random unit vectors and `meta_of` metadata."""
    vectors = np.random.default_rng(0).standard_normal((COUNT, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    catalog = Catalog(f"sqlite:///{tmp_path_factory.mktemp('filters') / 'catalog.db'}")
    with catalog.transaction():
        for i, vector in enumerate(vectors):
            image_id = catalog.add_image(sha256=f"{i:064x}", frame=0, width=8, height=8, modality="DICOM:ES", vector=vector,
                                         label_map=np.zeros((4, 4), np.uint8))  # fmt: skip
            catalog.add_file(f"/archive/{i}.dcm", 0, image_id, 1, 0, meta=meta_of(i))
    catalog.add_file("/archive/alias.png", 0, 1 + 5, 1, 0, meta=FileMeta(tag="alias"))  # a second path of image 6
    yield catalog
    catalog.close()


def test_the_catalog_finds_the_images_a_filter_matches(archive):
    ids = lambda text: archive.ids_matching(SearchFilter.parse(text)).tolist()  # noqa: E731  (catalog ids are row + 1)
    assert len(ids("tag=even")) == 5000 and len(ids("modality=XA")) == 100 and ids("body=larynx") == [1235]
    assert ids("tag=alias") == [6] and 6 in ids("tag=odd")  # an image matches through any of its files
    assert ids("modality=XA; tag=alias") == []  # ... when that one file matches every clause
    assert ids("body=LARYNX,CHEST; date>=2020-12-28; date<=20201228") == [i + 1 for i in range(COUNT) if i % 12 == 11 and i % 28 == 27]
    assert ids("patient=P3,P4; modality=XA") == [i + 1 for i in range(COUNT) if i % 50 in (3, 4) and i % 100 == 7]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
@pytest.mark.parametrize("where, matching", [("tag=even", 5000), ("modality=XA", 100), ("body=LARYNX", 1)])
def test_filtered_search_equals_exact_search_over_the_matching_subset(archive, kind, where, matching):
    ids, vectors = archive.vectors()
    index = VectorIndex.build(vectors, ids, kind)
    allowed = archive.ids_matching(SearchFilter.parse(where))
    assert len(allowed) == matching  # 50 %, 1 % and 0.01 % of the archive
    queries = np.random.default_rng(1).standard_normal((5, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    k = 10
    scores, found = index.search(queries, k, allowed)
    subset = vectors[np.isin(ids, allowed)]
    exact = queries @ subset.T
    for row in range(len(queries)):
        order = np.argsort(-exact[row], kind="stable")[:k]
        assert (found[row] >= 0).sum() == min(k, matching)  # k results however selective the filter
        if kind == "ivf" and matching > 4096:
            # a large allowed set is searched in IVF's visited cells, as unfiltered IVF search is: approximate
            assert np.isin(found[row], allowed).all()
            continue
        assert found[row][: min(k, matching)].tolist() == allowed[order].tolist()
        assert np.allclose(scores[row][: min(k, matching)], exact[row][order], atol=1e-5)


def test_a_filter_matching_nothing_finds_nothing(archive):
    ids, vectors = archive.vectors()
    scores, found = VectorIndex.build(vectors, ids, "flat").search(vectors[:2], 3, np.zeros(0, np.int64))
    assert (found == -1).all() and np.isneginf(scores).all()
