"""Indexing a PACS over DICOMweb, against a real Orthanc with its DICOMweb plugin on a loopback port:
identifiers recorded (no names), incremental and resumable runs, filters, and every way the server
can fail (down, refusing, wrong credentials, stalling, a bad or vanished instance)."""

from __future__ import annotations

import base64
import glob
import io
import json
import os
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_ingest import BLOCKING_RUN, FakeEmbedder, blocky, dicom_dataset

from generation.errors import InputError
from indexing.catalog import Catalog
from indexing.dicomweb import DicomWebFilters
from indexing.files import SourceFailed
from indexing.ingest import index_dicomweb
from indexing.workspace import catalog_url, open_workspace_for_search

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed (pip install 'sketch2medi[pacs]')")

ORTHANC = shutil.which("Orthanc")
OPENSSL = shutil.which("openssl")
PLUGIN = next(iter(sorted(glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*") + glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*"))), None)
pytestmark = pytest.mark.skipif(
    ORTHANC is None or PLUGIN is None,
    reason="Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does)",
)
USER, PASSWORD = "indexer", "s3cret"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Orthanc:
    """An Orthanc process of the test's own: a free loopback port, storage in a temporary folder,
    HTTP basic authentication, the DICOMweb plugin at /dicom-web."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "sketch2medi-test", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }))  # fmt: skip
        self.process: subprocess.Popen | None = None
        self.ids: dict[str, str] = {}  # SOPInstanceUID -> Orthanc's id

    @property
    def url(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.port}/dicom-web"

    def start(self) -> None:
        self.log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.rest("GET", "/system")
                return
            except (urllib.error.URLError, ConnectionError):
                assert self.process.poll() is None, (self.folder / "orthanc.log").read_text()
                assert time.monotonic() < deadline, "Orthanc did not start"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        self.log.close()

    def rest(self, method: str, path: str, data: bytes | None = None):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def upload(self, dataset) -> str:
        """POST /instances: store one instance; returns its SOPInstanceUID."""
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        self.ids[dataset.SOPInstanceUID] = self.rest("POST", "/instances", buffer.getvalue())["ID"]
        return dataset.SOPInstanceUID

    def delete(self, sop_uid: str) -> None:
        self.rest("DELETE", f"/instances/{self.ids.pop(sop_uid)}")


def instance(patient: str, study: str, series: str, modality: str, date: str, pixels: np.ndarray, **tags):
    """A DICOM instance: 16-bit MONOCHROME2 from (H, W) or (F, H, W) values, 8-bit RGB from (H, W, 3)."""
    dataset = dicom_dataset(modality, PatientID=patient, PatientName=f"Doe^{patient}", PatientBirthDate="19700101",
                            StudyInstanceUID=study, SeriesInstanceUID=series, StudyDate=date, BodyPartExamined="LARYNX", **tags)
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        dataset.Rows, dataset.Columns = pixels.shape[:2]
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.PlanarConfiguration = 3, "RGB", 0
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
        dataset.PixelData = np.ascontiguousarray(pixels, np.uint8).tobytes()
    else:
        dataset.Rows, dataset.Columns = pixels.shape[-2:]
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
        if pixels.ndim == 3:
            dataset.NumberOfFrames = pixels.shape[0]
        dataset.PixelData = np.ascontiguousarray(pixels, "<u2").tobytes()
    return dataset


def grey(seed: int) -> np.ndarray:
    return blocky(seed)[..., 0].astype(np.uint16) * 200


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop()


# Two patients, three studies, four series: 7 entries in 5 instances.
ARCHIVE = [
    ("P1", "1.2.826.0.1.1", "1.2.826.0.1.1.1", "CT", "20200115", lambda: grey(1)),
    ("P1", "1.2.826.0.1.1", "1.2.826.0.1.1.1", "CT", "20200115", lambda: grey(2)),
    ("P1", "1.2.826.0.1.2", "1.2.826.0.1.2.1", "ES", "20230310", lambda: blocky(3)),  # RGB
    ("P1", "1.2.826.0.1.2", "1.2.826.0.1.2.2", "XA", "20230310", lambda: np.stack([grey(4), grey(5), grey(6)])),  # 3 frames
    ("P2", "1.2.826.0.2.1", "1.2.826.0.2.1.1", "CT", "20210601", lambda: grey(7)),
]


@pytest.fixture
def archive(orthanc, monkeypatch):
    """The Orthanc seeded with ARCHIVE, the credentials in $PACS_LOGIN: (server, SOPInstanceUIDs)."""
    monkeypatch.setenv("PACS_LOGIN", f"{USER}:{PASSWORD}")
    return orthanc, [orthanc.upload(instance(p, st, se, m, d, pixels())) for p, st, se, m, d, pixels in ARCHIVE]


def catalog_meta(workspace: Path) -> dict[tuple[str, int], tuple]:
    """(SOPInstanceUID, frame) -> (patient, study, series, modality, date, body part) for every entry."""
    with open_workspace_for_search(workspace) as ws:
        records = ws.records_for(ws.index.ids()).values()
    return {(r.meta.sop_uid, r.frame): (r.meta.patient_id, r.meta.study_uid, r.meta.series_uid, r.meta.modality,
                                        r.meta.study_date, r.meta.body_part) for r in records}  # fmt: skip


def test_a_pacs_is_indexed_with_its_identifiers_and_no_names(archive, tmp_path):
    server, sops = archive
    embedder = FakeEmbedder()
    summary = index_dicomweb(server.url, tmp_path / "ws", embedder, auth="basic:PACS_LOGIN", tag="pacs-a")
    assert (summary.added, summary.unchanged, summary.skipped, summary.total) == (7, 0, [], 7)
    expected = {}
    for sop, (patient, study, series, modality, date, pixels) in zip(sops, ARCHIVE):
        for frame in range(3 if modality == "XA" else 1):
            expected[(sop, frame)] = (patient, study, series, modality, date, "LARYNX")
    assert catalog_meta(tmp_path / "ws") == expected
    with open_workspace_for_search(tmp_path / "ws") as ws:
        records = {(r.meta.sop_uid, r.frame): r for r in ws.records_for(ws.index.ids()).values()}
        # each entry ranks first for the vector of its own pixels (the RGB one and each frame too)
        for (sop, frame), pixels in [((sops[2], 0), blocky(3)), ((sops[3], 1), grey(5)), ((sops[4], 0), grey(7))]:
            _, ids = ws.index.search(embedder.vector(_as_loaded(pixels))[None], 1)
            assert int(ids[0, 0]) == records[(sop, frame)].id
        record = records[(sops[0], 0)]
        assert record.path == f"{server.url}/studies/{ARCHIVE[0][1]}/series/{ARCHIVE[0][2]}/instances/{sops[0]}"
        assert record.modality == "DICOM:CT" and record.meta.tag == "pacs-a"
    catalog_bytes = b"".join(path.read_bytes() for path in (tmp_path / "ws").glob("catalog.sqlite*"))
    assert b"Doe^" not in catalog_bytes and b"19700101" not in catalog_bytes  # no names, no birth dates

    again = FakeEmbedder()
    summary = index_dicomweb(server.url, tmp_path / "ws", again, auth="basic:PACS_LOGIN")
    assert (summary.added, summary.unchanged, again.embedded) == (0, 7, 0)
    sops.append(server.upload(instance("P2", "1.2.826.0.2.1", "1.2.826.0.2.1.1", "CT", "20210601", grey(8))))
    summary = index_dicomweb(server.url, tmp_path / "ws", again, auth="basic:PACS_LOGIN")
    assert (summary.added, summary.unchanged, again.embedded) == (1, 7, 1)


def _as_loaded(pixels: np.ndarray) -> np.ndarray:
    """What `files.load` makes of an instance's pixels: RGB as is, grey stretched to its min/max."""
    if pixels.ndim == 3:
        return pixels
    values = pixels.astype(np.float64)
    scaled = np.rint((values - values.min()) / (values.max() - values.min()) * 255.0).astype(np.uint8)
    return np.repeat(scaled[..., None], 3, axis=2)


