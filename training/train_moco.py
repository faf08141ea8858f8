"""Training C (MoCo v2) on an image archive: single process or `torchrun` (DDP, gloo on CPU).

    python cli.py train moco --data DIR --out BUNDLE [--preset cpu] ...
    torchrun --nproc_per_node 2 cli.py train moco --data DIR --out BUNDLE --preset tiny

Writes into BUNDLE:
    moco_checkpoint.safetensors/.json   every `checkpoint_every` steps (model, optimiser, step, config)
    moco_metrics.jsonl                  one JSON line per logged step (loss, acc1, lr, ...)
    moco.safetensors/.json              final query encoder + config (`load_network("moco", BUNDLE)`)

Resuming is exact: the batch order, the augmentations and the BN shuffles of a step are functions of
(seed, step, rank) only, and the checkpoint holds every other piece of state (weights, key encoder,
queue, SGD momentum), so an interrupted run continues as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from generation.checkpoints import checkpoint_exists, load_checkpoint, save_checkpoint
from generation.dataset import ImageDataset
from generation.device import Distributed, init_distributed, pick_device
from generation.errors import InputError
from generation.moco import MoCo, MocoConfig, config_from_dict, config_to_dict, info_nce_loss
from generation.registry import save_network
from training.augment import AugmentConfig, augment_batch
from training.loop import TrainResult, append_metrics
from training.loop import read_metrics as read_metrics_file

CHECKPOINT_NAME = "moco_checkpoint"
METRICS_FILE = "moco_metrics.jsonl"
# Fields that may differ between the interrupted run and the resumed one without changing the result.
RESUME_FREE_FIELDS = {"log_every", "checkpoint_every"}


def default_split(data: str | Path) -> str | None:
    """`train` when the dataset has a split.csv with a train split, else None (every image)."""
    return "train" if any(sample.split == "train" for sample in ImageDataset(data).samples) else None


def cosine_lr(config: MocoConfig, step: int, total_steps: int) -> float:
    """Cosine decay from config.lr to 0 over the run (per step, no warm-up, as MoCo v2)."""
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps)))


def total_steps_for(config: MocoConfig, num_images: int) -> int:
    return config.steps if config.steps is not None else config.epochs * (num_images // config.batch_size)


def fit_to_archive(config: MocoConfig, num_images: int, world_size: int) -> tuple[MocoConfig, list[str]]:
    """Check the batch against the archive and shrink a queue the archive cannot fill with distinct images."""
    notes = []
    if config.batch_size % world_size:
        raise InputError(f"--batch {config.batch_size} must be divisible by the {world_size} processes")
    if num_images < config.batch_size:
        raise InputError(f"{num_images} images is fewer than one batch of {config.batch_size}; pass a smaller --batch")
    local = config.batch_size // world_size
    if config.backbone.norm == "batch" and local // max(1, config.bn_splits) < 2:
        raise InputError(
            f"batch {local} per process split {config.bn_splits} ways leaves BatchNorm under 2 images; use a larger --batch"
        )
    # A queue longer than the archive holds keys of the query's own image as "negatives".
    limit = max(config.batch_size, (num_images - config.batch_size) // config.batch_size * config.batch_size)
    if config.queue_size > limit:
        notes.append(f"queue {config.queue_size} > what {num_images} images fill with distinct keys; using {limit}")
        config = dataclasses.replace(config, queue_size=limit)
    return config, notes


def augment_config_for(config: MocoConfig) -> AugmentConfig:
    paper = AugmentConfig(size=config.image_size)
    strength = config.jitter_strength
    return dataclasses.replace(
        paper,
        crop_scale=(config.crop_min_scale, 1.0),
        brightness=paper.brightness * strength,
        contrast=paper.contrast * strength,
        saturation=paper.saturation * strength,
        hue=paper.hue * strength,
        jitter_p=config.jitter_p,
        grayscale_p=config.grayscale_p,
        blur_p=config.blur_p,
    )


def _step_generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**62)
    return torch.Generator().manual_seed(seed)


def batch_indices(config: MocoConfig, num_images: int, step: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's images at `step`: a fresh permutation per epoch (same on every rank), last partial batch dropped."""
    steps_per_epoch = num_images // config.batch_size
    epoch, within = divmod(step, steps_per_epoch)
    permutation = torch.randperm(num_images, generator=_step_generator(config.seed, 1, epoch))
    local = config.batch_size // world_size
    start = within * config.batch_size + rank * local
    return permutation[start : start + local]


def _check_resumable(saved: MocoConfig, wanted: MocoConfig, out: Path) -> None:
    differing = [
        f.name
        for f in dataclasses.fields(MocoConfig)
        if f.name not in RESUME_FREE_FIELDS and getattr(saved, f.name) != getattr(wanted, f.name)
    ]
    if differing:
        raise InputError(
            f"{out}: the checkpoint was trained with different settings ({', '.join(differing)}); "
            "re-run with the same options, or pass --no-resume to start over"
        )


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _resume_or_start(out: Path, moco: MoCo, optimizer: torch.optim.Optimizer, config: MocoConfig, resume: bool,
                     total_steps: int, distributed: Distributed, note: Callable[[str], None]) -> int:
    """Load OUT's checkpoint into `moco` and `optimizer` (the step to continue from), or clear OUT's
    metrics and stale checkpoint for a fresh run (step 0)."""
    step = 0
    metrics_path = out / METRICS_FILE
    if resume and checkpoint_exists(out, CHECKPOINT_NAME):
        states, meta = load_checkpoint(out, CHECKPOINT_NAME)
        _check_resumable(config_from_dict(meta["config"]), config, out)
        moco.load_state_dict(states["model"])
        optimizer.load_state_dict(states["optimizer"])
        step = int(meta["step"])
        note(f"resuming from step {step} of {total_steps}")
        if distributed.is_main:
            _trim_metrics(metrics_path, step)
    elif distributed.is_main:
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)
        for suffix in (".safetensors", ".json"):  # a stale checkpoint must not be resumed later
            (out / f"{CHECKPOINT_NAME}{suffix}").unlink(missing_ok=True)
    distributed.barrier()
    return step


