"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint directory holds `NAME.safetensors` (flat tensor dict) and `NAME.json` (config,
progress counters, metrics, and the non-tensor parts of optimiser states). Nothing is ever
unpickled, so a checkpoint from an untrusted source cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from generation.errors import InputError


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)  # readers see the old file or the new one, never half a file


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
    _atomic_write(directory / f"{name}.safetensors", lambda p: save_file(tensors, str(p)))
    _atomic_write(directory / f"{name}.json", lambda p: p.write_text(json.dumps(document, indent=1)))


def load_checkpoint(directory: str | Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load (states, meta) saved by `save_checkpoint`."""
    directory = Path(directory)
    tensor_path, json_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    if not tensor_path.is_file() or not json_path.is_file():
        raise InputError(f"{directory}: no checkpoint {name!r} there; train it first or check --bundle/--out")
    try:
        meta = json.loads(json_path.read_text())
        tensors = load_file(str(tensor_path))
    except (ValueError, OSError) as error:
        raise InputError(f"{directory / name}: damaged checkpoint ({error}); delete it and train again")
    skeletons = meta.pop("states")
    return {key: unflatten_state(s, tensors) for key, s in skeletons.items()}, meta


def checkpoint_exists(directory: str | Path, name: str) -> bool:
    directory = Path(directory)
    return (directory / f"{name}.safetensors").is_file() and (directory / f"{name}.json").is_file()