@pytest.mark.parametrize(
    "filters, wanted",
    [
        (DicomWebFilters(modalities=("ct",)), [0, 1, 4]),
        (DicomWebFilters(modalities=("ES", "XA")), [2, 3]),
        (DicomWebFilters(study_date="20210101-"), [2, 3, 4]),
        (DicomWebFilters(study_date="20200101-20201231"), [0, 1]),
        (DicomWebFilters(study_uid="1.2.826.0.1.2", modalities=("XA",)), [3]),
    ],
)
def test_filters_narrow_the_listing(archive, tmp_path, filters, wanted):
    server, sops = archive
    index_dicomweb(server.url, tmp_path / "ws", FakeEmbedder(), auth="basic:PACS_LOGIN", filters=filters)
    assert sorted({sop for sop, _ in catalog_meta(tmp_path / "ws")}) == sorted(sops[i] for i in wanted)


def test_a_bad_date_range_is_refused():
    with pytest.raises(InputError, match="is not a date range; use YYYYMMDD"):
        DicomWebFilters(study_date="2020-01-01")


def test_an_interrupted_run_resumes_where_it_stopped(archive, tmp_path):
    server, _ = archive
    reported = []

    def stop_after_the_first_batch(done, total, name):
        reported.append(name)
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        index_dicomweb(server.url, tmp_path / "ws", FakeEmbedder(), auth="basic:PACS_LOGIN", batch_size=2,
                       on_progress=stop_after_the_first_batch)  # fmt: skip
    with Catalog(catalog_url(tmp_path / "ws"), create=False) as catalog:
        assert set(reported) <= set(catalog.entries())
        kept = sum(map(len, catalog.entries().values()))
    embedder = FakeEmbedder()
    summary = index_dicomweb(server.url, tmp_path / "ws", embedder, auth="basic:PACS_LOGIN", batch_size=2)
    assert (summary.unchanged, summary.added, summary.total) == (kept, 7 - kept, 7)


