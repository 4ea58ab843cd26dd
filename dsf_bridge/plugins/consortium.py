"""Consortium inference as a dsf-bridge plugin: one request, many data sites, aggregates only
(``docs/consortium.md``).

Coordinator (``dsf-bridgedev_consortiumInference``): a local ``startConsortiumInference`` Task
names a service, a cohort (modality, body part, study date range, series description: a query
every data site runs on its own archive, nothing that identifies a patient) and the data sites
(``target-organization`` inputs, or every organization with ``target-role`` under
``target-parent-organization`` in the allow list). One ``consortiumInferenceRequest`` goes to
each site with its own correlation key; each site's ``consortiumInferenceResult`` is awaited
until its own timer. A site that answers is recorded with its aggregates (read strictly:
:func:`~dsf_bridge.omi.aggregates.aggregates_from_json`), one that refuses or fails with its
reason, one that does not answer in time as ``timed-out``, one that cannot be sent the request
as ``failed``. The merge (:func:`~dsf_bridge.omi.aggregates.merge`) gives per-site and pooled
figures; they are stored as a Bundle of Observations readable by this site only, and the start
Task completes with a reference to it and one ``site-status`` per site. Partial results are
results.

Data site (``dsf-bridgedev_consortiumExecution``): the request is checked (this site takes
consortium requests: ``[omi.consortium] dicomweb_url``; the service is one it runs; the cohort
is valid); if ``[omi.consortium] approval`` is set a person approves it first (a DSF user task,
answered through a QuestionnaireResponse). Then the cohort is searched in the site's own
archive (QIDO-RS), the model runs on each study, and only aggregates go back: the k rule (the
larger of the site's k and the request's ``minimum-k``), complementary suppression, and count
obfuscation if configured. Every way this ends sends exactly one result Task.

No Task, variable or log line of either process holds a study, series or patient identifier:
the cohort is a query, the answer is aggregates.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any
from uuid import uuid4

import structlog

from dsf_bridge.config import ConsortiumSettings, OmiServiceSettings, OmiSettings
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.members import Member, members_with_role, organization_members
from dsf_bridge.dsf.vocabulary import ORGANIZATION_IDENTIFIER_SYSTEM
from dsf_bridge.engine.timers import TimerError, add_duration, parse_duration
from dsf_bridge.errors import BridgeError, RemoteError
from dsf_bridge.omi.aggregates import (
    Aggregate,
    ClassCounts,
    LaplaceCountObfuscator,
    NumericAggregate,
    SiteAnswer,
    SiteStatus,
    aggregates_from_json,
    effective_k,
    merge,
    quartile_minimum,
)
from dsf_bridge.omi.cohort import (
    Cohort,
    CohortError,
    CohortOutcome,
    check_cohort,
    run_cohort,
    select_series,
    site_aggregates,
)
from dsf_bridge.omi.consortium_report import (
    RESULT_IDENTIFIER_SYSTEM,
    check_aggregates,
    result_bundle,
    summary_outputs,
)
from dsf_bridge.omi.contract import (
    REFERENCE_CONTRACT,
    ContractError,
    InferenceContract,
    contract_of,
)
from dsf_bridge.omi.dicomweb import ArchiveUnavailableError
from dsf_bridge.omi.inference import (
    InferenceError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from dsf_bridge.omi.registry import DEVICE_IDENTIFIER_SYSTEM
from dsf_bridge.plugins.api import ProcessPlugin, resources_per_process
from dsf_bridge.plugins.inference import (
    catalogue_entry,
    dicomweb_archive,
    inference_client,
    omi_settings,
)
from dsf_bridge.plugins.pingpong import bpmn_dir, profiles_dir
from dsf_bridge.plugins.registry import (
    SERVICE_FHIR_CLIENT,
    SERVICE_LOCAL_ORGANIZATION,
    BpmnError,
    HandlerContext,
    HandlerRegistry,
    SendContext,
)

__all__ = [
    "CODESYSTEM_CONSORTIUM",
    "CODESYSTEM_CONSORTIUM_STATUS",
    "COORDINATOR_PROCESS",
    "DATA_SITE_PROCESS",
    "ConsortiumRequestError",
    "consortium_result",
    "handlers",
    "plugin",
    "site_states",
]

log = structlog.get_logger("dsf_bridge.plugins.consortium")

COORDINATOR_PROCESS = "dsf-bridgedev_consortiumInference"
DATA_SITE_PROCESS = "dsf-bridgedev_consortiumExecution"

CODESYSTEM_CONSORTIUM = "http://dsf-bridge.dev/fhir/CodeSystem/omi-consortium"
CODESYSTEM_CONSORTIUM_STATUS = "http://dsf-bridge.dev/fhir/CodeSystem/omi-consortium-status"
DCM = "http://dicom.nema.org/resources/ontology/DCM"

SERVICE = "service"
COHORT_MODALITY = "cohort-modality"
COHORT_BODY_PART = "cohort-body-part"
COHORT_DATE_FROM = "cohort-study-date-from"
COHORT_DATE_TO = "cohort-study-date-to"
COHORT_SERIES_DESCRIPTION = "cohort-series-description"
TARGET_ORGANIZATION = "target-organization"
TARGET_PARENT = "target-parent-organization"
TARGET_ROLE = "target-role"
MINIMUM_K = "minimum-k"
SITE_TIMEOUT = "site-timeout"
CONSORTIUM_STATUS = "consortium-status"
CONSORTIUM_AGGREGATES = "consortium-aggregates"
ERROR = "error"
CONSORTIUM_RESULT = "consortium-result"
SITES_DONE = "sites-done"
SITES_MISSING = "sites-missing"
SITE_STATUS = "site-status"

_START_INPUTS = frozenset(
    {
        SERVICE,
        COHORT_MODALITY,
        COHORT_BODY_PART,
        COHORT_DATE_FROM,
        COHORT_DATE_TO,
        COHORT_SERIES_DESCRIPTION,
        TARGET_ORGANIZATION,
        TARGET_PARENT,
        TARGET_ROLE,
        MINIMUM_K,
        SITE_TIMEOUT,
    }
)
_REQUEST_INPUTS = frozenset(
    {
        SERVICE,
        COHORT_MODALITY,
        COHORT_BODY_PART,
        COHORT_DATE_FROM,
        COHORT_DATE_TO,
        COHORT_SERIES_DESCRIPTION,
        MINIMUM_K,
    }
)

# The approval form's display item that shows the request (profiles/consortium/Questionnaire).
APPROVAL_REQUEST_ITEM = "request"

# BPMN error codes (errorCode variable) and what they become.
REQUEST_INVALID = "request-invalid"
REFUSED = "refused"
FAILED = "failed"

# A site's progress as the coordinator shows it, before its end state (SiteStatus).
SENT = "sent"

MAX_SITE_TIMEOUT = dt.timedelta(days=366)
# The smallest k a site may set ([omi.consortium] k): two studies' mean and sd are both values.
MIN_K = 3
# A site's aggregates are a few kilobytes; this bounds what one answer may hold.
MAX_ANSWER_CHARS = 1_000_000
MAX_SITES = 200
_ORGANIZATION = re.compile(r"^[A-Za-z0-9._\-]{1,200}$")


class ConsortiumRequestError(BridgeError):
    """The consortium request could not run at all; the start Task fails with this message."""


# -- reading Tasks and variables ---------------------------------------------------------------


def _inputs(task: Mapping[str, Any], code: str) -> list[object]:
    return [
        item.get("value")
        for item in task.get("inputs") or []
        if item.get("system") == CODESYSTEM_CONSORTIUM and item.get("code") == code
    ]


def _one(task: Mapping[str, Any], code: str, kind: type, *, required: bool = False) -> Any:
    values = _inputs(task, code)
    if len(values) > 1:
        raise BpmnError(REQUEST_INVALID, f"the Task has {len(values)} '{code}' inputs, one allowed")
    if not values or values[0] is None:
        if required:
            raise BpmnError(REQUEST_INVALID, f"the Task has no '{code}' input")
        return None
    value = values[0]
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise BpmnError(REQUEST_INVALID, f"input '{code}' has the wrong type")
    return value.strip() if isinstance(value, str) else value


def _unknown_inputs(task: Mapping[str, Any], known: frozenset[str]) -> None:
    """Every input in this process's code system must be one it knows: a cohort is only what
    the profile says (an added 'patient-id' input is refused, not ignored)."""
    for item in task.get("inputs") or []:
        if item.get("system") == CODESYSTEM_CONSORTIUM and item.get("code") not in known:
            raise BpmnError(
                REQUEST_INVALID, f"input '{item.get('code')}' is not part of this request"
            )


def _date(task: Mapping[str, Any], code: str) -> str | None:
    value = _one(task, code, str)
    if value is None:
        return None
    try:
        date.fromisoformat(value)
    except ValueError:
        raise BpmnError(REQUEST_INVALID, f"input '{code}' is not a date (YYYY-MM-DD)") from None
    return str(value)


def _cohort(task: Mapping[str, Any]) -> Cohort:
    """The cohort the Task's inputs describe, validated (a query, never an identifier)."""
    modalities = []
    for value in _inputs(task, COHORT_MODALITY):
        if not isinstance(value, Mapping) or value.get("system") != DCM or not value.get("code"):
            raise BpmnError(REQUEST_INVALID, f"input '{COHORT_MODALITY}' must be a Coding of {DCM}")
        modalities.append(str(value["code"]))
    if not modalities:
        raise BpmnError(REQUEST_INVALID, f"the Task has no '{COHORT_MODALITY}' input")
    try:
        return Cohort.create(
            modalities,
            body_part=_one(task, COHORT_BODY_PART, str),
            study_date_from=_date(task, COHORT_DATE_FROM),
            study_date_to=_date(task, COHORT_DATE_TO),
            series_description=_one(task, COHORT_SERIES_DESCRIPTION, str),
        )
    except CohortError as exc:
        raise BpmnError(REQUEST_INVALID, f"the cohort is not valid: {exc}") from exc


