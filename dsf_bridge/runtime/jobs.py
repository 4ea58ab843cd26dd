"""The job worker: runs leased jobs (asynchronous continuations, handlers, send handlers,
signals thrown by other instances, operators' requests) and steps their instances on.

A job whose handler ran but whose step could not be written because the store went away is
given back at once without using a retry (five times at most); any other failure uses one of
the job's retries, and a job out of retries stays, parked, for an operator (Camunda's failed
job with no retries left).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog

from dsf_bridge.engine import state as instance_state
from dsf_bridge.engine.correlation import ALTERNATIVE_BUSINESS_KEY, signal_waits
from dsf_bridge.engine.events import (
    CallHandler,
    Event,
    IncidentRetried,
    InstanceCancelled,
    JobDue,
    SendTask,
    SignalReceived,
)
from dsf_bridge.errors import BridgeError, ConcurrencyError, ProcessExecutionError, StoreError
from dsf_bridge.logs import bound_context
from dsf_bridge.plugins.invocation import Invocation, invoke
from dsf_bridge.runtime.deployments import DeployedProcess
from dsf_bridge.runtime.faults import FaultPoint, InstanceGoneError
from dsf_bridge.runtime.stepping import step_context, task_id_of
from dsf_bridge.runtime.workers import run_all
from dsf_bridge.store import Session, append_event
from dsf_bridge.store import repository as repo
from dsf_bridge.store.kinds import JobKind, OutboxKind
from dsf_bridge.telemetry import STEP_SECONDS, timed

if TYPE_CHECKING:
    from dsf_bridge.runtime.processes import ProcessRuntime

__all__ = ["JobWorker", "handler_action", "handler_reason"]

log = structlog.get_logger("dsf_bridge.runtime")

# How often a job's lease is given back without using a retry because the store went away
# under it (``jobs.interruptions``; other leases, postponements and retries do not count).
_MAX_INTERRUPTIONS = 5
# How soon a job whose instance kept changing under it runs again.
_CONFLICT_BACKOFF = dt.timedelta(milliseconds=100)
# The longest wait before a job whose step crashed (a bug of the bridge's own) runs again,
# unless the retry delay is longer.
_CRASH_BACKOFF_MAX = dt.timedelta(minutes=5)
# How soon a signal job looks again at an instance that was busy between two waits.
_SIGNAL_RECHECK = dt.timedelta(milliseconds=200)
_SIGNAL_PATIENCE = dt.timedelta(seconds=5)


def handler_action(outcome: Invocation) -> str:
    """The audit action of the step a handler's outcome takes."""
    return "handler.completed" if outcome.ok else "handler.failed"


def handler_reason(effect: CallHandler, outcome: Invocation) -> str:
    """The audit reason of the step a handler's outcome takes."""
    return f"{effect.handler} at {effect.element_id}" + (
        "" if outcome.ok else f": {getattr(outcome.event, 'message', '')}"
    )


