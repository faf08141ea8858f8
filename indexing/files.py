"""Archive files: finding them, fingerprinting them and reading them as uint8 RGB (H, W, 3).

PNG, JPEG, TIFF and BMP (8/16-bit, grey or colour) go through `generation.images`; DICOM (`.dcm`,
`.dicom`, or any file with the `DICM` magic) through pydicom, the optional `dicom` extra. A DICOM
file gives one entry per frame: its stored values are rescaled (RescaleSlope/Intercept), windowed
with the file's own WindowCenter/WindowWidth (else its min/max), and MONOCHROME1 is inverted.

A file's identity is (sha256 of its bytes, frame). Anything unreadable raises `InputError`, which
the caller reports as a skipped file with the message as reason. A DICOM instance fetched from a
server (`DicomInstance`) is read the same way from its bytes in memory, and is never written to disk.

Of a DICOM header only the identifiers of `indexing.catalog.FileMeta` are kept (`dicom_meta`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from generation.errors import InputError
from generation.images import IMAGE_SUFFIXES, box_reduce, file_sha256, load_rgb, load_rgb_reduced
from indexing.catalog import FileMeta

DICOM_SUFFIXES = (".dcm", ".dicom")
# `load_reduced` keeps at least this many pixels on an image's shorter side: far more than the
# networks take (64-256 px in the shipped bundles; StyleGAN2 goes to 1024), and an image whose
# shorter side is under twice this loads unreduced, so its vectors are those of the full pixels.
INDEX_SIDE = 1024


@dataclass(frozen=True)
class FileStat:
    """What tells an unchanged file without reading it. A replacement keeping size and mtime (cp -p,
    rsync, tar) still changes the inode or the ctime."""

    size: int  # bytes
    mtime_ns: int
    inode: int
    ctime_ns: int


class Unavailable(Exception):
    """An item that cannot be read now (vanished, deleted on the server): skipped, its entries kept."""


class SourceFailed(InputError):
    """Where the items come from failed as a whole (a server down or refusing): the run stops,
    keeping what it committed."""


class DicomInstance:
    """A DICOM instance held in memory (fetched from a server): its name and its Part 10 bytes."""

    def __init__(self, name: str, data: bytes):
        self.name, self.data = name, data
        self.sha256 = hashlib.sha256(data).hexdigest()
        self._dataset = self._pixels = None  # decoded on first use; not pickled (see __getstate__)

    def __getstate__(self) -> dict:
        return {"name": self.name, "data": self.data, "sha256": self.sha256, "_dataset": None, "_pixels": None}

    def __str__(self) -> str:
        return self.name

    def dataset(self):
        if self._dataset is None:
            self._dataset = _parse_dicom(self.name, io.BytesIO(self.data))
        return self._dataset

    def load(self, frame: int = 0) -> np.ndarray:
        dataset = self.dataset()
        if self._pixels is None:
            self._pixels = _decoded_pixels(self.name, dataset)
        return _dicom_frame(self.name, dataset, self._pixels, frame)


@dataclass(frozen=True)
class FileRecord:
    path: Path | str  # absolute; a DICOMweb instance's URL
    frame: int  # 0 unless a multi-frame DICOM
    sha256: str  # of the whole file's bytes
    stat: FileStat  # taken before hashing: a change while the file is read shows up next run
    modality: str  # 'PNG', 'JPEG', 'TIFF', 'BMP', 'DICOM:CT', ...
    frames: int = 1  # of the file
    meta: FileMeta = FileMeta()  # DICOM identifiers and tag
    instance: DicomInstance | None = None  # the fetched instance, for one not read from a file

    @property
    def source(self) -> Path | DicomInstance:
        """What `load` reads this entry's pixels from."""
        return self.instance if self.instance is not None else Path(self.path)

    @property
    def size(self) -> int:
        return self.stat.size

    @property
    def mtime_ns(self) -> int:
        return self.stat.mtime_ns

    @property
    def key(self) -> tuple[str, int]:
        return self.sha256, self.frame


def has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom(path: Path) -> bool:
    """A DICOM suffix, or the DICM magic in a file without an image suffix."""
    suffix = path.suffix.lower()
    return suffix in DICOM_SUFFIXES or (suffix not in IMAGE_SUFFIXES and has_dicom_magic(path))


@dataclass
class Discovery:
    """What `discover` found under the paths it was given."""

    files: list[Path]  # candidate files, absolute, sorted
    folders: list[Path]  # the folders named (resolved): files indexed under them and now gone are pruned
    unlisted: list[Path] = field(default_factory=list)  # folders that could not be listed: their entries stay
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unlisted folders and named non-files, with the reason


