"""The DSF ping and pong processes as a dsf-bridge plugin, wire-compatible with the Java
``dsf-process-ping-pong`` plugin (``http://dsf.dev/bpe/Process/ping|1.0``, ``.../pong|1.0`` and
``.../pingAutostart|1.0``).

A local ``startPing`` Task starts ``dsfdev_ping``: it selects its targets (every active Endpoint
of the allow list but this site's own, or those the Task's ``target-endpoints`` search names),
sends each a ``ping`` Task that names this site's Endpoint, and waits for each ``pong`` until a
timer fires (20 s unless the site configures :data:`SERVICE_PONG_TIMEOUT`). The outcome per
target (``pong-received``, ``pong-missing``, ``not-reachable``, ``not-allowed``) becomes a
``ping-status`` output of the start Task, as the Java plugin writes it. A ``ping`` Task starts
``dsfdev_pong``, which answers the Endpoint the ping names and records ``pong-status`` on the
ping Task.

A local ``startPingAutostart`` Task starts ``dsfdev_pingAutostart``: it stops any older autostart
instance (signal ``stop_dsfdev_pingAutostart_1.0``), then sends this site a ``startPing`` Task
(with the start Task's ``target-endpoints``, if any) every ``timer-interval`` (ISO 8601, ``PT24H``
unless the start Task names another, at least :data:`MIN_TIMER_INTERVAL`), until a local
``stopPingAutostart`` Task throws the signal.

The models (``bpmn/ping.bpmn``, ``bpmn/pong.bpmn``, ``bpmn/ping-autostart.bpmn``) and FHIR
resources (``profiles/pingpong``) are ours; process ids, message and signal names, canonical
URLs, profiles, codes and the process authorization are the protocol and equal the Java
plugin's.

Handlers reach the allow list and the start Task through a :class:`PingPongSite`: the bridge's
runtime provides the local FHIR client and organization, from which :class:`FhirPingPongSite`
is made; tests may provide any other site under :data:`SERVICE_SITE`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl, urlsplit

import structlog

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.organization import LocalOrganization
from dsf_bridge.dsf.vocabulary import (
    BPMN_MESSAGE_SYSTEM,
    ENDPOINT_IDENTIFIER_SYSTEM,
    ORGANIZATION_IDENTIFIER_SYSTEM,
)
from dsf_bridge.engine.timers import TimerError, parse_duration
from dsf_bridge.errors import BridgeError, ProcessModelError
from dsf_bridge.plugins.api import ProcessPlugin, resources_per_process
from dsf_bridge.plugins.registry import (
    SERVICE_FHIR_CLIENT,
    SERVICE_LOCAL_ORGANIZATION,
    BpmnError,
    HandlerContext,
    HandlerRegistry,
    SendContext,
)

__all__ = [
    "MIN_TIMER_INTERVAL",
    "PING_AUTOSTART_PROCESS",
    "PING_PROCESS",
    "PONG_PROCESS",
    "SERVICE_PONG_TIMEOUT",
    "SERVICE_SITE",
    "FhirPingPongSite",
    "PingPongSite",
    "PongNotDeliveredError",
    "SiteEndpoint",
    "TimerIntervalError",
    "bpmn_dir",
    "handlers",
    "plugin",
    "profiles_dir",
    "status_output",
]

log = structlog.get_logger("dsf_bridge.plugins.pingpong")

PING_PROCESS = "dsfdev_ping"
PONG_PROCESS = "dsfdev_pong"
PING_AUTOSTART_PROCESS = "dsfdev_pingAutostart"

#: Service name of a :class:`PingPongSite` that replaces the FHIR-backed one (tests).
SERVICE_SITE = "pingpong.site"
#: Service name of the ISO 8601 duration a ping waits for each pong (default ``PT20S``).
SERVICE_PONG_TIMEOUT = "pingpong.pong_timeout"
DEFAULT_PONG_TIMEOUT = "PT20S"

CODESYSTEM_PING = "http://dsf.dev/fhir/CodeSystem/ping"
CODESYSTEM_PING_STATUS = "http://dsf.dev/fhir/CodeSystem/ping-status"
EXTENSION_PING_STATUS = "http://dsf.dev/fhir/StructureDefinition/extension-ping-status"
PING_STATUS = "ping-status"
PONG_STATUS = "pong-status"
ENDPOINT_IDENTIFIER = "endpoint-identifier"
TARGET_ENDPOINTS = "target-endpoints"
TIMER_INTERVAL = "timer-interval"
DEFAULT_TIMER_INTERVAL = "PT24H"
#: The shortest ``timer-interval`` a ``startPingAutostart`` Task may ask for. DSF's plugin has
#: none (its profile only demands an ISO 8601 duration), so ``PT0.001S`` would send this site a
#: ``startPing`` Task, and every target a ``ping``, a thousand times a second. Ten seconds still
#: serves a test network; production sites ping hourly or daily.
MIN_TIMER_INTERVAL = timedelta(seconds=10)

NOT_ALLOWED = "not-allowed"
NOT_REACHABLE = "not-reachable"
PONG_MISSING = "pong-missing"
PONG_RECEIVED = "pong-received"
PONG_SEND = "pong-send"

# The resource types a target-endpoints search may name (as the Java plugin allows): their
# results, matched or included, are searched for Endpoints.
_SEARCHABLE = re.compile(
    r"^(Endpoint|HealthcareService|ImagingStudy|InsurancePlan|Location|Organization|"
    r"OrganizationAffiliation|PractitionerRole)$"
)


class PongNotDeliveredError(BridgeError):
    """The pong could not be posted to the pinging site; the ping Task fails with this."""


class TimerIntervalError(BridgeError):
    """The ``timer-interval`` of a ``startPingAutostart`` Task is not a positive ISO 8601
    duration, or is shorter than :data:`MIN_TIMER_INTERVAL`; the autostart instance fails and
    its start Task with it."""


# -- where the plugin's files are -------------------------------------------------------------


def _data_dir(name: str) -> Path:
    """``bpmn/`` or ``profiles/``: inside the wheel, or in the source checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_data" / name, package.parent / name):
        if candidate.is_dir():
            return candidate
    raise ProcessModelError(f"the {name} folder is missing from this installation")


