"""The W-space ceiling: how well can G reproduce a real held-out image at all?

Every real image x is inverted into G's latent space by optimisation, from G's mean w:

    w* = argmin_w L_sim(x, G(w)),   L_sim = 1.0 L2 + 0.8 LPIPS-C + 0.5 (1 - cos(C(x), C(G(w))))

(E's own training loss, `training.losses`), with Adam over a few hundred steps, all images of a
batch at once. `space="w"` optimises one w per image, broadcast to every layer: exactly what E
outputs, so DICE(S(G(w*)), S(x)) bounds what any E can reach with this G. `space="w+"` gives every
layer its own w (a looser bound; H, which edits G's weights, can in principle pass either).

    python -m training.invert --bundle B --data D --split test [--limit N] [--steps 300] [--space w,w+] [--json out.json]

prints, beside the ceilings, E alone and E + H at every step (`training.evaluate_sketch2medi`, on S's
synthesized sketches and simulated free-hand ones): DICE against S(x) (percent) and FD_C against
the real images, so the table says whether G or E loses the DICE.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from generation.dataset import ImageDataset
from generation.device import set_threads
from generation.errors import InputError
from generation.images import square_resize, tensor_to_images
from generation.moco import FeatureNetwork
from generation.stylegan2 import Generator
from retrieval.metrics import fd_c
from retrieval.models import SystemModels
from retrieval.rerank import dice_score
from training.evaluate_sketch2medi import evaluate_refinement
from training.losses import SimilarityLoss

SPACES = ("w", "w+")


class Inversion(NamedTuple):
    ws: Tensor  # (N, w_dim) for "w", (N, num_ws, w_dim) for "w+"
    images: Tensor  # (N, 3, R, R) in [-1, 1]: G(w*)
    first_loss: float  # mean L_sim over the images at the mean w
    last_loss: float  # the same at w*


def w_spread(G: Generator, samples: int = 4096, seed: int = 0) -> Tensor:
    """Per-dimension standard deviation of mapping(z) (w_dim,): the scale Adam's steps are taken in,
    so one learning rate suits any G (W's scale depends on the mapping's training)."""
    generator = torch.Generator(device=G.w_avg.device).manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(samples, G.config.z_dim, device=G.w_avg.device, generator=generator)
        return G.mapping(z).std(dim=0).clamp_min(1e-8)


def invert(G: Generator, C: FeatureNetwork, images: Tensor, steps: int = 300, lr: float = 0.1, space: str = "w",
           on_step: Callable[[int, float], None] | None = None) -> Inversion:
    """Invert real images (N, 3, R, R) in [-1, 1] into G's latent space (see the module docstring).

    The code is w = w_avg + spread * u, u starting at 0 (the mean image); Adam on u at `lr`, cosine-
    decayed to 0 over `steps` after a 5 % warm-up. G and C stay frozen. `on_step(step, mean loss)`.
    """
    if space not in SPACES:
        raise InputError(f"unknown latent space {space!r}; use one of {', '.join(SPACES)}")
    if steps < 1:
        raise InputError(f"steps {steps}: must be at least 1")
    size = G.config.resolution
    assert images.ndim == 4 and images.shape[1:] == (3, size, size), f"expected (N, 3, {size}, {size}) images, got {tuple(images.shape)}"
    device = G.w_avg.device
    real = images.to(device)
    similarity = SimilarityLoss(C)
    reference = similarity.reference(real)
    spread = w_spread(G)
    shape = (len(real), G.config.w_dim) if space == "w" else (len(real), G.num_ws, G.config.w_dim)
    u = torch.zeros(shape, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([u], lr=lr)
    warmup = max(1, steps // 20)

    def codes() -> Tensor:
        return G.w_avg + spread * u

    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        # StyleGAN2's fused form, with which the ceilings in docs/RESULTS.md were measured (the optimisation
        # follows float rounding). The loss is the mean over images of each one's L_sim.
        loss = similarity(real, G(codes(), fused_modconv=True), reference)["total"]
        if step == 0:
            first = loss.item()
        optimiser.zero_grad(set_to_none=True)
        # Each image's code gets only its own loss's gradient (G and C treat images independently),
        # scaled by 1/N; the sum removes that scale.
        (loss * len(real)).backward()
        optimiser.step()
        if on_step is not None:
            on_step(step + 1, loss.item())
    with torch.no_grad():
        ws = codes().detach()
        fakes = G(ws)
        last = float(similarity(real, fakes, reference)["total"])
    return Inversion(ws, fakes, first, last)


def ceiling(models: SystemModels, dataset: ImageDataset, indices: list[int], steps: int, space: str, batch: int = 25,
            log: Callable[[str], None] = print) -> dict:
    """DICE(S(G(w*)), S(x)) (percent) and FD_C(C(G(w*)), C(x)) of the inverted images."""
    G, S, C, R = models.sketch2medi.G, models.S, models.C, models.resolution
    dice, fakes, reals, first, last = [], [], [], [], []
    for start in range(0, len(indices), batch):
        chunk = indices[start : start + batch]
        pixels = np.stack([square_resize(dataset.image(i), R) for i in chunk])
        real = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        result = invert(G, C, real, steps, space=space,
                        on_step=lambda step, loss: log(f"{space} images {start}-{start + len(chunk) - 1}: step {step}, L_sim {loss:.4f}")
                        if step % 10 == 0 or step == steps else None)
        generated = tensor_to_images(result.images)
        for i, image in zip(chunk, generated):
            reference = S.predict_label_map([square_resize(dataset.image(i), S.config.size)])[0]
            dice.append(dice_score(S.predict_label_map([image])[0], reference, models.label_classes))
        fakes.append(C.embed_many(result.images))
        reals.append(C.embed_many(real))
        first.append(result.first_loss * len(chunk))
        last.append(result.last_loss * len(chunk))
        log(f"{space}: {len(dice)} of {len(indices)} images inverted, mean DICE so far {np.mean(dice):.1f}")
    row = {"dice": float(np.mean(dice)), "fd_c": fd_c(torch.cat(reals), torch.cat(fakes)),
           "l_sim_start": sum(first) / len(indices), "l_sim_end": sum(last) / len(indices), "images": len(indices)}
    log(f"{space}: {json.dumps(row)}")
    return row


def resolution_floor(models: SystemModels, dataset: ImageDataset, indices: list[int]) -> dict:
    """DICE(S(x at G's resolution), S(x)): what a G reproducing every real image exactly would score,
    since S sees G's images at G's resolution."""
    S, R = models.S, models.resolution
    dice = [dice_score(S.predict_label_map([square_resize(dataset.image(i), R)])[0],
                       S.predict_label_map([square_resize(dataset.image(i), S.config.size)])[0], models.label_classes) for i in indices]
    return {"dice": float(np.mean(dice)), "images": len(indices)}


def refinement_fd_c(models: SystemModels, dataset: ImageDataset, examples: dict) -> dict[str, dict[str, float]]:
    """FD_C of E alone and of every step of H against the same real images, per sketch kind."""
    R = models.resolution
    indices = list(examples)
    reals = models.C.embed_many(torch.from_numpy(np.stack([square_resize(dataset.image(i), R) for i in indices])).permute(0, 3, 1, 2))
    kinds = list(examples[indices[0]]["kinds"])
    report: dict[str, dict[str, float]] = {}
    for k, kind in enumerate(kinds):
        chosen = [i for i in indices if kind in examples[i]["kinds"]]
        for t in range(len(examples[indices[0]]["steps"])):
            images = np.stack([examples[i]["steps"][t][list(examples[i]["kinds"]).index(kind)] for i in chosen])
            fakes = models.C.embed_many(torch.from_numpy(images).permute(0, 3, 1, 2))
            report.setdefault(kind, {})[f"step {t}"] = fd_c(reals[[indices.index(i) for i in chosen]], fakes)
    return report


def markdown_table(report: dict) -> str:
    """Ceilings, then E alone and E + H per step: DICE / FD_C."""
    steps = report["refinement"]["steps"]
    header = ["sketch / method", "E alone (step 0)", *[f"step {t}" for t in range(1, steps + 1)]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind, by_step in report["refinement"]["dice"].items():
        cells = [f"{by_step[f'step {t}']:.1f} / {report['refinement']['fd_c'][kind][f'step {t}']:.3f}" for t in range(steps + 1)]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append(f"| the real image at {report['resolution']} px (a perfect G) | {report['real_at_resolution']['dice']:.1f} / 0 |" + " |" * steps)
    for space, row in report["ceiling"].items():
        lines.append(f"| inversion into {space.upper()} ({report['inversion_steps']} steps) | {row['dice']:.1f} / {row['fd_c']:.3f} |"
                     + " |" * steps)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images of the split")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of the inversion")
    parser.add_argument("--space", default="w,w+", help="comma-separated: w (one code, as E outputs), w+ (one per layer)")
    parser.add_argument("--batch", type=int, default=25, help="images inverted at once")
    parser.add_argument("--no-refinement", action="store_true", help="only the ceiling (skip E alone and E + H)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    try:
        spaces = [s.strip() for s in args.space.split(",") if s.strip()]
        unknown = [s for s in spaces if s not in SPACES]
        if not spaces or unknown:
            raise InputError(f"--space {args.space!r}: use w, w+ or both (w,w+)")
        set_threads(args.threads)
        models = SystemModels(args.bundle, args.device)
        dataset = ImageDataset(args.data, args.split)
        indices = list(range(len(dataset)))[: args.limit]
        report = {"bundle": str(args.bundle), "data": str(args.data), "split": args.split, "images": len(indices), "resolution": models.resolution,
                  "inversion_steps": args.steps, "refinement": None, "real_at_resolution": resolution_floor(models, dataset, indices),
                  "ceiling": {space: ceiling(models, dataset, indices, args.steps, space, args.batch) for space in spaces}}
        if not args.no_refinement:
            refinement, examples = evaluate_refinement(args.bundle, args.data, args.split, limit=args.limit, device=args.device, models=models)
            report["refinement"] = refinement | {"fd_c": refinement_fd_c(models, dataset, examples)}
    except InputError as error:
        raise SystemExit(f"error: {error}")
    print(json.dumps(report, indent=1))
    print(f"real images at {models.resolution} px: DICE {report['real_at_resolution']['dice']:.1f}")
    if report["refinement"] is not None:
        print(markdown_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
