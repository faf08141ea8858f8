"""The draw-to-search web application: a JSON API over `Retriever` and the page in retrieval/web/.

    GET  /                              the page (index.html; app.js and style.css under /static/)
    GET  /api/health                    {"status": "ok"}
    GET  /api/info                      workspace, image count, bundle id, resolution, limits, defaults,
                                        the classes and their pen colours for labelled sketches
    POST /api/search                    multipart: sketch or image (file) and/or like (ids), unlike, where, group,
                                        k, candidates, rerank, lambda, steps, labelled (the sketch is colour-coded)
    GET  /api/images/{id}/image.png     a catalogued image (longest side <= 1024)
    GET  /api/images/{id}/thumbnail.png the same, longest side <= 192
    GET  /api/images/{id}/masks.png     S's stored masks of it as an RGBA overlay aligned with image.png

Images are only ever named by catalog id; a path never comes from the request. Every error is
`{"error": "one line"}`: 400 bad sketch or host, 401 token, 404 unknown id, 410 file gone or changed
since indexing, 413 upload too large, 422 bad parameter, 503 busy.

Host header: without a token, only requests addressed to a loopback name (localhost, 127.0.0.1,
[::1], any port) or the configured host are answered, so a web page elsewhere cannot read the
archive by pointing its own domain at 127.0.0.1 (DNS rebinding). `allowed_hosts` replaces that list
("*": any host).

Access token: with `token` set, every request needs it, as `Authorization: Bearer T` (API clients),
the `sketch2medi_token` cookie (the page), or `?token=T` (e.g. <img> URLs elsewhere). Opening
`/?token=T` once sets the cookie (HttpOnly, SameSite=Strict) and redirects to `/`, so the token
leaves the address bar.

Concurrency: the models are shared, and torch modules are not safe to run from several threads at
once, so searches run on one model thread. It computes them in batches (`SearchBatcher`): a search
that arrives while the thread is idle waits up to `batch_wait_ms` for others to join it, searches
that arrived while it was busy go together at once, at most `max_batch` in one batch, and E, G, H,
C and S run once for the batch (`Retriever.search_many`); each request gets its own result, or its
own error. At most `max_concurrent` searches are admitted (computing or queued for the model); one
that finds every slot taken waits up to `busy_wait_s` for a slot, then gets 503 with Retry-After.

Following an index run: the workspace is opened once, and before a batch of searches the model
thread checks, at most every `refresh_s` seconds, whether the catalog's generation moved; if it did,
the in-memory index is patched to the catalog (`Workspace.refresh`). So several replicas over one
catalog (PostgreSQL) each serve a state the catalog has committed: every id they return is known to
the catalog, and one deleted meanwhile is left out of the hits (404 for its pictures).

Memory: uploads and archive images are decoded a bounded number at a time
(`retrieval.pictures.decoder_thread`), at a reduced scale where the format allows, and downscaled as
soon as they are decoded; archive images are kept only as small PNGs in a bounded cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import ipaddress
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import anyio
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageDraw
from starlette.exceptions import HTTPException
from starlette.requests import Request

from generation.errors import InputError
from generation.images import decode_image
from generation.labelled import colour_table
from generation.normalize import WORK_SIDE, reduce_to_work_side
from indexing.catalog import FileMeta
from indexing.filters import SearchFilter
from retrieval.audit import AuditLog
from retrieval.defaults import DEFAULT_LAMBDA
from retrieval.grouping import GROUPINGS, Group, grouped_search_many
from retrieval.pictures import (
    PALETTE,
    PictureCache,
    data_url,
    decoder_thread,
    fit,
    mask_overlay,
    placed_overlay,
    png_bytes,
    released,
    shown_pngs,
)
from retrieval.search import Hit, Retriever, SearchRequest

ENV_TOKEN = "SKETCH2MEDI_TOKEN"
COOKIE = "sketch2medi_token"
WEB = Path(__file__).resolve().parent / "web"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small form fields around the file
IMAGE_SIDE, THUMBNAIL_SIDE = 1024, 192
MAX_K, MAX_CANDIDATES, MAX_STEPS = 100, 10_000, 10
MAX_IMAGE_ID = 2**63 - 1  # catalog ids are int64
BATCH_WAIT_MS, MAX_BATCH = 10.0, 16  # `serve --batch-wait-ms`, `--max-batch` (docs/BENCHMARKS.md: the throughput they bring)
REFRESH_S = 2.0  # `serve --refresh-s`: how stale a replica may be while an index run writes (one small read per check)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
SECURITY_HEADERS = [  # the page loads nothing from elsewhere; the token must not leak in a Referer
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; object-src 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # any other host name may resolve to a public address
        return False


def bind_host(host: str) -> str:
    """--host as the socket binds it: an IPv6 address may be written in URL brackets ([::1])."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def page_url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def host_name(host: str) -> str:
    """A host as it appears in a Host header, without the port: "[::1]:8000" -> "[::1]"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    if ":" in host:
        try:  # a bare IPv6 address (a --host value, never a Host header)
            return f"[{ipaddress.IPv6Address(host)}]"
        except ValueError:
            return host.rsplit(":", 1)[0]
    return host


def allowed_host_names(token: str | None, host: str | None, allowed_hosts: Iterable[str] | None) -> frozenset[str] | None:
    """The Host header names answered (None: any): `allowed_hosts` when given ("*" for any), else
    with a token any, else loopback names and `host`."""
    if allowed_hosts is not None:
        names = frozenset(host_name(name) for name in allowed_hosts if name.strip())
        return None if "*" in names else names
    if token:
        return None
    return frozenset((*LOOPBACK_NAMES, *([host_name(host)] if host else [])))


def access_token(variable: str | None = None) -> str | None:
    """The access token from the environment variable `variable` (default SKETCH2MEDI_TOKEN), never
    from the command line; a variable named explicitly must be set."""
    token = os.environ.get(variable or ENV_TOKEN) or None
    if variable and token is None:
        raise InputError(f"--token-env {variable}: the environment variable {variable} is not set; export the access token in it")
    return token


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond this machine without an access token."""
    if not token and not is_loopback(host):
        raise InputError(f"--host {host} is reachable from other machines; export an access token in ${ENV_TOKEN} (or the variable --token-env names)")


