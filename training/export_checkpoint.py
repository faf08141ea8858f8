"""Export the network of a training checkpoint as a bundle network, e.g. to evaluate a snapshot
taken part-way through a run (how quality grows with compute, docs/RESULTS.md).

    python -m training.export_checkpoint --checkpoint RUN --network encoder --into BUNDLE

RUN holds NAME_checkpoint.safetensors/.json as the trainer wrote them; BUNDLE must already hold the
network's config (its NAME.json, e.g. a copy of the finished bundle) unless the checkpoint records
its own. The exported file replaces BUNDLE/NAME.safetensors; its json records the checkpoint's step.
A snapshot of E keeps the mean code it started from (G's mean w; E computes its own only when it
finishes): its generated images do not depend on it, its retrieval vectors do.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from generation.checkpoints import load_checkpoint
from generation.errors import InputError
from generation.registry import network_spec, save_network

# network -> (checkpoint name, key of its state in the checkpoint); the key is the module shipped
CHECKPOINTS = {
    "generator": ("generator_checkpoint", "G_ema"),
    "encoder": ("encoder_checkpoint", "E"),
    "refiner": ("refiner_checkpoint", "H"),
    "pix2pix": ("pix2pix_checkpoint", "G"),
}


def export_checkpoint(run: str | Path, network: str, bundle: str | Path) -> int:
    """Write the checkpoint's `network` into `bundle`; returns the checkpoint's step."""
    if network not in CHECKPOINTS:
        raise InputError(f"cannot export {network!r}; choose one of {', '.join(CHECKPOINTS)}")
    name, key = CHECKPOINTS[network]
    states, meta = load_checkpoint(run, name)
    spec = network_spec(network)
    target = Path(bundle) / f"{network}.json"
    config = meta.get("config") or (json.loads(target.read_text())["config"] if target.is_file() else None)
    if config is None:
        raise InputError(f"{bundle}: has no {network}.json and the checkpoint records no config; copy the finished bundle there first")
    module = spec.build(spec.config_from_dict(config))
    module.load_state_dict(states[key])
    step = int(meta.get("step", 0))
    save_network(network, module, bundle, {"training": {"snapshot_of": str(run), "step": step, "options": meta.get("options")}})
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="Folder with NAME_checkpoint.safetensors/.json.")
    parser.add_argument("--network", required=True, choices=sorted(CHECKPOINTS), help="Which network to export.")
    parser.add_argument("--into", type=Path, required=True, help="Bundle folder to write NAME.safetensors/.json into.")
    args = parser.parse_args()
    try:
        step = export_checkpoint(args.checkpoint, args.network, args.into)
    except InputError as error:
        raise SystemExit(f"error: {error}")
    print(f"exported {args.network} at step {step} into {args.into}")


if __name__ == "__main__":
    main()
