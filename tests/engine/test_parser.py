"""Parsing and DSF validation: the real corpus loads, the unsupported is refused with its name,
id and line, and the DSF plugin rules are enforced."""

from __future__ import annotations

import pytest

from dsf_bridge.engine import (
    DsfValidationError,
    UnsupportedElementError,
    load_process,
    parse_bpmn,
)
from dsf_bridge.engine.model import EventKind, NodeKind
from tests.engine.bpmn import HEAD, model, process_xml
from tests.engine.corpus import PING_PONG, load_reference
from tests.reference import reference_dir

START = (
    '<bpmn:startEvent id="s"><bpmn:messageEventDefinition messageRef="start"/></bpmn:startEvent>'
)
SEND_FIELDS = (
    '<camunda:field name="instantiatesCanonical"><camunda:string>http://x.org/bpe/Process/y|1.0'
    "</camunda:string></camunda:field>"
    '<camunda:field name="messageName"><camunda:string>m</camunda:string></camunda:field>'
    '<camunda:field name="profile"><camunda:string>http://x.org/fhir/StructureDefinition/t|1.0'
    "</camunda:string></camunda:field>"
)

# Exercise skeletons and tutorial figures are not process models; see tests/plugins/test_check.py.
_NOT_MODELS = ("dsf-process-tutorial/main/", "exercises/figures/")


def test_every_reference_process_model_loads() -> None:
    root = reference_dir()
    loaded = []
    for path in sorted(root.rglob("*.bpmn")):
        relative = path.relative_to(root).as_posix()
        if any(part in relative for part in _NOT_MODELS):
            continue
        loaded.append(load_reference(relative).key)
    assert len(loaded) == 17
    assert "dsfdev_ping" in loaded
    assert "medizininformatik-initiativede_dataSend" in loaded


def test_ping_structure_is_read_completely() -> None:
    ping = load_reference(PING_PONG + "ping.bpmn")
    sub = ping.nodes["SubProcess"]
    assert sub.kind is NodeKind.SUB_PROCESS
    assert sub.multi_instance is not None
    assert sub.multi_instance.element_variable == "target"
    assert sub.multi_instance.async_before
    assert sub.multi_instance.retry is not None
    assert sub.multi_instance.retry.retries == 2  # R3/PT5S: three tries in all
    gateway = ping.nodes["EventBasedGateway"]
    assert [listener.handler for listener in gateway.listeners] == [
        "dev.dsf.bpe.listener.SetCorrelationKeyListener"
    ]
    send = ping.nodes["SendPing"]
    assert send.handler == "dev.dsf.bpe.message.SendPing"
    assert send.send is not None
    assert send.send.message_name.source == "ping"
    assert ping.nodes["PongCatchEvent"].message_name == "pong"
    assert ping.nodes["PongTimer"].event is EventKind.TIMER
    assert ping.nodes["Gateway_0z5gz96"].default_flow == "Flow_1j54c2s"
    assert ping.nodes["SubProcessEndEvent"].async_after
    assert ping.message_starts == {"startPing": "StartPingMessageStartEvent"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('<bpmn:scriptTask id="script1"/>', r'<bpmn:scriptTask id="script1">'),
        ('<bpmn:inclusiveGateway id="inc"/>', r'<bpmn:inclusiveGateway id="inc">'),
        ('<bpmn:callActivity id="call"/>', r'<bpmn:callActivity id="call">'),
        (
            '<bpmn:serviceTask id="t" camunda:delegateExpression="${x}"/>',
            "attribute camunda:delegateExpression",
        ),
        (
            '<bpmn:serviceTask id="t" camunda:class="A"><bpmn:extensionElements>'
            "<camunda:connector/></bpmn:extensionElements></bpmn:serviceTask>",
            "<camunda:connector>",
        ),
        (
            '<bpmn:intermediateCatchEvent id="c"><bpmn:timerEventDefinition>'
            "<bpmn:timeCycle>R3/PT1M</bpmn:timeCycle></bpmn:timerEventDefinition>"
            "</bpmn:intermediateCatchEvent>",
            "timer cycles",
        ),
        ('<bpmn:serviceTask id="t"/>', "needs camunda:class"),
        (
            '<bpmn:sequenceFlow id="f" sourceRef="s" targetRef="s2"><bpmn:conditionExpression '
            'xsi:type="bpmn:tFormalExpression">${"x".b()}</bpmn:conditionExpression>'
            '</bpmn:sequenceFlow><bpmn:exclusiveGateway id="s2"/>',
            "Method calls",
        ),
    ],
    ids=["script", "inclusive", "call", "delegate", "connector", "cycle", "no-class", "juel"],
)
def test_unsupported_elements_are_named_with_id_and_line(body: str, expected: str) -> None:
    data = process_xml(START + "\n" + body)
    with pytest.raises(UnsupportedElementError, match=expected) as caught:
        parse_bpmn(data, "bad.bpmn")
    assert caught.value.source == "bad.bpmn"
    assert caught.value.line is not None
    assert caught.value.line >= 4
    assert str(caught.value).startswith(f"bad.bpmn:{caught.value.line}: ")