def _minimum_k(task: Mapping[str, Any]) -> int | None:
    value: int | None = _one(task, MINIMUM_K, int)
    if value is not None and not 1 <= value <= 1000:
        raise BpmnError(REQUEST_INVALID, f"input '{MINIMUM_K}' must be between 1 and 1000")
    return value


def _consortium(ctx: HandlerContext) -> ConsortiumSettings:
    return omi_settings(ctx).consortium


def _contract_for(settings: OmiSettings, service_id: str) -> InferenceContract | None:
    """The contract of ``service_id`` as this site knows it: its catalogue entry's, else a
    shipped contract of that name."""
    entry = catalogue_entry(settings, service_id)
    try:
        if entry is not None and entry.contract is not None:
            return contract_of(entry.contract)
        return contract_of(service_id)
    except ContractError:
        return None


def _site_contract(entry: OmiServiceSettings) -> InferenceContract:
    """The contract a data site runs a catalogue entry under (the reference one unless it
    names one), as the providing side of OMI inference does."""
    try:
        contract = contract_of(entry.contract or REFERENCE_CONTRACT)
    except ContractError as exc:  # checked at start-up; a file may have gone since
        raise BpmnError(REFUSED, f"service {entry.id} has no usable contract: {exc}") from exc
    assert contract is not None  # noqa: S101 - a name or table always gives a contract
    return contract


