"""Training and evaluation of the sketch synthesizer S (SOLOv2) on a dataset folder with masks.

Bundle files:
- `synthesizer.safetensors` + `synthesizer.json`: the weights and `SOLOv2Config` of the best epoch
  (highest mean DICE on the validation split; the latest epoch when there is no validation split);
- `synthesizer_state.*`: model + optimiser + counters, written each epoch and every few minutes,
  from which `--resume` continues an interrupted run (mid-epoch included);
- `synthesizer_metrics.jsonl`: one JSON line per epoch (losses, learning rate, val DICE, time).

Works single-process or under torchrun (DDP; `--batch` is per process). Augmentations: horizontal
flip, scale jitter (zoom in = crop, zoom out = pad), colour jitter; masks follow every geometric
step with nearest-neighbour sampling, and targets are rebuilt from the augmented mask.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.nn.parallel import DistributedDataParallel

from generation.checkpoints import checkpoint_exists, load_checkpoint, save_checkpoint
from generation.dataset import ImageDataset
from generation.device import Distributed, init_distributed, pick_device
from generation.errors import InputError
from generation.registry import load_network, network_config, save_network
from generation.solov2 import SOLOv2, SOLOv2Config, build_targets, solov2_loss
from training.loop import TrainResult, append_metrics

STATE_NAME = "synthesizer_state"
METRICS_FILE = "synthesizer_metrics.jsonl"


@dataclass
class SynthesizerTraining:
    data: str
    out: str
    size: int = 128
    preset: str = "cpu"
    split: str | None = "train"  # None (or a dataset without split.csv): every image
    val_split: str | None = "val"
    epochs: int = 60
    batch: int = 8  # per process
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 300
    grad_clip: float = 35.0  # as in SOLOv2
    scale_jitter: tuple[float, float] = (0.75, 1.25)
    colour_jitter: float = 0.2
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    init_from: str | None = None  # a bundle with C (moco.*): its trunk initialises S's backbone
    checkpoint_minutes: float = 10.0


# ----------------------------------------------------------------------------------------------
# Augmentation


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, scale_range: tuple[float, float], jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """Flip, scale jitter and colour jitter of one (image (S, S, 3) uint8, mask (S, S)) pair."""
    size = image.shape[0]
    if rng.random() < 0.5:  # left/right mirror: classes are side-agnostic (both tonsils are "tonsil")
        image, mask = image[:, ::-1], mask[:, ::-1]
    zoom = math.exp(rng.uniform(math.log(scale_range[0]), math.log(scale_range[1])))
    side = max(8, round(size * zoom))
    if side != size:
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((side, side), Image.BILINEAR))
        mask = np.asarray(Image.fromarray(np.ascontiguousarray(mask)).resize((side, side), Image.NEAREST))
        if side > size:  # zoom in: random crop
            top, left = rng.integers(0, side - size + 1, size=2)
            image, mask = image[top : top + size, left : left + size], mask[top : top + size, left : left + size]
        else:  # zoom out: random placement on black / background
            top, left = rng.integers(0, size - side + 1, size=2)
            canvas, labels = np.zeros((size, size, 3), np.uint8), np.zeros((size, size), np.uint8)
            canvas[top : top + side, left : left + side], labels[top : top + side, left : left + side] = image, mask
            image, mask = canvas, labels
    if jitter > 0:
        x = image.astype(np.float32)
        brightness, contrast, saturation = rng.uniform(1 - jitter, 1 + jitter, size=3)
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        x = x * brightness
        x = (x - grey.mean() * brightness) * contrast + grey.mean() * brightness
        x = (x - (grey * brightness)[..., None]) * saturation + (grey * brightness)[..., None]
        image = np.clip(x + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


# ----------------------------------------------------------------------------------------------
# Data


def _open_split(root: str | Path, split: str | None) -> ImageDataset | None:
    """The split's dataset, None when the folder has no split.csv or not that split."""
    if split is None:
        return ImageDataset(root)
    if not (Path(root) / "split.csv").is_file():
        return None
    try:
        return ImageDataset(root, split)
    except InputError:
        return None


def load_training_data(options: SynthesizerTraining) -> tuple[np.ndarray, np.ndarray, ImageDataset | None, dict[int, str]]:
    train = _open_split(options.data, options.split) or ImageDataset(options.data)
    if not train.has_masks:
        raise InputError(f"{options.data}: the synthesizer needs a class-index mask for every image in masks/")
    val = _open_split(options.data, options.val_split) if options.val_split else None
    if val is not None and not val.has_masks:
        val = None
    images, masks = train.arrays(options.size, with_masks=True)
    return images, masks, val, train.classes


# ----------------------------------------------------------------------------------------------
# Evaluation


