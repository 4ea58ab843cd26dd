"""The outbox worker: performs the effects a committed step queued (a Task sent to another
site, the site's own Tasks completed or failed, user task forms created) and records each in
the store, a send in the same transaction that steps its instance on.

A failure the network may heal is tried again after ``runtime.outbox_retry_delays`` (effects on
the site's own FHIR server for ever); one that will not heal fails the effect and, for a send
or a form, steps the instance on with the error. A send tried again first looks for the Task
an earlier try created (``maybe_delivered``), so a Task is never posted twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from dsf_bridge.dsf.vocabulary import parse_instant
from dsf_bridge.engine.events import Event, HandlerCompleted, HandlerFailed
from dsf_bridge.errors import BridgeError, ConcurrencyError, ProcessExecutionError, StoreError
from dsf_bridge.logs import bound_context
from dsf_bridge.runtime.faults import FaultPoint, InstanceGoneError
from dsf_bridge.runtime.ports import OutgoingTask, TaskGateway, UserTaskRequest
from dsf_bridge.store import Database, Session, append_event, task_record
from dsf_bridge.store import repository as repo
from dsf_bridge.store.kinds import OutboxKind, TaskSeenStatus

if TYPE_CHECKING:
    from dsf_bridge.runtime.processes import RuntimeSettings
    from dsf_bridge.runtime.stepping import InstanceStepper

__all__ = ["OutboxWorker"]

log = structlog.get_logger("dsf_bridge.runtime")


class _Runtime(Protocol):
    """What the outbox worker uses of its runtime: the store, the gateway, the clock, and the
    one way to step an instance (:meth:`InstanceStepper.apply`)."""

    database: Database
    gateway: TaskGateway
    owner: str
    settings: RuntimeSettings

    def clock(self) -> dt.datetime: ...

    def _fault(self, point: FaultPoint, detail: str) -> None: ...

    @property
    def stepper(self) -> InstanceStepper: ...


class OutboxWorker:
    """Performs leased outbox entries for ``runtime``."""

    def __init__(self, runtime: _Runtime) -> None:
        self.runtime = runtime

    async def perform(self, entry: repo.ClaimedOutboxEntry) -> None:
        """Perform one leased entry: retried, failed (the instance told) or recorded done."""
        payload = entry.payload
        with bound_context(
            instance_id=entry.instance_id,
            business_key=_text(payload.get("business_key")),
            task_id=_text(payload.get("task_id")),  # the Task a finish updates
            element_id=_text(payload.get("element_id")),
        ):
            await self._perform(entry)

    async def _perform(self, entry: repo.ClaimedOutboxEntry) -> None:
        try:
            result = await self._perform_remote(entry)
        except Exception as raised:
            exc = raised if isinstance(raised, BridgeError) else _crashed(raised)
            retries = self.runtime.settings.outbox_retry_delays
            # Effects on the site's own FHIR server wait out its outages, as the DSF BPE's
            # withRetryForever does (DefaultUserTaskListener, the Task updates): giving up
            # would fail or strand an instance because the local server restarted.
            forever = entry.kind.local
            # Counted in refused tries, not leases: a shutdown or a lost store in between
            # does not bring the giving up closer.
            failure = entry.failures + 1
            if exc.retryable and retries and (forever or failure <= len(retries)):
                retry_at = self.runtime.clock() + retries[min(failure, len(retries)) - 1]
                async with self.runtime.database.transaction() as session:
                    await repo.retry_outbox(
                        session,
                        entry.idempotency_key,
                        self.runtime.owner,
                        error=str(exc),
                        retry_at=retry_at,
                    )
                log.warning("effect.retried", kind=entry.kind, attempt=failure, error=str(exc))
                return
            status = getattr(exc, "status", None)
            await self._effect_failed(entry, str(exc), status=status)
            return
        self.runtime._fault(FaultPoint.EFFECT_PERFORMED, entry.kind)
        try:
            await self._record_effect(entry, result)
        except StoreError as exc:
            if not exc.retryable or isinstance(exc, ConcurrencyError):
                raise
            # Done on the other side, not recorded here. Given back at once, the entry is
            # tried again when the store is back (a send first looks for the Task it created)
            # instead of after the lease; if the store is still away, the lease runs out.
            log.warning("effect.unrecorded", kind=entry.kind, error=str(exc))
            delays = self.runtime.settings.outbox_retry_delays  # backing off while the store fails
            interrupted = max(1, entry.attempts - entry.failures)
            retry_at = self.runtime.clock() + delays[min(interrupted, len(delays)) - 1]
            with contextlib.suppress(BridgeError):
                async with self.runtime.database.transaction() as session:
                    await repo.retry_outbox(
                        session,
                        entry.idempotency_key,
                        self.runtime.owner,
                        error=str(exc),
                        retry_at=retry_at,
                        failed=False,
                    )

    async def _record_effect(self, entry: repo.ClaimedOutboxEntry, result: str) -> None:
        """Record a performed effect done; a send also steps its instance on, in one commit."""
        payload = entry.payload
        if entry.kind.repeats_harmlessly:
            # Nothing waits for this mark: it goes with the next transaction (no round trip of
            # its own). Lost in a crash, the Task is read again after the lease and found
            # finished, as when the crash came before the mark.
            repo.mark_outbox_done_soon(
                self.runtime.database,
                entry.idempotency_key,
                self.runtime.owner,
                result=result,
                now=self.runtime.clock(),
            )
            return
        if entry.kind is not OutboxKind.SEND_TASK or entry.instance_id is None:
            await repo.mark_outbox_done(  # one UPDATE, committed on its own
                self.runtime.database,
                entry.idempotency_key,
                self.runtime.owner,
                result=result,
                now=self.runtime.clock(),
            )
            return

        async def record_send(session: Session) -> None:
            await repo.mark_outbox_done(
                session,
                entry.idempotency_key,
                self.runtime.owner,
                result=result,
                now=self.runtime.clock(),
            )
            sent = _created_task_id(result)
            await repo.record_task_seen(
                session,
                task_id=sent,
                task_version="1",
                role="outgoing",
                status=TaskSeenStatus.REQUESTED,
                instance_id=entry.instance_id,
            )
            await append_event(
                session,
                actor=self.runtime.owner,
                subject=f"instance/{entry.instance_id}",
                action="task.sent",
                reason=f"{payload['message_name']} to {_target_label(payload)} as {result}",
                payload=payload,
                record=task_record(
                    sent,
                    "1",
                    "outgoing",
                    status=TaskSeenStatus.REQUESTED,
                    instance_id=entry.instance_id,
                ),
            )

        # The send is recorded done in the transaction that steps the instance on: between two
        # commits the instance would neither send nor wait, and a fast reply (or a crash) in
        # that gap would find nothing to correlate with.
        token = str(payload["token"])
        await self.runtime.stepper.apply(
            entry.instance_id,
            lambda now: HandlerCompleted(
                token, now, payload.get("updates") or {}, payload.get("local_updates") or {}
            ),
            action="send.completed",
            reason=f"{payload['message_name']} at {payload['element_id']}",
            also=record_send,
        )

    async def _perform_remote(self, entry: repo.ClaimedOutboxEntry) -> str:
        payload = entry.payload
        if entry.kind is OutboxKind.SEND_TASK:
            return await self.runtime.gateway.send_task(
                OutgoingTask(
                    instance_id=entry.instance_id or "",
                    business_key=str(payload["business_key"]),
                    instantiates_canonical=str(payload["instantiates_canonical"]),
                    message_name=str(payload["message_name"]),
                    profile=str(payload["profile"]),
                    correlation_key=payload.get("correlation_key"),
                    target=payload.get("target"),
                    inputs=tuple(payload.get("inputs") or ()),
                    authored_on=parse_instant(payload.get("authored_on")),
                    # The lease counts attempts: from the second on, an earlier one may have
                    # delivered the Task (a crash or a lost answer after the POST).
                    maybe_delivered=entry.attempts > 1,
                )
            )
        if entry.kind is OutboxKind.COMPLETE_TASK:
            await self.runtime.gateway.complete_task(
                str(payload["task_id"]), outputs=payload.get("outputs") or ()
            )
            return str(payload["task_id"])
        if entry.kind is OutboxKind.FAIL_TASK:
            await self.runtime.gateway.fail_task(
                str(payload["task_id"]),
                str(payload["message"]),
                outputs=payload.get("outputs") or (),
            )
            return str(payload["task_id"])
        if entry.kind is OutboxKind.CREATE_USER_TASK:
            return await self.runtime.gateway.create_user_task(
                UserTaskRequest(
                    instance_id=entry.instance_id or "",
                    business_key=str(payload["business_key"]),
                    user_task_id=str(payload["user_task_id"]),
                    form_key=str(payload["form_key"]),
                    item_texts={
                        str(k): str(v) for k, v in (payload.get("item_texts") or {}).items()
                    },
                )
            )
        if entry.kind is OutboxKind.CANCEL_USER_TASK:
            await self.runtime.gateway.cancel_user_task(str(payload["user_task_id"]))
            return str(payload["user_task_id"])
        raise ProcessExecutionError(f"unknown outbox kind {entry.kind!r}")  # pragma: no cover

    async def _effect_failed(
        self, entry: repo.ClaimedOutboxEntry, error: str, *, status: int | None = None
    ) -> None:
        payload = entry.payload

        async def record_failure(session: Session) -> None:
            await repo.mark_outbox_failed(
                session,
                entry.idempotency_key,
                self.runtime.owner,
                error=error,
                now=self.runtime.clock(),
            )
            await append_event(
                session,
                actor=self.runtime.owner,
                subject=f"instance/{entry.instance_id}",
                action="effect.failed",
                reason=f"{entry.kind}: {error}",
                payload=payload,
            )

        log.error("effect.failed", kind=entry.kind, error=error, instance_id=entry.instance_id)
        event: Callable[[dt.datetime], Event] | None = None
        action = reason = ""
        if entry.kind is OutboxKind.SEND_TASK and entry.instance_id is not None:
            token = str(payload["token"])
            target = _target_label(payload)
            reason = f"Sending Task {payload['message_name']} to {target} failed: {error}"
            # The send handler may have asked for a BPMN error instead of a failed instance.
            errors = payload.get("failure_errors") or {}
            code = errors.get(str(status)) or errors.get("default")
            action = "send.failed"

            def event(now: dt.datetime) -> Event:
                return HandlerFailed(token, now, code, reason)

        elif entry.kind is OutboxKind.CREATE_USER_TASK and entry.instance_id is not None:
            # As DSF's DefaultUserTaskListener: no form, no user task; the instance fails and
            # its Tasks with it, saying why (never a Task left in-progress).
            user_task = str(payload.get("token") or str(payload["user_task_id"]).rsplit("/", 1)[-1])
            action, reason = "user_task.failed", error

            element = str(payload.get("element_id") or "")

            def event(now: dt.datetime) -> Event:
                return HandlerFailed(user_task, now, None, error, user_task=element or None)

        if event is not None and entry.instance_id is not None:
            # One transaction records the failure and steps the instance: a crash between two
            # commits would leave the effect failed and the instance waiting for nothing.
            try:
                await self.runtime.stepper.apply(
                    entry.instance_id, event, action=action, reason=reason, also=record_failure
                )
                return
            except InstanceGoneError:
                pass  # the instance is gone: record the failure alone
        async with self.runtime.database.transaction() as session:
            await record_failure(session)
        self.runtime.stepper.sends_resolved()


def _crashed(exc: Exception) -> BridgeError:
    """A bug of the bridge's own with an effect (a payload it cannot read, say), as a failure
    the effect's retries meet: tried again later; a send failed (its instance told) past its
    retries; an update of the site's own Task or form tried again for ever, as an outage is
    waited out, so that a bridge with the bug fixed still finishes it. Instead of stopping
    the worker loop and keeping the lease until it runs out."""
    log.error("effect.crashed", error_type=type(exc).__name__, exc_info=exc)
    return ProcessExecutionError(f"internal error: {type(exc).__name__}: {exc}", retryable=True)


def _created_task_id(result: str) -> str:
    """The id of a Task the gateway created: it answers with an id or the ``Location`` URL
    (``https://host/fhir/Task/<id>/_history/1``), and ``tasks_seen`` keys are ids (64
    characters at most; PostgreSQL refuses longer ones)."""
    parts = result.rstrip("/").split("/")
    if "Task" in parts:
        index = len(parts) - 1 - parts[::-1].index("Task")
        if index + 1 < len(parts):
            return parts[index + 1]
    return result


def _target_label(payload: Mapping[str, Any]) -> str:
    target = payload.get("target") or {}
    for key in ("organizationIdentifier", "organizationIdentifierValue", "endpointUrl"):
        if isinstance(target, Mapping) and target.get(key):
            return str(target[key])
    return "the target"


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
