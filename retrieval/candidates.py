"""The re-ranking's view of candidate images, decoded once and kept.

Re-ranking a query's 100 candidates needs, for each, S's stored label map at the query's
resolution (for DICE) and the spectra the alignment matches against (`AlignedChamfer.spectra`:
a distance transform and two FFTs of its outlines). Read from the catalog and computed afresh, that
was most of the re-ranking's time; `CandidateCache` keeps both for the most recently used images
(least recently used dropped beyond `capacity`) and forgets everything when the catalog's generation
moves, so an image re-indexed with other masks is never scored by its old ones.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np
import torch

from indexing.workspace import Workspace
from retrieval.labelled import resized_labels
from retrieval.oracle import AlignedChamfer

DEFAULT_CAPACITY = 4096  # images; at 64 px about 25 KB each with the alignment's spectra


class CandidateCache:
    """`CandidateCache(workspace, resolution)`: label maps and alignment spectra of image ids."""

    def __init__(self, workspace: Workspace, resolution: int, capacity: int = DEFAULT_CAPACITY):
        self.workspace, self.resolution, self.capacity = workspace, resolution, capacity
        self._generation = workspace.generation
        self._labels: OrderedDict[int, np.ndarray] = OrderedDict()
        self._spectra: OrderedDict[tuple, tuple[bool, torch.Tensor, torch.Tensor]] = OrderedDict()

    def _check_generation(self) -> None:
        if self.workspace.generation != self._generation:
            self._labels.clear()
            self._spectra.clear()
            self._generation = self.workspace.generation

    def label_maps(self, ids: list[int]) -> np.ndarray:
        """uint8 (N, R, R): S's stored label maps of `ids` at the cache's resolution (all 0 for an
        image without stored masks)."""
        self._check_generation()
        side = (self.resolution, self.resolution)
        found = {i: self._labels[i] for i in ids if i in self._labels}
        missing = [i for i in dict.fromkeys(ids) if i not in found]
        stored = self.workspace.masks_for(missing) if missing else {}
        for image_id in missing:
            labels = stored.get(image_id)
            found[image_id] = np.zeros(side, np.uint8) if labels is None else resized_labels(labels, self.resolution)
        self._keep(self._labels, found)
        return np.stack([found[i] for i in ids]) if ids else np.zeros((0, *side), np.uint8)

    def matcher(self, ids: list[int], template: AlignedChamfer, outlines: Callable[[np.ndarray], np.ndarray]) -> AlignedChamfer:
        """`template` against the outlines of `ids`; `outlines(label_maps)` draws the uint8 (n, R, R)
        outlines of those not kept yet."""
        self._check_generation()
        geometry = (template.resolution, template.reduction, template.reach)
        found = {i: self._spectra[(i, geometry)] for i in ids if (i, geometry) in self._spectra}
        missing = [i for i in dict.fromkeys(ids) if i not in found]
        if missing:
            blank, transforms, ink = template.spectra(outlines(self.label_maps(missing)))
            found.update((image_id, (bool(blank[row]), transforms[row].clone(), ink[row].clone()))  # not views of the batch
                         for row, image_id in enumerate(missing))
        self._keep(self._spectra, {(i, geometry): value for i, value in found.items()})
        rows = [found[i] for i in ids]
        if not rows:
            return template
        return template.against(np.array([r[0] for r in rows], bool), torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows]))

    def _keep(self, store: OrderedDict, values: dict) -> None:
        """Store `values` as the most recently used; drop the least recently used beyond capacity."""
        for key, value in values.items():
            store[key] = value
            store.move_to_end(key)
        while len(store) > self.capacity:
            store.popitem(last=False)
