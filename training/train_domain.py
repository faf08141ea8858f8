"""Train the sketch-domain classifier (`generation.domain`) of a bundle.

In domain (label 1): simulated free-hand drawings of the `--split` images' masks at strengths drawn
uniformly from [0, 2] (`generation.freehand`, the simulator `evaluate` draws its queries with),
`drawings` per mask. Out of domain (label 0), as many again: half the same simulator's drawings of
another anatomy's masks (`negatives`: generated phantom anatomies, `generation.phantom`, or a
dataset folder with masks), half random scribbles (`retrieval.calibrate.scribble`: no anatomy);
with `negatives` "none", scribbles alone (for a phantom archive, for instance). Every drawing is normalised as a search normalises
an upload (`retrieval.search.load_sketch`). The phantom and scribble seeds (`negative_seed`) are
streams of their own, apart from those `retrieval.calibrate` fits and measures with.

The classifier averages `members` towers (`generation.domain`); tower k is trained exactly as a
one-tower run of seed `seed + k` would be: its own in-domain drawings, initialisation, batches and
transforms; the out-of-domain drawings are the same for all. Both pools are drawn once per tower
(seeded); a tenth of each is held out and its accuracy reported (drawings of the same masks as the
training ones, so a check of the fit, not of how it generalises). Each step trains on a batch of
half in-domain, half out-of-domain drawings (binary cross-entropy, Adam), each moved by a random
similarity transform (`random_similarity`: rotation up to 15 degrees, scale 0.8-1.25, shift up to a
tenth of the frame). Without it the classifier learns the training videos' exact shapes: on the
`val` video it called 65 % of the in-domain drawings out of domain, with it 31 % (docs/RESULTS.md).
A run takes about 18 minutes per tower on one CPU thread, so it is not checkpointed: an interrupted
run is started again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from generation.dataset import ImageDataset
from generation.domain import DomainConfig, DomainTower, SketchDomainClassifier
from generation.errors import InputError
from generation.freehand import MAX_STRENGTH, freehand_sketch
from generation.phantom import image_seed, phantom_anatomy, phantom_mask
from generation.registry import load_network, network_config, save_network
from generation.sketch import sketch_to_tensor
from retrieval.calibrate import SCRIBBLE_SIZE, scribble
from retrieval.evaluate import SKETCH_SIZE
from training.loop import TrainResult

HELD_OUT = 0.1  # share of each pool kept out of training


@dataclass(frozen=True)
class DomainOptions:
    steps: int = 16000  # per tower; one tower of 8,000 flagged 3 of the 33 drawn-from-memory `val` sketches, this 2; 32,000 no fewer (docs/RESULTS.md)
    batch: int = 64  # half in domain, half out
    lr: float = 1e-3
    drawings: int = 3  # in-domain drawings per mask
    augment: bool = True  # a random similarity transform of every drawing of every batch
    negative_seed: int = 5
    negatives: str = "phantom"  # the other anatomy: "phantom", a dataset folder with masks, or "none"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 2 or self.drawings < 1 or self.lr <= 0:
            raise InputError("domain classifier: steps >= 1, batch >= 2, drawings >= 1 and lr > 0")


PRESET_OPTIONS = {"tiny": DomainOptions(steps=60, batch=16, drawings=2), "cpu": DomainOptions(), "paper": DomainOptions()}  # not part of the paper: as cpu


def domain_options(preset: str, **overrides) -> DomainOptions:
    """The preset's options with `overrides` (None values ignored: the preset's stands)."""
    if preset not in PRESET_OPTIONS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_OPTIONS)}")
    return replace(PRESET_OPTIONS[preset], **{key: value for key, value in overrides.items() if value is not None})


def _normalised(drawing: np.ndarray, resolution: int) -> np.ndarray | None:
    from retrieval.search import load_sketch

    try:
        return load_sketch(drawing, resolution)
    except InputError:  # nothing left to draw
        return None


def in_domain_pool(dataset: ImageDataset, drawings: int, resolution: int, seed: int) -> np.ndarray:
    """uint8 (N, R, R): `drawings` simulated free-hand drawings of every mask of `dataset`."""
    pool = []
    for index in range(len(dataset)):
        mask = dataset.mask(index, SKETCH_SIZE)
        for k in range(drawings):
            rng = np.random.default_rng([seed, index, k, 31])
            sketch = _normalised(freehand_sketch(mask, float(rng.uniform(0, MAX_STRENGTH)), rng), resolution)
            if sketch is not None:
                pool.append(sketch)
    if not pool:
        raise InputError(f"{dataset.root}: no mask gives a drawing; the in-domain pool is empty")
    return np.stack(pool)


def out_of_domain_pool(count: int, resolution: int, seed: int, negatives: str = "phantom") -> np.ndarray:
    """uint8 (count, R, R): free-hand drawings of another anatomy (`negatives`, see DomainOptions)
    and random scribbles, half each; scribbles alone for "none"."""
    other = None if negatives in ("phantom", "none") else ImageDataset(negatives)
    if other is not None and (not other.has_masks or not len(other)):
        raise InputError(f"{negatives}: the out-of-domain drawings are drawn from its masks, and some are missing")
    pool, rng = [], np.random.default_rng([seed, 104729])
    index = 0
    while len(pool) < count:
        if len(pool) % 2 == 0 and negatives != "none":
            if other is None:
                mask = phantom_mask(phantom_anatomy(image_seed(seed, index)), SKETCH_SIZE)
            else:
                mask = other.mask(index % len(other), SKETCH_SIZE)
            index += 1
            drawing = freehand_sketch(mask, float(rng.uniform(0, MAX_STRENGTH)), rng)
        else:
            drawing = scribble(rng, SCRIBBLE_SIZE)
        sketch = _normalised(drawing, resolution)
        if sketch is not None:
            pool.append(sketch)
    return np.stack(pool)


def random_similarity(sketches: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(B, 1, R, R) ink 1 / paper 0 -> the same drawings rotated (up to 15 degrees), scaled
    (0.8-1.25) and shifted (up to a tenth of the frame), each by its own transform; still 0 / 1."""
    count = sketches.shape[0]
    angle = torch.from_numpy(rng.uniform(-np.pi / 12, np.pi / 12, count)).float()
    scale = torch.from_numpy(rng.uniform(0.8, 1.25, count)).float()
    shift = torch.from_numpy(rng.uniform(-0.2, 0.2, (count, 2))).float()  # of the [-1, 1] frame: a tenth of its side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # the grid maps output to input positions
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(sketches.shape), align_corners=False)
    return (F.grid_sample(sketches, grid, align_corners=False) > 0.3).float()


