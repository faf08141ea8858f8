"""Load test of the web server (`sketch2medi serve`) on this machine.

N client threads search for T seconds with a few drawn sketches; every `--bad-every`-th request of
each client is instead a bad upload (oversized, truncated PNG, not an image) that must get a 4xx
and must not disturb the others. Reports throughput, p50/p95 latency of the searches, failures,
and the server's resident memory at start and end.

    python bench/load_server.py --workspace WS [--bundle B] --clients 20 --seconds 60 [--batch-wait-ms 10 --max-batch 16]
    python bench/load_server.py --url http://127.0.0.1:8000 --server-pid PID   # a server already running

Only 127.0.0.1 / localhost is accepted as a target, and count and time are capped.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx2
import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
MAX_CLIENTS, MAX_SECONDS = 64, 600
OVERSIZED_BYTES = 11 * 1024 * 1024  # over the server's 10 MB default


def sketches(n: int = 4, size: int = 512) -> list[bytes]:
    """A few line drawings of the kind a clinician makes: an outline, a cleft, a pair of lobes."""
    drawn = []
    for i in range(n):
        image = Image.new("L", (size, size), 255)
        draw = ImageDraw.Draw(image)
        s = size / 512
        draw.ellipse([(90 + 12 * i) * s, 110 * s, (420 - 10 * i) * s, (460 - 8 * i) * s], outline=0, width=int(5 * s))
        draw.line([(256 * s, 120 * s), (256 * s, (230 + 20 * i) * s)], fill=0, width=int(5 * s))
        for side in (-1, 1):
            cx = 256 + side * (95 + 8 * i)
            draw.ellipse([(cx - 40) * s, 250 * s, (cx + 40) * s, (350 + 10 * i) * s], outline=0, width=int(5 * s))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        drawn.append(buffer.getvalue())
    return drawn


def bad_uploads(valid: bytes) -> list[tuple[str, bytes]]:
    return [("oversized", valid + bytes(OVERSIZED_BYTES)), ("truncated", valid[: len(valid) // 2]),
            ("not-an-image", b"%PDF-1.4 this is a document, not a sketch\n" * 20)]


def rss_bytes(pid: int) -> int | None:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    except Exception:  # the process is gone
        return None
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args) -> tuple[str, subprocess.Popen]:
    port = free_port()
    command = [sys.executable, str(ROOT / "cli.py"), "serve", "--host", "127.0.0.1", "--port", str(port),
               "--workspace", str(args.workspace), "--threads", str(args.threads), "--max-concurrent", str(args.max_concurrent)]
    if args.bundle:
        command += ["--bundle", str(args.bundle)]
    if args.batch_wait_ms is not None:
        command += ["--batch-wait-ms", str(args.batch_wait_ms)]
    if args.max_batch is not None:
        command += ["--max-batch", str(args.max_batch)]
    if args.compile:
        command += ["--compile"]
    env = {k: v for k, v in os.environ.items() if k != "SKETCH2MEDI_TOKEN"}
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + (900 if args.compile else 180)
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"error: the server exited: {server.stderr.read().strip().splitlines()[-1:]}")
        try:
            if httpx2.get(f"{url}/api/health", timeout=2).status_code == 200:
                return url, server
        except httpx2.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    sys.exit("error: the server did not answer within 180 s")


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run(url: str, clients: int, seconds: float, bad_every: int, k: int, token: str | None) -> dict:
    valid = sketches()
    bad = bad_uploads(valid[0])
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    lock = threading.Lock()
    latencies: list[float] = []
    outcomes: Counter = Counter()  # (kind, status or exception name)
    stop_at = time.monotonic() + seconds

    def client(number: int) -> None:
        with httpx2.Client(base_url=url, headers=headers, timeout=60) as session:
            i = 0
            while time.monotonic() < stop_at:
                i += 1
                if bad_every and i % bad_every == 0:
                    kind, body = bad[(number + i // bad_every) % len(bad)]
                else:
                    kind, body = "search", valid[(number + i) % len(valid)]
                started = time.perf_counter()
                try:
                    response = session.post("/api/search", files={"sketch": ("sketch.png", body, "image/png")}, data={"k": str(k)})
                    status: int | str = response.status_code
                    if kind != "search" or status == 200:
                        response.json()  # every answer, error or not, is JSON
                except (httpx2.HTTPError, ValueError) as error:
                    status = type(error).__name__
                elapsed = time.perf_counter() - started
                with lock:
                    outcomes[(kind, status)] += 1
                    if kind == "search" and status == 200:
                        latencies.append(elapsed)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    elapsed = time.monotonic() - started
    searches_ok = outcomes[("search", 200)]
    busy = outcomes[("search", 503)]
    failed_searches = sum(n for (kind, status), n in outcomes.items() if kind == "search" and status not in (200, 503))
    bad_refused = sum(n for (kind, status), n in outcomes.items() if kind != "search" and isinstance(status, int) and 400 <= status < 500)
    bad_wrong = sum(n for (kind, status), n in outcomes.items() if kind != "search") - bad_refused
    return {
        "url": url, "clients": clients, "seconds": round(elapsed, 1), "k": k,
        "searches_ok": searches_ok, "throughput_per_s": round(searches_ok / elapsed, 2),
        "latency_ms": {"p50": _ms(percentile(latencies, 50)), "p95": _ms(percentile(latencies, 95)), "max": _ms(max(latencies, default=None))},
        "busy_503": busy, "failed_searches": failed_searches, "bad_uploads_refused_4xx": bad_refused, "bad_uploads_not_4xx": bad_wrong,
        "outcomes": {f"{kind} {status}": n for (kind, status), n in sorted(outcomes.items(), key=str)},
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--workspace", type=Path, help="Start `sketch2medi serve` on this workspace (on a free port).")
    target.add_argument("--url", help="A server already running on 127.0.0.1 (e.g. http://127.0.0.1:8000).")
    parser.add_argument("--bundle", type=Path, help="With --workspace: the bundle (default: the workspace's).")
    parser.add_argument("--server-pid", type=int, help="With --url: the server's process id, for its memory.")
    parser.add_argument("--token", default=os.environ.get("SKETCH2MEDI_TOKEN"), help="Access token, if the server wants one.")
    parser.add_argument("--clients", type=int, default=20, help=f"Concurrent clients (at most {MAX_CLIENTS}).")
    parser.add_argument("--seconds", type=float, default=60, help=f"How long they search (at most {MAX_SECONDS}).")
    parser.add_argument("--bad-every", type=int, default=5, help="Every n-th request of a client is a bad upload (0 = none).")
    parser.add_argument("-k", type=int, default=10, help="Results per search.")
    parser.add_argument("--threads", type=int, default=1, help="With --workspace: torch threads of the server.")
    parser.add_argument("--max-concurrent", type=int, default=4, help="With --workspace: the server's search slots.")
    parser.add_argument("--compile", action="store_true", help="With --workspace: serve with --compile.")
    parser.add_argument("--batch-wait-ms", type=float, help="With --workspace: the server's batch wait (default: serve's).")
    parser.add_argument("--max-batch", type=int, help="With --workspace: the server's largest batch (default: serve's).")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--clients must be 1-{MAX_CLIENTS} and --seconds 0-{MAX_SECONDS}")

    server = None
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            parser.error("--url must be on this machine (127.0.0.1 or localhost)")
        url, pid = args.url.rstrip("/"), args.server_pid
    else:
        url, server = start_server(args)
        pid = server.pid
    try:
        # One search first, so the start memory is the loaded server's, not a half-started one.
        warm = httpx2.post(f"{url}/api/search", files={"sketch": ("s.png", sketches()[0], "image/png")}, data={"k": "1"},
                          headers={"Authorization": f"Bearer {args.token}"} if args.token else {}, timeout=120)
        if warm.status_code != 200:
            sys.exit(f"error: the first search failed: {warm.status_code} {warm.text[:200]}")
        rss_start = rss_bytes(pid) if pid else None
        samples: list[float] = []  # the server's RSS every second of the run: growth shows as a trend
        done = threading.Event()

        def sample() -> None:
            while pid and not done.wait(1.0):
                value = rss_bytes(pid)
                if value is not None:
                    samples.append(_mb(value))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        report = run(url, args.clients, args.seconds, args.bad_every, args.k, args.token)
        done.set()
        sampler.join(5)
        rss_end = rss_bytes(pid) if pid else None
        quarter = max(len(samples) // 4, 1)
        report["server_rss_mb"] = {
            "start": _mb(rss_start), "end": _mb(rss_end), "every_10s": samples[::10],
            # the first quarter holds the warm-up (allocator pools, oneDNN caches); a leak keeps growing after it
            "max_first_quarter": max(samples[:quarter], default=None), "max_last_quarter": max(samples[-quarter:], default=None)}
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    if args.json:
        print(json.dumps(report, indent=1))
        return
    latency = report["latency_ms"]
    print(f"{report['clients']} clients, {report['seconds']} s against {url}")
    print(f"searches ok {report['searches_ok']} ({report['throughput_per_s']}/s), latency p50 {latency['p50']} ms, "
          f"p95 {latency['p95']} ms, max {latency['max']} ms")
    print(f"busy (503) {report['busy_503']}, failed searches {report['failed_searches']}, "
          f"bad uploads refused with 4xx {report['bad_uploads_refused_4xx']}, bad uploads not 4xx {report['bad_uploads_not_4xx']}")
    rss = report["server_rss_mb"]
    print(f"server RSS {rss['start']} MB at start, {rss['end']} MB at end; highest {rss['max_first_quarter']} MB in the first "
          f"quarter of the run, {rss['max_last_quarter']} MB in the last; every 10 s: {rss['every_10s']}")
    print("outcomes: " + ", ".join(f"{name}: {n}" for name, n in report["outcomes"].items()))


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


if __name__ == "__main__":
    main()