def decode_upload(data: bytes, name: str = "sketch") -> Image.Image:
    """An uploaded image file, decoded (reduced while decoding where the format allows) and
    downscaled to the size sketch normalisation works at; every failure is an InputError."""
    if not data:
        raise InputError(f"{name}: the upload is empty; send the drawing as a PNG file")
    return reduce_to_work_side(decode_image(io.BytesIO(data), name, draft_side=WORK_SIDE))


class _ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, field: str | None = None):
        super().__init__(message)
        self.status, self.headers, self.field = status, headers, field


def _error(status: int, message: str, headers: dict[str, str] | None = None, field: str | None = None) -> JSONResponse:
    """`{"error": "one line"}`, and `field`, the form field at fault, where one is (the page shows the
    message beside it)."""
    return JSONResponse({"error": message, **({"field": field} if field else {})}, status_code=status, headers=headers)


class _Guard:
    """ASGI middleware: security headers, the Host header, the access token, and the request body
    limit (checked before anything parses the body, so an oversized upload is refused without being
    spooled)."""

    def __init__(self, app, token: str | None, max_body: int, hosts: frozenset[str] | None):
        self.app, self.token, self.max_body, self.hosts = app, token, max_body, hosts

    def _authorised(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        offered = [value.strip() if scheme.lower() == "bearer" else "", request.cookies.get(COOKIE, ""),
                   request.query_params.get("token", "")]
        return any(hmac.compare_digest(candidate.encode(), self.token.encode()) for candidate in offered if candidate)

    def _too_large(self) -> JSONResponse:
        return _error(413, f"upload over the {self.max_body - FORM_OVERHEAD} byte limit; send a smaller image")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        request = Request(scope)
        if self.hosts is not None and host_name(request.headers.get("host", "")) not in self.hosts:
            response = _error(400, f"host {request.headers.get('host', '')!r} is not served here; open the page at "
                                   f"localhost, or start the server with --allowed-hosts")
            return await response(scope, receive, send_with_headers)
        if self.token is not None and not self._authorised(request):
            response = _error(401, "missing or wrong access token; send 'Authorization: Bearer TOKEN' or open /?token=TOKEN",
                              {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send_with_headers)
        if self.token is not None and scope["path"] == "/" and "token" in request.query_params:
            # `/?token=T`, just checked: keep it in a cookie and take it out of the address bar.
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict", path="/")
            return await response(scope, receive, send_with_headers)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await self._too_large()(scope, receive, send_with_headers)
        if scope["method"] in ("POST", "PUT", "PATCH") and length is None:
            # Chunked body of unknown length: read it here (up to the limit) and replay it.
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > self.max_body:
                    return await self._too_large()(scope, receive, send_with_headers)
            body = b"".join(chunks)

            async def replay():
                nonlocal body
                message, body = {"type": "http.request", "body": body, "more_body": False}, b""
                return message

            return await self.app(scope, replay, send_with_headers)
        await self.app(scope, receive, send_with_headers)


class _Slots:
    """At most n searches admitted at once. A counter under a thread lock, polled, rather than an
    asyncio semaphore: that would be tied to one event loop, and TestClient runs several."""

    def __init__(self, n: int):
        self.n, self.used, self._lock = n, 0, threading.Lock()

    def _take(self) -> bool:
        with self._lock:
            if self.used < self.n:
                self.used += 1
                return True
            return False

    async def take(self, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while not self._take():
            if time.monotonic() >= deadline:
                return False
            await anyio.sleep(0.02)
        return True

    def release(self) -> None:
        with self._lock:
            self.used -= 1


class SearchBatcher:
    """Gathers the searches submitted from any thread into batches run on the model thread.

    `run(items)` gets a list of submitted items and returns one outcome per item (a result, or an
    Exception for that item alone). When the first item of a batch is submitted while the model
    thread is idle, the thread waits up to `wait_s` for more (at most `max_batch`); items submitted
    while it computes form the next batch, which starts as soon as the thread is free."""

    def __init__(self, run: Callable[[list], list], models: ThreadPoolExecutor, wait_s: float = BATCH_WAIT_MS / 1000,
                 max_batch: int = MAX_BATCH):
        if wait_s < 0 or max_batch < 1:
            raise InputError(f"batch wait {wait_s * 1000:g} ms and max batch {max_batch}: the wait must not be negative, the batch positive")
        self.run, self.models, self.wait_s, self.max_batch = run, models, wait_s, max_batch
        self._pending: deque[tuple[float, Any, Future]] = deque()
        self._changed = threading.Condition()
        self._draining = False  # a drain is queued or running on the model thread

    def submit(self, item: Any) -> Future:
        """A future of the item's outcome (an Exception outcome is set as the future's exception)."""
        future: Future = Future()
        with self._changed:
            self._pending.append((time.monotonic(), item, future))
            self._changed.notify()
            if not self._draining:
                self._draining = True
                self.models.submit(self._drain)
        return future

    def _next_batch(self) -> list[tuple[float, Any, Future]]:
        with self._changed:
            if self._pending:
                deadline = self._pending[0][0] + self.wait_s
                while len(self._pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    self._changed.wait(left)
            batch = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch))]
            if not batch:
                self._draining = False
            return batch

    def _drain(self) -> None:
        """On the model thread: batch after batch until none is pending."""
        while batch := self._next_batch():
            batch = [entry for entry in batch if entry[2].set_running_or_notify_cancel()]  # a cancelled request is not computed
            if not batch:
                continue
            try:
                outcomes = self.run([item for _, item, _ in batch])
                assert len(outcomes) == len(batch), (len(outcomes), len(batch))
            except Exception as error:  # a bug in the batch path: every request of the batch reports it
                logging.getLogger(__name__).exception("search batch failed")
                outcomes = [error] * len(batch)
            for (_, _, future), outcome in zip(batch, outcomes):
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)