class JobWorker:
    """Runs leased jobs for ``runtime``, stepping instances through its one way to step
    them (:meth:`InstanceStepper.apply`)."""

    def __init__(self, runtime: ProcessRuntime) -> None:
        self.runtime = runtime
        # The instances whose jobs run now, with how many groups run or wait for each.
        self._instances: dict[str | None, tuple[asyncio.Lock, int]] = {}

    async def run_due(self) -> int:
        """Lease the due jobs and run them concurrently; return how many."""
        now = self.runtime.clock()
        async with self.runtime.database.transaction() as session:
            jobs = await repo.claim_jobs(
                session,
                owner=self.runtime.owner,
                now=now,
                lease=self.runtime.settings.lease,
                limit=self.runtime.settings.batch,
            )
        await run_all(self.exclusive(jobs))
        return len(jobs)

    def exclusive(self, jobs: Sequence[repo.ClaimedJob]) -> list[Awaitable[None]]:
        """One run per instance: instances concurrently (a slow handler, an inference, must
        not hold up the others), the jobs of one instance one after the other in due order,
        as Camunda's exclusive jobs (within this bridge; another replica's steps on the same
        instance are ordered by optimistic locking). Runs for the same instance (a polling
        round's, and the jobs a step queued for right after its commit) wait for each other.
        A job that waited renews its lease before it runs; one whose instance ended meanwhile
        (its jobs were deleted with it) is skipped, so a parallel multi-instance stops at a
        failing send."""
        by_instance: dict[str | None, list[repo.ClaimedJob]] = {}
        for job in jobs:
            by_instance.setdefault(job.instance_id, []).append(job)
        return [self._one_by_one(group) for group in by_instance.values()]

    async def _one_by_one(self, jobs: Sequence[repo.ClaimedJob]) -> None:
        instance_id = jobs[0].instance_id
        lock, users = self._instances.get(instance_id) or (asyncio.Lock(), 0)
        self._instances[instance_id] = (lock, users + 1)
        # Another run on the instance holds the lock or waits for it: this one waits behind
        # it (asyncio's lock is fair), even in the moment its holder has let go.
        waited = users > 0
        failure: BridgeError | None = None
        try:
            async with lock:
                for position, job in enumerate(jobs):
                    try:
                        # A lease taken before a wait (for the jobs before it, or for another
                        # run on the instance) may have run short.
                        if position == 0 and not waited:
                            await self.run_or_retry(job)
                        elif await self._renewed(job):
                            # After another step of the instance: it reads the instance.
                            await self.run_or_retry(replace(job, instance=None))
                    except BridgeError as exc:  # the store failed under it: the others run
                        failure = failure or exc
        finally:
            lock, users = self._instances[instance_id]
            if users == 1:
                del self._instances[instance_id]
            else:
                self._instances[instance_id] = (lock, users - 1)
        if failure is not None:
            raise failure

    async def _renewed(self, job: repo.ClaimedJob) -> bool:
        runtime = self.runtime
        async with runtime.database.transaction() as session:
            held = await repo.renew_job_lease(
                session, job.id, runtime.owner, now=runtime.clock(), lease=runtime.settings.lease
            )
        if not held:
            log.info("job.skipped", job_id=job.id, kind=job.kind, reason="not held")
        return held

    async def run_or_retry(self, job: repo.ClaimedJob) -> None:
        """Run one leased job; a failure uses a retry (or, past them, parks the job)."""
        element_id = job.payload.get("element_id")
        with bound_context(
            instance_id=job.instance_id,
            element_id=str(element_id) if element_id is not None else None,
        ):
            await self._run_or_retry(job)

    async def _run_or_retry(self, job: repo.ClaimedJob) -> None:
        try:
            await self._run_job(job)
        except ConcurrencyError as exc:
            # The instance kept changing under it (many executions of one instance at once):
            # not a failure of the job, so no retry is used up (Camunda's job executor skips
            # the decrement for an OptimisticLockingException too). It runs again shortly.
            log.info("job.postponed", job_id=job.id, kind=job.kind, reason=str(exc))
            await self._give_back(job, _CONFLICT_BACKOFF)
        except StoreError as exc:
            # A store error that repeats (a statement timeout, a full disk) must not rerun the
            # handler for ever: past a few interruptions the job uses its retries, then stays
            # parked out of them (docs/operations.md, "Incidents: jobs out of retries").
            if not exc.retryable or job.interruptions >= _MAX_INTERRUPTIONS:
                await self._job_failed(job, str(exc))
                return
            # The store went away under the job (its handler may have run): not a failure of
            # the job, so no retry is used up. Given back at once, it runs again when the
            # store is back instead of after the lease; if the store is still away, the lease
            # runs out instead.
            log.warning("job.interrupted", job_id=job.id, kind=job.kind, error=str(exc))
            with contextlib.suppress(BridgeError):
                await self._give_back(job, self.runtime.settings.job_retry_delay, interrupted=True)
        except BridgeError as exc:
            await self._job_failed(job, str(exc))
        except Exception as exc:
            # A bug of the bridge's own in this job's step (a handler's errors are outcomes,
            # an engine error undoes the step): logged with its trace, and the job is given
            # back to run again after a back-off (5 s doubling up to 5 minutes), its error
            # shown with it (the instance page), without using a retry. Not parked: a job
            # parked out of retries is no incident an operator can retry, so a bridge with the
            # bug fixed would never finish the instance; this way it does.
            log.exception("job.crashed", job_id=job.id, kind=job.kind)
            delay = self.runtime.settings.job_retry_delay * 2 ** min(max(job.attempts - 1, 0), 6)
            await self._give_back(
                job,
                min(delay, max(_CRASH_BACKOFF_MAX, self.runtime.settings.job_retry_delay)),
                error=f"internal error: {type(exc).__name__}: {exc}",
            )

    async def _give_back(
        self,
        job: repo.ClaimedJob,
        delay: dt.timedelta,
        *,
        interrupted: bool = False,
        error: str | None = None,
    ) -> None:
        """Release the job to run again after ``delay`` without using a retry
        (:func:`repo.postpone_job`); a lease that ran out meanwhile has nothing to give."""
        async with self.runtime.database.transaction() as session:
            with contextlib.suppress(ConcurrencyError):
                await repo.postpone_job(
                    session,
                    job.id,
                    self.runtime.owner,
                    due_at=self.runtime.clock() + delay,
                    interrupted=interrupted,
                    error=error,
                )

    async def _job_failed(self, job: repo.ClaimedJob, error: str) -> None:
        retry_at = self.runtime.clock() + self.runtime.settings.job_retry_delay
        async with self.runtime.database.transaction() as session:
            left = await repo.retry_job(
                session, job.id, self.runtime.owner, error=error, retry_at=retry_at
            )
        log.warning("job.failed", job_id=job.id, kind=job.kind, error=error, retries_left=left)

    async def _run_job(self, job: repo.ClaimedJob) -> None:
        payload = job.payload
        instance_id = job.instance_id
        if instance_id is None:  # pragma: no cover - every job we create belongs to an instance
            raise ProcessExecutionError(f"job {job.id} has no instance")
        if job.kind is JobKind.CONTINUE:
            await self.runtime.stepper.apply(
                instance_id,
                lambda now: JobDue(str(payload["token"]), now),
                action="job.continued",
                reason=f"async continuation at {payload.get('element_id')}",
                job_id=job.id,
                known=job.instance,
            )
            return
        if job.kind is JobKind.SIGNAL:
            await self._deliver_signal(job, instance_id)
            return
        if job.kind is JobKind.OPERATOR:
            await self._run_operator(job, instance_id)
            return
        deployed = await self.runtime.deployments.of_instance(instance_id)
        if job.kind is JobKind.HANDLER:
            effect = CallHandler(
                handler=str(payload["handler"]),
                kind=str(payload["kind"]),
                element_id=str(payload["element_id"]),
                token=str(payload["token"]),
                business_key=str(payload["business_key"]),
                variables=payload["variables"],
                fields=payload["fields"],
                event=payload.get("event"),
            )
            with (
                timed(
                    STEP_SECONDS, since=job.running_since, process=deployed.definition.key
                ) as timing,
                step_context(
                    deployed,
                    business_key=effect.business_key,
                    task_id=task_id_of(effect.variables),
                ),
            ):
                if job.running is not None:
                    # Called before the commit that queued this job: awaited, not called
                    # again (the duration observed begins with that call).
                    outcome: Invocation = await job.running
                else:
                    # The payload a commit queued shares its values with the instance it
                    # hands on (the step starts from it): the handler gets a copy.
                    outcome = await self.call_handler(
                        deployed, effect, copy=job.instance is not None
                    )
                timing.outcome = "ok" if outcome.ok else "failed"
                await self.runtime.stepper.apply(
                    instance_id,
                    lambda now: outcome.event,
                    action=handler_action(outcome),
                    reason=handler_reason(effect, outcome),
                    job_id=job.id,
                    known=job.instance,
                )
            return
        if job.kind is JobKind.SEND:
            await self._prepare_send(job, instance_id, deployed)
            return
        raise ProcessExecutionError(f"unknown job kind {job.kind!r}")  # pragma: no cover

    async def call_handler(
        self, deployed: DeployedProcess, effect: CallHandler, *, copy: bool = True
    ) -> Invocation:
        """Run the handler of ``effect`` in its step's log context. ``copy``: give it the
        variables and fields as the store keeps them (a JSON copy), so that a change it makes
        in place (then fails, say) never reaches the state they were taken from."""
        if copy:
            variables, fields = json.loads(json.dumps([effect.variables, effect.fields]))
            effect = replace(effect, variables=variables, fields=fields)
        with step_context(
            deployed, business_key=effect.business_key, task_id=task_id_of(effect.variables)
        ):
            outcome = await invoke(
                deployed.handlers, effect, self.runtime.clock(), self.runtime.services
            )
        self.runtime._fault(FaultPoint.HANDLER_RAN, effect.handler)
        return outcome

    async def _run_operator(self, job: repo.ClaimedJob, instance_id: str) -> None:
        """Apply an operator's request (see :mod:`dsf_bridge.runtime.operations`)."""
        payload = job.payload
        actor = str(payload.get("actor") or "operator")
        make_event: Callable[[dt.datetime], Event]
        if payload.get("op") == "retry":
            token, retries = str(payload["token"]), int(payload["retries"])
            reason = f"{actor}: {retries} new tries for the incident at token {token}"

            def make_event(now: dt.datetime) -> Event:
                return IncidentRetried(token, now, retries)

            action = "incident.retried"
        else:
            reason = f"Process instance cancelled by {actor}: {payload['reason']}"

            def make_event(now: dt.datetime) -> Event:
                return InstanceCancelled(now, reason)

            action = "instance.cancelled"

        async def refused(session: Session, why: str) -> None:
            await append_event(
                session,
                actor=actor,
                subject=f"instance/{instance_id}",
                action="operator.refused",
                reason=f"{action}: {why}",
                payload=dict(payload),
            )
            await repo.complete_job(session, job.id, self.runtime.owner)
            log.warning("operator.refused", instance_id=instance_id, action=action, error=why)

        async def no_longer_applies(session: Session, record: repo.InstanceRecord) -> bool:
            # Checked in the transaction that would apply it: the instance may have ended, or
            # the incident been retried, since the request was queued.
            if not instance_state.is_running(record.state):
                await refused(session, f"the instance has ended ({record.status})")
                return True
            tokens = instance_state.incident_tokens(record.state)
            if payload.get("op") == "retry" and str(payload["token"]) not in tokens:
                await refused(session, f"no incident at token {payload['token']!r} any more")
                return True
            return False

        try:
            await self.runtime.stepper.apply(
                instance_id,
                make_event,
                action=action,
                reason=reason,
                job_id=job.id,
                unless=no_longer_applies,
                actor=actor,
            )
        except InstanceGoneError as exc:
            async with self.runtime.database.transaction() as session:
                await refused(session, str(exc))

    async def _deliver_signal(self, job: repo.ClaimedJob, instance_id: str) -> None:
        """Give an instance a signal thrown by another one, deciding in the transaction that
        applies it (the instance cannot move on between the look and the step).

        If it waits for the signal, it gets it. If it is between two waits with work still to
        run (a handler or async job, a Task send), the job comes back later, and at once when
        the instance waits again: a signal thrown while a loop sends its next Task still stops
        the loop. An instance with nothing left to run that does not wait for the signal (at
        rest elsewhere, or stuck behind a dead job), or that has ended, ignores it.
        """
        name = str(job.payload["signal"])

        async def not_now(session: Session, record: repo.InstanceRecord) -> bool:
            if record.status == "running" and name in {
                wait.signal_name for wait in signal_waits(record.state)
            }:
                return False
            if record.status == "running" and await repo.has_live_work(session, instance_id):
                # 0.2 s, doubling up to 5 s: a long handler (an inference) costs few looks.
                delay = min(_SIGNAL_RECHECK * 2 ** min(job.attempts - 1, 5), _SIGNAL_PATIENCE)
                await repo.postpone_job(
                    session, job.id, self.runtime.owner, due_at=self.runtime.clock() + delay
                )
            else:
                await repo.complete_job(session, job.id, self.runtime.owner)
            return True

        await self.runtime.stepper.apply(
            instance_id,
            lambda now: SignalReceived(name, now),
            action="signal.received",
            reason=f"{name} thrown by instance/{job.payload.get('thrown_by')}",
            job_id=job.id,
            unless=not_now,
        )

    async def _prepare_send(
        self, job: repo.ClaimedJob, instance_id: str, deployed: DeployedProcess
    ) -> None:
        payload = job.payload
        effect = SendTask(
            handler=str(payload["handler"]),
            element_id=str(payload["element_id"]),
            token=str(payload["token"]),
            business_key=str(payload["business_key"]),
            instantiates_canonical=str(payload["instantiates_canonical"]),
            message_name=str(payload["message_name"]),
            profile=str(payload["profile"]),
            correlation_key=payload.get("correlation_key"),
            target=payload.get("target"),
            variables=payload["variables"],
            fields=payload["fields"],
        )
        with step_context(
            deployed, business_key=effect.business_key, task_id=task_id_of(effect.variables)
        ):
            outcome = await invoke(
                deployed.handlers, effect, self.runtime.clock(), self.runtime.services
            )
        self.runtime._fault(FaultPoint.HANDLER_RAN, effect.handler)
        if not outcome.ok or outcome.send is None:
            await self.runtime.stepper.apply(
                instance_id,
                lambda now: outcome.event,
                action="handler.failed",
                reason=f"{effect.handler} at {effect.element_id}",
                job_id=job.id,
            )
            return
        send = outcome.send
        completed = outcome.event
        entry = {
            "token": effect.token,
            "element_id": effect.element_id,
            "business_key": send.business_key,
            "instantiates_canonical": send.instantiates_canonical,
            "message_name": send.message_name,
            "profile": send.profile,
            "correlation_key": send.correlation_key,
            "target": dict(send.target) if send.target is not None else None,
            "inputs": list(send.inputs),
            "failure_errors": dict(send.failure_errors),
            "authored_on": self.runtime.clock().isoformat(),
            "updates": dict(completed.variables),
            "local_updates": dict(getattr(completed, "local_variables", {})),
        }
        leased = self.runtime.effects.leased(self.runtime.clock())
        async with self.runtime.database.transaction() as session:
            if send.business_key != effect.business_key:
                # Sent with the alternative business key: the instance has exactly one (sends
                # prepared side by side agree on the first), and replies, even one overtaking
                # the commit that records this send, find the instance by it.
                key = await repo.claim_alternative_business_key(
                    session, instance_id, send.business_key
                )
                entry["business_key"] = key
                entry["updates"] = {**dict(completed.variables), ALTERNATIVE_BUSINESS_KEY: key}
            # Not the job id alone: SQLite reuses the id of a deleted newest job, and a
            # reused id would make this send a "duplicate" of an earlier one, lost.
            idempotency_key = f"send:{payload.get('send_id') or job.id}"
            entry_id = await repo.enqueue_outbox(
                session,
                idempotency_key=idempotency_key,
                kind=OutboxKind.SEND_TASK,
                payload=entry,
                instance_id=instance_id,
                now=self.runtime.clock(),
                leased_to=leased,
            )
            await repo.complete_job(session, job.id, self.runtime.owner)
            self.runtime._fault(FaultPoint.STEP_WRITTEN, "send.queued")
        self.runtime._fault(FaultPoint.STEP_COMMITTED, "send.queued")
        if leased is not None and entry_id is not None:
            self.runtime.dispatch(
                [],
                [
                    repo.ClaimedOutboxEntry(
                        entry_id, idempotency_key, instance_id, OutboxKind.SEND_TASK, entry, 1
                    )
                ],
            )
        else:
            self.runtime._wakeup.set()
