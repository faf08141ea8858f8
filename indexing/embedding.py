"""Embedding an index run's new files: what the run needs from the networks, and sharding over torchrun ranks.

Under torchrun, rank 0 plans every batch and is the only process touching the workspace and the
catalog; each rank loads and embeds its share of the batch's new files, and rank 0 gathers the
results. Rank 0 tells the other ranks what to do with one broadcast per step: ("see", paths),
("embed", items), ("done", result), or ("input" | "error", message) when it fails, so that every
rank stops with it.

Across machines (`torchrun --nnodes N`), the other ranks are sent file paths, not pixels: every
rank opens the files itself, by the absolute path rank 0 found them under, so the archive must be
at that path on every node (shared storage). Before the first batch every rank checks that it can
see the folders being indexed (`Ranks.check_visible`), and that it embeds with the same bundle and
vector weights as rank 0 (`Ranks.agree`): a node that cannot, or that loaded another bundle, stops
the run with a one-line error naming it, instead of skipping files or storing foreign vectors.
DICOMweb instances travel inside the broadcast, so only rank 0 talks to the server.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed

from generation.device import init_distributed
from generation.errors import InputError
from indexing.files import load_reduced, reason

Key = tuple[str, int]  # (sha256, frame)
Item = tuple[Key, Path, int]  # an entry to load and embed: (key, path, frame)
Embedded = tuple[np.ndarray, np.ndarray, tuple[int, int]] | str  # (vector, label map, (height, width)) or why not


@dataclass
class EmbeddedBatch:
    vectors: np.ndarray  # float32 (N, dim), L2-normalised
    label_maps: list[np.ndarray]  # uint8 (h, w) each: S's masks, 0 = background, c = class c


class Embedder(Protocol):
    bundle_id: str  # names the model bundle; a workspace indexed with another bundle is refused
    dim: int
    # Optional: `bundle_path`, the bundle folder, recorded in workspace.json for `search`.

    def embed_images(self, images: list[np.ndarray]) -> EmbeddedBatch:
        """uint8 (H, W, 3) images of any size (large ones come reduced, `indexing.files.load_reduced`)
        -> their vectors and S's label maps."""
        ...


def _load(item: Item) -> tuple[np.ndarray, tuple[int, int]] | str:
    _, path, frame = item
    try:
        return load_reduced(path, frame)
    except InputError as error:
        return reason(path, error)
    except Exception as error:  # an odd file must not end the run
        return f"cannot read ({type(error).__name__}: {error})"


def embed_files(embedder: Embedder, items: list[Item]) -> dict[Key, Embedded]:
    """Load and embed some entries, each image reduced as it is decoded (`indexing.files.load_reduced`);
    an unreadable one gives the reason instead. The recorded (height, width) is the entry's own.

    The files are decoded on as many threads as torch uses (at most 4; the decoders release the
    GIL), so a process with one thread, as under torchrun, decodes one at a time."""
    threads = max(1, min(4, torch.get_num_threads(), len(items)))
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            loaded = list(pool.map(_load, items))
    else:
        loaded = [_load(item) for item in items]
    results: dict[Key, Embedded] = {}
    keys, images, sizes = [], [], []
    for (key, _, _), outcome in zip(items, loaded):
        if isinstance(outcome, str):
            results[key] = outcome
        else:
            images.append(outcome[0])
            sizes.append(outcome[1])
            keys.append(key)
    if not images:
        return results
    batch = embedder.embed_images(images)
    vectors = np.asarray(batch.vectors, np.float32)
    if vectors.shape != (len(images), embedder.dim) or len(batch.label_maps) != len(images):
        raise RuntimeError(
            f"the embedder returned vectors {vectors.shape} and {len(batch.label_maps)} label maps "
            f"for {len(images)} images of dimension {embedder.dim}"
        )
    for key, size, vector, label_map in zip(keys, sizes, vectors, batch.label_maps):
        results[key] = (vector, np.asarray(label_map, np.uint8), size)
    return results


