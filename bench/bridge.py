"""Benchmark: the whole bridge against the bare DSF protocol exchanges, side by side.

Every part runs in a process of its own on this machine, talking mutual TLS over loopback:

- **sandbox servers**: two organizations' DSF FHIR servers (:mod:`dsf_bridge.sandbox`, DSF 2.1,
  validating Tasks against their profiles as DSF does), each in its own process:
  ``Bench_Site``'s, where the bridge lives, and ``Bench_Bare``'s, where the bare exchanges run.
  Both were set up by the same ``init_sandbox`` and serve the same allow list and the bench
  plugin's ActivityDefinition and Task profile.
- **bare exchanges**, in this process: what any engine must do on the wire for a one-step
  process. The remote site (``Bench_Requester``'s client) POSTs the Task; the local site's
  client GETs it (standing in for the websocket frame), PUTs it ``in-progress`` with
  ``If-Match`` and then ``completed``. The same :class:`~dsf_bridge.dsf.client.FhirClient`,
  certificates and number of requests as the bridge, no engine, no store.
- **bridge**: ``Bench_Requester`` POSTs the Task; a running
  :class:`~dsf_bridge.runtime.daemon.Bridge` in its own process (websocket subscription, intake
  with authorization, engine, jobs, outbox, audit trail, on SQLite or PostgreSQL) takes it in,
  runs the one-step process (``bench/one-step.bpmn``) and completes it. The clock stops when
  the sandbox holds the Task ``completed``: its server process tells this one over a pipe
  (a store listener, as cheap as the in-process listener of earlier versions).

Why two servers: the bridge subscribes to ``Task?status=requested`` on its site's server, and a
DSF server hands its process engine every Task addressed to the site; a bare Task on the
bridge's server would be taken in by the bridge too (or, with the bridge paused by SIGSTOP,
queued in its websocket and taken up, with 412s, in the next bridge block; the server's
websocket keep-alive would also drop a paused bridge). On a second organization's server, the
same code in a process of its own, the bridge stays warm and idle while the bare exchanges run.

**Alternating blocks.** Each round runs a block of bare exchanges and a block through the bridge
(the order flips every round: ABBA), first one Task at a time (latency), then 50 Tasks in flight
(throughput: Tasks/s over the block). A load change on the shared machine hits both sides; the
ratios are the medians of the per-round ratios. A few untimed Tasks (2, or 50 in flight) open
each block's connections: the server closes those idle for 5 s. CPU per Task comes from
``/proc/<pid>/stat`` (utime + stime, all threads) of each process, read around every block:
this process (the clients), the server of the side, each bridge process and, on PostgreSQL,
the server backends connected to the bench database (found by their process titles; a backend
that ends inside a block is missed). ``machine_busy`` is the share of both cores busy during
the blocks (``/proc/stat``), whoever used them.

**Replicas**: on one PostgreSQL database, blocks of 50 Tasks in flight with one bridge process
and with two (the second started before its block and stopped after it), alternating. On two
cores, one bridge with the sandbox and PostgreSQL already keeps the machine busy, so a second
cannot add much (``replicas_2_vs_1``). The same rounds are then run with each bridge capped at
``--replica-cpu`` cores (0.35) in a cgroup of its own, standing in for a machine per replica:
the cap holds one bridge, and what two reach shows whether they hold each other up
(``replicas_2_vs_1_capped``: the shared database, the claims, the audit trail).

**Catch-up**: on a fresh PostgreSQL database, the bridge is stopped, ``--catch-up`` Tasks
(10,000) are posted, and a new bridge process takes them up by its catch-up search; its rate,
from its start to the last completion, against blocks of 50 in flight on the same store right
before and after (``catch_up_vs_c50``).

**Checks** (exit status 1 when one fails): every Task through the bridge completed exactly once
(the server's notices) and none failed, each led to exactly one process instance and every
instance completed (the store), ``dsf-bridge audit verify`` intact. Warnings and
errors in the bridges' logs are counted (``--keep`` keeps them).

Run: ``python bench/bridge.py`` (about 8 minutes, half of them the catch-up; ``--quick``
about one; ``--only sqlite``, ``postgresql``, ``replicas`` or ``catch-up``, repeatable). Needs
the DSF reference corpus for validation (as the tests: ``../shared/reference/dsf`` or
``DSF_BRIDGE_REFERENCE_DIR``) and, but for ``--only sqlite``, a PostgreSQL server where it may
create a throw-away database (``--postgres-url``). Prints one ``key=value`` line per figure and last
``bridge_vs_bare_latency_sqlite``, ``bridge_vs_bare_latency_postgresql``,
``bridge_vs_bare_throughput_c50_sqlite``, ``bridge_vs_bare_throughput_c50_postgresql``
(latency: bridge / bare, 1.0 would be free; throughput: bridge / bare), ``replicas_2_vs_1``
(two bridges' throughput / one's), ``replicas_2_vs_1_capped`` (the same, each bridge capped) and
``catch_up_vs_c50``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import ctypes
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
BENCH_DIR = SCRIPT.parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from dsf_bridge.dsf.client import FhirClient  # noqa: E402 - after the path set-up above
from dsf_bridge.dsf.identity import build_ssl_context, load_identity  # noqa: E402
from dsf_bridge.dsf.tasks import build_task, updated_task  # noqa: E402
from dsf_bridge.plugins.api import ProcessPlugin  # noqa: E402
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry  # noqa: E402
from dsf_bridge.sandbox.sites import SiteFiles, init_sandbox  # noqa: E402
from dsf_bridge.sandbox.validation import find_reference_dir  # noqa: E402

LOCAL = "Bench_Site"  # the bridge's organization
BARE = "Bench_Bare"  # the organization of the bare exchanges
REMOTE = "Bench_Requester"  # sends every Task
CANONICAL = "http://bench.org/bpe/Process/oneStep|1.0"
PROFILE = "http://bench.org/fhir/StructureDefinition/task-one-step|1.0"
CONCURRENCY = 50
# Cores each bridge gets in the capped replica rounds: one replica is then held by its own cap,
# and two (0.7 cores) leave room on two cores for the sandbox, PostgreSQL and the clients.
DEFAULT_REPLICA_CPU = 0.35
SETTLE = 0.2  # seconds after a block before CPU is read: the last Task's trailing commits
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
STORES = ("sqlite", "postgresql")
_PARENT_VARIABLE = "DSF_BRIDGE_BENCH_PARENT"
_PROFILE_VARIABLE = "DSF_BRIDGE_BENCH_PROFILE"
_LOG_EVENT = re.compile(r"\[(warning|error|critical)\s*\]\s+(\S+)")


class BenchError(Exception):
    """The bench cannot run here (exit status 2)."""


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


# -- the child processes ---------------------------------------------------------------------


def _notice_channel() -> int:
    """The pipe to the bench (this process's stdout) as a file descriptor of its own; stdout
    itself goes to stderr, so that no stray print or log line is taken for a notice."""
    channel = os.dup(1)
    os.dup2(2, 1)
    return channel


def _notify(channel: int, line: str) -> None:
    os.write(channel, f"{line}\n".encode())


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    return stop


def _serve_sandbox(directory: Path, organization: str, port: int) -> None:
    """Serve ``organization``'s sandbox FHIR server as ``dsf-bridge sandbox serve`` does, and
    tell the bench every Task that becomes ``completed`` or ``failed``."""
    from dsf_bridge.logs import configure_logging  # noqa: PLC0415 - child process only
    from dsf_bridge.sandbox.server import SandboxServer  # noqa: PLC0415
    from dsf_bridge.sandbox.sites import build_service, sandbox_release  # noqa: PLC0415

    channel = _notice_channel()
    configure_logging("warning", "console")
    site = SiteFiles(
        organization,
        directory / organization,
        directory / "ca.pem",
        directory / "allow-list.json",
        port,
    )
    allow_list: dict[str, Any] = json.loads(site.allow_list.read_text())

    def changed(resource: dict[str, Any]) -> None:
        status = resource.get("status")
        if resource.get("resourceType") == "Task" and status in ("completed", "failed"):
            version = (resource.get("meta") or {}).get("versionId")
            _notify(channel, f"{status} {resource.get('id')} {version}")

    async def serve() -> None:
        service = build_service(
            organization, allow_list, site.base_url, dsf_release=sandbox_release(directory)
        )  # validate=True: Tasks are checked against their profiles, as DSF does
        service.store.add_listener(changed)
        stop = _stop_on_signals()
        async with SandboxServer(
            service,
            certificate=site.server_certificate,
            key=site.server_key,
            ca_files=[site.ca],
            port=port,
        ) as server:
            _notify(channel, f"ready {server.base_url}")
            await stop.wait()

    asyncio.run(serve())


def _serve_bridge(config: Path, db_url: str, *, publish_only: bool) -> None:
    """Run a bridge with the bench plugin until SIGTERM; ``ready`` once both subscriptions are
    bound. ``publish_only``: start (which publishes the plugin's resources) and stop."""
    from dsf_bridge.config import load_settings  # noqa: PLC0415 - child process only
    from dsf_bridge.logs import configure_logging  # noqa: PLC0415
    from dsf_bridge.runtime.daemon import Bridge  # noqa: PLC0415

    channel = _notice_channel()
    configure_logging("warning", "console")
    settings = load_settings(config, {"db": {"url": db_url}, "log": {"level": "warning"}})

    async def run() -> None:
        stop = _stop_on_signals()
        async with Bridge(settings, [_plugin()]) as bridge:
            if publish_only:
                _notify(channel, "ready")
                return
            runner = asyncio.ensure_future(bridge.run(stop))
            bound = asyncio.ensure_future(
                asyncio.gather(*(s.bound.wait() for s in bridge.subscriptions))
            )
            first: list[asyncio.Future[Any]] = [runner, bound]
            await asyncio.wait(first, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            if not bound.done():
                bound.cancel()
                stop.set()
                await runner
                raise RuntimeError("the bridge's subscriptions were not bound within 60 s")
            _notify(channel, "ready")
            await runner

    profile_directory = os.environ.get(_PROFILE_VARIABLE)
    if not profile_directory or publish_only:
        asyncio.run(run())
        return
    # --profile: CPU time (not wall time) of every function, for the whole life of the bridge.
    profiler = cProfile.Profile(time.process_time)
    try:
        profiler.runcall(asyncio.run, run())
    finally:
        profiler.dump_stats(Path(profile_directory) / f"bridge-{os.getpid()}.prof")


class Child:
    """A child process of this script; its first line on stdout is ``ready ...``, its stderr
    goes to ``log``."""

    def __init__(self, name: str, arguments: Sequence[str], log: Path) -> None:
        self.name = name
        self.arguments = list(arguments)
        self.log = log
        self.process: asyncio.subprocess.Process | None = None
        self.ready_line = ""
        self.reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.process.pid

    async def start(self, seconds: float = 120) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(SCRIPT),
                *self.arguments,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=ROOT,
                env={**os.environ, _PARENT_VARIABLE: str(os.getpid())},
            )
        assert self.process.stdout is not None  # noqa: S101 - asked for above
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), seconds)
        except TimeoutError:
            line = b""
        self.ready_line = line.decode().strip()
        if not self.ready_line.startswith("ready"):
            await self.stop()
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
            raise BenchError(f"{self.name} did not start (log {self.log}):\n{tail}")

    def follow(self, handle: Callable[[str], None]) -> None:
        """Hand every further line of the child's stdout to ``handle``."""
        assert self.process is not None  # noqa: S101 - started
        assert self.process.stdout is not None  # noqa: S101 - a pipe
        stream = self.process.stdout

        async def read() -> None:
            while line := await stream.readline():
                handle(line.decode().strip())

        self.reader = asyncio.ensure_future(read())

    async def wait(self, seconds: float) -> int:
        assert self.process is not None  # noqa: S101 - started
        return await asyncio.wait_for(self.process.wait(), seconds)

    async def stop(self, seconds: float = 60) -> int | None:
        """SIGTERM, then SIGKILL if it has not ended within ``seconds``."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), seconds)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        if self.reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.reader, 5)
        return self.process.returncode


# -- CPU from /proc --------------------------------------------------------------------------


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


class CpuCap:
    """A CPU quota for one process, in a cgroup of its own (the cgroup v1 ``cpu`` controller,
    or cgroup v2 with ``cpu`` enabled at the root): on this machine, it stands in for a
    smaller machine per replica. A quota is not a slower CPU: the process runs at full speed
    until its share of each period is spent, then waits for the next period (at 0.35 cores, 13
    of every 20 ms). ``CpuCap.problem()`` says why there is none here."""

    PERIOD_US = 20_000  # a short period keeps each wait short

    def __init__(self, cores: float, name: str) -> None:
        self.cores = cores
        self.root, self.version = _cgroup_root()
        self.path = self.root / f"dsf-bench-{os.getpid()}-{name}"
        # Where each process moved in came from, to go back there.
        self.origins: dict[int, Path] = {}
        self.path.mkdir(exist_ok=True)
        quota = max(1000, int(cores * self.PERIOD_US))
        try:
            if self.version == 1:
                (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (self.path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        except OSError:
            self.remove()
            raise

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the cgroup."""
        self.origins[pid] = self._cgroup_of(pid)
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        """Give the cgroup's processes back to the cgroups they came from, and remove it."""
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                origin = self.origins.get(int(pid), self.root)
                with contextlib.suppress(OSError):
                    (origin / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self.path.rmdir()

    def _cgroup_of(self, pid: int) -> Path:
        """The cgroup of ``pid`` in this hierarchy (``/proc/PID/cgroup``)."""
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            number, controllers, path = line.split(":", 2)
            if (self.version == 1 and "cpu" in controllers.split(",")) or (
                self.version == 2 and number == "0"
            ):
                return self.root / path.lstrip("/")
        return self.root

    @staticmethod
    def problem() -> str | None:
        try:
            root, _version = _cgroup_root()
        except OSError as exc:
            return str(exc)
        if not os.access(root, os.W_OK):
            return f"{root} is not writable (root, with cgroups writable, is needed)"
        return None


def _cgroup_root() -> tuple[Path, int]:
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists():
        return v1, 1
    control = Path("/sys/fs/cgroup/cgroup.subtree_control")
    if control.exists() and "cpu" in control.read_text().split():
        return control.parent, 2
    raise OSError("no cgroup with a cpu controller at /sys/fs/cgroup/cpu or /sys/fs/cgroup")


def _database_backends_cpu(database: str) -> float:
    """CPU seconds of the PostgreSQL backends connected to ``database`` (their process titles
    read ``postgres: <user> <database> <host> ...``)."""
    total = 0.0
    marker = f" {database} ".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                title = cmdline.read()
            if title.startswith(b"postgres:") and marker in title:
                total += _process_cpu(int(entry.name))
        except OSError:
            continue  # ended meanwhile, or not ours to read
    return total


def _machine_ticks() -> tuple[int, int]:
    """(busy, all) clock ticks of every core so far, from ``/proc/stat``."""
    with open("/proc/stat") as stat:
        # user nice system idle iowait irq softirq steal (guest time is counted in user)
        values = [int(v) for v in stat.readline().split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass
class Meter:
    """Reads the CPU of a side's processes around a block."""

    pids: dict[str, list[int]]  # label -> processes
    database: str | None = None  # PostgreSQL backends of this database, labelled "database"

    def read(self) -> dict[str, float]:
        readings = {label: sum(_process_cpu(p) for p in pids) for label, pids in self.pids.items()}
        if self.database is not None:
            readings["database"] = _database_backends_cpu(self.database)
        busy, total = _machine_ticks()
        readings["_busy"], readings["_ticks"] = busy, total
        return readings


# -- the two sides ---------------------------------------------------------------------------


def _client(site: SiteFiles, base_url: str) -> FhirClient:
    identity = load_identity(site.client_certificate, site.client_key)
    return FhirClient(base_url, ssl_context=build_ssl_context(identity, [site.ca]))


def _task(recipient: str) -> dict[str, Any]:
    return build_task(
        instantiates_canonical=CANONICAL,
        message_name="start",
        profile=PROFILE,
        business_key=None,
        correlation_key=None,
        requester=REMOTE,
        recipient=recipient,
        authored_on=dt.datetime.now(dt.UTC),
    )


class Completions:
    """The sandbox servers' notices: which Tasks became completed or failed, how often."""

    def __init__(self) -> None:
        self.completed: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.failed: set[str] = set()
        self._events: dict[str, asyncio.Event] = {}

    def notice(self, line: str) -> None:
        status, task_id, version = [*line.split(), "", "", ""][:3]
        if status == "completed":
            self.completed[task_id] += 1
            self.versions[version] += 1
        elif status == "failed":
            self.failed.add(task_id)
        else:
            return
        self._events.setdefault(task_id, asyncio.Event()).set()

    async def wait(self, task_id: str, seconds: float) -> bool:
        """True when the Task was completed within ``seconds``."""
        event = self._events.setdefault(task_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
        del self._events[task_id]
        return self.completed[task_id] > 0


class Lost(Exception):  # noqa: N818 - a Task, not an error of the bench
    """A Task through the bridge did not complete in time, or failed."""


class BareSide:
    name = "bare"

    def __init__(self, remote: FhirClient, local: FhirClient, meter: Meter) -> None:
        self.remote, self.local, self.meter = remote, local, meter

    async def one(self) -> float:
        began = time.perf_counter()
        created = await self.remote.create(_task(BARE))
        assert created.id is not None  # noqa: S101 - the server answers with the id
        task = await self.local.read("Task", created.id)
        version = int(task["meta"]["versionId"])
        progressed = await self.local.update(
            updated_task(task, status="in-progress", business_key="bk"), if_match=version
        )
        task = progressed.resource or await self.local.read("Task", created.id)
        await self.local.update(
            updated_task(task, status="completed"), if_match=version + 1, return_minimal=True
        )
        return time.perf_counter() - began


class BridgeSide:
    name = "bridge"

    def __init__(
        self, remote: FhirClient, completions: Completions, meter: Meter, timeout: float
    ) -> None:
        self.remote, self.completions, self.meter = remote, completions, meter
        self.timeout = timeout
        self.posted: list[str] = []

    async def one(self) -> float:
        began = time.perf_counter()
        created = await self.remote.create(_task(LOCAL))
        assert created.id is not None  # noqa: S101 - the server answers with the id
        self.posted.append(created.id)
        if not await self.completions.wait(created.id, self.timeout):
            state = "failed" if created.id in self.completions.failed else "not completed"
            raise Lost(f"Task/{created.id} {state} within {self.timeout:.0f} s")
        return time.perf_counter() - began


Side = BareSide | BridgeSide


@dataclass
class Block:
    side: str
    kind: str  # "sequential" or "c50"
    latencies: list[float]
    wall: float
    cpu: dict[str, float]  # label -> CPU seconds during the block
    busy: float  # share of the machine's cores busy

    @property
    def tasks(self) -> int:
        return len(self.latencies)


async def _run_block(side: Side, kind: str, count: int) -> Block:
    """``count`` Tasks one at a time or 50 in flight, after a few untimed ones: the server
    closes connections idle for 5 s (uvicorn's keep-alive), so each side would otherwise pay
    the TLS handshakes of all its connections at the start of every block, the bare side
    twice as many (two clients)."""
    if kind == "sequential":
        for _ in range(2):
            await side.one()
    else:
        await _in_flight(side.one, CONCURRENCY, CONCURRENCY)
    await asyncio.sleep(SETTLE)
    before = side.meter.read()
    began = time.perf_counter()
    if kind == "sequential":
        latencies = [await side.one() for _ in range(count)]
    else:
        latencies = await _in_flight(side.one, count, CONCURRENCY)
    wall = time.perf_counter() - began
    await asyncio.sleep(SETTLE)
    after = side.meter.read()
    cpu = {k: after[k] - before[k] for k in after if not k.startswith("_")}
    busy = (after["_busy"] - before["_busy"]) / max(after["_ticks"] - before["_ticks"], 1)
    return Block(side.name, kind, latencies, wall, cpu, busy)


async def _in_flight(one: Callable[[], Awaitable[float]], count: int, width: int) -> list[float]:
    """Run ``count`` Tasks keeping ``width`` in flight."""
    latencies: list[float] = []
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            latencies.append(await one())

    workers = [asyncio.ensure_future(worker()) for _ in range(min(width, count))]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
    return latencies


async def _warm_up(side: Side, count: int) -> None:
    """Connections, caches, pools: sequential then in flight, outside the timing."""
    for _ in range(min(5, count)):
        await side.one()
    await _in_flight(side.one, count, CONCURRENCY)


# -- figures ---------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _cpu_lines(prefix: str, blocks: Sequence[Block]) -> Iterator[str]:
    tasks = sum(b.tasks for b in blocks)
    labels = sorted({label for b in blocks for label in b.cpu})
    total = 0.0
    for label in labels:
        seconds = sum(b.cpu.get(label, 0.0) for b in blocks)
        total += seconds
        yield f"{prefix}_cpu_ms_per_task_{label}={_ms(seconds / tasks)}"
    yield f"{prefix}_cpu_ms_per_task_total={_ms(total / tasks)}"
    busy = sum(b.busy * b.wall for b in blocks) / max(sum(b.wall for b in blocks), 1e-9)
    yield f"{prefix}_machine_busy={busy:.2f}"


def _ratios(pairs: Sequence[tuple[float, float]]) -> tuple[float, str]:
    ratios = [a / b for a, b in pairs]
    return statistics.median(ratios), ",".join(f"{r:.2f}" for r in ratios)


@dataclass
class StoreResult:
    lines: list[str] = field(default_factory=list)
    latency_ratio: float | None = None
    throughput_ratio: float | None = None


def _store_figures(store: str, rounds: list[dict[str, Block]]) -> StoreResult:
    result = StoreResult()
    out = result.lines
    for kind in ("sequential", "c50"):
        for side in ("bare", "bridge"):
            blocks = [r[f"{side}_{kind}"] for r in rounds]
            latencies = [x for b in blocks for x in b.latencies]
            prefix = f"{store}_{side}_{kind}"
            out.append(f"{prefix}_tasks={len(latencies)}")
            out.append(f"{prefix}_latency_median_ms={_ms(statistics.median(latencies))}")
            out.append(f"{prefix}_latency_p95_ms={_ms(_p95(latencies))}")
            if kind == "c50":
                rate = len(latencies) / sum(b.wall for b in blocks)
                out.append(f"{prefix}_tasks_per_second={rate:.1f}")
            out.extend(_cpu_lines(prefix, blocks))
    result.latency_ratio, per_round = _ratios(
        [
            (
                statistics.median(r["bridge_sequential"].latencies),
                statistics.median(r["bare_sequential"].latencies),
            )
            for r in rounds
        ]
    )
    out.append(f"{store}_latency_ratio_per_round={per_round}")
    result.throughput_ratio, per_round = _ratios(
        [
            (
                r["bridge_c50"].tasks / r["bridge_c50"].wall,
                r["bare_c50"].tasks / r["bare_c50"].wall,
            )
            for r in rounds
        ]
    )
    out.append(f"{store}_throughput_c50_ratio_per_round={per_round}")
    return result


# -- stores ----------------------------------------------------------------------------------


class PostgresAdmin:
    """Creates and drops the throw-away databases on the server of ``url``."""

    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url  # noqa: PLC0415

        parsed = make_url(url).set(drivername="postgresql")
        self.url = parsed.render_as_string(hide_password=False)
        self.shown = parsed.render_as_string(hide_password=True)
        self._parsed = parsed
        self.created: list[str] = []

    def _connect(self) -> Any:
        import psycopg  # noqa: PLC0415

        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BenchError(
                f"PostgreSQL at {self.shown} is not reachable ({reason}). Start it (on Debian: "
                "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start), "
                "name another server with --postgres-url, or run --only sqlite"
            ) from exc

    def check(self) -> None:
        with self._connect() as connection:
            connection.execute("SELECT 1")

    def create(self) -> tuple[str, str]:
        """A new empty database: (its name, its URL)."""
        name = f"dsf_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with self._connect() as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return name, self._parsed.set(database=name).render_as_string(hide_password=False)

    def sessions(self, name: str) -> int:
        """Connections opened to database ``name`` so far (``pg_stat_database``; a pool that
        closes and opens connections under load shows here, and their backends' CPU does not
        show in the figures)."""
        with self._connect() as connection:
            row = connection.execute(
                "SELECT sessions FROM pg_stat_database WHERE datname = %s", (name,)
            ).fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    def drop_all(self) -> None:
        for name in self.created:
            with contextlib.suppress(BenchError, Exception), self._connect() as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


def _store_check(db_url: str, posted: Sequence[str]) -> tuple[list[str], list[str]]:
    """(figure lines, problems) of the store after a run: each Task posted led to exactly one
    process instance (the instance ids its claims record), every instance completed, the audit
    chain intact. How the first version's claims ended is reported, not judged: with replicas
    it tells who won each race."""
    from sqlalchemy import text  # noqa: PLC0415

    from dsf_bridge.store import create_sync_engine  # noqa: PLC0415

    engine = create_sync_engine(db_url, read_only=True)
    try:
        with engine.connect() as connection:
            instances_per_task = Counter(
                {
                    str(task): int(n)
                    for task, n in connection.execute(
                        text(
                            "SELECT task_id, count(DISTINCT instance_id) FROM tasks_seen "
                            "WHERE role = 'incoming' AND instance_id IS NOT NULL GROUP BY task_id"
                        )
                    )
                }
            )
            claims = {
                str(task): str(status)
                for task, status in connection.execute(
                    text(
                        "SELECT task_id, status FROM tasks_seen "
                        "WHERE role = 'incoming' AND task_version = '1'"
                    )
                )
            }
            instances = {
                str(status): int(n)
                for status, n in connection.execute(
                    text("SELECT status, count(*) FROM process_instances GROUP BY status")
                )
            }
    finally:
        engine.dispose()
    problems = []
    doubled = [t for t in posted if instances_per_task[t] > 1]
    missing = [t for t in posted if instances_per_task[t] == 0]
    if doubled:
        problems.append(f"{len(doubled)} Tasks started two instances, e.g. Task/{doubled[0]}")
    if missing:
        problems.append(f"{len(missing)} Tasks started no instance, e.g. Task/{missing[0]}")
    if sum(instances.values()) != len(posted) or instances.get("completed", 0) != len(posted):
        problems.append(f"{len(posted)} Tasks posted, process instances {instances}")
    verify = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "dsf_bridge", "audit", "verify", "--db-url", db_url],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    if verify.returncode != 0:
        problems.append(f"audit verify: {(verify.stdout + verify.stderr).strip()}")
    outcomes = Counter(claims.get(t, "none") for t in posted)
    lines = [
        f"instances={sum(instances.values())}",
        f"first_claims={','.join(f'{k}:{v}' for k, v in sorted(outcomes.items()))}",
        f"audit_chain={'intact' if verify.returncode == 0 else 'BROKEN'}",
    ]
    return lines, problems


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Plan:
    blocks: int
    replica_blocks: int
    sequential: int
    tasks: int
    warm_up: int
    timeout: float
    only: set[str]
    postgres_url: str
    keep: bool
    catch_up: int = 10_000
    replica_cpu: float = 0.0


@dataclass
class Bench:
    plan: Plan
    directory: Path
    sites: dict[str, SiteFiles]
    completions: Completions
    remote_to_local: FhirClient
    bare: BareSide
    sandbox_pids: dict[str, int]
    children: list[Child] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def emit(self, line: str) -> None:
        print(line, flush=True)

    def progress(self, line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    async def bridge(self, name: str, db_url: str) -> Child:
        log = self.directory / f"{name}.log"
        child = Child(name, ["--serve-bridge", str(self.sites[LOCAL].bridge_config), db_url], log)
        self.children.append(child)
        await child.start()
        if log not in self.logs:
            self.logs.append(log)
        return child

    async def stop(self, child: Child) -> None:
        code = await child.stop()
        self.children.remove(child)
        if code not in (0, None):
            self.problems.append(f"{child.name} exited with status {code} (log {child.log})")

    def bridge_side(self, bridges: Sequence[Child], database: str | None) -> BridgeSide:
        meter = Meter(
            {
                "client": [os.getpid()],
                "sandbox": [self.sandbox_pids[LOCAL]],
                "bridge": [b.pid for b in bridges],
            },
            database,
        )
        return BridgeSide(self.remote_to_local, self.completions, meter, self.plan.timeout)

    def check_completions(self, side: BridgeSide, label: str) -> None:
        doubled = [t for t in side.posted if self.completions.completed[t] > 1]
        failed = [t for t in side.posted if t in self.completions.failed]
        if doubled:
            self.problems.append(f"{label}: {len(doubled)} Tasks completed twice")
        if failed:
            self.problems.append(f"{label}: {len(failed)} Tasks failed, e.g. Task/{failed[0]}")

    async def store(self, store: str, admin: PostgresAdmin | None) -> StoreResult:
        from dsf_bridge.store import upgrade  # noqa: PLC0415

        database: str | None = None
        if store == "sqlite":
            db_url = f"sqlite:///{self.directory / 'bridge.db'}"
        else:
            assert admin is not None  # noqa: S101 - created for this store
            database, db_url = admin.create()
        upgrade(db_url)
        bridge = await self.bridge(f"bridge-{store}", db_url)
        side = self.bridge_side([bridge], database)
        self.progress(f"{store}: warming up")
        await _warm_up(self.bare, self.plan.warm_up)
        await _warm_up(side, self.plan.warm_up)
        rounds: list[dict[str, Block]] = []
        for number in range(self.plan.blocks):
            order: list[Side] = [self.bare, side] if number % 2 == 0 else [side, self.bare]
            blocks: dict[str, Block] = {}
            for kind, count in (("sequential", self.plan.sequential), ("c50", self.plan.tasks)):
                for current in order:
                    block = await _run_block(current, kind, count)
                    blocks[f"{block.side}_{kind}"] = block
            rounds.append(blocks)
            self.progress(
                f"{store} round {number + 1}/{self.plan.blocks}: latency "
                f"bare {_ms(statistics.median(blocks['bare_sequential'].latencies))} ms, "
                f"bridge {_ms(statistics.median(blocks['bridge_sequential'].latencies))} ms; "
                f"c50 bare {blocks['bare_c50'].tasks / blocks['bare_c50'].wall:.1f}/s, "
                f"bridge {blocks['bridge_c50'].tasks / blocks['bridge_c50'].wall:.1f}/s"
            )
        await self.stop(bridge)
        result = _store_figures(store, rounds)
        if admin is not None and database is not None:
            result.lines.append(f"{store}_database_sessions={admin.sessions(database)}")
        lines, problems = _store_check(db_url, side.posted)
        result.lines.extend(f"{store}_{line}" for line in lines)
        self.problems.extend(f"{store}: {p}" for p in problems)
        self.check_completions(side, store)
        return result

    async def replicas(self, admin: PostgresAdmin) -> tuple[float, float | None]:
        """Blocks of 50 in flight with one bridge and with two on one database, alternating:
        first as they come (both on this machine's cores), then, with ``--replica-cpu``, each
        bridge capped at that many cores in a cgroup of its own (a machine per replica)."""
        from dsf_bridge.store import upgrade  # noqa: PLC0415

        database, db_url = admin.create()
        upgrade(db_url)
        first = await self.bridge("bridge-replica-1", db_url)
        one = self.bridge_side([first], database)
        self.progress("replicas: warming up")
        await _warm_up(one, self.plan.warm_up)
        posted = list(one.posted)
        ratio = await self._replica_rounds(first, db_url, database, posted, None)
        capped: float | None = None
        cores = self.plan.replica_cpu
        problem = CpuCap.problem() if cores else "not asked for (--replica-cpu 0)"
        caps: list[CpuCap] = []
        try:
            if problem is None:
                for number in (1, 2):
                    caps.append(CpuCap(cores, f"replica-{number}"))
                caps[0].add(first.pid)
        except OSError as exc:
            problem = f"a cgroup could not be set up: {exc}"
        try:
            if problem is None:
                capped = await self._replica_rounds(first, db_url, database, posted, caps)
            else:
                self.emit(f"replicas_capped_unavailable={problem}")
        finally:
            for cap in caps:
                cap.remove()
        await self.stop(first)
        self.emit(f"replicas_database_sessions={admin.sessions(database)}")
        lines, problems = _store_check(db_url, posted)
        for line in lines:
            self.emit(f"replicas_{line}")
        self.problems.extend(f"replicas: {p}" for p in problems)
        return ratio, capped

    async def _replica_rounds(
        self,
        first: Child,
        db_url: str,
        database: str,
        posted: list[str],
        caps: list[CpuCap] | None,
    ) -> float:
        label = "replicas" if caps is None else f"replicas capped at {caps[0].cores} cores each"
        key = "replicas" if caps is None else "replicas_capped"
        runs: dict[int, list[Block]] = {1: [], 2: []}
        for number in range(self.plan.replica_blocks):
            for replicas in (1, 2) if number % 2 == 0 else (2, 1):
                bridges = [first]
                if replicas == 2:
                    bridges.append(await self.bridge("bridge-replica-2", db_url))
                    if caps is not None:
                        caps[1].add(bridges[1].pid)
                side = self.bridge_side(bridges, database)
                runs[replicas].append(await _run_block(side, "c50", self.plan.tasks))
                posted.extend(side.posted)
                self.check_completions(side, f"{label}, {replicas}")
                if replicas == 2:
                    await self.stop(bridges[1])
            last = {n: runs[n][-1] for n in (1, 2)}
            self.progress(
                f"{label}, round {number + 1}/{self.plan.replica_blocks}: "
                + ", ".join(f"{n}: {b.tasks / b.wall:.1f}/s" for n, b in last.items())
            )
        ratio, per_round = _ratios(
            [
                (b2.tasks / b2.wall, b1.tasks / b1.wall)
                for b1, b2 in zip(runs[1], runs[2], strict=True)
            ]
        )
        if caps is not None:
            self.emit(f"{key}_cores_each={caps[0].cores}")
        for replicas, blocks in runs.items():
            prefix = f"{key}_{replicas}_c50"
            rate = sum(b.tasks for b in blocks) / sum(b.wall for b in blocks)
            latencies = [x for b in blocks for x in b.latencies]
            self.emit(f"{prefix}_tasks={len(latencies)}")
            self.emit(f"{prefix}_tasks_per_second={rate:.1f}")
            self.emit(f"{prefix}_latency_median_ms={_ms(statistics.median(latencies))}")
            for line in _cpu_lines(prefix, blocks):
                self.emit(line)
        self.emit(f"{key}_2_vs_1_per_round={per_round}")
        return ratio

    async def catch_up(self, admin: PostgresAdmin) -> float:
        """Tasks posted while the bridge is down, taken up when it starts: the time from its
        start to the last completion, against the same bridge's throughput at 50 in flight
        measured right before and right after on the same store."""
        from dsf_bridge.store import upgrade  # noqa: PLC0415

        count = self.plan.catch_up
        database, db_url = admin.create()
        upgrade(db_url)
        bridge = await self.bridge("bridge-catch-up", db_url)
        side = self.bridge_side([bridge], database)
        self.progress("catch-up: warming up")
        await _warm_up(side, self.plan.warm_up)
        reference = [await _run_block(side, "c50", self.plan.tasks)]
        await self.stop(bridge)
        self.progress(f"catch-up: the bridge is down; posting {count} Tasks")
        missed: list[str] = []

        async def post() -> float:
            created = await self.remote_to_local.create(_task(LOCAL))
            assert created.id is not None  # noqa: S101 - the server answers with the id
            missed.append(created.id)
            return 0.0

        began = time.perf_counter()
        await _in_flight(post, count, CONCURRENCY)
        posting = time.perf_counter() - began
        meter = Meter({"client": [os.getpid()], "sandbox": [self.sandbox_pids[LOCAL]]}, database)
        before = meter.read()
        began = time.perf_counter()
        bridge = await self.bridge("bridge-catch-up", db_url)
        ready = time.perf_counter() - began
        deadline = began + max(self.plan.timeout, count * 0.5)
        remaining = set(missed)
        while remaining:
            remaining = {t for t in remaining if self.completions.completed[t] == 0}
            remaining -= self.completions.failed
            if not remaining:
                break
            if time.perf_counter() > deadline:
                raise Lost(
                    f"catch-up: {len(remaining)} of {count} Tasks not completed within "
                    f"{deadline - began:.0f} s, e.g. Task/{next(iter(remaining))}"
                )
            await asyncio.sleep(0.1)
        wall = time.perf_counter() - began
        await asyncio.sleep(SETTLE)
        after = meter.read()
        cpu = {k: after[k] - before.get(k, 0.0) for k in after if not k.startswith("_")}
        cpu["bridge"] = _process_cpu(bridge.pid)  # its whole life: start-up included
        busy = (after["_busy"] - before["_busy"]) / max(after["_ticks"] - before["_ticks"], 1)
        # One "latency" per Task only so that the block counts them for the CPU per Task; the
        # catch-up reports its wall time, not latencies.
        taken_up = Block("bridge", "catch-up", [wall] * count, wall, cpu, busy)
        restarted = self.bridge_side([bridge], database)
        reference.append(await _run_block(restarted, "c50", self.plan.tasks))
        await self.stop(bridge)
        side.posted.extend(missed + restarted.posted)
        self.check_completions(side, "catch-up")
        c50 = sum(b.tasks for b in reference) / sum(b.wall for b in reference)
        rate = count / wall  # from its start: the catch-up may begin before it is ready
        self.emit(f"catch_up_tasks={count}")
        self.emit(f"catch_up_posting_tasks_per_second={count / posting:.1f}")
        self.emit(f"catch_up_start_seconds={ready:.1f}")
        self.emit(f"catch_up_seconds={wall:.1f}")
        self.emit(f"catch_up_tasks_per_second={rate:.1f}")
        self.emit(f"catch_up_c50_tasks_per_second={c50:.1f}")
        for line in _cpu_lines("catch_up", [taken_up]):
            self.emit(line)
        self.emit(f"catch_up_database_sessions={admin.sessions(database)}")
        lines, problems = _store_check(db_url, side.posted)
        for line in lines:
            self.emit(f"catch_up_{line}")
        self.problems.extend(f"catch-up: {p}" for p in problems)
        self.progress(
            f"catch-up: {count} Tasks in {wall:.1f} s ({ready:.1f} s of it to start), "
            f"{rate:.1f}/s against {c50:.1f}/s at 50 in flight"
        )
        return rate / c50

    def log_findings(self) -> None:
        """Count the warnings and errors each child logged, by event."""
        for log in self.logs:
            events: Counter[str] = Counter()
            for line in log.read_text(errors="replace").splitlines():
                found = _LOG_EVENT.search(line)
                if found is not None:
                    events[f"{found[1]}:{found[2]}"] += 1
                elif line.startswith("Traceback"):
                    events["traceback"] += 1
            name = log.stem.replace("-", "_")
            self.emit(f"{name}_log_warnings_and_errors={sum(events.values())}")
            if events:
                self.progress(
                    f"{log.name}: " + ", ".join(f"{n} {e}" for e, n in events.most_common())
                )


async def _publish(directory: Path, site: SiteFiles) -> None:
    """Publish the bench plugin's ActivityDefinition and Task profile to ``site``'s server as
    the bridge does at start-up (a bridge started and stopped on a store of its own)."""
    from dsf_bridge.store import upgrade  # noqa: PLC0415

    db_url = f"sqlite:///{directory / f'publish-{site.organization}.db'}"
    upgrade(db_url)
    child = Child(
        f"publish-{site.organization}",
        ["--serve-bridge", str(site.bridge_config), db_url, "--publish-only"],
        directory / f"publish-{site.organization}.log",
    )
    await child.start()
    if await child.wait(60) != 0:
        raise BenchError(f"publishing to {site.organization} failed (log {child.log})")


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


async def run(plan: Plan) -> int:
    # SIGTERM cancels the run: the children are stopped and the database dropped.
    main_task = asyncio.current_task()
    assert main_task is not None  # noqa: S101 - run by asyncio.run
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    if find_reference_dir() is None:
        raise BenchError(
            "the DSF reference corpus is not found (the sandbox validates Tasks as DSF does): "
            "neither DSF_BRIDGE_REFERENCE_DIR nor a shared/reference/dsf above the checkout or "
            "the working directory; set DSF_BRIDGE_REFERENCE_DIR as for the tests"
        )
    admin = None
    if plan.only & {"postgresql", "replicas", "catch-up"}:
        admin = PostgresAdmin(plan.postgres_url)
        admin.check()
    started = time.perf_counter()
    directory = Path(tempfile.mkdtemp(prefix="dsf-bench-bridge-"))
    bench: Bench | None = None
    sandboxes: list[Child] = []
    try:
        sites = {
            s.organization: s
            for s in init_sandbox(directory, [LOCAL, BARE, REMOTE], ports=_free_ports(3))
        }
        completions = Completions()
        for organization in (LOCAL, BARE):
            site = sites[organization]
            sandboxes.append(
                Child(
                    f"sandbox-{organization}",
                    ["--serve-sandbox", str(directory), organization, str(site.port)],
                    directory / f"sandbox-{organization}.log",
                )
            )
        print("starting the sandbox servers", file=sys.stderr, flush=True)
        await asyncio.gather(*(s.start() for s in sandboxes))
        # The bare side's notices are read (a full pipe would stop its server) and dropped.
        sandboxes[0].follow(completions.notice)
        sandboxes[1].follow(lambda _line: None)
        await _publish(directory, sites[BARE])
        remote_to_local = _client(sites[REMOTE], sites[LOCAL].base_url)
        remote_to_bare = _client(sites[REMOTE], sites[BARE].base_url)
        bare_local = _client(sites[BARE], sites[BARE].base_url)
        sandbox_pids = {LOCAL: sandboxes[0].pid, BARE: sandboxes[1].pid}
        bare = BareSide(
            remote_to_bare,
            bare_local,
            Meter({"client": [os.getpid()], "sandbox": [sandbox_pids[BARE]]}),
        )
        bench = Bench(plan, directory, sites, completions, remote_to_local, bare, sandbox_pids)
        bench.logs.extend(s.log for s in sandboxes)
        bench.emit(
            f"# {plan.blocks} rounds of alternating blocks per side ({plan.replica_blocks} for "
            f"the replicas): {plan.sequential} Tasks one at a time, {plan.tasks} with "
            f"{CONCURRENCY} in flight; {os.cpu_count()} cores"
        )
        summary: dict[str, str] = {}
        async with remote_to_local, remote_to_bare, bare_local:
            for store in STORES:
                key = f"{store}"
                if store not in plan.only:
                    summary[f"bridge_vs_bare_latency_{key}"] = "skipped"
                    summary[f"bridge_vs_bare_throughput_c50_{key}"] = "skipped"
                    continue
                result = await bench.store(store, admin)
                for line in result.lines:
                    bench.emit(line)
                summary[f"bridge_vs_bare_latency_{key}"] = f"{result.latency_ratio:.2f}"
                summary[f"bridge_vs_bare_throughput_c50_{key}"] = f"{result.throughput_ratio:.2f}"
            summary["replicas_2_vs_1"] = summary["replicas_2_vs_1_capped"] = "skipped"
            if "replicas" in plan.only and admin is not None:
                ratio, capped = await bench.replicas(admin)
                summary["replicas_2_vs_1"] = f"{ratio:.2f}"
                if capped is not None:
                    summary["replicas_2_vs_1_capped"] = f"{capped:.2f}"
            if "catch-up" in plan.only and admin is not None:
                summary["catch_up_vs_c50"] = f"{await bench.catch_up(admin):.2f}"
            else:
                summary["catch_up_vs_c50"] = "skipped"
        bench.log_findings()
        bench.emit(f"problems={len(bench.problems)}")
        for problem in bench.problems:
            bench.progress(f"PROBLEM: {problem}")
        bench.emit(f"wall_seconds={time.perf_counter() - started:.0f}")
        for key in (
            "bridge_vs_bare_latency_sqlite",
            "bridge_vs_bare_latency_postgresql",
            "bridge_vs_bare_throughput_c50_sqlite",
            "bridge_vs_bare_throughput_c50_postgresql",
            "replicas_2_vs_1",
            "replicas_2_vs_1_capped",
            "catch_up_vs_c50",
        ):
            bench.emit(f"{key}={summary[key]}")
        return 1 if bench.problems else 0
    finally:
        for child in [*(bench.children if bench else []), *sandboxes]:
            with contextlib.suppress(Exception):
                await child.stop(seconds=30)
        if admin is not None:
            admin.drop_all()
        if plan.keep:
            print(f"kept {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)


def _end_with_parent() -> None:
    """SIGTERM this child when the bench process ends, however it ends (Linux's
    ``PR_SET_PDEATHSIG``), so that no server or bridge outlives a killed bench."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if str(os.getppid()) != os.environ.get(_PARENT_VARIABLE):  # it ended before the call
        os.kill(os.getpid(), signal.SIGTERM)


def _child_main(argv: list[str]) -> bool:
    """Run a child process's part if ``argv`` asks for one."""
    if argv[:1] in (["--serve-sandbox"], ["--serve-bridge"]):
        _end_with_parent()
    if argv[:1] == ["--serve-sandbox"]:
        _serve_sandbox(Path(argv[1]), argv[2], int(argv[3]))
        return True
    if argv[:1] == ["--serve-bridge"]:
        _serve_bridge(Path(argv[1]), argv[2], publish_only="--publish-only" in argv[3:])
        return True
    return False


def main() -> None:
    if _child_main(sys.argv[1:]):
        return
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Exit status: 0 figures printed; 1 a Task was lost, doubled or failed, or the "
        "audit chain is broken; 2 the bench cannot run here (PostgreSQL away, no corpus).",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="rounds of alternating blocks (default 5; --quick: 2, and 1 for the replicas)",
    )
    parser.add_argument(
        "--tasks",
        type=int,
        default=None,
        help=f"Tasks per block with {CONCURRENCY} in flight, per side (default 200)",
    )
    parser.add_argument(
        "--sequential",
        type=int,
        default=None,
        help="Tasks per block one at a time, per side (default 30)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small counts (2 rounds, 10 sequential, 60 in flight): under two minutes",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=["sqlite", "postgresql", "replicas", "catch-up"],
        help="run only this part (repeatable; default all four)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("DSF_BRIDGE_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="PostgreSQL where throw-away databases may be created and dropped "
        "(default $DSF_BRIDGE_TEST_POSTGRES_URL or %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds a Task may take (default 60)"
    )
    parser.add_argument(
        "--catch-up",
        type=int,
        default=None,
        metavar="N",
        help="Tasks posted while the bridge is down, for the catch-up part (default 10000; "
        "--quick: 300)",
    )
    parser.add_argument(
        "--replica-cpu",
        type=float,
        default=DEFAULT_REPLICA_CPU,
        metavar="CORES",
        help="for the replicas part, also run its rounds with each bridge capped at CORES cores "
        "in a cgroup of its own, standing in for a machine per replica (default "
        "%(default)s; 0: not; needs root and a cgroup cpu controller)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, SQLite store)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run every bridge under cProfile (CPU time) and write bridge-PID.prof files to DIR "
        "(read them with python -m pstats; the profiler slows the bridge: its ratios are not "
        "figures)",
    )
    arguments = parser.parse_args()
    if arguments.profile is not None:
        arguments.profile.mkdir(parents=True, exist_ok=True)
        os.environ[_PROFILE_VARIABLE] = str(arguments.profile.resolve())
    quick = arguments.quick
    plan = Plan(
        blocks=arguments.blocks or (2 if quick else 5),
        replica_blocks=arguments.blocks or (1 if quick else 5),
        sequential=arguments.sequential or (10 if quick else 30),
        tasks=arguments.tasks or (60 if quick else 200),
        warm_up=CONCURRENCY if not quick else 10,
        timeout=arguments.timeout,
        only=set(arguments.only or ("sqlite", "postgresql", "replicas", "catch-up")),
        postgres_url=arguments.postgres_url,
        keep=arguments.keep,
        catch_up=arguments.catch_up or (300 if quick else 10_000),
        replica_cpu=max(0.0, arguments.replica_cpu),
    )
    try:
        status = asyncio.run(run(plan))
    except BenchError as exc:
        print(f"bench/bridge.py: {exc}", file=sys.stderr)
        sys.exit(2)
    except Lost as exc:
        print(f"bench/bridge.py: a Task was lost: {exc} (--keep keeps the logs)", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench/bridge.py: stopped", file=sys.stderr)
        sys.exit(130)
    sys.exit(status)


if __name__ == "__main__":
    main()
