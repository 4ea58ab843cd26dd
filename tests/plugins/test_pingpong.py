"""The ping/pong plugin (with ping-autostart): in memory with the process harness, then two
sandbox sites end to end.

The in-memory scenarios run our models and handlers against a fake allow list
(:class:`FakeSite`); the end-to-end tests run one sandbox DSF FHIR server and one real
:class:`~dsf_bridge.runtime.daemon.Bridge` per site over mutual TLS, as two DSF sites would.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dsf_bridge.config import load_settings
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.identity import build_ssl_context, load_identity
from dsf_bridge.dsf.profiles import ProfileError
from dsf_bridge.dsf.publication import publish
from dsf_bridge.dsf.tasks import build_task, input_values
from dsf_bridge.dsf.versions import release
from dsf_bridge.dsf.vocabulary import BPMN_MESSAGE_SYSTEM, ENDPOINT_IDENTIFIER_SYSTEM
from dsf_bridge.errors import RemoteError
from dsf_bridge.plugins.check import check_paths
from dsf_bridge.plugins.pingpong import (
    PING_AUTOSTART_PROCESS,
    PING_PROCESS,
    PONG_PROCESS,
    SERVICE_PONG_TIMEOUT,
    SERVICE_SITE,
    SiteEndpoint,
    bpmn_dir,
    plugin,
    profiles_dir,
)
from dsf_bridge.retry import RetryPolicy
from dsf_bridge.runtime.daemon import Bridge
from dsf_bridge.runtime.processes import ProcessRuntime, RuntimeSettings
from dsf_bridge.runtime.testing import ProcessHarness, SentTask
from dsf_bridge.sandbox.certs import CertificateAuthority
from dsf_bridge.sandbox.server import SandboxServer
from dsf_bridge.sandbox.sites import SiteFiles, build_service, init_sandbox
from dsf_bridge.store import Database, upgrade, verify_chain
from dsf_bridge.store import repository as repo
from dsf_bridge.store.tables import AuditEvent, MessageSubscription, Timer
from tests.dsf.test_profiles import our_profile, reference_profile
from tests.runtime.test_processes import FAST, Clock, FakeGateway

PING = "http://dsf.dev/fhir/CodeSystem/ping"
PING_STATUS = "http://dsf.dev/fhir/CodeSystem/ping-status"


@dataclass
class FakeSite:
    """An allow list in memory: this site's Endpoint and the others'."""

    local: SiteEndpoint
    others: list[SiteEndpoint]
    searches: list[str | None] = field(default_factory=list)

    async def local_endpoint(self) -> SiteEndpoint:
        return self.local

    async def ping_targets(self, search: str | None) -> list[SiteEndpoint]:
        self.searches.append(search)
        if search is None:
            return list(self.others)
        return [e for e in self.others if e.identifier in search]

    async def endpoint_address(self, identifier: str) -> str | None:
        known = [self.local, *self.others]
        return next((e.address for e in known if e.identifier == identifier), None)


SITE_A = SiteEndpoint("Site_A", "Site_A_Endpoint", "https://a.example/fhir")
SITE_B = SiteEndpoint("Site_B", "Site_B_Endpoint", "https://b.example/fhir")
SITE_C = SiteEndpoint("Site_C", "Site_C_Endpoint", "https://c.example/fhir")


def _harness(site: FakeSite) -> ProcessHarness:
    loaded = plugin.load(organization=site.local.organization, environment={})
    return ProcessHarness(
        list(loaded.definitions.values()),
        plugin.handlers,
        services={SERVICE_SITE: site, SERVICE_PONG_TIMEOUT: "PT20S"},
    )


def _local_task(
    task_id: str, profile: str, message_name: str, *inputs: dict[str, object]
) -> dict[str, object]:
    """The ``task`` variable of a local start Task (what intake hands the process)."""
    return {
        "task": {
            "id": task_id,
            "requester": "Site_A",
            "profile": f"http://dsf.dev/fhir/StructureDefinition/{profile}|1.0",
            "inputs": [
                {"system": BPMN_MESSAGE_SYSTEM, "code": "message-name", "value": message_name},
                *inputs,
            ],
        }
    }


def _start_task(*inputs: dict[str, object]) -> dict[str, object]:
    return _local_task("start-1", "task-start-ping", "startPing", *inputs)


def _statuses(outputs: list[dict[str, Any]]) -> dict[str, str]:
    """Endpoint identifier -> status code of ping-status/pong-status outputs."""
    result = {}
    for output in outputs:
        extension = {e["url"]: e for e in output["extension"][0]["extension"]}
        endpoint = extension["endpoint-identifier"]["valueIdentifier"]["value"]
        result[endpoint] = output["valueCoding"]["code"]
    return result


def _wire_task(sent: SentTask, requester: str, recipient: str) -> dict[str, Any]:
    """The Task the runtime would post for ``sent`` (the gateway builds it the same way)."""
    return build_task(
        instantiates_canonical=sent.instantiates_canonical,
        message_name=sent.message_name,
        profile=sent.profile,
        business_key=sent.business_key,
        correlation_key=sent.correlation_key,
        requester=requester,
        recipient=recipient,
        inputs=sent.inputs,
        authored_on=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )


async def test_ping_gets_one_pong_and_times_out_on_the_other_target() -> None:
    site = FakeSite(SITE_A, [SITE_B, SITE_C])
    async with _harness(site) as harness:
        instance = await harness.start(
            PING_PROCESS, "startPing", business_key="bk-1", variables=_start_task()
        )
        await harness.run_jobs()  # the multi-instance loop is asynchronous before each target

        assert site.searches == [None]
        pings = {str(s.target["organizationIdentifier"]): s for s in harness.sent if s.target}
        assert sorted(pings) == ["Site_B", "Site_C"]
        ping_b = pings["Site_B"]
        assert ping_b.instantiates_canonical == "http://dsf.dev/bpe/Process/pong|1.0"
        assert ping_b.profile == "http://dsf.dev/fhir/StructureDefinition/task-ping|1.0"
        assert ping_b.message_name == "ping"
        assert ping_b.correlation_key is not None
        assert ping_b.correlation_key != pings["Site_C"].correlation_key
        assert list(ping_b.inputs) == [
            {
                "system": PING,
                "code": "endpoint-identifier",
                "value": {
                    "valueReference": {
                        "type": "Endpoint",
                        "identifier": {
                            "system": ENDPOINT_IDENTIFIER_SYSTEM,
                            "value": "Site_A_Endpoint",
                        },
                    }
                },
            }
        ]
        assert await harness.open_timers() == 2

        await harness.message(
            "pong",
            business_key="bk-1",
            correlation_key=ping_b.correlation_key,
            requester="Site_B",
            variables={"task": {"id": "pong-1", "requester": "Site_B", "inputs": []}},
        )
        assert instance.status == "running"  # Site_C has not answered
        await harness.advance(19)
        assert instance.status == "running"
        await harness.advance(2)
        assert instance.status == "completed"
        assert harness.task_status["bk-1"] == "completed"
        assert _statuses(harness.task_outputs("start-1")) == {
            "Site_B_Endpoint": "pong-received",
            "Site_C_Endpoint": "pong-missing",
        }
        first = harness.task_outputs("start-1")[0]
        assert first["type"]["coding"] == [{"system": PING, "code": "ping-status"}]
        assert first["valueCoding"]["system"] == PING_STATUS
        extension = {e["url"]: e for e in first["extension"][0]["extension"]}
        assert extension["correlation-key"]["valueString"] == ping_b.correlation_key
        assert extension["organization-identifier"]["valueIdentifier"]["value"] == "Site_B"


async def test_ping_targets_from_the_start_task_search() -> None:
    site = FakeSite(SITE_A, [SITE_B, SITE_C])
    async with _harness(site) as harness:
        search = "Endpoint?identifier=http://dsf.dev/sid/endpoint-identifier|Site_C_Endpoint"
        await harness.start(
            PING_PROCESS,
            "startPing",
            business_key="bk-2",
            variables=_start_task({"system": PING, "code": "target-endpoints", "value": search}),
        )
        await harness.run_jobs()
        assert site.searches == [search]
        assert [s.target["organizationIdentifier"] for s in harness.sent if s.target] == ["Site_C"]


async def test_ping_with_no_targets_completes_without_outputs() -> None:
    site = FakeSite(SITE_A, [])
    async with _harness(site) as harness:
        instance = await harness.start(
            PING_PROCESS, "startPing", business_key="bk-3", variables=_start_task()
        )
        await harness.run_jobs()
        assert instance.status == "completed"
        assert harness.sent == []
        assert harness.task_outputs("start-1") == []


def _ping_task(endpoint: str, correlation_key: str = "ck-1") -> dict[str, object]:
    return {
        "task": {
            "id": "ping-1",
            "requester": "Site_A",
            "profile": "http://dsf.dev/fhir/StructureDefinition/task-ping|1.0",
            "inputs": [
                {"system": BPMN_MESSAGE_SYSTEM, "code": "message-name", "value": "ping"},
                {"system": BPMN_MESSAGE_SYSTEM, "code": "business-key", "value": "bk-9"},
                {
                    "system": BPMN_MESSAGE_SYSTEM,
                    "code": "correlation-key",
                    "value": correlation_key,
                },
                {
                    "system": PING,
                    "code": "endpoint-identifier",
                    "value": {
                        "type": "Endpoint",
                        "identifier": {"system": ENDPOINT_IDENTIFIER_SYSTEM, "value": endpoint},
                    },
                },
            ],
        }
    }


async def test_pong_answers_the_endpoint_the_ping_names() -> None:
    site = FakeSite(SITE_B, [SITE_A])
    async with _harness(site) as harness:
        instance = await harness.start(
            PONG_PROCESS, "ping", business_key="bk-9", variables=_ping_task("Site_A_Endpoint")
        )
        assert instance.status == "completed"
        [pong] = harness.sent
        assert pong.message_name == "pong"
        assert pong.instantiates_canonical == "http://dsf.dev/bpe/Process/ping|1.0"
        assert pong.profile == "http://dsf.dev/fhir/StructureDefinition/task-pong|1.0"
        assert pong.business_key == "bk-9"
        assert pong.correlation_key == "ck-1"
        assert list(pong.inputs) == []
        assert pong.target is not None and pong.target["endpointUrl"] == "https://a.example/fhir"
        assert _statuses(harness.task_outputs("ping-1")) == {"Site_A_Endpoint": "pong-send"}


async def test_pong_to_an_unknown_endpoint_is_not_sent() -> None:
    site = FakeSite(SITE_B, [SITE_A])
    async with _harness(site) as harness:
        instance = await harness.start(
            PONG_PROCESS, "ping", business_key="bk-9", variables=_ping_task("Nobody_Endpoint")
        )
        assert instance.status == "completed"  # the error boundary ends it, as in the Java model
        assert harness.sent == []
        assert harness.task_outputs("ping-1") == []


def test_plugin_files_pass_the_plugin_check() -> None:
    """``dsf-bridge plugins check``: models valid, resources valid FHIR with authorizations."""
    files = [*plugin.bpmn_files, profiles_dir()]
    assert all(path.parent == bpmn_dir() for path in plugin.bpmn_files)
    report = check_paths(files, version="1.0", environment={})
    assert report.ok, report.as_json()
    assert len(report.files) == 20  # three models, seventeen FHIR resources
    kinds = {"/".join(Path(f.path).parts[-2:]): f.resource_type for f in report.files}
    assert kinds["bpmn/ping-autostart.bpmn"] == "BPMN dsfdev_pingAutostart"
    assert kinds["ActivityDefinition/ping-autostart.json"] == "ActivityDefinition"
    for name in ("task-start-ping-autostart", "task-stop-ping-autostart"):
        assert kinds[f"StructureDefinition/{name}.json"] == "StructureDefinition"
        assert kinds[f"Task/{name}.json"] == "Task"


@pytest.mark.parametrize("process", [PING_PROCESS, PONG_PROCESS, PING_AUTOSTART_PROCESS])
def test_models_keep_the_java_process_ids_and_version(process: str) -> None:
    loaded = plugin.load(organization="Site_A", environment={})
    assert loaded.definitions[process].version_tag == "1.0"
    assert plugin.resource_version == "1.0"


# -- ping autostart in memory --------------------------------------------------------------------

STOP_SIGNAL = "stop_dsfdev_pingAutostart_1.0"
SET_TARGET = "dev.dsf.bpe.service.SetTargetAndConfigureTimer"
SEARCH_B = f"Endpoint?identifier={ENDPOINT_IDENTIFIER_SYSTEM}|Site_B_Endpoint"


def _autostart_task(*inputs: dict[str, object]) -> dict[str, object]:
    return _local_task("autostart-1", "task-start-ping-autostart", "startPingAutostart", *inputs)


async def test_autostart_sends_start_ping_to_this_site_every_interval_until_stopped() -> None:
    site = FakeSite(SITE_A, [SITE_B, SITE_C])
    async with _harness(site) as harness:
        instance = await harness.start(
            PING_AUTOSTART_PROCESS,
            "startPingAutostart",
            business_key="auto-1",
            variables=_autostart_task(
                {"system": PING, "code": "target-endpoints", "value": SEARCH_B},
                {"system": PING, "code": "timer-interval", "value": "PT1M"},
            ),
        )
        # It stops older autostart instances first, then sends the first startPing at once.
        assert harness.signals == [STOP_SIGNAL]
        assert instance.variables["timerInterval"] == "PT1M"
        [first] = harness.sent
        assert first.message_name == "startPing"
        assert first.instantiates_canonical == "http://dsf.dev/bpe/Process/ping|1.0"
        assert first.profile == "http://dsf.dev/fhir/StructureDefinition/task-start-ping|1.0"
        assert first.correlation_key is None
        assert first.target == {
            "organizationIdentifier": "Site_A",
            "endpointIdentifier": "Site_A_Endpoint",
            "endpointUrl": "https://a.example/fhir",
        }
        assert list(first.inputs) == [
            {"system": PING, "code": "target-endpoints", "value": SEARCH_B}
        ]
        # The Task the runtime posts from it is a startPing as the Java plugin's profile wants it.
        reference_profile("task-start-ping").check(_wire_task(first, "Site_A", "Site_A"))

        await harness.advance(59)
        assert len(harness.sent) == 1
        await harness.advance(1)
        assert len(harness.sent) == 2
        await harness.advance(60)
        assert len(harness.sent) == 3
        assert instance.status == "running"
        assert await harness.open_timers() == 1

        await harness.signal(STOP_SIGNAL)  # what a stopPingAutostart instance throws
        assert instance.status == "completed"
        assert harness.task_status["auto-1"] == "completed"
        assert await harness.open_timers() == 0
        await harness.advance(3600)
        assert len(harness.sent) == 3


async def test_autostart_defaults_to_a_day_and_pings_every_target() -> None:
    site = FakeSite(SITE_A, [SITE_B])
    async with _harness(site) as harness:
        instance = await harness.start(
            PING_AUTOSTART_PROCESS,
            "startPingAutostart",
            business_key="auto-2",
            variables=_autostart_task(),
        )
        assert instance.variables["timerInterval"] == "PT24H"
        [first] = harness.sent
        assert list(first.inputs) == []  # no target-endpoints: the ping process pings every target
        await harness.advance(24 * 3600 - 1)
        assert len(harness.sent) == 1
        await harness.advance(1)
        assert len(harness.sent) == 2


async def test_stop_ping_autostart_throws_the_stop_signal_and_ends() -> None:
    async with _harness(FakeSite(SITE_A, [])) as harness:
        stop = await harness.start(
            PING_AUTOSTART_PROCESS, "stopPingAutostart", business_key="stop-1"
        )
        assert stop.status == "completed"
        assert harness.signals == [STOP_SIGNAL]
        assert harness.sent == []
        assert harness.task_status["stop-1"] == "completed"


@pytest.mark.parametrize("interval", ["P1X", "24h", "PT", "PT0S", "", "-PT1H"])
async def test_a_malformed_timer_interval_fails_the_autostart_with_a_clear_error(
    interval: str,
) -> None:
    async with _harness(FakeSite(SITE_A, [SITE_B])) as harness:
        instance = await harness.start(
            PING_AUTOSTART_PROCESS,
            "startPingAutostart",
            business_key="auto-3",
            variables=_autostart_task(
                {"system": PING, "code": "timer-interval", "value": interval}
            ),
        )
        assert instance.status == "failed"
        assert harness.sent == []
        assert await harness.open_timers() == 0
        error = harness.task_status["auto-3"]
        assert "SetTargetAndConfigureTimer" in error
        assert "reason: Task input timer-interval" in error
        assert f"is {interval!r}, not a positive ISO 8601 duration such as PT24H" in error


@pytest.mark.parametrize("interval", ["PT0.001S", "PT1S", "PT9.999S", "PT0H0M9S"])
async def test_a_timer_interval_below_the_floor_fails_the_autostart_with_a_clear_error(
    interval: str,
) -> None:
    """DSF has no minimum; 1 ms would flood the site with startPing Tasks."""
    async with _harness(FakeSite(SITE_A, [SITE_B])) as harness:
        instance = await harness.start(
            PING_AUTOSTART_PROCESS,
            "startPingAutostart",
            business_key="auto-4",
            variables=_autostart_task(
                {"system": PING, "code": "timer-interval", "value": interval}
            ),
        )
        assert instance.status == "failed"
        assert harness.sent == []
        assert await harness.open_timers() == 0
        error = harness.task_status["auto-4"]
        assert "reason: Task input timer-interval" in error
        assert f"is {interval!r}, shorter than the minimum of PT10S this site accepts" in error


async def test_the_floor_itself_is_a_valid_timer_interval() -> None:
    async with _harness(FakeSite(SITE_A, [SITE_B])) as harness:
        instance = await harness.start(
            PING_AUTOSTART_PROCESS,
            "startPingAutostart",
            business_key="auto-5",
            variables=_autostart_task({"system": PING, "code": "timer-interval", "value": "PT10S"}),
        )
        assert instance.variables["timerInterval"] == "PT10S"
        assert len(harness.sent) == 1
        await harness.advance(10)
        assert len(harness.sent) == 2


@pytest.mark.parametrize("load", [reference_profile, our_profile], ids=["reference", "ours"])
@pytest.mark.parametrize(
    ("name", "message", "extra"),
    [
        (
            "task-start-ping-autostart",
            "startPingAutostart",
            [
                {"system": PING, "code": "target-endpoints", "value": SEARCH_B},
                {"system": PING, "code": "timer-interval", "value": "PT1S"},
            ],
        ),
        ("task-start-ping-autostart", "startPingAutostart", []),
        ("task-stop-ping-autostart", "stopPingAutostart", []),
    ],
)
def test_autostart_tasks_conform_to_the_java_profiles_and_ours(
    load: Any, name: str, message: str, extra: list[dict[str, object]]
) -> None:
    task = build_task(
        instantiates_canonical="http://dsf.dev/bpe/Process/pingAutostart|1.0",
        message_name=message,
        profile=f"http://dsf.dev/fhir/StructureDefinition/{name}|1.0",
        business_key="bk-1",
        correlation_key=None,
        requester="Site_A",
        recipient="Site_A",
        inputs=extra,
        authored_on=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )
    profile = load(name)
    profile.check(task)
    with pytest.raises(ProfileError, match="correlation-key"):
        profile.check(
            build_task(
                instantiates_canonical="http://dsf.dev/bpe/Process/pingAutostart|1.0",
                message_name=message,
                profile=f"http://dsf.dev/fhir/StructureDefinition/{name}|1.0",
                business_key="bk-1",
                correlation_key="ck-1",
                requester="Site_A",
                recipient="Site_A",
                inputs=extra,
                authored_on=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            )
        )
    wrong = build_task(
        instantiates_canonical="http://dsf.dev/bpe/Process/pingAutostart|1.0",
        message_name="startPing",
        profile=f"http://dsf.dev/fhir/StructureDefinition/{name}|1.0",
        business_key=None,
        correlation_key=None,
        requester="Site_A",
        recipient="Site_A",
        authored_on=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )
    with pytest.raises(ProfileError):
        profile.check(wrong)


# -- end to end: two bridges, each with its own sandbox DSF FHIR server ------------------------

SITE_IDS = ("Site_A", "Site_B", "Site_C", "Site_D", "Site_E")
# Site_C has the plugin's resources on its FHIR server but no engine running: its ping is
# accepted and never answered. Site_D is in the allow list but has no server at all: its ping
# cannot be delivered. Site_E's server knows no pong process: it refuses the ping (403).
WITH_SERVER = ("Site_A", "Site_B", "Site_C", "Site_E")
WITH_BRIDGE = ("Site_A", "Site_B")
PONG_TIMEOUT = "PT4S"
# The call retry keeps its four tries (Site_D's ping is still tried again before it counts as
# not reachable) but waits 50 ms between them instead of the default 1, 2 and 4 s: with the
# default a connection refused by Site_D took about 20 s of every network test.
FAST_RUNTIME = RuntimeSettings(
    idle_poll=dt.timedelta(milliseconds=100),
    outbox_retry_delays=(dt.timedelta(milliseconds=100),),
    job_retry_delay=dt.timedelta(milliseconds=200),
    call_retry=RetryPolicy(attempts=4, initial_delay=0.05, max_delay=0.2, retry_after_cap=0.2),
)


def _free_base_port(count: int) -> int:
    """A port such that it and the next ``count - 1`` are free now (the allow list needs
    every site's address before its server starts)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + count >= 65535:
            continue
        sockets = []
        try:
            for offset in range(count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise AssertionError("no run of free ports found")


def _client(site: SiteFiles) -> FhirClient:
    """A client of a site's own FHIR server, with the site's identity."""
    identity = load_identity(site.client_certificate, site.client_key)
    return FhirClient(site.base_url, ssl_context=build_ssl_context(identity, [site.ca]))


@dataclass
class Network:
    """Sandbox servers and running bridges of the sites, and how to reach them as a site."""

    sites: dict[str, SiteFiles]
    servers: dict[str, SandboxServer]
    bridges: dict[str, Bridge]
    db_urls: dict[str, str]

    def client(self, organization: str) -> FhirClient:
        return _client(self.sites[organization])

    def tasks(self, organization: str) -> list[dict[str, Any]]:
        """Every Task on a site's FHIR server except the plugin's published draft Task."""
        store = self.servers[organization].service.store
        return [t for t in store.all("Task") if t.get("status") != "draft"]


@pytest.fixture(
    params=[
        ("sqlite", "2.1"),
        ("postgresql", "2.1"),
        ("sqlite", "1.9"),
        ("postgresql", "1.9"),
    ],
    ids=lambda p: f"{p[0]}-dsf{p[1]}",
)
async def network(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Network]:
    """Site_B's bridge keeps its state in SQLite; Site_A's in SQLite or in PostgreSQL; every
    sandbox answers as DSF 2.1 or as DSF 1.9 (the bridges learn which from the servers)."""
    store_kind, dsf_version = request.param
    dsf_release = release(dsf_version)
    base = _free_base_port(len(SITE_IDS))
    ca = CertificateAuthority("dsf-bridge ping/pong test CA")
    sites = {
        s.organization: s
        for s in init_sandbox(
            tmp_path / "sandbox", SITE_IDS, base_port=base, ca=ca, dsf_release=dsf_release
        )
    }
    allow_list: dict[str, Any] = json.loads(sites["Site_A"].allow_list.read_text())
    stop = asyncio.Event()
    runners: list[asyncio.Task[None]] = []
    async with contextlib.AsyncExitStack() as stack:
        servers = {}
        for organization in WITH_SERVER:
            site = sites[organization]
            service = build_service(
                organization, allow_list, site.base_url, dsf_release=dsf_release
            )
            servers[organization] = await stack.enter_async_context(
                SandboxServer(
                    service,
                    certificate=site.server_certificate,
                    key=site.server_key,
                    ca_files=[site.ca],
                    port=site.port,
                )
            )
        async with _client(sites["Site_C"]) as client_c:
            loaded = plugin.load(organization="Site_C", environment={})
            files = {str(p): d for entries in loaded.resources.values() for p, d in entries}
            await publish(client_c, list(files.items()), dsf_release=dsf_release)
        bridges = {}
        db_urls = {}
        for organization in WITH_BRIDGE:
            url = f"sqlite:///{tmp_path / organization}.db"
            if organization == "Site_A" and store_kind == "postgresql":
                url = str(request.getfixturevalue("postgres_url"))
            upgrade(url)
            settings = load_settings(
                sites[organization].bridge_config, overrides={"db": {"url": url}}, environ={}
            )
            bridge = Bridge(
                settings,
                [plugin],
                services={SERVICE_PONG_TIMEOUT: PONG_TIMEOUT},
                runtime_settings=FAST_RUNTIME,
            )
            await stack.enter_async_context(bridge)
            runners.append(asyncio.create_task(bridge.run(stop)))
            bridges[organization] = bridge
            db_urls[organization] = url
        for bridge in bridges.values():
            await asyncio.wait_for(bridge.subscriptions[0].bound.wait(), 10)
        try:
            yield Network(sites, servers, bridges, db_urls)
        finally:
            stop.set()
            for runner in runners:
                await asyncio.wait_for(runner, 15)


def _site_a_task(
    process: str, message: str, profile: str, *inputs: dict[str, object]
) -> dict[str, Any]:
    """A Task Site_A creates for itself on its own server, as an administrator would."""
    return build_task(
        instantiates_canonical=f"http://dsf.dev/bpe/Process/{process}|1.0",
        message_name=message,
        profile=f"http://dsf.dev/fhir/StructureDefinition/{profile}|1.0",
        business_key=None,
        correlation_key=None,
        requester="Site_A",
        recipient="Site_A",
        inputs=inputs,
        authored_on=dt.datetime.now(dt.UTC),
    )


def _start_ping_task(*inputs: dict[str, object]) -> dict[str, Any]:
    return _site_a_task("ping", "startPing", "task-start-ping", *inputs)


async def _finished(client: FhirClient, task_id: str, seconds: float) -> dict[str, Any]:
    async def poll() -> dict[str, Any]:
        while True:
            task = await client.read("Task", task_id)
            if task["status"] in ("completed", "failed"):
                return task
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(poll(), seconds)


async def _settled(network: Network, seconds: float = 10) -> None:
    """Until no Task at a site with a bridge is still open: the start Task may complete a
    moment before the pong Task the same instance took in (each is its own outbox entry)."""

    async def poll() -> None:
        # Polling: the sandbox offers no event for "a Task changed status".
        while any(  # noqa: ASYNC110
            t["status"] in ("requested", "in-progress")
            for organization in WITH_BRIDGE
            for t in network.tasks(organization)
        ):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), seconds)