def discover(paths: Iterable[str | Path]) -> Discovery:
    """Candidate files under `paths` (folders recursively; a file named explicitly always counts).

    Candidates have an image or DICOM suffix or the DICM magic; whether they really are readable
    images is decided when they are probed and loaded. In a dataset folder (`images/` beside
    `masks/`, docs/DATA.md) the masks are labels, not archive images, and are left out. A file is
    kept under the path it was found at, also when it is a symbolic link (so it goes when the link
    goes). A folder that cannot be listed is reported, not taken for empty.
    """
    found: set[Path] = set()
    folders: list[Path] = []
    discovery = Discovery([], folders)

    def on_walk_error(error: OSError) -> None:
        if isinstance(error, (FileNotFoundError, NotADirectoryError)):
            return  # removed while walking: its files are gone
        folder = Path(error.filename) if error.filename else folders[-1]
        discovery.unlisted.append(folder)
        discovery.skipped.append((folder, f"cannot list this folder ({error.strerror or error}); its indexed files are kept"))

    for root in paths:
        root = Path(root).expanduser()
        if not root.exists():
            raise InputError(f"{root}: no such file or folder; check the path")
        if root.is_file():
            found.add(root.parent.resolve() / root.name)
            continue
        if not root.is_dir():
            discovery.skipped.append((root.absolute(), "not a regular file or folder (a device, pipe or socket); name image files or folders"))
            continue
        folders.append(root.resolve())
        for folder, subfolders, names in os.walk(folders[-1], onerror=on_walk_error):
            if "images" in subfolders and "masks" in subfolders:
                subfolders.remove("masks")
            for name in names:
                path = Path(folder) / name
                if (path.suffix.lower() in IMAGE_SUFFIXES or is_dicom(path)) and path.is_file():
                    found.add(path)
    discovery.files = sorted(found)
    return discovery


def file_stat(path: Path) -> FileStat:
    stat = os.stat(path)
    return FileStat(stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)


def dicom_meta(dataset, tag: str | None = None) -> FileMeta:
    """The identifiers the catalog keeps of a DICOM header (and nothing else from it)."""

    def text(keyword: str) -> str | None:
        value = dataset.get(keyword)
        return str(value).strip()[:64] or None if value is not None else None

    return FileMeta(
        patient_id=text("PatientID"), study_uid=text("StudyInstanceUID"), series_uid=text("SeriesInstanceUID"),
        sop_uid=text("SOPInstanceUID"), modality=text("Modality"), study_date=text("StudyDate"),
        body_part=text("BodyPartExamined"), tag=tag,
    )  # fmt: skip


def _dicom_records(path: Path | str, sha256: str, stat: FileStat, dataset, tag: str | None, instance: DicomInstance | None = None):
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    modality = f"DICOM:{dataset.Modality}" if dataset.get("Modality") else "DICOM"
    meta = dicom_meta(dataset, tag)
    return [FileRecord(path, frame, sha256, stat, modality, frames, meta, instance) for frame in range(frames)]


def instance_records(instance: DicomInstance, tag: str | None = None) -> list[FileRecord]:
    """The entries of a fetched DICOM instance (one per frame), without decoding pixels."""
    stat = FileStat(len(instance.data), 0, 0, 0)  # an instance never changes under its SOPInstanceUID
    return _dicom_records(instance.name, instance.sha256, stat, instance.dataset(), tag, instance)


def probe(path: str | Path, tag: str | None = None) -> list[FileRecord]:
    """The entries of one file (one per DICOM frame), without decoding pixels; `tag` is recorded with them."""
    path = Path(path).absolute()
    try:
        stat = file_stat(path)
        sha256 = file_sha256(path)
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror or error}); check its permissions")
    if is_dicom(path):
        return _dicom_records(path, sha256, stat, _read_dicom(path, stat.size, stat.mtime_ns), tag)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    modality, frames = image.format or path.suffix.lstrip(".").upper(), 1
        except UnidentifiedImageError:
            raise InputError(f"{path}: not an image PIL can read (PNG, JPEG, TIFF, BMP, ...)")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # as `generation.images` refuses to decode it
            raise InputError(f"{path}: too many pixels to decode safely; downscale the image first")
        except (OSError, SyntaxError, ValueError) as error:
            raise InputError(f"{path}: corrupt or truncated image ({error}); re-export the file")
    return [FileRecord(path, frame, sha256, stat, modality, frames, FileMeta(tag=tag)) for frame in range(frames)]


def load(source: str | Path | DicomInstance, frame: int = 0) -> np.ndarray:
    """One entry's pixels as uint8 RGB (H, W, 3), from a file or a fetched DICOM instance."""
    if isinstance(source, DicomInstance):
        return source.load(frame)
    path = Path(source)
    if not is_dicom(path):
        return load_rgb(path)
    stat = file_stat(path)
    dataset = _read_dicom(path, stat.size, stat.mtime_ns)
    return _dicom_frame(path, dataset, _dicom_pixels(path, stat.size, stat.mtime_ns), frame)


