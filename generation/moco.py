"""C: the domain feature network, trained with MoCo v2 (He et al. 2020; Chen et al. 2020).

`MoCo` is the training-time module: a query encoder, a momentum (EMA) key encoder, a queue of past
keys as negatives, the InfoNCE loss. `FeatureNetwork` is what the rest of the project uses: the
trained query trunk, loaded from a bundle, giving pooled embeddings (retrieval, FD-C) and multi-layer
feature maps (the LPIPS-C perceptual distance, E's feature loss).

Bundle files: `moco.safetensors` (query encoder: `backbone.*`, `head.*`) and `moco.json`
(`config`: the `MocoConfig` as JSON, plus training counters).

Image convention everywhere: float (N, 3, H, W) in [-1, 1]; FeatureNetwork resizes to the trained size.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from generation.errors import InputError
from generation.registry import NetworkSpec, register
from generation.resnet import ResNet, ResNetConfig


@dataclass
class MocoConfig:
    backbone: ResNetConfig = field(default_factory=lambda: ResNetConfig(depth=50))
    dim: int = 128  # embedding size of the projection head (the contrastive space)
    mlp: bool = True  # MoCo v2 2-layer MLP head instead of one linear layer
    queue_size: int = 65536  # K negatives
    momentum: float = 0.999  # key encoder EMA
    temperature: float = 0.2
    image_size: int = 224  # crop size the network is trained (and evaluated) at
    load_size: int = 256  # images are decoded at this size, then randomly cropped to image_size
    lr: float = 0.03
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 256  # global batch (summed over DDP ranks)
    epochs: int = 200
    steps: int | None = None  # total optimiser steps; overrides epochs when set
    # BatchNorm "shuffling": keys are encoded in `bn_splits` random sub-batches (and queries in
    # in-order ones) so a query and its key never share batch statistics, emulating MoCo's
    # multi-GPU shuffle BN on one device. Under DDP keys are also shuffled across ranks.
    bn_splits: int = 1
    # aug+ strength (training/augment.py; the defaults are MoCo v2's): smallest crop area, a factor
    # on the colour-jitter magnitudes (brightness/contrast/saturation 0.4, hue 0.1), probabilities.
    crop_min_scale: float = 0.2
    jitter_strength: float = 1.0
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):  # from JSON
            self.backbone = ResNetConfig(**self.backbone)
        if self.backbone.in_channels != 3:
            raise ValueError("C works on RGB images: backbone.in_channels must be 3")
        if not 0.0 <= self.momentum < 1.0 or self.temperature <= 0 or self.queue_size < 1:
            raise ValueError("need 0 <= momentum < 1, temperature > 0 and queue_size >= 1")
        if self.load_size < self.image_size:
            raise ValueError("load_size must be >= image_size")
        if not 0.0 < self.crop_min_scale <= 1.0 or self.jitter_strength < 0:
            raise ValueError("need 0 < crop_min_scale <= 1 and jitter_strength >= 0")


def _preset(name: str) -> MocoConfig:
    """`tiny`: tests (seconds). `cpu`: a useful C on a small archive in well under an hour on a
    laptop CPU. `paper`: the published MoCo v2 recipe (ResNet-50, 224 px, K 65536, 200 epochs)."""
    if name == "tiny":
        return MocoConfig(
            backbone=ResNetConfig(depth=18, width=4), dim=16, queue_size=64, image_size=32, load_size=40,
            batch_size=8, epochs=1, steps=20, bn_splits=2, log_every=5, checkpoint_every=10,
        )  # fmt: skip
    if name == "cpu":
        # A fixed step budget (~20-30 min at ~2-3 s/step on 2 cores) rather than epochs: small
        # archives (a few hundred images) would otherwise get too few steps to learn anything.
        # Momentum 0.99: the key encoder averages over ~100 steps; 0.999 (~1000 steps) would
        # leave it nearly at its random initialisation for the whole of a 600-step run.
        # Augmentation: crop (area 0.3-1) + flip + blur, no colour jitter / grayscale. On a small
        # archive of video frames (e.g. vocalfolds: 426 frames of 6 sequences, all pink tissue) the
        # colour part of aug+ makes the two views of a frame no closer than two frames of the same
        # sequence: MoCo then collapses (projections all within cos ~0.9, loss stuck near ln(K+1))
        # and C ends no better than random weights. Without it, it learns.
        return MocoConfig(
            backbone=ResNetConfig(depth=18, width=32), dim=128, queue_size=4096, momentum=0.99, image_size=128,
            load_size=144, batch_size=64, epochs=20, steps=600, bn_splits=4, log_every=10, checkpoint_every=50,
            crop_min_scale=0.3, jitter_p=0.0, grayscale_p=0.0, blur_p=0.5,
        )  # fmt: skip
    return MocoConfig()  # paper


def _configure(
    preset: str,
    image_size: int | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    queue_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
) -> MocoConfig:
    """A preset with command-line overrides applied (None = keep the preset's value)."""
    config = _preset(preset)
    changes: dict[str, Any] = {}
    if image_size is not None:
        # Keep the preset's decode-size margin (e.g. 256 -> 224 crops) at the new size.
        changes["image_size"] = image_size
        changes["load_size"] = max(image_size, round(image_size * config.load_size / config.image_size))
    if epochs is not None:
        changes.update(epochs=epochs, steps=None)
    if steps is not None:
        changes["steps"] = steps
    if batch_size is not None:
        changes["batch_size"] = batch_size
    if queue_size is not None:
        changes["queue_size"] = queue_size
    if lr is not None:
        changes["lr"] = lr
    if seed is not None:
        changes["seed"] = seed
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as error:
        raise InputError(f"invalid MoCo settings: {error}")


def config_to_dict(config: MocoConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(document: dict[str, Any]) -> MocoConfig:
    known = {f.name for f in dataclasses.fields(MocoConfig)}
    unknown = set(document) - known
    if unknown:
        raise InputError(f"MoCo config has unknown fields {sorted(unknown)}; was it written by a newer version?")
    try:
        return MocoConfig(**document)
    except (TypeError, ValueError) as error:
        raise InputError(f"invalid MoCo config ({error})")


class MocoEncoder(nn.Module):
    """ResNet trunk -> global average pool -> projection head (MLP in MoCo v2)."""

    def __init__(self, config: MocoConfig):
        super().__init__()
        self.config = config
        self.backbone = ResNet(config.backbone)
        width = self.backbone.out_channels
        if config.mlp:
            self.head: nn.Module = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, config.dim))
        else:
            self.head = nn.Linear(width, config.dim)

    def pooled(self, images: Tensor) -> Tensor:
        return self.backbone(images)[-1].mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, dim), not normalised."""
        return self.head(self.pooled(images))


# ---------------------------------------------------------------------------------------------
# Loss and distributed helpers (free functions: easy to test on their own)


def moco_logits(queries: Tensor, keys: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """InfoNCE logits (N, 1 + K): column 0 is the positive <q, k+>, then <q, queue_j>, all / T.

    queries, keys: (N, dim) L2-normalised; queue: (K, dim) L2-normalised past keys.
    """
    assert queries.shape == keys.shape and queries.shape[1] == queue.shape[1]
    positive = (queries * keys).sum(dim=1, keepdim=True)
    negative = queries @ queue.t()
    return torch.cat([positive, negative], dim=1) / temperature


def info_nce_loss(logits: Tensor) -> Tensor:
    """Cross-entropy with the positive in column 0."""
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def gather_from_all_ranks(tensor: Tensor) -> Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0 (no gradient)."""
    _, world = distributed_world()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def _encode_in_splits(encoder: nn.Module, images: Tensor, splits: int) -> Tensor:
    if splits <= 1:
        return encoder(images)
    return torch.cat([encoder(chunk) for chunk in images.chunk(splits)], dim=0)


