"""Jobs of one instance run one after the other (Camunda's exclusive jobs), each under a lease
of its own: a job that waited for its siblings is not taken over by another replica meanwhile.
(Adapted from a reviewer's probe.)"""

from __future__ import annotations

import asyncio
import datetime as dt

from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry
from dsf_bridge.runtime.processes import ProcessRuntime, RuntimeSettings
from dsf_bridge.store import Database
from tests.engine.bpmn import flow, model
from tests.runtime.test_processes import FakeGateway

# Three parallel service tasks, each behind an async continuation: three jobs of one instance.
BODY = (
    '<bpmn:startEvent id="s"><bpmn:messageEventDefinition messageRef="start"/></bpmn:startEvent>'
    '<bpmn:parallelGateway id="fork"/><bpmn:parallelGateway id="join"/>'
    + "".join(
        f'<bpmn:serviceTask id="w{i}" camunda:class="W" camunda:asyncBefore="true"/>'
        + flow(f"a{i}", "fork", f"w{i}")
        + flow(f"b{i}", f"w{i}", "join")
        for i in range(3)
    )
    + '<bpmn:endEvent id="e"/>'
    + flow("f0", "s", "fork")
    + flow("f9", "join", "e")
)


async def test_a_job_waiting_for_its_siblings_keeps_its_lease(database: Database) -> None:
    definition = model(BODY)
    runs: list[tuple[str, str]] = []

    def registry(owner: str) -> HandlerRegistry:
        handlers = HandlerRegistry()

        @handlers.service("W")
        async def work(ctx: HandlerContext) -> None:
            runs.append((owner, ctx.element_id))
            await asyncio.sleep(0.8)

        return handlers

    settings = RuntimeSettings(
        lease=dt.timedelta(seconds=1), idle_poll=dt.timedelta(milliseconds=50)
    )
    first = ProcessRuntime(database, FakeGateway(), owner="A", settings=settings)
    second = ProcessRuntime(database, FakeGateway(), owner="B", settings=settings)
    for runtime, owner in ((first, "A"), (second, "B")):
        await runtime.deploy(definition, registry(owner), plugin="t", model_hash="h" * 64)
    instance_id = await first.start(definition.key, message_name="start", business_key="bk")
    await first.run_once()  # the three continuations: three handler jobs
    round_of_first = asyncio.create_task(first.run_once())
    await asyncio.sleep(1.2)  # past the lease the round took for all three
    await second.run_once()
    await round_of_first
    await first.run_until_idle()
    elements = sorted(element for _, element in runs)
    # Each handler once: the second runtime takes only a job whose lease ran out unrenewed
    # (the last one, while the first still runs the one before it), never one in progress.
    assert elements == ["w0", "w1", "w2"], runs
    async with database.transaction() as session:
        from dsf_bridge.store import repository as repo

        record = await repo.load_instance(session, instance_id)
    assert record is not None and record.status == "completed"
