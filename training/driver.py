"""The run shared by the image-to-image trainers (pix2pix and the unpaired baselines): device and
torchrun set-up, the checkpoint guard and resume, periodic snapshots (checkpoint, sample grid,
metrics line), graceful stop, and the exported network at the end."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from generation.checkpoints import checkpoint_exists
from generation.device import Distributed, init_distributed, pick_device
from generation.errors import InputError
from generation.images import save_png
from generation.registry import save_network
from training.loop import StopFlag, TrainResult, append_metrics


def check_pairs(images: np.ndarray, sketches: np.ndarray, resolution: int) -> None:
    """InputError unless images are uint8 (N, R, R, 3) and sketches uint8 (N, R, R), same N and R."""
    for name, array, shape in (("images", images, "(N, R, R, 3)"), ("sketches", sketches, "(N, R, R)")):
        if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
            kind = getattr(array, "dtype", type(array).__name__)
            raise InputError(f"{name} must be a uint8 numpy array {shape}, got {kind}")
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise InputError(f"images must be uint8 (N, R, R, 3), got shape {images.shape}")
    if sketches.ndim != 3 or sketches.shape[1] != sketches.shape[2]:
        raise InputError(f"sketches must be uint8 (N, R, R) canonical sketches, got shape {sketches.shape}")
    if len(images) != len(sketches) or len(images) == 0:
        raise InputError(f"{len(images)} images and {len(sketches)} sketches: need the same positive number of pairs")
    if images.shape[1] != sketches.shape[1]:
        raise InputError(f"images are {images.shape[1]} px but sketches {sketches.shape[1]} px; give pairs of one size")
    if images.shape[1] != resolution:
        raise InputError(f"pairs are {images.shape[1]} px but the model works at {resolution} px; "
                         "resize them or pick another preset")


def data_on_device(images: np.ndarray, sketches: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, R, R) and sketches (N, R, R), kept uint8 on `device` and converted per batch
    (4x less memory than float)."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device),
            torch.from_numpy(np.ascontiguousarray(sketches)).to(device))


def run_image_training(name: str, make_trainer: Callable[[torch.device, Distributed], Any], images: np.ndarray,
                       sketches: np.ndarray, out: str | Path, config, options, resume: bool, device: str,
                       on_step: Callable[[int, dict[str, float]], None] | None, log: Callable[[str], None], *,
                       network: Callable[[Any], nn.Module], data_wording: str, data_summary: dict[str, Any],
                       samples: Path) -> TrainResult:
    """Train the trainer `make_trainer(device, dist)` builds into `out`, checkpointing as `{name}_checkpoint`.

    The trainer has step() -> stats, step_count, save/load(directory), check_consistency() and
    sample_grid(); save() is called on every rank (it may gather) and writes on rank 0 only.
    `network(trainer)` is the module exported as the `name` bundle at the end; `data_wording` names
    the data in the start-up line ("{N} pairs"), `data_summary` goes into the bundle's training
    summary, and sample grids are written under `out / samples`.
    """
    out = Path(out)
    checkpoint, metrics_file = f"{name}_checkpoint", out / f"{name}_metrics.jsonl"
    device_ = pick_device(device)
    dist = init_distributed(device_)
    if device_.type == "cuda" and dist.enabled:
        device_ = torch.device("cuda", dist.local_rank)
    options.validate(dist.world_size)
    check_pairs(images, sketches, config.resolution)
    if checkpoint_exists(out, checkpoint) and not resume:
        raise InputError(f"{out}: already holds a {name} checkpoint; pass --resume to continue it or choose another --out")

    trainer = make_trainer(device_, dist)
    if resume and checkpoint_exists(out, checkpoint):
        trainer.load(out)
        if dist.is_main:
            log(f"resumed {out} at step {trainer.step_count}")
    if dist.is_main:
        log(f"training {name} {config} on {data_wording}, batch {options.batch} over {dist.world_size} "
            f"process(es), device {device_} ({torch.get_num_threads()} threads)")

    last: dict[str, float] = {}

    def snapshot(totals: dict[str, list[float]], seconds: float) -> None:
        trainer.check_consistency()
        trainer.save(out)
        if not dist.is_main:
            return
        save_png(trainer.sample_grid(), out / samples / f"step{trainer.step_count:07d}.png")
        last.clear()
        last.update({k: round(sum(v) / len(v), 6) for k, v in totals.items() if v})
        append_metrics(metrics_file, {"step": trainer.step_count, "seconds": round(seconds, 1), **last})

    start, totals = time.time(), {}
    stopped_early = False
    with StopFlag() as stop:
        while trainer.step_count < options.steps:
            stats = trainer.step()
            for key, value in stats.items():
                totals.setdefault(key, []).append(value)
            if dist.is_main and on_step is not None:
                on_step(trainer.step_count, stats)
            stop_now = stop.agreed(dist, device_)
            if trainer.step_count % options.snap_every == 0 or trainer.step_count >= options.steps or stop_now:
                snapshot(totals, time.time() - start)
                totals = {}
            if stop_now:
                stopped_early = True
                break
    seconds = time.time() - start
    if dist.is_main and not stopped_early:
        summary = {"steps": trainer.step_count, "seconds": round(seconds, 1), **data_summary,
                   "world_size": dist.world_size, "options": dataclasses.asdict(options),
                   **{f"final_{k}": v for k, v in last.items()}}
        save_network(name, network(trainer), out, {"training": summary})
    dist.barrier()
    return TrainResult(trainer.step_count, seconds, out, stopped_early, dict(last))