async def _audit_ok(url: str, seconds: float = 10) -> int:
    """The site's audit chain verified intact once its running bridge has sealed every event
    (the last steps' events wait for the sealer's next round, every idle poll); the number
    of events in it."""
    database = Database(url)
    deadline = time.monotonic() + seconds
    try:
        while True:
            async with database.transaction() as session:
                report = await verify_chain(session)
            if report.unsealed == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    finally:
        await database.dispose()
    assert report.ok, (report.problem, report.record_problems)
    assert report.unsealed == 0, f"{report.unsealed} events still unsealed after {seconds} s"
    return report.events


async def test_site_a_pings_site_b_and_gets_its_pong(network: Network) -> None:
    search = f"Endpoint?identifier={ENDPOINT_IDENTIFIER_SYSTEM}|Site_B_Endpoint"
    started = time.monotonic()
    async with network.client("Site_A") as client:
        created = await client.create(
            _start_ping_task({"system": PING, "code": "target-endpoints", "value": search})
        )
        assert created.id is not None
        final = await _finished(client, created.id, 30)
    elapsed = time.monotonic() - started
    await _settled(network)

    assert final["status"] == "completed", final.get("output")
    assert _statuses(final["output"]) == {"Site_B_Endpoint": "pong-received"}
    assert elapsed < 4, f"ping and pong took {elapsed:.1f} s, should not wait for the timer"

    # What went over the wire: one ping at Site_B, one pong back at Site_A, all completed.
    [ping] = [t for t in network.tasks("Site_B")]
    pongs = [t for t in network.tasks("Site_A") if t["id"] != created.id]
    assert [t["status"] for t in network.tasks("Site_A")] == ["completed", "completed"]
    assert ping["status"] == "completed"
    assert len(pongs) == 1
    assert ping["instantiatesCanonical"] == "http://dsf.dev/bpe/Process/pong|1.0"
    assert ping["meta"]["profile"][0] == "http://dsf.dev/fhir/StructureDefinition/task-ping|1.0"
    assert pongs[0]["meta"]["profile"][0] == (
        "http://dsf.dev/fhir/StructureDefinition/task-pong|1.0"
    )
    assert input_values(ping, "business-key") == input_values(pongs[0], "business-key")
    assert input_values(ping, "correlation-key") == input_values(pongs[0], "correlation-key")
    assert input_values(ping, "endpoint-identifier", PING) == [
        {
            "type": "Endpoint",
            "identifier": {"system": ENDPOINT_IDENTIFIER_SYSTEM, "value": "Site_A_Endpoint"},
        }
    ]
    # Site_B recorded the pong it sent on the ping Task, as the Java plugin does.
    assert _statuses(ping["output"]) == {"Site_A_Endpoint": "pong-send"}
    # Every Task as it ended on the servers conforms to the Java plugin's own profiles.
    reference_profile("task-ping").check(ping)
    reference_profile("task-pong").check(pongs[0])
    start = next(t for t in network.tasks("Site_A") if t["id"] == created.id)
    reference_profile("task-start-ping").check(start)
    # ... and against the DSF version's own profiles, as each server holds them now.
    for organization in WITH_BRIDGE:
        validator = network.servers[organization].service.validator
        assert validator is not None
        for stored in network.tasks(organization):
            assert validator(stored) == [], stored["meta"]["profile"]
    for organization in WITH_BRIDGE:
        assert await _audit_ok(network.db_urls[organization]) > 5