def _dicom_frame(name: Path | str, dataset, pixels: np.ndarray, frame: int) -> np.ndarray:
    """One frame of a DICOM image's decoded pixels as uint8 RGB (H, W, 3)."""
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < frames:
        raise InputError(f"{name}: has {frames} frame(s), no frame {frame}")
    values = pixels[frame] if frames > 1 else pixels
    if values.ndim == 3:  # colour, which pydicom has made RGB (palette LUTs give 16-bit values)
        palette = dataset.get("PhotometricInterpretation") == "PALETTE COLOR"
        top = 65535.0 if palette and values.dtype != np.uint8 else float(2 ** int(dataset.get("BitsStored", 8)) - 1)
        return np.clip(np.rint(values.astype(np.float32) * (255.0 / top)), 0, 255).astype(np.uint8)
    grey = _window(dataset, frame, values.astype(np.float64))
    if dataset.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        grey = 255 - grey  # MONOCHROME1: low values are white
    return np.repeat(grey[..., None], 3, axis=2)


def load_reduced(source: str | Path | DicomInstance, frame: int = 0, side: int = INDEX_SIDE) -> tuple[np.ndarray, tuple[int, int]]:
    """`load`, reduced as soon as it is decoded when the shorter side is at least 2 * `side` (see
    `generation.images.load_rgb_reduced`; a DICOM frame is box-reduced after decoding), and the
    entry's own (height, width). The full-size pixels are dropped before this returns."""
    if not isinstance(source, DicomInstance) and not is_dicom(Path(source)):
        return load_rgb_reduced(Path(source), side)
    pixels = load(source, frame)
    size = pixels.shape[:2]
    factor = min(size) // side
    if factor > 1:
        pixels = np.asarray(box_reduce(Image.fromarray(pixels), factor, "RGB"))
    return pixels, size


def scan(paths: Iterable[str | Path]) -> Iterator[FileRecord | tuple[Path, str]]:
    """Every entry under `paths`; an unreadable file or folder gives (path, reason) instead of records."""
    discovery = discover(paths)
    yield from discovery.skipped
    for path in discovery.files:
        try:
            yield from probe(path)
        except InputError as error:
            yield path, reason(path, error)


def reason(path: Path, error: Exception) -> str:
    """The message of an error about `path`, without the path it starts with."""
    text = str(error)
    return text[len(f"{path}: ") :] if text.startswith(f"{path}: ") else text


# -- DICOM ---------------------------------------------------------------------------------------


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise InputError("DICOM file, but pydicom is not installed; pip install 'sketch2medi[dicom]'") from None
    return pydicom


def _parse_dicom(name: Path | str, source):
    pydicom = _pydicom()
    try:
        dataset = pydicom.dcmread(source, force=True, defer_size="64 KB")
    except Exception as error:
        raise InputError(f"{name}: not a readable DICOM file ({error})")
    if "PixelData" not in dataset or "Rows" not in dataset:
        raise InputError(f"{name}: a DICOM file without an image (no pixel data)")
    return dataset


def _decoded_pixels(name: Path | str, dataset) -> np.ndarray:
    try:
        pixels = dataset.pixel_array
        if dataset.get("PhotometricInterpretation") == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            pixels = apply_color_lut(pixels, dataset)
    except Exception as error:  # pydicom raises many kinds for undecodable pixel data
        raise InputError(f"{name}: cannot decode its pixel data ({error}); it may need a pydicom codec plugin")
    return pixels


# One file's header and pixels are cached: the frames of a multi-frame file are loaded one by one.
@functools.lru_cache(maxsize=1)
def _read_dicom(path: Path, size: int, mtime_ns: int):
    return _parse_dicom(path, path)


@functools.lru_cache(maxsize=1)
def _dicom_pixels(path: Path, size: int, mtime_ns: int) -> np.ndarray:
    return _decoded_pixels(path, _read_dicom(path, size, mtime_ns))


def _frame_value(dataset, frame: int, group: str, keyword: str):
    """A value from the frame's functional group (enhanced multi-frame), the shared one, or the top level."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = dataset.get(groups)
        if items is not None and index < len(items) and group in items[index]:
            item = items[index][group][0]
            if keyword in item:
                return item[keyword].value
    return dataset[keyword].value if keyword in dataset else None


def _first(value) -> float | None:
    """A DICOM number that may be multi-valued (several windows): its first value."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except TypeError:
        return float(value[0]) if len(value) else None


def _window(dataset, frame: int, values: np.ndarray) -> np.ndarray:
    """Stored values -> uint8 grey: modality rescale, then the VOI window (DICOM PS3.3 C.11.2.1.2)."""
    slope = _first(_frame_value(dataset, frame, "PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _first(_frame_value(dataset, frame, "PixelValueTransformationSequence", "RescaleIntercept"))
    values = values * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)
    center = _first(_frame_value(dataset, frame, "FrameVOILUTSequence", "WindowCenter"))
    width = _first(_frame_value(dataset, frame, "FrameVOILUTSequence", "WindowWidth"))
    if center is not None and width is not None and width >= 1:
        if width == 1:
            scaled = (values > center - 0.5).astype(np.float64)
        else:
            scaled = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    else:  # no window in the file: stretch this frame's own range
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.rint(scaled * 255.0).astype(np.uint8)