KILLED_RUN = BLOCKING_RUN + """
from indexing.ingest import index_dicomweb

index_dicomweb(source, workspace, Blocking(), auth="basic:PACS_LOGIN", batch_size=2, on_progress=report)
"""


def test_kill_9_in_the_middle_of_a_run_loses_nothing_reported_and_a_rerun_completes(archive, tmp_path):
    server, _ = archive
    workspace, progress, blocked = tmp_path / "ws", tmp_path / "progress.txt", tmp_path / "blocked"
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment["OMP_NUM_THREADS"] = "1"
    tests = Path(__file__).resolve().parent
    process = subprocess.Popen([sys.executable, str(script), str(tests), str(tests.parent), server.url, str(workspace), str(progress), str(blocked)],
                               env=environment, cwd=tests.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not blocked.exists():
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "the indexing process never reached its second batch"
            time.sleep(0.05)
    finally:
        process.kill()  # SIGKILL: no cleanup of any kind
        process.wait()
    reported = progress.read_text().split()
    assert len(reported) == 2
    with Catalog(catalog_url(workspace), create=False) as catalog:
        assert set(reported) <= set(catalog.entries())  # nothing reported as indexed was lost
        kept = sum(map(len, catalog.entries().values()))
    embedder = FakeEmbedder()
    summary = index_dicomweb(server.url, workspace, embedder, auth="basic:PACS_LOGIN", batch_size=2)
    assert (summary.unchanged, summary.added, summary.total) == (kept, 7 - kept, 7)
    with open_workspace_for_search(workspace) as ws:
        np.testing.assert_array_equal(ws.index.ids(), ws.catalog.ids())
        assert len(ws.catalog.ids()) == 7


def test_a_server_that_goes_down_mid_run_keeps_what_was_committed(archive, tmp_path):
    server, _ = archive

    def stop_the_server(done, total, name):
        if done == 2:
            server.stop()

    with pytest.raises(SourceFailed, match=r"^dicomweb\+http://127\.0\.0\.1:\d+/dicom-web: cannot connect while fetching .*; check the address"):
        index_dicomweb(server.url, tmp_path / "ws", FakeEmbedder(), auth="basic:PACS_LOGIN", batch_size=2, on_progress=stop_the_server)
    with Catalog(catalog_url(tmp_path / "ws"), create=False) as catalog:
        kept = sum(map(len, catalog.entries().values()))
    assert kept >= 2
    server.start()  # the same storage: the re-run completes
    summary = index_dicomweb(server.url, tmp_path / "ws", FakeEmbedder(), auth="basic:PACS_LOGIN", batch_size=2)
    assert (summary.unchanged, summary.added, summary.total) == (kept, 7 - kept, 7)


def test_an_instance_deleted_after_listing_is_skipped_and_a_bad_one_reported(archive, tmp_path):
    server, sops = archive
    broken = instance("P3", "1.2.826.0.3.1", "1.2.826.0.3.1.1", "CT", "20240101", grey(9))
    broken.PixelData = broken.PixelData[:100]  # far fewer bytes than its rows and columns need
    sops.append(server.upload(broken))
    summary = index_dicomweb(server.url, tmp_path / "ws", FakeEmbedder(), auth="basic:PACS_LOGIN",
                             on_start=lambda total: server.delete(sops[1]))  # fmt: skip
    reasons = {name.rsplit("/", 1)[-1]: why for name, why in summary.skipped}
    assert reasons.keys() == {sops[1], sops[-1]}
    assert reasons[sops[1]] == "deleted from the server since it was listed"
    assert reasons[sops[-1]].startswith("cannot decode its pixel data")
    assert (summary.added, summary.total) == (6, 8)
    summary = index_dicomweb(server.url, tmp_path / "ws", FakeEmbedder(), auth="basic:PACS_LOGIN")
    assert (summary.added, summary.unchanged, [name.rsplit("/", 1)[-1] for name, _ in summary.skipped]) == (0, 6, [sops[-1]])


def test_instances_deleted_on_the_server_leave_the_catalog_where_the_listing_covers_them(archive, tmp_path):
    server, sops = archive
    workspace = tmp_path / "ws"
    index_dicomweb(server.url, workspace, FakeEmbedder(), auth="basic:PACS_LOGIN")
    server.delete(sops[3])  # the 3-frame XA instance
    server.delete(sops[0])  # one of the two CT instances of series 1.2.826.0.1.1.1
    ct_only = DicomWebFilters(modalities=("CT",))
    summary = index_dicomweb(server.url, workspace, FakeEmbedder(), auth="basic:PACS_LOGIN", filters=ct_only)
    # the CT series was listed, so its deleted instance is gone; the XA series is out of the filter, so kept
    assert (summary.removed, summary.unchanged) == (1, 2)
    assert {sop for sop, _ in catalog_meta(workspace)} == {sops[1], sops[2], sops[3], sops[4]}
    summary = index_dicomweb(server.url, workspace, FakeEmbedder(), auth="basic:PACS_LOGIN")
    assert (summary.removed, summary.unchanged, summary.total) == (3, 3, 3)
    assert {sop for sop, _ in catalog_meta(workspace)} == {sops[1], sops[2], sops[4]}
    with open_workspace_for_search(workspace) as ws:
        assert ws.index.ntotal == 3


def test_credentials_are_checked_before_anything_is_written(archive, tmp_path, monkeypatch):
    server, _ = archive
    workspace = tmp_path / "ws"
    monkeypatch.setenv("WRONG_LOGIN", f"{USER}:nope")
    monkeypatch.setenv("PACS_TOKEN", "not-a-token-orthanc-knows")
    for auth in (None, "basic:WRONG_LOGIN", "bearer:PACS_TOKEN"):
        with pytest.raises(SourceFailed, match=r": refused the credentials while listing studies \(401 Unauthorized\); check --auth"):
            index_dicomweb(server.url, workspace, FakeEmbedder(), auth=auth)
    with pytest.raises(InputError, match=r"^--auth basic:NOT_SET: the environment variable NOT_SET is not set; export the user:password in it$"):
        index_dicomweb(server.url, workspace, FakeEmbedder(), auth="basic:NOT_SET")
    with pytest.raises(InputError, match=r"^--auth 'PACS_LOGIN': use bearer:VARIABLE or basic:VARIABLE"):
        index_dicomweb(server.url, workspace, FakeEmbedder(), auth="PACS_LOGIN")
    with pytest.raises(InputError, match=r"credentials do not go in the address; put them in an environment variable"):
        index_dicomweb(server.url.replace("//", f"//{USER}:{PASSWORD}@"), workspace, FakeEmbedder())
    assert not workspace.exists()


def test_a_server_that_is_down_or_stalls_is_one_line_error(tmp_path, monkeypatch):
    with pytest.raises(SourceFailed, match=r"cannot connect while listing studies .*; check the address and that the server runs$"):
        index_dicomweb(f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web", tmp_path / "ws", FakeEmbedder())
    with socket.socket() as stalling:  # reads the request and never answers
        stalling.bind(("127.0.0.1", 0))
        stalling.listen()
        requests: list[bytes] = []

        def read_requests() -> None:
            connection, _ = stalling.accept()
            with connection:
                requests.append(connection.recv(65536))
                time.sleep(2)

        reader = threading.Thread(target=read_requests, daemon=True)
        reader.start()
        url = f"dicomweb+http://127.0.0.1:{stalling.getsockname()[1]}/dicom-web"
        monkeypatch.setenv("PACS_TOKEN", "tok-123")
        started = time.monotonic()
        with pytest.raises(SourceFailed, match=r"no answer within 0.5 s while listing studies; check the server, or raise --timeout$"):
            index_dicomweb(url, tmp_path / "ws", FakeEmbedder(), auth="bearer:PACS_TOKEN", timeout=0.5)
        assert time.monotonic() - started < 20
        reader.join(10)
    assert requests and requests[0].startswith(b"GET /dicom-web/studies")
    assert b"\r\nAuthorization: Bearer tok-123\r\n" in requests[0]  # the token goes in the header, from the environment
    assert not (tmp_path / "ws").exists()


class TlsProxy:
    """HTTPS in front of an Orthanc (as a hospital's reverse proxy puts it), with a self-signed
    certificate for 127.0.0.1 made by the openssl command: TLS from the client, plain HTTP on to Orthanc."""

    def __init__(self, folder: Path, backend_port: int):
        self.certificate, key = folder / "proxy-cert.pem", folder / "proxy-key.pem"
        subprocess.run([OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(self.certificate)],
                       check=True, capture_output=True)  # fmt: skip
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(self.certificate, key)
        self.backend_port = backend_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            secure = self.context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):  # a client that does not trust the certificate hangs up
            client.close()
            return
        backend = socket.create_connection(("127.0.0.1", self.backend_port))
        threading.Thread(target=_pipe, args=(backend, secure), daemon=True).start()
        _pipe(secure, backend)

    def close(self) -> None:
        self.listener.close()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, target):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed (apt-get install openssl)")