async def test_unanswered_unreachable_and_refused_targets_end_with_their_status(
    network: Network,
) -> None:
    """Site_B answers, Site_C never does, Site_D is down, Site_E refuses the ping."""
    async with network.client("Site_A") as client:
        created = await client.create(_start_ping_task())
        assert created.id is not None
        final = await _finished(client, created.id, 60)
    await _settled(network)

    assert final["status"] == "completed", final.get("output")
    assert _statuses(final["output"]) == {
        "Site_B_Endpoint": "pong-received",
        "Site_C_Endpoint": "pong-missing",
        "Site_D_Endpoint": "not-reachable",
        "Site_E_Endpoint": "not-allowed",
    }
    errors = {
        output["valueCoding"]["code"]: {
            e["url"]: e for e in output["extension"][0]["extension"]
        }.get("error-message", {})
        for output in final["output"]
    }
    assert errors["pong-received"] == errors["pong-missing"] == {}
    assert "connection failed" in errors["not-reachable"]["valueString"]
    assert "403" in errors["not-allowed"]["valueString"]
    # Outputs are ordered by endpoint identifier, as the Java plugin writes them.
    order = [_statuses([o]).popitem()[0] for o in final["output"]]
    assert order == sorted(order)
    # Site_C's FHIR server holds the ping nobody takes in; every other Task ends completed.
    [unanswered] = network.tasks("Site_C")
    assert unanswered["status"] == "requested"
    # The ping exactly as posted, and the start Task with its four outcomes, conform.
    reference_profile("task-ping").check(unanswered)
    reference_profile("task-start-ping").check(final)
    for organization in WITH_BRIDGE:
        assert {t["status"] for t in network.tasks(organization)} == {"completed"}
        assert await _audit_ok(network.db_urls[organization]) > 5