class _MetricsWindow:
    """Loss and top-1 accuracy averaged over the steps since the last log line (and over ranks)."""

    def __init__(self):
        self.loss, self.acc1, self.count = 0.0, 0.0, 0.0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor) -> None:
        self.loss += float(loss.detach())
        self.acc1 += float((logits.detach().argmax(dim=1) == 0).float().mean())
        self.count += 1

    def entry(self, step: int, lr: float, config: MocoConfig, num_images: int, distributed: Distributed) -> dict[str, Any]:
        averages = torch.tensor([self.loss, self.acc1], dtype=torch.float64) / self.count
        averages = distributed.all_reduce_mean(averages)
        elapsed = time.perf_counter() - self.start
        return {
            "step": step,
            "epoch": step * config.batch_size / num_images,
            "loss": round(float(averages[0]), 5),
            "acc1": round(100 * float(averages[1]), 3),  # % of queries whose own key wins
            "lr": lr,
            "images_per_s": round(self.count * config.batch_size / max(elapsed, 1e-9), 2),
        }


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, config: MocoConfig,
                augment: AugmentConfig, step: int, total_steps: int, distributed: Distributed,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One SGD step on the batch of `step`; returns (loss, logits, learning rate)."""
    index = batch_indices(config, len(images), step, distributed.rank, distributed.world_size)
    batch = images[index].to(device, non_blocking=True)
    generator = _step_generator(config.seed, 2, step, distributed.rank)
    view_q = augment_batch(batch, augment, generator)
    view_k = augment_batch(batch, augment, generator)
    lr = cosine_lr(config, step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr

    logits, _ = model(view_q, view_k, _step_generator(config.seed, 3, step), index)
    loss = info_nce_loss(logits)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits, lr


def train_moco(
    data: str | Path,
    out: str | Path,
    config: MocoConfig,
    split: str | None = None,
    device: str = "auto",
    resume: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train C and write the bundle. `stop_after` ends early (to test resuming). The result's
    metrics are the last logged window (loss, acc1, ...)."""
    started = time.perf_counter()
    out = Path(out)
    torch_device = pick_device(device)
    distributed: Distributed = init_distributed(torch_device)
    if distributed.enabled and torch_device.type == "cuda":
        torch_device = torch.device("cuda", distributed.local_rank)
    note = (on_note or (lambda message: None)) if distributed.is_main else (lambda message: None)

    dataset = ImageDataset(data, split)
    config, notes = fit_to_archive(config, len(dataset), distributed.world_size)
    for message in notes:
        note(message)
    total_steps = total_steps_for(config, len(dataset))
    if total_steps < 1:
        raise InputError("nothing to train: --steps/--epochs give 0 steps")
    arrays, _ = dataset.arrays(config.load_size)
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, L, L), stays on the CPU

    torch.manual_seed(config.seed)  # same initial weights on every rank and on every fresh start
    moco = MoCo(config).to(torch_device)
    optimizer = torch.optim.SGD(
        moco.encoder_q.parameters(), lr=config.lr, momentum=config.sgd_momentum, weight_decay=config.weight_decay
    )
    step = _resume_or_start(out, moco, optimizer, config, resume, total_steps, distributed, note)

    model: torch.nn.Module = moco
    if distributed.enabled:
        model = DistributedDataParallel(moco, device_ids=[torch_device.index] if torch_device.type == "cuda" else None)
    moco.train()
    augment = augment_config_for(config)

    def save(step_done: int) -> None:
        if distributed.is_main:
            meta = {"config": config_to_dict(config), "step": step_done, "total_steps": total_steps}
            save_checkpoint(out, CHECKPOINT_NAME, {"model": moco.state_dict(), "optimizer": optimizer.state_dict()}, meta)
        distributed.barrier()

    window = _MetricsWindow()
    last_logged: dict[str, Any] = {}
    end = total_steps if stop_after is None else min(total_steps, stop_after)
    try:
        while step < end:
            loss, logits, lr = _train_step(model, optimizer, images, config, augment, step, total_steps, distributed, torch_device)
            step += 1
            window.add(loss, logits)
            if step % config.log_every == 0 or step == total_steps:
                last_logged = window.entry(step, lr, config, len(images), distributed)
                if distributed.is_main:
                    append_metrics(out / METRICS_FILE, last_logged)
                window = _MetricsWindow()
            if step % config.checkpoint_every == 0 and step < total_steps:
                save(step)
            if on_step is not None and distributed.is_main:
                on_step(step, total_steps)
    except KeyboardInterrupt:
        save(step)  # Ctrl-C: keep everything done so far; a re-run resumes here
        raise

    save(step)
    finished = step >= total_steps
    if not last_logged and distributed.is_main:  # re-run of a finished training: report its last log
        logged = read_metrics(out)
        last_logged = logged[-1] if logged else {}
    if finished and distributed.is_main:
        meta = {
            "step": step,
            "images": len(images),
            "data": str(data),
            "split": split,
            "final_metrics": last_logged,
        }
        save_network("moco", moco.encoder_q, out, meta)
    distributed.barrier()
    return TrainResult(step, time.perf_counter() - started, out, not finished, last_logged)


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """The metrics lines of the C bundle `out`."""
    return read_metrics_file(Path(out) / METRICS_FILE)
