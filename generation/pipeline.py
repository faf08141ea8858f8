"""Sketch2MedI at inference: sketch -> E -> w -> G -> x_0 -> H, G (T times) -> x_T.

    model = Sketch2MedI.from_bundle("bundles/phantom")
    result = model.generate(sketches)          # uint8 canonical sketches (N, R, R)
    result.w, result.images, result.steps      # (N, w_dim), x_T (N, 3, R, R), [x_0, ..., x_T]

S is not used on the query sketch (the paper's test-time path); the sketch must already be in the
canonical form at the model's resolution (`generation.normalize.normalize_sketch(image, R)`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from generation.device import pick_device
from generation.encoder import SketchEncoder
from generation.errors import InputError
from generation.refiner import Refiner, refine
from generation.registry import load_network, network_exists
from generation.sketch import sketch_to_tensor
from generation.stylegan2 import Generator


class Generation(NamedTuple):
    w: Tensor  # (N, w_dim) codes from E
    images: Tensor  # (N, 3, R, R) float in [-1, 1]: the final image x_T
    steps: list[Tensor]  # [x_0 (E alone), x_1, ..., x_T], each (N, 3, R, R)


class Sketch2MedI:
    def __init__(self, G: Generator, E: SketchEncoder, H: Refiner | None = None, bundle: Path | None = None):
        if E.config.resolution != G.config.resolution or E.config.w_dim != G.config.w_dim:
            raise InputError("E and G of this bundle do not fit together (resolution or w size differ); retrain E")
        self.G, self.E, self.H, self.bundle = G.eval(), E.eval(), H.eval() if H is not None else None, bundle
        self.default_steps = H.config.steps if H is not None else 0

    @classmethod
    def from_bundle(cls, bundle: str | Path, device: str | torch.device = "auto") -> Sketch2MedI:
        bundle = Path(bundle)
        if not bundle.is_dir():
            raise InputError(f"{bundle}: no such bundle folder; pass --bundle with a folder made by `train all`")
        device = pick_device(device) if isinstance(device, str) else device
        for name in ("generator", "encoder"):  # refuse before loading anything
            if not network_exists(bundle, name):
                raise InputError(f"{bundle}: has no {name}.safetensors; train it with `train {name}` (or `train all`)")
        H = load_network("refiner", bundle, device) if network_exists(bundle, "refiner") else None
        return cls(load_network("generator", bundle, device), load_network("encoder", bundle, device), H, bundle)

    @property
    def resolution(self) -> int:
        return self.G.config.resolution

    @property
    def device(self) -> torch.device:
        return self.G.w_avg.device

    @torch.no_grad()
    def generate(self, sketches: np.ndarray | Tensor, steps: int | None = None, batch_size: int = 16,
                 on_stage: Callable[[str], None] | None = None) -> Generation:
        """Images for canonical uint8 sketches (N, R, R) or one (R, R); `steps` refinement steps
        (default: the T that H was trained with; 0 = E alone). `on_stage(name)` is called per batch
        as soon as each stage is done: "E" (the codes w), "G" (x_0), then "H1" ... "HT" (x_t);
        search times the stages with it."""
        steps = self.default_steps if steps is None else steps
        if steps < 0:
            raise InputError(f"steps {steps}: must be 0 or more")
        if steps and self.H is None:
            raise InputError(f"{self.bundle}: this bundle has no refiner H; pass --steps 0 or train H (`train refiner`)")
        sketches = sketch_to_tensor(sketches)
        size = self.resolution
        if sketches.shape[-2:] != (size, size):
            raise InputError(f"sketches are {sketches.shape[-1]} px but this bundle works at {size} px; normalise them to {size} px first")
        done = on_stage or (lambda stage: None)
        ws, steps_out = [], []
        for chunk in sketches.split(batch_size):
            chunk = chunk.to(self.device)
            w = self.E(chunk)
            done("E")
            images = refine(self.G, self.H, chunk, w, steps, on_image=lambda t: done(f"H{t}" if t else "G"))
            ws.append(w.cpu())
            steps_out.append([image.cpu() for image in images])
        per_step = [torch.cat([chunk[t] for chunk in steps_out]) for t in range(steps + 1)]
        return Generation(torch.cat(ws), per_step[-1], per_step)
