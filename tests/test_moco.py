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
from safetensors.torch import load_file

from generation.errors import InputError
from generation.moco import FeatureNetwork, MoCo, MocoConfig, info_nce_loss, moco_logits
from generation.registry import load_network, network_config
from generation.resnet import ResNet, ResNetConfig, load_backbone_weights
from training.augment import AugmentConfig, adjust_hue, augment_batch, gaussian_blur
from training.evaluate_moco import evaluate_moco, neighbour_mask_dice
from training.train_moco import batch_indices, read_metrics, train_moco

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def blob_dataset(tmp_path_factory) -> Path:
    """24 small images: a coloured disc on a coloured background, each different."""
    root = tmp_path_factory.mktemp("blobs")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    for index in range(24):
        image = np.zeros((48, 48, 3), np.uint8) + rng.integers(0, 80, 3).astype(np.uint8)
        cy, cx = rng.integers(8, 40, 2)
        radius = rng.integers(5, 14)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = rng.integers(100, 255, 3)
        Image.fromarray(image).save(root / "images" / f"{index:03d}.png")
    return root


def tiny_config(**changes) -> MocoConfig:
    return dataclasses.replace(network_config("moco", "tiny"), **changes)


# --- MoCo pieces -------------------------------------------------------------------------------


def test_logits_put_the_positive_first_and_loss_matches_cross_entropy():
    q = F.normalize(torch.randn(3, 4), dim=1)
    k = F.normalize(torch.randn(3, 4), dim=1)
    queue = F.normalize(torch.randn(5, 4), dim=1)
    logits = moco_logits(q, k, queue, temperature=0.5)
    assert logits.shape == (3, 6)
    assert torch.allclose(logits[:, 0], (q * k).sum(1) / 0.5)
    assert torch.allclose(logits[:, 1:], q @ queue.t() / 0.5)
    expected = -torch.log_softmax(logits, dim=1)[:, 0].mean()
    assert torch.allclose(info_nce_loss(logits), expected)


def test_enqueue_replaces_oldest_rows_and_wraps():
    moco = MoCo(tiny_config(queue_size=5, dim=2))
    for value in range(1, 5):  # 4 batches of 2 keys into a queue of 5
        moco.enqueue(torch.full((2, 2), float(value)))
    # Writes: rows 0,1 <- 1; 2,3 <- 2; 4,0 <- 3; 1,2 <- 4 -> pointer at 3.
    assert moco.queue[:, 0].tolist() == [3, 4, 4, 2, 3]
    assert int(moco.queue_ptr) == 3
    assert torch.allclose(moco.queue.norm(dim=1)[3], torch.tensor(2 * math.sqrt(2)))


def test_initial_queue_is_unit_norm_and_encoders_start_equal():
    moco = MoCo(tiny_config())
    assert torch.allclose(moco.queue.norm(dim=1), torch.ones(moco.queue.shape[0]))
    for q, k in zip(moco.encoder_q.parameters(), moco.encoder_k.parameters()):
        assert torch.equal(q, k) and not k.requires_grad


def test_momentum_update_is_an_ema_of_the_query_encoder():
    moco = MoCo(tiny_config(momentum=0.9))
    with torch.no_grad():
        for parameter in moco.encoder_q.parameters():
            parameter.add_(1.0)
    before_k = [p.clone() for p in moco.encoder_k.parameters()]
    moco.momentum_update()
    for k_old, q, k_new in zip(before_k, moco.encoder_q.parameters(), moco.encoder_k.parameters()):
        assert torch.allclose(k_new, 0.9 * k_old + 0.1 * q, atol=1e-6)


def test_forward_enqueues_keys_and_key_encoder_gets_no_gradient():
    config = tiny_config(image_size=16, load_size=16)
    moco = MoCo(config)
    views = torch.rand(8, 3, 16, 16) * 2 - 1
    logits, keys = moco(views, views, torch.Generator().manual_seed(0))
    assert logits.shape == (8, 1 + config.queue_size)
    assert torch.allclose(moco.queue[:8], keys) and int(moco.queue_ptr) == 8
    info_nce_loss(logits).backward()
    assert all(p.grad is None for p in moco.encoder_k.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in moco.encoder_q.parameters())


def test_queue_keys_of_the_same_image_are_masked_out():
    """On a small archive the queue spans epochs: an older key of a query's own image is no negative."""
    config = tiny_config(image_size=16, load_size=16, queue_size=16)
    moco = MoCo(config)
    views = torch.rand(8, 3, 16, 16) * 2 - 1
    ids = torch.arange(8)
    logits, _ = moco(views, views, torch.Generator().manual_seed(0), ids)
    assert torch.isfinite(logits).all()  # queue still random (ids -1): nothing masked
    assert moco.queue_ids[:8].tolist() == list(range(8)) and (moco.queue_ids[8:] == -1).all()
    logits, _ = moco(views, views, torch.Generator().manual_seed(1), ids.flip(0))
    masked = torch.isinf(logits[:, 1:])
    assert torch.isfinite(logits[:, 0]).all()
    assert masked.sum() == 8 and all(masked[i, 7 - i] for i in range(8))  # query i is image 7 - i
    assert torch.isfinite(info_nce_loss(logits))


