"""Indexing with a real (tiny) bundle and searching by sketch: `index`, `search`, `Retriever`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from generation.bundle import write_manifest
from generation.dataset import ImageDataset
from generation.device import bfloat16_supported
from generation.errors import InputError
from generation.images import load_rgb, square_resize
from generation.phantom import write_phantom_dataset
from indexing.ingest import index_folders
from indexing.workspace import open_workspace_for_search
from retrieval.align import Alignment, aligned_distances, alignment_scores
from retrieval.metrics import dice_per_image
from retrieval.models import SystemModels
from retrieval.search import Retriever
from retrieval.vector import (
    ArchiveEmbedder,
    VectorRecipe,
    archive_parts,
    fuse_vectors,
    sketch_field,
)

runner = CliRunner()
PHANTOM_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "phantom"


@pytest.fixture(scope="module")
def models(tiny_chain):
    return SystemModels(tiny_chain[1], "cpu")


def own_sketch(models, image: np.ndarray) -> np.ndarray:
    """The synthesized sketch S draws of an archive image, at the bundle's resolution."""
    return models.S.synthesize([square_resize(image, models.S.config.size)], models.resolution)[0][0]


def test_fused_vectors_are_unit_and_weight_the_three_cosines():
    import torch

    f, w, e = torch.randn(4, 5), torch.randn(4, 3), torch.randn(4, 6)
    recipe = VectorRecipe(sketch=2, code=1, image=1)  # normalised to 0.5, 0.25, 0.25
    assert (recipe.sketch, recipe.code, recipe.image) == (0.5, 0.25, 0.25)
    v = fuse_vectors(f, w, e, recipe)
    assert v.shape == (4, 14) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-6)
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    assert v[0] @ v[1] == pytest.approx(0.5 * cos(f[0], f[1]) + 0.25 * cos(w[0], w[1]) + 0.25 * cos(e[0], e[1]), abs=1e-5)
    assert VectorRecipe.parse(recipe.tag) == recipe
    with pytest.raises(InputError, match="expected sketch=A,code=B,image=C"):
        VectorRecipe.parse("sketch=1,colour=2")
    with pytest.raises(InputError, match="must be non-negative, not all 0"):
        VectorRecipe(sketch=-1)


def test_sketch_field_tolerates_small_shifts_and_tells_shapes_apart():
    canvas = np.full((64, 64), 255, np.uint8)
    ring, shifted, bar = canvas.copy(), canvas.copy(), canvas.copy()
    yy, xx = np.mgrid[:64, :64]
    ring[np.abs(np.hypot(yy - 32, xx - 32) - 15) < 1] = 0
    shifted[np.abs(np.hypot(yy - 34, xx - 33) - 15) < 1] = 0  # the same ring, 2 px down, 1 px right
    bar[30:33, 8:56] = 0
    fields = sketch_field(np.stack([ring, shifted, bar, canvas]))
    assert fields.shape == (4, 256)
    assert float(fields[0] @ fields[1]) > 0.85 > 0.5 > float(fields[0] @ fields[2])
    assert float(fields[3].abs().sum()) == 0  # a blank sketch has no field


def test_own_synthesized_sketch_finds_its_image_first(tiny_chain, models, tmp_path):
    """The sketch-code path end to end (S -> normalise -> E -> FAISS -> catalog): a query that is an
    archive image's own synthesized sketch gets that image's code exactly, so with the vector made
    of its sketch field and code alone (image weight 0) and no re-ranking it must come first, for
    every image. (The image part depends on how well G is trained; the tiny bundle's is not.)"""
    data, _, _ = tiny_chain
    index_folders(data / "images", tmp_path / "ws", ArchiveEmbedder(models, VectorRecipe(sketch=0.5, code=0.5, image=0)), batch_size=8)
    dataset = ImageDataset(data)
    with Retriever(tmp_path / "ws", models=models) as retriever:
        for i in range(len(dataset)):
            result = retriever.search(own_sketch(models, dataset.image(i)), k=3, rerank=False)
            assert result.results[0].path == str(dataset.samples[i].image_path), i
            assert result.results[0].similarity == pytest.approx(1.0, abs=1e-4)