def bpmn_dir() -> Path:
    return _data_dir("bpmn")


def profiles_dir() -> Path:
    return _data_dir("profiles") / "pingpong"


# -- the site the handlers work against -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SiteEndpoint:
    """An Endpoint of the allow list with the identifier of the organization managing it."""

    organization: str
    identifier: str
    address: str


class PingPongSite(Protocol):
    """What the ping and pong handlers need from the local DSF FHIR server."""

    async def local_endpoint(self) -> SiteEndpoint:
        """This site's own Endpoint (its identifier goes into every ping)."""
        ...

    async def ping_targets(self, search: str | None) -> list[SiteEndpoint]:
        """Active Endpoints of active remote organizations: all, or those ``search`` (a
        relative FHIR search URL such as ``Endpoint?identifier=...``) finds."""
        ...

    async def endpoint_address(self, identifier: str) -> str | None:
        """The address of the active Endpoint ``identifier``, or None when there is none."""
        ...


def _identifier(resource: Mapping[str, Any], system: str) -> str | None:
    for identifier in resource.get("identifier") or []:
        if identifier.get("system") == system and identifier.get("value"):
            return str(identifier["value"])
    return None


class FhirPingPongSite:
    """:class:`PingPongSite` over the local DSF FHIR server, which holds the allow list."""

    def __init__(self, client: FhirClient, organization: LocalOrganization) -> None:
        self.client = client
        self.organization = organization

    async def local_endpoint(self) -> SiteEndpoint:
        endpoint = self.organization.endpoint
        identifier = _identifier(endpoint, ENDPOINT_IDENTIFIER_SYSTEM)
        if identifier is None:
            raise BridgeError(
                f"this site's Endpoint {endpoint.get('id')} has no identifier with system "
                f"{ENDPOINT_IDENTIFIER_SYSTEM}; fix the allow list"
            )
        address = str(endpoint.get("address") or "")
        return SiteEndpoint(self.organization.identifier, identifier, address)

    async def ping_targets(self, search: str | None) -> list[SiteEndpoint]:
        if search is None:
            endpoints = await self.client.search(
                "Endpoint", [("status", "active"), ("identifier", f"{ENDPOINT_IDENTIFIER_SYSTEM}|")]
            )
        else:
            endpoints = await self._search_endpoints(search)
        organizations = await self.client.search(
            "Organization",
            [("active", "true"), ("identifier", f"{ORGANIZATION_IDENTIFIER_SYSTEM}|")],
        )
        remote = {
            str(o.get("id")): value
            for o in organizations
            if (value := _identifier(o, ORGANIZATION_IDENTIFIER_SYSTEM)) is not None
            and value != self.organization.identifier
        }
        local_address = str(self.organization.endpoint.get("address") or "").rstrip("/")
        targets: dict[str, SiteEndpoint] = {}
        for endpoint in endpoints:
            address = str(endpoint.get("address") or "").rstrip("/")
            identifier = _identifier(endpoint, ENDPOINT_IDENTIFIER_SYSTEM)
            if endpoint.get("status") != "active" or not address or identifier is None:
                continue
            if address == local_address:
                continue
            reference = str((endpoint.get("managingOrganization") or {}).get("reference") or "")
            organization = remote.get(reference.rstrip("/").rsplit("/", 1)[-1])
            if organization is None:
                continue  # managed by this site, or by an organization no longer active
            targets[identifier] = SiteEndpoint(organization, identifier, address)
        return list(targets.values())

    async def _search_endpoints(self, search: str) -> list[dict[str, Any]]:
        parts = urlsplit(search)
        resource_type = parts.path.rstrip("/").rsplit("/", 1)[-1]
        if not _SEARCHABLE.match(resource_type):
            log.warning("ping.targets_search_refused", resource_type=resource_type)
            return []
        params = parse_qsl(parts.query, keep_blank_values=True)
        found = await self.client.search(resource_type, params, include_mode=True)
        return [r for r in found if r.get("resourceType") == "Endpoint"]

    async def endpoint_address(self, identifier: str) -> str | None:
        found = await self.client.search(
            "Endpoint",
            [("identifier", f"{ENDPOINT_IDENTIFIER_SYSTEM}|{identifier}"), ("status", "active")],
        )
        if not found:
            return None
        return str(found[0].get("address") or "") or None