async def test_a_pong_that_cannot_be_delivered_fails_the_ping_task_with_its_status(
    database: Database,
) -> None:
    """As the Java plugin: the ping Task gets pong-status not-allowed and ends failed."""
    site = FakeSite(SITE_B, [SITE_A])
    refused = RemoteError("POST https://a.example/fhir/Task answered 403", status=403)
    gateway = FakeGateway(failures=[refused])
    runtime = ProcessRuntime(database, gateway, owner="b", services={SERVICE_SITE: site})
    loaded = plugin.load(organization="Site_B", environment={})
    await runtime.deploy(
        loaded.definitions[PONG_PROCESS], plugin.handlers, plugin="pingpong", model_hash="h" * 64
    )
    await runtime.start(
        PONG_PROCESS,
        message_name="ping",
        business_key="bk-9",
        variables=_ping_task("Site_A_Endpoint"),
        task_id="ping-1",
    )
    await runtime.run_until_idle()

    assert gateway.sent == []
    [(task_id, error)] = gateway.failed
    assert task_id == "ping-1"
    assert "pong to Site_A not delivered (not-allowed)" in error
    assert "answered 403" in error
    [output] = gateway.outputs["ping-1"]
    assert output["valueCoding"]["code"] == "not-allowed"
    extension = {e["url"]: e for e in output["extension"][0]["extension"]}
    assert "answered 403" in extension["error-message"]["valueString"]