def test_unknown_message_ref_is_refused() -> None:
    body = (
        '<bpmn:startEvent id="s"><bpmn:messageEventDefinition messageRef="nope"/></bpmn:startEvent>'
    )
    with pytest.raises(UnsupportedElementError, match="'nope' names no bpmn:message"):
        parse_bpmn(process_xml(body), "x.bpmn")


def test_version_tag_must_equal_resource_version() -> None:
    with pytest.raises(DsfValidationError, match=r"versionTag '1.0' differs .* '1.1'"):
        load_process(process_xml(START), "x.bpmn", resource_version="1.1")


def test_unreplaced_version_placeholder_is_a_mismatch() -> None:
    data = process_xml(START).replace(
        b'camunda:versionTag="1.0"', b'camunda:versionTag="#{version}"'
    )
    with pytest.raises(DsfValidationError, match="versionTag"):
        load_process(data, "x.bpmn", resource_version="1.0")


def test_process_id_pattern() -> None:
    with pytest.raises(DsfValidationError, match="does not match <domainWithoutDots>_<name>"):
        load_process(process_xml(START, key="noUnderscore"), "x.bpmn", resource_version="1.0")


def test_exactly_one_executable_process() -> None:
    two = (
        HEAD
        + '<bpmn:process id="a_one" isExecutable="true" camunda:versionTag="1.0">'
        + START
        + "</bpmn:process>"
        + '<bpmn:process id="a_two" isExecutable="true" camunda:versionTag="1.0">'
        + START.replace('id="s"', 'id="s2"')
        + '</bpmn:process><bpmn:message id="start" name="start"/></bpmn:definitions>'
    )
    with pytest.raises(DsfValidationError, match="exactly one executable process, found 2"):
        load_process(two.encode(), "x.bpmn", resource_version="1.0")


@pytest.mark.parametrize("missing", ["instantiatesCanonical", "messageName", "profile"])
def test_send_elements_need_all_three_fields(missing: str) -> None:
    fields = SEND_FIELDS
    start = fields.find(f'<camunda:field name="{missing}">')
    end = fields.find("</camunda:field>", start) + len("</camunda:field>")
    fields = fields[:start] + fields[end:]
    body = (
        START
        + '<bpmn:endEvent id="e"><bpmn:messageEventDefinition camunda:class="Send">'
        + f"<bpmn:extensionElements>{fields}</bpmn:extensionElements>"
        + '</bpmn:messageEventDefinition></bpmn:endEvent><bpmn:sequenceFlow id="f" '
        + 'sourceRef="s" targetRef="e"/>'
    )
    with pytest.raises(DsfValidationError, match=f"camunda:field '{missing}'"):
        model(body)


def test_blank_send_field_is_refused() -> None:
    blank = SEND_FIELDS.replace(
        "<camunda:string>m</camunda:string>", "<camunda:string> </camunda:string>"
    )
    body = (
        START
        + '<bpmn:sendTask id="e" camunda:class="Send">'
        + f"<bpmn:extensionElements>{blank}</bpmn:extensionElements></bpmn:sendTask>"
        + '<bpmn:sequenceFlow id="f" sourceRef="s" targetRef="e"/>'
    )
    with pytest.raises(DsfValidationError, match="'messageName'"):
        model(body)