@pytest.mark.skipif(not bfloat16_supported(torch.device("cpu")), reason="this CPU has no native bfloat16 (AVX-512 BF16 or AMX)")
def test_a_bfloat16_index_finds_each_image_by_its_float32_sketch(tmp_path):
    """`index --precision bfloat16` with the shipped phantom bundle: S and C on the archive in
    bfloat16, the queries in float32. (A mask whose score sits at S's threshold may flip, so single
    vectors can move by more than rounding; the median does not.)"""
    data = tmp_path / "phantom"
    write_phantom_dataset(data, 24, 128, 5)
    dataset = ImageDataset(data)
    images = [dataset.image(i) for i in range(len(dataset))]
    float32_models, bfloat16_models = (SystemModels(PHANTOM_BUNDLE, "cpu", precision) for precision in ("float32", "bfloat16"))
    float32, bfloat16 = (ArchiveEmbedder(m).embed_images(images) for m in (float32_models, bfloat16_models))
    assert bfloat16.vectors.dtype == np.float32 and bfloat16.vectors.shape == float32.vectors.shape
    assert np.median((bfloat16.vectors * float32.vectors).sum(1)) > 0.999
    assert np.mean([(a != b).mean() for a, b in zip(bfloat16.label_maps, float32.label_maps)]) < 0.005
    index_folders(data / "images", tmp_path / "ws", ArchiveEmbedder(bfloat16_models), batch_size=8)
    with Retriever(tmp_path / "ws", models=float32_models) as retriever:
        for i, image in enumerate(images):
            assert retriever.search(own_sketch(float32_models, image), k=3).results[0].path == str(dataset.samples[i].image_path), i


def test_compiled_archive_networks_run_whole_batches_and_agree_with_eager(tiny_chain):
    """`index --compile`: S and C compiled for one batch size, every call padded to it (a new size
    would compile again), the padding dropped, and the parts those of the uncompiled networks up to
    float rounding."""
    data, bundle, _ = tiny_chain
    dataset = ImageDataset(data)
    images = [dataset.image(i) for i in range(7)]
    eager, compiled = SystemModels(bundle, "cpu"), SystemModels(bundle, "cpu")
    compiled.compile_archive(4)
    sizes = []
    for network in (compiled.S, compiled.C.encoder.backbone):
        network.register_forward_pre_hook(lambda module, args: sizes.append((type(module).__name__, args[0].shape[0])))
    want, got = archive_parts(eager, images), archive_parts(compiled, images)
    assert sorted(set(sizes)) == [("ResNet", 4), ("SOLOv2", 4)]  # 7 images: 4, then 3 padded to 4
    assert got.codes.shape == want.codes.shape and len(got.labels) == 7
    assert torch.nn.functional.cosine_similarity(got.embeddings, want.embeddings).min() > 0.999
    assert torch.nn.functional.cosine_similarity(got.codes, want.codes).min() > 0.99
    assert np.mean(got.labels != want.labels) < 0.01


def test_index_compile_compiles_for_each_ranks_share_of_a_batch(tiny_chain, tmp_path, monkeypatch):
    data, bundle, _ = tiny_chain
    batches = []
    monkeypatch.setattr(SystemModels, "compile_archive", lambda self, batch_size: batches.append(batch_size))
    result = runner.invoke(app, ["index", str(data / "images"), "--workspace", str(tmp_path / "ws"), "--bundle", str(bundle),
                                 "--device", "cpu", "--batch-size", "6", "--compile"])
    assert result.exit_code == 0, result.output
    assert batches == [6]


def test_a_precision_the_machine_lacks_is_refused_before_any_network_loads(tiny_chain, tmp_path, monkeypatch):
    data, bundle, _ = tiny_chain
    monkeypatch.setattr("generation.device.bfloat16_supported", lambda device: False)
    for precision, message in (("bfloat16", "error: no native bfloat16 on this CPU (a CPU needs AVX-512 BF16 or AMX); use --precision float32"),
                               ("float16", "error: unknown precision 'float16'; choose one of float32, bfloat16")):
        result = runner.invoke(app, ["index", str(data / "images"), "--workspace", str(tmp_path / "ws"), "--bundle", str(bundle),
                                     "--device", "cpu", "--precision", precision])
        assert result.exit_code == 2 and result.output.strip() == message, result.output
    assert not (tmp_path / "ws").exists()