# -- ping autostart end to end ---------------------------------------------------------------------


class ManualClock:
    """Site_A's runtime clock in the autostart tests: its timers fire when the test says so."""

    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def _autostart_wire_task(message: str, *inputs: dict[str, object]) -> dict[str, Any]:
    start = message == "startPingAutostart"
    profile = "task-start-ping-autostart" if start else "task-stop-ping-autostart"
    return _site_a_task("pingAutostart", message, profile, *inputs)


async def _until(predicate: Any, seconds: float = 10) -> None:
    """Poll ``predicate`` (sync or async) until it is true; fail after ``seconds``."""

    async def poll() -> None:
        while True:
            outcome = predicate()
            if asyncio.iscoroutine(outcome):
                outcome = await outcome
            if outcome:
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), seconds)


def _start_pings(network: Network) -> list[dict[str, Any]]:
    """The startPing Tasks on Site_A's server, oldest first."""
    tasks = [t for t in network.tasks("Site_A") if input_values(t, "message-name") == ["startPing"]]
    return sorted(tasks, key=lambda t: str(t["authoredOn"]))


async def _autostart_waiting(database: Database) -> list[str]:
    """Instances waiting for the stop signal (the autostart loop between two rounds)."""
    async with database.transaction() as session:
        return await repo.instances_waiting_for(session, f"signal:{STOP_SIGNAL}")


