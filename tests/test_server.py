"""The web application's JSON API (FastAPI's TestClient) over a workspace indexed with the tiny bundle."""

import base64
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from generation.dataset import ImageDataset
from generation.errors import InputError  # noqa: E402
from generation.images import square_resize  # noqa: E402
from indexing.ingest import index_folders  # noqa: E402
from retrieval.defaults import DEFAULT_LAMBDA  # noqa: E402
from retrieval.models import SystemModels  # noqa: E402
from retrieval.pictures import PictureCache  # noqa: E402
from retrieval.search import Retriever  # noqa: E402
from retrieval.server import access_token, bind_host, check_bind, create_app, page_url  # noqa: E402
from retrieval.vector import ArchiveEmbedder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOCAL = "http://localhost"  # TestClient's default host, testserver, is not a loopback name


@pytest.fixture(scope="module")
def retriever(tiny_chain, tmp_path_factory):
    data, bundle, _ = tiny_chain
    models = SystemModels(bundle, "cpu")
    workspace = tmp_path_factory.mktemp("server") / "ws"
    index_folders(data / "images", workspace, ArchiveEmbedder(models), batch_size=8)
    with Retriever(workspace, models=models) as opened:
        yield opened


@pytest.fixture(scope="module")
def client(retriever):
    with TestClient(create_app(retriever), base_url=LOCAL) as opened:
        yield opened


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sketch(tiny_chain, retriever) -> bytes:
    """S's synthesized sketch of archive image 3, drawn larger, as a PNG upload."""
    models = retriever.models
    image = ImageDataset(tiny_chain[0]).image(3)
    drawn = models.S.synthesize([square_resize(image, models.S.config.size)], models.resolution)[0][0]
    return png(np.asarray(Image.fromarray(drawn).resize((256, 256), Image.NEAREST)))


def post(client, data: bytes, **fields):
    return client.post("/api/search", files={"sketch": ("sketch.png", data, "image/png")}, data={k: str(v) for k, v in fields.items()})


def decoded(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_search_ranks_as_the_retriever(client, retriever, sketch):
    for fields in ({"k": 6}, {"k": 4, "lambda": 0.2, "candidates": 10}, {"k": 5, "rerank": "false", "steps": 1}):
        response = post(client, sketch, **fields)
        assert response.status_code == 200, response.text
        answer = response.json()
        expected = retriever.search(Image.open(io.BytesIO(sketch)), k=fields["k"], candidates=fields.get("candidates", 100),
                                    rerank=fields.get("rerank") != "false", lam=fields.get("lambda", DEFAULT_LAMBDA), steps=fields.get("steps"))
        got = [(hit["rank"], hit["id"], hit["path"], hit["score"], hit["dice"]) for hit in answer["results"]]
        assert got == [(hit.rank, hit.id, hit.path, hit.score, hit.dice) for hit in expected.results]
        first = answer["results"][0]
        assert first["thumbnail"] == f"/api/images/{first['id']}/thumbnail.png" and first["masks"].endswith("/masks.png")
    size = retriever.models.resolution
    generated, masks = decoded(answer["query"]["generated"]), answer["query"]["masks"]
    assert generated.size == (size, size) and generated.mode == "RGB" and masks is None  # the last search had no re-ranking
    answer = post(client, sketch, k=2).json()
    assert decoded(answer["query"]["masks"]).mode == "RGBA" and decoded(answer["query"]["sketch"]).size == (size, size)
    assert answer["timings_ms"]["total"] > 0 and answer["params"]["k"] == 2


def test_images_are_served_by_catalog_id_only(client, retriever):
    image_id = int(retriever.workspace.catalog.ids()[0])
    record = retriever.workspace.records_for([image_id])[image_id]
    full = client.get(f"/api/images/{image_id}/image.png")
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    original = np.asarray(Image.open(record.path).convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(full.content)).convert("RGB")), original)  # small: not resized
    thumbnail = Image.open(io.BytesIO(client.get(f"/api/images/{image_id}/thumbnail.png").content))
    assert max(thumbnail.size) <= 192
    overlay = np.asarray(Image.open(io.BytesIO(client.get(f"/api/images/{image_id}/masks.png").content)))
    labels = retriever.workspace.masks_for([image_id])[image_id]
    assert overlay.shape == (*original.shape[:2], 4)
    coloured = np.asarray(Image.fromarray(labels).resize(original.shape[1::-1], Image.NEAREST)) > 0
    assert np.array_equal(overlay[..., 3] > 0, coloured)

    for url in ["/api/images/999999/image.png", "/api/images/-1/thumbnail.png", "/api/images/999999/masks.png",
                "/api/images/abc/image.png", "/api/images/..%2F..%2Fetc%2Fpasswd/image.png", f"/api/images/{record.path}/image.png",
                f"/api/images/{image_id}/../../../etc/passwd", "/static/../server.py", "/static/%2e%2e/server.py", "/api/nothing"]:
        response = client.get(url)
        assert response.status_code in (404, 422), url
        assert set(response.json()) == {"error"} and "\n" not in response.json()["error"]