def test_images_up_to_1024_px_get_the_vectors_of_their_full_pixels(tiny_chain, models, tmp_path):
    """Large images are reduced while they are loaded for indexing; these are not, so their vectors
    are exactly `archive_parts` of the whole decoded file."""
    dataset = ImageDataset(tiny_chain[0])
    archive = tmp_path / "archive"
    archive.mkdir()
    Image.fromarray(dataset.image(0)).resize((256, 256), Image.BICUBIC).save(archive / "a_256.png")
    Image.fromarray(dataset.image(1)).resize((1024, 768), Image.BICUBIC).save(archive / "b_1024.jpg", quality=90)
    Image.fromarray(dataset.image(2)).resize((1024, 1024), Image.BICUBIC).save(archive / "c_1024.png")
    embedder = ArchiveEmbedder(models)
    index_folders(archive, tmp_path / "ws", embedder, batch_size=8)
    paths = sorted(archive.resolve().iterdir())
    expected = embedder.embed_images([load_rgb(path) for path in paths]).vectors
    with open_workspace_for_search(tmp_path / "ws") as workspace:
        ids, vectors = workspace.catalog.vectors()
        records = workspace.records_for(ids)
    stored = {records[int(i)].path: vector for i, vector in zip(ids, vectors)}
    np.testing.assert_array_equal(np.stack([stored[str(path)] for path in paths]), expected)
    assert [(records[int(i)].width, records[int(i)].height) for i in ids] == [(256, 256), (1024, 768), (1024, 1024)]


def test_a_huge_image_is_found_by_its_own_synthesized_sketch(tiny_chain, models, tmp_path):
    """Indexed from its reduced pixels, found by the sketch S draws of its full pixels, recorded at
    its own size."""
    data, _, _ = tiny_chain
    dataset = ImageDataset(data)
    archive = tmp_path / "archive"
    shutil.copytree(data / "images", archive)
    (archive / dataset.samples[3].image_path.name).unlink()
    huge = archive / "huge.png"
    Image.fromarray(dataset.image(3)).resize((4800, 3600), Image.BICUBIC).save(huge)
    index_folders(archive, tmp_path / "ws", ArchiveEmbedder(models, VectorRecipe(sketch=0.5, code=0.5, image=0)), batch_size=8)
    with Retriever(tmp_path / "ws", models=models) as retriever:
        [first, *_] = retriever.search(own_sketch(models, load_rgb(huge)), k=3, rerank=False).results
        assert first.path == str(huge.resolve()) and first.similarity > 0.99
        record = retriever.workspace.records_for([first.id])[first.id]
        assert (record.width, record.height) == (4800, 3600)


def test_rerank_orders_by_the_dice_of_S_masks(tiny_chain, models, tmp_path):
    data, _, _ = tiny_chain
    index_folders(data / "images", tmp_path / "ws", ArchiveEmbedder(models), batch_size=8)
    sketch = own_sketch(models, ImageDataset(data).image(5))
    with Retriever(tmp_path / "ws", models=models) as retriever:
        result = retriever.search(sketch, k=24, candidates=24, lam=0.0, alignment=None)
        dice = [hit.dice for hit in result.results]
        assert dice == sorted(dice, reverse=True) and len(dice) == 24
        masks = retriever.workspace.masks_for([hit.id for hit in result.results])
        classes = int(max(result.labels.max(), *(m.max() for m in masks.values()))) + 1
        for hit in result.results[:5]:  # the reported DICE is the DICE of S(x_hat) and the stored masks
            expected = dice_per_image(result.labels, masks[hit.id], classes).mean
            assert hit.dice == pytest.approx(0.0 if np.isnan(expected) else expected, abs=1e-3)
            assert hit.score == pytest.approx(hit.dice / 100, abs=1e-5)
        plain = retriever.search(sketch, k=5, rerank=False)
        assert all(hit.dice is None and hit.aligned_chamfer is None and hit.score == hit.similarity for hit in plain.results)
        assert set(result.timings_ms) >= {"normalize", "E", "G", "H1", "H2", "H3", "C", "faiss", "S", "rerank", "total"}