async def test_autostart_pings_every_interval_until_a_stop_task_stops_it(
    network: Network,
) -> None:
    bridge = network.bridges["Site_A"]
    assert bridge.runtime is not None and bridge.database is not None
    database = bridge.database
    clock = ManualClock()
    bridge.runtime.clock = clock
    search = f"Endpoint?identifier={ENDPOINT_IDENTIFIER_SYSTEM}|Site_B_Endpoint"

    async with network.client("Site_A") as client:
        started = await client.create(
            _autostart_wire_task(
                "startPingAutostart",
                {"system": PING, "code": "target-endpoints", "value": search},
                {"system": PING, "code": "timer-interval", "value": "PT10S"},
            )
        )
        assert started.id is not None

        def completed_pings(count: int) -> Any:
            async def check() -> bool:
                pings = _start_pings(network)
                return (
                    len(pings) == count
                    and all(t["status"] == "completed" for t in pings)
                    and len(await _autostart_waiting(database)) == 1
                )

            return check

        # The first round at once; the next one when the interval has passed on the clock.
        await _until(completed_pings(1))
        [instance_id] = await _autostart_waiting(database)
        clock.advance(10)
        await _until(completed_pings(2))
        assert await _autostart_waiting(database) == [instance_id]

        # The clock stands still, so the stop Task cannot race the next round.
        stop = await client.create(_autostart_wire_task("stopPingAutostart"))
        assert stop.id is not None
        stopped = await _finished(client, stop.id, 10)
        final = await _finished(client, started.id, 10)
    await _settled(network)

    assert stopped["status"] == "completed", stopped.get("output")
    assert final["status"] == "completed", final.get("output")
    async with database.transaction() as session:
        record = await repo.load_instance(session, instance_id)
        timers = (await session.scalars(select(Timer.instance_id))).all()
        waits = (await session.scalars(select(MessageSubscription.instance_id))).all()
        received = (
            await session.scalars(
                select(AuditEvent.subject).where(AuditEvent.action == "signal.received")
            )
        ).all()
    assert record is not None and record.status == "completed"
    # Nothing left that could send another startPing: no timer, no wait, anywhere at Site_A.
    assert timers == [] and waits == []
    assert received == [f"instance/{instance_id}"]
    clock.advance(3600)
    await _settled(network)

    pings = _start_pings(network)
    assert len(pings) == 2
    for ping in pings:
        # Sent by Site_A's autostart to Site_A, as the Java plugin's profile wants it.
        reference_profile("task-start-ping").check(ping)
        assert ping["requester"]["identifier"]["value"] == "Site_A"
        assert ping["restriction"]["recipient"][0]["identifier"]["value"] == "Site_A"
        assert ping["instantiatesCanonical"] == "http://dsf.dev/bpe/Process/ping|1.0"
        assert input_values(ping, "target-endpoints", PING) == [search]
        assert _statuses(ping["output"]) == {"Site_B_Endpoint": "pong-received"}
    reference_profile("task-start-ping-autostart").check(final)
    reference_profile("task-stop-ping-autostart").check(stopped)
    # Site_B answered exactly two pings.
    assert len([t for t in network.tasks("Site_B") if t["status"] == "completed"]) == 2
    for organization in WITH_BRIDGE:
        assert await _audit_ok(network.db_urls[organization]) > 5


