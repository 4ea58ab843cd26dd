"""The rules the DSF BPE enforces when it loads a plugin's BPMN file.

- exactly one executable process per file;
- the process id is ``<domainWithoutDots>_<name>`` (letters, digits and ``-`` either side of one
  ``_``); when the plugin's process keys are known, it must be one of them;
- ``camunda:versionTag`` equals the resource version (``a.b``) after ``#{version}`` substitution;
- every message send element (send task, message intermediate throw event, message end event)
  has non-blank ``camunda:field``s ``instantiatesCanonical``, ``messageName`` and ``profile``;
- no placeholder ``#{...}`` is left once the plugin's placeholders are replaced;
- the sequence-flow structure Camunda's parser refuses when the BPE deploys the model
  (:mod:`dsf_bridge.engine.structure`).

Messages are referenced by name: catch events name a ``bpmn:message`` (checked by the parser).
"""

from __future__ import annotations

import re

from dsf_bridge.engine.exceptions import DsfValidationError
from dsf_bridge.engine.model import NodeKind, ProcessDefinition
from dsf_bridge.engine.parser import BpmnDocument
from dsf_bridge.engine.structure import structure_findings

__all__ = ["PROCESS_ID_PATTERN", "validate_document", "validate_process"]

PROCESS_ID_PATTERN = re.compile(r"^[-a-zA-Z0-9]+_[-a-zA-Z0-9]+$")
_VERSION_PATTERN = re.compile(r"^\d+\.\d+$")
_PLACEHOLDER = re.compile(r"#\{[^}]*\}")


def validate_document(document: BpmnDocument, resource_version: str) -> ProcessDefinition:
    """Validate a parsed file as the DSF BPE does and return its one executable process."""
    if len(document.processes) != 1:
        raise DsfValidationError(
            f"expected exactly one executable process, found {len(document.processes)}"
            + (f" ({', '.join(p.key for p in document.processes)})" if document.processes else ""),
            source=document.source,
        )
    process = document.processes[0]
    validate_process(process, resource_version)
    return process


def validate_process(process: ProcessDefinition, resource_version: str) -> None:
    """Check one process against the DSF rules; raises :class:`DsfValidationError`."""
    problems: list[tuple[int | None, str]] = []
    if not _VERSION_PATTERN.match(resource_version):
        problems.append((None, f"resource version {resource_version!r} is not 'major.minor'"))
    if not PROCESS_ID_PATTERN.match(process.key):
        problems.append(
            (None, f"process id {process.key!r} does not match <domainWithoutDots>_<name>")
        )
    if process.version_tag is None or not process.version_tag.strip():
        problems.append((None, f"process {process.key!r} has no camunda:versionTag"))
    elif process.version_tag != resource_version:
        problems.append(
            (
                None,
                f"camunda:versionTag {process.version_tag!r} differs from the resource version "
                f"{resource_version!r}",
            )
        )
    if not process.message_starts and process.none_start is None:
        problems.append((None, f"process {process.key!r} has no start event"))
    for node in process.nodes.values():
        if node.send is not None:
            for field_name, expression in (
                ("instantiatesCanonical", node.send.instantiates_canonical),
                ("messageName", node.send.message_name),
                ("profile", node.send.profile),
            ):
                if not expression.source.strip():
                    problems.append(
                        (
                            node.line,
                            f"message send element {node.id!r} has no non-blank "
                            f"camunda:field {field_name!r}",
                        )
                    )
        texts = [expression.source for _, expression in node.inputs + node.outputs]
        texts += [expression.source for expression in node.fields.values()]
        texts += [node.form_key or "", node.message_name or "", node.signal_name or ""]
        for text in texts:
            leftover = _PLACEHOLDER.search(text)
            if leftover:
                problems.append(
                    (node.line, f"element {node.id!r} has unreplaced placeholder {leftover[0]}")
                )
        if node.kind is NodeKind.USER_TASK and not (node.form_key or "").strip():
            problems.append((node.line, f"user task {node.id!r} has no camunda:formKey"))
    for signal in process.signals.values():
        leftover = _PLACEHOLDER.search(signal)
        if leftover:
            problems.append((None, f"signal {signal!r} has unreplaced placeholder {leftover[0]}"))
    # Camunda's BpmnParse runs when the BPE deploys the model, after DSF's own checks.
    problems += [
        (finding.line, finding.message)
        for finding in structure_findings(process)
        if not finding.warning
    ]
    if problems:
        line, first = problems[0]
        message = first if len(problems) == 1 else "; ".join(text for _, text in problems)
        raise DsfValidationError(message, source=process.source, line=line)