def _site(ctx: HandlerContext) -> PingPongSite:
    site = ctx.services.get(SERVICE_SITE)
    if site is not None:
        return cast(PingPongSite, site)
    return FhirPingPongSite(
        ctx.service(SERVICE_FHIR_CLIENT, FhirClient),
        ctx.service(SERVICE_LOCAL_ORGANIZATION, LocalOrganization),
    )


# -- values as the Java plugin writes them ----------------------------------------------------


def status_output(
    code: str, target: Mapping[str, object], status: str, error: str | None = None
) -> dict[str, Any]:
    """A ``ping-status`` or ``pong-status`` Task output for ``target`` (extension-ping-status:
    correlation key, organization and endpoint identifiers, optional error message)."""
    extension: list[dict[str, Any]] = [
        {"url": "correlation-key", "valueString": str(target["correlationKey"])},
        {
            "url": "organization-identifier",
            "valueIdentifier": {
                "system": ORGANIZATION_IDENTIFIER_SYSTEM,
                "value": str(target["organizationIdentifier"]),
            },
        },
        {
            "url": "endpoint-identifier",
            "valueIdentifier": {
                "system": ENDPOINT_IDENTIFIER_SYSTEM,
                "value": str(target["endpointIdentifier"]),
            },
        },
    ]
    if error is not None:
        extension.append({"url": "error-message", "valueString": error})
    return {
        "extension": [{"url": EXTENSION_PING_STATUS, "extension": extension}],
        "type": {"coding": [{"system": CODESYSTEM_PING, "code": code}]},
        "valueCoding": {"system": CODESYSTEM_PING_STATUS, "code": status},
    }