def model_thread() -> ThreadPoolExecutor:
    """The one thread that runs the networks. It computes one batch of searches at a time (the models
    are not thread-safe), and keeping torch on a single thread matters for speed: every thread that runs
    parallel torch ops gets its own OpenMP team, and with two teams on a 2-core machine libgomp stops
    spin-waiting, which made each network stage 1.5-2x slower (docs/BENCHMARKS.md)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="sketch2medi-models")


def create_app(retriever: Retriever | Callable[[], Retriever], token: str | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_concurrent: int = 32, busy_wait_s: float = 10.0,
               models: ThreadPoolExecutor | None = None, host: str | None = None,
               allowed_hosts: Iterable[str] | None = None, audit_log: AuditLog | None = None,
               batch_wait_ms: float = BATCH_WAIT_MS, max_batch: int = MAX_BATCH, refresh_s: float = REFRESH_S) -> FastAPI:
    """The web application over one retriever (or a factory, called once on the model thread). It
    does not close the retriever: the caller owns it. `models` is the thread searches run on (see
    `model_thread`; one is made if not given): pass the one the retriever was loaded on. `host` is
    the address served on, `allowed_hosts` the Host header names to answer (see the module docstring).
    With `audit_log`, every search is recorded there (`retrieval.audit`). `batch_wait_ms` and
    `max_batch`: how long an idle model thread waits for more searches to batch with the first, and
    the most in one batch (`SearchBatcher`; 0 and 1 search one at a time). `refresh_s`: how often at
    most a batch first picks up what index runs committed since (see the module docstring; 0: before
    every batch)."""
    if max_upload_bytes < 1 or max_concurrent < 1 or busy_wait_s < 0 or not refresh_s >= 0:
        raise InputError("max_upload_bytes and max_concurrent must be positive, busy_wait_s and refresh_s not negative")
    models = models or model_thread()
    # anything with Retriever's search_many, workspace, models
    retriever = models.submit(retriever).result() if callable(retriever) else retriever
    follow = _CatalogFollower(retriever.workspace, refresh_s)
    batcher = SearchBatcher(lambda items: _searched_with_meta(retriever, items, follow), models, batch_wait_ms / 1000, max_batch)
    app = FastAPI(title="sketch2medi", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, token=token or None, max_body=max_upload_bytes + FORM_OVERHEAD,
                       hosts=allowed_host_names(token, host, allowed_hosts))
    app.mount("/static", StaticFiles(directory=WEB), name="static")
    _add_error_handlers(app)
    _add_page_and_info(app, retriever, max_upload_bytes, max_concurrent)
    decoder = decoder_thread()
    _add_search(app, batcher, decoder, _Slots(max_concurrent), max_upload_bytes, busy_wait_s, audit_log, token or None)
    _add_images(app, retriever, decoder)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as `{"error": "one line"}`."""
    @app.exception_handler(_ApiError)
    async def api_error(_, error: _ApiError):
        return _error(error.status, str(error), error.headers, error.field)

    @app.exception_handler(InputError)
    async def input_error(_, error: InputError):
        return _error(400, str(error))

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):
        return _error(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_, error: Exception):  # a bug, not the user's doing: the traceback goes to the log
        return _error(500, f"internal error ({type(error).__name__}); see the server's log")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return _error(422, f"{where}: {first.get('msg', 'invalid')}")


