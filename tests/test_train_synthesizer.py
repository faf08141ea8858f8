import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from generation.checkpoints import checkpoint_exists
from generation.errors import InputError
from generation.registry import network_config, network_exists, save_network
from tests.test_solov2 import ellipse_scene
from training.train_synthesizer import SynthesizerTraining, augment, evaluate_synthesizer, train_synthesizer

COLOURS = np.array([(0, 0, 0), (250, 0, 0), (0, 250, 0)], np.uint8)


@pytest.fixture
def ellipses(tmp_path):
    """A dataset folder of 8 ellipse scenes at 64 px: 6 train, 2 val."""
    root = tmp_path / "ellipses"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    rows = ["file,split"]
    for i in range(8):
        image, mask = ellipse_scene(rng)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
        rows.append(f"{i}.png,{'val' if i >= 6 else 'train'}")
    (root / "split.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.json").write_text(json.dumps({"0": "background", "1": "red", "2": "green"}))
    return root


def options(data, out, **changes) -> SynthesizerTraining:
    values = dict(data=str(data), out=str(out), size=64, preset="tiny", epochs=2, batch=2, warmup_steps=2, device="cpu", lr=3e-3)
    values.update(changes)
    return SynthesizerTraining(**values)


def test_augment_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    _, mask = ellipse_scene(rng)
    image = COLOURS[mask]
    for seed in range(10):
        out_image, out_mask = augment(image, mask, np.random.default_rng(seed), (0.7, 1.4), 0.0)
        assert out_image.shape == (64, 64, 3) and out_mask.shape == (64, 64) and out_mask.dtype == np.uint8
        for index in (1, 2):
            region = out_mask == index
            if region.sum() > 20:
                # Interpolated edges aside, the pixels of class k keep class k's colour.
                assert np.median(out_image[region], axis=0) == pytest.approx(COLOURS[index], abs=10)
    flipped = [augment(image, mask, np.random.default_rng(s), (1.0, 1.0), 0.0)[1] for s in range(10)]
    assert any(np.array_equal(f, mask[:, ::-1]) for f in flipped) and any(np.array_equal(f, mask) for f in flipped)


def test_train_writes_bundle_metrics_and_resumes(ellipses, tmp_path):
    out = tmp_path / "bundle"
    report = train_synthesizer(options(ellipses, out, epochs=1), log=lambda _: None)
    assert report.metrics["epochs"] == 1 and report.steps == 3 and report.metrics["best_val_dice"] is not None
    assert network_exists(out, "synthesizer") and checkpoint_exists(out, "synthesizer_state")
    with pytest.raises(InputError):  # an existing run is never overwritten silently
        train_synthesizer(options(ellipses, out), log=lambda _: None)

    # Interrupt the second epoch after its first step, then resume: it finishes where it stopped.
    def interrupt(step, total, loss):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_synthesizer(options(ellipses, out, resume=True, checkpoint_minutes=0.0), on_step=interrupt, log=lambda _: None)
    report = train_synthesizer(options(ellipses, out, resume=True), log=lambda _: None)
    assert report.metrics["epochs"] == 2 and report.steps == 6
    lines = [json.loads(line) for line in (out / "synthesizer_metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert all("val_dice" in line and "loss" in line for line in lines)
    assert set(lines[-1]["val_dice_per_class"]) <= {"red", "green"}

    result = evaluate_synthesizer(out, ellipses, "val", device="cpu")
    assert result["images"] + result["empty"] == 2 and 0 <= result["mean"] <= 100


def test_cli_train_evaluate_and_sketch(ellipses, tmp_path):
    from cli import app

    runner = CliRunner()
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["train", "synthesizer", "--data", str(ellipses), "--out", str(out), "--size", "64",
                                 "--preset", "tiny", "--epochs", "1", "--batch", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "synthesizer.safetensors" in result.output
    result = runner.invoke(app, ["train", "evaluate-synthesizer", "--bundle", str(out), "--data", str(ellipses), "--split", "val", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "mean" in json.loads(result.output)
    result = runner.invoke(app, ["sketch", str(ellipses / "images"), "--out", str(tmp_path / "sk"), "--bundle", str(out), "--size", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "sk" / "sketches").glob("*.png"))) == 8
    assert len(list((tmp_path / "sk" / "masks").glob("*.png"))) == 8
    # User mistakes: one line, exit code 2.
    result = runner.invoke(app, ["sketch", str(ellipses / "images"), "--out", str(tmp_path / "sk"), "--bundle", str(tmp_path / "none")])
    assert result.exit_code == 2 and "error:" in result.output
    result = runner.invoke(app, ["train", "synthesizer", "--data", str(tmp_path / "missing"), "--out", str(out), "--size", "64"])
    assert result.exit_code == 2 and "error:" in result.output
    result = runner.invoke(app, ["train", "synthesizer", "--data", str(ellipses), "--out", str(tmp_path / "b2"), "--size", "48"])
    assert result.exit_code == 2 and "multiple of 32" in result.output


def test_init_backbone_from_c_bundle(tmp_path):
    import dataclasses

    import torch

    from generation.moco import MocoEncoder
    from generation.resnet import ResNetConfig
    from generation.solov2 import SOLOv2
    from training.train_synthesizer import init_backbone_from

    torch.manual_seed(0)
    config = dataclasses.replace(network_config("moco", "tiny"), backbone=ResNetConfig(depth=18, width=8))
    encoder = MocoEncoder(config)
    save_network("moco", encoder, tmp_path / "c")
    model = SOLOv2(network_config("synthesizer", "tiny", num_classes=2))  # ResNet-18 width 8 as well
    assert init_backbone_from(model, tmp_path / "c") == len(model.backbone.state_dict())
    assert torch.equal(model.backbone.layer3[0].conv1.weight, encoder.backbone.layer3[0].conv1.weight)
    narrow = dataclasses.replace(config, backbone=ResNetConfig(depth=18, width=4))
    save_network("moco", MocoEncoder(narrow), tmp_path / "narrow")
    with pytest.raises(InputError):
        init_backbone_from(model, tmp_path / "narrow")
