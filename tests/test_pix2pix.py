"""pix2pix baseline: U-Net and PatchGAN shapes, skip connections, receptive field, training, bundles,
resume, torchrun, and input checks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from generation.checkpoints import load_checkpoint
from generation.errors import InputError
from generation.images import tensor_to_images
from generation.pix2pix import PatchDiscriminator, Pix2PixConfig, UNetGenerator
from generation.registry import load_network, network_config, save_network
from generation.sketch import sketch_to_tensor
from training.loop import read_metrics
from training.train_pix2pix import (
    CHECKPOINT,
    METRICS,
    Pix2PixOptions,
    Pix2PixTrainer,
    d_loss,
    g_loss,
    gan_loss,
    train_pix2pix,
)

REPO = Path(__file__).resolve().parents[1]
TINY = network_config("pix2pix", "tiny")
QUIET = lambda message: None  # noqa: E731


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def translate(model: UNetGenerator, sketches: np.ndarray) -> np.ndarray:
    """uint8 images (N, R, R, 3) of canonical sketches, in eval mode (no dropout, running statistics)."""
    return tensor_to_images(model.eval()(sketch_to_tensor(sketches)))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_pairs(count: int = 8, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Discs of random place and size: the sketch is the outline (black on white), the image the
    disc in orange on a blue background with a vertical shading, so the image follows from the sketch."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((count, size, size, 3), np.uint8)
    sketches = np.full((count, size, size), 255, np.uint8)
    shade = (yy / size * 60).astype(np.uint8)[..., None]
    for i in range(count):
        radius = rng.integers(size // 8, size // 5 + 1)
        cy, cx = rng.integers(radius + 1, size - radius - 1, 2)
        distance2 = (yy - cy) ** 2 + (xx - cx) ** 2
        disc = distance2 <= radius**2
        sketches[i][disc & (distance2 > (radius - 1) ** 2)] = 0
        images[i] = np.where(disc[..., None], np.array([220, 140, 60], np.uint8), np.array([30, 50, 130], np.uint8)) + shade
    return images, sketches


def narrow(resolution: int, **changes) -> Pix2PixConfig:
    return Pix2PixConfig(resolution=resolution, ngf=4, ndf=4, max_mult=2, **changes)


# ------------------------------------------------------------------------------------------------
# Architecture


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_shapes_at_several_resolutions(resolution):
    config = narrow(resolution)
    G, D = UNetGenerator(config), PatchDiscriminator(config)
    assert [k for k in G.blocks if k.startswith("down")] == [f"down{k}" for k in range(1, config.levels + 1)]
    sketch = torch.rand(2, 1, resolution, resolution)
    image = G(sketch)
    assert image.shape == (2, 3, resolution, resolution) and image.abs().max() <= 1  # tanh
    logits = D(sketch, image)
    assert logits.shape == (2, 1, config.patch_grid, config.patch_grid) == (2, 1, resolution // 8 - 2, resolution // 8 - 2)
    with pytest.raises(AssertionError):
        G(torch.rand(2, 3, resolution, resolution))  # an RGB image is not a sketch
    with pytest.raises(AssertionError):
        D(sketch, image[:, :, :-1])


def test_paper_preset_matches_the_reference_networks():
    paper = network_config("pix2pix", "paper")
    with torch.device("meta"):  # shapes only, no 54M-parameter allocation
        G, D = UNetGenerator(paper), PatchDiscriminator(paper)
    assert paper.levels == 8 and [paper.width(k) for k in range(1, 9)] == [64, 128, 256] + [512] * 5
    assert count_parameters(G) == pytest.approx(54.41e6, rel=1e-3)  # U-Net-256 of the reference code
    assert count_parameters(D) == pytest.approx(2.767e6, rel=1e-3)
    assert D.receptive_field() == 70 and paper.patch_grid == 30
    with torch.device("meta"):  # the cpu preset's size as documented in generation/pix2pix.py
        cpu = network_config("pix2pix", "cpu")
        assert round(count_parameters(UNetGenerator(cpu)) / 1e6, 1) == 7.3
        assert round(count_parameters(PatchDiscriminator(cpu)) / 1e6, 2) == 0.70
    dropouts = [name for name, block in G.blocks.items() if any(isinstance(m, torch.nn.Dropout) for m in block)]
    assert dropouts == ["up8", "up7", "up6"]  # the paper's CD512-CD1024-CD1024
    with pytest.raises(InputError):
        Pix2PixConfig(resolution=48)
    with pytest.raises(InputError):
        Pix2PixConfig(resolution=32, norm="layer")
    with pytest.raises(InputError):
        network_config("pix2pix", "huge")


def test_one_logit_sees_a_70_pixel_patch():
    config = Pix2PixConfig(resolution=256, ndf=4, max_mult=2)
    D = PatchDiscriminator(config).eval()
    sketch = torch.rand(1, 1, 256, 256, requires_grad=True)
    image = torch.rand(1, 3, 256, 256, requires_grad=True)
    logits = D(sketch, image)
    logits[0, 0, 15, 15].backward()
    for grad in (sketch.grad, image.grad):
        rows, cols = grad.abs().sum(dim=(0, 1)).nonzero(as_tuple=True)
        assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70


def test_skip_connections_carry_the_input_past_the_bottleneck():
    torch.manual_seed(0)
    G = UNetGenerator(TINY).eval()
    blank = torch.zeros(1, 1, 32, 32)
    dot = blank.clone()
    dot[0, 0, 16, 16] = 1.0
    with torch.no_grad():
        full = (G(dot) - G(blank)).abs().sum(dim=(0, 1))
        # cut every path except the outermost skip: down2's output (and all below it) becomes zero
        cut = G.blocks["down2"].register_forward_hook(lambda module, inputs, output: torch.zeros_like(output))
        shallow = (G(dot) - G(blank)).abs().sum(dim=(0, 1))
        cut.remove()
    # down1 (4x4, stride 2) then up1 (4x4 transposed, stride 2): the dot reaches pixels 13..18 only
    rows, cols = shallow.nonzero(as_tuple=True)
    assert len(rows) > 0, "no output change without the deep path: the outermost skip is not used"
    assert rows.min() >= 13 and rows.max() <= 18 and cols.min() >= 13 and cols.max() <= 18
    outside = full.clone()
    outside[13:19, 13:19] = 0
    assert outside.sum() > 0  # with the deep path, the dot affects the whole image


def test_sketch_convention():
    sketches = np.full((3, 32, 32), 255, np.uint8)
    sketches[:, 10, :] = 0
    x = sketch_to_tensor(sketches)
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.float32
    assert x[0, 0, 10].eq(1).all() and x[0, 0, 11].eq(0).all()  # ink 1, paper 0
    assert torch.equal(sketch_to_tensor(torch.from_numpy(sketches)), x)

    with pytest.raises(InputError, match="uint8"):
        sketch_to_tensor(sketches.astype(np.float32))
    with pytest.raises(InputError, match="uint8"):
        sketch_to_tensor(np.full((2, 32, 32, 3), 255, np.uint8))


def test_losses():
    zeros = torch.zeros(2, 1, 4, 4)
    assert gan_loss(zeros, True).item() == pytest.approx(np.log(2))
    assert d_loss(zeros, zeros).item() == pytest.approx(np.log(2))  # halved sum of two log 2
    assert gan_loss(torch.ones(2, 1, 4, 4), True, "lsgan").item() == 0.0
    assert gan_loss(zeros, True, "lsgan").item() == 1.0
    fakes, reals = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    total, adversarial, l1 = g_loss(zeros, fakes, reals, lambda_l1=100.0)
    assert l1.item() == pytest.approx(0.5) and total.item() == pytest.approx(adversarial.item() + 50.0)


# ------------------------------------------------------------------------------------------------
# Training


def test_training_brings_the_l1_loss_down():
    images, sketches = toy_pairs()
    # 10x the paper's lr: the tiny problem then converges within 100 steps
    trainer = Pix2PixTrainer(TINY, Pix2PixOptions(steps=100, batch=8, lr=2e-3), images, sketches)
    l1 = [trainer.step()["g_l1"] for _ in range(100)]
    first, last = np.mean(l1[:10]), np.mean(l1[-10:])
    assert last < 0.5 * first, (first, last)
    # G follows the sketch: its images are nearer their own pair's image than another pair's
    generated = translate(trainer.G, sketches) / 127.5 - 1
    reals = images / 127.5 - 1
    own, other = np.abs(generated - reals).mean(), np.abs(generated - np.roll(reals, 1, axis=0)).mean()
    assert own < 0.75 * other, (own, other)


def test_lsgan_and_instance_norm_train_too():
    images, sketches = toy_pairs(4)
    config = Pix2PixConfig(resolution=32, ngf=8, ndf=8, max_mult=4, norm="instance")
    trainer = Pix2PixTrainer(config, Pix2PixOptions(steps=3, batch=2, gan_loss="lsgan", xflip=False), images, sketches)
    stats = [trainer.step() for _ in range(3)]
    assert all(np.isfinite(list(s.values())).all() for s in stats)


def test_lr_schedule_is_constant_then_linear_to_zero():
    options = Pix2PixOptions(steps=10, lr=1.0)
    assert [options.lr_at(s) for s in range(10)] == [1.0] * 5 + [1.0, 0.8, 0.6, 0.4, 0.2]
    assert Pix2PixOptions(steps=10, lr=1.0, lr_decay=False).lr_at(9) == 1.0


def test_bundle_round_trip_gives_identical_outputs(tmp_path):
    images, sketches = toy_pairs(4)
    trainer = Pix2PixTrainer(TINY, Pix2PixOptions(batch=4), images, sketches)
    for _ in range(3):  # moves BatchNorm's running statistics away from their initial values
        trainer.step()
    save_network("pix2pix", trainer.G, tmp_path, {"training": {"steps": 3}})
    loaded = load_network("pix2pix", tmp_path)
    assert not loaded.training and loaded.config == TINY
    assert np.array_equal(translate(loaded, sketches), translate(trainer.G, sketches))
    meta = json.loads((tmp_path / "pix2pix.json").read_text())
    assert meta["config"]["resolution"] == 32 and meta["training"]["steps"] == 3
    assert (tmp_path / "pix2pix.safetensors").is_file()


def test_stop_and_resume_repeat_the_uninterrupted_run(tmp_path):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    images, sketches = toy_pairs()
    options = dict(steps=12, batch=4, snap_every=4)
    straight = train_pix2pix(images, sketches, tmp_path / "a", TINY, Pix2PixOptions(**options), log=QUIET)
    assert straight.steps == 12 and not straight.stopped_early and straight.metrics["g_l1"] > 0

    def interrupt(step: int, stats: dict) -> None:
        if step == 6:
            signal.raise_signal(signal.SIGINT)  # like Ctrl-C: finish the step, checkpoint, stop

    stopped = train_pix2pix(images, sketches, tmp_path / "b", TINY, Pix2PixOptions(**options), on_step=interrupt, log=QUIET)
    assert stopped.stopped_early and stopped.steps == 6
    assert load_checkpoint(tmp_path / "b", CHECKPOINT)[1]["step"] == 6
    assert not (tmp_path / "b" / "pix2pix.json").exists()  # no bundle from an unfinished run
    with pytest.raises(InputError, match="resume"):  # never overwrite a run by accident
        train_pix2pix(images, sketches, tmp_path / "b", TINY, Pix2PixOptions(**options), log=QUIET)

    resumed = train_pix2pix(images, sketches, tmp_path / "b", TINY, Pix2PixOptions(**options), resume=True, log=QUIET)
    assert resumed.steps == 12 and not resumed.stopped_early
    (a, meta_a), (b, meta_b) = load_checkpoint(tmp_path / "a", CHECKPOINT), load_checkpoint(tmp_path / "b", CHECKPOINT)
    assert meta_a["step"] == meta_b["step"] == 12
    for key in ("G", "D"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    assert torch.equal(a["G_opt"]["state"][0]["exp_avg"], b["G_opt"]["state"][0]["exp_avg"])
    assert np.array_equal(translate(load_network("pix2pix", tmp_path / "a"), sketches), translate(load_network("pix2pix", tmp_path / "b"), sketches))

    assert [entry["step"] for entry in read_metrics(tmp_path / "a" / METRICS)] == [4, 8, 12]
    assert [entry["step"] for entry in read_metrics(tmp_path / "b" / METRICS)] == [4, 6, 8, 12]
    grids = sorted(p.name for p in (tmp_path / "a" / "samples").iterdir())
    assert grids == ["step0000004.png", "step0000008.png", "step0000012.png"]
    from PIL import Image

    assert Image.open(tmp_path / "a" / "samples" / grids[0]).size == (8 * 32, 3 * 32)  # sketch | generated | real


def test_bad_inputs_are_refused_with_a_clear_message(tmp_path):
    images, sketches = toy_pairs(4)
    out = tmp_path / "out"
    cases = [
        (images[:3], sketches, "3 images and 4 sketches"),
        (images, sketches[:, :16, :16], "sketches 16 px"),
        (images.astype(np.float32), sketches, "uint8"),
        (images, sketches.astype(bool), "uint8"),
        (images[..., 0], sketches, r"\(N, R, R, 3\)"),
        (np.zeros((4, 64, 64, 3), np.uint8), np.zeros((4, 64, 64), np.uint8), "model works at 32 px"),
    ]
    for bad_images, bad_sketches, message in cases:
        with pytest.raises(InputError, match=message):
            train_pix2pix(bad_images, bad_sketches, out, TINY, Pix2PixOptions(steps=1, batch=2), log=QUIET)
    with pytest.raises(InputError, match="gan-loss"):
        train_pix2pix(images, sketches, out, TINY, Pix2PixOptions(gan_loss="wgan"), log=QUIET)
    with pytest.raises(InputError, match="batch"):
        train_pix2pix(images, sketches, out, TINY, Pix2PixOptions(batch=0), log=QUIET)
    assert not out.exists()


TORCHRUN = shutil.which("torchrun") or shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
@pytest.mark.slow  # starts two torchrun processes
def test_torchrun_ddp_two_processes(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_pix2pix import TINY, toy_pairs
        from training.train_pix2pix import Pix2PixOptions, train_pix2pix
        images, sketches = toy_pairs()
        train_pix2pix(images, sketches, {str(tmp_path / "bundle")!r}, TINY,
                      Pix2PixOptions(steps=4, batch=8, snap_every=2), device="cpu")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # every snapshot asserted that both ranks hold identical weights and BatchNorm statistics
    meta = json.loads((tmp_path / "bundle" / "pix2pix.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["training"]["steps"] == 4
    assert translate(load_network("pix2pix", tmp_path / "bundle"), toy_pairs(2)[1]).shape == (2, 32, 32, 3)
