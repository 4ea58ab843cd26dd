"""Sequence-flow structure checked at load, as Camunda 7's ``BpmnParse`` checks it on deployment.

A real DSF BPE deploys every model into Camunda 7 (Operaton in DSF 2.x), whose parser refuses
some structures and only warns about others. We refuse exactly what it refuses, and report its
warnings without refusing, so a model loads here if and only if it deploys there:

refused (``BpmnParse.validateExclusiveGateway``)
    an exclusive gateway without outgoing flows; one whose only outgoing flow has a condition;
    a default flow with a condition; an unconditional flow that is not the default when the
    gateway has a default or more than one unconditional flow;
refused (``BpmnParse.parseEventBasedGateway``, ``BpmnParse.parseSequenceFlow``)
    an event-based gateway followed by anything but an ``intermediateCatchEvent`` (a receive
    task too), or with ``camunda:asyncAfter``; another incoming flow into a catch event that
    follows an event-based gateway;
warned only (``BpmnParse.validateExclusiveGateway``)
    the one unconditional flow of an exclusive gateway without a default: Camunda takes it when
    it reaches it in document order, as :mod:`~dsf_bridge.engine.interpreter` does.

Camunda accepts, so we accept: start events, parallel gateways and other activities without
outgoing flows (the path ends there, an implicit end), and parallel joins with an incoming flow
that nothing can reach. Rules the parser already enforces while building the definition
(flows crossing a subprocess, start events with incoming flows, ...) are not repeated here.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsf_bridge.engine.exceptions import DsfValidationError
from dsf_bridge.engine.model import Flow, Node, NodeKind, ProcessDefinition

__all__ = ["StructureFinding", "check_structure", "structure_findings", "structure_warnings"]


@dataclass(frozen=True, slots=True)
class StructureFinding:
    """One problem Camunda's parser reports: an error refuses the model, a warning does not."""

    line: int | None
    message: str
    warning: bool = False


def check_structure(process: ProcessDefinition) -> None:
    """Refuse the model as Camunda's parser would; raises :class:`DsfValidationError`."""
    errors = [finding for finding in structure_findings(process) if not finding.warning]
    if errors:
        message = "; ".join(finding.message for finding in errors)
        raise DsfValidationError(message, source=process.source, line=errors[0].line)


def structure_warnings(process: ProcessDefinition) -> list[str]:
    """Camunda's parse warnings for a model it accepts, each as ``file:line: <element>: ...``."""
    return [
        f"{process.source}:{finding.line}: {finding.message}"
        for finding in structure_findings(process)
        if finding.warning
    ]


def structure_findings(process: ProcessDefinition) -> list[StructureFinding]:
    """Every error and warning, in document order of the elements they concern."""
    findings: list[StructureFinding] = []
    gateway_targets = _event_gateway_targets(process)
    for node in process.nodes.values():
        if node.kind is NodeKind.EXCLUSIVE_GATEWAY:
            findings.extend(_exclusive_gateway(process, node))
        elif node.kind is NodeKind.EVENT_BASED_GATEWAY:
            findings.extend(_event_based_gateway(process, node))
        if node.id in gateway_targets:
            findings.extend(_catch_after_event_gateway(process, node))
    return findings


def _label(node: Node) -> str:
    return f'<bpmn:{node.kind.value} id="{node.id}">'


def _flow_label(flow: Flow) -> str:
    return f'<bpmn:sequenceFlow id="{flow.id}">'


def _exclusive_gateway(process: ProcessDefinition, node: Node) -> list[StructureFinding]:
    # BpmnParse.validateExclusiveGateway, case by case in its order.
    label = _label(node)
    flows = [process.flows[flow_id] for flow_id in node.outgoing]
    if not flows:
        return [StructureFinding(node.line, f"{label}: exclusive gateway has no outgoing flows")]
    if len(flows) == 1:
        if flows[0].condition is None:
            return []
        return [
            StructureFinding(
                node.line,
                f"{label}: the only outgoing flow {flows[0].id!r} of an exclusive gateway "
                "must not have a condition",
            )
        ]
    findings: list[StructureFinding] = []
    unconditional: list[Flow] = []
    for flow in flows:
        is_default = flow.id == node.default_flow
        if flow.condition is None and not is_default:
            unconditional.append(flow)
        if flow.condition is not None and is_default:
            findings.append(
                StructureFinding(
                    node.line,
                    f"{label}: outgoing flow {flow.id!r} is the default flow but has a "
                    "condition too",
                )
            )
    if node.default_flow or len(unconditional) > 1:
        findings.extend(
            StructureFinding(
                node.line,
                f"{label}: outgoing flow {flow.id!r} has no condition and is not the default flow",
            )
            for flow in unconditional
        )
    elif unconditional:
        flow = unconditional[0]
        findings.append(
            StructureFinding(
                node.line,
                f"{label}: outgoing flow {flow.id!r} has no condition and is not the default "
                "flow; it is taken whenever it is reached in document order (Camunda: "
                f'"We assume it to be the default flow"); better set default="{flow.id}"',
                warning=True,
            )
        )
    return findings


def _event_based_gateway(process: ProcessDefinition, node: Node) -> list[StructureFinding]:
    # BpmnParse.parseEventBasedGateway: no asyncAfter (the gateway is left by the event that
    # fires, not by a job), and one error per outgoing flow to anything but a catch event.
    findings: list[StructureFinding] = []
    if node.async_after:
        findings.append(
            StructureFinding(
                node.line,
                f"{_label(node)}: camunda:asyncAfter is not supported on event-based gateways",
            )
        )
    for flow_id in node.outgoing:
        target = process.nodes[process.flows[flow_id].target]
        if target.kind is not NodeKind.INTERMEDIATE_CATCH_EVENT:
            findings.append(
                StructureFinding(
                    node.line,
                    f"{_label(node)}: an event-based gateway can only be connected to "
                    f"intermediateCatchEvent elements, flow {flow_id!r} leads to "
                    f"bpmn:{target.kind.value} {target.id!r}",
                )
            )
    return findings


def _event_gateway_targets(process: ProcessDefinition) -> set[str]:
    return {
        process.flows[flow_id].target
        for node in process.nodes.values()
        if node.kind is NodeKind.EVENT_BASED_GATEWAY
        for flow_id in node.outgoing
    }


def _catch_after_event_gateway(process: ProcessDefinition, node: Node) -> list[StructureFinding]:
    # BpmnParse.parseSequenceFlow: a catch event behind an event-based gateway belongs to the
    # gateway's event scope and cannot also be entered by an ordinary flow.
    if node.kind is not NodeKind.INTERMEDIATE_CATCH_EVENT:
        return []  # already refused as a target of the gateway
    findings: list[StructureFinding] = []
    for flow_id in node.incoming:
        flow = process.flows[flow_id]
        if process.nodes[flow.source].kind is NodeKind.EVENT_BASED_GATEWAY:
            continue
        findings.append(
            StructureFinding(
                flow.line,
                f"{_flow_label(flow)}: invalid incoming flow into intermediateCatchEvent "
                f"{node.id!r}, which is connected to an event-based gateway",
            )
        )
    return findings
