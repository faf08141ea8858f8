"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint directory holds `NAME.safetensors` (flat tensor dict) and `NAME.json` (config,
progress counters, metrics, and the non-tensor parts of optimiser states). Nothing is ever
unpickled, so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file

from generation.errors import InputError


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """The dataclass `cls` from a saved config's values, leaving out keys it has no field for (a file
    written by a version with more options)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)` then rename it to `path`: readers see the old file or the new one, never
    half a file. The temporary name is unique, so two processes writing one file cannot mix."""
    # Not tempfile.mkstemp: its files are private (0600), and the rename would keep that mode.
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def flatten_state(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (module or optimiser state_dict) into tensors and a JSON skeleton."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().contiguous().cpu()
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {"__dict__": [[k, walk(v, f"{key}.{k}")] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(value)]
        return value

    return tensors, walk(state, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def save_checkpoint(directory: str | Path, name: str, states: dict[str, Any], meta: dict[str, Any]) -> None:
    """Save named states (state_dicts of modules/optimisers) and JSON metadata under `directory/name`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeletons = {}
    for key, state in states.items():
        part, skeletons[key] = flatten_state(state, key)
        tensors.update(part)
    document = {k: to_jsonable(v) for k, v in meta.items()}
    document["states"] = skeletons
    atomic_write(directory / f"{name}.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write(directory / f"{name}.json", lambda p: p.write_text(json.dumps(document, indent=1)))


def load_checkpoint(directory: str | Path, name: str, sha256: str | None = None,
                    remedy: str = "delete it and train again") -> tuple[dict[str, Any], dict[str, Any]]:
    """Load (states, meta) saved by `save_checkpoint`.

    `sha256`: the digest the weight file must have (a bundle's manifest records it); a file that
    differs is refused. `remedy`: what the message about a damaged file tells the user to do.
    """
    directory = Path(directory)
    tensor_path, json_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    if not tensor_path.is_file() or not json_path.is_file():
        raise InputError(f"{directory}: no checkpoint {name!r} there; train it first or check --bundle/--out")
    try:
        meta = json.loads(json_path.read_text())
    except (ValueError, OSError) as error:
        raise InputError(f"{json_path}: damaged ({error}); {remedy}")
    try:
        tensors = load_file(str(tensor_path)) if sha256 is None else _load_verified(tensor_path, sha256, remedy)
    except InputError:
        raise
    except (ValueError, OSError, SafetensorError) as error:
        raise InputError(f"{tensor_path}: damaged weight file ({str(error).splitlines()[0]}); {remedy}")
    if not isinstance(meta, dict) or not isinstance(meta.get("states"), dict):
        raise InputError(f"{json_path}: not a checkpoint description (no tensor layout); {remedy}")
    skeletons = meta.pop("states")
    try:
        return {key: unflatten_state(s, tensors) for key, s in skeletons.items()}, meta
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{json_path}: does not describe {tensor_path.name} ({error!r}); {remedy}")


# (path, size, mtime_ns) of weight files whose digest was checked: a network loaded again (the
# server, tests, several commands in one process) is not hashed again.
_verified: set[tuple[str, int, int]] = set()


def _load_verified(path: Path, sha256: str, remedy: str) -> dict[str, torch.Tensor]:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return load_file(str(path))
    data = path.read_bytes()  # one read serves both the digest and the tensors
    if hashlib.sha256(data).hexdigest() != sha256:
        raise InputError(f"{path}: its sha256 differs from the one the bundle manifest records (damaged or replaced); {remedy}")
    tensors = load(data)
    _verified.add(key)
    return tensors


def checkpoint_exists(directory: str | Path, name: str) -> bool:
    directory = Path(directory)
    return (directory / f"{name}.safetensors").is_file() and (directory / f"{name}.json").is_file()