def _input(task: Mapping[str, Any], system: str, code: str) -> object:
    for item in task.get("inputs") or []:
        if item.get("system") == system and item.get("code") == code:
            return item.get("value")
    return None


def _target(ctx: HandlerContext) -> Mapping[str, object]:
    target = ctx.get("target")
    if not isinstance(target, Mapping):
        raise BridgeError("the execution has no 'target' variable")
    return target


# -- handlers ---------------------------------------------------------------------------------

handlers = HandlerRegistry()
# Stricter than DSF, which correlates by business key whoever sends: a pong counts only
# from the organization pinged (with the correlation key of that ping).
handlers.replies_only_from_recipients("pong")

_PREFIX = "dsf_bridge.plugins.pingpong."


@handlers.service(_PREFIX + "SelectPingTargets")
async def select_ping_targets(ctx: HandlerContext) -> None:
    """Targets: every remote active Endpoint, or those the start Task's search names."""
    task = ctx.task()
    search = _input(task, CODESYSTEM_PING, TARGET_ENDPOINTS)
    endpoints = await _site(ctx).ping_targets(search if isinstance(search, str) else None)
    entries = [
        {
            "organizationIdentifier": endpoint.organization,
            "endpointIdentifier": endpoint.identifier,
            "endpointUrl": endpoint.address,
            "correlationKey": str(uuid.uuid4()),
        }
        for endpoint in endpoints
    ]
    log.info("ping.targets_selected", count=len(entries))
    ctx.set("targets", {"entries": entries})
    # Pong Tasks replace the 'task' variable when they arrive; results go to the start Task.
    ctx.set("startTaskId", task.get("id"))
    ctx.set("pongTimeout", str(ctx.services.get(SERVICE_PONG_TIMEOUT) or DEFAULT_PONG_TIMEOUT))


@handlers.listener(_PREFIX + "SetCorrelationKey")
def set_correlation_key(ctx: HandlerContext) -> None:
    """The pong of this target correlates by the target's key (kept on this execution)."""
    ctx.set_local("correlationKey", _target(ctx)["correlationKey"])


@handlers.message_send(_PREFIX + "SendPing")
async def send_ping(ctx: SendContext) -> None:
    """The ping names this site's Endpoint, where the pong is to go."""
    local = await _site(ctx).local_endpoint()
    ctx.add_input(
        CODESYSTEM_PING,
        ENDPOINT_IDENTIFIER,
        {
            "valueReference": {
                "type": "Endpoint",
                "identifier": {"system": ENDPOINT_IDENTIFIER_SYSTEM, "value": local.identifier},
            }
        },
    )
    ctx.throw_on_failure(NOT_REACHABLE, forbidden=NOT_ALLOWED)


def _record(ctx: HandlerContext, status: str, error: str | None = None) -> None:
    key = str(_target(ctx)["correlationKey"])
    ctx.set(f"statusCode_{key}", status)
    if error is not None:
        ctx.set(f"errorMessage_{key}", error)


@handlers.service(_PREFIX + "LogSendError")
def log_send_error(ctx: HandlerContext) -> None:
    target = _target(ctx)
    status = str(ctx.get("statusCode") or NOT_REACHABLE)
    error = str(ctx.get("errorMessage") or "")
    log.warning(
        "ping.not_sent",
        organization=target.get("organizationIdentifier"),
        endpoint=target.get("endpointIdentifier"),
        status=status,
        error=error,
    )
    _record(ctx, status, error)


