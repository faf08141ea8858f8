"""One way to save, load and configure a network; damaged or replaced weight files are refused."""

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from generation.bundle import MANIFEST, read_manifest, write_manifest
from generation.checkpoints import save_checkpoint
from generation.errors import InputError
from generation.pipeline import Sketch2MedI
from generation.registry import BUNDLE_NETWORKS, NETWORK_NAMES, load_network, network_config, network_exists, save_network

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "bundles" / "phantom", ROOT / "bundles" / "vocalfolds"]
# The state key inside each network's files: part of the on-disk format.
STATE_KEYS = {"moco": "model", "synthesizer": "model", "generator": "G", "encoder": "E", "refiner": "H", "pix2pix": "G",
              "cyclegan": "G", "unit": "G", "ugatit": "G", "discriminator": "D", "domain": "domain"}
REMEDY = "re-export or re-download the bundle"


def tiny_networks() -> dict[str, torch.nn.Module]:
    """One randomly initialised tiny instance of every registered network (what `build` makes)."""
    from generation.cyclegan import ResnetGenerator
    from generation.domain import SketchDomainClassifier
    from generation.encoder import SketchEncoder
    from generation.moco import MocoEncoder
    from generation.pix2pix import UNetGenerator
    from generation.refiner import Refiner
    from generation.solov2 import SOLOv2
    from generation.stylegan2 import Discriminator, Generator
    from generation.ugatit import UGATITGenerator
    from generation.unit import UNITGenerator

    torch.manual_seed(0)
    G = Generator(network_config("generator", "tiny"))
    return {
        "moco": MocoEncoder(network_config("moco", "tiny")),
        "synthesizer": SOLOv2(network_config("synthesizer", "tiny", num_classes=2)),
        "generator": G,
        "discriminator": Discriminator(G.config),
        "encoder": SketchEncoder(network_config("encoder", "tiny", resolution=32, w_dim=G.config.w_dim)),
        "refiner": Refiner(network_config("refiner", "tiny", G=G)),
        "pix2pix": UNetGenerator(network_config("pix2pix", "tiny")),
        "cyclegan": ResnetGenerator(network_config("cyclegan", "tiny")),
        "unit": UNITGenerator(network_config("unit", "tiny")),
        "ugatit": UGATITGenerator(network_config("ugatit", "tiny")),
        "domain": SketchDomainClassifier(network_config("domain", "tiny")),
    }


