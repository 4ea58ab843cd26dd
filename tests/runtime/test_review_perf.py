"""Review of issue 11 (performance): the instance handed on to a dispatched job, the job's
completion moved into the step, and the fixed PostgreSQL pool."""

from __future__ import annotations

import asyncio
import datetime as dt

from dsf_bridge.engine import load_process
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry
from dsf_bridge.runtime.processes import ProcessRuntime, RuntimeSettings
from dsf_bridge.store import Database
from dsf_bridge.store import repository as repo
from tests.runtime.test_dispatch import _first_round
from tests.runtime.test_processes import FakeGateway
from tests.runtime.test_shutdown import KEY, MODEL


async def _tampering_runtime(database: Database, calls: list[dict[str, object]]) -> ProcessRuntime:
    registry = HandlerRegistry()

    @registry.service("org.test.Work")
    async def work(ctx: HandlerContext) -> None:
        task = ctx.get("task")
        assert isinstance(task, dict)
        calls.append(dict(task))
        # A handler that changes a variable's value in place and then fails: its changes are
        # rolled back (nothing of it reaches the instance).
        task["tampered"] = len(calls)
        raise RuntimeError("boom")

    settings = RuntimeSettings(
        lease=dt.timedelta(seconds=60),
        idle_poll=dt.timedelta(milliseconds=50),
        shutdown_grace=dt.timedelta(seconds=5),
        job_retry_delay=dt.timedelta(hours=1),
    )
    runtime = ProcessRuntime(database, FakeGateway(), owner="tamper", settings=settings)
    definition = load_process(MODEL.read_bytes(), MODEL.name, resource_version="1.0")
    await runtime.deploy(definition, registry, plugin="test", model_hash="h" * 64)
    return runtime


async def test_a_failed_handlers_in_place_change_does_not_reach_the_instance(
    database: Database,
) -> None:
    """The dispatched job's step must not start from an instance state that shares its
    values with the variables the handler was given: a failing handler's in-place change
    would be saved (and a polling round's run of the same job would not save it)."""
    calls: list[dict[str, object]] = []
    runtime = await _tampering_runtime(database, calls)
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_forever(stop))
    await _first_round(runtime)
    await runtime.deliver(
        KEY,
        message_name="start",
        business_key="bk-tamper",
        task_id="t-1",
        task_version="2",
        variables={"task": {"id": "t-1", "inputs": []}},
    )
    for _ in range(500):
        async with database.transaction() as session:
            instances = await repo.all_instances(session)
        if calls and instances and instances[0].version > 1:
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(worker, 10)
    assert len(calls) == 1
    (instance,) = instances
    assert instance.version > 1  # the failed step was written
    task = instance.state["vars"]["task"]
    assert "tampered" not in task