def train_domain(data: str | Path, bundle: str | Path, preset: str = "cpu", options: DomainOptions | None = None, split: str = "train",
                 command: str = "", on_step: Callable[[int, float], None] | None = None,
                 log: Callable[[str], None] = print, members: int | None = None) -> TrainResult:
    """Train BUNDLE/domain.safetensors at the resolution of the bundle's G, `members` towers (default:
    the preset's), tower k exactly as a one-tower run of seed `options.seed + k`; returns what it did
    (metrics: held-out accuracy in and out of domain, the towers' mean, and pool sizes). `on_step`
    counts the steps of all towers."""
    options = options or domain_options(preset)
    bundle, start = Path(bundle), time.perf_counter()
    resolution = load_network("generator", bundle).config.resolution
    dataset = ImageDataset(data, split)
    if not dataset.has_masks:
        raise InputError(f"{data}: the in-domain drawings are drawn from the masks, and some are missing")
    config = network_config("domain", preset, resolution=resolution)
    config = replace(config, members=members or config.members)
    model, towers, negatives = SketchDomainClassifier(config), [], {}
    for member in range(config.members):
        seed = options.seed + member
        torch.manual_seed(seed)
        positives = in_domain_pool(dataset, options.drawings, resolution, seed)
        if len(positives) not in negatives:  # the same out-of-domain drawings for every tower
            negatives[len(positives)] = out_of_domain_pool(len(positives), resolution, options.negative_seed, options.negatives)
        log(f"training tower {member + 1} of {config.members} of the sketch-domain classifier on {len(positives)} drawings of {split} "
            f"masks and {len(positives)} of {'scribbles' if options.negatives == 'none' else options.negatives + ' drawings and scribbles'} "
            f"at {resolution} px")
        offset = member * options.steps
        tower, metrics = _train_tower(config, positives, negatives[len(positives)], options, seed,
                                      on_step and (lambda step, loss: on_step(offset + step, loss)))
        model.towers[member] = tower
        towers.append(metrics)
        log(f"held out: {metrics['held_out_accuracy_in']:.3f} of in-domain and {metrics['held_out_accuracy_out']:.3f} "
            f"of out-of-domain drawings classified right")
    metrics = {key: float(np.mean([tower[key] for tower in towers])) for key in towers[0]}
    metrics.update(towers=towers, in_domain=len(positives), out_of_domain=len(negatives[len(positives)]))
    seconds = time.perf_counter() - start
    save_network("domain", model.eval(), bundle, {"training": {"data": str(data), "split": split, "preset": preset, "options": asdict(options),
                                                              "seconds": round(seconds, 1), "command": command, **metrics}})
    return TrainResult(options.steps * config.members, seconds, bundle, False, metrics)


def _train_tower(config: DomainConfig, positives: np.ndarray, negatives: np.ndarray, options: DomainOptions, seed: int,
                 on_step: Callable[[int, float], None] | None) -> tuple[DomainTower, dict[str, float]]:
    """One tower trained from `seed` (torch's generator seeded by the caller before the pools were
    drawn); returns it in eval mode and its held-out accuracies and losses."""
    rng = np.random.default_rng(seed)
    held = {name: rng.permutation(len(pool)) for name, pool in (("in", positives), ("out", negatives))}
    cut = {name: max(1, int(HELD_OUT * len(order))) for name, order in held.items()}
    train = {"in": positives[held["in"][cut["in"]:]], "out": negatives[held["out"][cut["out"]:]]}
    test = {"in": positives[held["in"][: cut["in"]]], "out": negatives[held["out"][: cut["out"]]]}
    tower = DomainTower(config).train()
    optimiser = torch.optim.Adam(tower.parameters(), lr=options.lr)
    half = options.batch // 2
    labels = torch.cat([torch.ones(half), torch.zeros(half)])
    losses = []
    for step in range(1, options.steps + 1):
        batch = np.concatenate([train["in"][rng.integers(len(train["in"]), size=half)], train["out"][rng.integers(len(train["out"]), size=half)]])
        sketches = sketch_to_tensor(batch)
        if options.augment:
            sketches = random_similarity(sketches, rng)
        loss = F.binary_cross_entropy_with_logits(tower(sketches), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, float(np.mean(losses[-25:])))
    tower.eval()
    with torch.no_grad():
        accuracy = {name: float(((tower(sketch_to_tensor(pool)) > 0) == (name == "in")).float().mean()) for name, pool in test.items()}
    return tower, {"held_out_accuracy_in": accuracy["in"], "held_out_accuracy_out": accuracy["out"],
                   "first_loss": float(np.mean(losses[:25])), "last_loss": float(np.mean(losses[-25:]))}
