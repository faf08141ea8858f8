"""Search results by patient, study or series: the top k groups, each with its best frames.

A group is the hits that share a PatientID, StudyInstanceUID or SeriesInstanceUID (a hit without
that identifier, such as a plain image file, is a group of its own), ranked by its best hit. Within
a group, a frame that is a near-duplicate of a better one of the same sequence (its series, or its
file: a video or a multi-frame DICOM) collapses into that hit, which counts it: their vectors'
inner product is at least `DUPLICATE_SIMILARITY` and their stored masks overlap with DICE at least
`DUPLICATE_MASK_DICE` (the rule chosen by `retrieval.near_duplicates`, docs/RESULTS.md).

Groups are formed from the ranked candidates (`--candidates`), so k groups come back when the
candidates hold that many.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from generation.errors import InputError
from indexing.catalog import FileMeta, ImageRecord
from indexing.workspace import Workspace
from retrieval.rerank import dice_score
from retrieval.search import Hit, Retriever, SearchRequest, SearchResult

GROUPINGS = ("patient", "study", "series", "none")
# Chosen on vocalfolds256 `val` and `train` (`python -m retrieval.near_duplicates`): of the pairs of
# frames of one video it folds, 91 % show the same view (the vector alone at 0.95: 74 %).
DUPLICATE_SIMILARITY = 0.80
DUPLICATE_MASK_DICE = 90.0  # percent
BEST_FRAMES = 3  # shown per group
_FIELDS = {"patient": "patient_id", "study": "study_uid", "series": "series_uid"}


@dataclass(frozen=True)
class GroupedHit:
    hit: Hit
    count: int  # the frames it stands for: itself and the near-duplicates collapsed into it


@dataclass(frozen=True)
class Group:
    rank: int
    by: str  # 'patient', 'study' or 'series'; 'image' for a hit without that identifier
    key: str  # the identifier (for 'image', the image id)
    score: float  # of its best hit
    frames: int  # candidates in the group
    hits: tuple[GroupedHit, ...]  # its best frames, best first (at most BEST_FRAMES)
    meta: FileMeta  # of its best hit: patient, study, series, modality, date, body part, tag

    def to_json(self) -> dict:
        return {"rank": self.rank, "by": self.by, "key": self.key, "score": self.score, "frames": self.frames,
                **{k: v for k, v in asdict(self.meta).items() if k != "sop_uid"},
                "hits": [{"id": h.hit.id, "rank": h.hit.rank, "count": h.count} for h in self.hits]}  # fmt: skip


def default_grouping(records: dict[int, ImageRecord]) -> str:
    """'study' where the hits' studies are known, else 'none'."""
    return "study" if any(record.meta.study_uid for record in records.values()) else "none"


def group_hits(workspace: Workspace, hits: list[Hit], by: str, k: int) -> list[Group]:
    """The top `k` groups of `hits` (ranked, best first) by patient, study or series."""
    if by not in _FIELDS:
        raise InputError(f"group by {by!r}: use one of {', '.join(GROUPINGS)}")
    records = workspace.records_for([hit.id for hit in hits])
    ids, vectors = workspace.catalog.vectors([hit.id for hit in hits])
    vector_of = dict(zip(ids.tolist(), vectors))
    masks = workspace.masks_for([hit.id for hit in hits])
    members: dict[tuple[str, str], list[Hit]] = {}
    for hit in hits:
        if hit.id not in records:
            continue
        identifier = getattr(records[hit.id].meta, _FIELDS[by])
        members.setdefault((by, identifier) if identifier else ("image", str(hit.id)), []).append(hit)
    groups = []
    for rank, ((kind, key), group) in enumerate(list(members.items())[:k], start=1):
        collapsed = _collapse(group, records, vector_of, masks)
        groups.append(Group(rank, kind, key, group[0].score, len(group), tuple(collapsed[:BEST_FRAMES]), records[group[0].id].meta))
    return groups


def near_duplicates(vector_a: np.ndarray, vector_b: np.ndarray, masks_a: np.ndarray | None, masks_b: np.ndarray | None) -> bool:
    """Whether two frames of one sequence show the same view (see the module docstring); frames
    without stored masks are compared by their vectors alone."""
    if float(vector_a @ vector_b) < DUPLICATE_SIMILARITY:
        return False
    if masks_a is None or masks_b is None:
        return True
    return dice_score(masks_a, masks_b, int(max(masks_a.max(), masks_b.max())) + 1) >= DUPLICATE_MASK_DICE


def _collapse(hits: list[Hit], records: dict[int, ImageRecord], vector_of: dict[int, np.ndarray],
              masks: dict[int, np.ndarray]) -> list[GroupedHit]:
    """The group's hits with each near-duplicate of a better hit of the same sequence folded into it."""
    kept: list[list] = []  # [hit, count, sequence]
    for hit in hits:
        record = records[hit.id]
        sequence = record.meta.series_uid or record.path
        for entry in kept:
            if entry[2] == sequence and near_duplicates(vector_of[hit.id], vector_of[entry[0].id], masks.get(hit.id), masks.get(entry[0].id)):
                entry[1] += 1
                break
        else:
            kept.append([hit, 1, sequence])
    return [GroupedHit(hit, count) for hit, count, _ in kept]


def grouped_search(retriever: Retriever, sketch: str | Path | Image.Image | np.ndarray, k: int = 10, group: str | None = None,
                   candidates: int = 100, **options) -> tuple[SearchResult, list[Group] | None]:  # fmt: skip
    """`retriever.search`, and its top k groups (`group`: patient, study or series; None: study
    where studies are known; 'none', or None without studies: no groups). The flat results are
    those of the same search without grouping."""
    [outcome] = grouped_search_many(retriever, [(SearchRequest(sketch, k=k, candidates=candidates, **options), group)])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def grouped_search_many(retriever: Retriever, requests: Sequence[tuple[SearchRequest, str | None]]
                        ) -> list[tuple[SearchResult, list[Group] | None] | Exception]:
    """`grouped_search` of each (request, group) pair, searched together (`Retriever.search_many`);
    a request's error (a bad group too) is its outcome and leaves the others alone."""
    outcomes: list = [None] * len(requests)
    searched = []  # (number, request as searched, group)
    for number, (request, group) in enumerate(requests):
        if group is not None and group not in GROUPINGS:
            outcomes[number] = InputError(f"--group {group!r}: use one of {', '.join(GROUPINGS)}")
        elif group == "none":
            searched.append((number, request, group))
        else:  # every candidate ranked, for the groups to be formed from
            searched.append((number, replace(request, k=max(request.k, request.candidates)), group))
    results = retriever.search_many([request for _, request, _ in searched]) if searched else []
    for (number, _, group), result in zip(searched, results):
        try:
            outcomes[number] = result if isinstance(result, Exception) else _grouped(retriever, result, requests[number][0].k, group)
        except Exception as error:  # one request's fault is its own outcome
            outcomes[number] = error
    return outcomes


def _grouped(retriever: Retriever, result: SearchResult, k: int, group: str | None) -> tuple[SearchResult, list[Group] | None]:
    """A search of every candidate -> its top k hits and top k groups."""
    if group == "none":
        return result, None
    by = group or default_grouping(retriever.workspace.records_for([hit.id for hit in result.results]))
    groups = group_hits(retriever.workspace, result.results, by, k) if by != "none" else None
    result.results = result.results[:k]
    return result, groups
