"""Memory of the web server under large pictures: its resident memory while 8 clients upload an
8000^2 PNG sketch at once, then while 3 clients each ask for an 8000^2 archive image and its
thumbnail at once (the target: under 1 GB in both).

    python bench/bench_server_memory.py --bundle bundles/phantom [--side 8000] [--json]

It builds an archive of one phantom image upscaled to `--side` px in a temporary folder, indexes it
with `cli.py index`, starts `cli.py serve` on 127.0.0.1 and reads the server's RSS from /proc every
20 ms. Reports the RSS when loaded, the peak and the RSS after each phase, and the request times.
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.load_server import rss_bytes, start_server  # noqa: E402
from generation.phantom import write_phantom_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_MB = 1024


def big_sketch(side: int) -> bytes:
    """An outline with a cleft, drawn at `side` px with lines of side/100 px: a small PNG of many
    pixels, in RGBA as the page's canvas sends it (the most bytes per pixel once decoded)."""
    image = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    draw = ImageDraw.Draw(image)
    width = max(1, side // 100)
    draw.ellipse([side * 0.18, side * 0.2, side * 0.82, side * 0.9], outline=(0, 0, 0, 255), width=width)
    draw.line([(side / 2, side * 0.22), (side / 2, side * 0.5)], fill=(0, 0, 0, 255), width=width)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def big_archive(folder: Path, side: int) -> Path:
    """One phantom image upscaled to side x side, as the only file of an archive folder."""
    write_phantom_dataset(folder / "phantom", n=1, size=256, seed=1)
    source = sorted((folder / "phantom" / "images").glob("*.png"))[0]
    archive = folder / "archive"
    archive.mkdir()
    Image.open(source).convert("RGB").resize((side, side), Image.BICUBIC).save(archive / "large.png")
    return archive


class RssSampler:
    """The peak RSS (MB) of a process between `start` and `stop`, sampled every 20 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._done, self._thread = pid, 0.0, threading.Event(), None

    def start(self) -> RssSampler:
        self.peak, self._done = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, (rss_bytes(self.pid) or 0) / 2**20)

    def stop(self) -> float:
        self._done.set()
        self._thread.join(5)
        return round(self.peak, 1)


def concurrently(requests: list, timeout: float = 600) -> list[tuple[int, float]]:
    """Run the request functions at once; (status, seconds) of each."""
    results: list[tuple[int, float]] = [(0, 0.0)] * len(requests)

    def one(i: int) -> None:
        began = time.perf_counter()
        try:
            status = requests[i]().status_code
        except httpx2.HTTPError:
            status = -1
        results[i] = (status, round(time.perf_counter() - began, 2))

    workers = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout)
    return results


def phase(pid: int, requests: list) -> dict:
    sampler = RssSampler(pid).start()
    results = concurrently(requests)
    peak = sampler.stop()
    return {"requests": len(requests), "statuses": sorted({status for status, _ in results}),
            "seconds_max": max(seconds for _, seconds in results), "peak_rss_mb": peak,
            "rss_after_mb": round((rss_bytes(pid) or 0) / 2**20, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--side", type=int, default=8000, help="Side in pixels of the uploaded sketch and the archive image.")
    parser.add_argument("--uploads", type=int, default=8, help="Concurrent uploads.")
    parser.add_argument("--viewers", type=int, default=3, help="Concurrent clients asking for the image and its thumbnail.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads of the server.")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        archive = big_archive(folder, args.side)
        args.workspace, args.max_concurrent = folder / "workspace", 32
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "index", str(archive), "--workspace", str(args.workspace),
                        "--bundle", str(args.bundle)], cwd=ROOT, check=True, capture_output=True)
        url, server = start_server(args)
        try:
            with httpx2.Client(base_url=url, timeout=600) as client:
                image_id = client.post("/api/search", files={"sketch": ("s.png", big_sketch(512), "image/png")},
                                       data={"k": "1"}).json()["results"][0]["id"]
                loaded = round((rss_bytes(server.pid) or 0) / 2**20, 1)
                sketch = big_sketch(args.side)

                def upload():
                    return client.post("/api/search", files={"sketch": ("s.png", sketch, "image/png")}, data={"k": "5"})

                uploads = phase(server.pid, [upload] * args.uploads)
                views = [lambda name=name: client.get(f"/api/images/{image_id}/{name}.png")
                         for _ in range(args.viewers) for name in ("image", "thumbnail")]
                images = phase(server.pid, views)
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    report = {"benchmark": "server_memory", "side": args.side, "upload_png_bytes": len(sketch), "rss_loaded_mb": loaded,
              "uploads": uploads, "archive_image": images,
              "target_mb": TARGET_MB, "met": max(uploads["peak_rss_mb"], images["peak_rss_mb"]) < TARGET_MB}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"server RSS loaded {loaded} MB")
        for name, row in (("uploads", uploads), ("archive image", images)):
            print(f"{row['requests']} concurrent {name}: peak {row['peak_rss_mb']} MB, after {row['rss_after_mb']} MB, "
                  f"slowest {row['seconds_max']} s, statuses {row['statuses']}")
        print(f"target under {TARGET_MB} MB: {'met' if report['met'] else 'NOT met'}")
    return report


if __name__ == "__main__":
    main()