def dice_of_model(model: SOLOv2, images: np.ndarray, masks: np.ndarray, class_names: dict[int, str] | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Mean DICE (x100) against reference masks, overall and per class (`retrieval.metrics`).

    The predicted region of a class is the union of its instances with score >= delta.
    """
    from retrieval.metrics import dice_per_image, dice_summary

    num_classes = model.config.num_classes + 1  # with background
    results = []
    for start in range(0, len(images), batch_size):
        predictions = model.predict(list(images[start : start + batch_size]))
        for instances, reference in zip(predictions, masks[start : start + batch_size]):
            results.append(dice_per_image(instances, reference, num_classes, min_score=model.config.sketch_threshold))
    return dice_summary(results).to_dict(class_names)


def evaluate_synthesizer(bundle: str | Path, data: str | Path, split: str | None = None, device: str = "auto") -> dict[str, Any]:
    """Mean DICE (x100, overall and per class) of the bundle's synthesizer on a dataset split."""
    model = load_network("synthesizer", bundle, pick_device(device))
    dataset = ImageDataset(data, split)
    if not dataset.has_masks:
        raise InputError(f"{data}: evaluation needs a mask for every image in masks/")
    images, masks = dataset.arrays(model.config.size, with_masks=True)
    if masks.max(initial=0) > model.config.num_classes:
        raise InputError(f"{data}: masks have class {int(masks.max())}, the synthesizer knows {model.config.num_classes} classes")
    return dice_of_model(model, images, masks, dataset.classes or None)


# ----------------------------------------------------------------------------------------------
# Training


def learning_rate(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def init_backbone_from(model: SOLOv2, bundle: str | Path) -> int:
    """Initialise S's trunk from C's trunk (bundle with moco.*); returns the number of tensors loaded.

    Tensors whose shapes differ keep their own initialisation (see `load_backbone_weights`).
    """
    from generation.resnet import load_backbone_weights

    loaded = load_backbone_weights(model.backbone, load_network("moco", bundle).backbone_state())
    weights = [name for name in loaded if not name.endswith("num_batches_tracked")]  # scalars always match
    if not weights:
        raise InputError(f"{bundle}: C's trunk shares no weight shape with the synthesizer's; use the same ResNet depth and width")
    return len(loaded)


def _epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


def _batch_targets(images: np.ndarray, masks: np.ndarray, indices: np.ndarray, rng: np.random.Generator, options: SynthesizerTraining, config: SOLOv2Config):
    pairs = [augment(images[i], masks[i], rng, options.scale_jitter, options.colour_jitter) for i in indices]
    batch = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2)
    return SOLOv2.normalize(batch), [build_targets(p[1], config) for p in pairs]


@dataclass
class _Schedule:
    per_step: int  # images per optimiser step, summed over ranks
    steps_per_epoch: int
    total_steps: int
    warmup: int


def _build_model(options: SynthesizerTraining, num_classes: int, out: Path, device: torch.device, dist: Distributed,
                 log: Callable[[str], None]) -> tuple[SOLOv2, torch.nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """S, the module that runs it (DDP under torchrun), its optimiser, and the counters of the run
    to resume ({} for a fresh run)."""
    states: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    if options.resume and checkpoint_exists(out, STATE_NAME):
        states, meta = load_checkpoint(out, STATE_NAME)
        config = SOLOv2Config.from_dict(meta["config"])
        if config.size != options.size:
            raise InputError(f"{out}: the run to resume is at {config.size} px, not --size {options.size}")
    else:
        config = network_config("synthesizer", options.preset, num_classes=num_classes, size=options.size)
    torch.manual_seed(options.seed)
    model = SOLOv2(config).to(device)
    if states:
        model.load_state_dict(states["model"])
    elif options.init_from:
        log(f"backbone: {init_backbone_from(model, options.init_from)} of {len(model.backbone.state_dict())} tensors from C in {options.init_from}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    if states:
        optimizer.load_state_dict(states["optimizer"])
    network: torch.nn.Module = model
    if dist.enabled:
        if device.type == "cuda":
            network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
        network = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    return model, network, optimizer, meta


def _train_epoch(network: torch.nn.Module, model: SOLOv2, optimizer: torch.optim.Optimizer, images: np.ndarray, masks: np.ndarray,
                 epoch: int, first_batch: int, step: int, schedule: _Schedule, options: SynthesizerTraining, dist: Distributed,
                 device: torch.device, on_step: Callable[[int, int, float], None] | None,
                 checkpoint_if_due: Callable[[int, int, int], None]) -> tuple[int, dict[str, Any]]:
    """The steps of one epoch from batch `first_batch` on; returns the step count and the epoch's
    metrics record (mean losses over ranks)."""
    network.train()
    order = _epoch_order(len(images), options.seed, epoch)
    sums, count, started = torch.zeros(3, dtype=torch.float64), 0, time.monotonic()
    for index in range(first_batch, schedule.steps_per_epoch):
        chunk = order[index * schedule.per_step : (index + 1) * schedule.per_step][dist.rank :: dist.world_size]
        # Augmentation randomness is a function of (seed, epoch, batch, rank): resuming replays it.
        rng = np.random.default_rng([options.seed, epoch, index, dist.rank])
        x, targets = _batch_targets(images, masks, chunk, rng, options, model.config)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, schedule.total_steps, options.lr, schedule.warmup)
        losses = solov2_loss(network(x.to(device)), targets, model.config)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        optimizer.step()
        step, count = step + 1, count + 1
        sums += torch.tensor([losses[k].item() for k in ("loss", "loss_mask", "loss_category")], dtype=torch.float64)
        if on_step is not None and dist.is_main:
            on_step(step, schedule.total_steps, losses["loss"].item())
        checkpoint_if_due(epoch, index + 1, step)
    means = dist.all_reduce_mean((sums / max(1, count)).to(device)).cpu()
    return step, {
        "epoch": epoch, "step": step, "loss": round(float(means[0]), 5), "loss_mask": round(float(means[1]), 5),
        "loss_category": round(float(means[2]), 5), "lr": float(f"{optimizer.param_groups[0]['lr']:.4g}"), "seconds": round(time.monotonic() - started, 1),
    }


def train_synthesizer(options: SynthesizerTraining, on_step: Callable[[int, int, float], None] | None = None, log: Callable[[str], None] = print) -> TrainResult:
    """Train S; resumable, DDP-ready. The result's metrics hold the best val DICE (None without a
    validation split), its epoch and the epochs done."""
    started = time.monotonic()
    out = Path(options.out)
    device = pick_device(options.device)
    dist = init_distributed(device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    if checkpoint_exists(out, STATE_NAME) and not options.resume:
        raise InputError(f"{out}: already holds a synthesizer training run; pass --resume to continue it or pick another --out")

    images, masks, val, classes = load_training_data(options)
    num_classes = max(max(classes, default=0), int(masks.max(initial=0)))
    if num_classes < 1:
        raise InputError(f"{options.data}: the masks have no foreground class")
    val_arrays = val.arrays(options.size, with_masks=True) if val is not None else None
    model, network, optimizer, meta = _build_model(options, num_classes, out, device, dist, log)
    config = model.config

    per_step = options.batch * dist.world_size
    steps_per_epoch = len(images) // per_step
    if steps_per_epoch == 0:
        raise InputError(f"{options.data}: {len(images)} training images are fewer than one batch of {per_step}")
    total_steps = steps_per_epoch * options.epochs
    warmup = min(options.warmup_steps, max(1, total_steps // 5))  # short runs still reach the peak rate
    schedule = _Schedule(per_step, steps_per_epoch, total_steps, warmup)
    epoch, batch_index, step = meta.get("epoch", 0), meta.get("batch", 0), meta.get("step", 0)
    best, best_epoch = meta.get("best_dice", -1.0), meta.get("best_epoch", -1)
    metrics_path = out / METRICS_FILE
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if metrics_path.exists():  # drop lines of epochs that will be redone after an interruption
            kept = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line).get("epoch", 0) < epoch]
            metrics_path.write_text("".join(line + "\n" for line in kept))
        log(f"synthesizer: {len(images)} training images, {num_classes} classes, {config.size} px, "
            f"{steps_per_epoch} steps/epoch x {options.epochs} epochs, val: {len(val) if val else 'none'}")

    def save_state(next_epoch: int, next_batch: int, step_done: int) -> None:
        if dist.is_main:
            counters = {"epoch": next_epoch, "batch": next_batch, "step": step_done, "best_dice": best, "best_epoch": best_epoch}
            save_checkpoint(out, STATE_NAME, {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                            {"config": config.to_dict(), "options": asdict(options), **counters})

    def checkpoint_if_due(next_epoch: int, next_batch: int, step_done: int) -> None:
        nonlocal last_save
        if time.monotonic() - last_save > options.checkpoint_minutes * 60:
            save_state(next_epoch, next_batch, step_done)
            last_save = time.monotonic()

    last_save, epochs_done = time.monotonic(), epoch
    for epoch in range(epoch, options.epochs):
        step, record = _train_epoch(network, model, optimizer, images, masks, epoch, batch_index, step, schedule, options, dist,
                                    device, on_step, checkpoint_if_due)
        batch_index = 0
        if dist.is_main:
            if val_arrays is not None:
                summary = dice_of_model(model, *val_arrays, class_names=val.classes or None)
                record["val_dice"], record["val_dice_per_class"] = summary["mean"], summary.get("per_class")
                if best_epoch < 0 or summary["mean"] > best:  # the first epoch always counts (DICE may be NaN)
                    best, best_epoch = summary["mean"], epoch
                    save_network("synthesizer", model, out, meta={"epoch": epoch, "val_dice": best, "classes": classes})
            else:
                best_epoch = epoch
                save_network("synthesizer", model, out, meta={"epoch": epoch, "classes": classes})
            append_metrics(metrics_path, record)
            log(" ".join(f"{k}={v}" for k, v in record.items() if k != "val_dice_per_class"))
        save_state(epoch + 1, 0, step)
        last_save, epochs_done = time.monotonic(), epoch + 1
        dist.barrier()
    metrics = {"best_val_dice": best if best >= 0 else None, "best_epoch": best_epoch, "epochs": epochs_done}
    return TrainResult(step, time.monotonic() - started, out, False, metrics)