def test_augment_config_follows_the_moco_config():
    from training.train_moco import augment_config_for

    paper = augment_config_for(network_config("moco", "paper"))
    assert paper.crop_scale == (0.2, 1.0) and paper.hue == 0.1 and paper.jitter_p == 0.8 and paper.grayscale_p == 0.2
    cpu = augment_config_for(network_config("moco", "cpu"))
    assert cpu.size == 128 and cpu.crop_scale == (0.3, 1.0) and cpu.jitter_p == 0.0 and cpu.grayscale_p == 0.0


def test_key_shuffle_is_undone():
    """With frozen BN statistics the shuffled, split key encoding equals plain encoding."""
    moco = MoCo(tiny_config(image_size=16, load_size=16, bn_splits=2)).eval()
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    keys = moco.encode_keys(images, torch.Generator().manual_seed(3))
    assert torch.allclose(keys, F.normalize(moco.encoder_k(images), dim=1), atol=1e-5)


def test_loss_goes_down_on_a_tiny_problem():
    torch.manual_seed(0)
    config = MocoConfig(
        backbone=ResNetConfig(depth=18, width=4), dim=16, queue_size=16, momentum=0.9,
        image_size=16, load_size=16, batch_size=8, bn_splits=2,
    )  # fmt: skip
    moco = MoCo(config)
    optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=0.03, momentum=0.9)
    images = torch.rand(32, 3, 16, 16) * 2 - 1
    losses = []
    for step in range(128):  # at 64 steps the drop was within noise of 0.3 on some CPUs
        batch = images[(step % 4) * 8 : (step % 4) * 8 + 8]
        generator = torch.Generator().manual_seed(step)
        view_q = batch + 0.1 * torch.randn(batch.shape, generator=generator)
        view_k = batch + 0.1 * torch.randn(batch.shape, generator=generator)
        logits, _ = moco(view_q, view_k, generator)
        loss = info_nce_loss(logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    early, late = np.mean(losses[4:14]), np.mean(losses[-10:])  # after the random queue is flushed
    assert late < early - 0.3, (early, late)


# --- augmentations ---------------------------------------------------------------------------


def test_augment_is_deterministic_per_generator_and_random_per_sample():
    images = (torch.rand(1, 3, 40, 40) * 255).to(torch.uint8).repeat(6, 1, 1, 1)
    config = AugmentConfig(size=24)
    a = augment_batch(images, config, torch.Generator().manual_seed(1))
    b = augment_batch(images, config, torch.Generator().manual_seed(1))
    c = augment_batch(images, config, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 24, 24) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a[0], a[1])  # same image, different per-sample parameters


def test_identity_augment_and_flip():
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    identity = AugmentConfig(size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0, grayscale_p=0, blur_p=0, flip_p=0)
    assert torch.allclose(augment_batch(images, identity, torch.Generator()), images, atol=1e-5)
    flipped = dataclasses.replace(identity, flip_p=1.0)
    assert torch.allclose(augment_batch(images, flipped, torch.Generator()), images.flip(-1), atol=1e-5)
    grey = dataclasses.replace(identity, grayscale_p=1.0)
    out = augment_batch(images, grey, torch.Generator())
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_hue_shift_and_blur():
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1
    green = adjust_hue(red, torch.tensor([1 / 3]))
    assert torch.allclose(green[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)
    flat = torch.full((2, 3, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.5, 2.0])), flat, atol=1e-6)  # preserves constants
    impulse = torch.zeros(2, 3, 9, 9)
    impulse[:, :, 4, 4] = 1
    blurred = gaussian_blur(impulse, torch.tensor([0.5, 1.5]))
    assert blurred[0, 0, 4, 4] > blurred[1, 0, 4, 4]  # larger sigma spreads more


# --- training, resuming, bundle ---------------------------------------------------------------


def test_batches_cover_each_epoch_and_split_across_ranks():
    config = tiny_config(batch_size=8)
    single = torch.cat([batch_indices(config, 24, step, 0, 1) for step in range(3)])
    assert sorted(single.tolist()) == list(range(24))
    two_ranks = torch.cat([batch_indices(config, 24, 0, rank, 2) for rank in range(2)])
    assert torch.equal(two_ranks, batch_indices(config, 24, 0, 0, 1))