def test_alignment_orders_by_the_aligned_chamfer_to_the_stored_contours(tiny_chain, models, tmp_path):
    """With all the weight on the alignment, the final score is exp(-d / tau) of the reported aligned
    chamfer distance d, which is that of the query's strokes to the stored masks' contours."""
    data, _, _ = tiny_chain
    index_folders(data / "images", tmp_path / "ws", ArchiveEmbedder(models), batch_size=8)
    sketch = own_sketch(models, ImageDataset(data).image(7))
    alignment = Alignment(weight=1.0, tau=2.0)
    with Retriever(tmp_path / "ws", models=models) as retriever:
        result = retriever.search(sketch, k=24, candidates=24, alignment=alignment)
        masks = retriever.workspace.masks_for([hit.id for hit in result.results])
        expected = aligned_distances(result.sketch, [masks[hit.id] for hit in result.results], alignment)
    assert [hit.aligned_chamfer for hit in result.results] == pytest.approx([d if np.isfinite(d) else None for d in expected], abs=1e-3)
    scores = [hit.score for hit in result.results]
    assert scores == sorted(scores, reverse=True)
    assert scores == pytest.approx(alignment_scores(expected, 2.0).tolist(), abs=1e-5)


@pytest.mark.parametrize("name", ["one short stroke", "all on one edge"])
def test_degenerate_sketches_still_return_results(tiny_chain, models, tmp_path, name):
    data, _, _ = tiny_chain
    index_folders(data / "images", tmp_path / "ws", ArchiveEmbedder(models), batch_size=8)
    sketch = np.full((256, 256), 255, np.uint8)
    if name == "one short stroke":
        sketch[120:123, 110:130] = 0
    else:
        sketch[:, 0:3] = 0
    with Retriever(tmp_path / "ws", models=models) as retriever:
        result = retriever.search(sketch, k=5)
    assert [hit.rank for hit in result.results] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(hit.score) for hit in result.results)


