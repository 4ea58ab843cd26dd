"""Message delivery: what a received Task does to the process instances (DSF BPE rules).

A Task whose message starts a process starts an instance (:meth:`MessageDelivery.start`);
one for a running instance with its business key goes to the execution that waits for it
(:meth:`MessageDelivery.correlate`), and only from the organization asked where the plugin
says so; a reply that overtakes the commit of its own request is held, never refused for
timing (:class:`MessageHeldError`). Every step goes through the
:class:`~dsf_bridge.runtime.stepping.InstanceStepper`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog

from dsf_bridge.engine.correlation import correlate, message_subscriptions
from dsf_bridge.engine.events import MessageReceived, Start
from dsf_bridge.engine.exceptions import CorrelationError
from dsf_bridge.errors import (
    BridgeError,
    ConcurrencyError,
    ProcessExecutionError,
    StoreError,
    TaskAlreadyDeliveredError,
)
from dsf_bridge.logs import bound_context
from dsf_bridge.runtime.deployments import DeployedProcess
from dsf_bridge.runtime.effects import StepRecord
from dsf_bridge.runtime.jobs import handler_action, handler_reason
from dsf_bridge.runtime.stepping import InlineRun, engine_step_of, step_context
from dsf_bridge.store import Records, Session
from dsf_bridge.store import repository as repo
from dsf_bridge.telemetry import STEP_SECONDS

if TYPE_CHECKING:
    from dsf_bridge.runtime.processes import ProcessRuntime

__all__ = ["MessageDelivery", "MessageHeldError"]

log = structlog.get_logger("dsf_bridge.runtime")


class MessageHeldError(Exception):
    """A reply arrived while a send of the instance it is for is still unresolved.

    The reply may have overtaken the commit that records its own request as sent (a fast
    remote site, or a crash after the remote server accepted the request). It is neither
    correlated nor refused now: the caller keeps it durably and delivers it again once the
    send resolves (:meth:`ProcessRuntime.on_send_resolved`).
    """

    def __init__(self, business_key: str) -> None:
        super().__init__(f"a send of the instance with business-key {business_key!r} is unresolved")
        self.business_key = business_key


def _unwritable(exc: Exception) -> bool:
    """Whether ``exc``, raised by the transaction of a start with inline steps, may be the
    steps' own (a value the store cannot hold), not the start's: not a refusal of the start
    (a running instance with the key, a Task delivered already), not a passing store error."""
    if isinstance(exc, repo.InstanceRunningError | TaskAlreadyDeliveredError):
        return False
    return not isinstance(exc, BridgeError) or (isinstance(exc, StoreError) and not exc.retryable)


class MessageDelivery:
    """Delivers received Tasks to the instances of ``runtime``."""

    def __init__(self, runtime: ProcessRuntime) -> None:
        self.runtime = runtime

    async def start(
        self,
        process_key: str,
        *,
        business_key: str,
        message_name: str | None = None,
        variables: Mapping[str, object] | None = None,
        task_id: str | None = None,
        task_version: str = "1",
        actor: str = "local",
        claimed_version: str | None = None,
        unless_running: bool = False,
        version: str | None = None,
    ) -> str:
        """Start an instance (by message start event, or the none start event); return its id.

        ``claimed_version``: the Task version intake claimed, marked taken in by the same
        commit. ``unless_running``: raise
        :class:`~dsf_bridge.store.repository.InstanceRunningError` instead when a running
        instance of this process has the business key (the DSF BPE then correlates), checked
        by the statement that inserts the instance.
        """
        runtime = self.runtime
        deployed = runtime.process(process_key, version)
        if deployed is None:
            raise ProcessExecutionError(
                f"Process not found: {process_key!r}"
                + (f" version {version}" if version else "")
                + " is not deployed"
            )
        instance_id = str(uuid.uuid4())
        event = Start(message_name, business_key, runtime.clock(), dict(variables or {}))
        stepper = runtime.stepper
        reason = f"{process_key} by {message_name or 'none start event'}" + (
            f", Task/{task_id}" if task_id else ""
        )

        async def write(inline: InlineRun) -> list[StepRecord]:
            """The start and its inline steps, in one transaction."""
            async with runtime.database.transaction() as session:

                async def taken_in() -> Records | None:
                    if task_id is None:
                        return None
                    return await runtime.effects.record_incoming(
                        session, task_id, task_version, instance_id, claimed_version
                    )

                pending = [
                    await stepper.create(
                        session,
                        deployed,
                        instance_id=instance_id,
                        business_key=business_key,
                        event=event,
                        actor=actor,
                        action="instance.started",
                        reason=reason,
                        before_audit=taken_in,
                        unless_running=unless_running,
                        result=first,
                        inline=inline.call_of(0),
                        then=[ran.result for ran in inline.steps],
                    )
                ]
                for position, ran in enumerate(inline.steps, start=1):
                    record = pending[-1].instance
                    assert record is not None  # noqa: S101 - the effect writer sets it
                    with bound_context(element_id=ran.call.element_id):
                        pending.append(
                            await stepper.write(
                                session,
                                deployed,
                                record,
                                ran.outcome.event,
                                actor=runtime.owner,
                                action=handler_action(ran.outcome),
                                reason=handler_reason(ran.call, ran.outcome),
                                result=ran.result,
                                inline=inline.call_of(position),
                                row_written=True,
                            )
                        )
            return pending

        async def written(inline: InlineRun) -> tuple[InlineRun, list[StepRecord], float]:
            """The start written with its inline steps, or, when the steps cannot be written
            for good (a value the store refuses), without them, the first outcome handed to
            its job (which then fails as without inline calls: retried, then an incident).
            Returns what was written and how long the transaction took."""

            async def timed(inline: InlineRun) -> tuple[InlineRun, list[StepRecord], float]:
                began = time.perf_counter()
                return inline, await write(inline), time.perf_counter() - began

            try:
                return await timed(inline)
            except Exception as exc:
                if not inline.steps or not _unwritable(exc):
                    raise
                log.warning(
                    "handler.inline_unwritten", error=str(exc), error_type=type(exc).__name__
                )
            try:
                return await timed(inline.handed_over())
            except Exception as exc:
                if not _unwritable(exc):
                    raise
                # Not the handlers' steps: the start itself cannot be stored. Failed as a
                # Task the bridge cannot take, not taken in (and its handlers called) again
                # and again.
                raise ProcessExecutionError(
                    f"The start of {process_key} cannot be stored: {exc}"
                ) from exc

        with step_context(
            deployed, instance_id=instance_id, business_key=business_key, task_id=task_id
        ):
            first = engine_step_of(deployed.definition, None, event)
            inline = InlineRun()
            try:
                if stepper.inline_call(first) is not None and not (
                    unless_running and await self._running_with(deployed, business_key)
                ):
                    # The handlers the start reaches run before its transaction, which
                    # records their outcomes too (only a start that will create the instance
                    # runs them).
                    inline = await stepper.run_inline(deployed, first)
                inline, pending, transaction = await written(inline)
            except BaseException:
                inline.cancel()
                raise
            stepper.committed(pending[0], "instance.started")
            for ran, step in zip(inline.steps, pending[1:], strict=True):
                # The handler's call and the transaction that recorded its outcome.
                STEP_SECONDS.labels(
                    process=deployed.definition.key, outcome="ok" if ran.outcome.ok else "failed"
                ).observe(ran.ended - ran.started + transaction)
                stepper.committed(step, handler_action(ran.outcome))
        return instance_id

    async def deliver(
        self,
        process_key: str,
        *,
        message_name: str,
        business_key: str | None,
        correlation_key: str | None = None,
        variables: Mapping[str, object] | None = None,
        task_id: str | None = None,
        task_version: str = "1",
        actor: str = "remote",
        claimed_version: str | None = None,
        version: str | None = None,
        requester: str | None = None,
        new_business_key: bool = False,
    ) -> str:
        """The DSF BPE's rule for a received Task (``TaskHandler.onMessage``): when a running
        instance of ``process_key`` has the Task's business key, the message goes to its
        waiting execution ("Unable to correlate Task" when none waits), never to a new
        instance; otherwise a message start event starts one with that business key ("Process
        with start message-name ... not found" when the message starts none).
        ``claimed_version`` is the Task version intake claimed: the commit that takes the
        message in also marks that claim taken in (:data:`TAKEN_IN`).

        Raises :class:`MessageHeldError` instead of "Unable to correlate" while a send of the
        instance is unresolved (the reply may have overtaken it). ``requester`` is the
        organization identifier of the Task's requester, for plugins that accept replies only
        from the organizations they asked (:meth:`HandlerRegistry.replies_only_from_recipients`).
        ``new_business_key``: the Task had none and ``business_key`` was made up for it just
        now (as the DSF BPE does), so no instance has it and none is looked for.
        """
        deployed = self.runtime.process(process_key, version)
        if deployed is None:
            raise ProcessExecutionError(
                f"Process not found: {process_key!r}"
                + (f" version {version}" if version else "")
                + " is not deployed"
            )
        version = deployed.definition.version_tag or ""
        starts = message_name in deployed.definition.message_starts
        if starts:
            # The common case in one transaction: no instance has the business key, so the
            # message starts one.
            try:
                return await self.start(
                    process_key,
                    business_key=business_key or str(uuid.uuid4()),
                    message_name=message_name,
                    variables=variables,
                    task_id=task_id,
                    task_version=task_version,
                    actor=actor,
                    claimed_version=claimed_version,
                    unless_running=business_key is not None and not new_business_key,
                    version=version,
                )
            except repo.InstanceRunningError:
                pass  # a running instance has the business key: the message is for it
        elif (
            business_key is None
            or new_business_key
            or not await self._running_with(deployed, business_key)
        ):
            raise CorrelationError(
                f"Process with start message-name '{message_name}' not found: no running "
                f"instance of {process_key} has business-key {business_key!r}, and the "
                "message starts none"
            )
        if business_key is not None:
            # A reply can overtake the commit that records its request as sent: while such a
            # send is in flight, its instance is about to wait for exactly this message. Looked
            # at before the wait: the send is recorded in the commit that makes the instance
            # wait, so "nothing in flight" then "not waiting" means it will not wait.
            in_flight = bool(await self.sends_in_flight(business_key))
            if await self._waiting(deployed, message_name, business_key, correlation_key):
                return await self.correlate(
                    message_name=message_name,
                    business_key=business_key,
                    correlation_key=correlation_key,
                    variables=variables,
                    task_id=task_id,
                    task_version=task_version,
                    actor=actor,
                    process_key=process_key,
                    claimed_version=claimed_version,
                    definition_id=deployed.definition_id,
                    requester=requester,
                )
            if in_flight:
                # Never refused for timing: the caller keeps it and delivers it again when
                # the send resolves.
                raise MessageHeldError(business_key)
        raise CorrelationError(
            f"Unable to correlate Task{f' {task_id}' if task_id else ''}: the instance of "
            f"{process_key} with business-key {business_key!r} does not wait for message "
            f"{message_name!r}"
            + (f" with correlation-key {correlation_key!r}" if correlation_key else "")
        )

    async def _running_with(self, deployed: DeployedProcess, business_key: str) -> bool:
        async with self.runtime.database.autocommit() as session:
            return await repo.running_with_business_key(
                session, deployed.definition_id, business_key
            )

    async def _waiting(
        self,
        deployed: DeployedProcess,
        message_name: str,
        business_key: str,
        correlation_key: str | None,
    ) -> bool:
        """Whether an instance of exactly this deployed version waits for the message."""
        async with self.runtime.database.transaction() as session:
            found = await repo.find_subscriptions(
                session,
                message_name=message_name,
                business_key=business_key,
                correlation_key=correlation_key,
            )
            for instance_id, _sub in found:
                record = await repo.load_instance(session, instance_id)
                if record is not None and record.definition_id == deployed.definition_id:
                    return True
        return False

    async def correlate(
        self,
        *,
        message_name: str,
        business_key: str,
        correlation_key: str | None = None,
        variables: Mapping[str, object] | None = None,
        task_id: str | None = None,
        task_version: str = "1",
        actor: str = "remote",
        process_key: str | None = None,
        claimed_version: str | None = None,
        definition_id: int | None = None,
        requester: str | None = None,
    ) -> str:
        """Continue the one instance waiting for this message; return its id (of process
        ``process_key``, of the deployed definition ``definition_id``, when given).

        Raises :class:`~dsf_bridge.engine.exceptions.CorrelationError` ("Unable to correlate
        Task ...") when no waiting execution, or more than one, matches.
        """
        for _ in range(self.runtime.settings.conflict_retries):
            try:
                return await self._correlate_once(
                    message_name=message_name,
                    business_key=business_key,
                    correlation_key=correlation_key,
                    variables=dict(variables or {}),
                    task_id=task_id,
                    task_version=task_version,
                    actor=actor,
                    process_key=process_key,
                    claimed_version=claimed_version,
                    definition_id=definition_id,
                    requester=requester,
                )
            except ConcurrencyError:
                continue
        raise ConcurrencyError(f"instance for business-key {business_key!r} kept changing")

    async def _correlate_once(
        self,
        *,
        message_name: str,
        business_key: str,
        correlation_key: str | None,
        variables: dict[str, object],
        task_id: str | None,
        task_version: str,
        actor: str,
        process_key: str | None,
        claimed_version: str | None = None,
        definition_id: int | None = None,
        requester: str | None = None,
    ) -> str:
        runtime = self.runtime
        now = runtime.clock()
        async with runtime.database.transaction() as session:
            found = await repo.find_subscriptions(
                session,
                message_name=message_name,
                business_key=business_key,
                correlation_key=correlation_key,
            )
            records: dict[str, repo.InstanceRecord] = {}
            for instance_id, _sub in found:
                if instance_id not in records:
                    record = await repo.load_instance(session, instance_id)
                    if (
                        record is not None
                        and (
                            process_key is None
                            or runtime.deployments.of_record(record).definition.key == process_key
                        )
                        and (definition_id is None or record.definition_id == definition_id)
                    ):
                        records[instance_id] = record
            candidates = [(iid, message_subscriptions(rec.state)) for iid, rec in records.items()]
            instance_id, subscription = correlate(
                candidates,
                message_name=message_name,
                business_key=business_key,
                correlation_key=correlation_key,
                task_id=task_id,
            )
            record = records[instance_id]
            deployed = runtime.deployments.of_record(record)
            if message_name in deployed.handlers.reply_only_from_recipients:
                await self._check_replier(
                    session,
                    instance_id,
                    message_name=message_name,
                    requester=requester,
                    waiting_key=subscription.correlation_key,
                    task_id=task_id,
                )
            event = MessageReceived(
                message_name, now, correlation_key, variables, subscription.token, task_id
            )

            async def taken_in() -> Records | None:
                if task_id is None:
                    return None
                return await runtime.effects.record_incoming(
                    session, task_id, task_version, instance_id, claimed_version
                )

            pending = await runtime.stepper.write(
                session,
                deployed,
                record,
                event,
                actor=actor,
                action="message.correlated",
                reason=f"{message_name} at {subscription.element_id}"
                + (f", Task/{task_id}" if task_id else ""),
                before_audit=taken_in,
            )
        runtime.stepper.committed(pending, "message.correlated")
        return instance_id

    async def _check_replier(
        self,
        session: Session,
        instance_id: str,
        *,
        message_name: str,
        requester: str | None,
        waiting_key: str | None,
        task_id: str | None,
    ) -> None:
        """Refuse a reply from an organization the instance did not send a Task to (with the
        correlation key of the execution the reply reaches, when that has one): a third
        organization that learnt the business key must not answer for the one asked.

        A Task sent to a target given by its endpoint alone names no organization here; for
        such an instance the check cannot be made and DSF's behaviour applies (logged)."""
        recipients = await repo.task_recipients(session, instance_id)
        if waiting_key is not None:
            recipients = {(org, key) for org, key in recipients if key == waiting_key}
        asked = {org for org, _ in recipients}
        if None in asked:
            log.warning(
                "reply.sender_unchecked",
                message_name=message_name,
                reason="a Task was sent to a target without an organization identifier",
            )
            return
        if requester is not None and requester in asked:
            return
        raise CorrelationError(
            f"Unable to correlate Task{f' {task_id}' if task_id else ''}: message "
            f"{message_name!r} is accepted only from the organization the request went to"
            + (f" with correlation-key {waiting_key!r}" if waiting_key else "")
            + f", not from {requester or 'a requester without an organization identifier'}"
        )

    async def sends_in_flight(self, business_key: str) -> bool:
        """Whether an instance with this business key has a Task send queued or under way."""
        async with self.runtime.database.transaction() as session:
            return await repo.sends_in_flight(session, business_key) > 0