async def test_autostart_with_a_malformed_timer_interval_is_refused_by_the_server(
    network: Network,
) -> None:
    """The DSF FHIR server refuses such a Task (the profile's timer-interval-regex invariant,
    both versions), so no loop starts; the bridge's own check of the interval, for a server
    that let one through, is tested in memory above."""
    task = _autostart_wire_task(
        "startPingAutostart", {"system": PING, "code": "timer-interval", "value": "P1X"}
    )
    async with network.client("Site_A") as client:
        with pytest.raises(RemoteError) as refused:
            await client.create(task)
    assert refused.value.status == 403
    assert "timer-interval-regex" in str(refused.value)
    await asyncio.sleep(0.3)
    assert _start_pings(network) == []


async def test_a_stop_while_the_autostart_sends_its_next_start_ping_still_stops_it(
    database: Database,
) -> None:
    site = FakeSite(SITE_A, [SITE_B])
    gateway = FakeGateway()
    clock = Clock()
    runtime = ProcessRuntime(
        database, gateway, owner="a", clock=clock, settings=FAST, services={SERVICE_SITE: site}
    )
    loaded = plugin.load(organization="Site_A", environment={})
    await runtime.deploy(
        loaded.definitions[PING_AUTOSTART_PROCESS],
        plugin.handlers,
        plugin="pingpong",
        model_hash="h" * 64,
    )
    running = await runtime.start(
        PING_AUTOSTART_PROCESS,
        message_name="startPingAutostart",
        business_key="auto",
        variables=_autostart_task({"system": PING, "code": "timer-interval", "value": "PT1M"}),
    )
    await runtime.run_until_idle()
    clock.advance(minutes=1)
    await runtime.run_once()  # the timer fires; the startPing send job is left to the next round
    await runtime.start(PING_AUTOSTART_PROCESS, message_name="stopPingAutostart", business_key="s")
    await runtime.run_until_idle()

    async with database.transaction() as session:
        record = await repo.load_instance(session, running)
    assert record is not None and record.status == "completed"
