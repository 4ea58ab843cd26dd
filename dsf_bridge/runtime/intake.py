"""Task intake: from a ``requested`` Task on the local DSF FHIR server to a started or continued
process instance, or to a ``failed`` Task whose ``error`` output says what was wrong.

The steps, as the DSF BPE takes them, with the bridge's additions:

1. Record the Task version as ``claiming`` (idempotency: a version already taken in is skipped).
   A Task whose id or version cannot be one of DSF's (nor fit the claim's columns) is ignored.
2. Check its bounds before reading anything else of it (``[intake]`` in the configuration:
   size, nesting depth, string lengths, number of inputs), the JSON types of the elements the
   bridge reads (an input that is no object, a coding list that is a string: a DSF server could
   not parse such a Task), and that every value the store keeps of it fits its column on both
   databases. Then check it before any process step: DSF Task
   conventions, a deployed process for ``instantiatesCanonical``, the recipient is this site,
   and the ActivityDefinition's process authorization admits requester and recipient for the
   message name and Task profile.
   Failures end the Task ``failed`` with an error an administrator can act on.
   A business-key input is added first when the Task has none, so a failed Task carries it.
3. ``PUT`` it ``in-progress`` with ``If-Match``.
   Losing that race (409/412) means another replica owns the Task.
4. Hand the message to the runtime: continue the waiting instance, or start one. No match:
   ``failed`` with "Unable to correlate Task ...". A reply that arrives while a send of its
   instance is unresolved (it overtook the commit that records its request as sent, or the
   bridge died after the remote server accepted the request) is recorded ``held`` and
   delivered again once that send resolves, never refused for timing
   (:class:`~dsf_bridge.runtime.processes.MessageHeldError`).

A crash between the steps loses nothing: at start-up :meth:`TaskIntake.recover` re-reads every
Task still ``claiming`` or ``held`` and finishes what the previous run began. One Task never
stops the others or start-up: a Task the server no longer has (404/410), or that breaks a bound
or has elements of the wrong JSON type and that the server will not even take back ``failed``,
is recorded ``skipped`` with an audit event ``task.skipped`` giving the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import re
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.subscription import ResourceDeferredError
from dsf_bridge.dsf.tasks import (
    BUSINESS_KEY,
    TaskFormatError,
    TaskLimits,
    TaskMessage,
    bounds_violation,
    input_values,
    read_message,
    requester_identifier,
    requester_label,
    shape_violation,
    shortened,
    unstorable,
    updated_task,
)
from dsf_bridge.engine.exceptions import CorrelationError
from dsf_bridge.errors import (
    BridgeError,
    ProcessExecutionError,
    RemoteError,
    StoreError,
    TaskAlreadyDeliveredError,
)
from dsf_bridge.logs import bound_context
from dsf_bridge.runtime.processes import TAKEN_IN, MessageHeldError, ProcessRuntime
from dsf_bridge.store import Database, Records, Session, append_event, task_record
from dsf_bridge.store import repository as repo
from dsf_bridge.store.kinds import TaskSeenStatus
from dsf_bridge.store.tables import AuditEvent, MessageSubscription, ProcessInstance, TaskSeen

__all__ = ["Authorizer", "SqlCursorStore", "TaskIntake", "task_variables"]

log = structlog.get_logger("dsf_bridge.intake")

# The intake's statuses of a claimed Task version (TaskSeenStatus, short names).
CLAIMING = TaskSeenStatus.CLAIMING
FAILED = TaskSeenStatus.FAILED
LOST = TaskSeenStatus.CLAIMED_ELSEWHERE
REFUSED = TaskSeenStatus.REFUSED
SKIPPED = TaskSeenStatus.SKIPPED
HELD = TaskSeenStatus.HELD

# How soon a held reply whose delivery failed (the FHIR server away) is tried again, doubling
# up to _HELD_RETRY_MAX.
_HELD_RETRY = 5.0
_HELD_RETRY_MAX = 300.0


@dataclass
class _Held:
    """A held claim this run watches: the business key whose sends it waits for (``None``
    when a sweep found it: deliver it and see), and its delivery back-off."""

    business_key: str | None
    failures: int = 0
    not_before: float = 0.0


# How often, and over how long at least, the server may answer a server error (5xx) while
# one Task version is taken in before that Task is recorded ``skipped``: then it chokes on
# this Task (a database outage ends sooner), and trying it at every catch-up would hold up the
# Tasks behind it once a page is full of such Tasks. Counted per run of the bridge.
SERVER_ERROR_ATTEMPTS = 5
SERVER_ERROR_SPAN = 3600.0
# Server errors that say the server (or a proxy before it) is away, not that it chokes on a Task.
_OUTAGE = frozenset({502, 503, 504})

# FHIR's id type; DSF servers assign UUIDs. Versions are DSF's counters.
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


def _length(model: type[Any], column: str) -> int:
    """The length of a String column: PostgreSQL refuses longer values, SQLite keeps them."""
    length = getattr(model.__table__.c[column].type, "length", None)
    if not isinstance(length, int):
        raise TypeError(f"{model.__name__}.{column} has no length")
    return length


_VERSION_LENGTH = _length(TaskSeen, "task_version")
# Every value of a Task the store keeps, and the columns it goes into.
_STORED_FIELDS: tuple[tuple[str, int], ...] = (
    (
        "input 'business-key'",
        min(_length(ProcessInstance, "business_key"), _length(MessageSubscription, "business_key")),
    ),
    ("input 'correlation-key'", _length(MessageSubscription, "correlation_key")),
    ("input 'message-name'", _length(MessageSubscription, "message_name")),
    ("requester", _length(AuditEvent, "actor")),
)


# How long a claim counts as being worked on by whoever made it: longer than an intake takes
# (a claim, a PUT, a step), far shorter than the subscription's re-sync.
_CLAIM_IN_PROGRESS = dt.timedelta(seconds=30)
_CLAIMS_REMEMBERED = 10_000


def _claimed_moments_ago(seen: repo.TaskSeenRecord) -> bool:
    return seen.seen_at is not None and dt.datetime.now(dt.UTC) - seen.seen_at < _CLAIM_IN_PROGRESS


def _refused(exc: RemoteError) -> bool:
    """The server answered that it will not take this update (4xx): asking again now changes
    nothing, unlike an outage (5xx, 429, no connection) or a server that does not know our
    certificate (401: an allow list being changed), which pass."""
    return exc.status is not None and 400 <= exc.status < 500 and exc.status not in (401, 429)


def _unfit(message: TaskMessage, actor: str) -> str | None:
    """Which value of the Task does not fit its column (said without quoting the value)."""
    values = (message.business_key, message.correlation_key, message.message_name, actor)
    for (name, limit), value in zip(_STORED_FIELDS, values, strict=True):
        if value is not None and len(value) > limit:
            return f"Task {name} has {len(value)} characters; this site stores at most {limit}"
        if value is not None and "\x00" in value:  # PostgreSQL text cannot hold NUL
            return f"Task {name} contains a NUL character, which this site cannot store"
    return None


class Authorizer(Protocol):
    async def denied(self, task: Mapping[str, Any], message: TaskMessage) -> str | None: ...


def task_variables(task: Mapping[str, Any]) -> dict[str, object]:
    """What handlers see of the Task: id, requester, profile and inputs (no other content)."""
    inputs = []
    for parameter in task.get("input") or []:
        codings = (parameter.get("type") or {}).get("coding") or [{}]
        value = next((v for k, v in parameter.items() if k.startswith("value")), None)
        inputs.append(
            {"system": codings[0].get("system"), "code": codings[0].get("code"), "value": value}
        )
    profiles = (task.get("meta") or {}).get("profile") or []
    return {
        "task": {
            "id": task.get("id"),
            "requester": requester_identifier(task),
            "profile": profiles[0] if profiles else None,
            "inputs": inputs,
        }
    }


class TaskIntake:
    """Takes Tasks in for one site: ``handle`` is the subscription's resource handler."""

    def __init__(
        self,
        client: FhirClient,
        runtime: ProcessRuntime,
        database: Database,
        *,
        local_organization: str,
        authorizer: Authorizer | None,
        limits: TaskLimits | None = None,
        remember: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        """``remember`` is told each Task as the server holds it after the in-progress PUT
        (the gateway finishes it from that copy, :meth:`DsfTaskGateway.remember_task`)."""
        self.client = client
        self._remember = remember
        self.runtime = runtime
        self.database = database
        self.local_organization = local_organization
        self.authorizer = authorizer
        self.limits = limits or TaskLimits()
        # Replies held, watched by this run: claim (Task id, claimed version) -> its business
        # key and back-off. Every commit that may resolve a send looks here; one delivery
        # round runs at a time; a sweep adds held claims of other replicas.
        self._held: dict[tuple[str, str], _Held] = {}
        self._audited_held: set[tuple[str, str]] = set()
        self._redelivery: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._again = False
        # Server errors (5xx) per claim while taking it in, in this run: how many, and the
        # loop time of the first.
        self._server_errors: dict[tuple[str, str], tuple[int, float]] = {}
        # Claims whose recovery at start-up met a server error on that Task, or whose intake
        # met a retryable failure: the sweeps try them again (a claim already in-progress on
        # the server is not in any catch-up); a new one wakes the sweeps after a short delay.
        self._deferred: dict[tuple[str, str], repo.TaskSeenRecord] = {}
        self._retry_soon = asyncio.Event()
        # Claims being taken in or recovered in this process right now: a catch-up and a
        # sweep never work on the same claim at once (two instances for one Task).
        self._working: set[tuple[str, str]] = set()
        # Claims this process made (the newest): one of them left claiming by a failure is
        # taken up again at the next delivery, another replica's only once it is old.
        self._claimed_here: OrderedDict[tuple[str, str], None] = OrderedDict()
        runtime.on_send_resolved(self._send_resolved)

    async def handle(self, task: dict[str, Any]) -> None:
        if task.get("resourceType") != "Task" or task.get("status") != "requested":
            return
        task_id = str(task.get("id") or "")
        meta = task.get("meta")
        version = str(meta.get("versionId") or "") if isinstance(meta, Mapping) else ""
        if not task_id or not version:
            log.warning("task.ignored", reason="no id or versionId")
            return
        if not _FHIR_ID.match(task_id) or not version.isdigit() or len(version) > _VERSION_LENGTH:
            # Not a Task a DSF server could hold (a bogus frame): nothing to claim or fail.
            log.warning("task.ignored", reason="id or versionId not of the FHIR id type")
            return
        with bound_context(task_id=task_id):
            # Nothing here needs two statements to commit together: the claim's insert either
            # wins or finds the row it lost to, and that row is only read. A new Task version
            # (the usual case) costs one statement: the claim's insert.
            if await repo.record_task_seen(
                self.database,
                task_id=task_id,
                task_version=version,
                role="incoming",
                status=CLAIMING,
            ):
                self._claimed_here[(task_id, version)] = None
                while len(self._claimed_here) > _CLAIMS_REMEMBERED:
                    self._claimed_here.popitem(last=False)
            else:
                async with self.database.autocommit() as session:
                    seen = await repo.get_task_seen(session, task_id, version)
                if seen is not None and seen.status != CLAIMING:
                    return
                if (
                    seen is not None
                    and (task_id, version) not in self._claimed_here
                    and _claimed_moments_ago(seen)
                ):
                    # Another replica (they all receive every Task) is taking it in right
                    # now: no second in-progress PUT racing it. A claim a crash left behind
                    # is older, and taken up again.
                    log.info("task.claimed_elsewhere", reason="claimed moments ago")
                    raise ResourceDeferredError(
                        f"Task/{task_id} was claimed by another replica moments ago"
                    )
            key = (task_id, version)
            if key in self._working:
                return  # the sweeps are on this claim now; they defer it again if they fail
            log.info("task.received", version=version)
            self._working.add(key)
            try:
                await self._isolated(task_id, version, self._take_in(task, task_id, version))
            except BridgeError as exc:
                if exc.retryable:
                    # The PUT in-progress may have gone through before the store failed: then
                    # no catch-up (they ask for requested Tasks) finds it again. The sweeps
                    # take the claim up, soon.
                    self._defer(repo.TaskSeenRecord(task_id, version, "incoming", CLAIMING, None))
                raise
            finally:
                self._working.discard(key)

    async def _isolated(self, task_id: str, version: str, work: Awaitable[None]) -> None:
        """Run the intake of one Task version. A server error on it (a 5xx other than 502,
        503 and 504, which say the server is away) is raised again, retryable: the claim
        stays and a later catch-up takes it up while the Tasks behind it go on. Only when the
        server has answered so for :data:`SERVER_ERROR_ATTEMPTS` tries spread over at least
        :data:`SERVER_ERROR_SPAN` (a Task it chokes on, not a database outage) is the Task
        recorded ``skipped`` with the reason."""
        try:
            await work
        except RemoteError as exc:
            if exc.status is None or exc.status < 500 or exc.status in _OUTAGE:
                raise  # the server is away or busy: no verdict on this Task
            claim = (task_id, version)
            now = asyncio.get_running_loop().time()
            count, first = self._server_errors.get(claim, (0, now))
            count += 1
            self._server_errors[claim] = (count, first)
            if count < SERVER_ERROR_ATTEMPTS or now - first < SERVER_ERROR_SPAN:
                raise RemoteError(str(exc), retryable=True, status=exc.status) from exc
            del self._server_errors[claim]
            await self._skip(
                task_id,
                version,
                f"the FHIR server answered {exc.status} {count} times over "
                f"{(now - first) / 60:.0f} minutes while this Task was taken in",
            )

    async def _take_in(self, task: dict[str, Any], task_id: str, version: str) -> None:
        # Bounds first: nothing else may walk, copy or store a hostile Task before this; then
        # the JSON types of what the bridge reads (a DSF server could not even parse others).
        violation = bounds_violation(task, self.limits) or shape_violation(task)
        if violation is not None:
            await self._fail(task, version, violation, hostile=True)
            return
        # As the DSF BPE: a Task without a business key gets one before anything else, so the
        # failed Task carries it too (DSF's profiles require one on in-progress and failed).
        given = input_values(task, BUSINESS_KEY)
        new_business_key = not (given and isinstance(given[0], str))
        business_key = str(uuid.uuid4()) if new_business_key else str(given[0])
        task = updated_task(task, status=str(task.get("status")), business_key=business_key)
        try:
            message = read_message(task)
            refusal = (
                _unfit(message, requester_label(task))
                or unstorable(task)
                or await self._refusal(task, message)
            )
        except TaskFormatError as exc:
            await self._fail(task, version, str(exc))
            return
        if refusal is not None:
            await self._fail(task, version, refusal)
            return
        business_key = message.business_key or business_key
        in_progress = updated_task(task, status="in-progress", business_key=business_key)
        try:
            result = await self.client.update(in_progress, if_match=int(version))
        except RemoteError as exc:
            if exc.status in (409, 412) or _refused(exc):
                # Taken already: by another replica (DSF checks authorization before versions,
                # so the loser of the race hears 403 "modified: Task.input", not 412), or by
                # this very PUT, repeated after its first answer was lost.
                server = await self._server_state(task_id, version)
                if server == "in-progress":
                    # Ours or a replica's: deliver it from the server's copy, as a recovery
                    # does. A Task version is delivered once, whoever gets there first; the
                    # claim row, shared by the replicas, is never marked lost under a winner
                    # still at work.
                    log.info("task.claimed_elsewhere", reason=f"in-progress PUT: {exc}")
                    await self._recover(
                        repo.TaskSeenRecord(task_id, version, "incoming", CLAIMING, None)
                    )
                    return
                if server == "moved-on":
                    await self._mark(task_id, version, LOST)
                    log.info("task.claimed_elsewhere", reason=f"in-progress PUT: {exc}")
                    return
                if exc.status in (409, 412) or server is None:
                    raise RemoteError(str(exc), retryable=True, status=exc.status) from exc
                # As the DSF BPE: the Task is failed with DSF's words; one Task the server
                # will not take must not stop the intake of all the others.
                await self._fail(
                    task, version, f"Unable to update Task to status 'in-progress': {exc}"
                )
                return
            raise
        new_version = str(result.version or int(version) + 1)
        in_progress["meta"] = {**(in_progress.get("meta") or {}), "versionId": new_version}
        if self._remember is not None and result.resource is not None:
            self._remember(result.resource)
        await self._deliver(
            in_progress,
            task_id=task_id,
            version=version,
            new_version=new_version,
            message=message,
            business_key=business_key,
            new_business_key=new_business_key,
        )

    async def _server_state(self, task_id: str, version: str) -> str | None:
        """Where the server's Task stands against our claim of ``version``: ``requested``
        (still as claimed), ``in-progress`` (taken in by someone), ``moved-on`` (ended, or a
        newer version to claim anew), or ``None`` (unreadable now)."""
        try:
            current = await self.client.read("Task", task_id)
        except RemoteError:
            return None
        now = str((current.get("meta") or {}).get("versionId") or "")
        status = current.get("status")
        if status == "requested" and now == version:
            return "requested"
        return "in-progress" if status == "in-progress" else "moved-on"

    async def _refusal(self, task: Mapping[str, Any], message: TaskMessage) -> str | None:
        # "Process not found" first: the DSF BPE's words, which Java sites' operators know.
        # Tasks route by the version in instantiatesCanonical: several versions of a process
        # run side by side (an instance started on 1.0 finishes on 1.0 after 1.1 arrives).
        versions = self.runtime.versions(message.process.key)
        if not versions:
            return (
                f"Process not found: {shortened(message.process.canonical)} is not deployed "
                f"at this site ({self.local_organization}); ask its administrator to install "
                "the plugin"
            )
        if message.process.version not in versions:
            return (
                f"Process not found: {message.process.key} runs in version "
                f"{', '.join(versions)} at this site, the Task asks for "
                f"{shortened(message.process.version)}"
            )
        if self.authorizer is not None:
            return await self.authorizer.denied(task, message)
        return None

    async def _deliver(
        self,
        task: dict[str, Any],
        *,
        task_id: str,
        version: str,
        new_version: str,
        message: TaskMessage,
        business_key: str,
        new_business_key: bool = False,
    ) -> None:
        """``new_business_key``: the Task had none, ``business_key`` was made up for it."""
        try:
            instance_id = await self.runtime.deliver(
                message.process.key,
                version=message.process.version,
                message_name=message.message_name,
                business_key=business_key,
                new_business_key=new_business_key,
                correlation_key=message.correlation_key,
                variables=task_variables(task),
                task_id=task_id,
                task_version=new_version,
                actor=requester_label(task),
                claimed_version=version,
                requester=requester_identifier(task),
            )
        except MessageHeldError:
            await self._hold(task_id, version, business_key)
            return
        except TaskAlreadyDeliveredError:
            # Another replica delivered it (both recovered one claim): once is enough.
            log.info("task.claimed_elsewhere", reason="delivered already")
            return
        except (CorrelationError, ProcessExecutionError) as exc:
            if await self._delivered(task_id, new_version):
                # Another replica delivered it a moment ago (both recovered one claim): its
                # instance has moved on, which is why this delivery found nothing to reach.
                log.info("task.claimed_elsewhere", reason="delivered already")
                return
            await self._fail(task, new_version, str(exc), claimed_version=version)
            return
        log.info("task.accepted", instance_id=instance_id, business_key=business_key)

    async def _delivered(self, task_id: str, version: str) -> bool:
        async with self.database.transaction() as session:
            delivered = await repo.get_task_seen(session, task_id, version)
        return delivered is not None and delivered.instance_id is not None

    # -- replies held until their send resolves -------------------------------------------

    async def _hold(self, task_id: str, version: str, business_key: str) -> None:
        """Keep the claim ``held`` (durably: a restart delivers it again) and watch its send."""
        claim = (task_id, version)
        async with self.database.transaction() as session:
            # Only a claim this run is taking in may become held: never one another replica
            # has finished meanwhile.
            if not await repo.set_task_seen_status(
                session, task_id, version, HELD, only_from=(CLAIMING, HELD)
            ):
                return
            if claim not in self._audited_held:
                await self._audit(
                    session,
                    task_id,
                    "task.held",
                    "a send of the instance it answers is unresolved; delivered "
                    "again once that send is recorded delivered or failed",
                )
        if claim not in self._audited_held:
            self._audited_held.add(claim)
            log.info("task.held")
        self._held[claim] = _Held(business_key)
        # The send may have resolved between the runtime's look and this commit, before a
        # listener could see the held claim: look once more after it.
        if not await self.runtime.sends_in_flight(business_key):
            self._send_resolved()

    def _send_resolved(self) -> None:
        """The runtime committed a step: deliver held replies whose send has resolved."""
        if not self._held:
            return
        self._again = True
        if self._redelivery is None or self._redelivery.done():
            # A context of its own: the round must not log with the identifiers of the
            # instance whose commit woke it.
            self._redelivery = asyncio.get_running_loop().create_task(
                self._deliver_held(), context=contextvars.Context()
            )

    async def _deliver_held(self) -> None:
        try:
            while self._again:
                self._again = False
                await self._delivery_round()
        except Exception:  # a round must never die silently: the claims stay held
            log.exception("task.held_round_failed")
            self._retry_later(_HELD_RETRY)

    async def _delivery_round(self) -> None:
        now = asyncio.get_running_loop().time()
        resolved: dict[str, bool] = {}
        for claim, held in list(self._held.items()):
            if held.not_before > now:
                self._retry_later(held.not_before - now)
                continue
            key = held.business_key
            if key is None:
                resolved[""] = True
            elif key not in resolved:
                resolved[key] = not await self.runtime.sends_in_flight(key)
            if not resolved[key or ""]:
                continue
            del self._held[claim]
            task_id, version = claim
            with bound_context(task_id=task_id):
                try:
                    await self._deliver_one(task_id, version)
                except Exception as exc:  # one held reply must not stop the others
                    held.failures += 1
                    delay = min(_HELD_RETRY * 2 ** (held.failures - 1), _HELD_RETRY_MAX)
                    held.not_before = asyncio.get_running_loop().time() + delay
                    self._held.setdefault(claim, held)
                    log.warning(
                        "task.held_delivery_failed",
                        error=str(exc) or type(exc).__name__,
                        attempt=held.failures,
                        retry_in=delay,
                    )
                    self._retry_later(delay)

    async def _deliver_one(self, task_id: str, version: str) -> None:
        """Take a held claim (atomically: one replica, one delivery) and deliver it again."""
        key = (task_id, version)
        if key in self._working:
            return  # a sweep or a catch-up is on it now; the next round looks again
        self._working.add(key)
        try:
            await self._take_held(task_id, version)
        finally:
            self._working.discard(key)

    async def _take_held(self, task_id: str, version: str) -> None:
        async with self.database.transaction() as session:
            if not await repo.set_task_seen_status(
                session, task_id, version, CLAIMING, only_from=(HELD,)
            ):
                return  # delivered meanwhile, by this replica or another
            claim = await repo.get_task_seen(session, task_id, version)
        if claim is None:  # pragma: no cover - the row was just updated
            return
        try:
            await self._recover(claim)
        except Exception:
            async with self.database.transaction() as session:
                await repo.set_task_seen_status(
                    session, task_id, version, HELD, only_from=(CLAIMING,)
                )
            raise

    def _retry_later(self, delay: float) -> None:
        """One timer at a time wakes the rounds for claims that wait out a back-off."""
        if self._timer is not None:
            return

        def fire() -> None:
            self._timer = None
            self._send_resolved()

        self._timer = asyncio.get_running_loop().call_later(max(delay, 0.05), fire)

    async def sweep_held(self) -> int:
        """Take up every ``held`` claim in the store that this run does not watch (held by a
        replica that stopped, or whose send another replica resolved): the next round
        delivers it if its send has resolved (its Task is read again). Returns how many."""
        async with self.database.transaction() as session:
            rows = await repo.tasks_with_status(session, "incoming", HELD)
        added = 0
        for row in rows:
            claim = (row.task_id, row.task_version)
            if claim not in self._held:
                self._held[claim] = _Held(None)
                added += 1
        if self._held:
            self._send_resolved()
        return added

    def _defer(self, claim: repo.TaskSeenRecord) -> None:
        self._deferred[(claim.task_id, claim.task_version)] = claim
        self._retry_soon.set()

    async def retry_deferred(self) -> int:
        """Try again the claims whose recovery at start-up met a server error on their Task,
        or whose intake met a retryable failure; return how many are still deferred."""
        for claim in list(self._deferred.values()):
            try:
                await self._recover_or_defer(claim)
            except BridgeError as exc:
                log.warning("task.recovery_deferred", task_id=claim.task_id, error=str(exc))
                if _outage(exc):
                    break  # the server or the store is away: every other claim would wait too
                # an error about this Task alone: the others are tried
        return len(self._deferred)

    async def run_held_sweeps(
        self, stop: asyncio.Event, interval: float = 30.0, soon: float = 1.0
    ) -> None:
        """:meth:`sweep_held` every ``interval`` seconds until ``stop``: a reply held by one
        replica is delivered even when another resolved its send (listeners are per
        process). Deferred claims are tried again too: ``soon`` after one was deferred, then
        with the delay doubling up to ``interval`` while they stay deferred."""
        delay = soon
        while not stop.is_set():
            self._retry_soon.clear()
            timeout = delay if self._deferred else interval
            await _first_of([stop.wait(), self._retry_soon.wait()], timeout)
            if stop.is_set():
                return
            if self._retry_soon.is_set():  # just deferred: give its cause a moment to pass
                delay = soon
                await _first_of([stop.wait()], soon)
                if stop.is_set():
                    return
            try:
                await self.sweep_held()
                still_deferred = await self.retry_deferred()
            except BridgeError as exc:
                log.warning("task.held_sweep_failed", error=str(exc))
                still_deferred = True
            delay = min(delay * 2, interval) if still_deferred else soon

    async def aclose(self) -> None:
        """Stop the delivery rounds and their timer (the claims stay held in the store)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._redelivery is not None and not self._redelivery.done():
            self._redelivery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._redelivery

    async def _fail(
        self,
        task: Mapping[str, Any],
        current_version: str,
        error: str,
        *,
        claimed_version: str | None = None,
        hostile: bool = False,
    ) -> None:
        """PUT the Task ``failed`` with ``error``; the claim row records the outcome.

        ``hostile``: the Task breaks a bound or has elements of the wrong JSON type. As DSF's
        profiles want, it gets a business key if it has none (and a list of inputs); when the
        server will not take it back failed, it is skipped for good rather than tried again at
        every start."""
        task_id = str(task.get("id"))
        business_key = None
        if hostile and not input_values(task, BUSINESS_KEY):
            business_key = str(uuid.uuid4())
        failed = updated_task(task, status="failed", business_key=business_key, error=error)
        try:
            await self.client.update(failed, if_match=int(current_version), return_minimal=True)
        except RecursionError:
            if not hostile:
                raise
            # Too deep even to encode as JSON: it cannot be set failed from here.
            await self._skip(
                task_id, claimed_version or current_version, f"{error}; too deep to set failed"
            )
            return
        except RemoteError as exc:
            if exc.status in (409, 412):
                await self._mark(task_id, claimed_version or current_version, LOST)
                return
            if hostile and (_refused(exc) or exc.status == 500):
                # A server error on this Task alone is as final as a refusal (it may choke on
                # what we were sent): trying again at every start would stop nothing but us.
                await self._skip(
                    task_id,
                    claimed_version or current_version,
                    f"{error}; the FHIR server refused to set it failed: {exc}",
                )
                return
            if not _refused(exc):
                raise  # the server is down or busy: the claim stays, a later round retries
            # The server refuses even the failed Task: record it and go on with the others.
            await self._mark(task_id, claimed_version or current_version, REFUSED)
            async with self.database.transaction() as session:
                await self._audit(
                    session,
                    task_id,
                    "task.refused",
                    f"{error}; the FHIR server refused to set it failed: {exc}",
                )
            log.error("task.refused", error=error, refusal=str(exc))
            return
        async with self.database.transaction() as session:
            version = claimed_version or current_version
            await self._settle(
                session, task_id, version, status=FAILED, action="task.failed", reason=error
            )
        log.warning("task.failed", error=error)

    async def _skip(self, task_id: str, version: str, reason: str) -> None:
        """Record the Task version ``skipped`` for good, with an audit event saying why."""
        async with self.database.transaction() as session:
            await self._settle(
                session, task_id, version, status=SKIPPED, action="task.skipped", reason=reason
            )
        log.error("task.skipped", reason=reason)

    async def _settle(
        self,
        session: Session,
        task_id: str,
        version: str,
        *,
        status: TaskSeenStatus,
        action: str,
        reason: str,
    ) -> None:
        """Set a Task version's final intake status, with an audit event that records it."""
        record: Records | None = None
        if await repo.set_task_seen_status(session, task_id, version, status):
            seen = await repo.get_task_seen(session, task_id, version)
            instance_id = seen.instance_id if seen is not None else None
            record = task_record(
                task_id, version, "incoming", status=status, instance_id=instance_id
            )
        await self._audit(session, task_id, action, reason, record=record)

    async def _audit(
        self,
        session: Session,
        task_id: str,
        action: str,
        reason: str,
        *,
        record: Records | None = None,
    ) -> None:
        """An audit event of this site's intake about ``Task/<task_id>``; ``record``: the
        Task version's row as this transaction leaves it."""
        await append_event(
            session,
            actor=f"organization:{self.local_organization}",
            subject=f"Task/{task_id}",
            action=action,
            reason=reason,
            record=record,
        )

    async def _mark(
        self,
        task_id: str,
        version: str,
        status: TaskSeenStatus,
        *,
        instance_id: str | None = None,
    ) -> None:
        async with self.database.transaction() as session:
            await repo.set_task_seen_status(
                session,
                task_id,
                version,
                status,
                instance_id=instance_id,
                # Lost to another replica, or refused: only a claim still being taken in says
                # so, never one the winner has held, taken in or failed meanwhile.
                only_from=(CLAIMING, REFUSED) if status in (LOST, REFUSED) else None,
            )

    async def recover(self) -> int:
        """Finish the intake of Tasks a previous run left ``claiming``, deliver again the
        replies it held, and try again those the server refused to update (as the DSF BPE
        takes up every requested Task after a restart); return how many."""
        async with self.database.transaction() as session:
            claims = await repo.tasks_with_status(session, "incoming", CLAIMING)
            claims += await repo.tasks_with_status(session, "incoming", HELD)
            claims += await repo.tasks_with_status(session, "incoming", REFUSED)
        for claim in claims:
            await self._recover_or_defer(claim)
        return len(claims)

    async def _recover_or_defer(self, claim: repo.TaskSeenRecord) -> None:
        """:meth:`_recover` one claim; a server error on that Task alone defers it to the
        sweeps (one Task must not stop start-up); an outage is raised."""
        key = (claim.task_id, claim.task_version)
        if key in self._working:
            return  # a catch-up is taking it in now; a deferred claim stays deferred
        self._working.add(key)
        with bound_context(task_id=claim.task_id):
            try:
                await self._isolated(claim.task_id, claim.task_version, self._recover(claim))
            except RemoteError as exc:
                if exc.status is None or exc.status in _OUTAGE:
                    raise
                self._deferred[key] = claim
                log.warning("task.recovery_deferred", error=str(exc))
                return
            finally:
                self._working.discard(key)
        self._deferred.pop(key, None)

    async def _recover(self, claim: repo.TaskSeenRecord) -> None:
        async with self.database.transaction() as session:
            now = await repo.get_task_seen(session, claim.task_id, claim.task_version)
        if now is None or now.status != claim.status:
            return  # decided meanwhile (by another replica, say): nothing left to recover
        try:
            task = await self.client.read("Task", claim.task_id)
        except RemoteError as exc:
            if exc.status not in (404, 410):
                raise
            # Deleted by an administrator, or an id from a bogus frame: nothing left to take
            # in or to fail, and asking at every start would only stop the bridge.
            await self._skip(
                claim.task_id,
                claim.task_version,
                f"the FHIR server answers {exc.status} for Task/{claim.task_id}: "
                "deleted, or never there",
            )
            return
        status = task.get("status")
        version = str((task.get("meta") or {}).get("versionId") or "")
        if status == "requested" and version == claim.task_version:
            await self._take_in(task, claim.task_id, claim.task_version)
            return
        ours = version.isdigit() and int(version) == int(claim.task_version) + 1
        if status == "in-progress" and ours:
            # Our PUT went through; did the instance start before the crash?
            async with self.database.transaction() as session:
                delivered = await repo.get_task_seen(session, claim.task_id, version)
            if delivered is not None and delivered.instance_id is not None:
                await self._mark(
                    claim.task_id, claim.task_version, TAKEN_IN, instance_id=delivered.instance_id
                )
                return
            violation = bounds_violation(task, self.limits) or shape_violation(task)
            if violation is not None:
                await self._fail(
                    task, version, violation, claimed_version=claim.task_version, hostile=True
                )
                return
            try:
                message = read_message(task)
                error = _unfit(message, requester_label(task)) or unstorable(task)
            except TaskFormatError as exc:
                error = str(exc)
            if error is not None:
                await self._fail(task, version, error, claimed_version=claim.task_version)
                return
            business_key = message.business_key or str(uuid.uuid4())
            await self._deliver(
                task,
                task_id=claim.task_id,
                version=claim.task_version,
                new_version=version,
                message=message,
                business_key=business_key,
                new_business_key=message.business_key is None,
            )
            return
        await self._mark(claim.task_id, claim.task_version, LOST)


class SqlCursorStore:
    """The subscription's catch-up cursor, kept in the store's ``sync_cursors`` table."""

    def __init__(self, database: Database) -> None:
        self.database = database

    async def load(self, resource_type: str) -> dt.datetime | None:
        async with self.database.transaction() as session:
            return await repo.get_cursor(session, resource_type)

    async def save(self, resource_type: str, last_updated: dt.datetime) -> None:
        async with self.database.transaction() as session:
            await repo.advance_cursor(session, resource_type, last_updated)


async def _first_of(waits: list[Coroutine[Any, Any, Any]], seconds: float) -> None:
    """Until the first of ``waits`` ends or ``seconds`` pass; the others are dropped."""
    futures = {asyncio.ensure_future(w) for w in waits}
    try:
        await asyncio.wait(futures, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            future.cancel()


def _outage(exc: BridgeError) -> bool:
    """Whether ``exc`` says the FHIR server or the store is away, not that one Task is bad."""
    if isinstance(exc, RemoteError):
        return exc.status is None or exc.status in _OUTAGE
    return isinstance(exc, StoreError) and exc.retryable
