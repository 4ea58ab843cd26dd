"""DICOMweb access to an image archive: QIDO-RS search, WADO-RS retrieval, STOW-RS storage.

Built on ``dicomweb-client``, which is synchronous (requests); every call runs in a worker
thread so the event loop never blocks. Each call has a timeout and bounded retries with
exponential back-off for what can pass (connection errors, timeouts, 429 and 5xx); dicomweb-
client's own retrying is switched off so that there is exactly one retry policy (the
site's ``[runtime] call_*``, :mod:`dsf_bridge.retry`).

Mutual TLS takes the same ``ssl.SSLContext`` the DSF side uses (client certificate and trusted
CAs inside it), mounted into the requests session so no CA bundle of requests is mixed in.

Errors::

    RemoteError                       (dsf_bridge.errors)
    └── DicomWebError                 the archive failed or refused (403, malformed answers)
        ├── StudyNotFoundError        the archive answers, but does not hold the study/series
        └── ArchiveUnavailableError   the archive cannot be reached or fails (retryable)

Logs carry counts, never UIDs, pixel data or patient attributes; the error messages name the
study and series (they are for the Task), and the log renderer puts digests in their place
(:func:`dsf_bridge.logs.redact_uids`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import requests
import structlog
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from requests.adapters import HTTPAdapter

from dsf_bridge.errors import RemoteError
from dsf_bridge.proxy import ForwardProxy
from dsf_bridge.retry import CALL_RETRY, RetryPolicy
from dsf_bridge.telemetry import DICOMWEB_SECONDS, timed

__all__ = [
    "ArchiveUnavailableError",
    "DicomWebArchive",
    "DicomWebError",
    "InstanceInfo",
    "SeriesInfo",
    "StoreResult",
    "StudyNotFoundError",
]

_log = structlog.get_logger()

_T = TypeVar("_T")

# DICOM JSON tags (PS3.18 F.2) of the attributes the bridge reads from QIDO-RS answers.
_STUDY_UID = "0020000D"
_SERIES_UID = "0020000E"
_SOP_INSTANCE_UID = "00080018"
_SOP_CLASS_UID = "00080016"
_MODALITY = "00080060"
_BODY_PART = "00180015"
_SERIES_INSTANCES = "00201209"
_INSTANCE_NUMBER = "00200013"
_DERIVED_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "DOC"})


class DicomWebError(RemoteError):
    """The DICOMweb archive failed or refused; ``url`` is the archive's base URL."""

    def __init__(
        self, message: str, *, url: str, retryable: bool = False, status: int | None = None
    ) -> None:
        super().__init__(message, retryable=retryable, status=status)
        self.url = url


class StudyNotFoundError(DicomWebError):
    """The archive is up but holds no such study (or series): trying again will not help."""


class ArchiveUnavailableError(DicomWebError):
    """The archive cannot be reached, timed out or failed on its side (5xx, 429)."""


@dataclass(frozen=True)
class SeriesInfo:
    series_instance_uid: str
    modality: str | None
    instance_count: int | None
    body_part: str | None = None  # BodyPartExamined, when the archive returns it
    # Set by the archive-wide search (:meth:`DicomWebArchive.search_all_series`) only.
    study_instance_uid: str | None = None


@dataclass(frozen=True)
class InstanceInfo:
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str | None
    instance_number: int | None


@dataclass(frozen=True)
class StoreResult:
    """What STOW-RS reported: SOP Instance UIDs stored, and those that failed."""

    stored: tuple[str, ...]
    failed: tuple[str, ...]


