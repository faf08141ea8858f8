"""The networks of a bundle that indexing, search and evaluation use, loaded once."""

from __future__ import annotations

import contextlib
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from generation.bundle import bundle_id_of, default_bundle, network_entries
from generation.device import autocast, check_precision, pick_device
from generation.errors import InputError
from generation.moco import FeatureNetwork
from generation.pipeline import Sketch2MedI
from generation.registry import load_network, network_exists
from generation.sketch import sketch_to_tensor
from generation.solov2 import SOLOv2
from retrieval.quality import Calibration, load_calibration


class SystemModels:
    """Every network of a bundle: the Sketch2MedI pipeline (G, E, H), S and C, and the bundle's
    match-quality calibration when it has one (`retrieval.quality`).

    `precision` is that of S and C on archive images (`retrieval.vector.archive_parts`, what
    indexing computes): float32, or bfloat16 where the device has it natively
    (`generation.device.bfloat16_supported`): faster, and the few instances whose score sits at
    S's threshold can appear or go (docs/BENCHMARKS.md, indexing). E stays float32: it is cheap.
    """

    def __init__(self, bundle: str | Path | None = None, device: str | torch.device = "auto", precision: str = "float32"):
        self.bundle = Path(bundle) if bundle is not None else default_bundle()
        self.device = pick_device(device) if isinstance(device, str) else device
        check_precision(precision, self.device)
        self.precision = precision
        self.sketch2medi = Sketch2MedI.from_bundle(self.bundle, self.device)
        for name in ("synthesizer", "moco"):  # refuse before loading either
            if not network_exists(self.bundle, name):
                raise InputError(f"{self.bundle}: has no {name}.safetensors; train it with `train {name}` (or `train all`)")
        # Channels-last: the convolutions' fastest layout on CPUs (docs/BENCHMARKS.md, indexing).
        self.S: SOLOv2 = load_network("synthesizer", self.bundle, self.device).to(memory_format=torch.channels_last)
        self.C: FeatureNetwork = load_network("moco", self.bundle, self.device).to(memory_format=torch.channels_last)
        self.bundle_id = bundle_id_of(network_entries(self.bundle))
        self.archive_batch: int | None = None  # the batch size S and C are compiled for (`compile_archive`)

    def compile(self) -> None:
        """Compile the networks a search runs (E, G, H, C's trunk, S) with `torch.compile`, in
        place. Results equal the uncompiled ones up to float rounding. The first call at each batch
        size compiles (tens of seconds on a CPU; later processes reuse inductor's on-disk cache), so
        a server searching one at a time uses it (`serve --compile`), not one-off searches."""
        pipeline = self.sketch2medi
        for network in (pipeline.E, pipeline.G, pipeline.H, self.C.encoder.backbone, self.S):
            if network is not None:
                network.compile()

    def compile_archive(self, batch_size: int) -> None:
        """Compile S and C's trunk, what indexing runs on every archive image, with `torch.compile`
        for batches of `batch_size` (`retrieval.vector.archive_parts` pads to it). Their results
        equal the uncompiled ones up to float rounding, so an instance whose score sits at S's
        threshold can appear or go. Compiling takes about a minute on 2 CPU cores the first time
        and seconds afterwards (inductor's on-disk cache), so it pays on large archives."""
        self.S.compile()
        self.C.encoder.backbone.compile()
        self.archive_batch = batch_size

    def archive_autocast(self) -> contextlib.AbstractContextManager:
        """The autocast `archive_parts` runs its networks under (`precision`)."""
        return autocast(self.device, self.precision)

    @cached_property
    def calibration(self) -> Calibration | None:
        """BUNDLE/calibration.json, read when first asked for (by search, not by indexing); None
        when the bundle has none."""
        return load_calibration(self.bundle, self.bundle_id)

    @cached_property
    def domain(self):
        """The sketch-domain classifier (`generation.domain`), read when first asked for; None when
        the bundle has none."""
        return load_network("domain", self.bundle, self.device) if network_exists(self.bundle, "domain") else None

    @torch.no_grad()
    def domain_logits(self, sketches: np.ndarray) -> np.ndarray | None:
        """Canonical uint8 sketches (N, R, R) -> float (N,) logits, > 0 for the archive's anatomy;
        None without a classifier."""
        if self.domain is None:
            return None
        return self.domain(sketch_to_tensor(sketches).to(self.device)).float().cpu().numpy()

    @property
    def resolution(self) -> int:
        return self.sketch2medi.resolution

    @property
    def label_classes(self) -> int:
        """Classes in S's label maps, background included: every mask DICE compares comes from S."""
        return self.S.config.num_classes + 1

    @property
    def code_mean(self) -> torch.Tensor:
        return self.sketch2medi.E.code_mean
