"""StyleGAN2 G and D: shapes, equalised lr, demodulation, weight deltas, truncation, training."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from generation.checkpoints import load_checkpoint
from generation.errors import InputError
from generation.registry import load_network, network_config, save_network
from generation.stylegan2 import (
    Discriminator,
    EqualConv2d,
    EqualLinear,
    FactoredDelta,
    Generator,
    ModulatedConv2d,
    StyleGAN2Config,
    blur,
    upsample2x,
)
from training.diffaugment import diff_augment, random_xflip, translation
from training.train_generator import GANTrainer, TrainOptions, generate, lazy_adam, train_generator

REPO = Path(__file__).resolve().parents[1]
TINY = network_config("generator", "tiny")


@pytest.fixture
def one_thread():
    """Small models run fastest (and reproducibly) on one thread, also on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded_generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(TINY)


def two_modes(size: int = 32) -> torch.Tensor:
    """Toy data: left half bright / right half dark, and its negative. Their mean image is flat grey."""
    a = torch.full((3, size, size), -0.8)
    a[:, :, : size // 2] = 0.8
    return torch.stack([a, -a])


def write_toy_dataset(root: Path, count: int = 16) -> Path:
    (root / "images").mkdir(parents=True)
    for i, mode in enumerate(two_modes().repeat(count // 2, 1, 1, 1)):
        pixels = ((mode + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------------------------------------
# Architecture


def test_shapes_and_layer_table():
    G, D = seeded_generator(), Discriminator(TINY)
    z = torch.randn(4, TINY.z_dim)
    w = G.mapping(z)
    assert w.shape == (4, TINY.w_dim) and G.num_ws == 8 and G.w_avg.shape == (TINY.w_dim,)
    image = G(w)
    assert image.shape == (4, 3, 32, 32)
    assert torch.equal(image, G(w[:, None].repeat(1, G.num_ws, 1)))  # (N, w_dim) = same w for every layer
    assert D(image).shape == (4,)
    layers = G.conv_layers()
    assert list(layers) == ["b4.conv1", "b4.torgb", "b8.conv0", "b8.conv1", "b8.torgb", "b16.conv0", "b16.conv1",
                            "b16.torgb", "b32.conv0", "b32.conv1", "b32.torgb"]
    assert [n for n, info in layers.items() if info.is_torgb] == ["b4.torgb", "b8.torgb", "b16.torgb", "b32.torgb"]
    assert layers["b32.conv0"].shape == (16, 32, 3, 3) and layers["b32.torgb"].shape == (3, 16, 1, 1)
    assert [info.w_index for info in layers.values()] == [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7]
    with pytest.raises(AssertionError):
        G(torch.randn(4, 5, TINY.w_dim))

    paper = network_config("generator", "paper")
    assert paper.num_ws == 14 and [paper.channels(2**i) for i in range(2, 9)] == [512] * 5 + [256, 128]
    with pytest.raises(InputError):
        StyleGAN2Config(resolution=48)


def test_equalised_lr_scales_weights_at_runtime():
    torch.manual_seed(0)
    linear = EqualLinear(64, 8, bias_init=0.5, lr_mul=0.01, activation=False)
    assert linear.weight.std().item() == pytest.approx(100, rel=0.1)  # stored N(0, 1) / lr_mul
    x = torch.randn(5, 64)
    expected = F.linear(x, linear.weight * (1 / math.sqrt(64)) * 0.01, linear.bias * 0.01)
    assert torch.allclose(linear(x), expected)
    assert torch.allclose(linear.bias * 0.01, torch.full((8,), 0.5))  # effective bias = bias_init

    conv = EqualConv2d(6, 4, 3)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 6, 8, 8)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight / math.sqrt(6 * 9), conv.bias, padding=1), atol=1e-6)
    assert ModulatedConv2d(6, 4, 3, w_dim=8).weight_gain == pytest.approx(1 / math.sqrt(54))


def test_demodulation_gives_unit_variance_outputs():
    torch.manual_seed(0)
    conv = ModulatedConv2d(64, 32, 3, w_dim=16)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(32, 1, 1, 1) * 5)  # very different per-channel scales before demod
    x, w = torch.randn(4, 64, 34, 34), torch.randn(4, 16) * 3
    for fused in (False, True):
        out = conv(x, w, fused=fused)[:, :, 1:-1, 1:-1]  # away from the zero padding
        variance = out.var(dim=(2, 3))
        assert ((variance > 0.8) & (variance < 1.2)).all(), variance
    assert torch.allclose(conv(x, w, fused=False), conv(x, w, fused=True), atol=1e-4)
    assert torch.allclose(conv(x, w, delta=torch.zeros(4, 32, 64, 3, 3)), conv(x, w, fused=True), atol=1e-4)
    conv.demodulate = False  # control: without demodulation the variances are far from 1
    variance = conv(x, w)[:, :, 1:-1, 1:-1].var(dim=(2, 3))
    assert not ((variance > 0.8) & (variance < 1.2)).all()


def test_resampling_filters():
    x = torch.randn(2, 5, 8, 8)
    up = upsample2x(x)
    assert up.shape == (2, 5, 16, 16)
    # reference: zero insertion, pad (2, 1), the 4x4 filter with gain 4 on every channel
    zeros = torch.zeros(2, 5, 8, 2, 8, 2)
    zeros[:, :, :, 0, :, 0] = x
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = (torch.outer(taps, taps) / 16).expand(5, 1, 4, 4)
    reference = F.conv2d(F.pad(zeros.reshape(2, 5, 16, 16), (2, 1, 2, 1)), kernel, groups=5)
    assert torch.allclose(up, reference, atol=1e-6)
    assert torch.allclose(blur(torch.ones(1, 2, 8, 8), padding=1)[:, :, 1:-1, 1:-1], torch.ones(1, 2, 5, 5))
    assert EqualConv2d(5, 3, 3, down=True)(x).shape == (2, 3, 4, 4) == EqualConv2d(5, 3, 1, down=True)(x).shape


# ------------------------------------------------------------------------------------------------
# Weight deltas (the refiner's interface) and truncation


def zero_deltas(G: Generator, batch: int, full: bool = True) -> dict[str, torch.Tensor]:
    return {name: torch.zeros(batch, *(info.shape if full else info.shape[:2]), *(() if full else (1, 1)))
            for name, info in G.conv_layers().items()}


@pytest.mark.parametrize("up, demodulate", [(False, True), (True, True), (False, False)])
def test_per_sample_offsets_give_the_kernels_theta_times_one_plus_delta(up, demodulate):
    torch.manual_seed(1)
    conv = ModulatedConv2d(6, 5, 3 if demodulate else 1, w_dim=8, demodulate=demodulate, up=up)
    x, w = torch.randn(3, 6, 8, 8), torch.randn(3, 8)
    delta = 0.3 * torch.randn(3, *conv.weight.shape)
    out = conv(x, w, delta=delta)
    for n in range(3):  # each sample through a plain layer whose weight is theta (1 + delta_n)
        plain = ModulatedConv2d(6, 5, conv.weight.shape[-1], w_dim=8, demodulate=demodulate, up=up)
        plain.load_state_dict(conv.state_dict())
        with torch.no_grad():
            plain.weight.mul_(1 + delta[n])
        assert torch.allclose(out[n : n + 1], plain(x[n : n + 1], w[n : n + 1], fused=True), atol=1e-5)


def test_zero_deltas_reproduce_the_output_up_to_rounding():
    G = seeded_generator().eval()
    ws = G.sample_ws(3, mixing=0.5)
    reference = G(ws)
    assert torch.allclose(G(ws, weight_deltas=zero_deltas(G, 3)), reference, atol=1e-5)
    assert torch.equal(G(ws, weight_deltas=zero_deltas(G, 3, full=False)), G(ws, weight_deltas=zero_deltas(G, 3)))  # (N, out, in, 1, 1)
    assert torch.allclose(G(ws, fused_modconv=True), reference, atol=1e-5)  # StyleGAN2's fused form
    G.train()
    assert torch.allclose(G(ws, weight_deltas=zero_deltas(G, 3)), G(ws), atol=1e-5)


def test_a_delta_acts_only_through_its_layer_and_sample():
    G = seeded_generator().eval()
    outputs: dict[str, torch.Tensor] = {}
    for block in G.blocks.values():
        for layer in ("conv0", "conv1", "torgb"):
            if hasattr(block, layer):
                name = f"{block.name}.{layer}"
                getattr(block, layer).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    ws = G.sample_ws(2)
    info = G.conv_layers()["b16.conv1"]
    G(ws, weight_deltas={"b16.conv1": torch.zeros(2, *info.shape)})  # the same paths, so that untouched samples are reproduced exactly
    before = dict(outputs)
    delta = torch.zeros(2, *info.shape)
    delta[0] = 0.5 * torch.randn(info.shape)  # sample 0 only
    image = G(ws, weight_deltas={"b16.conv1": delta})
    order = list(G.conv_layers())
    for name in order[: order.index("b16.conv1")]:
        assert torch.equal(outputs[name], before[name]), name
    for name in order[order.index("b16.conv1"):]:
        assert not torch.allclose(outputs[name][0], before[name][0]), name
        assert torch.equal(outputs[name][1], before[name][1]), name
    assert not torch.allclose(image[0], G(ws)[0])

    # broadcastable shapes mean the same as the explicit full kernel
    per_channel = torch.randn(2, *info.shape[:2], 1, 1) * 0.3
    assert torch.allclose(G(ws, weight_deltas={"b16.conv1": per_channel}),
                          G(ws, weight_deltas={"b16.conv1": per_channel.expand(2, *info.shape)}), atol=1e-6)
    assert not torch.equal(G(ws, weight_deltas={"b16.torgb": torch.full((2, 3, 1, 1, 1), 0.5)}), G(ws))
    with pytest.raises(KeyError):
        G(ws, weight_deltas={"b16.conv9": delta})
    with pytest.raises((RuntimeError, AssertionError)):
        G(ws, weight_deltas={"b32.conv1": delta})  # (32, 32, 3, 3) delta for a (16, 16, 3, 3) layer


def test_a_factored_delta_acts_as_its_full_kernels_and_sums_by_coefficients():
    G = seeded_generator().eval()
    ws = G.sample_ws(3).detach()
    torch.manual_seed(1)
    deltas = {}
    for name in ("b8.conv0", "b16.conv1"):  # an upsampling layer and a plain one
        out, inp, k, _ = G.conv_layers()[name].shape
        basis = torch.randn(4, inp * k * k) * 0.1
        deltas[name] = [FactoredDelta(torch.randn(3, out, 4), basis, (inp, k, k)) for _ in range(2)]
    with torch.no_grad():
        summed = {name: a + b for name, (a, b) in deltas.items()}
        assert all(isinstance(d, FactoredDelta) for d in summed.values())  # one basis: the coefficients add
        dense = {name: a.dense() + b.dense() for name, (a, b) in deltas.items()}
        assert torch.allclose(summed["b8.conv0"].dense(), dense["b8.conv0"], atol=1e-6)
        image = G(ws, weight_deltas=summed)  # made and convolved sample by sample
        assert torch.allclose(image, G(ws, weight_deltas=dense), atol=1e-5)
        assert not torch.allclose(image, G(ws), atol=1e-3)
        alone = G(ws[1:2], weight_deltas={n: FactoredDelta(d.coefficients[1:2], d.basis, d.kernel) for n, d in summed.items()})
        assert torch.allclose(alone, image[1:2], atol=1e-5)
    # With gradients they add as full kernels, and the gradient reaches the basis as through dense offsets.
    basis = deltas["b16.conv1"][0].basis.clone().requires_grad_(True)
    a, b = (FactoredDelta(d.coefficients, basis, d.kernel) for d in deltas["b16.conv1"])
    total = a.detach() + b
    assert isinstance(total, torch.Tensor) and torch.allclose(total, a.dense() + b.dense(), atol=1e-6)
    G(ws, weight_deltas={"b16.conv1": total}).square().mean().backward()
    factored_grad, basis.grad = basis.grad, None
    G(ws, weight_deltas={"b16.conv1": a.dense().detach() + b.dense()}).square().mean().backward()
    assert torch.allclose(factored_grad, basis.grad, atol=1e-6)


def test_truncation_psi_zero_gives_w_avg_and_mixing_switches_styles():
    G = seeded_generator().eval()
    with torch.no_grad():
        G.mapping.w_avg.copy_(torch.randn(TINY.w_dim))
    z = torch.randn(4, TINY.z_dim)
    assert torch.allclose(G.mapping(z, truncation=0.0), G.w_avg.expand(4, -1))
    ws = G.sample_ws(4)
    assert torch.allclose(G(ws, truncation=0.0), G(G.w_avg.expand(4, -1)), atol=1e-6)
    G.mapping(z, update_w_avg=True)
    assert not torch.allclose(G.mapping(z, truncation=0.0), torch.zeros(4, TINY.w_dim))

    mixed = G.sample_ws(64, mixing=1.0)  # every sample switches once, at layer 1..num_ws-1
    switches = (mixed[:, 1:] != mixed[:, :-1]).any(dim=2).sum(dim=1)
    assert (switches == 1).all()
    plain = G.sample_ws(8)
    assert (plain == plain[:, :1]).all()


def test_diffaugment_is_differentiable_and_keeps_shapes():
    x = (torch.rand(4, 3, 32, 32) * 2 - 1).requires_grad_(True)
    rng = torch.Generator().manual_seed(0)
    y = diff_augment(x, generator=rng)
    assert y.shape == x.shape and not torch.equal(y, x)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    dot = torch.zeros(8, 1, 32, 32)
    dot[:, :, 16, 16] = 1
    moved = translation(dot, generator=rng)
    positions = moved.flatten(1).argmax(dim=1)
    rows, cols = positions // 32, positions % 32
    assert ((rows - 16).abs() <= 4).all() and ((cols - 16).abs() <= 4).all() and moved.sum() == 8
    flipped = random_xflip(x.detach(), rng)
    mirrored = [torch.equal(f, a.flip(2)) for f, a in zip(flipped, x.detach())]
    assert all(m or torch.equal(f, a) for m, f, a in zip(mirrored, flipped, x.detach()))
    with pytest.raises(InputError):
        diff_augment(x, "colour")


def test_lazy_regularisation_settings():
    assert TrainOptions(batch=16).r1_gamma(64) == pytest.approx(0.0002 * 64**2 / 16)
    assert TrainOptions(batch=16, gamma=10.0).r1_gamma(64) == 10.0
    group = lazy_adam([torch.nn.Parameter(torch.zeros(1))], 0.0025, 16).param_groups[0]
    assert group["lr"] == pytest.approx(0.0025 * 16 / 17) and group["betas"][1] == pytest.approx(0.99 ** (16 / 17))


# ------------------------------------------------------------------------------------------------
# Training


def nearest_mode_distance(G: Generator) -> float:
    """Mean squared distance of G's samples to the nearer of the two toy modes."""
    images = generate(G, 64, seed=123, noise_mode="random")
    distance = (images[:, None] - two_modes()[None]).square().mean(dim=(2, 3, 4))
    return distance.min(dim=1).values.mean().item()


def test_gan_training_moves_samples_onto_the_data(one_thread):
    modes = two_modes()
    reals = ((modes.repeat(8, 1, 1, 1) + 1) * 127.5).round().to(torch.uint8)
    options = TrainOptions(batch=8, augment="", pl_weight=0.0, mixing=0.0, ema_kimg=0.001, ema_rampup=None)
    trainer = GANTrainer(TINY, options, reals)
    start = nearest_mode_distance(trainer.G)
    for _ in range(60):
        trainer.step()
    end = nearest_mode_distance(trainer.G)
    # The grey mean of the two modes is 0.64 away from either: ending below it means G draws
    # mode-like images, not noise (start ~1.5) and not the average.
    average = (modes.mean(dim=0) - modes[0]).square().mean().item()
    assert end < 0.5 * start and end < average, (start, end, average)


def test_checkpoint_resume_restores_progress_and_repeats_the_run(tmp_path, one_thread):
    data = write_toy_dataset(tmp_path / "toy")
    options = dict(batch=8, snap_kimg=0.016, augment="color,translation,cutout")
    quiet = lambda message: None  # noqa: E731
    straight = train_generator(data, tmp_path / "a", TINY, TrainOptions(kimg=0.048, **options), log=quiet)
    assert straight.steps == 6 and not straight.stopped_early

    train_generator(data, tmp_path / "b", TINY, TrainOptions(kimg=0.032, **options), log=quiet)
    states, meta = load_checkpoint(tmp_path / "b", "generator_checkpoint")
    assert meta["nimg"] == 32 and meta["step"] == 4
    with pytest.raises(InputError):  # never overwrite a run by accident
        train_generator(data, tmp_path / "b", TINY, TrainOptions(kimg=0.048, **options), log=quiet)

    reals = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    trainer = GANTrainer(TINY, TrainOptions(**options), reals)
    trainer.load(tmp_path / "b")
    assert trainer.kimg == pytest.approx(0.032) and trainer.step_count == 4
    for key, module in (("G", trainer.G), ("D", trainer.D), ("G_ema", trainer.G_ema)):
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, states[key][name]), (key, name)
    assert trainer.G_opt.state_dict()["state"][0]["exp_avg"].abs().sum() > 0

    resumed = train_generator(data, tmp_path / "b", TINY, TrainOptions(kimg=0.048, **options), resume=True, log=quiet)
    assert resumed.steps == 6
    a, b = load_network("generator", tmp_path / "a"), load_network("generator", tmp_path / "b")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    summary = json.loads((tmp_path / "a" / "generator.json").read_text())
    assert summary["config"]["resolution"] == 32 and summary["training"]["kimg"] == pytest.approx(0.048)
    assert len((tmp_path / "a" / "generator_metrics.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "a" / "samples" / "reals.png").is_file()


def test_a_run_continues_an_exported_G_and_D_and_counts_their_kimg(tmp_path, one_thread):
    data = write_toy_dataset(tmp_path / "toy")
    options = dict(batch=8, snap_kimg=0.016, augment="")
    quiet = lambda message: None  # noqa: E731
    train_generator(data, tmp_path / "first", TINY, TrainOptions(kimg=0.032, **options), log=quiet)
    first_G, first_D = load_network("generator", tmp_path / "first"), load_network("discriminator", tmp_path / "first")

    reals = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    trainer = GANTrainer(TINY, TrainOptions(**options), reals)
    assert trainer.continue_from(tmp_path / "first") == "G and D" and trainer.kimg == pytest.approx(0.032)
    for mine, theirs in ((trainer.G, first_G), (trainer.G_ema, first_G), (trainer.D, first_D)):
        for (name, x), y in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(x, y), name

    more = train_generator(data, tmp_path / "second", TINY, TrainOptions(kimg=0.048, **options), init_from=tmp_path / "first", log=quiet)
    assert more.steps == 2 and more.metrics["kimg"] == pytest.approx(0.048)  # 16 more images, not 48
    summary = json.loads((tmp_path / "second" / "generator.json").read_text())["training"]
    assert summary["kimg"] == pytest.approx(0.048) and summary["continued_from"] == str(tmp_path / "first")
    (tmp_path / "first" / "discriminator.safetensors").unlink()
    assert "D starts untrained" in GANTrainer(TINY, TrainOptions(**options), reals).continue_from(tmp_path / "first")
    with pytest.raises(InputError, match="pass the same --preset"):
        GANTrainer(dataclasses.replace(TINY, w_dim=TINY.w_dim * 2), TrainOptions(**options), reals).continue_from(tmp_path / "first")


TORCHRUN = shutil.which("torchrun") or shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
@pytest.mark.slow  # starts two torchrun processes
def test_torchrun_ddp_two_processes(tmp_path):
    data = write_toy_dataset(tmp_path / "toy")
    out = tmp_path / "bundle"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(REPO / "cli.py"), "train", "generator",
               "--data", str(data), "--out", str(out), "--preset", "tiny", "--kimg", "0.032", "--batch", "8",
               "--snap-kimg", "0.016", "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # every snapshot asserted that both ranks hold identical weights; rank 0 wrote the bundle
    G = load_network("generator", out)
    meta = json.loads((out / "generator.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["training"]["steps"] == 4
    assert np.isfinite(G(G.sample_ws(2)).numpy()).all()


def test_fd_c_hook_measures_with_a_c_bundle_and_is_skipped_without(tmp_path, one_thread):
    from training.train_generator import fd_c_hook

    reals = ((two_modes().repeat(4, 1, 1, 1) + 1) * 127.5).round().to(torch.uint8)
    measure, why = fd_c_hook(tmp_path, reals, torch.device("cpu"))
    assert measure is None and "no C bundle" in why
    moco = pytest.importorskip("generation.moco")
    torch.manual_seed(0)
    save_network("moco", moco.MocoEncoder(network_config("moco", "tiny")), tmp_path)
    measure, why = fd_c_hook(tmp_path, reals, torch.device("cpu"), count=8)
    assert measure is not None, why
    value = measure(seeded_generator().eval())
    assert math.isfinite(value) and value >= 0
