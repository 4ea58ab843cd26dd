"""Benchmark: the whole bridge against the bare DSF protocol round trips, side by side.

Both run in one process against the same sandbox DSF FHIR server over real mutual TLS, on the
same machine, one Task at a time:

- **bare**: what any engine must do on the wire for a one-step process: the remote site POSTs
  the Task, the local engine PUTs it ``in-progress`` (``If-Match``) and then ``completed``.
- **bridge**: the remote site POSTs the Task; a running :class:`~dsf_bridge.runtime.daemon.Bridge`
  (SQLite store, websocket subscription, intake with authorization, engine, jobs, outbox, audit
  trail) takes it in, runs the one-step process (``bench/one-step.bpmn``) and completes it;
  the clock stops when the server holds the Task ``completed``.

Run: ``python bench/bridge.py [--tasks N]``. Prints one line per figure and last
``bridge_vs_bare=<ratio>`` (bridge latency / bare latency; 1.0 would be free).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # run from a checkout without installing

from dsf_bridge.config import load_settings  # noqa: E402 - after the path set-up above
from dsf_bridge.dsf.client import FhirClient  # noqa: E402
from dsf_bridge.dsf.identity import build_ssl_context, load_identity  # noqa: E402
from dsf_bridge.dsf.tasks import build_task, updated_task  # noqa: E402
from dsf_bridge.logs import configure_logging  # noqa: E402
from dsf_bridge.plugins.api import ProcessPlugin  # noqa: E402
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry  # noqa: E402
from dsf_bridge.runtime.daemon import Bridge  # noqa: E402
from dsf_bridge.sandbox.network import SandboxNetwork  # noqa: E402
from dsf_bridge.sandbox.sites import SiteFiles  # noqa: E402
from dsf_bridge.store import upgrade  # noqa: E402

LOCAL = "Bench_Site"
REMOTE = "Bench_Requester"
CANONICAL = "http://bench.org/bpe/Process/oneStep|1.0"
PROFILE = "http://bench.org/fhir/StructureDefinition/task-one-step|1.0"


def _plugin() -> ProcessPlugin:
    handlers = HandlerRegistry()

    @handlers.service("org.bench.Work")
    def work(ctx: HandlerContext) -> None:
        ctx.set("done", True)

    return ProcessPlugin(
        name="bench-one-step",
        version="1.0.0.0",
        release_date=dt.date(2026, 1, 1),
        bpmn_files=(BENCH_DIR / "one-step.bpmn",),
        fhir_resources={
            "benchorg_oneStep": (
                BENCH_DIR / "one-step-activity-definition.json",
                # The server validates Tasks against their profile, as DSF does.
                BENCH_DIR / "one-step-task-profile.json",
            )
        },
        handlers=handlers,
    )


def _client(site: SiteFiles, base_url: str) -> FhirClient:
    identity = load_identity(site.client_certificate, site.client_key)
    return FhirClient(base_url, ssl_context=build_ssl_context(identity, [site.ca]))


def _task() -> dict[str, Any]:
    return build_task(
        instantiates_canonical=CANONICAL,
        message_name="start",
        profile=PROFILE,
        business_key=None,
        correlation_key=None,
        requester=REMOTE,
        recipient=LOCAL,
        authored_on=dt.datetime.now(dt.UTC),
    )


async def _bare(remote: FhirClient, local: FhirClient, tasks: int) -> list[float]:
    latencies = []
    for _ in range(tasks):
        began = time.perf_counter()
        created = await remote.create(_task())
        assert created.id is not None  # noqa: S101
        task = await local.read("Task", created.id)
        version = int(task["meta"]["versionId"])
        progressed = await local.update(
            updated_task(task, status="in-progress", business_key="bk"), if_match=version
        )
        task = progressed.resource or await local.read("Task", created.id)
        await local.update(
            updated_task(task, status="completed"), if_match=version + 1, return_minimal=True
        )
        latencies.append(time.perf_counter() - began)
    return latencies


class _Completions:
    """Learns from the sandbox's own store (no polling load) when a Task becomes completed."""

    def __init__(self, net: SandboxNetwork) -> None:
        self._events: dict[str, asyncio.Event] = {}
        net.servers[LOCAL].service.store.add_listener(self._changed)

    def _changed(self, resource: dict[str, Any]) -> None:
        if resource.get("resourceType") == "Task" and resource.get("status") == "completed":
            self._events.setdefault(str(resource["id"]), asyncio.Event()).set()

    async def wait(self, task_id: str) -> None:
        await asyncio.wait_for(self._events.setdefault(task_id, asyncio.Event()).wait(), 30)


async def _bridge(remote: FhirClient, completions: _Completions, tasks: int) -> list[float]:
    latencies = []
    for _ in range(tasks):
        began = time.perf_counter()
        created = await remote.create(_task())
        assert created.id is not None  # noqa: S101
        await completions.wait(created.id)
        latencies.append(time.perf_counter() - began)
    return latencies


async def run(tasks: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        async with SandboxNetwork(directory / "net", [LOCAL, REMOTE]) as net:
            local_site, remote_site = net.sites[LOCAL], net.sites[REMOTE]
            db_url = f"sqlite:///{directory / 'bridge.db'}"
            upgrade(db_url)
            settings = load_settings(
                local_site.bridge_config, {"db": {"url": db_url}, "log": {"level": "warning"}}
            )
            configure_logging("warning", "console")
            remote = _client(remote_site, net.base_url(LOCAL))
            local = _client(local_site, net.base_url(LOCAL))
            completions = _Completions(net)
            stop = asyncio.Event()
            # Starting the bridge publishes the ActivityDefinition and Task profile both sides
            # need (rewritten for the DSF 2.x sandbox as the Java BPE does); it takes no
            # Task before run(), so the bare round trips run undisturbed first.
            async with remote, local, Bridge(settings, [_plugin()]) as bridge:
                bare = await _bare(remote, local, tasks)
                runner = asyncio.create_task(bridge.run(stop))
                await asyncio.wait_for(bridge.subscriptions[0].bound.wait(), 30)
                await _bridge(remote, completions, 5)  # warm-up: connections, caches
                through_bridge = await _bridge(remote, completions, tasks)
                stop.set()
                await runner
    bare_ms = statistics.median(bare) * 1000
    bridge_ms = statistics.median(through_bridge) * 1000
    print(f"tasks={tasks} (sequential, one at a time, SQLite store, sandbox over mTLS)")
    print(f"bare_round_trips_median_ms={bare_ms:.1f} (POST, GET, PUT in-progress, PUT completed)")
    print(f"bridge_task_median_ms={bridge_ms:.1f} (POST until the server holds it completed)")
    print(f"bridge_task_p95_ms={sorted(through_bridge)[int(0.95 * (tasks - 1))] * 1000:.1f}")
    print(f"bridge_tasks_per_second={tasks / sum(through_bridge):.1f}")
    print(f"bridge_vs_bare={bridge_ms / bare_ms:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100, help="Tasks per side (default 100)")
    arguments = parser.parse_args()
    asyncio.run(run(arguments.tasks))


if __name__ == "__main__":
    main()
