"""The sketch-domain classifier: trained on the archive's drawings against scribbles, it tells them apart."""

import json

import numpy as np
import pytest
import torch

from generation.domain import DomainConfig, SketchDomainClassifier
from generation.errors import InputError
from generation.registry import load_network
from generation.sketch import sketch_to_tensor
from retrieval.calibrate import scribble_queries
from retrieval.quality import FEATURES, hit_features, load_calibration
from training.train_domain import DomainOptions, in_domain_pool, random_similarity, train_domain


def test_the_classifier_refuses_a_sketch_of_another_size():
    model = SketchDomainClassifier(DomainConfig(32, (8, 16)))
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2,)
    with pytest.raises(AssertionError, match=r"expected \(N, 1, 32, 32\)"):
        model(torch.zeros(2, 1, 64, 64))


def test_random_similarity_keeps_drawings_binary_and_moves_them():
    sketches = torch.zeros(4, 1, 32, 32)
    sketches[:, :, 8:24, 15:17] = 1  # a vertical bar
    moved = random_similarity(sketches, np.random.default_rng(0))
    assert set(moved.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(moved, sketches) and moved.sum() > 0


def test_the_classifier_is_the_mean_of_its_towers_and_reads_one_tower_files():
    torch.manual_seed(0)
    model = SketchDomainClassifier(DomainConfig(32, (8, 16), members=2)).eval()
    sketches = (torch.rand(3, 1, 32, 32) > 0.9).float()
    with torch.no_grad():
        assert torch.allclose(model(sketches), (model.towers[0](sketches) + model.towers[1](sketches)) / 2)
        one = SketchDomainClassifier(DomainConfig(32, (8, 16))).eval()
        legacy = {key.removeprefix("towers.0."): value for key, value in one.state_dict().items()}  # blocks.*, head.*
        assert set(legacy) and not any(key.startswith("towers") for key in legacy)
        reloaded = SketchDomainClassifier(DomainConfig(32, (8, 16))).eval()
        reloaded.load_state_dict(legacy)
        assert torch.equal(reloaded(sketches), one(sketches))
    with pytest.raises(InputError, match="members 0 must be at least 1"):
        DomainConfig(32, (8, 16), members=0)


def _bundle_with_generator(tiny_chain, tmp_path_factory, name):
    import shutil

    data, bundle, _ = tiny_chain
    target = tmp_path_factory.mktemp(name)
    for suffix in (".json", ".safetensors"):
        shutil.copy(bundle / f"generator{suffix}", target / f"generator{suffix}")
    return data, target


def test_each_tower_is_trained_as_a_one_tower_run_of_its_own_seed(tiny_chain, tmp_path_factory):
    data, both = _bundle_with_generator(tiny_chain, tmp_path_factory, "towers")
    _, second = _bundle_with_generator(tiny_chain, tmp_path_factory, "second")
    options = DomainOptions(steps=20, batch=16, drawings=1, negatives="none")
    quiet = {"split": "train", "log": lambda message: None}
    result = train_domain(data, both, "tiny", options, members=2, **quiet)
    train_domain(data, second, "tiny", DomainOptions(steps=20, batch=16, drawings=1, negatives="none", seed=1), **quiet)
    towers, alone = load_network("domain", both).towers, load_network("domain", second).towers
    assert len(towers) == 2 and len(alone) == 1 and result.steps == 40
    assert all(torch.equal(a, b) for a, b in zip(towers[1].state_dict().values(), alone[0].state_dict().values()))
    assert not torch.equal(towers[0].head.weight, towers[1].head.weight)
    assert len(json.loads((both / "domain.json").read_text())["training"]["towers"]) == 2


@pytest.fixture(scope="module")
def trained_domain(tiny_chain, tmp_path_factory):
    data, target = _bundle_with_generator(tiny_chain, tmp_path_factory, "domain")
    options = DomainOptions(steps=400, batch=32, drawings=2, negatives="none")
    return data, target, train_domain(data, target, "tiny", options, split="train", log=lambda message: None)


def test_training_lowers_the_loss_and_separates_the_archives_drawings_from_scribbles(trained_domain):
    data, bundle, result = trained_domain
    assert result.metrics["last_loss"] < 0.5 * result.metrics["first_loss"], result.metrics
    model = load_network("domain", bundle)
    from generation.dataset import ImageDataset

    drawings = in_domain_pool(ImageDataset(data, "test"), 1, model.config.resolution, seed=9)  # images it never saw
    scribbles = np.stack(scribble_queries(9, len(drawings), model.config.resolution).sketches)
    with torch.no_grad():
        inside, outside = model(sketch_to_tensor(drawings)), model(sketch_to_tensor(scribbles))
    assert (inside > 0).float().mean() > 0.7 and (outside < 0).float().mean() > 0.7, (inside, outside)
    assert json.loads((bundle / "domain.json").read_text())["training"]["options"]["negatives"] == "none"


def test_the_domain_logit_is_a_feature_of_every_hit_clipped():
    sizes = (2, 2, 2)
    query, hits = np.ones(6, np.float32), np.ones((3, 6), np.float32)
    features = hit_features(query, hits, np.array([10.0, 20.0, 30.0]), sizes, domain=50.0)
    assert np.all(features[:, FEATURES.index("domain")] == 8.0)
    assert np.isnan(hit_features(query, hits, None, sizes)[:, FEATURES.index("domain")]).all()


def test_a_calibration_fitted_with_another_domain_classifier_is_refused(trained_domain, tmp_path):
    from generation.images import file_sha256
    from retrieval.quality import Calibration, DomainGate

    _, bundle, _ = trained_domain
    gate = DomainGate(1.0, 0.0, file_sha256(bundle / "domain.safetensors"))
    calibration = Calibration("id", np.zeros(1), np.ones(1), np.ones(1), 0.0, 0.5, 50.0, features=("field",), domain=gate)
    calibration.save(bundle)
    assert load_calibration(bundle, "id").domain == gate
    calibration.domain = DomainGate(1.0, 0.0, "0" * 64)
    calibration.save(bundle)
    with pytest.raises(InputError, match="fitted with another sketch-domain classifier"):
        load_calibration(bundle, "id")
    (bundle / "calibration.json").unlink()


def test_train_domain_command_takes_members_and_seed(tiny_chain, tmp_path_factory):
    from typer.testing import CliRunner

    from cli import app

    data, bundle = _bundle_with_generator(tiny_chain, tmp_path_factory, "command")
    result = CliRunner().invoke(app, ["train", "domain", "--data", str(data), "--bundle", str(bundle), "--preset", "tiny",
                                      "--steps", "5", "--members", "2", "--seed", "3", "--negatives", "none", "--threads", "1"])
    assert result.exit_code == 0, result.output
    record = json.loads((bundle / "domain.json").read_text())
    assert record["config"]["members"] == 2 and record["training"]["options"]["seed"] == 3 and len(record["training"]["towers"]) == 2
    assert "for 10 steps" in result.output