def _add_page_and_info(app: FastAPI, retriever: Retriever, max_upload_bytes: int, max_concurrent: int) -> None:
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/health")
    def health():
        return {"status": "ok"}

    @app.get("/api/info")
    def info():
        ws = retriever.workspace
        return {"workspace": str(ws.path), "images": ws.index.ntotal, "bundle_id": ws.bundle_id,
                "bundle": str(retriever.models.bundle), "resolution": retriever.models.resolution,
                "device": str(retriever.models.device), "max_upload_bytes": max_upload_bytes,
                "max_concurrent": max_concurrent, "palette": PALETTE.tolist(),
                "classes": colour_table(retriever.models.bundle),
                "defaults": {"k": 10, "candidates": 100, "rerank": True, "lambda": DEFAULT_LAMBDA,
                             "steps": retriever.models.sketch2medi.default_steps},
                "limits": {"k": MAX_K, "candidates": MAX_CANDIDATES, "steps": MAX_STEPS}}


def _add_search(app: FastAPI, batcher: SearchBatcher, decoder: ThreadPoolExecutor, slots: _Slots,
                max_upload_bytes: int, busy_wait_s: float, audit_log: AuditLog | None, token: str | None) -> None:
    @app.post("/api/search")
    async def search(request: Request,
                     sketch: UploadFile | None = File(None, description="the drawing, a PNG (or any image) file"),
                     image: UploadFile | None = File(None, description="an image to search by instead of a sketch"),
                     like: list[int] = Form([], description="archive image ids (repeated field): more like them"),
                     unlike: list[int] = Form([], description="archive image ids (repeated field): less like them"),
                     where: str | None = Form(None, description="a filter, e.g. modality=ES; date>=2020-01-01"),
                     group: str | None = Form(None, description="patient, study, series or none (default: study where known)"),
                     k: int = Form(10, ge=1, le=MAX_K), candidates: int = Form(100, ge=1, le=MAX_CANDIDATES),
                     rerank: bool = Form(True), lam: float = Form(DEFAULT_LAMBDA, alias="lambda", ge=0, le=1),
                     steps: int | None = Form(None, ge=0, le=MAX_STEPS),
                     labelled: bool = Form(False, description="the sketch is colour-coded by class (/api/info's classes)")):
        if sketch is None and image is None and not like:
            raise _ApiError(422, "sketch: a file is required (or image, a file to search by, or like, archive image ids)")
        if group is not None and group not in GROUPINGS:
            raise _ApiError(422, f"group {group!r}: use one of {', '.join(GROUPINGS)}", field="group")
        try:
            search_filter = SearchFilter.parse(where) if where else None
        except InputError as error:
            raise _ApiError(400, str(error), field="where") from None
        uploads, digests = {}, {}
        for name, upload in (("sketch", sketch), ("image", image)):
            if upload is None:
                continue
            data = await upload.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise _ApiError(413, f"upload over the {max_upload_bytes} byte limit; send a smaller image")
            digests[name] = hashlib.sha256(data).hexdigest()
            uploads[name] = await asyncio.wrap_future(decoder.submit(released, decode_upload, data, name))  # a broken file never takes a slot
            del data
        query = SearchRequest(uploads.get("sketch"), k=k, candidates=candidates, rerank=rerank, lam=lam, steps=steps,
                              image=uploads.get("image"), like=like, unlike=unlike, where=search_filter, labelled=labelled)
        if not await slots.take(busy_wait_s):
            raise _ApiError(503, f"busy: {slots.n} searches are running or queued; try again shortly", {"Retry-After": "1"})
        try:
            result, groups, meta = await asyncio.wrap_future(batcher.submit((query, group)))
        finally:
            slots.release()
        params = {"k": k, "candidates": candidates, "rerank": rerank, "lambda": lam, "steps": steps, "group": group, "labelled": labelled}
        if audit_log is not None:
            audit_log.record(client=request.client.host if request.client else None, token=token, uploads=digests, like=like,
                             unlike=unlike, where=where, params=params, ids=[hit.id for hit in result.results])
        return {**result.to_json(), "results": [{**_hit_json(hit), **_meta_json(meta[hit.id])} for hit in result.results],
                "groups": None if groups is None else [_group_json(g) for g in groups],
                "params": params,
                "query": {"sketch": None if result.sketch is None else data_url(result.sketch),
                          "generated": None if result.image is None else data_url(result.image),
                          "masks": data_url(mask_overlay(result.labels)) if rerank else None}}