def test_index_and_search_commands(tiny_chain, tmp_path):
    data, bundle, _ = tiny_chain
    archive = tmp_path / "archive"
    shutil.copytree(data / "images", archive)
    (archive / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    workspace = ["--workspace", str(tmp_path / "ws")]
    result = runner.invoke(app, ["index", str(archive), *workspace, "--bundle", str(bundle), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "added 24" in result.output and "skipped 1" in result.output and "broken.png" in result.output
    again = runner.invoke(app, ["index", str(archive), *workspace, "--bundle", str(bundle), "--device", "cpu"])
    assert again.exit_code == 0 and "added 0, unchanged 24" in again.output

    sketch = tmp_path / "query.png"
    Image.fromarray(own_sketch(SystemModels(bundle, "cpu"), ImageDataset(data).image(2))).resize((256, 256), Image.NEAREST).save(sketch)
    out = tmp_path / "out"
    result = runner.invoke(app, ["search", str(sketch), "-k", "4", *workspace, "--json", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["schema_version"] == 3 and [hit["rank"] for hit in answer["results"]] == [1, 2, 3, 4]
    assert set(answer["results"][0]) >= {"rank", "path", "score", "similarity", "dice", "aligned_chamfer"} and answer["timings_ms"]["total"] > 0
    assert all((out / name).is_file() for name in ("sketch.png", "generated.png", "results.png"))
    table = runner.invoke(app, ["search", str(sketch), "-k", "2", *workspace, "--no-rerank", "--device", "cpu"])
    assert table.exit_code == 0 and "similarity" in table.output and "phantom_" in table.output


def test_search_refuses_what_does_not_fit(tiny_chain, tmp_path):
    data, bundle, _ = tiny_chain
    empty = runner.invoke(app, ["search", str(tmp_path / "q.png"), "--workspace", str(tmp_path / "none")])
    assert empty.exit_code == 2 and "no such workspace" in empty.output and "Traceback" not in empty.output

    workspace = ["--workspace", str(tmp_path / "ws")]
    assert runner.invoke(app, ["index", str(data / "images"), *workspace, "--bundle", str(bundle), "--device", "cpu"]).exit_code == 0
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((128, 128), 255, np.uint8)).save(blank)
    result = runner.invoke(app, ["search", str(blank), *workspace])
    assert result.exit_code == 2 and "empty" in result.output
    photo = tmp_path / "photo.png"
    Image.fromarray(ImageDataset(data).image(0)).save(photo)
    result = runner.invoke(app, ["search", str(photo), *workspace])
    assert result.exit_code == 2 and "Traceback" not in result.output

    other = tmp_path / "other"  # the same networks but a retrained E: another bundle
    shutil.copytree(bundle, other, ignore=shutil.ignore_patterns("cache", "samples"))
    with open(other / "encoder.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x00\x80\x3f")
    write_manifest(other)  # as saving a retrained network does: the manifest records the new digest
    result = runner.invoke(app, ["search", str(blank), *workspace, "--bundle", str(other)])
    assert result.exit_code == 2 and "another bundle" in result.output


def test_demo_generates_indexes_sketches_and_searches(tiny_chain, tmp_path, monkeypatch):
    _, bundle, _ = tiny_chain
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--bundle", str(bundle), "--images", "12", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "sketched phantom_" in result.output
    for name in ("query_sketch.png", "sketch.png", "generated.png", "results.png"):
        assert (tmp_path / "demo" / name).is_file()
    assert Image.open(tmp_path / "demo" / "results.png").width >= 6 * 128
    monkeypatch.setenv("SKETCH2MEDI_BUNDLE", str(tmp_path / "missing"))
    missing = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo2")])
    assert missing.exit_code == 2 and "SKETCH2MEDI_BUNDLE" in missing.output


@pytest.mark.slow  # starts two torchrun processes
def test_index_command_under_torchrun_matches_one_process(tiny_chain, models, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from indexing.catalog import Catalog

    torchrun = shutil.which("torchrun") or shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    data, bundle, _ = tiny_chain
    repo = Path(__file__).resolve().parents[1]
    command = [torchrun, "--standalone", "--nproc_per_node", "2", str(repo / "cli.py"), "index", str(data / "images"),
               "--workspace", str(tmp_path / "ddp"), "--bundle", str(bundle), "--device", "cpu", "--batch-size", "4"]
    result = subprocess.run(command, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "added 24" in result.stdout
    index_folders(data / "images", tmp_path / "one", ArchiveEmbedder(models), batch_size=8)
    vectors = {}
    for name in ("ddp", "one"):
        with Catalog(f"sqlite:///{tmp_path / name / 'catalog.sqlite'}", create=False) as catalog:
            ids, stored = catalog.vectors()
            records = catalog.records(ids.tolist())
            vectors[name] = {records[i].path: v for i, v in zip(ids.tolist(), stored)}
    assert vectors["ddp"].keys() == vectors["one"].keys() and len(vectors["one"]) == 24
    for path, vector in vectors["one"].items():
        np.testing.assert_allclose(vectors["ddp"][path], vector, atol=1e-4)


def test_a_bundle_names_its_own_vector_weights_and_export_keeps_them(tiny_chain, tmp_path):
    from generation.bundle import export_bundle

    _, bundle, _ = tiny_chain
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("cache", "samples"))
    assert ArchiveEmbedder(SystemModels(copy, "cpu")).recipe == VectorRecipe()  # no search.json: the defaults
    (copy / "search.json").write_text(json.dumps({"vector_weights": "sketch=0.6,code=0.4,image=0", "chosen_on": "a test"}))
    embedder = ArchiveEmbedder(SystemModels(copy, "cpu"))
    assert embedder.recipe == VectorRecipe(0.6, 0.4, 0.0) and embedder.bundle_id.endswith(":vector=sketch=0.6,code=0.4,image=0")
    assert ArchiveEmbedder(SystemModels(copy, "cpu"), VectorRecipe(1, 0, 0)).recipe == VectorRecipe(1, 0, 0)  # --weights wins
    export_bundle(copy, tmp_path / "exported")
    assert ArchiveEmbedder(SystemModels(tmp_path / "exported", "cpu")).recipe == VectorRecipe(0.6, 0.4, 0.0)
    (copy / "search.json").write_text('{"weights": 1}')
    with pytest.raises(InputError, match=r'search.json: expected \{"vector_weights": "sketch=A,code=B,image=C"\} .*; fix or delete it$'):
        ArchiveEmbedder(SystemModels(copy, "cpu"))
