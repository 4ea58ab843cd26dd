"""The test harness reads instance states through the engine's codec, JSON round trip included."""

from __future__ import annotations

from dsf_bridge.engine.state import Phase
from dsf_bridge.plugins.registry import HandlerContext, HandlerRegistry
from dsf_bridge.runtime.testing import ProcessHarness
from tests.engine.bpmn import model


async def test_a_job_out_of_retries_is_an_incident_the_harness_shows() -> None:
    # An engine error in a job step (here an expression over an unset variable) is retried per
    # the cycle and then becomes an incident; the instance keeps running.
    definition = model(
        '<bpmn:startEvent id="s"><bpmn:messageEventDefinition messageRef="start"/>'
        '</bpmn:startEvent><bpmn:serviceTask id="work" camunda:class="W" '
        'camunda:asyncBefore="true"><bpmn:extensionElements><camunda:failedJobRetryTimeCycle>'
        "R0/PT5S</camunda:failedJobRetryTimeCycle><camunda:inputOutput>"
        '<camunda:inputParameter name="x">${missing}</camunda:inputParameter>'
        "</camunda:inputOutput></bpmn:extensionElements></bpmn:serviceTask>"
        '<bpmn:endEvent id="e"/><bpmn:sequenceFlow id="f1" sourceRef="s" targetRef="work"/>'
        '<bpmn:sequenceFlow id="f2" sourceRef="work" targetRef="e"/>'
    )
    registry = HandlerRegistry()

    @registry.service("W")
    def work(ctx: HandlerContext) -> None:
        pass

    async with ProcessHarness([definition], registry) as harness:
        instance = await harness.start("testorg_test", "start", business_key="bk")
        await harness.advance(60)
        assert instance.status == "running"
        (incident,) = instance.incidents
        assert incident.element == "work"
        assert "missing" in incident.message
        assert incident.at is not None
        (token,) = instance.tokens
        assert token.incident == incident
        assert token.phase is Phase.ASYNC_BEFORE
        assert instance.waiting_for == []
        assert harness.calls == []
