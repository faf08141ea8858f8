"""The project's one dataset format.

    DIR/images/NAME.png|jpg|...   images (required)
    DIR/masks/NAME.png            optional 8-bit class-index label maps, 0 = background/void
    DIR/classes.json              optional {"index": "name"}
    DIR/split.csv                 optional, header `file,...,split`; `file` names an image

A folder without `images/` is a plain archive: every image under it (recursively), no masks.
Arrays are uint8: images (H, W, 3) RGB, masks (H, W).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from generation.errors import InputError
from generation.images import find_images, load_mask, load_rgb, square_resize


@dataclass(frozen=True)
class Sample:
    name: str  # path relative to the images folder, e.g. "patient1_seq1_0001.png"
    image_path: Path
    mask_path: Path | None
    split: str | None


class ImageDataset:
    """Images, optional masks, class names and splits of one dataset folder."""

    def __init__(self, root: str | Path, split: str | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: no such dataset folder")
        image_dir = self.root / "images"
        structured = image_dir.is_dir()
        image_paths = find_images(image_dir if structured else self.root)
        if not image_paths:
            raise InputError(f"{self.root}: no images found (PNG, JPEG, TIFF, BMP)")
        base = image_dir if structured else self.root
        splits = self._read_splits() if structured else {}
        if split is not None and not splits:
            raise InputError(f"{self.root}: has no split.csv, so --split {split} cannot be used")
        mask_dir = self.root / "masks"
        samples = []
        for path in image_paths:
            name = path.relative_to(base).as_posix()
            mask_path = (mask_dir / name).with_suffix(".png") if structured else None
            sample_split = splits.get(name)
            if split is not None and sample_split != split:
                continue
            samples.append(Sample(name, path, mask_path if mask_path and mask_path.is_file() else None, sample_split))
        if not samples:
            raise InputError(f"{self.root}: split {split!r} is empty; splits present: {sorted(set(splits.values()))}")
        self.samples = samples
        self.classes = self._read_classes()

    def _read_splits(self) -> dict[str, str]:
        path = self.root / "split.csv"
        if not path.is_file():
            return {}
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "file" not in reader.fieldnames or "split" not in reader.fieldnames:
                raise InputError(f"{path}: needs a header with `file` and `split` columns")
            return {row["file"]: row["split"] for row in reader}

    def _read_classes(self) -> dict[int, str]:
        path = self.root / "classes.json"
        if path.is_file():
            try:
                return {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
            except (ValueError, AttributeError) as error:
                raise InputError(f"{path}: expected {{\"index\": \"name\"}} ({error})")
        return {}

    @property
    def has_masks(self) -> bool:
        return all(s.mask_path is not None for s in self.samples)

    @property
    def num_classes(self) -> int:
        """Number of classes including background 0."""
        return max(self.classes, default=0) + 1 if self.classes else 0

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int, size: int | None = None) -> np.ndarray:
        image = load_rgb(self.samples[index].image_path)
        return image if size is None else square_resize(image, size)

    def mask(self, index: int, size: int | None = None) -> np.ndarray:
        sample = self.samples[index]
        if sample.mask_path is None:
            raise InputError(f"{sample.name}: has no mask in {self.root / 'masks'}")
        mask = load_mask(sample.mask_path)
        return mask if size is None else square_resize(mask, size, nearest=True)

    def arrays(self, size: int, with_masks: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """All images as (N, size, size, 3) uint8, and masks as (N, size, size) uint8 if asked."""
        images = np.stack([self.image(i, size) for i in range(len(self))])
        masks = np.stack([self.mask(i, size) for i in range(len(self))]) if with_masks else None
        return images, masks
