"""``/metrics`` moves when the thing it counts happens: a service task step, an incident, a
subscription's websocket going down; over real SQLite and PostgreSQL stores and the real
runtime."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from dsf_bridge.api import create_app, subscription_probe
from dsf_bridge.config import ApiSettings
from dsf_bridge.store import Database
from dsf_bridge.telemetry import REGISTRY
from tests.runtime.test_incidents import KEY, _runtime, _until_incident
from tests.runtime.test_processes import Clock, FakeGateway

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class FakeSubscription:
    """What the subscription probe reads of a :class:`TaskSubscription`."""

    heartbeat: dt.datetime | None
    connected: bool
    disconnected_at: dt.datetime | None = None


async def _scrape(app: object) -> tuple[str, Samples]:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
        response = await http.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    return response.text, samples


def _steps(outcome: str) -> float:
    labels = {"process": KEY, "outcome": outcome}
    return REGISTRY.get_sample_value("dsf_bridge_step_duration_seconds_count", labels) or 0.0


async def test_steps_and_incidents_move_the_metrics(database: Database) -> None:
    clock = Clock()
    runtime = await _runtime(database, FakeGateway(), clock)
    app = create_app(database, ApiSettings(token=SecretStr(TOKEN)), clock=clock)
    text, before = await _scrape(app)
    for name in (
        "dsf_bridge_step_duration_seconds",
        "dsf_bridge_send_duration_seconds",
        "dsf_bridge_dicomweb_request_duration_seconds",
        "dsf_bridge_inference_request_duration_seconds",
        "dsf_bridge_incidents_open",
        "dsf_bridge_backlog",
    ):
        assert f"# TYPE {name} " in text, name
    assert before[("dsf_bridge_backlog", (("queue", "incidents_open"),))] == 0
    assert ("dsf_bridge_incidents_open", (("process", KEY),)) not in before

    # A service task runs its handler: one step measured, by process and outcome.
    steps = _steps("ok")
    await runtime.start(
        KEY, message_name="start", business_key="bk-run", task_id="t-run", variables={"mode": "run"}
    )
    await runtime.run_until_idle()
    assert _steps("ok") == steps + 1

    # An async gateway out of retries: an incident, counted per process and in the backlog.
    await runtime.start(
        KEY, message_name="start", business_key="bk-i", task_id="t-i", variables={"mode": "idle"}
    )
    assert len(await _until_incident(runtime, database, clock)) == 1
    _text, after = await _scrape(app)
    assert after[("dsf_bridge_incidents_open", (("process", KEY),))] == 1
    assert after[("dsf_bridge_backlog", (("queue", "incidents_open"),))] == 1
    for queue in ("jobs_due", "outbox_pending", "tasks_waiting"):
        assert ("dsf_bridge_backlog", (("queue", queue),)) in after, queue


async def test_subscription_connected_follows_the_websocket(database: Database) -> None:
    now = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
    task = FakeSubscription(now, connected=True)
    probe = subscription_probe("subscription Task", lambda: task, 900, 30, clock=lambda: now)
    app = create_app(database, ApiSettings(token=SecretStr(TOKEN)), probes=[probe])
    connected = ("dsf_bridge_subscription_connected", (("probe", "subscription Task"),))
    ready = ("dsf_bridge_probe_ok", (("kind", "subscription"), ("probe", "subscription Task")))

    _text, up = await _scrape(app)
    task.connected, task.disconnected_at = False, now - dt.timedelta(seconds=10)
    _text, dropped = await _scrape(app)
    task.disconnected_at = now - dt.timedelta(seconds=31)
    _text, down = await _scrape(app)

    assert (up[connected], up[ready]) == (1, 1)
    assert (dropped[connected], dropped[ready]) == (0, 1)  # a reconnect takes a moment
    assert (down[connected], down[ready]) == (0, 0)  # past api.disconnected_after


async def test_a_fresh_store_exposes_failed_effects_and_tasks_at_zero(database: Database) -> None:
    """The alerts on the first failed effect and the first refused Task take increase() of
    these series: one that first appears at 1 has none, so they are there at 0 from the start."""
    app = create_app(database, ApiSettings(token=SecretStr(TOKEN)))
    _text, samples = await _scrape(app)
    assert samples[("dsf_bridge_outbox_entries", (("status", "failed"),))] == 0
    assert samples[("dsf_bridge_outbox_entries", (("status", "pending"),))] == 0
    assert samples[("dsf_bridge_tasks", (("role", "incoming"), ("status", "failed")))] == 0
    assert samples[("dsf_bridge_tasks", (("role", "outgoing"), ("status", "requested")))] == 0
