"""The screenshot of the search page in the README (docs/web_search.png), with a real bundle.

    python cli.py demo --out /tmp/demo
    python docs/screenshot_web.py --workspace /tmp/demo/workspace --sketch /tmp/demo/query_sketch.png --out docs/web_search.png

Starts `cli.py serve` on 127.0.0.1 and a free port, opens the page in headless Chromium (Debian's,
through Playwright, as the end-to-end test does), optionally shows a template, uploads the sketch,
searches, opens the first result and saves a full-page screenshot. Needs the `serve` and `dev` extras.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load_server import start_server  # noqa: E402  (starts `serve` on a free port and waits for /api/health)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", type=Path, required=True)
    p.add_argument("--sketch", type=Path, required=True, help="sketch file uploaded on the page")
    p.add_argument("--template", type=Path, help="image shown faintly under the drawing")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "web_search.png")
    args = p.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("Debian's chromium is not installed (apt-get install -y chromium)")

    base, server = start_server(argparse.Namespace(workspace=args.workspace, bundle=None, threads=0, max_concurrent=32))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(base)
            page.wait_for_function("() => document.getElementById('info').textContent.includes('images')")
            if args.template:
                page.set_input_files("#template-file", str(args.template))
            page.set_input_files("#sketch-file", str(args.sketch))
            page.locator("#search").click()
            page.wait_for_function("() => document.querySelectorAll('#results .result').length > 0", timeout=120_000)
            page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(img => img.complete && img.naturalWidth > 0)")
            page.locator("#results .result").first.click()
            page.wait_for_function("() => document.getElementById('detail-image').complete && document.getElementById('detail-masks').complete")
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        server.wait(30)


if __name__ == "__main__":
    main()