def test_https_verifies_the_certificate_and_trusts_the_authority_requests_ca_bundle_names(archive, tmp_path, monkeypatch):
    server, sops = archive
    proxy = TlsProxy(tmp_path, server.port)
    try:
        url = f"dicomweb+https://127.0.0.1:{proxy.port}/dicom-web"
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
        with pytest.raises(SourceFailed) as refused:
            index_dicomweb(url, tmp_path / "ws", FakeEmbedder(), auth="basic:PACS_LOGIN")
        assert str(refused.value) == (f"{url}: cannot verify the server's TLS certificate while listing studies (self-signed certificate); "
                                      "if your own authority signed it, point the REQUESTS_CA_BUNDLE environment variable at its PEM file")
        assert not (tmp_path / "ws").exists()
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(proxy.certificate))
        summary = index_dicomweb(url, tmp_path / "ws", FakeEmbedder(), auth="basic:PACS_LOGIN")
        assert (summary.added, summary.skipped, summary.total) == (7, [], 7)
        assert {sop for sop, _ in catalog_meta(tmp_path / "ws")} == set(sops)
    finally:
        proxy.close()


def test_cli_indexes_a_pacs_and_exits_2_when_it_cannot(archive, tiny_chain, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    server, _ = archive
    _, bundle, _ = tiny_chain
    options = ["--workspace", str(tmp_path / "ws"), "--bundle", str(bundle), "--device", "cpu"]
    result = CliRunner().invoke(app, ["index", server.url, *options, "--auth", "basic:PACS_LOGIN", "--modality", "CT", "--tag", "clinic-a"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "added 3, unchanged 0, duplicates 0, skipped 0, removed 0"
    result = CliRunner().invoke(app, ["index", server.url, *options])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"error: {server.url}: refused the credentials while listing studies (401 Unauthorized)")
    result = CliRunner().invoke(app, ["index", str(tmp_path), *options, "--modality", "CT"])
    assert result.exit_code == 2 and "are for a DICOMweb server" in result.output


def test_no_identifying_text_beyond_the_identifiers_is_stored(archive, tmp_path):
    server, _ = archive
    index_dicomweb(server.url, tmp_path / "ws", FakeEmbedder(), auth="basic:PACS_LOGIN")
    with sqlite3.connect(tmp_path / "ws" / "catalog.sqlite") as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(files)")]
    assert columns == ["id", "path", "frame", "image_id", "size", "mtime_ns", "inode", "ctime_ns", "patient_id", "study_uid",
                       "series_uid", "sop_uid", "modality", "study_date", "body_part", "tag"]  # fmt: skip