def _local_client(ctx: HandlerContext) -> FhirClient:
    return ctx.service(SERVICE_FHIR_CLIENT, FhirClient)


def _local_organization(ctx: HandlerContext) -> str | None:
    organization = ctx.services.get(SERVICE_LOCAL_ORGANIZATION)
    identifier = getattr(organization, "identifier", None)
    return identifier if isinstance(identifier, str) else None


def _duration(value: str, what: str) -> str:
    now = datetime.now(UTC)
    try:
        if add_duration(now, parse_duration(value)) - now > MAX_SITE_TIMEOUT:
            raise BpmnError(REQUEST_INVALID, f"{what} is longer than P366D: {value!r}")
    except TimerError:
        raise BpmnError(REQUEST_INVALID, f"{what} is not an ISO 8601 duration: {value!r}") from None
    return value


def _state_variable(key: str) -> str:
    return f"site_{key}"


def _record(ctx: HandlerContext, status: str, reason: str | None = None, **extra: object) -> None:
    """The state of the current target (its execution's correlation key) for the merge and the
    instance page."""
    target = ctx.get("target")
    if not isinstance(target, Mapping):
        raise BridgeError("the execution has no 'target' variable")
    key = str(target["correlationKey"])
    ctx.set(
        _state_variable(key),
        {"organization": target.get("organizationIdentifier"), "status": status, "reason": reason}
        | extra,
    )


# -- the coordinator ---------------------------------------------------------------------------

handlers = HandlerRegistry()
# A result counts only from the organization asked, with the key of that request.
handlers.replies_only_from_recipients("consortiumInferenceResult")

_PREFIX = "dsf_bridge.plugins.consortium."


@handlers.service(_PREFIX + "SelectSites")
async def select_sites(ctx: HandlerContext) -> None:
    """Check the start Task and choose the data sites, each with its own correlation key."""
    task = ctx.task()
    ctx.set("startTaskId", task.get("id"))
    _unknown_inputs(task, _START_INPUTS)
    settings = omi_settings(ctx)
    service = _one(task, SERVICE, str, required=True)
    contract = _contract_for(settings, service)
    if contract is None:
        raise BpmnError(
            REQUEST_INVALID,
            f"service {service!r} has no contract at this site: the merge needs its codes and "
            "units (a shipped contract's name, or [omi] catalogue with a contract)",
        )
    cohort = _cohort(task)
    try:
        check_cohort(cohort, contract)
    except CohortError as exc:
        raise BpmnError(REQUEST_INVALID, str(exc)) from exc
    minimum_k = _minimum_k(task)
    timeout = _one(task, SITE_TIMEOUT, str) or settings.consortium.site_timeout
    _duration(timeout, f"'{SITE_TIMEOUT}'")
    members, rejected = await _targets(ctx, task)
    if not members and not rejected:
        raise BpmnError(REQUEST_INVALID, "the request names no data site")
    entries = []
    sites = []
    for member in members:
        key = str(uuid4())
        entry: dict[str, object] = {
            "organizationIdentifier": member.organization,
            "correlationKey": key,
            "endpointIdentifier": member.endpoint_identifier,
            "endpointUrl": member.endpoint_address,
        }
        entries.append(entry)
        sites.append({"organizationIdentifier": member.organization, "correlationKey": key})
        ctx.set(
            _state_variable(key),
            {"organization": member.organization, "status": SENT, "reason": None},
        )
    for organization, reason in rejected:
        # Not sent at all: recorded at once, with the reason the allow list gives.
        key = str(uuid4())
        sites.append({"organizationIdentifier": organization, "correlationKey": key})
        ctx.set(
            _state_variable(key),
            {
                "organization": organization,
                "status": SiteStatus.FAILED.value,
                "reason": f"request not sent: {reason}",
            },
        )
    ctx.set("sites", sorted(sites, key=lambda site: str(site["organizationIdentifier"])))
    ctx.set("targets", {"entries": entries})
    ctx.set(
        "consortiumRequest",
        {"service": service, "cohort": cohort.to_json(), "minimumK": minimum_k},
    )
    ctx.set("siteTimeout", timeout)
    log.info(
        "consortium.sites_selected", service=service, sites=len(entries), cohort=cohort.describe()
    )


