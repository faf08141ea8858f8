"""Does C know the archive? Retrieval of augmented views, trained weights against random ones.

For every archive image we make an augmented view, embed it with C, and look for the nearest
un-augmented archive image (cosine similarity of `FeatureNetwork.embed`). Top-1 is the fraction of
views whose nearest neighbour is their own original; chance is 1/N. A trained C should be far above
an untrained network of the same architecture on the same views.

Retrieval is what C is for, so a second probe asks whether C's nearest neighbours show the same
anatomy: for every query image (e.g. the `test` split) take its nearest archive image (e.g. the
`train` split) by C's embedding and score the neighbour's mask against the query's mask with DICE.
Baselines: a random network's nearest neighbour, and a random archive image.

    python -m training.evaluate_moco --bundle BUNDLE --data DIR [--split val] [--views 2]
        [--archive-split train]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generation.dataset import ImageDataset
from generation.moco import FeatureNetwork
from generation.registry import load_network
from retrieval.metrics import dice_per_image, dice_summary
from training.augment import AugmentConfig, augment_batch, resize_images


def evaluation_augmentations(size: int) -> dict[str, AugmentConfig]:
    """`aug+`: the training augmentations (hard). `crop`: crop (area 0.5-1) + flip only (geometry)."""
    mild = AugmentConfig(size=size, crop_scale=(0.5, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    return {"aug+": AugmentConfig(size=size), "crop": mild}


@torch.no_grad()
def view_retrieval_accuracy(
    network: FeatureNetwork,
    images: torch.Tensor,
    augment: AugmentConfig,
    views: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    topk: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy (%) of finding each image from `views` augmented views of it.

    images: uint8 (N, 3, H, W). The gallery is the centre view at C's trained size.
    """
    assert images.dim() == 4 and images.shape[1] == 3 and images.dtype == torch.uint8
    count = images.shape[0]
    gallery = network.embed_many(resize_images(images, network.config.image_size), batch_size)
    generator = torch.Generator().manual_seed(seed)
    hits = {k: 0 for k in topk}
    for _ in range(views):
        for start in range(0, count, batch_size):
            chunk = images[start : start + batch_size]
            queries = network.embed_many(augment_batch(chunk, augment, generator), batch_size)
            similarity = queries @ gallery.t()
            truth = torch.arange(start, start + chunk.shape[0])
            # Rank of the true image = number of gallery images scoring strictly higher.
            rank = (similarity > similarity[torch.arange(chunk.shape[0]), truth][:, None]).sum(dim=1)
            for k in topk:
                hits[k] += int((rank < k).sum())
    return {f"top{k}": 100.0 * hits[k] / (count * views) for k in topk}


def evaluate_feature_network(
    trained: FeatureNetwork, images: torch.Tensor, views: int = 1, seed: int = 0, batch_size: int = 64
) -> dict[str, Any]:
    """Retrieval of augmented views for `trained` and for a random network of the same architecture."""
    baseline = FeatureNetwork.random(trained.config, seed=seed).to(next(trained.parameters()).device)
    report: dict[str, Any] = {"images": int(images.shape[0]), "views": views, "chance_top1": 100.0 / images.shape[0]}
    for name, augment in evaluation_augmentations(trained.config.image_size).items():
        report[name] = {
            "trained": view_retrieval_accuracy(trained, images, augment, views, seed, batch_size),
            "random": view_retrieval_accuracy(baseline, images, augment, views, seed, batch_size),
        }
    return report


def neighbour_mask_dice(
    networks: dict[str, FeatureNetwork],
    queries: torch.Tensor,
    query_masks: np.ndarray,
    archive: torch.Tensor,
    archive_masks: np.ndarray,
    num_classes: int,
    seed: int = 0,
) -> dict[str, float]:
    """Mean DICE (x100) between each query's mask and its nearest archive image's mask, per network,
    plus `random_neighbour`: the same with a random archive image (what chance gives)."""
    neighbours = {
        name: (network.embed_many(queries) @ network.embed_many(archive).T).argmax(dim=1).numpy()
        for name, network in networks.items()
    }
    neighbours["random_neighbour"] = np.random.default_rng(seed).integers(0, len(archive), len(queries))
    return {
        name: dice_summary(
            [dice_per_image(archive_masks[j], query_masks[i], num_classes) for i, j in enumerate(chosen)]
        ).mean
        for name, chosen in neighbours.items()
    }


def evaluate_moco(
    bundle: str | Path,
    data: str | Path,
    split: str | None = None,
    views: int = 1,
    seed: int = 0,
    max_images: int | None = None,
    device: str = "cpu",
    archive_split: str | None = None,
) -> dict[str, Any]:
    trained = load_network("moco", bundle, device)
    dataset = ImageDataset(data, split)
    arrays, masks = dataset.arrays(trained.config.load_size, with_masks=archive_split is not None)
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    if max_images is not None:
        images = images[:max_images]
    report = evaluate_feature_network(trained, images, views, seed)
    if archive_split is not None:
        archive = ImageDataset(data, archive_split)
        archive_arrays, archive_masks = archive.arrays(trained.config.load_size, with_masks=True)
        networks = {"trained": trained, "random": FeatureNetwork.random(trained.config, seed=seed)}
        report["neighbour_mask_dice"] = neighbour_mask_dice(
            networks,
            images,
            masks,
            torch.from_numpy(archive_arrays).permute(0, 3, 1, 2).contiguous(),
            archive_masks,
            max(dataset.num_classes, int(masks.max()) + 1, int(archive_masks.max()) + 1),
            seed,
        )
        report["archive_split"] = archive_split
    report["bundle"], report["data"], report["split"] = str(bundle), str(data), split
    report["config"] = dataclasses.asdict(trained.config)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default=None)
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--archive-split", default=None, help="also score nearest neighbours' masks from this split")
    args = parser.parse_args(argv)
    report = evaluate_moco(
        args.bundle, args.data, args.split, args.views, max_images=args.max_images, device=args.device,
        archive_split=args.archive_split,
    )  # fmt: skip
    report.pop("config")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
