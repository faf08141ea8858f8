"""The draw-to-search page in a real headless Chromium (Debian's, driven by Playwright) against the
real server under uvicorn: draw with the mouse, search, and check the grid shows the API's answer;
over an archive of DICOM files, the cards' metadata and group counts, the grouping selector, more
like this, thumbs up and down, the filter bar and an archive image as the template.

docs/screenshot_web.py makes the README's screenshot the same way."""

import contextlib
import io
import math
import shutil
import socket
import threading
import time
from dataclasses import fields
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

from test_server import write_clinic_archive  # noqa: E402

from generation.dataset import ImageDataset  # noqa: E402
from indexing.ingest import index_folders  # noqa: E402
from retrieval.models import SystemModels  # noqa: E402
from retrieval.quality import Calibration  # noqa: E402
from retrieval.search import Retriever, SearchRequest  # noqa: E402
from retrieval.server import create_app  # noqa: E402
from retrieval.vector import ArchiveEmbedder  # noqa: E402

TOKEN = "e2e-token"


@contextlib.contextmanager
def serving(workspace: Path, models: SystemModels):
    """uvicorn on 127.0.0.1 and a free port, in a thread, with an access token: (base url, recording retriever)."""
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
def models(tiny_chain):
    return SystemModels(tiny_chain[1], "cpu")


@pytest.fixture(scope="module")
def server(tiny_chain, models, tmp_path_factory):
    """The page over the 24 phantom images (plain PNG files)."""
    workspace = tmp_path_factory.mktemp("web") / "ws"
    index_folders(tiny_chain[0] / "images", workspace, ArchiveEmbedder(models), batch_size=8)
    with serving(workspace, models) as served:
        yield served


@pytest.fixture(scope="module")
def clinic_server(tiny_chain, models, tmp_path_factory):
    """The page over the clinic archive of tests/test_server.py (DICOM files of two patients, three
    studies, and a plain PNG): (base url, recording retriever, {file name: catalog id})."""
    root = tmp_path_factory.mktemp("clinic-web")
    index_folders(write_clinic_archive(root / "clinic-a", tiny_chain[0]), root / "ws", ArchiveEmbedder(models), batch_size=8)
    with serving(root / "ws", models) as (base, recording):
        records = recording.workspace.records_for(recording.workspace.catalog.ids())
        yield base, recording, {Path(record.path).name: image_id for image_id, record in records.items()}


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield launched
        launched.close()


def stroke(page, points: list[tuple[float, float]]) -> None:
    """One mouse stroke through these points, given as fractions of the canvas."""
    page.locator("#canvas").scroll_into_view_if_needed()  # a click below it may have scrolled it partly out of view
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

    def search_many(self, requests: list[SearchRequest]):
        for request in requests:
            buffer = io.BytesIO()
            if request.sketch is not None:
                request.sketch.save(buffer, "PNG")
            self.calls.append((buffer.getvalue() or None, {f.name: getattr(request, f.name) for f in fields(request) if f.name != "sketch"}))
        return self.inner.search_many(requests)


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

    # The grid is the API's answer for the very PNG the page sent, which is the Retriever's (no studies: not grouped).
    fields = {"k": "12", "lambda": str(options["lam"]), "rerank": str(options["rerank"]).lower()}
    answer = page.request.post(f"{base}/api/search", headers={"Authorization": f"Bearer {TOKEN}"},
                               multipart={"sketch": {"name": "sketch.png", "mimeType": "image/png", "buffer": sketch}, **fields}).json()
    assert answer["groups"] is None
    expected = retriever.search(Image.open(io.BytesIO(sketch)), **{**options, "k": 12})
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


# -- the cards, feedback, filters, groups and the template, over an archive with DICOM identifiers -------------------


