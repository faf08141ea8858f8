"""StyleGAN2 training throughput: ours vs rosinality/stylegan2-pytorch, same widths, one process.

    python bench/bench_stylegan2.py --rosinality /tmp/rosinality --preset cpu --threads 2

Images/s of full training iterations: D step, G step, R1 every 16 and path length every 4 iterations
(so `--steps` should be a multiple of 16 for the lazy regularisers to be amortised exactly), G EMA.
Both use batch 16, style mixing 0.9, path-length weight 2 with half batches, no augmentation.

rosinality's code is not part of this repository: export it (e.g. `git archive` of
github.com/rosinality/stylegan2-pytorch) to a folder and pass it with --rosinality or
$ROSINALITY_DIR. Its `op` package compiles CUDA kernels at import; we stub the compiler so that
its own pure-torch CPU fallbacks run, and give its G and D our channel widths by substituting the
two width tables in its model source at load time (its files are not modified).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generation.registry import network_config  # noqa: E402
from generation.stylegan2 import StyleGAN2Config  # noqa: E402
from training.losses import d_logistic_loss, d_r1_loss, g_nonsaturating_loss  # noqa: E402
from training.train_generator import GANTrainer, TrainOptions


def load_rosinality(root: Path, config: StyleGAN2Config) -> types.ModuleType:
    import torch.utils.cpp_extension as cpp_extension

    sys.path.insert(0, str(root))
    compile_extension = cpp_extension.load
    cpp_extension.load = lambda *args, **kwargs: types.SimpleNamespace()  # no CUDA build: CPU fallbacks only
    try:
        import op  # noqa: F401  (rosinality's package; model.py imports from it)
    finally:
        cpp_extension.load = compile_extension
    source = (root / "model.py").read_text()
    source, count = re.subn(r"channels = \{[^}]*\}", "channels = dict(BENCH_CHANNELS)", source)
    assert count == 2, "rosinality's model.py no longer has the two channel tables this benchmark replaces"
    module = types.ModuleType("rosinality_model")
    module.BENCH_CHANNELS = {2**i: config.channels(2**i) for i in range(2, 11)}
    exec(compile(source, str(root / "model.py"), "exec"), module.__dict__)
    return module


class RosinalityLoop:
    """One iteration of rosinality's train.py (without augmentation), on its own G and D."""

    def __init__(self, model: types.ModuleType, config: StyleGAN2Config, options: TrainOptions):
        self.G = model.Generator(config.resolution, config.z_dim, config.mapping_layers, lr_mlp=config.mapping_lr_mul)
        self.D = model.Discriminator(config.resolution)
        self.G_ema = model.Generator(config.resolution, config.z_dim, config.mapping_layers, lr_mlp=config.mapping_lr_mul).eval()
        self.G_ema.load_state_dict(self.G.state_dict())
        g_ratio = options.pl_interval / (options.pl_interval + 1)
        d_ratio = options.r1_interval / (options.r1_interval + 1)
        self.G_opt = torch.optim.Adam(self.G.parameters(), lr=options.lr * g_ratio, betas=(0.0, 0.99**g_ratio))
        self.D_opt = torch.optim.Adam(self.D.parameters(), lr=options.lr * d_ratio, betas=(0.0, 0.99**d_ratio))
        self.config, self.options = config, options
        self.gamma = options.r1_gamma(config.resolution)
        self.mean_path_length = 0.0
        self.step_count = 0

    def noise(self, batch: int) -> list[torch.Tensor]:
        if random.random() < self.options.mixing:
            return list(torch.randn(2, batch, self.config.z_dim).unbind(0))
        return [torch.randn(batch, self.config.z_dim)]

    def step(self, reals: torch.Tensor) -> None:
        G, D, opts, batch = self.G, self.D, self.options, reals.shape[0]
        G.requires_grad_(False)
        D.requires_grad_(True)
        fakes, _ = G(self.noise(batch))
        loss = d_logistic_loss(D(reals), D(fakes))
        D.zero_grad()
        loss.backward()
        self.D_opt.step()
        if self.step_count % opts.r1_interval == 0:
            reals = reals.detach().requires_grad_(True)
            logits = D(reals)
            D.zero_grad()
            (self.gamma / 2 * d_r1_loss(logits, reals) * opts.r1_interval + 0 * logits[0]).backward()
            self.D_opt.step()
        G.requires_grad_(True)
        D.requires_grad_(False)
        fakes, _ = G(self.noise(batch))
        loss = g_nonsaturating_loss(D(fakes))
        G.zero_grad()
        loss.backward()
        self.G_opt.step()
        if self.step_count % opts.pl_interval == 0:
            fakes, latents = G(self.noise(max(1, batch // opts.pl_batch_shrink)), return_latents=True)
            noise = torch.randn_like(fakes) / math.sqrt(fakes.shape[2] * fakes.shape[3])
            (grad,) = torch.autograd.grad((fakes * noise).sum(), latents, create_graph=True)
            lengths = grad.square().sum(2).mean(1).sqrt()
            path_mean = self.mean_path_length + opts.pl_decay * (lengths.mean() - self.mean_path_length)
            penalty = (lengths - path_mean).square().mean()
            self.mean_path_length = path_mean.detach()
            G.zero_grad()
            (opts.pl_weight * opts.pl_interval * penalty + 0 * fakes[0, 0, 0, 0]).backward()
            self.G_opt.step()
        self.step_count += 1
        with torch.no_grad():  # EMA as in its accumulate(), fixed decay
            for p_ema, p in zip(self.G_ema.parameters(), G.parameters()):
                p_ema.mul_(0.999).add_(p, alpha=0.001)


def measure(step, steps: int, batch: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rosinality", type=Path, default=os.environ.get("ROSINALITY_DIR"),
                        help="exported rosinality/stylegan2-pytorch (default: $ROSINALITY_DIR; omit to time ours only)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16, help="timed iterations per repeat (multiple of 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = network_config("generator", args.preset)
    options = TrainOptions(batch=args.batch, augment="", mixing=0.9, pl_weight=2.0)
    reals = torch.randint(0, 256, (256, 3, config.resolution, config.resolution), dtype=torch.uint8)

    torch.manual_seed(0)
    ours = GANTrainer(config, options, reals)
    runners = {"ours": lambda: ours.step()}
    if args.rosinality:
        theirs = RosinalityLoop(load_rosinality(Path(args.rosinality), config), config, options)
        batches = (reals[torch.randint(len(reals), (args.batch,))].float() / 127.5 - 1 for _ in iter(int, 1))
        runners["rosinality"] = lambda: theirs.step(next(batches))
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert (count(ours.G), count(ours.D)) == (count(theirs.G), count(theirs.D)), "architectures differ"
    for run in runners.values():  # warm-up: allocator, oneDNN primitive caches
        run()
    results: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):  # interleaved, so background load hits both alike
        for name, run in runners.items():
            results[name].append(measure(run, args.steps, args.batch))
    print(f"# preset {args.preset} ({config.resolution} px, widths "
          f"{[config.channels(2**i) for i in range(2, config.log2_res + 1)]}), batch {args.batch}, "
          f"{args.threads} threads, torch {torch.__version__}, {args.steps} iterations x {args.repeats} repeats")
    print("| implementation | images/s (median) | images/s (best) |")
    print("|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.2f} | {max(values):.2f} |")


if __name__ == "__main__":
    main()
