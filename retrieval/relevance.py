"""Relevance feedback: Rocchio's update of a query vector from the hits a user liked and disliked.

    q' = a q + b mean(liked) - c mean(disliked),   then scaled to unit length

with q and the archive vectors unit vectors of the same recipe (`retrieval.vector`). Without a
query (more like these images), q' = b mean(liked) - c mean(disliked). The default coefficients
were chosen on the vocalfolds `val` split with a simulated user (`retrieval.feedback`,
docs/RESULTS.md, section "Relevance feedback").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from generation.errors import InputError


@dataclass(frozen=True)
class Rocchio:
    query: float = 1.0  # a
    liked: float = 1.5  # b
    disliked: float = 1.5  # c

    def __post_init__(self) -> None:
        if min(self.query, self.liked, self.disliked) < 0:
            raise InputError(f"feedback coefficients {self.query}, {self.liked}, {self.disliked}: must be non-negative")

    def move(self, query: np.ndarray | None, liked: np.ndarray, disliked: np.ndarray) -> np.ndarray:
        """query (D,) or None, liked (L, D), disliked (U, D) -> the moved query, float32 (D,), unit."""
        dim = len(query) if query is not None else liked.shape[1]
        moved = np.zeros(dim, np.float64) if query is None else self.query * np.asarray(query, np.float64)
        if len(liked):
            moved += self.liked * np.asarray(liked, np.float64).mean(axis=0)
        if len(disliked):
            moved -= self.disliked * np.asarray(disliked, np.float64).mean(axis=0)
        norm = np.linalg.norm(moved)
        if norm == 0:
            raise InputError("the liked and disliked images cancel out: like some images, or unlike fewer")
        return (moved / norm).astype(np.float32)
