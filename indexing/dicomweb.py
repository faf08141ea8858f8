"""A DICOMweb server (a PACS) as an archive: QIDO-RS to list its instances, WADO-RS to fetch them.

An archive on a server is named `dicomweb+http://HOST:PORT/PATH` (or `dicomweb+https://`), where
PATH is the server's DICOMweb root (Orthanc's is `/dicom-web`). Credentials never appear on a
command line or in that name: `auth` names how to authenticate and the environment variable that
holds the secret, `bearer:VARIABLE` (a token) or `basic:VARIABLE` (`user:password`). Over https the server's certificate is verified against the
system's certificate authorities, or against the PEM file that REQUESTS_CA_BUNDLE names (a hospital's
own authority).

Needs the `pacs` extra (`dicomweb-client`). Every failure of the server as a whole (refused,
unreachable, stalled past the timeout, 401/403, an answer that is not DICOMweb) raises
`SourceFailed` with one line saying what to do; an instance that is not DICOM raises `InputError`,
and one deleted between listing and fetching gives None.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from generation.errors import InputError
from indexing.files import DicomInstance, SourceFailed

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
_DATE_RANGE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")
T = TypeVar("T")


def is_dicomweb(name: str) -> bool:
    return str(name).lower().startswith(SCHEMES)


@dataclass(frozen=True)
class DicomWebFilters:
    """Which instances to list; empty: all of them."""

    modalities: tuple[str, ...] = ()  # Modality of the series: 'CT', 'MR', 'ES', ...
    study_date: str | None = None  # a DICOM date range: YYYYMMDD, YYYYMMDD-, -YYYYMMDD or YYYYMMDD-YYYYMMDD
    study_uid: str | None = None  # StudyInstanceUID

    def __post_init__(self) -> None:
        if self.study_date is not None and (self.study_date in ("", "-") or not _DATE_RANGE.match(self.study_date)):
            raise InputError(f"study date {self.study_date!r} is not a date range; use YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD")
        object.__setattr__(self, "modalities", tuple(m.strip().upper() for m in self.modalities if m.strip()))


@dataclass(frozen=True)
class InstanceRef:
    study_uid: str
    series_uid: str
    sop_uid: str


def _auth_headers(auth: str | None) -> dict[str, str]:
    """The Authorization header that `auth` (bearer:VARIABLE or basic:VARIABLE) names."""
    if not auth:
        return {}
    kind, _, variable = auth.partition(":")
    kind = kind.strip().lower()
    if kind not in ("bearer", "basic") or not variable:
        raise InputError(f"--auth {auth!r}: use bearer:VARIABLE or basic:VARIABLE, naming the environment variable that holds the secret")
    secret = os.environ.get(variable)
    if not secret:
        raise InputError(f"--auth {auth}: the environment variable {variable} is not set; export the {'token' if kind == 'bearer' else 'user:password'} in it")
    if kind == "bearer":
        return {"Authorization": f"Bearer {secret}"}
    if ":" not in secret:
        raise InputError(f"--auth {auth}: {variable} must hold user:password")
    return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}


def _tls_reason(error: BaseException) -> str:
    """The verifier's reason inside requests' long SSLError text, e.g. 'self-signed certificate'."""
    found = re.search(r"certificate verify failed: ([^(')]+)", str(error))
    return found.group(1).strip() if found else _first_line(error)[:120]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class DicomWebServer:
    """One DICOMweb service, reached with `dicomweb-client` and answering within `timeout` seconds."""

    def __init__(self, url: str, auth: str | None = None, timeout: float = 30.0):
        if not is_dicomweb(url):
            raise InputError(f"{url}: not a DICOMweb address; use dicomweb+http://HOST:PORT/PATH or dicomweb+https://...")
        self.url = url.rstrip("/")
        service = self.url[len("dicomweb+") :]
        if "@" in service.split("/")[2]:
            raise InputError(f"{self.url.split('@')[-1]}: credentials do not go in the address; put them in an environment variable and pass --auth basic:VARIABLE")
        if not timeout > 0:
            raise InputError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        headers = _auth_headers(auth)
        try:
            from dicomweb_client.api import DICOMwebClient
        except ImportError:
            raise InputError("indexing a DICOMweb server needs the pacs extra: pip install 'sketch2medi[pacs]'") from None
        try:
            self.client = DICOMwebClient(service, headers=headers, timeout=self.timeout)
        except ValueError as error:  # an address it cannot parse
            raise InputError(f"{self.url}: not a usable DICOMweb address ({_first_line(error)})")
        self.client.set_http_retry_params(retry=False)  # a stalled server is reported, not waited for again and again

    def instance_url(self, ref: InstanceRef) -> str:
        """The instance's name in the catalog."""
        return f"{self.url}/studies/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_uid}"

    def _call(self, what: str, call: Callable[[], T], missing_ok: bool = False) -> T | None:
        """`call()`, with the server's failures as one-line `SourceFailed`s; with `missing_ok`, a 404 gives None."""
        import requests

        try:
            return call()
        except InputError:
            raise
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status == 404 and missing_ok:
                return None
            if status == 401:
                raise SourceFailed(f"{self.url}: refused the credentials while {what} (401 Unauthorized); check --auth and the secret it names")
            if status == 403:
                raise SourceFailed(f"{self.url}: forbids {what} (403 Forbidden); ask for access for these credentials")
            raise SourceFailed(f"{self.url}: failed while {what} (HTTP {status}); check that PATH is the server's DICOMweb root")
        except requests.exceptions.SSLError as error:  # before ConnectionError, its base class
            raise SourceFailed(f"{self.url}: cannot verify the server's TLS certificate while {what} ({_tls_reason(error)}); "
                               f"if your own authority signed it, point the REQUESTS_CA_BUNDLE environment variable at its PEM file")
        except requests.Timeout:
            raise SourceFailed(f"{self.url}: no answer within {self.timeout:g} s while {what}; check the server, or raise --timeout")
        except requests.ConnectionError as error:
            raise SourceFailed(f"{self.url}: cannot connect while {what} ({_first_line(error)[:120]}); check the address and that the server runs")
        except requests.RequestException as error:
            raise SourceFailed(f"{self.url}: failed while {what} ({_first_line(error)[:120]})")
        except ValueError as error:  # an answer that is not DICOM JSON
            raise SourceFailed(f"{self.url}: answered {what} with something that is not DICOMweb ({_first_line(error)[:120]}); check PATH")

    def instances(self, filters: DicomWebFilters) -> list[InstanceRef]:
        """Every instance the server lists under `filters` (QIDO-RS: studies, then series, then instances)."""
        return list(self._instances(filters))

    def _instances(self, filters: DicomWebFilters) -> Iterator[InstanceRef]:
        client = self.client
        study_filters = {"StudyDate": filters.study_date, "StudyInstanceUID": filters.study_uid}
        study_filters = {k: v for k, v in study_filters.items() if v}
        studies = self._call("listing studies", lambda: client.search_for_studies(search_filters=study_filters, get_remaining=True))
        for study in studies:
            study_uid = _value(study, "0020000D")
            if not study_uid:
                continue
            series_list = self._call(f"listing the series of study {study_uid}",
                                     lambda: client.search_for_series(study_uid, get_remaining=True), missing_ok=True)  # fmt: skip
            for series in series_list or []:  # None: the study went since it was listed
                series_uid = _value(series, "0020000E")
                if not series_uid or (filters.modalities and (_value(series, "00080060") or "").upper() not in filters.modalities):
                    continue
                instances = self._call(f"listing the instances of series {series_uid}",
                                       lambda: client.search_for_instances(study_uid, series_uid, get_remaining=True), missing_ok=True)  # fmt: skip
                for instance in instances or []:
                    if sop_uid := _value(instance, "00080018"):
                        yield InstanceRef(study_uid, series_uid, sop_uid)

    def fetch(self, ref: InstanceRef) -> DicomInstance | None:
        """The instance (WADO-RS), as stored on the server; None if the server no longer has it."""
        name = self.instance_url(ref)
        dataset = self._call(f"fetching {ref.sop_uid}", lambda: self._retrieve(ref), missing_ok=True)
        if dataset is None:
            return None
        import pydicom

        buffer = io.BytesIO()
        try:
            pydicom.dcmwrite(buffer, dataset)
        except Exception as error:  # a dataset pydicom parsed but cannot write back
            raise InputError(f"{name}: not a well-formed DICOM instance ({_first_line(error)[:120]})")
        return DicomInstance(name, buffer.getvalue())

    def _retrieve(self, ref: InstanceRef):
        try:
            return self.client.retrieve_instance(ref.study_uid, ref.series_uid, ref.sop_uid)
        except Exception as error:
            import requests

            if isinstance(error, requests.RequestException):
                raise
            # the bytes came, but are not DICOM: this instance is skipped, the run goes on
            raise InputError(f"{self.instance_url(ref)}: not a readable DICOM instance ({_first_line(error)[:120]})") from error


def _value(dataset: dict, tag: str) -> str | None:
    """A DICOM JSON attribute's first value."""
    values = (dataset.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None