def test_an_image_changed_since_indexing_is_not_shown(tiny_chain, retriever, tmp_path):
    data, bundle, _ = tiny_chain
    archive = tmp_path / "archive"
    archive.mkdir()
    one = archive / "one.png"
    one.write_bytes((data / "images" / sorted(p.name for p in (data / "images").iterdir())[0]).read_bytes())
    index_folders([one], tmp_path / "ws", ArchiveEmbedder(retriever.models), batch_size=8)
    with Retriever(tmp_path / "ws", models=retriever.models) as small, TestClient(create_app(small), base_url=LOCAL) as client:
        image_id = int(small.workspace.catalog.ids()[0])
        assert client.get(f"/api/images/{image_id}/image.png").status_code == 200
        one.write_bytes(png(np.zeros((8, 8, 3), np.uint8)))
        response = client.get(f"/api/images/{image_id}/thumbnail.png")
        assert response.status_code == 410 and "re-index" in response.json()["error"]


@pytest.mark.parametrize("upload, status, message", [
    (b"", 400, "empty"),
    (b"hello, this is not a picture", 400, "not an image"),
    ("truncated", 400, "truncated"),
    ("blank", 400, "empty"),
    ("photo", 400, "photograph"),
])
def test_bad_sketches_get_one_line_errors(client, tiny_chain, sketch, upload, status, message):
    if upload == "truncated":
        upload = sketch[: len(sketch) // 2]
    elif upload == "blank":  # an empty canvas, as the page would send it
        upload = png(np.full((512, 512, 3), 255, np.uint8))
    elif upload == "photo":
        upload = png(ImageDataset(tiny_chain[0]).image(0))
    response = post(client, upload, k=3)
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error and "\n" not in error and "Traceback" not in error


@pytest.mark.parametrize("fields, where", [({"k": 0}, "k"), ({"k": 1000}, "k"), ({"lambda": 2}, "lambda"),
                                          ({"steps": -1}, "steps"), ({"rerank": "maybe"}, "rerank"), ({"group": "family"}, "group")])
def test_bad_parameters_are_422(client, sketch, fields, where):
    response = post(client, sketch, **fields)
    assert response.status_code == 422 and response.json()["error"].startswith(where)
    missing = client.post("/api/search", data={"k": "3"})
    assert missing.status_code == 422 and "sketch" in missing.json()["error"]


def test_uploads_over_the_limit_are_413(retriever, sketch):
    with TestClient(create_app(retriever, max_upload_bytes=len(sketch) + 10), base_url=LOCAL) as client:
        assert post(client, sketch, k=1).status_code == 200
        too_large = post(client, sketch + b"\0" * 100_000, k=1)  # announced by Content-Length
        assert too_large.status_code == 413 and "limit" in too_large.json()["error"]
        boundary = "sketchboundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"sketch\"; filename=\"s.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + b"\0" * 200_000 + f"\r\n--{boundary}--\r\n".encode()
        chunked = client.post("/api/search", content=iter([body[i : i + 8192] for i in range(0, len(body), 8192)]),
                              headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert chunked.status_code == 413 and "limit" in chunked.json()["error"]
        just_over = post(client, sketch + b"\0" * 11, k=1)  # under the body limit, over the file limit
        assert just_over.status_code == 413


def test_info_health_and_page(client, retriever):
    info = client.get("/api/info").json()
    assert info["images"] == 24 and info["resolution"] == retriever.models.resolution
    assert info["bundle_id"] == retriever.workspace.bundle_id and info["max_upload_bytes"] == 10 * 1024 * 1024
    assert client.get("/api/health").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "default-src 'self'" in page.headers["content-security-policy"]
    for text in (page.text, *(client.get(f"/static/{name}").text for name in ("app.js", "style.css"))):
        assert "http://" not in text and "https://" not in text and "//" + "cdn" not in text  # works offline


def test_token_is_required_on_every_request_when_set(retriever, sketch):
    image_id = int(retriever.workspace.catalog.ids()[0])
    with TestClient(create_app(retriever, token="s3cret"), base_url=LOCAL) as client:
        for url in ("/", "/api/health", "/api/info", "/static/app.js", f"/api/images/{image_id}/thumbnail.png"):
            response = client.get(url)
            assert response.status_code == 401 and "token" in response.json()["error"], url
        assert post(client, sketch, k=2).status_code == 401
        wrong = client.get("/api/info", headers={"Authorization": "Bearer guess"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert client.get("/api/info?token=guess").status_code == 401
        bearer = {"Authorization": "Bearer s3cret"}
        assert client.get("/api/info", headers=bearer).status_code == 200
        assert client.post("/api/search", headers=bearer, files={"sketch": ("s.png", sketch, "image/png")}).status_code == 200
        assert client.get(f"/api/images/{image_id}/thumbnail.png?token=s3cret").status_code == 200  # for <img> URLs

        opened = client.get("/?token=s3cret", follow_redirects=False)  # the page: the token becomes a cookie
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        assert "httponly" in opened.headers["set-cookie"].lower() and "samesite=strict" in opened.headers["set-cookie"].lower()
        assert client.get("/").status_code == 200 and client.get("/api/info").status_code == 200  # with the cookie
        client.cookies.clear()
        assert client.get("/api/info").status_code == 401


class BlockingRetriever:
    """A retriever whose searches wait for `release`, to hold the only search slot."""

    def __init__(self, inner: Retriever):
        self.inner, self.workspace, self.models = inner, inner.workspace, inner.models
        self.entered, self.release = threading.Event(), threading.Event()

    def search_many(self, requests):
        self.entered.set()
        assert self.release.wait(60)
        return self.inner.search_many(requests)


def test_searches_beyond_the_limit_get_503(retriever, sketch):
    blocking = BlockingRetriever(retriever)
    with TestClient(create_app(blocking, max_concurrent=1, busy_wait_s=0), base_url=LOCAL) as client:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(response=post(client, sketch, k=2)))
        worker.start()
        try:
            assert blocking.entered.wait(60)
            busy = post(client, sketch, k=2)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]
            assert post(client, b"not an image", k=2).status_code == 400  # bad uploads are refused without a slot
            assert client.get("/api/info").status_code == 200  # the rest of the API stays up
        finally:
            blocking.release.set()
            worker.join(60)
        assert first["response"].status_code == 200
        assert post(client, sketch, k=2).status_code == 200  # the slot is free again


def test_only_loopback_binds_without_a_token(tmp_path):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)
    check_bind("0.0.0.0", "s3cret")
    for host in ("192.168.1.20", "example.org", ""):
        with pytest.raises(InputError, match=r"reachable from other machines; export an access token in \$SKETCH2MEDI_TOKEN \(or the variable --token-env names\)$"):
            check_bind(host, None)
    env = {k: v for k, v in os.environ.items() if k != "SKETCH2MEDI_TOKEN"}
    for host in ("0.0.0.0", "::"):  # refused before the (missing) workspace is even looked at
        result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "serve", "--host", host, "--workspace", str(tmp_path)],
                                capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert result.returncode == 2 and "SKETCH2MEDI_TOKEN" in result.stderr and "Traceback" not in result.stderr, host
        assert len(result.stderr.strip().splitlines()) == 1
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "serve", "--token-env", "NOT_SET_HERE", "--workspace", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2 and "--token-env NOT_SET_HERE: the environment variable NOT_SET_HERE is not set" in result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "serve", "--token", "s3cret", "--workspace", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 2 and "No such option: --token" in result.stderr  # a secret is never taken from the command line