class Ranks:
    """The processes of one index run: rank 0 leads (see the module docstring); one process alone is rank 0."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder
        self.dist = init_distributed()

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def _share(self, message: Any = None) -> Any:
        """Rank 0's message, on every rank."""
        if not self.dist.enabled:
            return message
        box = [message]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self) -> None:
        """On every rank, before the run: stop every rank if one embeds with another bundle or vector
        weights (another `bundle_id`) or dimension than rank 0's, naming it and its host."""
        if not self.dist.enabled:
            return
        mine = (str(self.embedder.bundle_id), int(self.embedder.dim), socket.gethostname())
        everyone: list = [None] * self.dist.world_size
        torch.distributed.all_gather_object(everyone, mine)
        lead_id, lead_dim, lead_host = everyone[0]
        for rank, (bundle_id, dim, host) in enumerate(everyone):
            if (bundle_id, dim) != (lead_id, lead_dim):
                raise InputError(
                    f"rank {rank} on {host} embeds with bundle {bundle_id!r} ({dim} dimensions), rank 0 on {lead_host} with "
                    f"{lead_id!r} ({lead_dim}); give every node the same --bundle and --weights"
                )

    def check_visible(self, paths: Sequence[Path]) -> None:
        """On rank 0: every rank must see these paths (the folders and files being indexed), since
        each opens its share of the files itself; else an InputError names the first rank, host and
        path that cannot."""
        if not self.dist.enabled or not paths:
            return
        self._share(("see", [str(path) for path in paths]))
        for rank, (host, missing) in enumerate(self._report_visible([str(path) for path in paths])):
            if missing:
                raise InputError(
                    f"rank {rank} on {host} cannot see {missing[0]}: every node opens the archive's files by the path rank 0 "
                    f"found them under; put the archive on storage all nodes mount at that path, or index from one node"
                )

    def _report_visible(self, paths: list[str]) -> list[tuple[str, list[str]]]:
        mine = (socket.gethostname(), [path for path in paths if not os.path.exists(path)])
        gathered = [None] * self.dist.world_size if self.dist.is_main else None
        torch.distributed.gather_object(mine, gathered, dst=0)
        return gathered or []

    def embed(self, items: list[Item]) -> dict[Key, Embedded]:
        """On rank 0: every rank embeds its share of `items`; rank 0 gets all the results."""
        self._share(("embed", items))
        return self._embed_share(items)

    def _embed_share(self, items: list[Item]) -> dict[Key, Embedded]:
        if not self.dist.enabled:
            return embed_files(self.embedder, items)
        share = [items[i] for i in self.dist.shard(len(items))]
        try:
            mine: tuple[dict, str | None] = (embed_files(self.embedder, share), None)
        except Exception as error:  # reported to rank 0, which stops every rank
            mine = ({}, f"{type(error).__name__}: {error}")
        gathered = [None] * self.dist.world_size if self.dist.is_main else None
        torch.distributed.gather_object(mine, gathered, dst=0)
        results: dict[Key, Embedded] = {}
        for rank, (part, error) in enumerate(gathered or []):
            if error is not None:
                raise RuntimeError(f"embedding failed on rank {rank}: {error}")
            results.update(part)
        return results

    def follow(self) -> Any:
        """On the other ranks: embed what rank 0 sends until it is done; returns what rank 0 returned."""
        while True:
            verb, payload = self._share()
            if verb == "embed":
                self._embed_share(payload)
            elif verb == "see":
                self._report_visible(payload)
            elif verb == "done":
                return payload
            else:
                raise (InputError if verb == "input" else RuntimeError)(payload)

    @contextmanager
    def lead(self) -> Iterator[None]:
        """On rank 0, around the run: a failure stops the other ranks with the same error."""
        try:
            yield
        except InputError as error:
            self._share(("input", str(error)))
            raise
        except BaseException as error:
            self._share(("error", f"rank 0 failed: {type(error).__name__}: {error}"))
            raise

    def finish(self, result: Any) -> None:
        """On rank 0: the other ranks return `result` too."""
        self._share(("done", result))