def test_resume_continues_exactly(blob_dataset, tmp_path):
    config = network_config("moco", "tiny", steps=8)
    config = dataclasses.replace(config, log_every=2, checkpoint_every=4)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train_moco(blob_dataset, straight, config, device="cpu")
    partial = train_moco(blob_dataset, interrupted, config, device="cpu", stop_after=5)
    assert partial.stopped_early and not (interrupted / "moco.safetensors").exists()
    resumed = train_moco(blob_dataset, interrupted, config, device="cpu")
    assert not resumed.stopped_early and resumed.steps == 8
    a, b = load_file(straight / "moco.safetensors"), load_file(interrupted / "moco.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert [m["step"] for m in read_metrics(interrupted)] == [2, 4, 6, 8]
    # Step 6 averages only step 6 after the resume (steps 5-6 straight); whole windows agree.
    losses = {m["step"]: m["loss"] for m in read_metrics(interrupted)}
    expected = {m["step"]: m["loss"] for m in read_metrics(straight)}
    assert [losses[s] for s in (2, 4, 8)] == pytest.approx([expected[s] for s in (2, 4, 8)], abs=1e-4)
    # A changed setting is refused instead of silently mixing two trainings.
    with pytest.raises(InputError, match="different settings"):
        train_moco(blob_dataset, interrupted, dataclasses.replace(config, lr=0.1), device="cpu")


def test_bundle_loads_as_feature_network(blob_dataset, tmp_path):
    config = network_config("moco", "tiny", steps=3)
    train_moco(blob_dataset, tmp_path, config, device="cpu")
    meta = json.loads((tmp_path / "moco.json").read_text())
    assert meta["config"]["image_size"] == config.image_size and meta["step"] == 3
    network = load_network("moco", tmp_path)
    images = torch.rand(3, 3, 50, 50) * 2 - 1  # any size: resized to the trained 32 px inside
    embedding = network.embed(images)
    assert embedding.shape == (3, network.embedding_dim)
    assert torch.allclose(embedding.norm(dim=1), torch.ones(3), atol=1e-5)
    features = network.features(images)
    assert [f.shape[1] for f in features] == [config.backbone.width, *config.backbone.stage_channels]
    assert [f.shape[-1] for f in features] == [16, 8, 4, 2, 1]
    network.train()
    assert not network.encoder.training  # C is always frozen
    # The trunk initialises other networks (e.g. E with 1-channel sketches).
    sketch_trunk = ResNet(dataclasses.replace(config.backbone, in_channels=1))
    assert len(load_backbone_weights(sketch_trunk, network.backbone_state())) == len(sketch_trunk.state_dict())

    (tmp_path / "moco.json").write_text(json.dumps({**meta, "config": {**meta["config"], "dim": 7}}))
    with pytest.raises(InputError):
        load_network("moco", tmp_path)
    with pytest.raises(InputError):
        load_network("moco", tmp_path / "missing")


def test_neighbour_mask_dice_finds_the_same_anatomy():
    """Queries that are copies of archive images find themselves: their masks agree perfectly."""
    rng = np.random.default_rng(1)
    archive = torch.from_numpy(rng.integers(0, 255, (12, 3, 32, 32), dtype=np.uint8))
    yy, xx = np.mgrid[:32, :32]
    masks = np.stack([((yy - 4 - 2 * i) ** 2 + (xx - 16) ** 2 < 36).astype(np.uint8) for i in range(12)])
    network = FeatureNetwork.random(tiny_config())
    scores = neighbour_mask_dice({"net": network}, archive[:6], masks[:6], archive, masks, num_classes=2)
    assert scores["net"] == pytest.approx(100.0)
    assert scores["random_neighbour"] < 60


def test_evaluate_moco_runs_on_tiny(blob_dataset, tmp_path):
    train_moco(blob_dataset, tmp_path, network_config("moco", "tiny", steps=2), device="cpu")
    report = evaluate_moco(tmp_path, blob_dataset)
    assert report["images"] == 24 and report["chance_top1"] == pytest.approx(100 / 24)
    for name in ("aug+", "crop"):
        for which in ("trained", "random"):
            assert 0 <= report[name][which]["top1"] <= report[name][which]["top5"] <= 100


def test_cli_train_moco(blob_dataset, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    runner = CliRunner()
    common = ["train", "moco", "--data", str(blob_dataset), "--out", str(tmp_path)]
    result = runner.invoke(app, [*common, "--preset", "tiny", "--steps", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "moco.safetensors").is_file() and (tmp_path / "moco_metrics.jsonl").is_file()
    result = runner.invoke(app, ["train", "moco", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--preset", "tiny"])
    assert result.exit_code == 2
    result = runner.invoke(app, [*common, "--preset", "huge"])
    assert result.exit_code == 2


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
@pytest.mark.slow  # starts two torchrun processes
def test_torchrun_two_processes(blob_dataset, tmp_path):
    """DDP (gloo): keys gathered across ranks into one queue, shuffle BN across ranks."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    command = [
        torchrun, "--standalone", "--nproc_per_node", "2", str(ROOT / "cli.py"), "train", "moco",
        "--data", str(blob_dataset), "--out", str(tmp_path), "--preset", "tiny", "--steps", "3", "--device", "cpu",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    meta = json.loads((tmp_path / "moco_checkpoint.json").read_text())
    assert meta["step"] == 3
    network = load_network("moco", tmp_path)
    assert network.embed(torch.zeros(1, 3, 32, 32)).shape[0] == 1
