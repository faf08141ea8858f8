"""The draw-to-search page in a real headless Chromium (Debian's, driven by Playwright) against the
real server under uvicorn: draw with the mouse, search, and check the grid shows the API's answer.

SKETCH2MEDI_SCREENSHOT=1 also writes docs/web_search.png."""

import io
import math
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

from generation.dataset import ImageDataset  # noqa: E402
from indexing.ingest import index_folders  # noqa: E402
from retrieval.models import SystemModels  # noqa: E402
from retrieval.quality import Calibration  # noqa: E402
from retrieval.search import Retriever  # noqa: E402
from retrieval.server import create_app  # noqa: E402
from retrieval.vector import ArchiveEmbedder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "e2e-token"


@pytest.fixture(scope="module")
def server(tiny_chain, tmp_path_factory):
    """uvicorn on 127.0.0.1 and a free port, in a thread, with an access token: (base url, retriever)."""
    data, bundle, _ = tiny_chain
    models = SystemModels(bundle, "cpu")
    workspace = tmp_path_factory.mktemp("web") / "ws"
    index_folders(data / "images", workspace, ArchiveEmbedder(models), batch_size=8)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Retriever(workspace, models=models) as retriever:
        recording = Recording(retriever)
        config = uvicorn.Config(create_app(recording, token=TOKEN), host="127.0.0.1", port=port, log_level="warning")
        running = uvicorn.Server(config)
        thread = threading.Thread(target=running.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not running.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", recording
        running.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield launched
        launched.close()


def stroke(page, points: list[tuple[float, float]]) -> None:
    """One mouse stroke through these points, given as fractions of the canvas."""
    box = page.locator("#canvas").bounding_box()
    at = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for point in at[1:]:
        page.mouse.move(*point, steps=3)
    page.mouse.up()


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> list[tuple[float, float]]:
    return [(cx + rx * math.cos(2 * math.pi * i / n), cy + ry * math.sin(2 * math.pi * i / n)) for i in range(n + 1)]


class Recording:
    """The server's retriever, keeping each sketch it is asked to search for (as decoded from the
    upload) with the options: Chromium does not show tests the body of a POST made of a Blob."""

    def __init__(self, inner: Retriever):
        self.inner, self.workspace, self.models, self.calls = inner, inner.workspace, inner.models, []

    def search(self, sketch: Image.Image, **options):
        buffer = io.BytesIO()
        sketch.save(buffer, "PNG")
        self.calls.append((buffer.getvalue(), options))
        return self.inner.search(sketch, **options)


def ink(page) -> int:
    return page.evaluate("""() => { const c = document.getElementById('canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }""")


def test_draw_search_and_browse_results(server, browser, tiny_chain, tmp_path):
    base, recording = server
    retriever = recording.inner
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("requestfailed", lambda request: errors.append(f"{request.url}: {request.failure}"))
    page.goto(f"{base}/?token={TOKEN}")  # sets the cookie, then the page loads without the token in its URL
    assert page.url == f"{base}/"
    page.wait_for_function("() => document.getElementById('info').textContent.includes('24 images')")

    # A template to trace over (an archive photograph): shown under the strokes, never sent.
    template = tmp_path / "template.png"
    Image.fromarray(ImageDataset(tiny_chain[0]).image(7)).save(template)
    page.set_input_files("#template-file", str(template))

    page.locator("#search").click()  # nothing drawn yet: the page says so and sends nothing
    assert "Draw a sketch first" in page.locator("#status").text_content()
    stroke(page, ellipse(0.5, 0.55, 0.3, 0.35))
    stroke(page, [(0.2, 0.2), (0.5, 0.35), (0.8, 0.2)])
    drawn = ink(page)
    stroke(page, [(0.1, 0.9), (0.9, 0.9)])
    assert ink(page) > drawn
    page.locator("#undo").click()
    assert ink(page) == drawn
    page.locator("#eraser").click()
    stroke(page, [(0.45, 0.05), (0.45, 0.95)])  # across the ellipse and the V
    assert ink(page) < drawn and page.locator("#eraser").get_attribute("aria-pressed") == "true"
    page.locator("#undo").click()
    page.locator("#pen").click()
    assert ink(page) == drawn

    page.locator("#search").click()
    page.wait_for_function("() => document.querySelectorAll('#results .result').length > 0")
    page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(img => img.complete && img.naturalWidth > 0)")

    assert len(recording.calls) == 1
    sketch, options = recording.calls[0]
    sent_pixels = np.asarray(Image.open(io.BytesIO(sketch)).convert("L"))
    assert sent_pixels.shape == (512, 512) and (sent_pixels > 250).mean() > 0.9  # strokes on white; no template in it

    # The grid is the API's answer for the very PNG the page sent, which is the Retriever's.
    fields = {"k": str(options["k"]), "lambda": str(options["lam"]), "rerank": str(options["rerank"]).lower()}
    answer = page.request.post(f"{base}/api/search", headers={"Authorization": f"Bearer {TOKEN}"},
                               multipart={"sketch": {"name": "sketch.png", "mimeType": "image/png", "buffer": sketch}, **fields}).json()
    expected = retriever.search(Image.open(io.BytesIO(sketch)), **options)
    shown = page.eval_on_selector_all("#results .result", "buttons => buttons.map(b => [Number(b.dataset.rank), Number(b.dataset.id)])")
    assert shown == [[hit["rank"], hit["id"]] for hit in answer["results"]] == [[hit.rank, hit.id] for hit in expected.results]
    assert len(shown) == 12
    thumbnails = page.eval_on_selector_all("#results img", "imgs => imgs.map(img => new URL(img.src).pathname)")
    assert thumbnails == [hit["thumbnail"] for hit in answer["results"]]
    first_caption = page.locator("#results .result").first.text_content()
    assert "#1" in first_caption and f"{answer['results'][0]['score']:.3f}" in first_caption

    # The generated image beside the query; clicking a result shows it large with its masks.
    assert page.evaluate("() => document.getElementById('query-image').naturalWidth") == retriever.models.resolution
    page.locator("#results .result").nth(2).click()
    third = answer["results"][2]
    page.wait_for_function("() => document.getElementById('detail-image').complete && document.getElementById('detail-masks').complete")
    assert page.evaluate("() => new URL(document.getElementById('detail-masks').src).pathname") == third["masks"]
    assert third["path"] in page.locator("#detail-caption").text_content()
    assert page.locator("#detail-masks").is_visible()
    page.locator("#show-masks").uncheck()
    assert not page.locator("#detail-masks").is_visible() and not page.locator("#query-masks").is_visible()
    page.locator("#show-masks").check()

    if os.environ.get("SKETCH2MEDI_SCREENSHOT") == "1":
        page.locator("#results .result").first.click()
        page.wait_for_function("() => document.getElementById('detail-image').complete")
        page.screenshot(path=str(ROOT / "docs" / "web_search.png"), full_page=True)

    # A photograph uploaded as the sketch: the server's one-line reason is shown, the grid kept.
    page.set_input_files("#sketch-file", str(template))
    page.locator("#search").click()
    page.wait_for_function("() => document.getElementById('status').classList.contains('error')")
    assert "photograph" in page.locator("#status").text_content()
    assert page.locator("#results .result").count() == 12

    # Live search: a stroke on a cleared canvas searches by itself, once drawing pauses.
    page.locator("#clear").click()
    page.locator("#live").check()
    before = len(recording.calls)
    stroke(page, ellipse(0.5, 0.5, 0.25, 0.3))
    page.wait_for_function("() => document.getElementById('status').textContent.includes('results in')")
    assert len(recording.calls) == before + 1
    errors = [error for error in errors if "/api/search" not in error]  # aborted fetches are fine
    assert errors == []
    page.close()


def test_the_page_says_no_close_match_above_the_results(server, browser):
    """The notice follows the API's `no_close_match`: shown when the best hit is below the
    calibration's threshold, hidden when it is above and when the bundle has no calibration."""
    base, recording = server
    retriever = recording.inner
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{base}/?token={TOKEN}")
    page.wait_for_function("() => document.getElementById('info').textContent.includes('24 images')")
    stroke(page, ellipse(0.5, 0.55, 0.3, 0.35))

    def search() -> None:
        before = len(recording.calls)
        page.evaluate("() => { document.getElementById('status').textContent = ''; }")  # the previous search's line
        page.locator("#search").click()
        page.wait_for_function("() => document.getElementById('status').textContent.includes('results in')")
        assert len(recording.calls) == before + 1

    search()  # the tiny bundle has no calibration
    assert not page.locator("#no-match").is_visible() and page.locator("#results .result").count() == 12
    # Quality rises with the field cosine (0.5 at 0.9); no hit reaches quality 1.01, every hit quality 0
    field = np.array([1.0, 0, 0, 0])
    try:
        retriever.calibration = Calibration(retriever.models.bundle_id, np.array([0.9, 0, 0, 0]), np.array([0.02, 1, 1, 1]), field, 0.0, 1.01, 50.0)
        search()
        notice = page.locator("#no-match")
        assert notice.is_visible() and "No close match" in notice.text_content()
        assert page.evaluate("() => document.getElementById('no-match').compareDocumentPosition(document.getElementById('results'))") & 4
        page.locator("#results .result").first.click()
        assert "match quality" in page.locator("#detail-caption").text_content()
        retriever.calibration = Calibration(retriever.models.bundle_id, np.array([0.9, 0, 0, 0]), np.array([0.02, 1, 1, 1]), field, 0.0, 0.0, 50.0)
        search()
        assert not page.locator("#no-match").is_visible() and page.locator("#results .result").count() == 12
    finally:
        retriever.calibration = None
    page.close()
