"""Training speed of the unpaired baselines (CycleGAN, UNIT, U-GAT-IT) at a preset, one process:
seconds per full training step (D and G updates) and images/s, and the steps that fit a budget.

    nice -n 10 python bench/bench_baselines.py --preset cpu --threads 1 --steps 4 --out baselines.json

The data are random uint8 images and sparse random sketches at the preset's resolution (speed does
not depend on content). One warm-up step is not timed. `fits_minutes` divides `--budget-minutes`
by the mean step time: what a run of that many minutes can do on this machine, at this load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import add_common_arguments, describe, finish, measure_peak, set_threads  # noqa: E402
from generation.registry import network_config  # noqa: E402

MODELS = ("cyclegan", "unit", "ugatit")


def time_model(name: str, args: argparse.Namespace, images: np.ndarray, sketches: np.ndarray) -> dict:
    import importlib

    trainer_module = importlib.import_module(f"training.train_{name}")
    trainer_type = {"cyclegan": "CycleGANTrainer", "unit": "UNITTrainer", "ugatit": "UGATITTrainer"}[name]
    trainer = getattr(trainer_module, trainer_type)(network_config(name, args.preset), trainer_module.OPTIONS(batch=args.batch),
                                                    images, sketches)
    trainer.step()  # warm-up
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.step()
        seconds.append(time.perf_counter() - start)
    mean = statistics.mean(seconds)
    return {"model": name, "config": str(trainer.config), "s_per_step": round(mean, 3), "images_per_s": round(args.batch / mean, 2),
            "steps_in_budget": int(args.budget_minutes * 60 / mean), "default_steps": trainer_module.OPTIONS().steps}


def run(args: argparse.Namespace) -> dict:
    set_threads(args.threads)
    resolution = network_config("cyclegan", args.preset).resolution
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, resolution, resolution, 3), dtype=np.uint8)
    sketches = np.where(rng.random((32, resolution, resolution)) < 0.05, 0, 255).astype(np.uint8)
    return {"benchmark": "baselines", "config": {k: v for k, v in vars(args).items() if k != "out"},
            "machine": describe(args.threads), "peak": measure_peak(args.threads, args.matmul_size, args.copy_mb),
            "results": [time_model(name, args, images, sketches) for name in args.models.split(",")]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model")
    parser.add_argument("--budget-minutes", type=float, default=40.0)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    return finish("bench/bench_baselines.py", argv, args, run(args))


if __name__ == "__main__":
    main()
