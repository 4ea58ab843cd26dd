"""The outbox keeps every send apart: SQLite hands out the id of a deleted newest job again, so
a send keyed by its job id alone was taken for a duplicate of an earlier one and lost (seen with
several inference requests at once)."""

from __future__ import annotations

from dsf_bridge.engine import load_process
from dsf_bridge.plugins.registry import HandlerRegistry, SendContext
from dsf_bridge.runtime.processes import ProcessRuntime
from dsf_bridge.store import Database
from tests.runtime.test_processes import FakeGateway

MODEL = b"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
    xmlns:camunda="http://camunda.org/schema/1.0/bpmn" id="d" targetNamespace="t">
  <bpmn:process id="testorg_sendOnce" isExecutable="true" camunda:versionTag="1.0">
    <bpmn:startEvent id="Start"><bpmn:outgoing>f1</bpmn:outgoing>
      <bpmn:messageEventDefinition messageRef="m" /></bpmn:startEvent>
    <bpmn:sendTask id="Send" camunda:class="org.test.Send">
      <bpmn:extensionElements>
        <camunda:field name="instantiatesCanonical"><camunda:string>http://test.org/bpe/Process/other|1.0</camunda:string></camunda:field>
        <camunda:field name="messageName"><camunda:string>hello</camunda:string></camunda:field>
        <camunda:field name="profile"><camunda:string>http://test.org/fhir/StructureDefinition/task-hello|1.0</camunda:string></camunda:field>
      </bpmn:extensionElements>
      <bpmn:incoming>f1</bpmn:incoming><bpmn:outgoing>f2</bpmn:outgoing>
    </bpmn:sendTask>
    <bpmn:endEvent id="End"><bpmn:incoming>f2</bpmn:incoming></bpmn:endEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="Start" targetRef="Send" />
    <bpmn:sequenceFlow id="f2" sourceRef="Send" targetRef="End" />
  </bpmn:process>
  <bpmn:message id="m" name="start" />
</bpmn:definitions>
"""


async def test_sends_of_consecutive_instances_are_all_posted(database: Database) -> None:
    registry = HandlerRegistry()

    @registry.message_send("org.test.Send")
    def send(ctx: SendContext) -> None:
        return None

    gateway = FakeGateway()
    runtime = ProcessRuntime(database, gateway, owner="test")
    definition = load_process(MODEL, "send-once.bpmn", resource_version="1.0")
    await runtime.deploy(definition, registry, plugin="test", model_hash="h" * 64)
    for business_key in ("bk-1", "bk-2", "bk-3"):
        await runtime.start(
            definition.key,
            message_name="start",
            business_key=business_key,
            variables={"target": {"endpointUrl": "https://remote.example/fhir"}},
        )
        await runtime.run_until_idle()
    assert [task.business_key for task in gateway.sent] == ["bk-1", "bk-2", "bk-3"]
