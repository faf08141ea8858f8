"""The training pairs of E, H and the baselines: (x, S(x)), synthesized once and cached.

The cache holds, at the generator's resolution R, the images (uint8 (N, R, R, 3)), S's synthesized
sketches (uint8 (N, R, R)) and S's label maps (uint8 (N, R, R), for the optional free-hand
augmentation). It lives in BUNDLE/cache/sketches-SPLIT-R.safetensors and is rebuilt when the data,
the split, R or S change (a fingerprint of all four is stored with it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from generation.checkpoints import atomic_write
from generation.dataset import ImageDataset
from generation.errors import InputError
from generation.images import file_sha256, square_resize
from generation.registry import load_network


@dataclass
class SketchCache:
    images: np.ndarray  # uint8 (N, R, R, 3)
    sketches: np.ndarray  # uint8 (N, R, R), canonical: paper 255, ink 0
    label_maps: np.ndarray  # uint8 (N, R, R), S's classes (0 = background)

    def __post_init__(self) -> None:
        n, r = len(self.images), self.images.shape[1]
        assert self.images.shape == (n, r, r, 3) and self.images.dtype == np.uint8, self.images.shape
        assert self.sketches.shape == (n, r, r) and self.label_maps.shape == (n, r, r), (self.sketches.shape, self.label_maps.shape)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        return self.images.shape[1]


def cache_path(bundle: Path, split: str | None, resolution: int) -> Path:
    return Path(bundle) / "cache" / f"sketches-{split or 'all'}-{resolution}.safetensors"


def sketch_cache(data: str | Path, bundle: str | Path, resolution: int, split: str | None = "train",
                 device: str | torch.device = "cpu", batch_size: int = 32,
                 on_progress: Callable[[int, int], None] | None = None) -> SketchCache:
    """The cached pairs for (data, split) at `resolution`, synthesized with the bundle's S if needed."""
    bundle = Path(bundle)
    dataset = ImageDataset(data, split)
    if len(dataset) == 0:
        raise InputError(f"{data}: no images in split {split!r}")
    synthesizer_file = bundle / "synthesizer.safetensors"
    if not synthesizer_file.is_file():
        raise InputError(f"{bundle}: no synthesizer S (synthesizer.safetensors); train it first (`train synthesizer`)")
    names = "\n".join(sample.name for sample in dataset.samples)
    fingerprint = hashlib.sha256(f"{names}|{split}|{resolution}|{file_sha256(synthesizer_file)}".encode()).hexdigest()
    path = cache_path(bundle, split, resolution)
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            stored = (handle.metadata() or {}).get("fingerprint")
        if stored == fingerprint:
            tensors = load_file(str(path))
            return SketchCache(tensors["images"].numpy(), tensors["sketches"].numpy(), tensors["label_maps"].numpy())

    S = load_network("synthesizer", bundle, device)
    images = np.empty((len(dataset), resolution, resolution, 3), np.uint8)
    sketches = np.empty((len(dataset), resolution, resolution), np.uint8)
    labels = np.empty_like(sketches)
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        originals = [dataset.image(i) for i in indices]
        for i, image in zip(indices, originals):
            images[i] = square_resize(image, resolution)
        # S reads the image at its own input size; the sketch is drawn at the generator's.
        batch = [square_resize(image, S.config.size) for image in originals]
        sketches[indices.start : indices.stop], labels[indices.start : indices.stop] = S.synthesize(batch, resolution)
        if on_progress is not None:
            on_progress(indices.stop, len(dataset))
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"images": torch.from_numpy(images), "sketches": torch.from_numpy(sketches), "label_maps": torch.from_numpy(labels)}
    metadata = {"fingerprint": fingerprint, "data": str(data), "split": str(split)}
    atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
    return SketchCache(images, sketches, labels)