class _CatalogFollower:
    """Calls `Workspace.refresh` at most every `every_s` seconds; run on the model thread, before a
    batch of searches, since patching the index while it is searched is not safe."""

    def __init__(self, workspace, every_s: float):
        self.workspace, self.every_s, self.checked = workspace, every_s, time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.checked >= self.every_s:
            self.workspace.refresh()
            self.checked = now


def _searched_with_meta(retriever: Retriever, items: list[tuple[SearchRequest, str | None]], follow: Callable[[], None]) -> list:
    """`grouped_search_many` of (request, group) pairs, each outcome with the catalog's metadata of
    its hits (read on the model thread, beside the search): (result, groups, meta) or an Exception.
    `follow()` first picks up what index runs committed (`_CatalogFollower`)."""
    follow()
    outcomes = []
    for outcome in grouped_search_many(retriever, items):
        if not isinstance(outcome, Exception):
            result, groups = outcome
            records = retriever.workspace.records_for([hit.id for hit in result.results])
            outcome = result, groups, {image_id: record.meta for image_id, record in records.items()}
        outcomes.append(outcome)
    return outcomes


def _hit_json(hit: Hit) -> dict:
    """A hit as `--json` writes it, with the URLs of its pictures."""
    base = f"/api/images/{hit.id}"
    return {**asdict(hit), "image": f"{base}/image.png", "thumbnail": f"{base}/thumbnail.png", "masks": f"{base}/masks.png"}


