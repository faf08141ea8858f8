"""`train all --preset gpu`: its wiring, run end to end on the CPU with tiny sizes in place of its budgets."""

import json

import numpy as np
import pytest

from generation.errors import InputError
from generation.phantom import write_phantom_dataset
from generation.pipeline import Sketch2MedI
from generation.registry import load_network
from generation.sketch import sketch_from_mask
from training.train_all import BUDGETS, train_all
from training.train_sketch2medi import PHASE_PRESETS

# Every size of the preset shrunk to seconds on a CPU; the preset's other choices (its networks,
# bf16, the budget keys' wiring to each trainer) stay.
TINY_SIZES = dict(
    moco_steps=2, moco_options=dict(batch_size=8, image_size=32, queue_size=16),
    synthesizer_images=48, synthesizer_size=64, synthesizer_options=dict(batch=4, lr=3e-3, warmup_steps=2),
    generator_config=dict(resolution=32, z_dim=32, w_dim=32, mapping_layers=2, channel_base=512, channel_max=32),
    generator_kimg=0.024, generator_options=dict(batch=8, bf16=True, snap_kimg=0.016),
    encoder_options=dict(steps=3, batch=4, log_every=1, snap_every=3),
    refiner_options=dict(steps=2, batch=4, log_every=1, snap_every=2),
)


def test_gpu_preset_budgets_the_whole_chain_at_256_px_in_bf16():
    budget = BUDGETS["gpu"]
    assert budget["generator_config"]["resolution"] == budget["synthesizer_size"] == budget["moco_options"]["image_size"] == 256
    assert budget["generator_options"]["bf16"] and PHASE_PRESETS["gpu"]["encoder"]["bf16"] and PHASE_PRESETS["gpu"]["refiner"]["bf16"]


def test_train_all_gpu_preset_runs_end_to_end_and_writes_a_loadable_bundle(tmp_path):
    data, out = tmp_path / "phantom", tmp_path / "bundle"
    write_phantom_dataset(data, 24, 64, 0)
    reports = train_all(data, out, "gpu", device="cpu", log=lambda message: None, overrides=TINY_SIZES)
    assert [(r.stage, r.status) for r in reports] == [(stage, "trained") for stage in ("C", "S", "G", "sketches", "E", "H")]
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["preset"] == "gpu" and set(manifest["networks"]) == {"C", "S", "G", "E", "H"}
    G = load_network("generator", out)
    assert G.config.resolution == 32 and G.config.w_dim == 32  # the overridden generator_config reached G
    assert json.loads((out / "generator.json").read_text())["training"]["options"]["bf16"] is True
    assert load_network("encoder", out).config.backbone.width == 32  # E is the cpu preset's ResNet-18 w32
    model = Sketch2MedI.from_bundle(out, "cpu")
    sketch = sketch_from_mask(np.pad(np.ones((12, 12), np.uint8), 10))
    result = model.generate(sketch[None])
    assert result.images.shape == (1, 3, 32, 32) and len(result.steps) == 1 + model.default_steps


def test_train_all_refuses_an_unknown_budget_entry(tmp_path):
    with pytest.raises(InputError, match=r"unknown budget entries \['generator_steps'\]; choose from "):
        train_all(tmp_path, tmp_path / "bundle", "gpu", overrides={"generator_steps": 1})
