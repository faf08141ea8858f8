"""E, the latent discriminator, H, their training phases, `train all`, Sketch2MedI and `generate`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from generation.checkpoints import load_checkpoint
from generation.device import Distributed
from generation.encoder import LatentDiscriminator, SketchEncoder
from generation.errors import InputError
from generation.moco import FeatureNetwork
from generation.phantom import phantom_sample
from generation.pipeline import Sketch2MedI
from generation.refiner import Refiner, refine
from generation.registry import load_network, network_config
from generation.sketch import sketch_from_mask, sketch_to_tensor
from generation.stylegan2 import Generator
from training.losses import info_nce_loss
from training.sketch_cache import SketchCache
from training.train_all import train_all
from training.train_sketch2medi import EncoderTrainer, RefinerTrainer, phase_options, train_phase

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def tiny_generator() -> Generator:
    torch.manual_seed(0)
    G = Generator(network_config("generator", "tiny")).eval().requires_grad_(False)
    with torch.no_grad():
        G.mapping.w_avg.copy_(G.mapping(torch.randn(2000, G.config.z_dim)).mean(0))
    return G


@pytest.fixture(scope="module")
def parts():
    """A random tiny G and C, and 16 phantom pairs whose sketches come from the exact masks."""
    images, masks = zip(*[phantom_sample(seed, 32) for seed in range(16)])
    masks = np.stack(masks)
    cache = SketchCache(np.stack(images), np.stack([sketch_from_mask(m) for m in masks]), masks)
    return tiny_generator(), FeatureNetwork.random(network_config("moco", "tiny")), cache


@pytest.fixture(scope="module")
def trained_encoder(parts):
    G, C, cache = parts
    trainer = EncoderTrainer(G, C, cache, phase_options("tiny", "encoder", steps=50), CPU, Distributed(), "tiny")
    losses = [trainer.step()["sim_total"] for _ in range(trainer.options.steps)]
    return trainer.E.eval(), losses


def test_sketch_tensor_marks_ink_as_one():
    sketch = np.full((8, 8), 255, np.uint8)
    sketch[2, 3] = 0
    tensor = sketch_to_tensor(sketch)
    assert tensor.shape == (1, 1, 8, 8) and tensor[0, 0, 2, 3] == 1 and tensor.sum() == 1


def test_untrained_encoder_returns_the_average_w():
    G = tiny_generator()
    E = SketchEncoder(network_config("encoder", "tiny", resolution=32, w_dim=G.config.w_dim), G.w_avg).eval()
    w = E(torch.rand(3, 1, 32, 32))
    assert torch.equal(w, G.w_avg.expand(3, -1))
    with pytest.raises(AssertionError, match=r"E expects sketches \(N, 1, 32, 32\)"):
        E(torch.rand(3, 1, 64, 64))


def test_latent_discriminator_is_a_four_layer_mlp():
    D = LatentDiscriminator(32, 4)
    assert sum(isinstance(m, torch.nn.Linear) for m in D.modules()) == 4
    assert D(torch.randn(5, 32)).shape == (5,)


def test_untrained_refiner_reproduces_G_exactly():
    G = tiny_generator()
    H = Refiner(network_config("refiner", "tiny", G=G)).eval()
    sketches, w = torch.rand(2, 1, 32, 32), G.w_avg.expand(2, -1) + 0.3 * torch.randn(2, G.config.w_dim)
    images = refine(G, H, sketches, w, steps=3)
    assert len(images) == 4
    for image in images[2:]:
        assert torch.equal(image, images[1])  # Delta = 0: theta * (1 + 0) is theta, bit for bit
    # x_0 = G(w) takes the shared-weight path, the refined images the per-sample one: equal up to rounding
    assert torch.allclose(images[1], images[0], atol=1e-5)


def test_refiner_targets_every_non_torgb_conv_and_shares_heads_by_shape():
    G = tiny_generator()
    config = network_config("refiner", "tiny", G=G)
    layers = G.conv_layers()
    assert [name for name, _ in config.layers] == [n for n, info in layers.items() if not info.is_torgb]
    H = Refiner(config)
    assert len(H.heads) == len({shape for _, shape in config.layers}) < len(config.layers)
    deltas = H(torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32))
    for name, shape in config.layers:
        assert deltas[name].shape == (2, *shape)
    with pytest.raises(InputError, match="G has no conv layers"):
        network_config("refiner", "tiny", G=G, layers=["b4.conv9"])


def test_encoder_training_lowers_the_similarity_loss(trained_encoder):
    _, losses = trained_encoder
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses


def test_info_nce_is_low_for_matched_pairs_and_high_for_shuffled_ones():
    torch.manual_seed(0)
    codes = torch.randn(16, 8)
    matched = info_nce_loss(codes, codes + 0.05 * torch.randn(16, 8), temperature=0.1)
    shuffled = info_nce_loss(codes, codes[torch.randperm(16)], temperature=0.1)
    assert matched < 0.1 < np.log(16) < shuffled


def test_contrastive_term_pulls_two_free_hand_drawings_of_one_image_together(parts):
    G, C, cache = parts
    options = phase_options("tiny", "encoder", steps=60, batch=8, freehand=0.5, freehand_strength=2.0, freehand_pool=3,
                            contrastive=1.0, adversarial=0.0)
    trainer = EncoderTrainer(G, C, cache, options, CPU, Distributed(), "tiny")
    assert trainer.pool.shape == (16, 3, 32, 32)
    again = EncoderTrainer(G, C, cache, options, CPU, Distributed(), "tiny")
    assert np.array_equal(trainer.pool, again.pool)  # drawn from the seed alone: a resumed run draws the same pool
    losses = [trainer.step()["contrastive"] for _ in range(options.steps)]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses


def test_refiner_steps_beat_the_encoder_alone_on_training_sketches(parts, trained_encoder):
    G, C, cache = parts
    E, _ = trained_encoder
    trainer = RefinerTrainer(G, C, cache, phase_options("tiny", "refiner", steps=30), CPU, Distributed(), "tiny", E)
    for _ in range(trainer.options.steps):
        stats = trainer.step()
    assert stats["sim_step0"] > stats["sim_step1"] and stats["sim_step0"] > stats["sim_step3"]
    # and at inference (eval mode, no gradients) on the same sketches
    trainer.H.eval()
    with torch.no_grad():
        sketches, reals = trainer.batch_of(torch.arange(8))
        images = refine(G, trainer.H, sketches, E(sketches), 3)
        before, after = (trainer.similarity(reals, images[t])["total"].item() for t in (0, 3))
    assert after < before


def test_refiner_trains_on_the_free_hand_drawings_it_is_given(parts, trained_encoder):
    G, C, cache = parts
    E, _ = trained_encoder
    options = phase_options("tiny", "refiner", steps=2, freehand=1.0, freehand_strength=2.0, freehand_pool=2)
    trainer = RefinerTrainer(G, C, cache, options, CPU, Distributed(), "tiny", E)
    assert trainer.pool.shape == (16, 2, 32, 32)
    seen, batch_of = [], trainer.batch_of

    def recording(indices, freehand=0.0):
        sketches, reals = batch_of(indices, freehand)
        seen.append((indices, sketches))
        return sketches, reals

    trainer.batch_of = recording
    trainer.step()
    (indices, sketches), = seen
    for row, i in enumerate(indices.tolist()):  # every sketch of the batch is one of its image's pool drawings
        drawings = sketch_to_tensor(torch.from_numpy(trainer.pool[i]))
        assert any(torch.equal(sketches[row], drawing) for drawing in drawings), row


@pytest.fixture
def tiny_bundle(tiny_chain):
    return tiny_chain


def test_train_all_builds_every_stage_then_skips_them(tiny_bundle):
    data, bundle, reports = tiny_bundle
    *reports, progressed = reports
    assert [(r.stage, r.status) for r in reports] == [(s, "trained") for s in ("C", "S", "G", "sketches", "E", "H")]
    assert progressed == ["C", "S", "G", "sketches", "E", "H"]
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert set(manifest["networks"]) == {"C", "S", "G", "E", "H"} and manifest["preset"] == "tiny"
    assert manifest["networks"]["E"]["training"]["steps"] == phase_options("tiny", "encoder").steps
    again = train_all(data, bundle, "tiny", device="cpu", log=lambda message: None)
    assert {r.status for r in again} == {"done before"}


def test_sketch2medi_generates_a_batch_with_every_step(tiny_bundle):
    _, bundle, _ = tiny_bundle
    model = Sketch2MedI.from_bundle(bundle, "cpu")
    sketches = np.stack([sketch_from_mask(phantom_sample(seed, 32)[1]) for seed in (100, 101, 102)])
    result = model.generate(sketches)
    assert result.w.shape == (3, 32) and result.images.shape == (3, 3, 32, 32) and len(result.steps) == 4
    assert torch.equal(result.images, result.steps[-1])
    single = model.generate(sketches[1], steps=0)  # E alone; one sketch at a time gives the same image
    assert torch.allclose(single.images[0], result.steps[0][1], atol=1e-5)
    with pytest.raises(InputError, match="normalise them to 32 px"):
        model.generate(np.full((2, 64, 64), 255, np.uint8))


def test_generate_reports_each_stage_of_each_batch_and_gives_the_same_images(tiny_bundle):
    _, bundle, _ = tiny_bundle
    model = Sketch2MedI.from_bundle(bundle, "cpu")
    sketches = np.stack([sketch_from_mask(phantom_sample(seed, 32)[1]) for seed in (100, 101, 102)])
    stages = []
    watched = model.generate(sketches, steps=2, batch_size=2, on_stage=stages.append)
    assert stages == ["E", "G", "H1", "H2"] * 2
    plain = model.generate(sketches, steps=2, batch_size=2)
    assert torch.equal(watched.w, plain.w) and all(torch.equal(a, b) for a, b in zip(watched.steps, plain.steps))


def test_generate_command_writes_the_image_and_the_strip(tiny_bundle, tmp_path):
    _, bundle, _ = tiny_bundle
    sketch = tmp_path / "sketch.png"
    Image.fromarray(sketch_from_mask(phantom_sample(7, 128)[1])).save(sketch)
    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(sketch), "--out", str(tmp_path / "x.png"), "--bundle", str(bundle), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "x.png").size == (32, 32)
    result = runner.invoke(app, ["generate", str(sketch), "--out", str(tmp_path / "s.png"), "--bundle", str(bundle), "--strip", "--device", "cpu"])
    assert result.exit_code == 0 and Image.open(tmp_path / "s.png").size == (32 * 5, 32)  # sketch, x_0..x_3
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(blank)
    result = runner.invoke(app, ["generate", str(blank), "--out", str(tmp_path / "b.png"), "--bundle", str(bundle)])
    assert result.exit_code == 2 and "empty" in result.output and "Traceback" not in result.output


def test_bundle_without_refiner_generates_with_E_alone_only(tiny_bundle, tmp_path):
    _, bundle, _ = tiny_bundle
    partial = tmp_path / "partial"
    shutil.copytree(bundle, partial, ignore=shutil.ignore_patterns("refiner*", "cache", "samples"))
    model = Sketch2MedI.from_bundle(partial, "cpu")
    sketch = sketch_from_mask(phantom_sample(3, 32)[1])
    assert len(model.generate(sketch).steps) == 1
    with pytest.raises(InputError, match="no refiner H"):
        model.generate(sketch, steps=3)


def copy_networks(bundle: Path, target: Path, names=("moco", "synthesizer", "generator")) -> Path:
    target.mkdir()
    for name in names:
        for suffix in (".json", ".safetensors"):
            shutil.copy(bundle / f"{name}{suffix}", target / f"{name}{suffix}")
    return target


@pytest.mark.parametrize("augment", [{}, dict(freehand=0.5, freehand_pool=2, contrastive=0.5)], ids=["paper", "freehand-contrastive"])
def test_encoder_phase_resumes_exactly(tiny_bundle, tmp_path, augment):
    data, bundle, _ = tiny_bundle
    whole, parts_ = copy_networks(bundle, tmp_path / "whole"), copy_networks(bundle, tmp_path / "parts")
    options = dict(steps=8, snap_every=4, log_every=2, **augment)
    train_phase("encoder", data, whole, "tiny", phase_options("tiny", "encoder", **options), device="cpu", log=lambda m: None)
    train_phase("encoder", data, parts_, "tiny", phase_options("tiny", "encoder", **{**options, "steps": 4}), device="cpu", log=lambda m: None)
    with pytest.raises(InputError, match="pass --resume"):
        train_phase("encoder", data, parts_, "tiny", phase_options("tiny", "encoder", **options), device="cpu", log=lambda m: None)
    train_phase("encoder", data, parts_, "tiny", phase_options("tiny", "encoder", **options), device="cpu", resume=True, log=lambda m: None)
    states_a, _ = load_checkpoint(whole, "encoder")
    states_b, _ = load_checkpoint(parts_, "encoder")
    for key, tensor in states_a["E"].items():
        assert torch.equal(tensor, states_b["E"][key]), key


def test_a_snapshot_of_an_encoder_run_exports_as_the_bundle_encoder(tiny_bundle, tmp_path):
    from training.export_checkpoint import export_checkpoint

    data, bundle, _ = tiny_bundle
    run = copy_networks(bundle, tmp_path / "run")
    target = copy_networks(bundle, tmp_path / "snapshot", ("moco", "synthesizer", "generator", "encoder"))
    train_phase("encoder", data, run, "tiny", phase_options("tiny", "encoder", steps=4, snap_every=2), device="cpu", log=lambda m: None)
    assert export_checkpoint(run, "encoder", target) == 4
    states, _ = load_checkpoint(run, "encoder_checkpoint")
    exported = load_network("encoder", target)
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, states["E"][name]), name
    with pytest.raises(InputError, match="cannot export 'moco'"):
        export_checkpoint(run, "moco", target)


def test_encoder_phase_continues_an_exported_encoder(tiny_bundle, tmp_path):
    data, bundle, _ = tiny_bundle
    first = copy_networks(bundle, tmp_path / "first")
    train_phase("encoder", data, first, "tiny", phase_options("tiny", "encoder", steps=4, snap_every=4), device="cpu", log=lambda m: None)
    exported = load_network("encoder", first).state_dict()
    later, messages = copy_networks(bundle, tmp_path / "later"), []
    with pytest.raises(InputError, match="has no encoder.safetensors to continue"):
        train_phase("encoder", data, later, "tiny", phase_options("tiny", "encoder", steps=6), device="cpu", init_from=tmp_path, log=messages.append)
    with pytest.raises(InputError, match="already has 4 steps; pass a larger --steps"):
        train_phase("encoder", data, later, "tiny", phase_options("tiny", "encoder", steps=4), device="cpu", init_from=first, log=messages.append)
    result = train_phase("encoder", data, later, "tiny", phase_options("tiny", "encoder", steps=6, snap_every=6, log_every=1),
                         device="cpu", init_from=first, log=messages.append)
    assert result.steps == 6 and f"continuing encoder of {first} at step 4" in messages
    assert [json.loads(line)["step"] for line in (later / "encoder_metrics.jsonl").read_text().splitlines()] == [5, 6]
    _, meta = load_checkpoint(later, "encoder")
    assert meta["training"]["steps"] == 6 and meta["training"]["continued_from"] == str(first)
    # Two steps on from the exported weights stay near them, nearer than an E trained in another run.
    continued, fresh = load_network("encoder", later).state_dict(), load_network("encoder", bundle).state_dict()
    name = "to_w.weight"
    assert (continued[name] - exported[name]).abs().mean() < (fresh[name] - exported[name]).abs().mean()


def test_phases_refuse_an_incomplete_bundle(tiny_bundle, tmp_path):
    data, bundle, _ = tiny_bundle
    only_c = copy_networks(bundle, tmp_path / "c", ("moco",))
    with pytest.raises(InputError, match="no synthesizer.safetensors"):
        train_phase("encoder", data, only_c, "tiny", device="cpu", log=lambda m: None)
    no_e = copy_networks(bundle, tmp_path / "g")
    with pytest.raises(InputError, match="train E first"):
        train_phase("refiner", data, no_e, "tiny", device="cpu", log=lambda m: None)


TORCHRUN = shutil.which("torchrun") or shutil.which("torchrun", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
@pytest.mark.slow  # starts two torchrun processes
def test_encoder_training_under_torchrun_two_processes(tiny_bundle, tmp_path):
    data, bundle, _ = tiny_bundle
    target = copy_networks(bundle, tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(REPO / "cli.py"), "train", "encoder",
               "--data", str(data), "--bundle", str(target), "--preset", "tiny", "--steps", "4", "--batch", "4", "--device", "cpu"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    meta = json.loads((target / "encoder.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["training"]["steps"] == 4


def test_export_halves_the_weights_and_keeps_the_images(tiny_bundle, tmp_path):
    from safetensors.torch import load_file

    _, bundle, _ = tiny_bundle
    result = CliRunner().invoke(app, ["export", str(bundle), "--out", str(tmp_path / "shipped")])
    assert result.exit_code == 0, result.output
    shipped = tmp_path / "shipped"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(
        [f"{n}.{x}" for n in ("moco", "synthesizer", "generator", "discriminator", "encoder", "refiner") for x in ("json", "safetensors")]
        + ["bundle.json"])  # D travels with G, so that G's training can continue from the exported bundle
    assert all(t.dtype in (torch.float16, torch.int64) for t in load_file(str(shipped / "generator.safetensors")).values())
    manifest = json.loads((shipped / "bundle.json").read_text())
    assert manifest["exported"]["dtype"] == "float16" and manifest["bundle_id"] != json.loads((bundle / "bundle.json").read_text())["bundle_id"]
    sketches = np.stack([sketch_from_mask(phantom_sample(seed, 32)[1]) for seed in (5, 6)])
    full, half = (Sketch2MedI.from_bundle(b, "cpu").generate(sketches).images for b in (bundle, shipped))
    assert (full - half).abs().max() < 0.05
    again = CliRunner().invoke(app, ["export", str(shipped), "--out", str(shipped)])
    assert again.exit_code == 2 and "different folder" in again.output