def _meta_json(meta: FileMeta) -> dict:
    """What the catalog records of a hit's file (docs/INDEX.md), without the SOPInstanceUID, as a group's
    metadata is written."""
    return {column: value for column, value in meta.values().items() if column != "sop_uid"}


def _group_json(group: Group) -> dict:
    """A group as `--json` writes it, each of its hits also with its score, path and picture URLs."""
    written = group.to_json()
    written["hits"] = [{**_hit_json(shown.hit), "count": shown.count} for shown in group.hits]
    return written


def _add_images(app: FastAPI, retriever: Retriever, decoder: ThreadPoolExecutor) -> None:
    pictures, decoding = PictureCache(), threading.Lock()

    def record(image_id: int):
        found = retriever.workspace.records_for([image_id]).get(image_id) if 0 <= image_id <= MAX_IMAGE_ID else None
        if found is None:
            raise _ApiError(404, f"image {image_id}: not in the catalog")
        return found

    def unchanged(image) -> bool:
        """Only a file still as it was indexed shows its image."""
        try:
            stat = os.stat(image.path)
        except OSError:
            return False
        return (stat.st_size, stat.st_mtime_ns) == (image.size, image.mtime_ns)

    def picture(image_id: int, side: int) -> bytes:
        image = record(image_id)
        if unchanged(image):
            version = (image_id, image.size, image.mtime_ns)  # a re-indexed file is another picture
            found = pictures.lookup((version, side))
            if found is not None:
                return found
            with decoding:  # requests for one image wait for its first decode, then find it cached
                found = pictures.lookup((version, side))
                if found is not None:
                    return found
                try:
                    shown = decoder.submit(released, shown_pngs, Path(image.path), image.frame, (IMAGE_SIDE, THUMBNAIL_SIDE)).result()
                except (OSError, InputError):
                    shown = None
                if shown is not None:
                    for shown_side, data in shown.items():
                        pictures.put((version, shown_side), data)
                    return shown[side]
        raise _ApiError(410, f"image {image_id}: its file is gone or changed since indexing; re-index the archive")

    def png(data: bytes) -> Response:
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/images/{image_id}/image.png")
    def image_png(image_id: int):
        return png(picture(image_id, IMAGE_SIDE))

    @app.get("/api/images/{image_id}/thumbnail.png")
    def thumbnail_png(image_id: int):
        return png(picture(image_id, THUMBNAIL_SIDE))

    @app.get("/api/images/{image_id}/masks.png")
    def masks_png(image_id: int):
        image = record(image_id)
        labels = retriever.workspace.masks_for([image_id]).get(image_id)
        if labels is None:
            raise _ApiError(404, f"image {image_id}: has no stored masks")
        return png(png_bytes(placed_overlay(labels, *fit(image.width, image.height, IMAGE_SIDE))))


