"""The benchmark scripts run at a tiny size and return their documented keys (numbers are not checked)."""

import json

from bench import bench_faiss, bench_index, bench_index_memory, bench_ivfpq, bench_search
from indexing.ingest import index_folders
from indexing.workspace import open_workspace_for_search
from retrieval.models import SystemModels
from retrieval.vector import ArchiveEmbedder

PEAK = ["--threads", "1", "--matmul-size", "128", "--copy-mb", "8"]  # conftest runs tests on one thread
COMMON = {"command", "benchmark", "config", "machine", "peak"}


def test_faiss_reports_every_index_and_the_exact_bound(tmp_path):
    out = tmp_path / "faiss.json"
    result = bench_faiss.main(["--sizes", "600", "--queries", "20", "--latency-queries", "4", "--nprobe", "4,1000",
                               "--ef", "16", "--clusters", "8", "--out", str(out), *PEAK])
    assert json.loads(out.read_text()) == result
    assert COMMON | {"results", "target", "notes"} <= result.keys()
    assert {"matmul_gflops", "copy_gb_s"} <= result["peak"].keys()
    assert [(r["distribution"], r["n"]) for r in result["results"]] == [("random", 600), ("clustered", 600)]
    for size in result["results"]:
        assert [index["kind"] for index in size["indexes"]] == ["flat", "ivf", "hnsw"]
        flat, ivf, _ = size["indexes"]
        assert flat["searches"][0]["recall"] == 1.0  # flat is the truth
        assert [row["setting"] for row in ivf["searches"]] == [{"nprobe": 4}]  # nprobe above nlist is skipped
        for index in size["indexes"]:
            assert {"build_s", "index_bytes", "searches"} <= index.keys() and index["index_bytes"] > 600 * 384 * 4
            for row in index["searches"]:
                assert {"latency_ms", "batch_qps", "recall", "recall_heldout", "recall_perturbed"} <= row.keys()
                assert {"p50", "p95"} <= row["latency_ms"].keys()
        assert {"bytes_per_query", "min_ms", "measured_p50_ms"} <= size["flat_bound"].keys()
        assert size["best"]["recall"] >= 0.95
    assert result["target"].startswith("not measured")


def test_search_reports_stages_flops_and_memory(tiny_chain, tmp_path):
    data, bundle, _ = tiny_chain
    index_folders(data / "images", tmp_path / "ws", ArchiveEmbedder(SystemModels(bundle, "cpu")), batch_size=8)
    result = bench_search.main(["--bundle", str(bundle), "--workspace", str(tmp_path / "ws"), "--queries", "3",
                                "--warmup", "1", "--batch", "2", *PEAK])
    assert COMMON | {"archive", "queries", "stages_ms", "end_to_end_ms", "batched", "flops", "peak_rss_mib", "target"} <= result.keys()
    assert result["archive"]["images"] == 24 and result["queries"] == 3
    assert {"normalize", "E", "G", "H1", "C", "faiss", "S", "rerank", "total"} <= result["stages_ms"].keys()
    assert {"E", "G", "H1", "C", "S", "faiss"} <= result["flops"].keys()
    assert all(result["flops"][stage]["gflop"] > 0 for stage in ("E", "G", "H1", "C", "S"))
    assert result["batched"]["queries_per_s"] > 0 and result["peak_rss_mib"] > 0
    assert {"applies", "p50_met", "rss_met"} <= result["target"].keys() and not result["target"]["applies"]


def test_ivfpq_replicates_an_archive_and_scores_the_dice_re_rank(tiny_chain, tmp_path):
    data, bundle, _ = tiny_chain
    index_folders(data / "images", tmp_path / "ws", ArchiveEmbedder(SystemModels(bundle, "cpu")), batch_size=8)
    workspace = open_workspace_for_search(tmp_path / "ws")
    dim = workspace.dim
    workspace.close()
    result = bench_ivfpq.main(["--sizes", "600", "--sources", "real", "--workspace", str(tmp_path / "ws"), "--dim", str(dim),
                               "--queries", "20", "--latency-queries", "2", "--k", "5", "--candidates", "20",
                               "--nprobe", "1000", "--refine", "1,120", "--scratch", str(tmp_path / "scratch"), *PEAK])
    [record] = result["results"]
    assert record["source"] == "real" and record["archive_images"] == 24 and record["bytes_per_vector"] > 0
    codes, exact = record["searches"]
    assert {"latency_ms", "recall", "candidates_latency_ms", "recall_reranked"} <= codes.keys()
    # every cell visited and all 600 vectors re-scored: the exact top k, before and after the re-rank
    assert exact["refine"] == 120 and exact["recall"] == 1.0 and exact["recall_reranked"] == 1.0
    assert 0 <= codes["recall_reranked"] <= 1


def test_index_reports_throughput_and_parts(tiny_chain, tmp_path):
    data, bundle, _ = tiny_chain
    result = bench_index.main(["--bundle", str(bundle), "--data", str(data), "--limit", "6", "--batch-size", "4",
                               "--part-images", "4", "--workspace", str(tmp_path / "ws"), *PEAK])
    assert COMMON | {"index_run", "parts_ms_per_image", "peak_rss_mib", "target"} <= result.keys()
    run = result["index_run"]
    assert run["images"] == 6 and run["images_per_s"] > 0
    assert set(run["split_s"]) == {"embed", "load", "commit", "discover_plan"}
    assert {"S", "C", "sketch_normalize", "E", "fuse", "sum"} <= result["parts_ms_per_image"].keys()
    assert isinstance(result["target"]["met"], bool)


def test_index_memory_reports_each_archive(tiny_chain):
    result = bench_index_memory.main(["--bundle", str(tiny_chain[1]), "--side", "300", "--batch-side", "200", "--count", "2"])
    assert list(result["runs"]) == ["1 x 256^2 PNG", "1 x 300^2 PNG", "2 x 200^2 PNG", "2 x 200^2 JPEG"]
    assert [run["images"] for run in result["runs"].values()] == [1, 1, 2, 2]
    assert all(run["peak_rss_mb"] > 0 for run in result["runs"].values()) and isinstance(result["met"], bool)


def test_baselines_report_step_times(tmp_path):
    from bench import bench_baselines

    result = bench_baselines.main(["--preset", "tiny", "--steps", "1", "--batch", "2", "--out", str(tmp_path / "b.json"), *PEAK])
    assert COMMON | {"results"} <= result.keys()
    assert [row["model"] for row in result["results"]] == ["cyclegan", "unit", "ugatit"]
    assert all({"s_per_step", "images_per_s", "steps_in_budget", "default_steps"} <= row.keys() for row in result["results"])
