"""The OMI inference processes as a dsf-bridge plugin: ``inferenceRequest`` at the requesting
site and ``inferenceExecution`` at the providing site (``docs/protocol.md`` is the wire format).

Requesting site (``dsf-bridgedev_inferenceRequest``): a local ``startInferenceRequest`` Task
names a study, the DICOMweb endpoint that serves it and a service, or what the service must
offer. The service is resolved (local catalogue, else the OMI registry) or chosen from a
registry search, its heartbeat checked and the study checked against its contract (the
catalogue's or the registry's) when there is one; an ``inferenceRequest``
Task goes to the providing organization; an event-based gateway waits for the
``inferenceResult`` or a timer (``result-timeout``, default ``[omi] result_timeout``). A result
is stored as a FHIR ``Bundle`` (DiagnosticReport and Observations; the DSF FHIR server has no
Observation type) readable by this site only, and the start Task gets outputs: a reference to
the Bundle and one ``valueQuantity`` per measurement. Every failure (service unknown or down,
request not delivered or refused, provider error, timeout) ends in ``InferenceFailed``, whose
handler fails the instance: the runtime then fails the start Task with that message.

Providing site (``dsf-bridgedev_inferenceExecution``): the request is checked (UIDs, endpoint,
service in this site's catalogue), the study fetched, converted and inferred
(:func:`~dsf_bridge.omi.execution.infer_study`), and an ``inferenceResult`` goes back to the
requesting organization: measurements, or an ``error`` saying which step failed. Either way
the provider's instance ends, so no request waits at both sites.

No Task of either process carries a patient attribute: studies travel as UIDs, results as
numbers with UCUM units.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SegmentationStorage,
)

from dsf_bridge.config import OmiServiceSettings, OmiSettings
from dsf_bridge.dsf.certificates import RecipientKeyError
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.crypto import DecryptionError
from dsf_bridge.dsf.endpoints import TargetError
from dsf_bridge.dsf.vocabulary import BPMN_MESSAGE_SYSTEM, READ_ACCESS_TAG_SYSTEM
from dsf_bridge.engine.timers import TimerError, add_duration, parse_duration
from dsf_bridge.errors import BridgeError, RemoteError
from dsf_bridge.omi.contract import (
    REFERENCE_CONTRACT,
    ClassificationOutput,
    Coding,
    ContractError,
    InferenceContract,
    MeasurementOutput,
    RequestNotAcceptedError,
    contract_of,
)
from dsf_bridge.omi.conversion import (
    MEASUREMENT_CODE_SYSTEM,
    Classification,
    Finding,
    ImageConversionError,
    Measurement,
    OutputConversionError,
    report_bundle,
)
from dsf_bridge.omi.dicomweb import (
    ArchiveUnavailableError,
    DicomWebArchive,
    DicomWebError,
    SeriesInfo,
    StudyNotFoundError,
)
from dsf_bridge.omi.execution import ReceivedSeries, StudyInference, StudySource, infer_study
from dsf_bridge.omi.inference import (
    HttpInferenceClient,
    InferenceError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from dsf_bridge.omi.package import PackageError, PackageManifest
from dsf_bridge.omi.pseudonymize import (
    PseudonymizationRefusedError,
    Pseudonymizer,
    reidentify,
)
from dsf_bridge.omi.registry import (
    DEVICE_IDENTIFIER_SYSTEM,
    FhirRegistryClient,
    InferenceService,
    RegistryError,
    ServiceNotFoundError,
    ServiceQuery,
    ServiceRegistry,
    check_heartbeat,
)
from dsf_bridge.plugins.api import ProcessPlugin, resources_per_process
from dsf_bridge.plugins.pingpong import bpmn_dir, profiles_dir
from dsf_bridge.plugins.registry import (
    SERVICE_FHIR_CLIENT,
    BpmnError,
    HandlerContext,
    HandlerRegistry,
    SendContext,
)
from dsf_bridge.plugins.transfer import (
    RESULT_SERIES,
    SERVICE_TRANSFER,
    PseudonymStore,
    TransferError,
    TransferSite,
    copy_series,
    encryption_certificate,
    open_package,
    package_datasets,
    package_series,
    publish_package,
    receive_package,
    restore_identity,
    series_info,
    uids_in,
    withdraw_package,
)
from dsf_bridge.proxy import ForwardProxy

__all__ = [
    "CODESYSTEM_OMI",
    "CODESYSTEM_OMI_ERROR",
    "EXECUTION_PROCESS",
    "REQUEST_PROCESS",
    "SERVICE_DICOMWEB_SSL_CONTEXT",
    "SERVICE_OMI_REGISTRY",
    "SERVICE_OMI_SETTINGS",
    "STUDY_PACKAGE_BYTES",
    "STUDY_PACKAGE_SECONDS",
    "InferenceRequestError",
    "handlers",
    "plugin",
    "result_summary",
]

log = structlog.get_logger("dsf_bridge.plugins.inference")

REQUEST_PROCESS = "dsf-bridgedev_inferenceRequest"
EXECUTION_PROCESS = "dsf-bridgedev_inferenceExecution"
#: Service name of the site's :class:`~dsf_bridge.config.OmiSettings` (the daemon provides it).
SERVICE_OMI_SETTINGS = "omi.settings"
#: Service name of a :class:`~dsf_bridge.omi.registry.ServiceRegistry` to ask for services that
#: are not in the catalogue, instead of one made from ``[omi] registry_url`` for each request.
SERVICE_OMI_REGISTRY = "omi.registry"
#: Service name of the ``ssl.SSLContext`` for https DICOMweb archives (mutual TLS).
SERVICE_DICOMWEB_SSL_CONTEXT = "omi.dicomweb_ssl_context"

CODESYSTEM_OMI = "http://dsf-bridge.dev/fhir/CodeSystem/omi"
CODESYSTEM_OMI_ERROR = "http://dsf-bridge.dev/fhir/CodeSystem/omi-error"

STUDY_INSTANCE_UID = "study-instance-uid"
SERIES_INSTANCE_UID = "series-instance-uid"
DICOMWEB_ENDPOINT = "dicomweb-endpoint"
SERVICE = "service"
# Instead of a service, what it must offer: the OMI registry is searched and one chosen.
SERVICE_MODALITY = "service-modality"
SERVICE_BODY_PART = "service-body-part"
SERVICE_TASK = "service-task"
SERVICE_CHOSEN = "service-chosen"
RESULT_TIMEOUT = "result-timeout"
MODEL_NAME = "model-name"
MODEL_VERSION = "model-version"
SLICES = "slices"
SEGMENTATION = "segmentation"
SEGMENTATION_SERIES = "segmentation-series-instance-uid"
STUDY_PACKAGE = "study-package"
STUDY_PACKAGE_BYTES = "study-package-bytes"
STUDY_PACKAGE_SECONDS = "study-package-seconds"
SEGMENTATION_PACKAGE = "segmentation-package"
ERROR = "error"
ERROR_KIND = "error-kind"
INFERENCE_RESULT = "inference-result"

# The longest result-timeout a start Task may ask for (and [omi] result_timeout may be): an OMI
# answer comes in minutes or hours, and a timer decades ahead (P9999Y is past the year 9999)
# holds an instance for nothing.
MAX_RESULT_TIMEOUT = timedelta(days=366)

# Error kinds a provider reports (CodeSystem omi-error), and the requester's own.
REQUEST_INVALID = "request-invalid"
REQUEST_REFUSED = "request-refused"
STUDY_NOT_FOUND = "study-not-found"
ARCHIVE_UNAVAILABLE = "archive-unavailable"
MODEL_NOT_READY = "model-not-ready"
MODEL_ERROR = "model-error"
CONVERSION_FAILED = "conversion-failed"
PROVIDER_FAILED = "provider-failed"
SERVICE_UNAVAILABLE = "service-unavailable"
NOT_DELIVERED = "request-not-delivered"
NOT_AUTHORIZED = "request-not-authorized"
RESULT_TIMED_OUT = "result-timeout"
TRANSFER_FAILED = "transfer-failed"
# The provider's own: its result Task could not be posted (never sent to anyone).
RESULT_NOT_DELIVERED = "result-not-delivered"

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# The report code of a result whose contract the requesting site does not know.
INFERENCE_REPORT = Coding(
    system=MEASUREMENT_CODE_SYSTEM, code="inference-report", display="OMI inference result"
)
# Inputs of a result Task that are not findings: the process's own and DSF's.
_NOT_FINDINGS = frozenset({CODESYSTEM_OMI, BPMN_MESSAGE_SYSTEM})


class InferenceRequestError(BridgeError):
    """The inference request ended without a result; the start Task fails with this message."""


# -- reading Tasks and variables ---------------------------------------------------------------


def _inputs(task: Mapping[str, Any], system: str, code: str) -> list[object]:
    return [
        item.get("value")
        for item in task.get("inputs") or []
        if item.get("system") == system and item.get("code") == code
    ]


def _text_input(task: Mapping[str, Any], code: str, *, required: bool = False) -> str | None:
    values = _inputs(task, CODESYSTEM_OMI, code)
    if len(values) > 1:
        raise BpmnError(REQUEST_INVALID, f"the Task has {len(values)} '{code}' inputs, one allowed")
    value = values[0] if values else None
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise BpmnError(REQUEST_INVALID, f"the Task has no '{code}' input ({CODESYSTEM_OMI})")
        return None
    if not isinstance(value, str):
        raise BpmnError(REQUEST_INVALID, f"input '{code}' must be a valueString")
    return value.strip()


def _uid(task: Mapping[str, Any], code: str, *, required: bool) -> str | None:
    value = _text_input(task, code, required=required)
    if value is not None and (len(value) > 64 or not _UID.match(value)):
        raise BpmnError(REQUEST_INVALID, f"input '{code}' is not a DICOM UID: {value!r}")
    return value


def _flag(task: Mapping[str, Any], code: str) -> bool:
    values = _inputs(task, CODESYSTEM_OMI, code)
    if len(values) > 1 or (values and not isinstance(values[0], bool)):
        raise BpmnError(REQUEST_INVALID, f"input '{code}' must be one valueBoolean")
    return bool(values and values[0])


def _endpoint(task: Mapping[str, Any]) -> str:
    value = _text_input(task, DICOMWEB_ENDPOINT, required=True)
    assert value is not None  # noqa: S101 - required=True raised otherwise
    if not re.match(r"^https?://[^\s/]+", value):
        raise BpmnError(REQUEST_INVALID, f"input '{DICOMWEB_ENDPOINT}' is not an http(s) URL")
    return value.rstrip("/")


def _reference(task: Mapping[str, Any], code: str) -> str | None:
    """The ``reference`` of a valueReference input (a package's absolute Binary URL)."""
    values = _inputs(task, CODESYSTEM_OMI, code)
    if not values:
        return None
    value = values[0]
    if len(values) > 1 or not isinstance(value, Mapping) or not value.get("reference"):
        raise BpmnError(REQUEST_INVALID, f"input '{code}' must be one valueReference")
    reference = str(value["reference"])
    if not reference.startswith("https://"):
        raise BpmnError(REQUEST_INVALID, f"input '{code}' is not an absolute https reference")
    return reference


def _transfer(ctx: HandlerContext) -> TransferSite:
    return ctx.service(SERVICE_TRANSFER, TransferSite)


def omi_settings(ctx: HandlerContext) -> OmiSettings:
    """The site's ``[omi]`` settings (the defaults outside a bridge)."""
    settings = ctx.services.get(SERVICE_OMI_SETTINGS)
    return settings if isinstance(settings, OmiSettings) else OmiSettings()


def catalogue_entry(settings: OmiSettings, service_id: str) -> OmiServiceSettings | None:
    """The site's catalogue entry of ``service_id``, if it has one."""
    return next((entry for entry in settings.catalogue if entry.id == service_id), None)


def _contract(value: str | Mapping[str, Any] | None) -> InferenceContract | None:
    try:
        return contract_of(value)
    except ContractError as exc:  # checked at start-up; a file may have gone since
        raise BpmnError(REQUEST_REFUSED, f"the service's contract is not usable: {exc}") from exc


def _provider_contract(entry: OmiServiceSettings) -> InferenceContract:
    """The contract this site serves the entry under (the reference one unless it names one)."""
    contract = _contract(entry.contract) or _contract(REFERENCE_CONTRACT)
    assert contract is not None  # noqa: S101 - the reference contract ships with the bridge
    return contract


def _text(ctx: HandlerContext, name: str) -> str:
    value = ctx.get(name)
    if not isinstance(value, str) or not value:
        raise BridgeError(f"the process has no '{name}' variable")
    return value


# -- the requesting site -----------------------------------------------------------------------

# Bundle.identifier of a stored result: the id of the result Task it was made from.
RESULT_BUNDLE_IDENTIFIER_SYSTEM = "http://dsf-bridge.dev/sid/inference-result-task"

handlers = HandlerRegistry()
# Stricter than DSF, which correlates by business key whoever sends: a result counts only
# from the provider the request went to.
handlers.replies_only_from_recipients("inferenceResult")
_PREFIX = "dsf_bridge.plugins.inference."


async def _resolve(
    settings: OmiSettings,
    service_id: str,
    registry: ServiceRegistry | None,
    proxy: ForwardProxy | None = None,
) -> InferenceService:
    entry = catalogue_entry(settings, service_id)
    if entry is not None:
        return InferenceService(
            service_id=entry.id,
            name=entry.name or entry.id,
            model_name=entry.model_name or entry.id,
            inference_url=entry.inference_url or "",
            organization=entry.organization,
            model_version=entry.model_version,
        )
    if registry is not None:
        return await registry.get_service(service_id)
    if settings.registry_url is None:
        raise ServiceNotFoundError(
            f"service {service_id} is not in this site's catalogue ([omi] catalogue) and no "
            "OMI registry is configured"
        )
    async with FhirRegistryClient(settings.registry_url, proxy=proxy) as client:
        return await client.get_service(service_id)


def _service_query(task: Mapping[str, Any]) -> ServiceQuery | None:
    """What the start Task asks a service to offer, when it names no service."""
    modality = _text_input(task, SERVICE_MODALITY)
    body_part = _text_input(task, SERVICE_BODY_PART)
    wanted = _text_input(task, SERVICE_TASK)
    if modality is None and body_part is None and wanted is None:
        return None
    try:
        return ServiceQuery(modality=modality, body_part=body_part, task=wanted)
    except ValueError as exc:
        raise BpmnError(REQUEST_INVALID, f"input '{SERVICE_TASK}': {exc}") from exc


async def _search(
    settings: OmiSettings,
    query: ServiceQuery,
    registry: ServiceRegistry | None,
    proxy: ForwardProxy | None,
) -> list[InferenceService]:
    if registry is not None:
        return await registry.find_services(query=query)
    if settings.registry_url is None:
        raise ServiceNotFoundError(
            f"no OMI registry is configured to search for a service ({query.describe()}): "
            "name a 'service' or set [omi] registry_url"
        )
    async with FhirRegistryClient(settings.registry_url, proxy=proxy) as client:
        return await client.find_services(query=query)


#: How a search's services are ranked (docs/omi.md, "Choosing among search results").
CHOICE_RULE = (
    "available before busy before no heartbeat, then shortest estimated waiting time, then id"
)
_STATUS_RANK = {"available": 0, "busy": 1}


def _rank(service: InferenceService) -> tuple[int, float, str]:
    beat = service.heartbeat
    if beat is None:
        return (2, float("inf"), service.service_id)
    waiting = beat.estimated_waiting_time
    return (
        _STATUS_RANK.get(beat.status, 3),
        waiting.total_seconds() if waiting is not None else float("inf"),
        service.service_id,
    )


def _unusable(
    service: InferenceService, series: SeriesInfo, named: bool, segmentation: bool
) -> str | None:
    """Why a search's service cannot take this study, or None."""
    try:
        check_heartbeat(service)
    except RegistryError as exc:
        return str(exc)
    if not service.organization:
        return "it names no providing organization"
    if service.contract_problem is not None:
        return f"its contract is refused: {service.contract_problem}"
    if service.contract is None:
        return "it publishes no contract, so the study cannot be checked before it leaves"
    try:
        service.contract.check_request(segmentation=segmentation)
        service.contract.check_series(
            modalities=[series.modality or ""],
            body_parts=[series.body_part or ""],
            slices=series.instance_count,
            series_named=named,
        )
    except RequestNotAcceptedError as exc:
        return str(exc)
    return None


async def _choose(
    ctx: HandlerContext,
    query: ServiceQuery,
    endpoint: str,
    study: str,
    series: str | None,
) -> InferenceService:
    """Search the registry, drop what cannot take the study (stale or unavailable heartbeat, no
    organization, no or a refused contract, a contract that does not accept the series), and
    pick the best by :data:`CHOICE_RULE`."""
    settings = omi_settings(ctx)
    registry = cast(ServiceRegistry | None, ctx.services.get(SERVICE_OMI_REGISTRY))
    try:
        found = await _search(settings, query, registry, ctx.forward_proxy())
    except RegistryError as exc:
        raise BpmnError(SERVICE_UNAVAILABLE, str(exc)) from exc
    if not found:
        raise BpmnError(
            SERVICE_UNAVAILABLE, f"no service in the OMI registry offers {query.describe()}"
        )
    archive = dicomweb_archive(ctx, endpoint)
    try:
        chosen_series = archive.choose_series(await archive.search_series(study), study, series)
    except StudyNotFoundError as exc:
        raise BpmnError(REQUEST_INVALID, str(exc)) from exc
    except RemoteError as exc:
        raise BpmnError(ARCHIVE_UNAVAILABLE, str(exc)) from exc
    finally:
        archive.close()
    segmentation = _flag(ctx.task(), SEGMENTATION)
    dropped: dict[str, str] = {}
    usable = []
    for service in found:
        reason = _unusable(service, chosen_series, series is not None, segmentation)
        if reason is None:
            usable.append(service)
        else:
            dropped[service.service_id] = reason
    if not usable:
        reasons = "; ".join(f"{sid}: {why}" for sid, why in sorted(dropped.items()))
        raise BpmnError(
            SERVICE_UNAVAILABLE,
            f"none of the {len(found)} services in the OMI registry that offer "
            f"{query.describe()} can take the study ({reasons})",
        )
    best = min(usable, key=_rank)
    log.info(
        "inference.service_chosen",
        service=best.service_id,
        provider=best.organization,
        query=query.describe(),
        found=len(found),
        usable=len(usable),
        dropped=dropped,
        rule=CHOICE_RULE,
    )
    return best


@handlers.service(_PREFIX + "ResolveService")
async def resolve_service(ctx: HandlerContext) -> None:
    """Read the start Task, find the service and its provider (the one it names, or the best of
    a registry search for what it names), check its heartbeat and, when its contract is known,
    the study against it."""
    task = ctx.task()
    settings = omi_settings(ctx)
    ctx.set("startTaskId", task.get("id"))
    study = _uid(task, STUDY_INSTANCE_UID, required=True)
    series = _uid(task, SERIES_INSTANCE_UID, required=False)
    endpoint = _endpoint(task)
    service_id = _text_input(task, SERVICE)
    query = _service_query(task)
    if service_id is not None and query is not None:
        raise BpmnError(
            REQUEST_INVALID,
            f"the Task names a '{SERVICE}' and what it must offer ('{SERVICE_MODALITY}', "
            f"'{SERVICE_BODY_PART}', '{SERVICE_TASK}'): one or the other",
        )
    if service_id is None and query is None:
        raise BpmnError(
            REQUEST_INVALID,
            f"the Task has no '{SERVICE}' input and no '{SERVICE_MODALITY}', "
            f"'{SERVICE_BODY_PART}' or '{SERVICE_TASK}' ({CODESYSTEM_OMI})",
        )
    timeout = _text_input(task, RESULT_TIMEOUT) or settings.result_timeout
    try:
        months, fixed = parse_duration(timeout)
    except TimerError as exc:
        raise BpmnError(REQUEST_INVALID, f"input '{RESULT_TIMEOUT}': {exc}") from exc
    # On the calendar from today, as the timer will count it: P1Y and P12M are 365 or 366 days.
    today = datetime.now(UTC)
    try:
        too_long = add_duration(today, (months, fixed)) - today > MAX_RESULT_TIMEOUT
    except TimerError:
        too_long = True
    if too_long:
        raise BpmnError(
            REQUEST_INVALID,
            f"input '{RESULT_TIMEOUT}' is longer than P{MAX_RESULT_TIMEOUT.days}D, "
            "the longest this site waits for a result",
        )
    if query is not None:
        service = await _choose(ctx, query, endpoint, str(study), series)
        entry = None
        contract = service.contract  # checked against the study by _choose
        chosen = (
            f"{service.organization}/{service.offered_as}"
            if service.offered_as
            else service.service_id
        )
        ctx.add_task_output(
            str(task.get("id") or ""),
            {
                "type": {"coding": [{"system": CODESYSTEM_OMI, "code": SERVICE_CHOSEN}]},
                "valueString": chosen,
            },
        )
    else:
        try:
            registry = ctx.services.get(SERVICE_OMI_REGISTRY)
            service = await _resolve(
                settings,
                str(service_id),
                cast(ServiceRegistry | None, registry),
                ctx.forward_proxy(),
            )
            check_heartbeat(service)
        except RegistryError as exc:
            raise BpmnError(SERVICE_UNAVAILABLE, str(exc)) from exc
        if not service.organization:
            raise BpmnError(
                SERVICE_UNAVAILABLE,
                f"service {service.service_id} names no providing organization",
            )
        entry = catalogue_entry(settings, service.service_id)
        if entry is not None:
            contract = _contract(entry.contract)
        elif service.contract_problem is not None:
            raise BpmnError(
                SERVICE_UNAVAILABLE,
                f"service {service.service_id}: its contract in the OMI registry is refused: "
                f"{service.contract_problem}",
            )
        else:
            contract = service.contract  # published in the registry, or None
        if contract is not None:
            try:
                contract.check_request(segmentation=_flag(task, SEGMENTATION))
            except RequestNotAcceptedError as exc:
                raise BpmnError(REQUEST_INVALID, str(exc)) from exc
            await _check_study(ctx, contract, endpoint, str(study), series)
    if entry is None and contract is not None:
        # The registry's contract checks the result too (StoreResult).
        ctx.set("serviceContract", contract.model_dump(mode="json"))
    ctx.set("studyInstanceUid", study)
    ctx.set("seriesInstanceUid", series)
    ctx.set("dicomwebEndpoint", endpoint)
    ctx.set("segmentation", _flag(task, SEGMENTATION))
    # A service found in the registry is outside the organization: through DSF, pseudonymized.
    ctx.set("transfer", entry.transfer if entry is not None else "dsf")
    gateway = entry.dicomweb_gateway if entry is not None and entry.transfer == "dicomweb" else None
    ctx.set("dicomwebGateway", gateway.rstrip("/") if gateway else None)
    # The provider knows the service by its own catalogue id (a registry's is the resource's).
    ctx.set("serviceId", service.offered_as or service.service_id)
    ctx.set("modelName", service.model_name)
    ctx.set("provider", service.organization)
    ctx.set("resultTimeout", timeout)
    ctx.set("target", {"organizationIdentifier": service.organization})
    log.info(
        "inference.service_resolved", service=service.service_id, provider=service.organization
    )


async def _check_study(
    ctx: HandlerContext,
    contract: InferenceContract,
    endpoint: str,
    study: str,
    series: str | None,
) -> None:
    """The series the provider would take (QIDO-RS at the requesting site's archive: modality,
    body part, instances) must fit the contract: nothing leaves the site for a study the
    service does not accept."""
    archive = dicomweb_archive(ctx, endpoint)
    try:
        found = await archive.search_series(study)
        chosen = archive.choose_series(found, study, series)
        contract.check_series(
            modalities=[chosen.modality or ""],
            body_parts=[chosen.body_part or ""],
            slices=chosen.instance_count,
            series_named=series is not None,
        )
    except (RequestNotAcceptedError, StudyNotFoundError) as exc:
        raise BpmnError(REQUEST_INVALID, str(exc)) from exc
    except RemoteError as exc:
        raise BpmnError(ARCHIVE_UNAVAILABLE, str(exc)) from exc
    finally:
        archive.close()


def dicomweb_archive(ctx: HandlerContext, endpoint: str) -> DicomWebArchive:
    """The DICOMweb archive at ``endpoint``, reached as the site's settings say (timeout,
    retries, proxy, and its DSF identity for https)."""
    context = ctx.services.get(SERVICE_DICOMWEB_SSL_CONTEXT)
    return DicomWebArchive(
        endpoint,
        ssl_context=context
        if endpoint.startswith("https://") and isinstance(context, ssl.SSLContext)
        else None,
        timeout=omi_settings(ctx).dicomweb_timeout,
        retry=ctx.call_retry(),
        proxy=ctx.forward_proxy(),
    )


def inference_client(ctx: HandlerContext, entry: OmiServiceSettings) -> HttpInferenceClient:
    """A client of the entry's inference server, as the site's settings say."""
    if entry.inference_url is None:
        raise BpmnError(REQUEST_REFUSED, f"service {entry.id} is not run at this site")
    return HttpInferenceClient(
        entry.inference_url,
        timeout=omi_settings(ctx).inference_timeout,
        retry=ctx.call_retry(),
        proxy=ctx.forward_proxy(),
        tensor_encoding=entry.tensor_encoding,
        max_request_bytes=entry.max_request_bytes,
        max_response_bytes=entry.max_response_bytes,
    )


@handlers.service(_PREFIX + "PrepareStudy")
async def prepare_study(ctx: HandlerContext) -> None:
    """Through DSF (``transfer = "dsf"``): the series is pseudonymized instance by instance into
    a package, the UID mapping kept in this site's store, the package encrypted for the
    provider and stored as a Binary on this site's DSF FHIR server readable by the provider
    only. With ``transfer = "dicomweb"`` and a ``dicomweb_gateway``: the pseudonymized copy is
    stored into the gateway instead; without one, nothing (the provider fetches the study)."""
    gateway = ctx.get("dicomwebGateway")
    if ctx.get("transfer") != "dsf" and not gateway:
        return
    site = _transfer(ctx)
    if site.pseudonymizer is None or site.pseudonyms is None:
        raise BpmnError(
            REQUEST_INVALID,
            "this site sends no study to another organization without pseudonymizing it "
            "(pseudonymization.enabled is false or pseudonymization.secret is not set)",
        )
    if isinstance(gateway, str) and gateway:
        await _copy_to_gateway(ctx, site, gateway, site.pseudonymizer, site.pseudonyms)
        return
    study = _text(ctx, "studyInstanceUid")
    named = ctx.get("seriesInstanceUid")
    series = named if isinstance(named, str) and named else None
    provider = _text(ctx, "provider")
    # The provider's certificate first: nothing is read or made for a provider that cannot
    # receive it.
    try:
        certificate = await encryption_certificate(site, provider)
    except RecipientKeyError as exc:
        raise BpmnError(SERVICE_UNAVAILABLE, str(exc)) from exc
    except TargetError as exc:
        raise BpmnError(SERVICE_UNAVAILABLE, str(exc)) from exc
    except RemoteError as exc:  # after the call's own retries ([runtime] call_*)
        # The message names the server that failed (the provider's, or this site's own).
        raise BpmnError(
            NOT_DELIVERED, f"the provider's encryption certificate could not be read: {exc}"
        ) from exc
    archive = dicomweb_archive(ctx, _text(ctx, "dicomwebEndpoint"))
    try:
        with site.workspace() as workspace:
            chosen = archive.choose_series(await archive.search_series(study), study, series)
            packaged = await package_series(
                archive,
                study,
                chosen.series_instance_uid,
                workspace / "study.zip",
                pseudonymizer=site.pseudonymizer,
                max_instances=site.max_instances,
            )
            # The mapping first: nothing leaves that this site could not map back.
            await site.pseudonyms.record(study, packaged.uids)
            published = await publish_package(
                site,
                packaged.path,
                recipient=provider,
                transfer_id=f"{ctx.business_key}/study",
                title="OMI inference: pseudonymized series",
                certificate=certificate,
            )
    except (PseudonymizationRefusedError, StudyNotFoundError, RequestNotAcceptedError) as exc:
        raise BpmnError(REQUEST_INVALID, str(exc)) from exc
    except RecipientKeyError as exc:
        raise BpmnError(SERVICE_UNAVAILABLE, str(exc)) from exc
    except (TransferError, PackageError) as exc:
        if exc.retryable:
            raise
        raise BpmnError(REQUEST_INVALID, str(exc)) from exc
    except DicomWebError as exc:  # after the call's own retries ([runtime] call_*)
        raise BpmnError(ARCHIVE_UNAVAILABLE, str(exc)) from exc
    finally:
        archive.close()
    manifest = packaged.manifest
    # What crossed, on the start Task: an operator sees it in the DSF FHIR UI.
    start_task = _text(ctx, "startTaskId")
    ctx.add_task_output(
        start_task,
        {
            "type": {"coding": [{"system": CODESYSTEM_OMI, "code": STUDY_PACKAGE_BYTES}]},
            "valueInteger": published.encrypted_bytes,
        },
    )
    ctx.add_task_output(
        start_task,
        {
            "type": {"coding": [{"system": CODESYSTEM_OMI, "code": STUDY_PACKAGE_SECONDS}]},
            "valueDecimal": round(published.seconds, 3),
        },
    )
    ctx.set("studyPackage", published.binary_url)
    ctx.set("studyDocument", published.document_reference)
    ctx.set("sentStudyInstanceUid", manifest.study_instance_uid)
    ctx.set("sentSeriesInstanceUid", manifest.series_instance_uid)
    ctx.set("transferBytes", published.encrypted_bytes)
    ctx.set("transferSeconds", round(published.seconds, 3))
    log.info(
        "inference.study_prepared",
        instances=manifest.instance_count,
        bytes=published.encrypted_bytes,
        seconds=round(published.seconds, 3),
    )


async def _copy_to_gateway(
    ctx: HandlerContext,
    site: TransferSite,
    gateway: str,
    pseudonymizer: Pseudonymizer,
    pseudonyms: PseudonymStore,
) -> None:
    """The pseudonymized copy of the series into the OMI DICOMweb gateway (STOW-RS)."""
    study = _text(ctx, "studyInstanceUid")
    named = ctx.get("seriesInstanceUid")
    archive = dicomweb_archive(ctx, _text(ctx, "dicomwebEndpoint"))
    target = dicomweb_archive(ctx, gateway)
    try:
        chosen = archive.choose_series(
            await archive.search_series(study), study, named if isinstance(named, str) else None
        )
        copied = await copy_series(
            archive,
            target,
            study,
            chosen.series_instance_uid,
            pseudonymizer=pseudonymizer,
            max_instances=site.max_instances,
            record=pseudonyms.record,
        )
    except (PseudonymizationRefusedError, StudyNotFoundError, TransferError) as exc:
        if isinstance(exc, TransferError) and exc.retryable:
            raise
        raise BpmnError(REQUEST_INVALID, str(exc)) from exc
    except DicomWebError as exc:  # after the call's own retries ([runtime] call_*)
        raise BpmnError(ARCHIVE_UNAVAILABLE, str(exc)) from exc
    finally:
        archive.close()
        target.close()
    ctx.set("sentStudyInstanceUid", copied.study_instance_uid)
    ctx.set("sentSeriesInstanceUid", copied.series_instance_uid)
    log.info("inference.study_copied", instances=copied.instances)


@handlers.message_send(_PREFIX + "SendInferenceRequest")
def send_inference_request(ctx: SendContext) -> None:
    """The request names the study by UIDs and the service, and where the study is: a
    package on this site's DSF FHIR server (its UIDs pseudonymized), or a DICOMweb archive."""
    package = ctx.get("studyPackage")
    if isinstance(package, str) and package:
        ctx.add_input(CODESYSTEM_OMI, STUDY_INSTANCE_UID, _text(ctx, "sentStudyInstanceUid"))
        ctx.add_input(CODESYSTEM_OMI, SERIES_INSTANCE_UID, _text(ctx, "sentSeriesInstanceUid"))
        ctx.add_input(
            CODESYSTEM_OMI,
            STUDY_PACKAGE,
            {"valueReference": {"reference": package, "type": "Binary"}},
        )
    elif ctx.get("dicomwebGateway"):
        # The pseudonymized copy in the OMI DICOMweb gateway: its UIDs and the gateway only.
        ctx.add_input(CODESYSTEM_OMI, STUDY_INSTANCE_UID, _text(ctx, "sentStudyInstanceUid"))
        ctx.add_input(CODESYSTEM_OMI, SERIES_INSTANCE_UID, _text(ctx, "sentSeriesInstanceUid"))
        ctx.add_input(CODESYSTEM_OMI, DICOMWEB_ENDPOINT, _text(ctx, "dicomwebGateway"))
    else:
        ctx.add_input(CODESYSTEM_OMI, STUDY_INSTANCE_UID, _text(ctx, "studyInstanceUid"))
        series = ctx.get("seriesInstanceUid")
        if isinstance(series, str) and series:
            ctx.add_input(CODESYSTEM_OMI, SERIES_INSTANCE_UID, series)
        ctx.add_input(CODESYSTEM_OMI, DICOMWEB_ENDPOINT, _text(ctx, "dicomwebEndpoint"))
    ctx.add_input(CODESYSTEM_OMI, SERVICE, _text(ctx, "serviceId"))
    if ctx.get("segmentation") is True:
        ctx.add_input(CODESYSTEM_OMI, SEGMENTATION, True)
    # A provider that refuses the Task (403) is told apart from one that cannot be reached.
    ctx.throw_on_failure(NOT_DELIVERED, forbidden=NOT_AUTHORIZED)


@handlers.service(_PREFIX + "ResultTimedOut")
def result_timed_out(ctx: HandlerContext) -> None:
    reason = (
        f"no inference result from {ctx.get('provider')} within {ctx.get('resultTimeout')} "
        "(result-timeout); the request was delivered but not answered"
    )
    ctx.set("errorCode", RESULT_TIMED_OUT)
    ctx.set("errorMessage", reason)
    log.warning("inference.result_timed_out", provider=ctx.get("provider"), reason=reason)


def _findings(result: Mapping[str, Any], contract: InferenceContract | None) -> list[Finding]:
    """The findings of a result Task: an input with a valueQuantity is a measurement; a
    valueCoding and a valueQuantity under the same code are a classification and its
    probability. Display names and body sites come from the contract when this site knows it."""
    known: dict[tuple[str, str], MeasurementOutput | ClassificationOutput] = {}
    if contract is not None:
        for measurement in contract.outputs.measurements:
            known[(measurement.code.system, measurement.code.code)] = measurement
        for classification in contract.outputs.classifications:
            known[(classification.code.system, classification.code.code)] = classification
    quantities: dict[tuple[str, str], Mapping[str, Any]] = {}
    classes: dict[tuple[str, str], Mapping[str, Any]] = {}
    for item in result.get("inputs") or []:
        system, code = str(item.get("system") or ""), str(item.get("code") or "")
        if not system or system in _NOT_FINDINGS:
            continue
        value = item.get("value")
        if not isinstance(value, Mapping):
            raise BpmnError(PROVIDER_FAILED, f"finding {code} has neither quantity nor class")
        if "value" in value:
            if not isinstance(value.get("value"), int | float) or isinstance(
                value.get("value"), bool
            ):
                raise BpmnError(PROVIDER_FAILED, f"measurement {code} has no numeric value")
            quantities[(system, code)] = value
        elif value.get("system") and value.get("code"):
            classes[(system, code)] = value
        else:
            raise BpmnError(PROVIDER_FAILED, f"finding {code} has neither quantity nor class")
    found: list[Finding] = []
    for key, quantity in quantities.items():
        declared: MeasurementOutput | ClassificationOutput | None = known.get(key)
        coding = (
            declared.code
            if declared is not None
            else Coding(system=key[0], code=key[1], display=key[1])
        )
        body_site = declared.body_site if declared is not None else None
        chosen = classes.pop(key, None)
        if chosen is not None:
            value = Coding(
                system=str(chosen["system"]),
                code=str(chosen["code"]),
                display=str(chosen.get("display") or chosen["code"]),
            )
            if isinstance(declared, ClassificationOutput):
                # The class's display as the contract declares it, not as the provider wrote it.
                value = next(
                    (
                        c.code
                        for c in declared.classes
                        if (c.code.system, c.code.code) == (value.system, value.code)
                    ),
                    value,
                )
            found.append(Classification(coding, value, float(quantity["value"]), body_site))
            continue
        unit = str(quantity.get("code") or quantity.get("unit") or "1")
        found.append(
            Measurement(
                code=coding,
                value=float(quantity["value"]),
                unit=unit,
                unit_text=str(quantity.get("unit") or unit),
                body_site=body_site,
            )
        )
    if classes:
        raise BpmnError(
            PROVIDER_FAILED, f"classification {sorted(classes)[0][1]} comes without probability"
        )
    for finding in found:
        if isinstance(finding, Classification) and not 0.0 <= finding.probability <= 1.0:
            raise BpmnError(
                PROVIDER_FAILED,
                f"classification {finding.code.code} has the probability {finding.probability}, "
                "outside 0..1",
            )
    if contract is not None:
        _check_findings(found, contract)
    return found


def _check_findings(found: Sequence[Finding], contract: InferenceContract) -> None:
    """A result must say what the contract this site knows declares: each finding one of its
    outputs, of the same kind, a measurement in its unit, a class one of its classes, every
    classification present (a measurement may be absent: null, or a series too short)."""
    measurements = {
        (m.code.system, m.code.code): (i, m) for i, m in enumerate(contract.outputs.measurements)
    }
    classifications = {
        (c.code.system, c.code.code): (i, c) for i, c in enumerate(contract.outputs.classifications)
    }
    where = f"service contract {contract.name}"
    for finding in found:
        key = (finding.code.system, finding.code.code)
        if isinstance(finding, Classification):
            if key not in classifications:
                raise BpmnError(
                    PROVIDER_FAILED,
                    f"the result's classification {key[0]}|{key[1]} is not one of {where}'s "
                    "outputs.classifications",
                )
            index, declared = classifications[key]
            allowed = {(c.code.system, c.code.code) for c in declared.classes}
            if (finding.value.system, finding.value.code) not in allowed:
                raise BpmnError(
                    PROVIDER_FAILED,
                    f"the result's class {finding.value.system}|{finding.value.code} for "
                    f"{key[1]} is not one of {where} outputs.classifications[{index}].classes",
                )
            continue
        if key not in measurements:
            raise BpmnError(
                PROVIDER_FAILED,
                f"the result's measurement {key[0]}|{key[1]} is not one of {where}'s "
                "outputs.measurements",
            )
        index, measurement = measurements[key]
        if finding.unit != measurement.unit:
            raise BpmnError(
                PROVIDER_FAILED,
                f"the result's measurement {key[1]} is in {finding.unit!r}; {where} "
                f"outputs.measurements[{index}].unit is {measurement.unit!r}",
            )
    present = {(f.code.system, f.code.code) for f in found if isinstance(f, Classification)}
    for key, (index, _) in classifications.items():
        if key not in present:
            raise BpmnError(
                PROVIDER_FAILED,
                f"the result has no classification {key[1]} ({where} "
                f"outputs.classifications[{index}])",
            )


def _local_client(ctx: HandlerContext) -> FhirClient:
    return ctx.service(SERVICE_FHIR_CLIENT, FhirClient)


@handlers.service(_PREFIX + "StoreResult")
async def store_result(ctx: HandlerContext) -> None:
    """A provider error becomes a BPMN error; measurements are stored as a Bundle readable by
    this site only, and become outputs of the start Task."""
    result = ctx.task()
    provider = str(ctx.get("provider") or result.get("requester"))
    errors = _inputs(result, CODESYSTEM_OMI, ERROR)
    if errors:
        kinds = _inputs(result, CODESYSTEM_OMI, ERROR_KIND)
        kind = _code_of(kinds[0]) if kinds else PROVIDER_FAILED
        raise BpmnError(PROVIDER_FAILED, f"inference failed at {provider} ({kind}): {errors[0]}")
    published = ctx.get("serviceContract")
    if isinstance(published, Mapping):
        contract = _contract(published)  # the registry's, read and checked by ResolveService
    else:
        entry = catalogue_entry(omi_settings(ctx), str(ctx.get("serviceId") or ""))
        contract = _contract(entry.contract if entry is not None else None)
    found = _findings(result, contract)
    if not found:
        raise BpmnError(PROVIDER_FAILED, f"the result from {provider} holds no finding")
    model = _first_text(result, MODEL_NAME) or str(ctx.get("modelName") or "")
    version = _first_text(result, MODEL_VERSION)
    series = _first_text(result, SERIES_INSTANCE_UID)
    try:
        package = _reference(result, SEGMENTATION_PACKAGE)
    except BpmnError as exc:
        raise BpmnError(PROVIDER_FAILED, f"the result from {provider}: {exc.message}") from exc
    if ctx.get("segmentation") is not True and (
        package is not None or _first_text(result, SEGMENTATION_SERIES) is not None
    ):
        # Nothing is stored into this site's archive that it did not ask for.
        raise BpmnError(
            PROVIDER_FAILED,
            f"the result from {provider} holds a segmentation this site did not ask for",
        )
    pseudonymized = ctx.get("transfer") == "dsf" or bool(ctx.get("dicomwebGateway"))
    if pseudonymized and series is not None:
        # The provider saw the replacement UIDs only; the report names the original series.
        # Only the series it was sent: the mapping holds every study this site ever sent, and
        # another one's series would put another patient's images into this report.
        if series != ctx.get("sentSeriesInstanceUid"):
            raise BpmnError(
                PROVIDER_FAILED, f"the result from {provider} names a series it was not sent"
            )
        known = await _pseudonyms(ctx).originals([series])
        series = known.get(series)
    slices_values = _inputs(result, CODESYSTEM_OMI, SLICES)
    slices = int(slices_values[0]) if slices_values and isinstance(slices_values[0], int) else 1
    device = {
        "type": "Device",
        "identifier": {"system": DEVICE_IDENTIFIER_SYSTEM, "value": model},
        "display": f"{model} {version}" if version else model,
    }
    bundle = report_bundle(
        found,
        study_instance_uid=_text(ctx, "studyInstanceUid"),
        series_instance_uid=series if slices > 1 else None,
        slices=slices,
        device=device,
        report_code=contract.report_code if contract is not None else INFERENCE_REPORT,
    )
    # The DSF FHIR server stores no Observation or DiagnosticReport: the report is kept as a
    # collection Bundle, readable by the local organization only.
    stored: dict[str, Any] = {
        "resourceType": "Bundle",
        "meta": {"tag": [{"system": READ_ACCESS_TAG_SYSTEM, "code": "LOCAL"}]},
        "type": "collection",
        "entry": [
            {"fullUrl": entry["fullUrl"], "resource": entry["resource"]}
            for entry in bundle["entry"]
        ],
    }
    # Identified by the result Task and created only if none has that identifier: the handler
    # runs at least once, and a crash after this POST and before the step's commit repeats it.
    result_id = str(result.get("id") or "")
    if result_id:
        stored["identifier"] = {"system": RESULT_BUNDLE_IDENTIFIER_SYSTEM, "value": result_id}
    client = _local_client(ctx)
    created = await client.create(
        stored,
        if_none_exist=(
            f"identifier={RESULT_BUNDLE_IDENTIFIER_SYSTEM}|{result_id}" if result_id else None
        ),
    )
    if created.id is None:
        raise RemoteError("the local FHIR server answered the result Bundle without an id")
    outputs: list[dict[str, Any]] = [
        {
            "type": {"coding": [{"system": CODESYSTEM_OMI, "code": INFERENCE_RESULT}]},
            "valueReference": {"reference": f"Bundle/{created.id}", "type": "Bundle"},
        }
    ]
    segmentation = _first_text(result, SEGMENTATION_SERIES)
    ctx.set("sendReceipt", package is not None)
    if package is not None:
        await _store_segmentation(ctx, package, provider)
        ctx.set("resultPackage", package)
    elif segmentation is not None and ctx.get("dicomwebGateway"):
        await _fetch_segmentation(ctx, segmentation, provider)
    if segmentation is not None:
        outputs.append(
            {
                "type": {"coding": [{"system": CODESYSTEM_OMI, "code": SEGMENTATION_SERIES}]},
                "valueString": segmentation,
            }
        )
    # Findings last, as in the result Task: outputs without a slice of their own follow the
    # sliced ones (openAtEnd), the bridge's own measurement codes (sliced) first.
    for finding in sorted(found, key=lambda f: f.code.system != MEASUREMENT_CODE_SYSTEM):
        outputs.extend(
            {"type": {"coding": [{"system": finding.code.system, "code": finding.code.code}]}}
            | value
            for value in _wire_values(finding)
        )
    start_task = _text(ctx, "startTaskId")
    for output in outputs:
        ctx.add_task_output(start_task, output)
    ctx.set("resultBundle", f"Bundle/{created.id}")
    log.info("inference.result_stored", provider=provider, findings=len(found))


def _pseudonyms(ctx: HandlerContext) -> PseudonymStore:
    site = _transfer(ctx)
    if site.pseudonyms is None:
        raise BridgeError("this site keeps no pseudonym mapping ([pseudonymization])")
    return site.pseudonyms


async def _store_segmentation(ctx: HandlerContext, package: str, provider: str) -> None:
    """The SEG the provider stored as a package, with the DICOM SR measurement report on it
    when the contract has one: downloaded, decrypted, mapped back to the original study (every
    UID this site replaced becomes its original again), checked, and stored into the site's
    archive next to the study (one STOW-RS)."""
    site = _transfer(ctx)
    archive = dicomweb_archive(ctx, _text(ctx, "dicomwebEndpoint"))
    try:
        with site.workspace() as workspace:
            received = await receive_package(
                site, package, sender=provider, target=workspace / "segmentation.zip"
            )
            manifest, load = open_package(site, received.path, max_series=RESULT_SERIES)
            _check_result_series(manifest)
            datasets = await asyncio.to_thread(load)
            await _file_segmentation(ctx, archive, datasets)
    except (TransferError, PackageError, DecryptionError, RecipientKeyError) as exc:
        if exc.retryable:
            raise
        raise BpmnError(
            PROVIDER_FAILED, f"the segmentation package from {provider} is not usable: {exc}"
        ) from exc
    except DicomWebError as exc:
        if exc.retryable:
            raise
        raise BpmnError(
            PROVIDER_FAILED, f"the segmentation could not be stored in the archive: {exc}"
        ) from exc
    except TargetError as exc:  # the provider left the allow list meanwhile
        raise BpmnError(
            PROVIDER_FAILED, f"the segmentation package from {provider} is not usable: {exc}"
        ) from exc
    except RemoteError as exc:  # the download: over this site's limit, gone (404), refused
        if exc.retryable:
            raise
        raise BpmnError(
            PROVIDER_FAILED,
            f"the segmentation package from {provider} could not be downloaded: {exc}",
        ) from exc
    finally:
        archive.close()
    log.info("inference.segmentation_stored", instances=len(datasets))


def _check_result_series(manifest: PackageManifest) -> None:
    """A result package holds one SEG series and at most one SR series, nothing else: this
    site stores into its archive only what it asked for (the instances' own Modality is
    checked again after they are read, :func:`_check_returned`)."""
    modalities = sorted(series.modality for series in manifest.series)
    if modalities not in (["SEG"], ["SEG", "SR"]):
        raise PackageError(
            f"it holds series of the modalities {modalities}; a result package holds one SEG "
            "series and at most one SR series"
        )


async def _fetch_segmentation(ctx: HandlerContext, series: str, provider: str) -> None:
    """The SEG the provider stored into the gateway next to the pseudonymized copy, and the
    DICOM SR measurement report that refers to it: read, mapped back to the original study and
    stored into this site's archive."""
    gateway = dicomweb_archive(ctx, _text(ctx, "dicomwebGateway"))
    archive = dicomweb_archive(ctx, _text(ctx, "dicomwebEndpoint"))
    sent_study = _text(ctx, "sentStudyInstanceUid")
    try:
        datasets = await gateway.retrieve_series(sent_study, series)
        datasets += await _reports_on(gateway, sent_study, datasets)
        await _file_segmentation(ctx, archive, datasets)
    except DicomWebError as exc:
        if exc.retryable:
            raise
        raise BpmnError(
            PROVIDER_FAILED, f"the segmentation from {provider} is not usable: {exc}"
        ) from exc
    finally:
        gateway.close()
        archive.close()
    log.info("inference.segmentation_stored", instances=len(datasets))


async def _reports_on(
    gateway: DicomWebArchive, study: str, segmentations: list[Dataset]
) -> list[Dataset]:
    """The SRs in ``study`` of the gateway whose evidence names one of ``segmentations``: the
    Task names the SEG's series only, and the pseudonymized study may hold the SRs of earlier
    requests for the same study."""
    wanted = {str(seg.SOPInstanceUID) for seg in segmentations}
    reports: list[Dataset] = []
    for found in await gateway.search_series(study):
        if found.modality != "SR":
            continue
        for report in await gateway.retrieve_series(study, found.series_instance_uid):
            if wanted & {sop for _, _, sop in _evidence(report)}:
                reports.append(report)
    return reports


async def _file_segmentation(
    ctx: HandlerContext, archive: DicomWebArchive, datasets: list[Dataset]
) -> None:
    """A SEG made from the pseudonymized copy (a package's, or the gateway's): its UIDs mapped
    back, checked to belong to the study and series this request sent, its patient and study
    attributes the original's, stored into this site's archive (STOW-RS)."""
    sent = _text(ctx, "sentSeriesInstanceUid")
    study = _text(ctx, "studyInstanceUid")
    pseudonyms = _pseudonyms(ctx)
    for dataset in datasets:
        # The provider's private data (nested too) is nothing this site asked for, and its
        # UIDs would be mapped back unseen by the checks below, which go by keyword.
        dataset.remove_private_tags()
    originals = await pseudonyms.originals(sorted(uids_in(datasets) | {sent}))
    results = [reidentify(dataset, originals) for dataset in datasets]
    _check_returned(results, study, originals.get(sent))
    _check_own_uids(datasets, originals)
    # Every study, series and instance a result names, where it is a pseudonym, must be one
    # this site made for the request's study: the checks above look at the series, this one
    # at every reference (source images, frames' derivation, evidence, private sequences).
    referenced = _references(datasets) & originals.keys()
    of_study = await pseudonyms.originals(sorted(referenced), study=study) if referenced else {}
    if referenced - of_study.keys():
        raise BpmnError(
            PROVIDER_FAILED,
            "the returned segmentation references an image, series or study of another study "
            "this site sent; it was not stored",
        )
    source = await _source_instance(archive, ctx, results)
    # A frame of reference that is a pseudonym must be the sent images' (read from an original
    # instance): another study's would have a viewer register the SEG with its images. Not by
    # the store's study as above: one frame of reference may span several studies.
    frame = str(source.get("FrameOfReferenceUID", ""))
    named = _references(datasets, _FRAME_KEYWORDS) & originals.keys()
    if {originals[uid] for uid in named} - {frame}:
        raise BpmnError(
            PROVIDER_FAILED,
            "the returned segmentation names another frame of reference than the images this "
            "site sent; it was not stored",
        )
    await archive.store([restore_identity(result, source) for result in results])


# What names a study, a series or an instance, wherever it stands in a dataset; "UID" is the
# value of an SR's UIDREF item (the source series of a segmentation).
_REFERENCE_KEYWORDS = frozenset(
    {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "ReferencedSOPInstanceUID", "UID"}
)
_FRAME_KEYWORDS = frozenset({"FrameOfReferenceUID", "ReferencedFrameOfReferenceUID"})


def _references(
    datasets: list[Dataset], keywords: frozenset[str] = _REFERENCE_KEYWORDS
) -> set[str]:
    """Every UID in ``datasets`` (nested sequences included) of an attribute in ``keywords``:
    by default those that name a study, a series or an instance."""
    found: set[str] = set()
    pending: list[Dataset] = list(datasets)
    while pending:
        dataset = pending.pop()
        for element in dataset:
            if element.VR == "SQ":
                pending.extend(element.value or [])
            elif element.keyword in keywords and element.value:
                values = element.value if element.VM > 1 else [element.value]
                found.update(str(value) for value in values)
    return found


def _check_own_uids(datasets: list[Dataset], originals: Mapping[str, str]) -> None:
    """A returned instance's own UIDs (its series, its SOP instance) are new, made by the
    provider: one that is a pseudonym this site handed out would, mapped back, store the result
    as an image of the sent series (under one of its images' UIDs) or into a series of
    another study."""
    for dataset in datasets:
        meta = getattr(dataset, "file_meta", None)
        own = {
            str(dataset.get("SeriesInstanceUID", "")),
            str(dataset.get("SOPInstanceUID", "")),
            str(meta.get("MediaStorageSOPInstanceUID", "")) if meta is not None else "",
        }
        if own & originals.keys():
            raise BpmnError(
                PROVIDER_FAILED,
                "the returned segmentation takes a UID of the images this site sent (or of "
                "another study it sent) as its own series or instance UID; it was not stored",
            )


# What may come back, by Modality: its SOP classes.
_RESULT_CLASSES: dict[str, frozenset[str]] = {
    "SEG": frozenset({SegmentationStorage}),
    "SR": frozenset(
        {Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage, BasicTextSRStorage}
    ),
}


def _check_returned(results: list[Dataset], study: str, series: str | None) -> None:
    """A returned SEG, mapped back, must belong to the study and reference the series this
    site sent: the mapping holds every study the site ever sent, so a provider naming another
    one's pseudonyms would otherwise file the SEG into another patient's study. A returned SR
    (its measurement report) may besides reference the SEGs returned with it, nothing else.
    Nothing but SEGs and SRs comes back."""
    for result in results:
        modality = str(result.get("Modality", ""))
        if modality not in _RESULT_CLASSES:
            raise BpmnError(
                PROVIDER_FAILED,
                f"the returned segmentation holds a {modality or 'modality-less'} instance; "
                "only a SEG and its SR come back; nothing was stored",
            )
        if str(result.get("SOPClassUID", "")) not in _RESULT_CLASSES[modality]:
            # The Modality is the provider's word; the SOP class says what the instance is
            # (an image relabelled SEG would put pixels of another study into this one).
            raise BpmnError(
                PROVIDER_FAILED,
                f"the returned {modality} instance is of no {modality} SOP class; only a "
                "Segmentation and a structured report come back; nothing was stored",
            )
    segmentations = {
        (str(result.get("SeriesInstanceUID", "")), str(result.get("SOPInstanceUID", "")))
        for result in results
        if str(result.get("Modality", "")) == "SEG"
    }
    for result in results:
        referenced = [
            str(item.get("SeriesInstanceUID", ""))
            for item in result.get("ReferencedSeriesSequence", [])
        ]
        if (
            str(result.get("StudyInstanceUID", "")) != study
            or any(uid != series for uid in referenced)
            or not _report_fits(result, study, series, segmentations)
        ):
            raise BpmnError(
                PROVIDER_FAILED,
                "the returned segmentation belongs to another study or references another "
                "series than the one this site sent; it was not stored",
            )


# DICOM "Source Series for Segmentation" (DCM 121232): the UIDREF of an SR measurement group.
_SOURCE_SERIES = "121232"


def _evidence(report: Dataset) -> Iterator[tuple[str, str, str]]:
    """(study, series, SOP instance) of every instance an SR lists as its evidence."""
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in report.get(keyword, []):
            for series in study.get("ReferencedSeriesSequence", []):
                for instance in series.get("ReferencedSOPSequence", []):
                    yield (
                        str(study.get("StudyInstanceUID", "")),
                        str(series.get("SeriesInstanceUID", "")),
                        str(instance.get("ReferencedSOPInstanceUID", "")),
                    )


def _report_fits(
    result: Dataset, study: str, series: str | None, segmentations: set[tuple[str, str]]
) -> bool:
    """An SR's evidence is the sent series and the returned SEG instances ((series, SOP
    instance) in ``segmentations``), in the study; what its content references is evidence,
    and its source series is the sent one. What is no SR may list no other evidence either.

    The evidence is checked whatever else the instance holds: an SR without content (or a SEG
    carrying evidence sequences) would otherwise file references to another study."""
    evidence = list(_evidence(result))
    if any(
        s != study or (uid != series and (uid, sop) not in segmentations)
        for s, uid, sop in evidence
    ):
        return False
    if str(result.get("Modality", "")) != "SR" and "ContentSequence" not in result:
        return True
    if not evidence:
        return False
    instances = {sop for _, _, sop in evidence}
    items = list(result.get("ContentSequence", []))
    while items:
        item = items.pop()
        items.extend(item.get("ContentSequence", []))
        for reference in item.get("ReferencedSOPSequence", []):
            if str(reference.get("ReferencedSOPInstanceUID", "")) not in instances:
                return False
        names = item.get("ConceptNameCodeSequence", [])
        if (
            item.get("ValueType") == "UIDREF"
            and names
            and names[0].get("CodeValue") == _SOURCE_SERIES
            and str(item.get("UID", "")) != series
        ):
            return False
    return True


async def _source_instance(
    archive: DicomWebArchive, ctx: HandlerContext, results: list[Dataset]
) -> Dataset:
    """An original instance the returned SEG references (mapped back), read as metadata: its
    patient and study attributes replace the pseudonymized ones."""
    study = _text(ctx, "studyInstanceUid")
    for result in results:
        for series in result.get("ReferencedSeriesSequence", []):
            for instance in series.get("ReferencedInstanceSequence", []):
                sop = str(instance.get("ReferencedSOPInstanceUID", ""))
                series_uid = str(series.get("SeriesInstanceUID", ""))
                if sop and series_uid:
                    return await archive.instance_metadata(study, series_uid, sop)
    raise BpmnError(
        PROVIDER_FAILED, "the returned segmentation references no instance of the study"
    )


@handlers.message_send(_PREFIX + "SendInferenceReceipt")
def send_inference_receipt(ctx: SendContext) -> None:
    """Tells the provider its segmentation package was retrieved: it may delete it. The
    business key says which; the Task names no package, because DSF checks a Task's local
    references when it completes (``ValidationRules.checkReferenceAfterUpdate``) and the
    provider deletes its package before its receipt Task completes."""
    # A provider gone by now keeps its package until its retention ends: no reason to fail.
    ctx.throw_on_failure(NOT_DELIVERED)


@handlers.service(_PREFIX + "WithdrawStudy")
async def withdraw_study(ctx: HandlerContext) -> None:
    """The study's package goes once the provider answered or can no longer (result, error,
    timeout): its Binary and DocumentReference are deleted from this site's server."""
    package = ctx.get("studyPackage")
    document = ctx.get("studyDocument")
    if not isinstance(package, str) or not package or not isinstance(document, str):
        return
    await withdraw_package(_transfer(ctx), package, document)


def _code_of(value: object) -> str:
    if isinstance(value, Mapping):
        return str(value.get("code") or PROVIDER_FAILED)
    return str(value)


def _first_text(task: Mapping[str, Any], code: str) -> str | None:
    values = _inputs(task, CODESYSTEM_OMI, code)
    return str(values[0]) if values and isinstance(values[0], str) else None


def _wire_values(finding: Finding) -> list[dict[str, Any]]:
    """How a finding travels in a Task (input or output) under its code: a measurement as a
    valueQuantity; a classification as a valueCoding (the class) and a valueQuantity (its
    probability). A measurement without value does not travel."""
    if isinstance(finding, Classification):
        return [
            {"valueCoding": finding.value.fhir()},
            {"valueQuantity": finding.quantity()},
        ]
    if finding.value is None:
        return []
    return [{"valueQuantity": finding.quantity()}]


_MAX_REASON_CHARACTERS = 1000
_REQUESTER_MESSAGES = {
    NOT_DELIVERED: "inference request not delivered to {provider}: {message}",
    NOT_AUTHORIZED: (
        "inference request refused by {provider}: this site is not authorized to request "
        "inference there ({message})"
    ),
}


@handlers.service(_PREFIX + "InferenceFailed")
def inference_failed(ctx: HandlerContext) -> None:
    """Every way the request ends without a result: fail the instance with what went wrong."""
    code = str(ctx.get("errorCode") or PROVIDER_FAILED)
    message = str(ctx.get("errorMessage") or "no detail")
    if len(message) > _MAX_REASON_CHARACTERS:
        # The reason quotes the provider's words (its result Task's error, its package's
        # manifest): its megabyte goes neither into the log line nor into the failure.
        message = f"{message[:_MAX_REASON_CHARACTERS]}... ({len(message)} characters)"
    provider = str(ctx.get("provider") or "the provider")
    text = _REQUESTER_MESSAGES.get(code, "{message}").format(provider=provider, message=message)
    # The reason may quote the provider's or the archive's words, with a study's UID: the log
    # renderer puts a digest in its place (dsf_bridge.logs.redact_uids).
    log.error(
        "inference.request_failed", error_code=code, provider=ctx.get("provider"), reason=text
    )
    raise InferenceRequestError(f"{code}: {text}")


# -- the providing site ------------------------------------------------------------------------


@handlers.service(_PREFIX + "CheckRequest")
def check_request(ctx: HandlerContext) -> None:
    """The answer goes to the requester; the request must name a study, an allowed archive and
    a service this site runs."""
    task = ctx.task()
    settings = omi_settings(ctx)
    requester = task.get("requester")
    if not isinstance(requester, str) or not requester:
        raise BridgeError("the inference request names no requester organization")
    ctx.set("target", {"organizationIdentifier": requester})
    ctx.set("requester", requester)
    ctx.set("requestTaskId", task.get("id"))
    # Whatever happens next, the instance knows whether it keeps a package and for how long.
    ctx.set("resultPackageStored", False)
    ctx.set("resultRetention", settings.transfer_retention)
    study = _uid(task, STUDY_INSTANCE_UID, required=True)
    series = _uid(task, SERIES_INSTANCE_UID, required=False)
    package = _reference(task, STUDY_PACKAGE)
    has_endpoint = bool(_inputs(task, CODESYSTEM_OMI, DICOMWEB_ENDPOINT))
    if (package is None) == (not has_endpoint):
        raise BpmnError(
            REQUEST_INVALID,
            f"the request must name the study's place once: '{STUDY_PACKAGE}' (a package "
            f"through DSF) or '{DICOMWEB_ENDPOINT}', not both, not neither",
        )
    endpoint = _endpoint(task) if package is None else None
    service_id = _text_input(task, SERVICE, required=True)
    entry = catalogue_entry(settings, str(service_id))
    if entry is None or not entry.inference_url:
        raise BpmnError(REQUEST_REFUSED, f"service {service_id} is not offered at this site")
    allowed = settings.dicomweb_allowed
    if (
        endpoint is not None
        and allowed
        and not any(endpoint.startswith(prefix.rstrip("/")) for prefix in allowed)
    ):
        raise BpmnError(
            REQUEST_REFUSED, f"this site does not fetch studies from {endpoint} (not allowed)"
        )
    segmentation = _flag(task, SEGMENTATION)
    try:
        _provider_contract(entry).check_request(
            series_named=series is not None, segmentation=segmentation
        )
    except RequestNotAcceptedError as exc:
        raise BpmnError(REQUEST_INVALID, str(exc)) from exc
    ctx.set("studyInstanceUid", study)
    ctx.set("seriesInstanceUid", series)
    ctx.set("dicomwebEndpoint", endpoint)
    ctx.set("studyPackage", package)
    ctx.set("segmentation", segmentation)
    ctx.set("serviceId", entry.id)
    log.info("inference.request_checked", requester=requester, service=entry.id)


@handlers.service(_PREFIX + "RunInference")
async def run_inference(ctx: HandlerContext) -> None:
    """Fetch, convert, infer; a failure becomes a BPMN error whose code is the error kind."""
    settings = omi_settings(ctx)
    entry = catalogue_entry(settings, _text(ctx, "serviceId"))
    if entry is None or entry.inference_url is None:
        raise BpmnError(REQUEST_REFUSED, "the service is no longer offered at this site")
    contract = _provider_contract(entry)
    model = entry.model_name or contract.model.name
    package = ctx.get("studyPackage")
    if isinstance(package, str) and package:
        await _run_on_package(ctx, entry, contract, model, package)
        return
    archive = dicomweb_archive(ctx, _text(ctx, "dicomwebEndpoint"))
    try:
        outcome = await _infer(ctx, entry, contract, model, archive)
    finally:
        archive.close()
    _record_outcome(ctx, entry, contract, model, outcome)


async def _run_on_package(
    ctx: HandlerContext,
    entry: OmiServiceSettings,
    contract: InferenceContract,
    model: str,
    package: str,
) -> None:
    """The study came as a package: downloaded from the requester's DSF FHIR server (mutual
    TLS, streamed, size-limited), decrypted into this step's workspace and verified; a SEG goes
    back as a package on this site's server, encrypted for the requester."""
    site = _transfer(ctx)
    requester = _text(ctx, "requester")
    with site.workspace() as workspace:
        try:
            received = await receive_package(
                site, package, sender=requester, target=workspace / "study.zip"
            )
            manifest, load = open_package(site, received.path)
        except (TransferError, PackageError, DecryptionError, RecipientKeyError) as exc:
            if exc.retryable:
                raise
            raise BpmnError(TRANSFER_FAILED, str(exc)) from exc
        except RemoteError as exc:
            if exc.retryable:
                raise
            raise BpmnError(TRANSFER_FAILED, f"the study package could not be read: {exc}") from exc
        if manifest.study_instance_uid != _text(ctx, "studyInstanceUid"):
            raise BpmnError(
                REQUEST_INVALID, "the study package holds another study than the request names"
            )
        source = ReceivedSeries(
            study_instance_uid=manifest.study_instance_uid,
            series=series_info(manifest),
            load=load,
        )
        outcome = await _infer(ctx, entry, contract, model, source)
        _record_outcome(ctx, entry, contract, model, outcome)
        if source.stored:
            # The SEG and its DICOM SR, when the contract has one: one package, two series.
            path = workspace / "segmentation.zip"
            await asyncio.to_thread(package_datasets, source.stored, path, max_series=RESULT_SERIES)
            try:
                published = await publish_package(
                    site,
                    path,
                    recipient=requester,
                    transfer_id=f"{ctx.business_key}/segmentation",
                    title="OMI inference: segmentation",
                )
            except RecipientKeyError as exc:
                raise BpmnError(TRANSFER_FAILED, str(exc)) from exc
            ctx.set("resultPackage", published.binary_url)
            ctx.set("resultDocument", published.document_reference)
            ctx.set("resultPackageStored", True)


async def _infer(
    ctx: HandlerContext,
    entry: OmiServiceSettings,
    contract: InferenceContract,
    model: str,
    archive: StudySource,
) -> StudyInference:
    """Convert and infer; a failure becomes a BPMN error whose code is the error kind."""
    series = ctx.get("seriesInstanceUid")
    try:
        async with inference_client(ctx, entry) as client:
            outcome = await infer_study(
                archive,
                client,
                study_instance_uid=_text(ctx, "studyInstanceUid"),
                series_instance_uid=series if isinstance(series, str) and series else None,
                contract=contract,
                model=model,
                model_version=entry.model_version,
                device={
                    "type": "Device",
                    "identifier": {"system": DEVICE_IDENTIFIER_SYSTEM, "value": model},
                },
                request_id=ctx.business_key,
                segmentation=ctx.get("segmentation") is True,
                max_slices=entry.max_slices,
            )
    except StudyNotFoundError as exc:
        raise BpmnError(STUDY_NOT_FOUND, str(exc)) from exc
    except ArchiveUnavailableError as exc:
        raise BpmnError(ARCHIVE_UNAVAILABLE, str(exc)) from exc
    except (ModelNotReadyError, ModelNotFoundError) as exc:
        raise BpmnError(MODEL_NOT_READY, str(exc)) from exc
    except InferenceError as exc:
        raise BpmnError(MODEL_ERROR, str(exc)) from exc
    except RequestNotAcceptedError as exc:
        raise BpmnError(REQUEST_INVALID, str(exc)) from exc
    except (ImageConversionError, OutputConversionError) as exc:
        raise BpmnError(CONVERSION_FAILED, str(exc)) from exc
    except PackageError as exc:  # an instance of a received package failed its digest
        raise BpmnError(TRANSFER_FAILED, str(exc)) from exc
    except RemoteError as exc:  # the archive answered something else unusable
        raise BpmnError(ARCHIVE_UNAVAILABLE, str(exc)) from exc
    return outcome


def _record_outcome(
    ctx: HandlerContext,
    entry: OmiServiceSettings,
    contract: InferenceContract,
    model: str,
    outcome: StudyInference,
) -> None:
    ctx.set(
        "findings",
        [
            {"system": finding.code.system, "code": finding.code.code, "value": value}
            for finding in outcome.findings
            for value in _wire_values(finding)  # an absent value has nothing to send
        ],
    )
    ctx.set("modelName", model)
    ctx.set("modelVersion", entry.model_version or contract.model.version)
    ctx.set("resultSeriesInstanceUid", outcome.series_instance_uid)
    ctx.set("slices", outcome.slices)
    ctx.set("segmentationSeriesUid", outcome.segmentation_series_uid)
    log.info(
        "inference.executed",
        service=entry.id,
        contract=contract.name,
        findings=len(outcome.findings),
    )


@handlers.service(_PREFIX + "WithdrawResult")
async def withdraw_result(ctx: HandlerContext) -> None:
    """The requester confirmed its segmentation package, or the retention ended: it goes."""
    package = ctx.get("resultPackage")
    document = ctx.get("resultDocument")
    if isinstance(package, str) and package and isinstance(document, str):
        await withdraw_package(_transfer(ctx), package, document)


@handlers.service(_PREFIX + "ResultNotDelivered")
def result_not_delivered(ctx: HandlerContext) -> None:
    """The result Task could not be posted (its SEG package is deleted already): the instance
    fails, and the request Task with it, saying why."""
    message = str(ctx.get("errorMessage") or "no detail")
    log.error("inference.result_not_delivered", reason=message)
    raise BridgeError(f"{RESULT_NOT_DELIVERED}: {message}", retryable=False)


@handlers.service(_PREFIX + "RecordFailure")
def record_failure(ctx: HandlerContext) -> None:
    ctx.set("resultPackageStored", False)
    log.error(
        "inference.execution_failed",
        error_code=ctx.get("errorCode"),
        reason=ctx.get("errorMessage") or "no detail",
    )


@handlers.message_send(_PREFIX + "SendInferenceResult")
def send_inference_result(ctx: SendContext) -> None:
    """Findings, or the error kind and message; study identity only as UIDs."""
    # Not delivered: a SEG package on this site's server would wait for a receipt that never
    # comes, so the model deletes it before the instance fails (ResultNotDelivered).
    ctx.throw_on_failure(RESULT_NOT_DELIVERED)
    code = ctx.get("errorCode")
    if code is not None:
        ctx.add_input(
            CODESYSTEM_OMI,
            ERROR_KIND,
            {"valueCoding": {"system": CODESYSTEM_OMI_ERROR, "code": str(code)}},
        )
        ctx.add_input(CODESYSTEM_OMI, ERROR, str(ctx.get("errorMessage") or code))
        return
    ctx.add_input(CODESYSTEM_OMI, MODEL_NAME, _text(ctx, "modelName"))
    version = ctx.get("modelVersion")
    if isinstance(version, str) and version:
        ctx.add_input(CODESYSTEM_OMI, MODEL_VERSION, version)
    ctx.add_input(CODESYSTEM_OMI, SERIES_INSTANCE_UID, _text(ctx, "resultSeriesInstanceUid"))
    ctx.add_input(CODESYSTEM_OMI, SLICES, int(str(ctx.get("slices") or 1)))
    segmentation = ctx.get("segmentationSeriesUid")
    if isinstance(segmentation, str) and segmentation:
        ctx.add_input(CODESYSTEM_OMI, SEGMENTATION_SERIES, segmentation)
    package = ctx.get("resultPackage")
    if isinstance(package, str) and package:
        ctx.add_input(
            CODESYSTEM_OMI,
            SEGMENTATION_PACKAGE,
            {"valueReference": {"reference": package, "type": "Binary"}},
        )
    # Last: a finding under a code the profile has no slice for may only follow the sliced
    # inputs (DSF's Task.input slicing is openAtEnd).
    # Of the findings, the bridge's own measurement codes have slices (the reference
    # contract's): they go first, whatever order the contract declares its outputs in.
    found = ctx.get("findings")
    items = found if isinstance(found, list) else []
    for item in sorted(items, key=lambda i: str(i["system"]) != MEASUREMENT_CODE_SYSTEM):
        ctx.add_input(str(item["system"]), str(item["code"]), item["value"])


# -- reading results ---------------------------------------------------------------------------


def result_summary(task: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The findings of a completed start Task by code, as the demo prints them: a
    measurement's ``value`` and ``unit`` (as people read it), a classification's class code as
    ``value`` and its ``probability``."""
    summary: dict[str, dict[str, Any]] = {}
    for output in task.get("output") or []:
        coding = ((output.get("type") or {}).get("coding") or [{}])[0]
        if coding.get("system") in _NOT_FINDINGS:
            continue
        code = str(coding.get("code"))
        quantity = output.get("valueQuantity")
        chosen = output.get("valueCoding")
        if isinstance(quantity, Mapping):
            shown = summary.setdefault(code, {})
            if "value" in shown:  # the class came first: this is its probability
                shown["probability"] = round(float(quantity["value"]), 4)
            else:
                shown["value"] = round(float(quantity["value"]), 2)
                shown["unit"] = str(quantity.get("unit") or quantity.get("code"))
        elif isinstance(chosen, Mapping):
            shown = summary.setdefault(code, {})
            probability = shown.pop("value", None)
            shown.pop("unit", None)
            shown["value"] = str(chosen.get("code"))
            if probability is not None:
                shown["probability"] = probability
    return summary


# -- the plugin --------------------------------------------------------------------------------


def _plugin() -> ProcessPlugin:
    return ProcessPlugin(
        name="dsf-bridge-omi-inference",
        version="1.1.0.0",
        release_date=date(2026, 11, 30),
        bpmn_files=(bpmn_dir() / "inference-request.bpmn", bpmn_dir() / "inference-execution.bpmn"),
        fhir_resources=resources_per_process(
            profiles_dir().parent / "omi",
            {
                REQUEST_PROCESS: "inference-request.json",
                EXECUTION_PROCESS: "inference-execution.json",
            },
        ),
        handlers=handlers,
    )


plugin = _plugin()