def _compiled(retriever: Retriever) -> None:
    """Compile the retriever's networks and search a drawn ellipse, so that the first request does
    not wait for the compiler."""
    retriever.models.compile()
    side = retriever.models.resolution * 4
    sketch = Image.new("L", (side, side), 255)
    ImageDraw.Draw(sketch).ellipse((side // 4, side // 3, 3 * side // 4, 2 * side // 3), outline=0, width=3)
    retriever.search(sketch, 1)


def serve(workspace: str | Path | None, host: str, port: int, bundle: str | Path | None = None, db_url: str | None = None,
          token: str | None = None, device: str = "cpu", max_concurrent: int = 32,
          allowed_hosts: Iterable[str] | None = None, audit_log: str | Path | None = None,
          batch_wait_ms: float = BATCH_WAIT_MS, max_batch: int = MAX_BATCH, refresh_s: float = REFRESH_S,
          compile_networks: bool = False) -> None:
    """`sketch2medi serve`: check the binding, open the workspace (one-line errors), run uvicorn.
    token: the access token every request must carry (`access_token()` reads it from the environment);
    compile_networks: `SystemModels.compile` and one search to compile them before serving (with
        max_batch 1 only);
    the other arguments as `create_app` takes them."""
    import uvicorn

    host = bind_host(host)
    check_bind(host, token)
    if compile_networks and max_batch != 1:
        # Each new batch size would compile anew, for tens of seconds, while its requests wait.
        raise InputError("--compile searches one at a time: add --max-batch 1 (compiled networks would recompile for every new batch size)")
    audit = AuditLog(audit_log) if audit_log is not None else None  # refused before the networks load
    models = model_thread()
    retriever = models.submit(Retriever, workspace, bundle, db_url, device).result()  # loaded where it will run
    with retriever:
        if compile_networks:
            print("sketch2medi: compiling the networks (a minute or two the first time)", flush=True)
            models.submit(_compiled, retriever).result()
        app = create_app(retriever, token=token, max_concurrent=max_concurrent, models=models, host=host,
                         allowed_hosts=allowed_hosts, audit_log=audit, batch_wait_ms=batch_wait_ms, max_batch=max_batch,
                         refresh_s=refresh_s)
        print(f"sketch2medi: {retriever.workspace.index.ntotal} images; open {page_url(host, port)}" + ("?token=..." if token else ""),
              flush=True)
        config = uvicorn.Config(app, host=host, port=port, log_level="info")  # sets up uvicorn's loggers
        logging.getLogger("uvicorn.access").addFilter(_redact_token)
        uvicorn.Server(config).run()


def _redact_token(record: logging.LogRecord) -> bool:
    """Access log lines show `/?token=***`: the log may be read by others than the token's holder."""
    if isinstance(record.args, tuple):
        record.args = tuple(re.sub(r"(?<=token=)[^&\s]+", "***", arg) if isinstance(arg, str) else arg for arg in record.args)
    return True
