"""The unpaired baselines (CycleGAN, UNIT, U-GAT-IT): shapes, the reference networks' sizes,
unpaired batches, the image pool, losses going down, save/load, resume repeating the run exactly,
and input checks."""

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
from test_pix2pix import toy_pairs

from generation.checkpoints import load_checkpoint
from generation.cyclegan import PatchDiscriminator, ResnetGenerator
from generation.errors import InputError
from generation.images import tensor_to_images
from generation.registry import load_network, network_config, save_network
from generation.sketch import sketch_as_image, sketch_to_tensor
from generation.ugatit import AdaLIN, UGATITDiscriminator, UGATITGenerator
from generation.unit import MultiScaleDiscriminator, UNITGenerator
from training.loop import read_metrics
from training.train_cyclegan import CycleGANOptions, CycleGANTrainer, train_cyclegan
from training.train_ugatit import UGATITOptions, UGATITTrainer, train_ugatit
from training.train_unit import UNITOptions, UNITTrainer, train_unit
from training.unpaired import ImagePool

REPO = Path(__file__).resolve().parents[1]
QUIET = lambda message: None  # noqa: E731
# name -> (trainer, options, train function, the losses that must fall)
MODELS = {
    "cyclegan": (CycleGANTrainer, CycleGANOptions, train_cyclegan, ("g_cycle", "g_identity")),
    "unit": (UNITTrainer, UNITOptions, train_unit, ("g_recon", "g_cycle")),
    "ugatit": (UGATITTrainer, UGATITOptions, train_ugatit, ("g_cycle", "g_identity", "g_cam")),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def translate(model: torch.nn.Module, sketches: np.ndarray) -> np.ndarray:
    return tensor_to_images(model.eval().translate(sketch_to_tensor(sketches)))


# ------------------------------------------------------------------------------------------------
# Architecture


@pytest.mark.parametrize("resolution", [32, 64])
def test_shapes(resolution):
    x = torch.rand(2, 3, resolution, resolution) * 2 - 1
    sketch = sketch_to_tensor(toy_pairs(2, resolution)[1])
    config = network_config("cyclegan", "tiny", resolution=resolution)
    G, D = ResnetGenerator(config), PatchDiscriminator(config)
    assert G(x).shape == x.shape and G.translate(sketch).shape == x.shape and G(x).abs().max() <= 1
    assert D(x).shape == (2, 1, config.patch_grid, config.patch_grid)

    config = network_config("unit", "tiny", resolution=resolution)
    G, D = UNITGenerator(config), MultiScaleDiscriminator(config)
    h = G.encode(x, "image")
    assert h.shape == (2, config.latent_channels, resolution // 4, resolution // 4)
    assert G.decode(h, "sketch").shape == x.shape and G.translate(sketch).shape == x.shape
    assert [o.shape[-1] for o in D(x)] == [resolution // 2**config.d_layers // 2**s for s in range(config.num_scales)]

    config = network_config("ugatit", "tiny", resolution=resolution)
    G = UGATITGenerator(config)
    image, cam_logits, heatmap = G(x)
    assert image.shape == x.shape and cam_logits.shape == (2, 2) and heatmap.shape == (2, 1, resolution // 4, resolution // 4)
    for layers in (config.d_layers_global, config.d_layers_local):
        logits, cam_logits, _ = UGATITDiscriminator(config, layers)(x)
        assert logits.shape == (2, 1, resolution // 2 ** (layers - 2) - 2, resolution // 2 ** (layers - 2) - 2)
        assert cam_logits.shape == (2, 2)
    for model in (ResnetGenerator(network_config("cyclegan", "tiny", resolution=resolution)), G):
        with pytest.raises(AssertionError):
            model(x[:, :1])  # a one-channel sketch tensor goes through `translate`


def test_paper_presets_match_the_reference_networks():
    with torch.device("meta"):  # shapes only
        cyclegan = network_config("cyclegan", "paper")
        assert count_parameters(ResnetGenerator(cyclegan)) == 11_378_179  # the reference resnet_9blocks
        assert count_parameters(PatchDiscriminator(cyclegan)) == pytest.approx(2.765e6, rel=1e-3)
        assert PatchDiscriminator(cyclegan).receptive_field() == 70 and cyclegan.n_blocks == 9
        unit = network_config("unit", "paper")
        assert (unit.dim, unit.n_res, unit.n_downsample, unit.num_scales, unit.d_layers) == (64, 4, 2, 3, 4)
        ugatit = network_config("ugatit", "paper")
        assert (ugatit.d_layers_global, ugatit.d_layers_local, ugatit.light) == (7, 5, False)
        full = UGATITGenerator(ugatit)
        # the full model's MLP reads the flattened 64x64x256 features
        assert full.mlp[0].weight.shape == (256, 64 * 64 * 256)
    assert network_config("ugatit", "cpu").light and network_config("ugatit", "cpu", resolution=128).d_layers_global == 6
    assert network_config("cyclegan", "cpu", resolution=128).resolution == 128
    with pytest.raises(InputError):
        network_config("unit", "tiny", resolution=48)


def test_unit_shares_the_high_level_layers_of_both_domains():
    G = UNITGenerator(network_config("unit", "tiny"))
    names = {name.split(".")[0] for name, _ in G.named_parameters()}
    assert names == {"encoders", "shared_encoder", "shared_decoder", "decoders"}
    assert set(G.encoders) == set(G.decoders) == {"sketch", "image"}
    # one set of shared weights, used by both directions
    x = torch.rand(1, 3, 32, 32)
    G.zero_grad()
    G.encode(x, "sketch").sum().backward()
    sketch_grad = G.shared_encoder.body[1].weight.grad.clone()
    G.zero_grad()
    G.encode(x, "image").sum().backward()
    assert sketch_grad.abs().sum() > 0 and G.shared_encoder.body[1].weight.grad.abs().sum() > 0
    assert G.encoders["image"][1].weight.grad is not None and G.encoders["sketch"][1].weight.grad is None


def test_adalin_mixes_instance_and_layer_norm():
    norm = AdaLIN(4)
    x = torch.randn(2, 4, 8, 8) * 3 + 1
    gamma, beta = torch.ones(2, 4), torch.zeros(2, 4)
    with torch.no_grad():
        norm.rho.fill_(1.0)
        instance = norm(x, gamma, beta)
        norm.rho.fill_(0.0)
        layer = norm(x, gamma, beta)
    assert torch.allclose(instance.mean((2, 3)), torch.zeros(2, 4), atol=1e-5)  # per channel
    assert torch.allclose(layer.mean((1, 2, 3)), torch.zeros(2), atol=1e-5)  # per sample only
    assert not torch.allclose(layer.mean((2, 3)), torch.zeros(2, 4), atol=1e-2)


# ------------------------------------------------------------------------------------------------
# Data and the pool


def test_batches_are_unpaired():
    images, sketches = toy_pairs(16)
    trainer = CycleGANTrainer(network_config("cyclegan", "tiny"), CycleGANOptions(batch=8, xflip=False), images, sketches)
    all_sketches = sketch_as_image(sketch_to_tensor(sketches))
    all_images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    matched = []
    for step in range(5):
        trainer.step_count = step
        trainer.reseed()
        batch_sketches, batch_images = trainer.unpaired_batch()
        assert batch_sketches.shape == batch_images.shape == (8, 3, 32, 32)
        assert set(batch_sketches.unique().tolist()) <= {-1.0, 1.0}  # grey drawings: paper +1, ink -1
        # which pair each came from: the sketches and images are drawn by independent choices
        sketch_rows = [int((all_sketches - s).abs().sum((1, 2, 3)).argmin()) for s in batch_sketches]
        image_rows = [int((all_images - x).abs().sum((1, 2, 3)).argmin()) for x in batch_images]
        matched += [i == j for i, j in zip(sketch_rows, image_rows)]
    assert np.mean(matched) < 0.3  # 1/16 expected by chance; a paired batch would give 1


def test_image_pool_returns_new_fakes_until_full_then_mixes():
    pool = ImagePool(4, (1, 1, 1), torch.device("cpu"))
    rng = torch.Generator().manual_seed(0)
    first = torch.arange(4.0).view(4, 1, 1, 1)
    assert torch.equal(pool.query(first, rng), first) and pool.count == 4
    later = torch.full((64, 1, 1, 1), 9.0)
    out = pool.query(later, rng)
    old = (out != 9).sum().item()
    assert 0 < old <= 4  # stored fakes come back (each at most once) in place of about half the new
    assert (pool.images == 9).sum().item() == old  # and the new ones took their places
    assert torch.equal(ImagePool(0, (1, 1, 1), torch.device("cpu")).query(first, rng), first)


# ------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("name", list(MODELS))
def test_training_brings_the_reconstruction_losses_down(name):
    trainer_type, options_type, _, falling = MODELS[name]
    images, sketches = toy_pairs(8)
    trainer = trainer_type(network_config(name, "tiny"), options_type(steps=30, batch=2, lr=1e-3), images, sketches)
    stats = [trainer.step() for _ in range(30)]
    assert all(np.isfinite(list(s.values())).all() for s in stats)
    for key in falling:
        first, last = np.mean([s[key] for s in stats[:5]]), np.mean([s[key] for s in stats[-5:]])
        assert last < 0.8 * first, (name, key, first, last)
    if name == "ugatit":  # rho stays clipped to [0, 1]
        rhos = torch.cat([m.rho.flatten() for m in trainer.translator.modules() if hasattr(m, "rho")])
        assert rhos.min() >= 0 and rhos.max() <= 1


def test_loss_weights_are_the_papers():
    cyclegan, unit, ugatit = CycleGANOptions(), UNITOptions(), UGATITOptions()
    assert (cyclegan.lambda_cycle, cyclegan.lambda_identity, cyclegan.pool_size, cyclegan.lr) == (10.0, 0.5, 50, 2e-4)
    assert (unit.lambda_gan, unit.lambda_recon, unit.lambda_kl, unit.lambda_cycle, unit.lambda_kl_cycle) == (1, 10, 0.01, 10, 0.01)
    assert [unit.lr_at(s) for s in (0, 99_999, 100_000, 250_000)] == [1e-4, 1e-4, 5e-5, 2.5e-5]
    assert (ugatit.lambda_adv, ugatit.lambda_cycle, ugatit.lambda_identity, ugatit.lambda_cam) == (1, 10, 10, 1000)


@pytest.mark.parametrize("name", list(MODELS))
def test_save_load_round_trip(name, tmp_path):
    trainer_type, options_type, _, _ = MODELS[name]
    images, sketches = toy_pairs(4)
    trainer = trainer_type(network_config(name, "tiny"), options_type(batch=2), images, sketches)
    trainer.step()
    save_network(name, trainer.translator, tmp_path, {"training": {"steps": 1}})
    loaded = load_network(name, tmp_path)
    assert not loaded.training and loaded.config == network_config(name, "tiny")
    assert np.array_equal(translate(loaded, sketches), translate(trainer.translator, sketches))
    assert json.loads((tmp_path / f"{name}.json").read_text())["config"]["resolution"] == 32


@pytest.mark.parametrize("name", list(MODELS))
def test_stop_and_resume_repeat_the_uninterrupted_run(name, tmp_path):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    _, options_type, train, _ = MODELS[name]
    images, sketches = toy_pairs(4)
    # a pool of 2 fills in the first step, so the resumed half draws from a full, checkpointed pool
    options = dict(steps=6, batch=2, snap_every=3, **({"pool_size": 2} if name == "cyclegan" else {}))
    tiny = network_config(name, "tiny")
    straight = train(images, sketches, tmp_path / "a", tiny, options_type(**options), log=QUIET)
    assert straight.steps == 6 and not straight.stopped_early

    def interrupt(step: int, stats: dict) -> None:
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # like Ctrl-C: finish the step, checkpoint, stop

    stopped = train(images, sketches, tmp_path / "b", tiny, options_type(**options), on_step=interrupt, log=QUIET)
    assert stopped.stopped_early and stopped.steps == 2 and not (tmp_path / "b" / f"{name}.json").exists()
    with pytest.raises(InputError, match="resume"):
        train(images, sketches, tmp_path / "b", tiny, options_type(**options), log=QUIET)
    resumed = train(images, sketches, tmp_path / "b", tiny, options_type(**options), resume=True, log=QUIET)
    assert resumed.steps == 6 and not resumed.stopped_early
    (a, meta_a), (b, meta_b) = (load_checkpoint(tmp_path / d, f"{name}_checkpoint") for d in ("a", "b"))
    assert meta_a["step"] == meta_b["step"] == 6
    for key, state in a.items():
        if isinstance(state, torch.Tensor):  # the pools
            assert torch.equal(state, b[key]), key
        elif "opt" not in key:
            for tensor_name, tensor in state.items():
                assert torch.equal(tensor, b[key][tensor_name]), (key, tensor_name)
    assert torch.equal(a["G_opt"]["state"][0]["exp_avg"], b["G_opt"]["state"][0]["exp_avg"])
    assert [e["step"] for e in read_metrics(tmp_path / "b" / f"{name}_metrics.jsonl")] == [2, 3, 6]
    assert sorted(p.name for p in (tmp_path / "a" / "samples" / name).iterdir()) == ["step0000003.png", "step0000006.png"]
    assert np.array_equal(translate(load_network(name, tmp_path / "a"), sketches), translate(load_network(name, tmp_path / "b"), sketches))


def test_bad_inputs_are_refused_with_a_clear_message(tmp_path):
    images, sketches = toy_pairs(4)
    tiny = network_config("unit", "tiny")
    with pytest.raises(InputError, match="3 images and 4 sketches"):
        train_unit(images[:3], sketches, tmp_path / "out", tiny, UNITOptions(steps=1, batch=2), log=QUIET)
    with pytest.raises(InputError, match="model works at 32 px"):
        train_unit(np.zeros((4, 64, 64, 3), np.uint8), np.zeros((4, 64, 64), np.uint8), tmp_path / "out", tiny, log=QUIET)
    with pytest.raises(InputError, match="batch"):
        train_ugatit(images, sketches, tmp_path / "out", "tiny", UGATITOptions(batch=0), log=QUIET)
    with pytest.raises(InputError, match="loss weights"):
        train_cyclegan(images, sketches, tmp_path / "out", "tiny", CycleGANOptions(lambda_cycle=-1), log=QUIET)
    assert not (tmp_path / "out").exists()


TORCHRUN = shutil.which("torchrun") or shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
@pytest.mark.slow  # starts two torchrun processes
def test_torchrun_ddp_two_processes(tmp_path):
    """CycleGAN, the trainer with per-rank image pools: both ranks stay identical (asserted at every
    snapshot), every rank's pool is checkpointed, and the run resumes under torchrun."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_pix2pix import toy_pairs
        from training.train_cyclegan import CycleGANOptions, train_cyclegan
        images, sketches = toy_pairs()
        steps = int(sys.argv[1])
        train_cyclegan(images, sketches, {str(tmp_path / "bundle")!r}, "tiny",
                       CycleGANOptions(steps=steps, batch=4, snap_every=2, pool_size=3), resume=steps > 2, device="cpu")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for steps in (2, 4):
        command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script), str(steps)]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    states, meta = load_checkpoint(tmp_path / "bundle", "cyclegan_checkpoint")
    assert meta["world_size"] == 2 and meta["step"] == 4
    assert states["pool_image"].shape == (2, 3, 3, 32, 32) and states["pool_image_count"].tolist() == [3, 3]
    assert not torch.equal(states["pool_image"][0], states["pool_image"][1])  # each rank's own fakes
    assert json.loads((tmp_path / "bundle" / "cyclegan.json").read_text())["training"]["world_size"] == 2
