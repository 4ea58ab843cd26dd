"""A data site's part of a consortium inference request (issue 14), up to its aggregates: the
cohort (which studies a coordinator asks about), the QIDO-RS query that finds them in the
site's own archive, the model run over each of them, and the aggregates that may leave.

The cohort is a query over modality, body part, study date range and series description, and
nothing else: it has no field that could name a patient or a study. What the site sends back
is computed by :mod:`dsf_bridge.omi.aggregates` from bare values. Study and series UIDs exist
here only between the query and the model; no log line and no exception message of this
module carries one (``docs/consortium.md``, "Privacy rules").

Errors: :class:`CohortError` (not retryable) for a cohort that is invalid or that this site
refuses (too many studies, a modality the service does not take); the archive's and the
inference server's own errors pass unchanged when the archive or the server as a whole fails.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from dsf_bridge.errors import BridgeError
from dsf_bridge.omi.aggregates import (
    Aggregate,
    CountObfuscator,
    class_counts,
    numeric_aggregate,
)
from dsf_bridge.omi.contract import InferenceContract, RequestNotAcceptedError
from dsf_bridge.omi.conversion import (
    Classification,
    ImageConversionError,
    Measurement,
    OutputConversionError,
)
from dsf_bridge.omi.dicomweb import DicomWebArchive, StudyNotFoundError
from dsf_bridge.omi.execution import infer_study
from dsf_bridge.omi.inference import HttpInferenceClient, InferenceError, ModelNotFoundError

__all__ = [
    "CONVERSION_FAILED",
    "MODEL_ERROR",
    "REQUEST_INVALID",
    "STUDY_NOT_FOUND",
    "Cohort",
    "CohortError",
    "CohortOutcome",
    "CohortSeries",
    "check_cohort",
    "run_cohort",
    "select_series",
    "site_aggregates",
]

_log = structlog.get_logger()

# Failure kinds of one study, named as the CodeSystem omi-error names them for one request.
REQUEST_INVALID = "request-invalid"
STUDY_NOT_FOUND = "study-not-found"
CONVERSION_FAILED = "conversion-failed"
MODEL_ERROR = "model-error"

_MODALITY = re.compile(r"^[A-Z0-9]{1,16}$")
# A DICOM CS value (PS3.5 6.2): upper-case letters, digits, space and underscore, 16 at most.
_BODY_PART = re.compile(r"^[A-Z0-9 _]{1,16}$")
# Series Description is an LO (64 characters); a backslash would separate values in DICOM.
_DESCRIPTION_MAX = 64
_KEYS = frozenset(
    {"modalities", "body_part", "study_date_from", "study_date_to", "series_description"}
)
# How many series one QIDO-RS page asks for.
PAGE_SIZE = 500


class CohortError(BridgeError):
    """The cohort is invalid, or this site refuses it; the message names the field and says
    what would be accepted. Trying again does not help."""

    retryable = False


@dataclass(frozen=True)
class Cohort:
    """The studies a consortium request is about, as a query over the archive's series.

    ``modalities`` are DICOM Modality codes (``CT``, ``MR``), at least one; ``body_part`` a
    Body Part Examined value (a DICOM CS: upper case, digits, space, underscore); the study
    date range is inclusive and either end may be open; ``series_description`` a QIDO-RS
    pattern (``*`` any run of characters, ``?`` one character). Validated on construction;
    :meth:`create` normalises what a person or a Task typed first.
    """

    modalities: tuple[str, ...]
    body_part: str | None = None
    study_date_from: dt.date | None = None
    study_date_to: dt.date | None = None
    series_description: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.modalities, tuple):
            raise CohortError("cohort-modality: the modalities must be a tuple of codes")
        if not self.modalities:
            raise CohortError("cohort-modality: the cohort names no modality; give at least one")
        for modality in self.modalities:
            if not isinstance(modality, str) or not _MODALITY.match(modality):
                raise CohortError(
                    f"cohort-modality: {modality!r} is not a DICOM modality code (upper-case "
                    "letters and digits, at most 16, e.g. CT)"
                )
        if len(set(self.modalities)) != len(self.modalities):
            raise CohortError("cohort-modality: a modality is named twice")
        if self.body_part is not None and (
            not isinstance(self.body_part, str) or not _BODY_PART.match(self.body_part)
        ):
            raise CohortError(
                f"cohort-body-part: {self.body_part!r} is not a Body Part Examined value "
                "(upper-case letters, digits, space and underscore, at most 16, e.g. ABDOMEN)"
            )
        for name, value in (
            ("cohort-study-date-from", self.study_date_from),
            ("cohort-study-date-to", self.study_date_to),
        ):
            if value is not None and (
                not isinstance(value, dt.date) or isinstance(value, dt.datetime)
            ):
                raise CohortError(f"{name}: {value!r} is not a date")
        if (
            self.study_date_from is not None
            and self.study_date_to is not None
            and self.study_date_from > self.study_date_to
        ):
            raise CohortError(
                f"cohort-study-date-from ({self.study_date_from.isoformat()}) is after "
                f"cohort-study-date-to ({self.study_date_to.isoformat()})"
            )
        description = self.series_description
        if description is not None:
            if not isinstance(description, str) or not description:
                raise CohortError("cohort-series-description: must be a non-empty text")
            if len(description) > _DESCRIPTION_MAX:
                raise CohortError(
                    f"cohort-series-description: {len(description)} characters, at most "
                    f"{_DESCRIPTION_MAX} (a DICOM LO value)"
                )
            if "\\" in description or not description.isprintable():
                raise CohortError(
                    "cohort-series-description: no backslash and no control characters "
                    "(a backslash separates DICOM values)"
                )

    @classmethod
    def create(
        cls,
        modalities: Iterable[str],
        *,
        body_part: str | None = None,
        study_date_from: dt.date | str | None = None,
        study_date_to: dt.date | str | None = None,
        series_description: str | None = None,
    ) -> Cohort:
        """A cohort from loosely typed inputs: modality codes and the body part trimmed and
        upper-cased (a modality named twice counts once), dates as ``date`` or ISO text
        (``2024-12-31``), empty texts as absent."""
        if isinstance(modalities, str):
            modalities = [modalities]
        codes: list[str] = []
        for value in modalities:
            if not isinstance(value, str):
                raise CohortError(f"cohort-modality: {value!r} is not a text")
            code = value.strip().upper()
            if code not in codes:
                codes.append(code)
        part = body_part.strip().upper() if isinstance(body_part, str) else body_part
        description = (
            series_description.strip()
            if isinstance(series_description, str)
            else series_description
        )
        return cls(
            modalities=tuple(codes),
            body_part=part or None,
            study_date_from=_date("cohort-study-date-from", study_date_from),
            study_date_to=_date("cohort-study-date-to", study_date_to),
            series_description=description or None,
        )

    def to_json(self) -> dict[str, Any]:
        """The cohort as a process variable (every key, ``None`` where absent)."""
        return {
            "modalities": list(self.modalities),
            "body_part": self.body_part,
            "study_date_from": _iso(self.study_date_from),
            "study_date_to": _iso(self.study_date_to),
            "series_description": self.series_description,
        }

    @classmethod
    def from_json(cls, data: object) -> Cohort:
        """The cohort of :meth:`to_json`, read strictly: an unknown key or a value of the
        wrong type is a :class:`CohortError`, not ignored."""
        if not isinstance(data, Mapping):
            raise CohortError("a cohort must be a JSON object")
        unknown = sorted(str(key) for key in data if key not in _KEYS)
        if unknown:
            raise CohortError(
                f"the cohort has unknown keys {', '.join(unknown)}; known are "
                f"{', '.join(sorted(_KEYS))}"
            )
        modalities = data.get("modalities")
        if not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities):
            raise CohortError("cohort 'modalities' must be a list of modality codes")
        for key in ("body_part", "study_date_from", "study_date_to", "series_description"):
            if data.get(key) is not None and not isinstance(data.get(key), str):
                raise CohortError(f"cohort {key!r} must be a text or null")
        return cls(
            modalities=tuple(modalities),
            body_part=data.get("body_part"),
            study_date_from=_date("study_date_from", data.get("study_date_from")),
            study_date_to=_date("study_date_to", data.get("study_date_to")),
            series_description=data.get("series_description"),
        )

    def describe(self) -> str:
        """The cohort in a few words, for people (it holds no identifier to hide), e.g.
        ``CT, body part ABDOMEN, studies 2020-01-01..2024-12-31``."""
        parts = [", ".join(self.modalities)]
        if self.body_part is not None:
            parts.append(f"body part {self.body_part}")
        if self.study_date_from is not None or self.study_date_to is not None:
            parts.append(
                f"studies {_iso(self.study_date_from) or ''}..{_iso(self.study_date_to) or ''}"
            )
        if self.series_description is not None:
            parts.append(f"series description {self.series_description!r}")
        return ", ".join(parts)

    def qido_filters(self, modality: str) -> dict[str, str]:
        """The QIDO-RS matching keys of one search (one modality each)."""
        filters = {"Modality": modality}
        if self.body_part is not None:
            filters["BodyPartExamined"] = self.body_part
        if self.study_date_from is not None or self.study_date_to is not None:
            filters["StudyDate"] = (
                f"{_dicom_date(self.study_date_from)}-{_dicom_date(self.study_date_to)}"
            )
        if self.series_description is not None:
            filters["SeriesDescription"] = self.series_description
        return filters


def check_cohort(cohort: Cohort, contract: InferenceContract) -> None:
    """Refuse a cohort the service cannot take at all: a modality outside the contract's
    ``accepts.modality``, or a body part outside a non-empty ``accepts.body_part``."""
    accepts = contract.accepts
    outside = [m for m in cohort.modalities if m not in accepts.modality]
    if outside:
        raise CohortError(
            f"cohort-modality: service contract {contract.name} accepts "
            f"{', '.join(accepts.modality)}, not {', '.join(outside)}"
        )
    part = cohort.body_part
    if accepts.body_part and part is not None and part not in accepts.body_part:
        raise CohortError(
            f"cohort-body-part: service contract {contract.name} accepts "
            f"{', '.join(accepts.body_part)}, not {part}"
        )


@dataclass(frozen=True)
class CohortSeries:
    """The one series of a study the model runs on. The UIDs stay out of ``repr`` so that a
    careless log line of this object carries none."""

    study_instance_uid: str = field(repr=False)
    series_instance_uid: str = field(repr=False)
    modality: str | None
    body_part: str | None
    instance_count: int | None


async def select_series(
    archive: DicomWebArchive,
    cohort: Cohort,
    *,
    max_studies: int,
    page_size: int = PAGE_SIZE,
) -> list[CohortSeries]:
    """The studies of ``cohort`` in the site's own archive, one series each.

    One QIDO-RS series-level search per modality (``/series?Modality=CT&BodyPartExamined=..
    &StudyDate=YYYYMMDD-YYYYMMDD&SeriesDescription=..``, paged with ``limit``/``offset``).
    QIDO-RS defines comma-separated lists for UIDs only, so several modalities are several
    searches rather than ``Modality=CT,MR``. A study with several matching series contributes
    one, so that every study counts once in the aggregates: the series with most instances,
    ties broken by the smaller Series Instance UID (the same answer on every run). The result
    is ordered by Study Instance UID.

    More than ``max_studies`` matching studies is a :class:`CohortError`: the site refuses
    rather than samples, and stops searching once the limit is passed.
    """
    if max_studies < 1:
        raise ValueError(f"max_studies must be at least 1, not {max_studies}")
    chosen: dict[str, CohortSeries] = {}
    skipped = 0
    for modality in cohort.modalities:
        pages = archive.search_all_series(cohort.qido_filters(modality), page_size=page_size)
        async for page in pages:
            for found in page:
                if not found.study_instance_uid or not found.series_instance_uid:
                    skipped += 1  # an archive that leaves out the UIDs cannot be asked further
                    continue
                candidate = CohortSeries(
                    study_instance_uid=found.study_instance_uid,
                    series_instance_uid=found.series_instance_uid,
                    modality=found.modality,
                    body_part=found.body_part,
                    instance_count=found.instance_count,
                )
                held = chosen.get(candidate.study_instance_uid)
                if held is None or _rank(candidate) < _rank(held):
                    chosen[candidate.study_instance_uid] = candidate
            if len(chosen) > max_studies:
                await pages.aclose()
                # Never how many were found: the refusal goes to the coordinator, and an exact
                # count (the whole cohort, when its last page passed the limit) would bypass
                # the k rule and the obfuscation of every published count.
                raise CohortError(
                    f"the cohort ({cohort.describe()}) matches more than {max_studies} studies "
                    f"in this site's archive; this site takes at most {max_studies} in one "
                    "request (max_studies): narrow the cohort by date range, body part or "
                    "series description"
                )
    _log.info(
        "cohort.selected",
        modalities=len(cohort.modalities),
        studies=len(chosen),
        skipped=skipped,
    )
    return [chosen[study] for study in sorted(chosen)]


def _rank(series: CohortSeries) -> tuple[int, str]:
    return (-(series.instance_count or 0), series.series_instance_uid)


@dataclass(frozen=True)
class CohortOutcome:
    """What the model said about a cohort, without a single identifier.

    ``matched`` studies were selected, ``inferred`` of them gave a result. ``values`` holds
    per measurement code the values found; ``absent`` counts per measurement code the inferred
    studies without a value (the model found nothing, or the series was shorter than the
    measurement's ``min_slices``), so ``inferred == len(values[c]) + absent[c]``. ``labels``
    holds per classification code the class codes. ``failures`` counts the studies that gave
    no result by kind (:data:`REQUEST_INVALID`, :data:`STUDY_NOT_FOUND`,
    :data:`CONVERSION_FAILED`, :data:`MODEL_ERROR`).
    """

    matched: int
    inferred: int
    values: dict[str, list[float]]
    labels: dict[str, list[str]]
    absent: dict[str, int]
    failures: dict[str, int]


async def run_cohort(
    archive: DicomWebArchive,
    client: HttpInferenceClient,
    selected: Sequence[CohortSeries],
    *,
    contract: InferenceContract,
    device: Mapping[str, Any],
    model: str | None = None,
    model_version: str | None = None,
    max_slices: int | None = None,
    request_id: str | None = None,
) -> CohortOutcome:
    """Run the contract's model on each selected series in turn (:func:`infer_study`, no
    segmentation) and collect the findings by code.

    A failure that is about one study is counted in ``failures`` and the run goes on: the
    series does not fit the contract or ``max_slices`` (:data:`REQUEST_INVALID`), it left the
    archive since the search (:data:`STUDY_NOT_FOUND`), its images cannot feed the model or
    the model's answer does not fit the contract (:data:`CONVERSION_FAILED`), the inference
    server refused this input (:data:`MODEL_ERROR`, an HTTP 4xx that is not "no such model").
    A failure of the archive or the server as a whole propagates unchanged:
    ``ArchiveUnavailableError`` and any other ``DicomWebError``, ``ModelNotReadyError``,
    ``ModelNotFoundError``, and an ``InferenceError`` without an answer, with a 5xx or 429.
    ``request_id`` goes to the server as ``<request_id>-<n>`` for the n-th study.
    """
    measurements = [m.code.code for m in contract.outputs.measurements]
    classifications = [c.code.code for c in contract.outputs.classifications]
    values: dict[str, list[float]] = {code: [] for code in measurements}
    absent = dict.fromkeys(measurements, 0)
    labels: dict[str, list[str]] = {code: [] for code in classifications}
    failures: dict[str, int] = {}
    inferred = 0
    for index, series in enumerate(selected, start=1):
        try:
            result = await infer_study(
                archive,
                client,
                study_instance_uid=series.study_instance_uid,
                series_instance_uid=series.series_instance_uid,
                contract=contract,
                device=device,
                model=model,
                model_version=model_version,
                request_id=None if request_id is None else f"{request_id}-{index}",
                max_slices=max_slices,
            )
        except Exception as exc:
            kind = _study_failure(exc)
            if kind is None:
                raise
            failures[kind] = failures.get(kind, 0) + 1
            # The exception's message names the study: only its kind is logged.
            _log.info("cohort.study_failed", study=index, of=len(selected), kind=kind)
            continue
        inferred += 1
        reported: set[str] = set()
        for finding in result.findings:
            code = finding.code.code
            if isinstance(finding, Classification):
                labels.setdefault(code, []).append(finding.value.code)
            elif isinstance(finding, Measurement) and finding.value is not None:
                values.setdefault(code, []).append(finding.value)
                reported.add(code)
        for code in measurements:
            if code not in reported:
                absent[code] += 1
    _log.info(
        "cohort.inferred",
        contract=contract.name,
        matched=len(selected),
        inferred=inferred,
        failed=sum(failures.values()),
    )
    return CohortOutcome(
        matched=len(selected),
        inferred=inferred,
        values=values,
        labels=labels,
        absent=absent,
        failures=failures,
    )


def _study_failure(exc: Exception) -> str | None:
    """The failure kind when ``exc`` is about one study; None when it is about the archive or
    the server as a whole (and must end the run)."""
    if isinstance(exc, RequestNotAcceptedError):
        return REQUEST_INVALID
    if isinstance(exc, StudyNotFoundError):
        return STUDY_NOT_FOUND
    if isinstance(exc, ImageConversionError | OutputConversionError):
        return CONVERSION_FAILED
    if (
        isinstance(exc, InferenceError)
        and not isinstance(exc, ModelNotFoundError)
        and not exc.retryable
        and exc.status is not None
        and 400 <= exc.status < 500
    ):
        return MODEL_ERROR
    return None


def site_aggregates(
    outcome: CohortOutcome,
    contract: InferenceContract,
    *,
    k: int,
    obfuscator: CountObfuscator | None = None,
) -> tuple[Aggregate, ...]:
    """The figures this site may send: per declared measurement a numeric aggregate (named by
    the measurement's code; suppressed below ``k`` values, so a measurement no study had is a
    suppressed cell), per declared classification a class-count table over the contract's
    classes in their order, with k and complementary suppression (:mod:`aggregates`)."""
    aggregates: list[Aggregate] = [
        numeric_aggregate(
            m.code.code, outcome.values.get(m.code.code, []), k=k, obfuscator=obfuscator
        )
        for m in contract.outputs.measurements
    ]
    aggregates.extend(
        class_counts(
            c.code.code,
            outcome.labels.get(c.code.code, []),
            [spec.code.code for spec in c.classes],
            k=k,
            obfuscator=obfuscator,
        )
        for c in contract.outputs.classifications
    )
    return tuple(aggregates)


def _date(name: str, value: object) -> dt.date | None:
    if value is None:
        return None
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise CohortError(f"{name}: {value!r} is not a date (YYYY-MM-DD)")


def _iso(value: dt.date | None) -> str | None:
    return None if value is None else value.isoformat()


def _dicom_date(value: dt.date | None) -> str:
    return "" if value is None else value.strftime("%Y%m%d")