def opened(browser, base: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{base}/?token={TOKEN}")
    page.wait_for_function("() => document.getElementById('info').textContent.includes('7 images')")
    return page, errors


def draw(page) -> None:
    stroke(page, ellipse(0.5, 0.55, 0.3, 0.35))
    stroke(page, [(0.2, 0.2), (0.5, 0.35), (0.8, 0.2)])


def searched(page, action) -> dict:
    """Do `action`, wait for the search it starts and for the page to show its answer: the answer."""
    with page.expect_response(lambda response: response.url.endswith("/api/search")) as response:
        action()
    page.wait_for_function("() => !document.getElementById('status').textContent.startsWith('Searching')")
    return response.value.json()


def card_ids(page) -> list[int]:
    return page.eval_on_selector_all("#results .card", "cards => cards.map(card => Number(card.dataset.id))")


def card(page, image_id: int):
    return page.locator(f"#results .card[data-id='{image_id}']")


def api(page, base: str, **fields) -> dict:
    multipart = {key: value for key, value in fields.items() if key != "like"}
    data = "&".join([f"{key}={value}" for key, value in multipart.items()] + [f"like={i}" for i in fields.get("like", [])])
    return page.request.post(f"{base}/api/search", headers={"Authorization": f"Bearer {TOKEN}",
                                                            "Content-Type": "application/x-www-form-urlencoded"}, data=data).json()


def test_cards_show_patient_study_date_modality_and_group_counts(clinic_server, browser):
    base, recording, ids = clinic_server
    page, errors = opened(browser, base)
    draw(page)
    answer = searched(page, lambda: page.locator("#search").click())
    # By study (the default where studies are known): one card per group, its best frame shown, with the group's size.
    assert card_ids(page) == [group["hits"][0]["id"] for group in answer["groups"]] and len(answer["groups"]) == 4
    for group in answer["groups"]:
        shown = card(page, group["hits"][0]["id"])
        if group["by"] == "image":  # the plain PNG: no identifiers, no group
            assert shown.locator(".count").count() == 0 and shown.locator(".meta").text_content() == f"id {group['key']}"
            continue
        size = f"study of {group['frames']} frame{'s' if group['frames'] > 1 else ''}"
        folded = group["hits"][0]["count"]
        assert shown.locator(".count").text_content() == size + (f" · {folded} near-identical as one" if folded > 1 else "")
        meta = shown.locator(".meta").text_content()
        date = group["study_date"]
        assert f"patient {group['patient_id']}" in meta and f"{date[:4]}-{date[4:6]}-{date[6:]}" in meta and group["modality"] in meta
    assert "Doe" not in page.content()  # the patient's name is in the files, never in the catalog or on the page

    # Every frame: the flat results, each card with its own file's identifiers.
    flat = searched(page, lambda: page.locator("#group").select_option("none"))
    assert flat["groups"] is None and card_ids(page) == [hit["id"] for hit in flat["results"]] and len(flat["results"]) == 7
    assert page.locator("#results .count").count() == 0
    meta = card(page, ids["s3b.dcm"]).locator(".meta").text_content()
    assert "patient P2" in meta and "study 1.2.826.3" in meta and "2022-06-01" in meta and "XA" in meta

    # More like s1a.dcm, grouped again: its study first, its copy s1b.dcm folded into the shown frame.
    searched(page, lambda: card(page, ids["s1a.dcm"]).locator(".more").click())
    searched(page, lambda: page.locator("#group").select_option("study"))
    assert recording.calls[-1][0] is None and recording.calls[-1][1]["like"] == [ids["s1a.dcm"]]
    first = page.locator("#results .card").first
    assert first.locator(".count").text_content() == "study of 3 frames · 2 near-identical as one"
    assert first.locator(".meta").text_content() == f"id {min(ids['s1a.dcm'], ids['s1b.dcm'])}patient P1study 1.2.826.12020-01-15ES"
    searched(page, lambda: page.locator("#group").select_option("patient"))
    assert page.locator("#results .count").all_text_contents() == ["patient of 4 frames · 2 near-identical as one", "patient of 2 frames"]
    assert errors == []
    page.close()


def test_more_like_this_and_thumbs_up_and_down_re_run_the_search(clinic_server, browser):
    base, recording, ids = clinic_server
    page, errors = opened(browser, base)
    page.locator("#group").select_option("none")
    draw(page)
    searched(page, lambda: page.locator("#search").click())
    drawn = recording.calls[-1][0]

    # More like this: the results of `like` with that id alone, no sketch. (s1a.dcm and s1b.dcm
    # hold the same pixels, so each ties with the other: the target is neither.)
    twins = {ids["s1a.dcm"], ids["s1b.dcm"]}
    target = next(i for i in card_ids(page)[2:] if i not in twins)
    answer = searched(page, lambda: card(page, target).locator(".more").click())
    sketch, options = recording.calls[-1]
    assert sketch is None and options["like"] == [target] and options["unlike"] == []
    assert card_ids(page) == [hit["id"] for hit in api(page, base, like=[target], k=12, group="none")["results"]]
    assert card_ids(page)[0] == target and answer["like"] == [target]

    # Thumbs up, then down: the drawing again, with the accumulated verdicts, shown on the cards and listed.
    up = card_ids(page)[1]
    searched(page, lambda: card(page, up).locator(".up").click())
    sketch, options = recording.calls[-1]
    assert sketch == drawn and options["like"] == [up] and options["unlike"] == []
    assert card(page, up).locator(".up").get_attribute("aria-pressed") == "true"
    down = next(i for i in card_ids(page) if i != up)
    searched(page, lambda: card(page, down).locator(".down").click())
    sketch, options = recording.calls[-1]
    assert sketch == drawn and (options["like"], options["unlike"]) == ([up], [down])
    assert card(page, down).locator(".down").get_attribute("aria-pressed") == "true"
    assert card(page, down).locator(".up").get_attribute("aria-pressed") == "false"
    assert page.locator("#liked .chip").all_text_contents() == [f"image {up} ×"]
    assert page.locator("#disliked .chip").all_text_contents() == [f"image {down} ×"]

    # Changing a verdict moves it; a chip takes one back; "Clear feedback" takes back all.
    searched(page, lambda: card(page, down).locator(".up").click())
    assert (recording.calls[-1][1]["like"], recording.calls[-1][1]["unlike"]) == ([up, down], [])
    searched(page, lambda: page.locator(f"#liked .chip[data-id='{up}']").click())
    assert (recording.calls[-1][1]["like"], recording.calls[-1][1]["unlike"]) == ([down], [])
    searched(page, lambda: page.locator("#feedback-clear").click())
    assert (recording.calls[-1][1]["like"], recording.calls[-1][1]["unlike"]) == ([], [])
    assert page.locator("#feedback").is_hidden() and page.locator("#results .up[aria-pressed='true']").count() == 0
    assert errors == []
    page.close()


def test_the_filter_bar_filters_and_shows_why_a_filter_is_refused(clinic_server, browser):
    base, recording, ids = clinic_server
    page, errors = opened(browser, base)
    page.locator("#group").select_option("none")
    draw(page)
    page.locator("#where").fill("modality=XA")
    answer = searched(page, lambda: page.locator("#where").press("Enter"))
    assert recording.calls[-1][1]["where"].text == "modality=XA" and answer["matching"] == 2
    assert sorted(card_ids(page)) == sorted([ids["s3a.dcm"], ids["s3b.dcm"]])
    assert all("XA" in text for text in page.locator("#results .meta").all_text_contents())
    assert "2 archive images match the filter" in page.locator("#status").text_content()
    assert page.locator("#where-error").is_hidden()

    calls = len(recording.calls)
    page.locator("#where").fill("colour=red")
    refused = searched(page, lambda: page.locator("#apply").click())
    assert page.locator("#where-error").is_visible() and page.locator("#where-error").text_content() == refused["error"]
    assert refused["error"].startswith("--where clause 'colour=red': unknown field 'colour'; use one of")
    assert page.locator("#where").get_attribute("aria-invalid") == "true"
    assert len(recording.calls) == calls and sorted(card_ids(page)) == sorted([ids["s3a.dcm"], ids["s3b.dcm"]])  # nothing searched

    page.locator("#where").fill("")
    searched(page, lambda: page.locator("#apply").click())
    assert page.locator("#where-error").is_hidden() and len(card_ids(page)) == 7
    assert errors == []
    page.close()


def test_an_archive_image_picked_by_id_is_the_template_and_is_never_sent(clinic_server, browser):
    base, recording, ids = clinic_server
    page, errors = opened(browser, base)
    draw(page)
    searched(page, lambda: page.locator("#search").click())
    without = recording.calls[-1][0]
    template_ink = """() => { const c = document.getElementById('template');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }"""
    assert page.evaluate(template_ink) == 0

    page.locator("#template-id").fill(str(ids["s2.dcm"]))
    page.locator("#template-show").click()
    page.wait_for_function(f"() => ({template_ink})() > 0")  # a function: the page's CSP forbids evaluating a string
    assert page.evaluate(template_ink) == 512 * 512  # the image, contained in the square canvas: a square fills it
    assert f"archive image {ids['s2.dcm']}" in page.locator("#status").text_content()
    searched(page, lambda: page.locator("#search").click())
    assert recording.calls[-1][0] == without  # the very same PNG: the template is not part of the sketch

    page.locator("#template-id").fill("999999")
    page.locator("#template-show").click()
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Template: image 999999')")
    assert page.locator("#status").text_content() == "Template: image 999999: not in the catalog"
    assert page.locator("#status").get_attribute("class") == "error"

    page.locator("#detail-template").click()  # the selected result (the first card) as the template
    first = card_ids(page)[0]
    page.wait_for_function(f"() => document.getElementById('status').textContent.includes('archive image {first}')")
    assert page.locator("#template-id").input_value() == str(first)
    assert errors == []


def test_class_palette_draws_colour_coded_strokes_and_the_search_uses_them(server, browser):
    """The palette beside the pen: unlabelled black and one swatch per class of the bundle, chosen by
    mouse or keyboard; strokes take its colour, and the upload is colour-coded and searched as labelled."""
    from generation.labelled import colour_hex, decode_labelled_sketch

    base, recording = server
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{base}/?token={TOKEN}")
    page.wait_for_function("() => document.querySelectorAll('#palette [role=radio]').length > 1")
    swatches = page.eval_on_selector_all("#palette [role=radio]", "bs => bs.map(b => [b.textContent, b.getAttribute('aria-checked')])")
    assert swatches == [["unlabelled", "true"], ["uvula", "false"], ["pharyngeal wall", "false"], ["tonsil", "false"], ["tongue", "false"]]

    page.locator("#palette [data-index='0']").focus()  # arrows move along the group, digits pick a class
    page.keyboard.press("ArrowRight")
    assert page.locator("#palette [data-index='1']").get_attribute("aria-checked") == "true"
    page.keyboard.press("3")
    assert page.locator("#palette [data-index='3']").get_attribute("aria-checked") == "true"
    stroke(page, ellipse(0.35, 0.5, 0.2, 0.3))  # a tonsil
    page.locator("#palette [data-index='0']").click()
    stroke(page, [(0.6, 0.2), (0.9, 0.8)])  # an unlabelled line
    colour = page.evaluate("""() => { const d = document.getElementById('canvas').getContext('2d')
        .getImageData(0, 0, 512, 512).data; const seen = new Set();
        for (let i = 0; i < d.length; i += 4) if (d[i + 3] === 255) seen.add('#' + [0, 1, 2].map(k => d[i + k].toString(16).padStart(2, '0')).join(''));
        return [...seen].sort(); }""")
    assert colour == sorted(["#000000", colour_hex(3)])

    before = len(recording.calls)
    page.locator("#search").click()
    page.wait_for_function("() => document.getElementById('status').textContent.includes('results in')")
    sketch, options = recording.calls[before]
    assert options["labelled"] is True
    decoded = decode_labelled_sketch(Image.open(io.BytesIO(sketch)), recording.models.resolution, 4)
    assert decoded.drawn == [3] and (decoded.classes[decoded.sketch == 0] == 0).any()  # the line stays unlabelled
    answer = page.request.post(f"{base}/api/search", headers={"Authorization": f"Bearer {TOKEN}"},
                               multipart={"sketch": {"name": "sketch.png", "mimeType": "image/png", "buffer": sketch}, "labelled": "true"}).json()
    assert answer["classes_drawn"] == [3] and all(hit["class_match"] is not None for hit in answer["results"])
    info = page.request.get(f"{base}/api/info", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert info["classes"][3] == {"index": 3, "name": "tonsil", "colour": colour_hex(3)}


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
    assert not page.locator("#no-match").is_visible() and page.locator("#results .card").count() == 12
    # Quality rises with the field cosine (0.5 at 0.9); no hit reaches quality 1.01, every hit quality 0
    field = np.array([1.0, 0, 0])
    try:
        retriever.calibration = Calibration(retriever.models.bundle_id, np.array([0.9, 0, 0]), np.array([0.02, 1, 1]), field, 0.0, 1.01, 50.0,
                                            features=("field", "code", "dice"))
        search()
        notice = page.locator("#no-match")
        assert notice.is_visible() and "No close match" in notice.text_content()
        assert page.evaluate("() => document.getElementById('no-match').compareDocumentPosition(document.getElementById('results'))") & 4
        page.locator("#results .card").first.click()
        assert "match quality" in page.locator("#detail-caption").text_content()
        retriever.calibration = Calibration(retriever.models.bundle_id, np.array([0.9, 0, 0]), np.array([0.02, 1, 1]), field, 0.0, 0.0, 50.0,
                                            features=("field", "code", "dice"))
        search()
        assert not page.locator("#no-match").is_visible() and page.locator("#results .card").count() == 12
    finally:
        retriever.calibration = None
    page.close()
