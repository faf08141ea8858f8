"""The networks of the system, one registry keyed by network name.

    save_network("generator", G, bundle, meta={"training": summary})
    G = load_network("generator", bundle, device)        # eval mode, frozen
    network_exists(bundle, "refiner")
    config = network_config("encoder", "cpu", resolution=64, w_dim=128)

Every network module registers one `NetworkSpec` when it is imported; the registry imports a
network's module only when that network is first asked for, so importing this module (or the
bundle code) loads no network code. On disk a network is `DIR/<name>.safetensors` (its state under
`state_key`) and `DIR/<name>.json` ({"config": ..., training summary, tensor layout}).

When DIR holds a bundle manifest that records the file's sha256, the file must match it: a damaged
or replaced weight file is refused rather than silently loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from generation.checkpoints import checkpoint_exists, load_checkpoint, save_checkpoint
from generation.errors import InputError

# name -> (module that registers it, its key in bundle.json or None when it is not part of a bundle)
_NETWORKS: dict[str, tuple[str, str | None]] = {
    "moco": ("generation.moco", "C"),
    "synthesizer": ("generation.solov2", "S"),
    "generator": ("generation.stylegan2", "G"),
    # G's discriminator: exported beside G so that a later run can continue G's training (--init-from)
    "discriminator": ("generation.stylegan2", None),
    "encoder": ("generation.encoder", "E"),
    "refiner": ("generation.refiner", "H"),
    # the baselines: exported with a bundle when trained into it, never listed in its manifest
    "pix2pix": ("generation.pix2pix", None),
    "cyclegan": ("generation.cyclegan", None),
    "unit": ("generation.unit", None),
    "ugatit": ("generation.ugatit", None),
    # the sketch-domain classifier of the match-quality calibration: not part of the bundle id (vectors do not depend on it)
    "domain": ("generation.domain", None),
}
NETWORK_NAMES = tuple(_NETWORKS)
BUNDLE_NETWORKS = {key: name for name, (_, key) in _NETWORKS.items() if key is not None}  # bundle.json key -> name
PRESET_NAMES = ("tiny", "cpu", "paper")  # tests, two CPU cores, the published recipe


@dataclass(frozen=True)
class NetworkSpec:
    """How to build, configure, save and load one network.

    name: the file stem and registry key. title: how messages name it ("refiner H").
    config_from_dict: the config dataclass from its JSON form (`dataclasses.asdict` of it).
    build: config -> the module whose `state_dict()` is stored.
    configure: (preset, **options) -> config, with `preset` one of PRESET_NAMES.
    state_key: the key of the state inside the files. train_command: the CLI command that makes it.
    finish: stored module and its config -> the network callers get (default: the module itself).
    """

    name: str
    title: str
    config_from_dict: Callable[[dict[str, Any]], Any]
    build: Callable[[Any], Any]
    configure: Callable[..., Any]
    state_key: str
    train_command: str
    finish: Callable[[Any, Any], Any] | None = None


_SPECS: dict[str, NetworkSpec] = {}


def register(spec: NetworkSpec) -> NetworkSpec:
    if spec.name not in _NETWORKS:
        raise ValueError(f"network {spec.name!r} is not in the registry's table; add it to _NETWORKS")
    _SPECS[spec.name] = spec
    return spec


def network_spec(name: str) -> NetworkSpec:
    if name not in _NETWORKS:
        raise InputError(f"unknown network {name!r}; choose one of {', '.join(NETWORK_NAMES)}")
    if name not in _SPECS:
        importlib.import_module(_NETWORKS[name][0])  # registers it
    return _SPECS[name]


def network_config(name: str, preset: str, **options: Any) -> Any:
    """The config of network `name` for `preset` (tiny, cpu, paper); `options` are what the network
    needs to know (e.g. the generator's resolution for E) or overrides (for C)."""
    spec = network_spec(name)
    if preset not in PRESET_NAMES:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    return spec.configure(preset, **options)


def network_exists(directory: str | Path, name: str) -> bool:
    if name not in _NETWORKS:
        raise InputError(f"unknown network {name!r}; choose one of {', '.join(NETWORK_NAMES)}")
    return checkpoint_exists(directory, name)


def network_training(name: str, directory: str | Path) -> dict[str, Any]:
    """The `training` record of DIR/<name>.json (what its run saved; empty where there is none),
    read without its weights, e.g. for a run that continues a network `load_network` loaded."""
    path = Path(directory) / f"{network_spec(name).name}.json"
    try:
        record = json.loads(path.read_text()).get("training", {})
    except (ValueError, OSError, AttributeError) as error:
        raise InputError(f"{path}: damaged ({error}); re-export or re-download the bundle")
    return record if isinstance(record, dict) else {}


def save_network(name: str, model: Any, directory: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Write `model` (the module `build` makes, with a `config`) as DIR/<name>.safetensors + .json.

    A manifest in DIR is refreshed, so the digest it records is always that of the new file."""
    from generation.bundle import MANIFEST, write_manifest

    spec = network_spec(name)
    directory = Path(directory)
    save_checkpoint(directory, spec.name, {spec.state_key: model.state_dict()},
                    {"config": dataclasses.asdict(model.config), **(meta or {})})
    if (directory / MANIFEST).is_file():
        write_manifest(directory)


def load_network(name: str, directory: str | Path, device: Any = "cpu") -> Any:
    """Network `name` of DIR, on `device`, in eval mode and frozen."""
    # Imported here: the bundle module takes its table of networks from this one.
    from generation.bundle import recorded_sha256

    spec = network_spec(name)
    directory = Path(directory)
    if not checkpoint_exists(directory, spec.name):
        raise InputError(f"{directory}: has no {spec.name}.safetensors; train it with `{spec.train_command}` (or `train all`)")
    states, meta = load_checkpoint(directory, spec.name, sha256=recorded_sha256(directory, f"{spec.name}.safetensors"),
                                   remedy="re-export or re-download the bundle")
    if "config" not in meta or spec.state_key not in states:
        raise InputError(f"{directory}: {spec.name}.json is not a {spec.title} checkpoint; train it with `{spec.train_command}`")
    try:
        config = spec.config_from_dict(meta["config"])
    except InputError:
        raise
    except (TypeError, ValueError, KeyError) as error:
        raise InputError(f"{directory / spec.name}.json: invalid {spec.title} config ({error}); re-export or re-download the bundle")
    module = spec.build(config)
    try:
        module.load_state_dict(states[spec.state_key])
    except RuntimeError as error:
        raise InputError(f"{directory}: {spec.name}.safetensors does not match {spec.name}.json ({str(error).splitlines()[0]})")
    network = spec.finish(module, config) if spec.finish is not None else module
    return network.to(device).eval().requires_grad_(False)