async def _targets(
    ctx: HandlerContext, task: Mapping[str, Any]
) -> tuple[list[Member], list[tuple[str, str]]]:
    """The data sites to send to, and those named that cannot be sent to, with the reason."""
    named = []
    for value in _inputs(task, TARGET_ORGANIZATION):
        if (
            not isinstance(value, Mapping)
            or value.get("system") != ORGANIZATION_IDENTIFIER_SYSTEM
            or not isinstance(value.get("value"), str)
            or not _ORGANIZATION.match(value["value"])
        ):
            raise BpmnError(
                REQUEST_INVALID,
                f"input '{TARGET_ORGANIZATION}' must be an Identifier of "
                f"{ORGANIZATION_IDENTIFIER_SYSTEM}",
            )
        named.append(str(value["value"]))
    parent = _one(task, TARGET_PARENT, Mapping)
    role = _one(task, TARGET_ROLE, Mapping)
    if (parent is None) != (role is None):
        raise BpmnError(
            REQUEST_INVALID, f"'{TARGET_PARENT}' and '{TARGET_ROLE}' go together, one is missing"
        )
    if named and parent is not None:
        raise BpmnError(
            REQUEST_INVALID,
            f"name the data sites either by '{TARGET_ORGANIZATION}' or by '{TARGET_PARENT}' "
            f"and '{TARGET_ROLE}', not both",
        )
    if len(set(named)) != len(named):
        raise BpmnError(REQUEST_INVALID, f"a '{TARGET_ORGANIZATION}' is named twice")
    client = _local_client(ctx)
    rejected: list[tuple[str, str]] = []
    try:
        if parent is not None and role is not None:
            if parent.get("system") != ORGANIZATION_IDENTIFIER_SYSTEM or not parent.get("value"):
                raise BpmnError(
                    REQUEST_INVALID, f"input '{TARGET_PARENT}' must be an organization Identifier"
                )
            if not role.get("system") or not role.get("code"):
                raise BpmnError(REQUEST_INVALID, f"input '{TARGET_ROLE}' must be a Coding")
            found = await members_with_role(
                client, str(parent["value"]), (str(role["system"]), str(role["code"]))
            )
            local = _local_organization(ctx)
            members = [member for member in found if member.organization != local]
            if not members:
                raise BpmnError(
                    REQUEST_INVALID,
                    f"no other organization has role {role['code']} under {parent['value']} in "
                    "the allow list",
                )
        else:
            members, rejected = await organization_members(client, named)
    except BridgeError as exc:
        if exc.retryable:
            raise
        raise BpmnError(REQUEST_INVALID, str(exc)) from exc
    if len(members) + len(rejected) > MAX_SITES:
        raise BpmnError(
            REQUEST_INVALID,
            f"{len(members) + len(rejected)} data sites, more than the {MAX_SITES} one request "
            "asks",
        )
    return members, rejected


@handlers.listener(_PREFIX + "SetCorrelationKey")
def set_correlation_key(ctx: HandlerContext) -> None:
    """The site's result correlates by its own key (kept on this execution)."""
    target = ctx.get("target")
    if not isinstance(target, Mapping):
        raise BridgeError("the execution has no 'target' variable")
    ctx.set_local("correlationKey", target["correlationKey"])


@handlers.message_send(_PREFIX + "SendConsortiumRequest")
def send_consortium_request(ctx: SendContext) -> None:
    """The service, the cohort and the smallest group this coordinator accepts."""
    ctx.throw_on_failure(FAILED, forbidden=FAILED)
    request = ctx.get("consortiumRequest")
    if not isinstance(request, Mapping):
        raise BridgeError("the instance has no 'consortiumRequest' variable")
    ctx.add_input(CODESYSTEM_CONSORTIUM, SERVICE, str(request["service"]))
    _add_cohort(ctx, Cohort.from_json(request["cohort"]))
    if request.get("minimumK") is not None:
        ctx.add_input(
            CODESYSTEM_CONSORTIUM, MINIMUM_K, {"valuePositiveInt": int(request["minimumK"])}
        )


def _add_cohort(ctx: SendContext, cohort: Cohort) -> None:
    data = cohort.to_json()
    for modality in data["modalities"]:
        ctx.add_input(CODESYSTEM_CONSORTIUM, COHORT_MODALITY, {"system": DCM, "code": modality})
    if data.get("body_part"):
        ctx.add_input(CODESYSTEM_CONSORTIUM, COHORT_BODY_PART, str(data["body_part"]))
    for key, code in (("study_date_from", COHORT_DATE_FROM), ("study_date_to", COHORT_DATE_TO)):
        if data.get(key):
            ctx.add_input(CODESYSTEM_CONSORTIUM, code, {"valueDate": str(data[key])})
    if data.get("series_description"):
        ctx.add_input(
            CODESYSTEM_CONSORTIUM, COHORT_SERIES_DESCRIPTION, str(data["series_description"])
        )


@handlers.service(_PREFIX + "RecordNotSent")
def record_not_sent(ctx: HandlerContext) -> None:
    reason = str(ctx.get("errorMessage") or "the request could not be delivered")
    _record(ctx, SiteStatus.FAILED.value, f"request not delivered: {reason}")
    log.warning("consortium.site_not_sent", organization=_target_name(ctx), reason=reason)


@handlers.service(_PREFIX + "RecordTimeout")
def record_timeout(ctx: HandlerContext) -> None:
    _record(ctx, SiteStatus.TIMED_OUT.value, f"no answer within {ctx.get('siteTimeout')}")
    log.warning("consortium.site_timed_out", organization=_target_name(ctx))


def _target_name(ctx: HandlerContext) -> object:
    target = ctx.get("target")
    return target.get("organizationIdentifier") if isinstance(target, Mapping) else None


