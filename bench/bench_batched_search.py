"""Where a batch of searches spends its time: `Retriever.search_many` against one search at a time.

    python bench/bench_batched_search.py --workspace WS [--bundle B] --batch 16 --threads 1

The queries: `bench/load_server.py`'s drawn sketches (512 px), cycled to `--batch` of them; each way
runs `--repeats` times after one untimed warm-up. Reports queries/s of each way, and per query the
median time of each stage (`timings_ms`): a network stage's time in a batch is the batch's, so the
per-query share of it is that divided by the batch.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load_server import sketches  # noqa: E402
from retrieval.search import Retriever, SearchRequest  # noqa: E402

NETWORK_STAGES = ("E", "G", "C", "S")  # and H1 ... HT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, required=True)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    drawn = [Image.open(io.BytesIO(data)) for data in sketches()]
    requests = [SearchRequest(drawn[i % len(drawn)], k=10) for i in range(args.batch)]
    report = {"batch": args.batch, "threads": args.threads}
    with Retriever(args.workspace, args.bundle, device="cpu") as retriever:
        retriever.search_many(requests[:2])  # warm-up
        for way in ("one_at_a_time", "batched"):
            walls, stages = [], {}
            for _ in range(args.repeats):
                start = time.perf_counter()
                results = [retriever.search_many([r])[0] for r in requests] if way == "one_at_a_time" else retriever.search_many(requests)
                walls.append(time.perf_counter() - start)
                for result in results:
                    for stage, ms in result.timings_ms.items():
                        network = stage in NETWORK_STAGES or stage.startswith("H")
                        stages.setdefault(stage, []).append(ms / (args.batch if way == "batched" and network else 1))
            report[way] = {"queries_per_s": round(args.batch / float(np.median(walls)), 2),
                           "per_query_ms": {stage: round(float(np.median(v)), 2) for stage, v in stages.items() if stage != "total"}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