def test_compiled_networks_are_refused_with_batching(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), "serve", "--compile", "--workspace", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)  # refused before the (missing) workspace is looked at
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: --compile searches one at a time: add --max-batch 1 "
                                     "(compiled networks would recompile for every new batch size)")


def test_the_access_token_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("SKETCH2MEDI_TOKEN", raising=False)
    assert access_token() is None
    monkeypatch.setenv("SKETCH2MEDI_TOKEN", "from-default")
    monkeypatch.setenv("CLINIC_TOKEN", "from-named")
    assert (access_token(), access_token("CLINIC_TOKEN")) == ("from-default", "from-named")


def test_the_networks_load_and_run_on_one_thread(retriever, sketch):
    """Every search runs on the thread the retriever was made on (see `model_thread`: a second
    OpenMP team halves torch's speed on 2 cores), however many requests come at once."""
    threads: list[int] = []
    searched: list[int] = []  # requests per batch

    class Watched:
        def __init__(self):
            threads.append(threading.get_ident())
            self.workspace, self.models = retriever.workspace, retriever.models

        def search_many(self, requests):
            threads.append(threading.get_ident())
            searched.append(len(requests))
            return retriever.search_many(requests)

    with TestClient(create_app(Watched), base_url=LOCAL) as watched:
        workers = [threading.Thread(target=lambda: post(watched, sketch, k=2)) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert sum(searched) == 4 and len(threads) == 1 + len(searched) and len(set(threads)) == 1 and threads[0] != threading.get_ident()


def test_without_a_token_only_loopback_host_names_are_answered(retriever):
    with TestClient(create_app(retriever, host="127.0.0.1")) as client:
        for host in ("localhost", "localhost:8000", "127.0.0.1:8799", "[::1]:8799", "[::1]", "LOCALHOST"):
            assert client.get("/api/health", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "testserver", ""):
            response = client.get("/api/info", headers={"host": host})
            assert response.status_code == 400, host
            assert "--allowed-hosts" in response.json()["error"] and "\n" not in response.json()["error"]
    with TestClient(create_app(retriever, host="sketch.lan")) as client:  # the configured host too
        assert client.get("/api/health", headers={"host": "sketch.lan:8000"}).status_code == 200
    with TestClient(create_app(retriever, allowed_hosts=["evil.example"])) as client:  # in place of the default list
        assert client.get("/api/health", headers={"host": "evil.example"}).status_code == 200
        assert client.get("/api/health", headers={"host": "localhost"}).status_code == 400
    with TestClient(create_app(retriever, allowed_hosts=["*"])) as client:
        assert client.get("/api/health", headers={"host": "anything.example"}).status_code == 200
    with TestClient(create_app(retriever, token="s3cret")) as client:  # a token guards the rest
        assert client.get("/api/health", headers={"host": "sketch.example", "authorization": "Bearer s3cret"}).status_code == 200
    help_text = subprocess.run([sys.executable, str(ROOT / "cli.py"), "serve", "--help"], capture_output=True, text=True, cwd=ROOT,
                               env={**os.environ, "COLUMNS": "200"}, timeout=120).stdout
    assert "--allowed-hosts" in help_text


def test_an_image_id_beyond_int64_is_404(client):
    for url in ("/api/images/9223372036854775808/image.png", "/api/images/99999999999999999999999/thumbnail.png",
                "/api/images/9223372036854775808/masks.png", "/api/images/-9223372036854775809/image.png"):
        response = client.get(url)
        assert response.status_code == 404 and "not in the catalog" in response.json()["error"], url


def test_a_bracketed_ipv6_host_is_bound_without_brackets_and_shown_with_them():
    assert bind_host("[::1]") == "::1" and bind_host("::1") == "::1" and bind_host("127.0.0.1") == "127.0.0.1"
    check_bind(bind_host("[::1]"), None)
    assert page_url(bind_host("[::1]"), 8799) == "http://[::1]:8799/"
    assert page_url("127.0.0.1", 8000) == "http://127.0.0.1:8000/"


def test_a_huge_upload_is_searched_as_the_same_drawing(client, retriever, sketch):
    big = Image.open(io.BytesIO(sketch)).convert("L").resize((4500, 4500), Image.NEAREST)
    response = post(client, png(np.asarray(big)), k=5)
    assert response.status_code == 200, response.text
    expected = retriever.search(big, k=5)
    assert [(hit["id"], hit["score"]) for hit in response.json()["results"]] == [(hit.id, hit.score) for hit in expected.results]


def test_large_archive_images_are_served_downscaled_to_their_sizes(tiny_chain, retriever, tmp_path):
    data, _, _ = tiny_chain
    first = sorted((data / "images").iterdir())[0]
    archive = tmp_path / "archive"
    archive.mkdir()
    original = Image.open(first).convert("RGB").resize((3000, 2000), Image.BICUBIC)
    original.save(archive / "wide.png")
    original.save(archive / "wide.jpg", quality=95)
    index_folders([archive], tmp_path / "ws", ArchiveEmbedder(retriever.models), batch_size=8)
    with Retriever(tmp_path / "ws", models=retriever.models) as large, TestClient(create_app(large), base_url=LOCAL) as client:
        for image_id in large.workspace.catalog.ids():
            full = Image.open(io.BytesIO(client.get(f"/api/images/{int(image_id)}/image.png").content))
            thumbnail = Image.open(io.BytesIO(client.get(f"/api/images/{int(image_id)}/thumbnail.png").content))
            assert (full.size, full.mode, thumbnail.size, thumbnail.mode) == ((1024, 683), "RGB", (192, 128), "RGB")
            path = large.workspace.records_for([int(image_id)])[int(image_id)].path
            if path.endswith(".png"):  # decoded at full size: exactly the downscaled original
                expected = original.copy()
                expected.thumbnail((192, 192), Image.LANCZOS)
                assert np.array_equal(np.asarray(thumbnail), np.asarray(expected))


def test_the_picture_cache_is_bounded_in_bytes():
    cache = PictureCache(max_bytes=10)
    for key in "abc":
        cache.put(key, b"1234")
    assert cache.lookup("a") is None and cache.lookup("b") == b"1234" and cache.lookup("c") == b"1234" and cache.used == 8
    assert cache.get("d", lambda: b"xyz") == b"xyz" and cache.lookup("b") is None and cache.lookup("c") == b"1234"


def test_the_audit_log_records_each_search_without_images(retriever, sketch, tmp_path):
    import hashlib
    import json

    from retrieval.audit import AuditLog

    log = AuditLog(tmp_path / "audit.jsonl")
    with TestClient(create_app(retriever, token="s3cret", audit_log=log), base_url=LOCAL) as client:
        bearer = {"Authorization": "Bearer s3cret"}
        first = client.post("/api/search", headers=bearer, files={"sketch": ("s.png", sketch, "image/png")}, data={"k": "3"})
        liked = first.json()["results"][0]["id"]
        second = client.post("/api/search", headers=bearer, files={"sketch": ("s.png", sketch, "image/png")},
                             data={"k": "2", "like": str(liked), "where": "tag=images"})
        assert client.post("/api/search", headers=bearer, files={"sketch": ("s.png", b"junk", "image/png")}).status_code == 400
    log.close()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 2  # searches that ran, not refused uploads
    records = [json.loads(line) for line in lines]
    assert [r["ids"] for r in records] == [[hit["id"] for hit in answer.json()["results"]] for answer in (first, second)]
    assert records[0]["uploads"] == {"sketch": hashlib.sha256(sketch).hexdigest()} and records[0]["client"]
    assert records[1]["like"] == [liked] and records[1]["where"] == "tag=images" and records[1]["params"]["k"] == 2
    assert records[0]["token"] == hashlib.sha256(b"s3cret").hexdigest()[:12] and "s3cret" not in lines[0]
    assert max(map(len, lines)) < 1000  # identifiers and digests only, never pixels


def test_the_audit_log_must_be_a_file_that_can_be_appended(tmp_path):
    from retrieval.audit import AuditLog

    with pytest.raises(InputError, match="is a folder; give --audit-log a file"):
        AuditLog(tmp_path)
    with pytest.raises(InputError, match="cannot append the audit log"):
        AuditLog(tmp_path / "missing" / "audit.jsonl")


# -- DICOM metadata and groups -------------------------------------------------------------------


def write_rgb_dicom(path: Path, pixels: np.ndarray, **tags) -> Path:
    """An 8-bit RGB Secondary Capture file of (H, W, 3) pixels with these DICOM tags."""
    pytest.importorskip("pydicom")
    from test_ingest import dicom_dataset

    dataset = dicom_dataset(tags.pop("Modality", "ES"), **tags)
    dataset.Rows, dataset.Columns = pixels.shape[:2]
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.PlanarConfiguration = 3, "RGB", 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.PixelData = np.ascontiguousarray(pixels, np.uint8).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path


# (file, phantom image, PatientID, StudyInstanceUID, SeriesInstanceUID, StudyDate, Modality); s1b.dcm repeats s1a.dcm's
# pixels in its series: a near-duplicate frame (vector inner product 1).
CLINIC = [("s1a.dcm", 0, "P1", "1.2.826.1", "1.2.826.1.1", "20200115", "ES"),
          ("s1b.dcm", 0, "P1", "1.2.826.1", "1.2.826.1.1", "20200115", "ES"),
          ("s1c.dcm", 1, "P1", "1.2.826.1", "1.2.826.1.1", "20200115", "ES"),
          ("s2.dcm", 2, "P1", "1.2.826.2", "1.2.826.2.1", "20210310", "ES"),
          ("s3a.dcm", 3, "P2", "1.2.826.3", "1.2.826.3.1", "20220601", "XA"),
          ("s3b.dcm", 4, "P2", "1.2.826.3", "1.2.826.3.2", "20220601", "XA")]  # fmt: skip


def write_clinic_archive(folder: Path, phantom: Path) -> Path:
    """Two patients, three studies, four series of phantom images as RGB DICOM files (with a patient
    name, which must never be shown), and one plain PNG; their folder, `clinic-a`, is their tag."""
    folder.mkdir(parents=True)
    images = ImageDataset(phantom)
    for name, index, patient, study, series, date, modality in CLINIC:
        write_rgb_dicom(folder / name, images.image(index), PatientID=patient, PatientName=f"Doe^{patient}", StudyInstanceUID=study,
                        SeriesInstanceUID=series, StudyDate=date, Modality=modality, BodyPartExamined="LARYNX")
    Image.fromarray(images.image(5)).save(folder / "plain.png")
    return folder


@pytest.fixture(scope="module")
def clinic(tiny_chain, retriever, tmp_path_factory):
    """A retriever over the clinic archive (the tiny bundle's models) and {file name: catalog id}."""
    root = tmp_path_factory.mktemp("clinic")
    index_folders(write_clinic_archive(root / "clinic-a", tiny_chain[0]), root / "ws", ArchiveEmbedder(retriever.models), batch_size=8)
    with Retriever(root / "ws", models=retriever.models) as opened:
        records = opened.workspace.records_for(opened.workspace.catalog.ids())
        yield opened, {Path(record.path).name: image_id for image_id, record in records.items()}


def test_search_groups_as_the_cli_and_each_hit_carries_its_catalog_metadata(clinic):
    from retrieval.grouping import grouped_search

    retriever, ids = clinic
    with TestClient(create_app(retriever), base_url=LOCAL) as client:
        for group in ("study", "patient", "series", None):
            fields = {"like": str(ids["s1a.dcm"]), "k": "3", **({"group": group} if group else {})}
            answer = client.post("/api/search", data=fields)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            result, groups = grouped_search(retriever, None, k=3, group=group, like=[ids["s1a.dcm"]])
            assert [hit["id"] for hit in body["results"]] == [hit.id for hit in result.results]
            expected = [g.to_json() for g in groups]
            for written, cli in zip(body["groups"], expected, strict=True):  # the CLI's fields, and more per hit
                assert {key: value for key, value in written.items() if key != "hits"} == {key: v for key, v in cli.items() if key != "hits"}
                assert [{key: hit[key] for key in ("id", "rank", "count")} for hit in written["hits"]] == cli["hits"]
                assert all(hit["thumbnail"] == f"/api/images/{hit['id']}/thumbnail.png" and "score" in hit for hit in written["hits"])
            assert body["schema_version"] == 3 and body["params"]["group"] == group

        by_study = client.post("/api/search", data={"like": str(ids["s1a.dcm"]), "k": "3"}).json()  # the default: by study
        first = by_study["groups"][0]
        assert (first["by"], first["key"], first["frames"], first["patient_id"], first["study_date"]) == ("study", "1.2.826.1", 3, "P1", "20200115")
        # s1a.dcm and s1b.dcm, the same pixels in one series, tie; the lower id is kept and counts the other
        assert (first["hits"][0]["id"], first["hits"][0]["count"]) == (min(ids["s1a.dcm"], ids["s1b.dcm"]), 2)
        assert [hit["id"] for hit in first["hits"][1:]] == [ids["s1c.dcm"]]

        flat_answer = client.post("/api/search", data={"like": str(ids["s3a.dcm"]), "k": "7", "group": "none"})
        flat = flat_answer.json()
        assert flat["groups"] is None and len(flat["results"]) == 7
        meta = {hit["id"]: {key: hit[key] for key in ("patient_id", "study_uid", "series_uid", "study_date", "modality", "body_part", "tag")}
                for hit in flat["results"]}
        assert meta[ids["s3b.dcm"]] == {"patient_id": "P2", "study_uid": "1.2.826.3", "series_uid": "1.2.826.3.2", "study_date": "20220601",
                                        "modality": "XA", "body_part": "LARYNX", "tag": "clinic-a"}
        assert meta[ids["plain.png"]] == {"patient_id": None, "study_uid": None, "series_uid": None, "study_date": None, "modality": None,
                                          "body_part": None, "tag": "clinic-a"}
        assert "Doe" not in answer.text + flat_answer.text and "sop_uid" not in flat_answer.text  # identifiers only, never names


def test_a_bad_group_is_422_with_one_line_and_a_bad_filter_names_its_field(clinic):
    retriever, ids = clinic
    with TestClient(create_app(retriever), base_url=LOCAL) as client:
        bad = client.post("/api/search", data={"like": str(ids["s1a.dcm"]), "group": "family"})
        assert bad.status_code == 422 and bad.json() == {"error": "group 'family': use one of patient, study, series, none", "field": "group"}
        bad = client.post("/api/search", data={"like": str(ids["s1a.dcm"]), "where": "colour=red"})
        assert bad.status_code == 400 and bad.json()["field"] == "where" and bad.json()["error"].startswith("--where clause 'colour=red'")
        filtered = client.post("/api/search", data={"like": str(ids["s1a.dcm"]), "where": "modality=XA", "group": "none"}).json()
        assert filtered["matching"] == 2 and {hit["modality"] for hit in filtered["results"]} == {"XA"}


def test_labelled_search_and_a_class_the_bundle_lacks(client, retriever, sketch):
    """labelled=true reads the upload's colours: a class-2 drawing is searched per class; one in the
    colour of class 7 (the tiny bundle has 4) is a 400 with the CLI's one line."""
    from generation.labelled import colour_coded

    pixels = np.asarray(Image.open(io.BytesIO(sketch)).convert("L"))
    as_class = lambda c: png(colour_coded(pixels, np.where(pixels < 255, c, 0).astype(np.uint8)))  # noqa: E731
    answer = post(client, as_class(2), k=3, labelled="true").json()
    expected = retriever.search(Image.open(io.BytesIO(as_class(2))), k=3, labelled=True)
    assert answer["classes_drawn"] == [2] == list(expected.classes_drawn) and answer["schema_version"] == 3
    assert [(h["id"], h["score"], h["class_match"]) for h in answer["results"]] == [(h.id, h.score, h.class_match) for h in expected.results]
    plain = post(client, as_class(2), k=3).json()  # without the flag the colours are only ink
    assert plain["classes_drawn"] == [] and all(h["class_match"] is None for h in plain["results"])
    refused = post(client, as_class(7), labelled="true")
    assert refused.status_code == 400 and refused.json() == {"error": "sketch: strokes in the colour of class 7 (#000080), but the bundle "
                                                             "has classes 1-4; redraw them in black or in one of the colours "
                                                             "`python cli.py classes` lists"}
    info = client.get("/api/info").json()
    assert [row["index"] for row in info["classes"]] == [0, 1, 2, 3, 4]


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_db(request):
    """None (the workspace's own SQLite catalog), or a fresh database on the test PostgreSQL server."""
    if request.param == "sqlite":
        yield None
    else:
        from conftest import fresh_postgres_database

        with fresh_postgres_database() as url:
            yield url


@pytest.mark.slow  # an index run beside two servers
def test_replicas_serve_only_committed_images_while_an_index_run_adds_more(tiny_chain, retriever, tmp_path, catalog_db):
    import shutil

    from indexing.catalog import Catalog
    from indexing.vector_index import VectorIndex
    from indexing.workspace import catalog_url, faiss_path
    from retrieval.server import model_thread

    data, bundle, _ = tiny_chain
    originals = sorted((data / "images").iterdir())
    archive, workspace = tmp_path / "archive", tmp_path / "ws"
    archive.mkdir()
    for path in originals[:6]:
        shutil.copy(path, archive / path.name)
    index_folders(archive, workspace, ArchiveEmbedder(retriever.models), db_url=catalog_db, batch_size=8)
    for path in originals[6:]:  # these arrive while the replicas serve
        shutil.copy(path, archive / path.name)
    catalog = Catalog(catalog_url(workspace, catalog_db), create=False)
    models = model_thread()  # the replicas share the networks, so also the one thread that runs them
    # With PostgreSQL the second replica has a folder of its own, as on another machine: it builds its index from the catalog.
    elsewhere = workspace if catalog_db is None else tmp_path / "replica"
    elsewhere.mkdir(exist_ok=True)
    replicas = [Retriever(folder, db_url=catalog_db, models=retriever.models) for folder in (workspace, elsewhere)]
    clients = [TestClient(create_app(replica, models=models, refresh_s=0), base_url=LOCAL) for replica in replicas]
    failed: list[BaseException] = []

    def index_the_rest():  # networks of its own: the replicas' are busy on their thread
        try:
            index_folders(archive, workspace, ArchiveEmbedder(SystemModels(bundle, "cpu")), db_url=catalog_db, batch_size=2)
        except BaseException as error:
            failed.append(error)

    def search_both() -> None:
        for client in clients:
            response = client.post("/api/search", data={"like": "1", "k": "100", "rerank": "false", "group": "none"})
            assert response.status_code == 200, response.text
            hits = response.json()["results"]
            known = set(catalog.ids().tolist())  # read after the answer: ids are never reused, none is deleted here
            assert {hit["id"] for hit in hits} <= known
            for hit in hits[:3]:
                assert client.get(hit["thumbnail"]).status_code == 200
            counts.append(len(hits))
        saved = VectorIndex.load(faiss_path(workspace, catalog))  # never a half-written file
        assert set(saved.ids().tolist()) <= set(catalog.ids().tolist())

    counts: list[int] = []
    run = threading.Thread(target=index_the_rest)
    try:
        search_both()
        run.start()
        while run.is_alive():
            search_both()
        run.join()
        search_both()
    finally:
        if run.ident is not None:
            run.join()
        for client in clients:
            client.close()
        for replica in replicas:
            replica.close()
        catalog.close()
    assert not failed, failed
    assert counts[:2] == [6, 6] and counts[-2:] == [len(originals)] * 2  # each replica picked up every committed batch
    assert counts == sorted(counts)  # and never went back to an older state
