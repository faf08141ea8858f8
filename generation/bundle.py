"""The model bundle: one folder with every network of the system and a manifest.

    BUNDLE/bundle.json                    manifest: format, versions, per-network config, training
                                          summary and file digest, data summary, metrics, command
    BUNDLE/moco.safetensors (+ .json)     C, the MoCo v2 feature network
    BUNDLE/synthesizer.safetensors (+ .json)   S, SOLOv2
    BUNDLE/generator.safetensors (+ .json)     G, StyleGAN2 (G_ema)
    BUNDLE/encoder.safetensors (+ .json)       E
    BUNDLE/refiner.safetensors (+ .json)       H

Each network's .json holds its config and the layout of its tensors (what the loaders read);
bundle.json gathers them in one place for people and for the catalog, which records `bundle_id`
(a digest of the network files) so an index is never searched with other weights than built it.
Training scratch (checkpoints, caches, samples, metrics) may sit in the same folder; it is not part
of the bundle.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from generation.checkpoints import atomic_write
from generation.errors import InputError
from generation.images import file_sha256
from generation.registry import BUNDLE_NETWORKS, NETWORK_NAMES

FORMAT = "sketch2medi-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
SEARCH_DEFAULTS = "search.json"  # optional: the vector weights chosen for this bundle (retrieval.vector.bundle_recipe)


def network_entries(bundle: Path) -> dict[str, dict[str, Any]]:
    """The manifest entry of every network present in `bundle`."""
    entries = {}
    for key, name in BUNDLE_NETWORKS.items():
        weights, meta_path = bundle / f"{name}.safetensors", bundle / f"{name}.json"
        if not (weights.is_file() and meta_path.is_file()):
            continue
        meta = json.loads(meta_path.read_text())
        meta.pop("states", None)
        entries[key] = {"file": weights.name, "sha256": file_sha256(weights), "bytes": weights.stat().st_size, **meta}
    return entries


def read_manifest(bundle: str | Path) -> dict[str, Any]:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise InputError(f"{path}: damaged manifest ({error}); rewrite it with `train all` or delete it")
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} manifest; update sketch2medi or use another bundle")
    return manifest


def recorded_sha256(bundle: str | Path, file_name: str) -> str | None:
    """The sha256 that `bundle`'s manifest records for its network file `file_name`, if any."""
    for entry in read_manifest(bundle).get("networks", {}).values():
        if isinstance(entry, dict) and entry.get("file") == file_name:
            return entry.get("sha256")
    return None


def write_manifest(bundle: str | Path, **sections: Any) -> dict[str, Any]:
    """Refresh bundle.json from the networks present; `sections` (e.g. data=, metrics=, command=)
    are merged into what the manifest already holds."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    try:
        package_version = version("sketch2medi")
    except PackageNotFoundError:
        package_version = "unknown"
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    networks = network_entries(bundle)
    manifest.update(format=FORMAT, format_version=FORMAT_VERSION, bundle_id=bundle_id_of(networks),
                    updated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    versions={"sketch2medi": package_version, "torch": torch.__version__, "python": platform.python_version()},
                    networks=networks)
    atomic_write(bundle / MANIFEST, lambda path: path.write_text(json.dumps(manifest, indent=1)))
    return manifest


def bundle_id_of(networks: dict[str, dict[str, Any]]) -> str:
    """Short digest naming exactly these weights."""
    joined = "|".join(f"{key}:{networks[key]['sha256']}" for key in sorted(networks))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


ENV_BUNDLE = "SKETCH2MEDI_BUNDLE"
# The bundle shipped with the repository (trained by `train all --preset cpu` on the phantom).
SHIPPED_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "phantom"


def default_bundle() -> Path:
    """$SKETCH2MEDI_BUNDLE, else the shipped phantom bundle."""
    import os

    chosen = os.environ.get(ENV_BUNDLE)
    path = Path(chosen) if chosen else SHIPPED_BUNDLE
    if not path.is_dir():
        source = f"${ENV_BUNDLE}" if chosen else "the shipped bundle"
        raise InputError(f"{path}: {source} is missing; pass --bundle with a folder made by `train all`")
    return path


def export_bundle(source: str | Path, target: str | Path, half: bool = True) -> dict[str, Any]:
    """Copy a bundle's networks (not its training scratch) to `target` and write its manifest.

    With `half`, floating-point tensors are stored as float16: half the size, for bundles shipped
    in the repository; loaders cast them back to float32 (`load_state_dict` copies into the
    networks' own float32 tensors).
    """
    import shutil

    from safetensors.torch import load_file, save_file

    source, target = Path(source), Path(target)
    if source.resolve() == target.resolve():
        raise InputError("export into a different folder than the bundle itself")
    names = [name for name in NETWORK_NAMES if (source / f"{name}.safetensors").is_file()]
    if not names:
        raise InputError(f"{source}: no networks to export; is it a bundle folder?")
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        tensors = load_file(str(source / f"{name}.safetensors"))
        if half:
            tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(tensors, str(target / f"{name}.safetensors"))
        shutil.copyfile(source / f"{name}.json", target / f"{name}.json")
    if (source / SEARCH_DEFAULTS).is_file():  # the search defaults chosen for these networks travel with them
        shutil.copyfile(source / SEARCH_DEFAULTS, target / SEARCH_DEFAULTS)
    kept = {k: v for k, v in read_manifest(source).items() if k in ("data", "preset", "command", "stages", "metrics", "notes", "attribution")}
    return write_manifest(target, **kept, exported={"from": str(source), "dtype": "float16" if half else "as trained"})
