"""FD_C of a trained G against held-out real images, with the two reference points that give it meaning.

    python -m training.evaluate_generator --bundle B --data D --split test [--fd-bundle C] [--grid docs/x.png]

Reports, in C's embedding space (`retrieval.metrics.fd_c`):
    generated   FD_C(G samples, held-out reals)
    floor       FD_C(training reals, held-out reals): what a perfect copy of the training set scores
    untrained   FD_C(samples of an untrained G with the same config, held-out reals)
Samples use truncation 1 (no truncation), const noise, `--count` latents from a fixed seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from generation.dataset import ImageDataset
from generation.images import image_grid, save_png
from generation.moco import FeatureNetwork
from generation.registry import load_network
from generation.stylegan2 import Generator
from retrieval.metrics import fd_c
from training.train_generator import generate


def real_features(network: FeatureNetwork, data: str | Path, split: str | None, size: int, limit: int | None = None) -> torch.Tensor:
    images, _ = ImageDataset(data, split).arrays(size)
    images = images[:limit] if limit else images
    return network.embed_many(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


def evaluate_generator(bundle: str | Path, data: str | Path, split: str, fd_bundle: str | Path | None = None,
                       train_split: str | None = "train", count: int = 1000, seed: int = 1) -> dict:
    G = load_network("generator", bundle)
    network = load_network("moco", fd_bundle or bundle)
    size = G.config.resolution
    held_out = real_features(network, data, split, size)
    train = real_features(network, data, train_split, size, limit=count)
    torch.manual_seed(seed)
    untrained = Generator(G.config).eval()
    with torch.no_grad():
        untrained.mapping.w_avg.copy_(untrained.mapping(torch.randn(2000, G.config.z_dim)).mean(0))
    return {
        "bundle": str(bundle), "data": str(data), "split": split, "held_out_images": len(held_out), "samples": count,
        "resolution": size, "training": json.loads((Path(bundle) / "generator.json").read_text()).get("training", {}),
        "fd_c": {"generated": fd_c(network.embed_many(generate(G, count, seed)), held_out),
                 "floor_train_vs_held_out": fd_c(train, held_out),
                 "untrained_G": fd_c(network.embed_many(generate(untrained, count, seed)), held_out)},
    }


def sample_figure(bundle: str | Path, data: str | Path, split: str, out: str | Path, columns: int = 8, seed: int = 2) -> None:
    """Two rows of G samples over one row of held-out real images."""
    G = load_network("generator", bundle)
    fakes = generate(G, 2 * columns, seed)
    images, _ = ImageDataset(data, split).arrays(G.config.resolution)
    reals = torch.from_numpy(images[np.linspace(0, len(images) - 1, columns).astype(int)]).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_png(image_grid(torch.cat([fakes, reals]), columns), Path(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--fd-bundle", default=None, help="Bundle with C (default: --bundle)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--grid", default=None, help="Also write a sample figure here")
    args = parser.parse_args()
    print(json.dumps(evaluate_generator(args.bundle, args.data, args.split, args.fd_bundle, count=args.count), indent=1))
    if args.grid:
        sample_figure(args.bundle, args.data, args.split, args.grid)


if __name__ == "__main__":
    main()
