"""A store with real instances in it, made by the real runtime: what the admin API reads."""

from __future__ import annotations

from dataclasses import dataclass

from dsf_bridge.runtime.processes import ProcessRuntime
from dsf_bridge.store import Database
from tests.runtime.test_processes import KEY, Calls, Clock, FakeGateway, _runtime

__all__ = ["KEY", "Seeded", "seed"]


@dataclass
class Seeded:
    runtime: ProcessRuntime
    waiting: str  # sent its request, waits for the reply or the timer
    completed: str  # got its reply
    failed: str  # timed out: the handler throws a BPMN error the model does not catch
    clock: Clock


async def seed(database: Database, *, business_key_prefix: str = "bk") -> Seeded:
    gateway, clock, calls = FakeGateway(), Clock(), Calls()
    runtime = await _runtime(database, gateway, clock, calls)

    async def start(suffix: str) -> str:
        instance_id = await runtime.start(
            KEY,
            message_name="start",
            business_key=f"{business_key_prefix}-{suffix}",
            task_id=f"start-{suffix}",
        )
        await runtime.run_until_idle()
        clock.advance(seconds=1)
        return instance_id

    done = await start("done")
    await runtime.correlate(
        message_name="reply",
        business_key=f"{business_key_prefix}-done",
        variables={"result": {"muscle": 29.6}},
        task_id="reply-done",
    )
    await runtime.run_until_idle()
    late = await start("late")
    clock.advance(minutes=6)  # past the model's 5 minute timer
    await runtime.run_until_idle()
    wait = await start("wait")
    return Seeded(runtime, waiting=wait, completed=done, failed=late, clock=clock)
