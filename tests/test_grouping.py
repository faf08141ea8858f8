"""Search results grouped by patient, study or series, near-duplicate frames collapsed with a count;
`search --group` in the CLI, and unchanged results where nothing is grouped."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_ingest import FakeEmbedder, blocky, write_dicom
from test_search import own_sketch

from generation.dataset import ImageDataset
from generation.errors import InputError
from indexing.ingest import index_folders
from indexing.workspace import open_workspace_for_search
from retrieval.grouping import default_grouping, group_hits
from retrieval.search import ArchiveEmbedder, Hit, SystemModels


def ramp(seed: int) -> np.ndarray:
    return (blocky(seed)[..., 0].astype(np.int16) * 4)[:16, :16]


def write_archive(folder):
    """P1: study A (a 3-frame series of one scene, frames nearly equal) and study B; P2: study C
    (a series of two different images); and a plain PNG."""
    folder.mkdir()
    scene = ramp(1)
    write_dicom(folder / "a.dcm", np.stack([scene, scene + 1, scene + 2]), PatientID="P1", StudyInstanceUID="1.1",
                SeriesInstanceUID="1.1.1", StudyDate="20200101")  # fmt: skip
    write_dicom(folder / "b.dcm", ramp(2), PatientID="P1", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.1")
    write_dicom(folder / "c1.dcm", ramp(3), PatientID="P2", StudyInstanceUID="2.1", SeriesInstanceUID="2.1.1")
    write_dicom(folder / "c2.dcm", ramp(4), PatientID="P2", StudyInstanceUID="2.1", SeriesInstanceUID="2.1.1")
    Image.fromarray(blocky(5)).save(folder / "plain.png")


@pytest.fixture
def workspace(tmp_path):
    write_archive(tmp_path / "archive")
    index_folders(tmp_path / "archive", tmp_path / "ws", FakeEmbedder())
    with open_workspace_for_search(tmp_path / "ws") as ws:
        yield ws


def hits_in_order(ws, order: list[tuple[str, int]]) -> list[Hit]:
    """Hits for (file name, frame) in this order, scores descending."""
    ids = {(r.path.rsplit("/", 1)[-1], r.frame): r.id for r in ws.records_for(ws.index.ids()).values()}
    return [Hit(rank, ids[key], key[0], key[1], 1.0 - rank / 100, 1.0 - rank / 100, None) for rank, key in enumerate(order, start=1)]


ORDER = [("a.dcm", 0), ("c1.dcm", 0), ("plain.png", 0), ("a.dcm", 2), ("b.dcm", 0), ("c2.dcm", 0), ("a.dcm", 1)]


def test_hits_group_by_study_with_near_duplicate_frames_collapsed(workspace):
    hits = hits_in_order(workspace, ORDER)
    groups = group_hits(workspace, hits, "study", 10)
    assert [(g.rank, g.by, g.key, g.frames) for g in groups] == [
        (1, "study", "1.1", 3), (2, "study", "2.1", 2), (3, "image", str(hits[2].id), 1), (4, "study", "1.2", 1),
    ]  # fmt: skip
    study_a, study_c = groups[0], groups[1]
    assert [(h.hit.id, h.count) for h in study_a.hits] == [(hits[0].id, 3)]  # its three frames are one scene
    assert [(h.hit.id, h.count) for h in study_c.hits] == [(hits[1].id, 1), (hits[5].id, 1)]  # two images, both shown
    assert study_a.score == hits[0].score and study_a.meta.patient_id == "P1" and study_a.meta.study_date == "20200101"
    assert study_a.to_json()["hits"] == [{"id": hits[0].id, "rank": 1, "count": 3}]
    assert [g.key for g in group_hits(workspace, hits, "study", 2)] == ["1.1", "2.1"]


def test_hits_group_by_patient_and_by_series(workspace):
    hits = hits_in_order(workspace, ORDER)
    assert [(g.key, g.frames) for g in group_hits(workspace, hits, "patient", 10)] == [
        ("P1", 4), ("P2", 2), (str(hits[2].id), 1),
    ]  # fmt: skip
    assert [g.key for g in group_hits(workspace, hits, "series", 10)] == ["1.1.1", "2.1.1", str(hits[2].id), "1.2.1"]
    with pytest.raises(InputError, match="group by 'ward': use one of patient, study, series, none"):
        group_hits(workspace, hits, "ward", 10)


def test_the_default_groups_by_study_only_where_studies_are_known(workspace):
    records = workspace.records_for(workspace.index.ids())
    assert default_grouping(records) == "study"
    assert default_grouping({i: r for i, r in records.items() if r.path.endswith(".png")}) == "none"


def test_cli_search_groups_and_leaves_ungrouped_results_unchanged(tiny_chain, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    data, bundle, _ = tiny_chain
    write_archive(tmp_path / "archive")
    models = SystemModels(bundle, "cpu")
    index_folders(tmp_path / "archive", tmp_path / "ws", ArchiveEmbedder(models))
    index_folders(data / "images", tmp_path / "plain", ArchiveEmbedder(models))
    sketch = tmp_path / "sketch.png"
    Image.fromarray(own_sketch(models, ImageDataset(data).image(2))).resize((256, 256), Image.NEAREST).save(sketch)
    runner = CliRunner()

    def search(workspace, *options):
        result = runner.invoke(app, ["search", str(sketch), "-k", "3", "--workspace", str(workspace), "--json", "--device", "cpu", *options])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    grouped = search(tmp_path / "ws")  # studies known: grouped by study by default
    assert [g["by"] for g in grouped["groups"]].count("study") >= 2 and len(grouped["groups"]) == 3
    assert sum(g["frames"] for g in grouped["groups"]) <= 7 and len(grouped["results"]) == 3
    assert set(grouped["groups"][0]) == {"rank", "by", "key", "score", "frames", "hits", "patient_id", "study_uid", "series_uid",
                                         "modality", "study_date", "body_part", "tag"}  # fmt: skip
    ungrouped = search(tmp_path / "ws", "--group", "none")
    assert "groups" not in ungrouped and ungrouped["results"] == grouped["results"]
    plain = search(tmp_path / "plain")  # no studies: exactly the ungrouped answer
    assert "groups" not in plain and plain["results"] == search(tmp_path / "plain", "--group", "none")["results"]
    assert search(tmp_path / "plain", "--group", "patient")["groups"][0]["by"] == "image"
    result = runner.invoke(app, ["search", str(sketch), "--workspace", str(tmp_path / "ws"), "--group", "ward", "--device", "cpu"])
    assert result.exit_code == 2 and "--group 'ward': use one of patient, study, series, none" in result.output
    table = runner.invoke(app, ["search", str(sketch), "-k", "10", "--workspace", str(tmp_path / "ws"), "--device", "cpu"])
    assert table.exit_code == 0 and "x3" in table.output, table.output  # every group: the scene of study 1.1 shows its 3 frames as one


def test_the_near_duplicate_rule_is_the_most_recalling_one_that_folds_mostly_same_view_pairs(tmp_path):
    from retrieval.near_duplicates import choose, rule_table, sequence_pairs

    similarity = np.array([0.99, 0.97, 0.93, 0.91, 0.86, 0.5])
    mask_dice = np.array([96.0, 91.0, 92.0, 95.0, 70.0, 10.0])
    truth = np.array([95.0, 92.0, 91.0, 40.0, 93.0, np.nan])  # the 0.91 pair shows another view
    rows = rule_table(similarity, mask_dice, truth, similarities=(0.85, 0.92), mask_dices=(0.0, 90.0), same_view=80)
    assert [(r["similarity"], r["mask_dice"], r["folded"], round(r["precision"], 3), r["recall"]) for r in rows] == [
        (0.85, 0.0, 5, 0.8, 1.0), (0.85, 90.0, 4, 0.75, 0.75), (0.92, 0.0, 3, 1.0, 0.75), (0.92, 90.0, 3, 1.0, 0.75)]
    assert (choose(rows, 0.9)["similarity"], choose(rows, 0.9)["mask_dice"]) == (0.92, 90.0)  # equal recall: the stricter
    assert choose(rows[:2], 0.9) == rows[1]  # none is precise enough: the strictest tried

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for name in ("a1.png", "a2.png", "b1.png", "a3.png"):
        Image.fromarray(blocky(1)).save(root / "images" / name)
    (root / "split.csv").write_text("file,sequence,split\na1.png,a,val\na2.png,a,val\nb1.png,b,val\na3.png,a,val\n")
    dataset = ImageDataset(root, "val")
    names = [s.name for s in dataset.samples]
    pairs = {tuple(sorted((names[i], names[j]))) for i, j in zip(*sequence_pairs(dataset))}
    assert pairs == {("a1.png", "a2.png"), ("a1.png", "a3.png"), ("a2.png", "a3.png")}


def test_frames_fold_only_when_vectors_and_stored_masks_both_agree():
    from retrieval.grouping import near_duplicates

    a, b, far = np.array([1.0, 0.0]), np.array([0.9, np.sqrt(1 - 0.81)]), np.array([0.0, 1.0])
    masks = np.zeros((16, 16), np.uint8)
    masks[2:10, 2:10] = 1
    moved = np.roll(masks, 5, axis=1)
    assert near_duplicates(a, b, masks, masks.copy())
    assert not near_duplicates(a, b, masks, moved)  # alike vectors, another view
    assert not near_duplicates(a, far, masks, masks.copy())
    assert near_duplicates(a, b, None, masks) and not near_duplicates(a, far, None, None)  # no masks: the vectors decide