@handlers.service(_PREFIX + "RecordResult")
def record_result(ctx: HandlerContext) -> None:
    """The site's answer, read strictly: a broken one makes the site ``failed`` and nothing of
    it is kept."""
    result = ctx.task()
    try:
        status, reason, aggregates = _read_answer(result, _contract(ctx), _requested_k(ctx))
    except _BrokenAnswerError as exc:
        # It may quote what the site sent (a measurement's name): bounded like a site's reason.
        reason = f"the site's answer was refused: {exc}"[:500]
        _record(ctx, SiteStatus.FAILED.value, reason)
        log.warning("consortium.answer_refused", organization=_target_name(ctx), reason=reason)
        return
    _record(
        ctx,
        status.value,
        reason,
        aggregates=[aggregate.to_json() for aggregate in aggregates],
    )
    log.info("consortium.site_answered", organization=_target_name(ctx), status=status.value)


class _BrokenAnswerError(Exception):
    pass


def _read_answer(
    result: Mapping[str, Any], contract: InferenceContract, minimum_k: int
) -> tuple[SiteStatus, str | None, tuple[Aggregate, ...]]:
    statuses = _inputs(result, CONSORTIUM_STATUS)
    if len(statuses) != 1 or not isinstance(statuses[0], Mapping):
        raise _BrokenAnswerError(f"it has no single '{CONSORTIUM_STATUS}'")
    coding = statuses[0]
    answered = {SiteStatus.DONE, SiteStatus.SUPPRESSED, SiteStatus.REFUSED, SiteStatus.FAILED}
    try:
        status = SiteStatus(str(coding.get("code")))
    except ValueError:
        status = None
    if coding.get("system") != CODESYSTEM_CONSORTIUM_STATUS or status not in answered:
        raise _BrokenAnswerError(
            f"'{CONSORTIUM_STATUS}' {coding.get('code')!r} is not a site's answer"
        )
    assert status is not None  # noqa: S101 - checked just above
    raw = _inputs(result, CONSORTIUM_AGGREGATES)
    errors = _inputs(result, ERROR)
    if status in (SiteStatus.REFUSED, SiteStatus.FAILED):
        if raw:
            raise _BrokenAnswerError(f"a {status.value} answer carries aggregates")
        reason = errors[0] if errors and isinstance(errors[0], str) else None
        return status, (reason or "no reason given")[:500], ()
    if len(raw) != 1 or not isinstance(raw[0], str):
        raise _BrokenAnswerError(f"a {status.value} answer has no single '{CONSORTIUM_AGGREGATES}'")
    if len(raw[0]) > MAX_ANSWER_CHARS:
        raise _BrokenAnswerError(
            f"'{CONSORTIUM_AGGREGATES}' has more than {MAX_ANSWER_CHARS} characters"
        )
    try:
        aggregates = aggregates_from_json(json.loads(raw[0]))
        check_aggregates(aggregates, contract)
    except RecursionError:
        # Raised, it would fail the whole request instead of this site's part.
        raise _BrokenAnswerError(f"'{CONSORTIUM_AGGREGATES}' is nested too deeply") from None
    except (ValueError, TypeError) as exc:
        raise _BrokenAnswerError(str(exc)) from exc
    if status is SiteStatus.SUPPRESSED and any(not a.suppressed for a in aggregates):
        raise _BrokenAnswerError("a suppressed answer shows figures")
    _check_k(aggregates, minimum_k)
    return status, None, aggregates


def _check_k(aggregates: tuple[Aggregate, ...], minimum_k: int) -> None:
    """A figure from fewer studies than the request allowed cannot have been under the k rule
    (an obfuscated count may be anything and is not checked)."""
    for aggregate in aggregates:
        if aggregate.suppressed or aggregate.obfuscated:
            continue
        counts = [aggregate.n] if isinstance(aggregate, NumericAggregate) else []
        if isinstance(aggregate, ClassCounts):
            counts = [aggregate.n, *(c for c in aggregate.counts.values() if c is not None)]
        small = [count for count in counts if count is not None and count < minimum_k]
        if small:
            # The reason is stored: it names no figure of the answer.
            raise _BrokenAnswerError(
                f"{aggregate.measurement!r} shows a figure from fewer than {minimum_k} studies: "
                "the site's k rule is broken"
            )
        if (
            isinstance(aggregate, NumericAggregate)
            and aggregate.median is not None
            and aggregate.n is not None
            and aggregate.n < quartile_minimum(minimum_k)
        ):
            raise _BrokenAnswerError(
                f"{aggregate.measurement!r} shows quartiles from fewer than "
                f"{quartile_minimum(minimum_k)} studies: the site's rule for quartiles is broken"
            )
        if isinstance(aggregate, ClassCounts) and aggregate.n is not None:
            # The total minus the shown classes is the hidden classes' sum: a figure too.
            hidden = aggregate.n - sum(c for c in aggregate.counts.values() if c is not None)
            if None in aggregate.counts.values() and hidden < minimum_k:
                raise _BrokenAnswerError(
                    f"the hidden classes of {aggregate.measurement!r} hold fewer than "
                    f"{minimum_k} studies together (its total minus the shown classes): the "
                    "site's complementary suppression is broken"
                )


