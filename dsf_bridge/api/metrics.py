"""``/metrics`` in the Prometheus text format, computed from the store when scraped.

Counts come from SQL, not from in-process counters, so they survive restarts and agree across
replicas sharing one PostgreSQL; every replica reports the whole store. Heartbeat ages, whether
the subscriptions are connected, and the duration histograms (:mod:`dsf_bridge.telemetry`) are
this process's own. Names follow ``dsf_bridge_<noun>[_<unit>]``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from dsf_bridge.api.probes import Probe, ProbeResult
from dsf_bridge.store.kinds import TaskSeenStatus
from dsf_bridge.store.queries import StoreCounts
from dsf_bridge.telemetry import REGISTRY

__all__ = ["CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Every status a Task version or an outbox entry can have is exposed, 0 when none has it: a
# series that first appears at 1 has no increase() in Prometheus, so an alert on the first
# failed effect or refused Task would never fire (deploy/alerts.yaml).
_TASK_STATUSES = (
    *(
        ("incoming", status.value)
        for status in TaskSeenStatus
        if status != TaskSeenStatus.REQUESTED
    ),
    ("outgoing", TaskSeenStatus.REQUESTED.value),
)
_OUTBOX_STATUSES = ("pending", "done", "failed")


class _Snapshot(Collector):
    def __init__(self, families: Sequence[GaugeMetricFamily | InfoMetricFamily]) -> None:
        self.families = families

    def collect(self) -> Iterable[GaugeMetricFamily | InfoMetricFamily]:
        return iter(self.families)


def render_metrics(
    counts: StoreCounts | None,
    probes: Sequence[tuple[Probe, ProbeResult]],
    *,
    version: str,
    now: dt.datetime,
) -> bytes:
    """The exposition; ``counts`` is ``None`` when the store did not answer, and then only the
    build and probe metrics are exposed (``dsf_bridge_probe_ok{probe="database"} 0``)."""
    info = InfoMetricFamily("dsf_bridge_build", "The running dsf-bridge release")
    info.add_metric([], {"version": version})
    families: list[GaugeMetricFamily | InfoMetricFamily] = [info]
    if counts is not None:
        families.extend(_store_families(counts, now))

    ready = GaugeMetricFamily(
        "dsf_bridge_probe_ok", "1 when the readiness probe passes", labels=["probe", "kind"]
    )
    ages = GaugeMetricFamily(
        "dsf_bridge_heartbeat_age_seconds",
        "Seconds since a subscription or the workers last showed life",
        labels=["probe", "kind"],
    )
    connected = GaugeMetricFamily(
        "dsf_bridge_subscription_connected",
        "1 while the subscription's websocket is bound, 0 while it is down (reconnecting)",
        labels=["probe"],
    )
    for probe, result in probes:
        ready.add_metric([probe.name, probe.kind], 1.0 if result.ok else 0.0)
        if result.age_seconds is not None:
            ages.add_metric([probe.name, probe.kind], result.age_seconds)
        if result.connected is not None:
            connected.add_metric([probe.name], 1.0 if result.connected else 0.0)
    families.extend([ready, ages, connected])

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return generate_latest(registry) + generate_latest(REGISTRY)


def _store_families(counts: StoreCounts, now: dt.datetime) -> list[GaugeMetricFamily]:
    instances = GaugeMetricFamily(
        "dsf_bridge_instances",
        "Process instances in the store by process and status",
        labels=["process", "status"],
    )
    for (process, status), value in sorted(counts.instances.items()):
        instances.add_metric([process, status], value)

    tasks = GaugeMetricFamily(
        "dsf_bridge_tasks",
        "Task versions taken in (incoming) or sent (outgoing), by intake status",
        labels=["role", "status"],
    )
    task_counts = dict.fromkeys(_TASK_STATUSES, 0) | dict(counts.tasks)
    for (role, status), value in sorted(task_counts.items()):
        tasks.add_metric([role, status], value)

    jobs = GaugeMetricFamily(
        "dsf_bridge_jobs",
        "Async steps: due, scheduled (retry later), leased (running); failing had an error",
        labels=["state"],
    )
    for state, value in counts.jobs.items():
        jobs.add_metric([state], value)

    outbox = GaugeMetricFamily(
        "dsf_bridge_outbox_entries", "Effects to perform after commit, by status", labels=["status"]
    )
    for status, value in sorted((dict.fromkeys(_OUTBOX_STATUSES, 0) | counts.outbox).items()):
        outbox.add_metric([status], value)

    timers = GaugeMetricFamily("dsf_bridge_timers", "Timers waiting to fire", value=counts.timers)
    audit = GaugeMetricFamily(
        "dsf_bridge_audit_events", "Events in the audit chain", value=counts.audit_events
    )
    unsealed = GaugeMetricFamily(
        "dsf_bridge_audit_events_unsealed",
        "Audit events appended and not sealed into the chain yet (sealed within a second or so)",
        value=counts.audit_unsealed,
    )
    lag = GaugeMetricFamily(
        "dsf_bridge_catch_up_cursor_age_seconds",
        "Age of the newest lastUpdated handled, per subscribed resource type",
        labels=["resource_type"],
    )
    for resource_type, updated in sorted(counts.cursors.items()):
        lag.add_metric([resource_type], max(0.0, (now - updated).total_seconds()))
    incidents = GaugeMetricFamily(
        "dsf_bridge_incidents_open",
        "Incidents (jobs out of retries) of running instances, by process",
        labels=["process"],
    )
    for process, value in sorted(counts.incidents.items()):
        incidents.add_metric([process], value)
    backlog = GaugeMetricFamily(
        "dsf_bridge_backlog",
        "Work waiting: jobs due, outbox entries pending, incoming Tasks waiting for intake "
        "(claimed or held), incidents open",
        labels=["queue"],
    )
    waiting = sum(
        counts.tasks.get(("incoming", status), 0)
        for status in (TaskSeenStatus.CLAIMING, TaskSeenStatus.HELD)
    )
    for queue, value in (
        ("jobs_due", counts.jobs.get("due", 0)),
        ("outbox_pending", counts.outbox.get("pending", 0)),
        ("tasks_waiting", waiting),
        ("incidents_open", sum(counts.incidents.values())),
    ):
        backlog.add_metric([queue], value)
    return [instances, tasks, jobs, outbox, timers, audit, unsealed, lag, incidents, backlog]