@handlers.service(_PREFIX + "LogPong")
def log_pong(ctx: HandlerContext) -> None:
    target = _target(ctx)
    log.info(
        "pong.received",
        organization=target.get("organizationIdentifier"),
        endpoint=target.get("endpointIdentifier"),
    )
    _record(ctx, PONG_RECEIVED)


@handlers.service(_PREFIX + "LogNoResponse")
def log_no_response(ctx: HandlerContext) -> None:
    target = _target(ctx)
    log.warning(
        "pong.missing",
        organization=target.get("organizationIdentifier"),
        endpoint=target.get("endpointIdentifier"),
    )
    _record(ctx, PONG_MISSING)


@handlers.service(_PREFIX + "SaveResults")
async def save_results(ctx: HandlerContext) -> None:
    """One ping-status output per target on the start Task, ordered by endpoint identifier."""
    targets = ctx.get("targets")
    entries = targets.get("entries") if isinstance(targets, Mapping) else None
    outputs = []
    for target in sorted(entries or [], key=lambda t: str(t["endpointIdentifier"])):
        key = target["correlationKey"]
        status = str(ctx.get(f"statusCode_{key}") or PONG_MISSING)
        error = ctx.get(f"errorMessage_{key}") if status in (NOT_ALLOWED, NOT_REACHABLE) else None
        outputs.append(status_output(PING_STATUS, target, status, str(error or "") or None))
    task_id = ctx.get("startTaskId")
    if isinstance(task_id, str):
        for output in outputs:
            ctx.add_task_output(task_id, output)


@handlers.service(_PREFIX + "LogPing")
def log_ping(ctx: HandlerContext) -> None:
    task = ctx.task()
    reference = _input(task, CODESYSTEM_PING, ENDPOINT_IDENTIFIER)
    log.info("ping.received", organization=task.get("requester"), endpoint=_endpoint_of(reference))


def _endpoint_of(reference: object) -> str | None:
    if isinstance(reference, Mapping):
        identifier = reference.get("identifier")
        if isinstance(identifier, Mapping) and identifier.get("value"):
            return str(identifier["value"])
    return None


@handlers.service(_PREFIX + "SelectPongTarget")
async def select_pong_target(ctx: HandlerContext) -> None:
    """The pong goes to the Endpoint the ping names, if this site knows it as active."""
    task = ctx.task()
    endpoint = _endpoint_of(_input(task, CODESYSTEM_PING, ENDPOINT_IDENTIFIER))
    correlation_key = _input(task, BPMN_MESSAGE_SYSTEM, "correlation-key")
    requester = task.get("requester")
    address = await _site(ctx).endpoint_address(endpoint) if endpoint else None
    if address is None or not isinstance(correlation_key, str) or not requester:
        log.warning("pong.target_not_allowed", organization=requester, endpoint=endpoint)
        raise BpmnError(
            "target_not_allowed",
            f"pong target (organization {requester}, endpoint {endpoint}) not found locally "
            "or not active, not sending pong",
        )
    ctx.set(
        "target",
        {
            "organizationIdentifier": str(requester),
            "endpointIdentifier": endpoint,
            "endpointUrl": address,
            "correlationKey": correlation_key,
        },
    )
    ctx.set("pingTaskId", task.get("id"))


@handlers.message_send(_PREFIX + "SendPong")
def send_pong(ctx: SendContext) -> None:
    ctx.throw_on_failure(NOT_REACHABLE, forbidden=NOT_ALLOWED)


@handlers.service(_PREFIX + "SavePongSent")
async def save_pong_sent(ctx: HandlerContext) -> None:
    task_id = ctx.get("pingTaskId")
    if isinstance(task_id, str):
        ctx.add_task_output(task_id, status_output(PONG_STATUS, _target(ctx), PONG_SEND))