class _SslContextAdapter(HTTPAdapter):
    """Makes requests use our SSLContext as it is: no CA bundle of its own, no cert files."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        for key in ("ca_certs", "ca_cert_dir", "cert_file", "key_file"):
            pool_kwargs.pop(key, None)
        pool_kwargs["ssl_context"] = self._context
        pool_kwargs["cert_reqs"] = "CERT_REQUIRED"
        return host_params, pool_kwargs

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # requests would point the connection at its own CA bundle (certifi), which urllib3
        # then loads into our context; the context already says whom to trust.
        return


class DicomWebArchive:
    """One DICOMweb archive (QIDO-RS, WADO-RS and STOW-RS under one base URL).

    ``timeout`` is per HTTP request in seconds; ``retry`` is the site's policy for one call
    (``[runtime] call_*``): a connection failure, a timeout or a 5xx/429 answer is tried again
    up to ``retry.attempts`` times in all, honouring ``Retry-After`` up to its cap. ``proxy`` is
    the site's forward proxy (``[proxy]``), used unless the archive's host bypasses it; the
    proxy environment (``HTTPS_PROXY``) is never read.
    """

    def __init__(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy = CALL_RETRY,
        headers: Mapping[str, str] | None = None,
        session: requests.Session | None = None,
        proxy: ForwardProxy | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._retry = retry
        self._timeout = timeout
        self._session = session if session is not None else requests.Session()
        # The proxy is [proxy]'s, never HTTPS_PROXY's (nor a CA bundle from REQUESTS_CA_BUNDLE).
        self._session.trust_env = False
        route = proxy.route(self.url) if proxy is not None else None
        if route is not None:
            # An https archive is reached through a CONNECT tunnel; the adapter's SSLContext
            # (the site's client certificate) does the TLS inside it.
            through = route.url_with_credentials()
            self._session.proxies = {"http": through, "https": through}
        if ssl_context is not None:
            self._session.mount("https://", _SslContextAdapter(ssl_context))
        self._client = DICOMwebClient(
            self.url, session=self._session, headers=dict(headers or {}), timeout=timeout
        )
        self._client.set_http_retry_params(retry=False)
        # dicomweb-client logs request headers (tokens) at DEBUG and UIDs at INFO through its
        # own logger; our structlog events say what happened without them.
        logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
        # Its retry decorator (the "retrying" package) logs every failed try with a traceback
        # at WARNING even with retries off; dicomweb.retried says the same in one line.
        logging.getLogger("retrying").setLevel(logging.ERROR)

    @property
    def retry(self) -> RetryPolicy:
        """The policy of one call (a caller that repeats a whole stream follows it too)."""
        return self._retry

    def close(self) -> None:
        self._session.close()

    async def search_series(self, study_instance_uid: str) -> list[SeriesInfo]:
        """The series of a study (QIDO-RS); :class:`StudyNotFoundError` when there are none."""
        found = await self._call(
            "search_series",
            lambda: self._client.search_for_series(
                study_instance_uid=study_instance_uid,
                fields=[_MODALITY, _SERIES_INSTANCES, _BODY_PART],
            ),
            study=study_instance_uid,
        )
        if not found:
            raise StudyNotFoundError(
                f"study {study_instance_uid} is not in the archive at {self.url}", url=self.url
            )
        return [
            SeriesInfo(
                series_instance_uid=_text(item, _SERIES_UID) or "",
                modality=_text(item, _MODALITY),
                instance_count=_int(item, _SERIES_INSTANCES),
                body_part=_text(item, _BODY_PART),
            )
            for item in found
        ]

    async def search_all_series(
        self, filters: Mapping[str, str], *, page_size: int = 500
    ) -> AsyncGenerator[list[SeriesInfo], None]:
        """The series of the whole archive that match ``filters`` (QIDO-RS ``/series``), one
        page of at most ``page_size`` at a time, each with its study's UID, modality, body part
        and instance count.

        Pages follow with ``limit`` and ``offset`` until the archive answers an empty page,
        not merely a short one: an archive that caps its answers below ``limit`` (Orthanc's
        ``LimitFindResults``) then still yields everything. An archive that ignores ``offset``
        would return the first page again; that is a :class:`DicomWebError`, not a loop.

        The query is written here, not by dicomweb-client: its ``quote_plus`` sends ``*`` as
        ``%2A`` and a space as ``+``, and Orthanc 1.10's DICOMweb plugin (1.7) matches the
        query values as they arrive, undecoded, so a wildcard would never match there. ``*``,
        ``?`` and ``,`` go as they are (RFC 3986 allows them in a query); anything else that
        is not unreserved is percent-encoded, which archives that decode match as meant.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        fields = (_STUDY_UID, _MODALITY, _BODY_PART, _SERIES_INSTANCES)
        query = [*filters.items(), *(("includefield", tag) for tag in fields)]
        seen: set[str] = set()
        offset = 0
        while True:
            page = [*query, ("limit", str(page_size)), ("offset", str(offset))]
            url = f"{self.url}/series?" + "&".join(
                f"{quote(key, safe='')}={quote(value, safe='*?,')}" for key, value in page
            )
            found = await self._call(
                "search_series", functools.partial(self._get_json, url), study=None
            )
            if not found:
                return
            series = [
                SeriesInfo(
                    series_instance_uid=_text(item, _SERIES_UID) or "",
                    modality=_text(item, _MODALITY),
                    instance_count=_int(item, _SERIES_INSTANCES),
                    body_part=_text(item, _BODY_PART),
                    study_instance_uid=_text(item, _STUDY_UID),
                )
                for item in found
            ]
            fresh = [s for s in series if s.series_instance_uid not in seen]
            if not fresh:
                raise DicomWebError(
                    f"the DICOMweb archive at {self.url} answered QIDO-RS offset {offset} with "
                    "series it had already returned: it does not page with limit and offset",
                    url=self.url,
                )
            seen.update(s.series_instance_uid for s in fresh)
            yield fresh
            offset += len(found)

    def _get_json(self, url: str) -> list[Mapping[str, Any]]:
        """One QIDO-RS GET of a URL with its query already written (in a worker thread)."""
        response = self._session.get(
            url, headers={"Accept": "application/dicom+json"}, timeout=self._timeout
        )
        response.raise_for_status()
        if response.status_code == 204 or not response.content:
            return []
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, list) or not all(isinstance(item, Mapping) for item in data):
            raise DicomWebError(
                f"the DICOMweb archive at {self.url} answered QIDO-RS with something that is "
                "not a DICOM JSON array",
                url=self.url,
            )
        return data

    async def search_instances(
        self, study_instance_uid: str, series_instance_uid: str | None = None
    ) -> list[InstanceInfo]:
        """The instances of a study or one of its series (QIDO-RS); none is not found."""
        found = await self._call(
            "search_instances",
            lambda: self._client.search_for_instances(
                study_instance_uid=study_instance_uid,
                series_instance_uid=series_instance_uid,
                fields=[_SERIES_UID, _SOP_CLASS_UID, _INSTANCE_NUMBER],
            ),
            study=study_instance_uid,
        )
        if not found:
            what = f"series {series_instance_uid} of study" if series_instance_uid else "study"
            raise StudyNotFoundError(
                f"{what} {study_instance_uid} has no instances in the archive at {self.url}",
                url=self.url,
            )
        return [
            InstanceInfo(
                series_instance_uid=_text(item, _SERIES_UID) or series_instance_uid or "",
                sop_instance_uid=_text(item, _SOP_INSTANCE_UID) or "",
                sop_class_uid=_text(item, _SOP_CLASS_UID),
                instance_number=_int(item, _INSTANCE_NUMBER),
            )
            for item in found
        ]

    async def retrieve_series(
        self, study_instance_uid: str, series_instance_uid: str
    ) -> list[Dataset]:
        """All instances of one series as pydicom datasets (WADO-RS)."""
        datasets: list[Dataset] = await self._call(
            "retrieve_series",
            lambda: self._client.retrieve_series(
                study_instance_uid=study_instance_uid, series_instance_uid=series_instance_uid
            ),
            study=study_instance_uid,
        )
        if not datasets:
            raise StudyNotFoundError(
                f"series {series_instance_uid} of study {study_instance_uid} returned no "
                f"instances from {self.url}",
                url=self.url,
            )
        # Never the study UID: it identifies a patient's examination.
        _log.info("dicomweb.retrieved", instances=len(datasets))
        return datasets

    async def each_instance(
        self,
        study_instance_uid: str,
        series_instance_uid: str,
        handle: Callable[[Dataset], None],
    ) -> int:
        """Hand every instance of one series to ``handle`` as it arrives (WADO-RS, the
        multipart answer read as a stream), in a worker thread; returns how many.

        Unlike :meth:`retrieve_series`, never more than one instance is held here, so a series
        of any size passes in constant memory. It is not retried: ``handle`` has seen part of
        the series when a transfer breaks, so the caller starts over (the process step is
        retried as a whole)."""

        def stream() -> int:
            count = 0
            for dataset in self._client.iter_series(
                study_instance_uid=study_instance_uid, series_instance_uid=series_instance_uid
            ):
                handle(dataset)
                count += 1
            return count

        try:
            with timed(DICOMWEB_SECONDS, operation="retrieve_series"):
                count = await asyncio.to_thread(stream)
        except requests.RequestException as exc:
            raise self._translate("retrieve_series", exc, study_instance_uid) from exc
        if not count:
            raise StudyNotFoundError(
                f"series {series_instance_uid} of study {study_instance_uid} returned no "
                f"instances from {self.url}",
                url=self.url,
            )
        _log.info("dicomweb.retrieved", instances=count)
        return count

    async def instance_metadata(
        self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str
    ) -> Dataset:
        """The attributes of one instance without its bulk data (WADO-RS metadata)."""
        found: dict[str, Any] = await self._call(
            "retrieve_metadata",
            lambda: self._client.retrieve_instance_metadata(
                study_instance_uid=study_instance_uid,
                series_instance_uid=series_instance_uid,
                sop_instance_uid=sop_instance_uid,
            ),
            study=study_instance_uid,
        )
        if not found:
            raise StudyNotFoundError(
                f"instance {sop_instance_uid} of study {study_instance_uid} is not in the "
                f"archive at {self.url}",
                url=self.url,
            )
        # Bulk data (pixels) would be a URI to fetch; only the attributes are wanted.
        return Dataset.from_json(found, bulk_data_uri_handler=lambda *_: b"")

    async def retrieve_study(
        self, study_instance_uid: str, series_instance_uid: str | None = None
    ) -> list[Dataset]:
        """QIDO-RS then WADO-RS: the named series, or the study's image series with most
        instances.

        Searching first tells "study not in the archive" apart from an archive that is down,
        and keeps a study with scouts and reformats from mixing series into one volume.
        """
        series = await self.search_series(study_instance_uid)
        chosen = self.choose_series(series, study_instance_uid, series_instance_uid)
        return await self.retrieve_series(study_instance_uid, chosen.series_instance_uid)

    def choose_series(
        self,
        series: Sequence[SeriesInfo],
        study_instance_uid: str,
        series_instance_uid: str | None = None,
    ) -> SeriesInfo:
        """The named series of a :meth:`search_series` answer, or the image series with most
        instances; :class:`StudyNotFoundError` when the named one is not in the study."""
        if series_instance_uid is not None:
            for item in series:
                if item.series_instance_uid == series_instance_uid:
                    return item
            raise StudyNotFoundError(
                f"series {series_instance_uid} is not part of study {study_instance_uid} "
                f"in the archive at {self.url}",
                url=self.url,
            )
        # Results stored back into the study (SEG, SR, ...) are no input for a model.
        images = [s for s in series if s.modality not in _DERIVED_MODALITIES] or list(series)
        return max(images, key=lambda s: s.instance_count or 0)

    async def store(self, datasets: Sequence[Dataset]) -> StoreResult:
        """Store instances (STOW-RS); raises :class:`DicomWebError` if any failed."""
        if not datasets:
            return StoreResult(stored=(), failed=())
        response: Dataset = await self._call(
            "store", lambda: self._client.store_instances(list(datasets)), study=None
        )
        stored = tuple(
            str(item.ReferencedSOPInstanceUID)
            for item in response.get("ReferencedSOPSequence", [])
            if "ReferencedSOPInstanceUID" in item
        )
        failed = tuple(
            str(item.ReferencedSOPInstanceUID)
            for item in response.get("FailedSOPSequence", [])
            if "ReferencedSOPInstanceUID" in item
        )
        _log.info("dicomweb.stored", instances=len(stored), failed=len(failed))
        if failed:
            raise DicomWebError(
                f"the archive at {self.url} refused {len(failed)} of {len(datasets)} instances",
                url=self.url,
            )
        return StoreResult(stored=stored, failed=failed)

    async def _call(self, operation: str, call: Callable[[], _T], *, study: str | None) -> _T:
        for attempt in range(1, self._retry.attempts + 1):
            try:
                with timed(DICOMWEB_SECONDS, operation=operation):
                    return await asyncio.to_thread(call)
            except requests.RequestException as exc:
                error = self._translate(operation, exc, study)
                answer = exc.response if isinstance(exc, requests.HTTPError) else None
            if not error.retryable or attempt == self._retry.attempts:
                raise error
            retry_after = answer.headers.get("retry-after") if answer is not None else None
            delay = self._retry.delay_for_answer(attempt, retry_after)
            _log.warning(
                "dicomweb.retried", operation=operation, attempt=attempt, status=error.status
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _translate(
        self, operation: str, exc: requests.RequestException, study: str | None
    ) -> DicomWebError:
        response = exc.response if isinstance(exc, requests.HTTPError) else None
        if response is None:
            kind = "timed out" if isinstance(exc, requests.Timeout) else "cannot be reached"
            error: DicomWebError = ArchiveUnavailableError(
                f"the DICOMweb archive at {self.url} {kind} ({operation}: {_reason(exc)})",
                url=self.url,
                retryable=True,
            )
            error.__cause__ = exc
            return error
        status = response.status_code
        if status == 404 and study is not None:
            error = StudyNotFoundError(
                f"study {study} is not in the archive at {self.url}", url=self.url, status=status
            )
        elif status >= 500 or status == 429:
            error = ArchiveUnavailableError(
                f"the DICOMweb archive at {self.url} failed ({operation}, HTTP {status})",
                url=self.url,
                retryable=True,
                status=status,
            )
        else:
            error = DicomWebError(
                f"the DICOMweb archive at {self.url} refused {operation} (HTTP {status})",
                url=self.url,
                status=status,
            )
        error.__cause__ = exc
        return error


def _reason(exc: BaseException) -> str:
    """Why a request got no answer, in the operating system's words ("Connection refused",
    "Name or service not known", a TLS alert). Not ``str(exc)``: requests puts the request's
    URL in it, which names the study, and the error travels to the requester in a Task."""
    seen: set[int] = set()
    current: BaseException = exc
    while id(current) not in seen:
        seen.add(id(current))
        # urllib3's MaxRetryError keeps the failure in ``reason``, the rest chain their causes.
        reason = getattr(current, "reason", None)
        below = reason if isinstance(reason, BaseException) else None
        below = below or current.__cause__ or current.__context__
        if below is None:
            break
        current = below
    if isinstance(current, OSError) and current.strerror:
        return str(current.strerror)
    return type(current).__name__


def _value(item: Mapping[str, Any], tag: str) -> Any:
    element = item.get(tag)
    if not isinstance(element, Mapping):
        return None
    values = element.get("Value")
    return values[0] if isinstance(values, list) and values else None


def _text(item: Mapping[str, Any], tag: str) -> str | None:
    value = _value(item, tag)
    return None if value is None else str(value)


def _int(item: Mapping[str, Any], tag: str) -> int | None:
    value = _value(item, tag)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None