class MoCo(nn.Module):
    def __init__(self, config: MocoConfig):
        super().__init__()
        self.config = config
        self.encoder_q = MocoEncoder(config)
        self.encoder_k = copy.deepcopy(self.encoder_q)  # starts equal, then follows q by EMA only
        for parameter in self.encoder_k.parameters():
            parameter.requires_grad_(False)
        # Rows are past keys; random unit vectors until the first K keys have been enqueued.
        self.register_buffer("queue", F.normalize(torch.randn(config.queue_size, config.dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # Archive index of the image each queue row was encoded from (-1: unknown / random row).
        # On a small archive the queue spans epochs, so it can hold an older key of a query's own
        # image; that "negative" is really a positive and is masked out of the logits.
        self.register_buffer("queue_ids", torch.full((config.queue_size,), -1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        m = self.config.momentum
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.mul_(m).add_(param_q.detach(), alpha=1 - m)

    @torch.no_grad()
    def enqueue(self, keys: Tensor, ids: Tensor | None = None) -> None:
        """Replace the oldest queue rows by `keys` (already gathered from all ranks), wrapping around.

        `ids`: the keys' archive image indices (same order), remembered to mask false negatives."""
        size = self.queue.shape[0]
        if ids is None:
            ids = torch.full((keys.shape[0],), -1, dtype=torch.long, device=keys.device)
        keys, ids = keys[-size:], ids[-size:]  # more keys than the queue holds: keep the newest
        index = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ids[index] = ids.to(device=self.queue_ids.device, dtype=torch.long)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    @torch.no_grad()
    def encode_keys(self, images: Tensor, shuffle_generator: torch.Generator) -> Tensor:
        """Keys (N, dim), L2-normalised, with BN shuffling across ranks and across local splits."""
        rank, world = distributed_world()
        local = images.shape[0]
        everything = gather_from_all_ranks(images)
        # Same generator state on every rank (seeded by step) -> the same permutation everywhere.
        permutation = torch.randperm(everything.shape[0], generator=shuffle_generator).to(images.device)
        mine = permutation[rank * local : (rank + 1) * local]
        keys = F.normalize(_encode_in_splits(self.encoder_k, everything[mine], self.config.bn_splits), dim=1)
        # Undo the shuffle: gather all keys in permuted order, then pick this rank's originals.
        all_keys = gather_from_all_ranks(keys)
        unshuffled = torch.empty_like(all_keys)
        unshuffled[permutation] = all_keys
        return unshuffled[rank * local : (rank + 1) * local]

    def forward(
        self, view_q: Tensor, view_k: Tensor, shuffle_generator: torch.Generator, ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Two views of the same local batch -> (InfoNCE logits (N, 1+K), local keys (N, dim)).

        Side effects, as in MoCo: the key encoder takes one EMA step before encoding, and the
        keys of the whole global batch are enqueued after the logits are computed.
        `ids` (N,): archive indices of the batch's images; queue rows holding a key of the same
        image (from an earlier epoch) get logit -inf, so a query is never pushed away from itself.
        """
        size = self.config.image_size
        assert view_q.shape == view_k.shape and view_q.shape[1:] == (3, size, size), (
            f"expected two (N, 3, {size}, {size}) views, got {tuple(view_q.shape)} and {tuple(view_k.shape)}"
        )
        queries = F.normalize(_encode_in_splits(self.encoder_q, view_q, self.config.bn_splits), dim=1)
        self.momentum_update()
        keys = self.encode_keys(view_k, shuffle_generator)
        logits = moco_logits(queries, keys, self.queue.clone().detach(), self.config.temperature)
        all_ids = None
        if ids is not None:
            ids = ids.to(device=logits.device, dtype=torch.long)
            same_image = ids[:, None] == self.queue_ids[None, :]
            logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(same_image, float("-inf"))], dim=1)
            all_ids = gather_from_all_ranks(ids)
        self.enqueue(gather_from_all_ranks(keys), all_ids)
        return logits, keys


# ---------------------------------------------------------------------------------------------
# The trained network as used by the rest of the project


class FeatureNetwork(nn.Module):
    """C at inference: frozen query encoder of a trained MoCo (always in eval mode).

    `embed`: (N, D) L2-normalised global-average-pooled trunk features (D = C5 channels).
    `features`: [stem, C2, C3, C4, C5] feature maps (for the LPIPS-C perceptual distance).
    Both take float images (N, 3, H, W) in [-1, 1] and resize to the trained size; both are
    differentiable with respect to the images (the weights never receive gradients).
    """

    def __init__(self, config: MocoConfig, encoder: MocoEncoder | None = None):
        super().__init__()
        self.config = config
        self.encoder = encoder if encoder is not None else MocoEncoder(config)
        self.encoder.eval()
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)

    @classmethod
    def random(cls, config: MocoConfig, seed: int = 0) -> FeatureNetwork:
        """Untrained network with the same architecture: the baseline C is compared against."""
        # Full random ResNet: with zero-initialised residual gammas every block would be an
        # identity and the "random" baseline would really be a shallow stem-and-shortcuts net.
        backbone = dataclasses.replace(config.backbone, zero_init_residual=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(dataclasses.replace(config, backbone=backbone))

    def train(self, mode: bool = True) -> FeatureNetwork:
        super().train(False)  # BN must use its running statistics: C is a fixed metric
        return self

    @property
    def embedding_dim(self) -> int:
        return self.encoder.backbone.out_channels

    def backbone_state(self) -> dict[str, Tensor]:
        """Trunk weights for `generation.resnet.load_backbone_weights` (initialising S, E, H)."""
        return {k: v.detach().clone() for k, v in self.encoder.backbone.state_dict().items()}

    def prepare(self, images: Tensor) -> Tensor:
        assert images.dim() == 4 and images.shape[1] == 3, f"expected (N, 3, H, W) images in [-1, 1], got {tuple(images.shape)}"
        parameter = next(self.encoder.parameters())
        images = images.to(device=parameter.device, dtype=parameter.dtype)
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            # Antialiased when shrinking, so detail finer than the trained scale does not alias.
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return images

    def features(self, images: Tensor) -> list[Tensor]:
        return self.encoder.backbone.forward_with_stem(self.prepare(images))

    def embed(self, images: Tensor) -> Tensor:
        return F.normalize(self.encoder.pooled(self.prepare(images)), dim=1)

    def project(self, images: Tensor) -> Tensor:
        """(N, dim) L2-normalised head output: the contrastive space MoCo trained."""
        return F.normalize(self.encoder(self.prepare(images)), dim=1)

    @torch.no_grad()
    def embed_many(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """`embed` in chunks, without gradients; images may be uint8 (N, 3, H, W) or [-1, 1] float."""
        out = []
        for chunk in images.split(batch_size):
            if chunk.dtype == torch.uint8:
                chunk = chunk.float() / 127.5 - 1
            out.append(self.embed(chunk).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.embedding_dim)


# ---------------------------------------------------------------------------------------------
# The registry entry: BUNDLE/moco.safetensors (the query encoder) + moco.json, loaded as C

register(NetworkSpec(name="moco", title="MoCo feature network C", config_from_dict=config_from_dict, build=MocoEncoder,
                     configure=_configure, state_key="model", train_command="train moco",
                     finish=lambda encoder, config: FeatureNetwork(config, encoder)))