@handlers.service(_PREFIX + "SavePongFailure")
async def save_pong_failure(ctx: HandlerContext) -> None:
    """Record why the pong did not go out, then fail the ping Task (as the Java plugin does)."""
    target = _target(ctx)
    status = str(ctx.get("statusCode") or NOT_REACHABLE)
    error = str(ctx.get("errorMessage") or "")
    task_id = ctx.get("pingTaskId")
    if isinstance(task_id, str):
        ctx.add_task_output(task_id, status_output(PONG_STATUS, target, status, error))
    raise PongNotDeliveredError(
        f"pong to {target.get('organizationIdentifier')} not delivered ({status}): {error}"
    )


# -- ping autostart ---------------------------------------------------------------------------
# Registered under the Java plugin's class names, which its model (and ours) names.


def _timer_interval(value: object) -> str:
    """The ``timer-interval`` input as the timer takes it; ``PT24H`` when there is none."""
    if value is None:
        return DEFAULT_TIMER_INTERVAL
    text = value.strip() if isinstance(value, str) else ""
    try:
        months, fixed = parse_duration(text)
        positive = months > 0 or fixed.total_seconds() > 0
    except TimerError:
        months, fixed, positive = 0, timedelta(0), False
    if not positive:  # PT0S would send startPing Tasks as fast as the bridge can
        raise TimerIntervalError(
            f"Task input {TIMER_INTERVAL} ({CODESYSTEM_PING}) is {value!r}, not a positive ISO "
            "8601 duration such as PT24H, PT30M or P1D; ping autostart not started"
        )
    if months == 0 and fixed < MIN_TIMER_INTERVAL:
        raise TimerIntervalError(
            f"Task input {TIMER_INTERVAL} ({CODESYSTEM_PING}) is {value!r}, shorter than the "
            f"minimum of PT{MIN_TIMER_INTERVAL.seconds}S this site accepts; ping autostart not "
            "started"
        )
    return text


@handlers.service("dev.dsf.bpe.service.SetTargetAndConfigureTimer")
async def set_target_and_configure_timer(ctx: HandlerContext) -> None:
    """``timerInterval`` from the start Task (``PT24H`` by default); ``target``: this site's
    own Endpoint, where every ``startPing`` goes."""
    interval = _timer_interval(_input(ctx.task(), CODESYSTEM_PING, TIMER_INTERVAL))
    local = await _site(ctx).local_endpoint()
    log.info("ping_autostart.configured", timer_interval=interval, endpoint=local.identifier)
    ctx.set("timerInterval", interval)
    ctx.set(
        "target",
        {
            "organizationIdentifier": local.organization,
            "endpointIdentifier": local.identifier,
            "endpointUrl": local.address,
        },
    )


@handlers.message_send("dev.dsf.bpe.message.SendStartPing")
def send_start_ping(ctx: SendContext) -> None:
    """The ``startPing`` Task carries the start Task's ``target-endpoints`` search, if any."""
    search = _input(ctx.task(), CODESYSTEM_PING, TARGET_ENDPOINTS)
    if isinstance(search, str) and search:
        ctx.add_input(CODESYSTEM_PING, TARGET_ENDPOINTS, search)


# -- the plugin -------------------------------------------------------------------------------


def _plugin() -> ProcessPlugin:
    return ProcessPlugin(
        name="dsf-bridge-ping-pong",
        # 1.0.x.y: the resource version 1.0 of the Java plugin, so both speak ping|1.0.
        version="1.0.1.0",
        release_date=date(2026, 11, 23),
        bpmn_files=(
            bpmn_dir() / "ping.bpmn",
            bpmn_dir() / "pong.bpmn",
            bpmn_dir() / "ping-autostart.bpmn",
        ),
        fhir_resources=resources_per_process(
            profiles_dir(),
            {
                PING_PROCESS: "ping.json",
                PONG_PROCESS: "pong.json",
                PING_AUTOSTART_PROCESS: "ping-autostart.json",
            },
        ),
        handlers=handlers,
    )


plugin = _plugin()