def copy_bundle(tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(SHIPPED[0], target)
    return target


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the tensor data, past the header: the file still parses
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------
# The registry


def test_every_network_round_trips_with_identical_state(tmp_path):
    networks = tiny_networks()
    assert set(networks) == set(NETWORK_NAMES)
    for name, model in networks.items():
        save_network(name, model, tmp_path, meta={"training": {"steps": 1}})
        assert network_exists(tmp_path, name)
        meta = json.loads((tmp_path / f"{name}.json").read_text())
        assert list(meta) == ["config", "training", "states"] and list(meta["states"]) == [STATE_KEYS[name]]
        loaded = load_network(name, tmp_path)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        stored = loaded.encoder if name == "moco" else loaded  # C is used through FeatureNetwork
        assert stored.config == model.config
        for (key, x), y in zip(model.state_dict().items(), stored.state_dict().values()):
            assert torch.equal(x, y), (name, key)


def test_configs_presets_and_names_are_checked():
    assert network_config("generator", "cpu").resolution == 64
    assert network_config("moco", "cpu", steps=5, image_size=64).load_size == 72  # keeps the preset's decode margin
    assert network_config("synthesizer", "cpu", num_classes=3, size=64).size == 64
    with pytest.raises(InputError, match="unknown preset 'huge'; choose one of tiny, cpu, paper"):
        network_config("encoder", "huge", resolution=32, w_dim=32)
    with pytest.raises(InputError, match="unknown network 'vae'"):
        network_config("vae", "cpu")
    with pytest.raises(InputError, match="unknown network 'vae'"):
        network_exists(ROOT, "vae")


def test_a_missing_network_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(InputError, match=r"has no refiner.safetensors; train it with `train refiner`"):
        load_network("refiner", tmp_path)


@pytest.mark.parametrize("bundle", SHIPPED, ids=lambda p: p.name)
def test_the_shipped_bundles_keep_their_format(bundle):
    manifest = read_manifest(bundle)
    assert {key: entry["file"] for key, entry in manifest["networks"].items()} == \
        {key: f"{name}.safetensors" for key, name in BUNDLE_NETWORKS.items()}
    for name in BUNDLE_NETWORKS.values():
        with safe_open(str(bundle / f"{name}.safetensors"), "pt") as handle:
            assert {key.split(".")[0] for key in handle.keys()} == {STATE_KEYS[name]}
    model = Sketch2MedI.from_bundle(bundle, "cpu")
    assert model.H is not None and model.G.config.resolution == model.resolution
    C = load_network("moco", bundle)
    assert C.embed(torch.zeros(1, 3, 64, 64)).shape == (1, C.embedding_dim)


def test_importing_the_registry_and_the_bundle_code_loads_no_network():
    code = ("import sys, generation.registry, generation.bundle; "
            "print(sorted(m for m in sys.modules if m.startswith('generation.') "
            "and m.split('.')[1] in ('stylegan2', 'encoder', 'refiner', 'solov2', 'moco', 'pix2pix', 'cyclegan', 'unit', 'ugatit', 'resnet')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------
# Damaged and replaced weight files


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_weight_file_is_one_input_error_naming_it(tmp_path, damage):
    bundle = copy_bundle(tmp_path)
    weights = bundle / "generator.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000] if damage == "truncated" else b"\x07garbage" * 50)
    for manifest_present in (True, False):  # checked against the manifest's digest, and parsed without one
        with pytest.raises(InputError) as caught:
            Sketch2MedI.from_bundle(bundle, "cpu")
        message = str(caught.value)
        assert str(weights) in message and message.count(REMEDY) == 1 and "\n" not in message
        (bundle / MANIFEST).unlink(missing_ok=True)


def test_bit_flipped_weights_are_refused_against_the_manifest(tmp_path):
    bundle = copy_bundle(tmp_path)
    load_network("moco", bundle)  # verified once: the cache must not hide a later change
    flip_byte(bundle / "moco.safetensors")
    with pytest.raises(InputError) as caught:
        load_network("moco", bundle)
    message = str(caught.value)
    assert str(bundle / "moco.safetensors") in message and "sha256" in message and message.count(REMEDY) == 1
    from retrieval.models import SystemModels  # index and search load through it

    with pytest.raises(InputError, match="moco.safetensors: its sha256 differs"):
        SystemModels(bundle, "cpu")


def test_training_outputs_without_a_manifest_entry_are_not_checked(tmp_path):
    model = tiny_networks()["pix2pix"]
    save_network("pix2pix", model, tmp_path)
    flip_byte(tmp_path / "pix2pix.safetensors")
    load_network("pix2pix", tmp_path)  # no bundle.json: nothing to check against
    shutil.copy(SHIPPED[0] / MANIFEST, tmp_path / MANIFEST)  # pix2pix is never in a manifest either
    load_network("pix2pix", tmp_path)


def test_saving_a_network_into_a_bundle_refreshes_its_recorded_digest(tmp_path):
    bundle = copy_bundle(tmp_path)
    before = read_manifest(bundle)["networks"]["G"]["sha256"]
    G = load_network("generator", bundle)
    with torch.no_grad():
        G.mapping.w_avg.add_(1.0)
    save_network("generator", G, bundle, meta={"training": {"kimg": 1.0}})
    assert read_manifest(bundle)["networks"]["G"]["sha256"] != before
    assert torch.equal(load_network("generator", bundle).w_avg, G.w_avg)


def test_generate_on_a_damaged_bundle_exits_2_with_one_line(tmp_path):
    bundle = copy_bundle(tmp_path)
    (bundle / "encoder.safetensors").write_bytes(b"not weights")
    sketch = tmp_path / "sketch.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(sketch)
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "generate", str(sketch), "--out", str(tmp_path / "x.png"),
                             "--bundle", str(bundle), "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "encoder.safetensors" in result.stderr and REMEDY in result.stderr


# ------------------------------------------------------------------------------------------------
# Writers of one bundle do not share temporary files


def test_manifest_writes_use_their_own_temporary_file(tmp_path):
    bundle = copy_bundle(tmp_path)
    (bundle / f"{MANIFEST}.tmp").mkdir()  # another writer's temporary in the way
    write_manifest(bundle, notes=["rewritten"])
    assert read_manifest(bundle)["notes"] == ["rewritten"]
    assert sorted(p.name for p in bundle.iterdir() if p.name.endswith(".tmp")) == [f"{MANIFEST}.tmp"]


def test_concurrent_manifest_writers_leave_a_valid_manifest(tmp_path):
    bundle = copy_bundle(tmp_path)
    errors = []

    def write(worker: int) -> None:
        try:
            for round_ in range(5):
                write_manifest(bundle, notes=[f"writer {worker} round {round_}"])
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert read_manifest(bundle)["notes"][0].startswith("writer ")


def test_checkpoint_writes_leave_no_temporary_behind(tmp_path):
    save_checkpoint(tmp_path, "state", {"x": {"w": torch.ones(2)}}, {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]


def test_the_sketch_cache_uses_its_own_temporary_file(tmp_path):
    from generation.phantom import write_phantom_dataset
    from training.sketch_cache import cache_path, sketch_cache

    write_phantom_dataset(tmp_path / "phantom", n=3, size=64, seed=0)
    bundle = copy_bundle(tmp_path)
    target = cache_path(bundle, None, 32)
    target.parent.mkdir(parents=True)
    target.with_suffix(".tmp").mkdir()  # another writer's temporary in the way
    cache = sketch_cache(tmp_path / "phantom", bundle, 32, split=None)
    assert len(cache) == 3 and target.is_file()
    again = sketch_cache(tmp_path / "phantom", bundle, 32, split=None)  # read back from the file
    assert np.array_equal(again.sketches, cache.sketches)