def _requested_k(ctx: HandlerContext) -> int:
    """The smallest group any site may report on: what the request asked, at least 3 (the
    smallest k a site may set: n = 2 with its mean and sd would be both values)."""
    request = ctx.get("consortiumRequest")
    asked = request.get("minimumK") if isinstance(request, Mapping) else None
    return max(MIN_K, asked if isinstance(asked, int) else MIN_K)


def _contract(ctx: HandlerContext) -> InferenceContract:
    request = ctx.get("consortiumRequest")
    service = str(request.get("service")) if isinstance(request, Mapping) else ""
    contract = _contract_for(omi_settings(ctx), service)
    if contract is None:
        raise BridgeError(f"service {service!r} lost its contract at this site")
    return contract


def site_states(variables: Mapping[str, object]) -> list[dict[str, Any]]:
    """Every data site of a coordinator instance with its state and reason, by organization
    (for the instance page, ``instances show`` and the demo); no aggregates."""
    sites = variables.get("sites")
    states = []
    for target in sites if isinstance(sites, list) else []:
        state = variables.get(_state_variable(str(target.get("correlationKey"))))
        state = state if isinstance(state, Mapping) else {}
        states.append(
            {
                "organization": target.get("organizationIdentifier"),
                "status": state.get("status") or SENT,
                "reason": state.get("reason"),
            }
        )
    return sorted(states, key=lambda state: str(state["organization"]))


