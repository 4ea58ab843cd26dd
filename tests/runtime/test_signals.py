"""Signals across instances, durably: DSF's own ping-autostart model, where a second instance
(started by ``stopPingAutostart``) stops the first with a signal, on both databases."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from dsf_bridge.errors import StoreError
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry, SendContext
from dsf_bridge.runtime import jobs
from dsf_bridge.runtime.processes import ProcessRuntime
from dsf_bridge.store import Database, verify_chain
from dsf_bridge.store import repository as repo
from dsf_bridge.store.tables import AuditEvent, Job, MessageSubscription
from tests.engine.corpus import PING_PONG, load_reference
from tests.runtime.test_processes import FAST, Clock, FakeGateway, _status

KEY = "dsfdev_pingAutostart"
SIGNAL = "stop_dsfdev_pingAutostart_1.0"


def _handlers() -> HandlerRegistry:
    registry = HandlerRegistry()

    @registry.service("dev.dsf.bpe.service.SetTargetAndConfigureTimer")
    def configure(ctx: HandlerContext) -> None:
        ctx.set("timerInterval", "PT10M")
        ctx.set(
            "target",
            {"organizationIdentifier": "local.example.org", "endpointIdentifier": "local"},
        )

    @registry.message_send("dev.dsf.bpe.message.SendStartPing")
    def send_start_ping(ctx: SendContext) -> None:
        return None

    return registry


@pytest.fixture
async def runtime(database: Database) -> ProcessRuntime:
    runtime = ProcessRuntime(database, FakeGateway(), owner="a", clock=Clock(), settings=FAST)
    definition = load_reference(PING_PONG + "ping-autostart.bpmn")
    await runtime.deploy(definition, _handlers(), plugin="test", model_hash="h" * 64)
    return runtime


async def test_a_stop_instance_stops_the_running_one(
    runtime: ProcessRuntime, database: Database
) -> None:
    gateway = runtime.gateway
    assert isinstance(gateway, FakeGateway)
    running = await runtime.start(KEY, message_name="startPingAutostart", business_key="auto")
    await runtime.run_until_idle()
    assert await _status(database, running) == "running"
    assert [task.message_name for task in gateway.sent] == ["startPing"]
    async with database.transaction() as session:
        waiting = await repo.instances_waiting_for(session, f"signal:{SIGNAL}")
    assert waiting == [running]

    stop = await runtime.start(KEY, message_name="stopPingAutostart", business_key="stop")
    await runtime.run_until_idle()

    assert await _status(database, stop) == "completed"
    assert await _status(database, running) == "completed"  # it caught the signal
    runtime.clock.advance(minutes=30)  # type: ignore[attr-defined]
    await runtime.run_until_idle()
    assert len(gateway.sent) == 1  # no further startPing after the stop
    async with database.transaction() as session:
        left = (await session.scalars(select(MessageSubscription.instance_id))).all()
        received = (
            await session.scalars(
                select(AuditEvent.reason).where(AuditEvent.action == "signal.received")
            )
        ).all()
    assert left == []
    assert received == [f"{SIGNAL} thrown by instance/{stop}"]
    await _assert_records_intact(database)


async def test_a_new_start_stops_the_older_instance(
    runtime: ProcessRuntime, database: Database
) -> None:
    first = await runtime.start(KEY, message_name="startPingAutostart", business_key="one")
    await runtime.run_until_idle()
    second = await runtime.start(KEY, message_name="startPingAutostart", business_key="two")
    await runtime.run_until_idle()

    assert await _status(database, first) == "completed"
    assert await _status(database, second) == "running"  # it threw before it waited
    await _assert_records_intact(database)


async def _assert_records_intact(database: Database) -> None:
    """The events of signal throws record each instance row as its step left it."""
    async with database.transaction() as session:
        report = await verify_chain(session)
    assert (report.ok, report.record_problems) == (True, ())
    assert report.records >= 2


async def test_a_catcher_that_moves_just_before_the_signal_still_gets_it(
    runtime: ProcessRuntime, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await runtime.start(KEY, message_name="startPingAutostart", business_key="auto")
    await runtime.run_until_idle()
    apply_event = runtime.stepper.apply
    raced: list[int] = []

    async def timer_first(instance_id: str, make_event: Any, **options: Any) -> None:
        if options.get("action") == "signal.received" and not raced:
            # Another worker fires the loop's timer just before the signal is applied.
            runtime.clock.advance(minutes=11)  # type: ignore[attr-defined]
            raced.append(await runtime.timers.fire_due())
        await apply_event(instance_id, make_event, **options)

    monkeypatch.setattr(runtime.stepper, "apply", timer_first)
    await runtime.start(KEY, message_name="stopPingAutostart", business_key="stop")
    await runtime.run_until_idle()

    assert raced == [1]
    assert await _status(database, running) == "completed"


async def test_a_signal_for_an_instance_stuck_behind_a_dead_job_is_dropped(
    runtime: ProcessRuntime, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def store_down(*_args: object, **_kwargs: object) -> None:
        # Not retryable: a lost connection would give the job back without using a retry.
        raise StoreError("store refused the write", retryable=False)

    monkeypatch.setattr(jobs, "invoke", store_down)
    stuck = await runtime.start(KEY, message_name="startPingAutostart", business_key="auto")
    for _ in range(6):  # the handler job uses up its retries: an incident, never run again
        await runtime.run_until_idle()
        runtime.clock.advance(seconds=10)  # type: ignore[attr-defined]
    monkeypatch.undo()
    await runtime.start(KEY, message_name="stopPingAutostart", business_key="stop")
    await runtime.run_until_idle()

    async with database.transaction() as session:
        kinds = (await session.scalars(select(Job.kind).order_by(Job.id))).all()
    assert kinds == ["handler"]  # the dead handler job stays; no signal job postpones forever
    assert await _status(database, stuck) == "running"