def _progress(process_key: str, variables: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The instance page's and ``instances show``'s rows: a coordinator's sites."""
    return site_states(variables) if process_key == COORDINATOR_PROCESS else None


def _answers(variables: Mapping[str, object]) -> list[SiteAnswer]:
    sites = variables.get("sites")
    answers = []
    for target in sites if isinstance(sites, list) else []:
        state = variables.get(_state_variable(str(target.get("correlationKey"))))
        state = state if isinstance(state, Mapping) else {}
        status = str(state.get("status") or SiteStatus.TIMED_OUT.value)
        if status == SENT:  # cannot happen after the loop; counted as not answered
            status = SiteStatus.TIMED_OUT.value
        raw = state.get("aggregates")
        answers.append(
            SiteAnswer(
                organization=str(target.get("organizationIdentifier")),
                status=SiteStatus(status),
                reason=state.get("reason") if isinstance(state.get("reason"), str) else None,
                aggregates=aggregates_from_json(raw) if isinstance(raw, list) else (),
            )
        )
    return sorted(answers, key=lambda answer: answer.organization)


@handlers.service(_PREFIX + "MergeResults")
async def merge_results(ctx: HandlerContext) -> None:
    """Per-site and pooled figures, stored as a Bundle readable by this site only; the start
    Task gets a reference to it and every site's state."""
    answers = _answers({**ctx.variables, **ctx.updates})
    result = merge(answers)
    contract = _contract(ctx)
    bundle = result_bundle(result, contract, issued=datetime.now(UTC), request_id=ctx.business_key)
    # Created only if none has this instance's key: the handler runs at least once, and a
    # crash after this POST and before the step's commit repeats it.
    created = await _local_client(ctx).create(
        bundle, if_none_exist=f"identifier={RESULT_IDENTIFIER_SYSTEM}|{ctx.business_key}"
    )
    if created.id is None:
        raise RemoteError("the local FHIR server answered the result Bundle without an id")
    start_task = str(ctx.get("startTaskId") or "")
    counts = summary_outputs(result)
    done = counts[SITES_DONE]
    outputs: list[dict[str, Any]] = [
        _output(CONSORTIUM_RESULT, {"valueReference": {"reference": f"Bundle/{created.id}"}}),
        _output(SITES_DONE, {"valueUnsignedInt": done}),
        _output(SITES_MISSING, {"valueUnsignedInt": counts[SITES_MISSING]}),
    ]
    for answer in answers:
        text = f"{answer.organization}: {answer.status.value}"
        if answer.reason:
            text += f" ({answer.reason})"
        outputs.append(_output(SITE_STATUS, {"valueString": text[:1000]}))
    if start_task:
        for output in outputs:
            ctx.add_task_output(start_task, output)
    ctx.set("consortiumResult", result.to_json())
    ctx.set("resultBundle", f"Bundle/{created.id}")
    log.info("consortium.merged", sites=len(answers), sites_done=done)


def _output(code: str, value: Mapping[str, Any]) -> dict[str, Any]:
    return {"type": {"coding": [{"system": CODESYSTEM_CONSORTIUM, "code": code}]}, **value}


@handlers.service(_PREFIX + "ConsortiumFailed")
def consortium_failed(ctx: HandlerContext) -> None:
    """The request itself could not run: fail the instance (and so the start Task)."""
    code = str(ctx.get("errorCode") or REQUEST_INVALID)
    message = str(ctx.get("errorMessage") or "no detail")
    log.error("consortium.request_failed", error_code=code, reason=message)
    raise ConsortiumRequestError(f"{code}: {message}")


def consortium_result(variables: Mapping[str, object]) -> dict[str, Any] | None:
    """The merged result JSON of a finished coordinator instance (``None`` before the merge)."""
    value = variables.get("consortiumResult")
    return dict(value) if isinstance(value, Mapping) else None


# -- the data site -----------------------------------------------------------------------------


@handlers.service(_PREFIX + "CheckConsortiumRequest")
def check_consortium_request(ctx: HandlerContext) -> None:
    """Whoever asked gets the answer; the site must take such requests and run the service."""
    task = ctx.task()
    requester = task.get("requester")
    if not isinstance(requester, str) or not requester:
        raise BridgeError("the consortium request names no requester organization")
    keys = [
        item.get("value")
        for item in task.get("inputs") or []
        if item.get("code") == "correlation-key" and isinstance(item.get("value"), str)
    ]
    if len(keys) != 1:
        raise BridgeError("the consortium request has no single correlation-key")
    ctx.set("target", {"organizationIdentifier": requester, "correlationKey": keys[0]})
    ctx.set("requester", requester)
    settings = omi_settings(ctx)
    consortium = settings.consortium
    ctx.set("approvalNeeded", consortium.approval)
    ctx.set("approvalTimeout", consortium.approval_timeout)
    _unknown_inputs(task, _REQUEST_INPUTS)
    if consortium.dicomweb_url is None:
        raise BpmnError(
            REFUSED, "this site takes no consortium requests ([omi.consortium] dicomweb_url)"
        )
    service = _one(task, SERVICE, str, required=True)
    entry = catalogue_entry(settings, service)
    if entry is None or not entry.inference_url:
        raise BpmnError(REFUSED, f"service {service} is not run at this site")
    contract = _site_contract(entry)
    cohort = _cohort(task)
    try:
        check_cohort(cohort, contract)
    except CohortError as exc:
        raise BpmnError(REFUSED, str(exc)) from exc
    k = effective_k(consortium.k, _minimum_k(task))
    if consortium.obfuscate and k > consortium.k:
        # A cell shows iff n >= k: a coordinator asking k = 6, 7, 8 ... would find the exact
        # count the obfuscation hides. A stricter k goes up to the obfuscation's tens.
        k = -(-k // 10) * 10
    ctx.set("serviceId", service)
    ctx.set("cohort", cohort.to_json())
    ctx.set("k", k)
    log.info(
        "consortium.request_checked",
        requester=requester,
        service=service,
        k=k,
        cohort=cohort.describe(),
    )


@handlers.task_listener(_PREFIX + "DescribeRequest")
def describe_request(ctx: HandlerContext) -> None:
    """The approver sees the request in the form (the ``request`` item) and in the log."""
    cohort = ctx.get("cohort")
    described = Cohort.from_json(cohort).describe() if isinstance(cohort, Mapping) else "?"
    requester, service, k = ctx.get("requester"), ctx.get("serviceId"), ctx.get("k")
    ctx.set_questionnaire_item_text(
        APPROVAL_REQUEST_ITEM,
        f"{requester} asks this site to run the service {service} on every study of this "
        f"site's archive in the cohort {described}, on this site's own inference server, and to "
        f"send back aggregates only (count, mean, standard deviation, median and quartiles per "
        f"measurement; class counts), none computed from fewer than {k} studies. No image, "
        "study or patient identifier leaves the site.",
    )
    log.info(
        "consortium.approval_requested",
        requester=requester,
        service=service,
        cohort=described,
        k=k,
    )


@handlers.service(_PREFIX + "CheckApproval")
def check_approval(ctx: HandlerContext) -> None:
    if ctx.get("approve") is not True:
        raise BpmnError(REFUSED, "not approved by this site")


@handlers.service(_PREFIX + "NotApprovedInTime")
def not_approved_in_time(ctx: HandlerContext) -> None:
    ctx.set("consortiumStatus", SiteStatus.REFUSED.value)
    ctx.set("errorMessage", f"not approved within {ctx.get('approvalTimeout')}")


@handlers.service(_PREFIX + "RecordRefusal")
def record_refusal(ctx: HandlerContext) -> None:
    ctx.set("consortiumStatus", SiteStatus.REFUSED.value)
    log.warning("consortium.request_refused", reason=ctx.get("errorMessage"))


@handlers.service(_PREFIX + "RecordFailure")
def record_failure(ctx: HandlerContext) -> None:
    ctx.set("consortiumStatus", SiteStatus.FAILED.value)
    log.warning("consortium.request_failed_here", reason=ctx.get("errorMessage"))


# One obfuscator per setting for as long as the bridge runs: the same true count gets the same
# published count, so asking again does not average the noise away (docs/consortium.md).
_OBFUSCATORS: dict[tuple[float, float], LaplaceCountObfuscator] = {}


def _obfuscator(settings: ConsortiumSettings) -> LaplaceCountObfuscator | None:
    if not settings.obfuscate:
        return None
    key = (settings.sensitivity, settings.epsilon)
    if key not in _OBFUSCATORS:
        _OBFUSCATORS[key] = LaplaceCountObfuscator(
            sensitivity=settings.sensitivity, epsilon=settings.epsilon
        )
    return _OBFUSCATORS[key]


@handlers.service(_PREFIX + "RunCohort")
async def run_cohort_step(ctx: HandlerContext) -> None:
    """Search the cohort, run the model on each study, keep only aggregates."""
    settings = omi_settings(ctx)
    consortium = settings.consortium
    entry = catalogue_entry(settings, str(ctx.get("serviceId") or ""))
    if entry is None or entry.inference_url is None or consortium.dicomweb_url is None:
        raise BpmnError(REFUSED, "the service is no longer run at this site")
    contract = _site_contract(entry)
    cohort_json = ctx.get("cohort")
    if not isinstance(cohort_json, Mapping):
        raise BridgeError("the instance has no 'cohort' variable")
    cohort = Cohort.from_json(cohort_json)
    k = int(str(ctx.get("k")))
    archive = dicomweb_archive(ctx, consortium.dicomweb_url)
    try:
        try:
            selected = await select_series(archive, cohort, max_studies=consortium.max_studies)
        except CohortError as exc:
            raise BpmnError(REFUSED, str(exc)) from exc
        if len(selected) < k:
            # Too small to say anything: the model does not run, every cell is suppressed.
            outcome = CohortOutcome(
                matched=len(selected), inferred=0, values={}, labels={}, absent={}, failures={}
            )
        else:
            model = entry.model_name or contract.model.name
            async with inference_client(ctx, entry) as client:
                outcome = await run_cohort(
                    archive,
                    client,
                    selected,
                    contract=contract,
                    model=model,
                    model_version=entry.model_version,
                    device={
                        "type": "Device",
                        "identifier": {"system": DEVICE_IDENTIFIER_SYSTEM, "value": model},
                    },
                    max_slices=entry.max_slices,
                    request_id=ctx.business_key,
                )
    # The coordinator gets the bridge's own sentence; what the server or archive said stays
    # out of the answer (its text is another system's and could quote anything).
    except ArchiveUnavailableError as exc:
        _log_failure(exc)
        raise BpmnError(FAILED, "this site's archive did not answer") from exc
    except InferenceError as exc:
        raise BpmnError(FAILED, _inference_failure(exc)) from exc
    except RemoteError as exc:
        if exc.retryable:
            raise
        _log_failure(exc)
        raise BpmnError(FAILED, "this site's archive answered something unusable") from exc
    finally:
        archive.close()
    if outcome.inferred == 0 and outcome.failures:
        # The model ran on a cohort of at least k and gave nothing: 'suppressed' would say the
        # cohort was small. The failure kinds say why; how many failed is a count, not sent.
        log.warning(
            "consortium.cohort_failed",
            service=entry.id,
            matched=outcome.matched,
            failures=outcome.failures,
        )
        raise BpmnError(
            FAILED,
            "the model gave no result for any study of the cohort "
            f"({', '.join(sorted(outcome.failures))})",
        )
    aggregates = site_aggregates(outcome, contract, k=k, obfuscator=_obfuscator(consortium))
    shown = any(not aggregate.suppressed for aggregate in aggregates)
    status = SiteStatus.DONE if shown else SiteStatus.SUPPRESSED
    ctx.set("consortiumStatus", status.value)
    ctx.set("consortiumAggregates", [aggregate.to_json() for aggregate in aggregates])
    log.info(
        "consortium.cohort_done",
        service=entry.id,
        matched=outcome.matched,
        inferred=outcome.inferred,
        failed=sum(outcome.failures.values()),
        status=status.value,
    )


def _log_failure(exc: BaseException) -> None:
    """The type and HTTP status of an archive's failure, for this site's log; not its text."""
    log.warning(
        "consortium.cohort_failed",
        error_type=type(exc).__name__,
        status=getattr(exc, "status", None),
    )


def _inference_failure(exc: InferenceError) -> str:
    """Why the inference server failed, in the bridge's own words: the reason goes to another
    site, so neither the server's text (which may quote what it was sent) nor this site's
    addresses (both in ``str(exc)``) are in it. Nor in this site's log: the server's text is
    not ours to vouch for."""
    log.warning("consortium.inference_failed", error_type=type(exc).__name__, status=exc.status)
    if isinstance(exc, ModelNotFoundError):
        return "this site's inference server does not serve the model"
    if isinstance(exc, ModelNotReadyError):
        return "the model is not ready at this site's inference server"
    if exc.status is not None:
        return f"this site's inference server failed (HTTP {exc.status})"
    return "this site's inference server did not answer usably"


@handlers.message_send(_PREFIX + "SendConsortiumResult")
def send_consortium_result(ctx: SendContext) -> None:
    status = str(ctx.get("consortiumStatus") or SiteStatus.FAILED.value)
    ctx.add_input(
        CODESYSTEM_CONSORTIUM,
        CONSORTIUM_STATUS,
        {"system": CODESYSTEM_CONSORTIUM_STATUS, "code": status},
    )
    if status in (SiteStatus.DONE.value, SiteStatus.SUPPRESSED.value):
        aggregates = ctx.get("consortiumAggregates")
        ctx.add_input(
            CODESYSTEM_CONSORTIUM,
            CONSORTIUM_AGGREGATES,
            json.dumps(aggregates, separators=(",", ":"), allow_nan=False),
        )
    else:
        ctx.add_input(CODESYSTEM_CONSORTIUM, ERROR, str(ctx.get("errorMessage") or status)[:500])


# -- the plugin --------------------------------------------------------------------------------


def _plugin() -> ProcessPlugin:
    return ProcessPlugin(
        name="dsf-bridge-omi-consortium",
        version="1.0.0.0",
        release_date=date(2026, 11, 30),
        bpmn_files=(
            bpmn_dir() / "consortium-inference.bpmn",
            bpmn_dir() / "consortium-execution.bpmn",
        ),
        fhir_resources=resources_per_process(
            profiles_dir().parent / "consortium",
            {
                COORDINATOR_PROCESS: "consortium-inference.json",
                DATA_SITE_PROCESS: "consortium-execution.json",
            },
        ),
        handlers=handlers,
        progress=_progress,
    )


plugin = _plugin()
