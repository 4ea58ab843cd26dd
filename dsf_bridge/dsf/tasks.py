"""DSF Task conventions: reading the process a Task addresses, its message inputs, and building
the Tasks the bridge sends or updates, exactly as a Java DSF BPE shapes them.

- ``instantiatesCanonical`` is ``http(s)://<domain>/bpe/Process/<name>|<major.minor>``; the
  process key is the domain without dots, ``_``, and the name (``dsf.dev`` + ``ping`` gives
  ``dsfdev_ping``).
- Inputs coded in ``http://dsf.dev/fhir/CodeSystem/bpmn-message``: ``message-name`` (exactly
  one), ``business-key`` and ``correlation-key`` (at most one each); errors go into an output
  coded ``error``.
- Requester and recipient are logical references by ``http://dsf.dev/sid/organization-identifier``.

Inputs, requester, recipient and ``instantiatesCanonical`` of a received Task are never changed:
the helpers here copy the Task and touch only status, the business key and outputs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dsf_bridge.dsf.vocabulary import (
    BPMN_MESSAGE_SYSTEM,
    ORGANIZATION_IDENTIFIER_SYSTEM,
    PRACTITIONER_IDENTIFIER_SYSTEM,
)
from dsf_bridge.errors import BridgeError

__all__ = [
    "BUSINESS_KEY",
    "CORRELATION_KEY",
    "ERROR",
    "MESSAGE_NAME",
    "ProcessReference",
    "TaskFormatError",
    "TaskLimits",
    "TaskMessage",
    "bounds_violation",
    "build_task",
    "input_values",
    "organization_reference",
    "parse_instantiates_canonical",
    "read_message",
    "recipient_identifier",
    "requester_identifier",
    "requester_label",
    "shape_violation",
    "shortened",
    "task_input",
    "task_output_task_ids",
    "task_output_value",
    "task_output_variable",
    "task_outputs",
    "unstorable",
    "unstorable_json",
    "updated_task",
    "with_outputs",
]

MESSAGE_NAME = "message-name"
BUSINESS_KEY = "business-key"
CORRELATION_KEY = "correlation-key"
ERROR = "error"

_CANONICAL = re.compile(
    r"^(?P<base>https?://(?P<domain>[A-Za-z0-9.-]+))/bpe/Process/"
    r"(?P<name>[A-Za-z0-9_-]+)\|(?P<version>\d+\.\d+)$"
)


def shortened(value: object, limit: int = 120) -> str:
    """``value`` as text for an error or audit reason, cut after ``limit`` characters: a value
    from a Task may be tens of kilobytes, and an error must stay one line to read."""
    text = str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class TaskFormatError(BridgeError):
    """A Task does not follow the DSF conventions; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class ProcessReference:
    """The process a Task instantiates or continues."""

    canonical: str
    domain: str
    name: str
    version: str

    @property
    def key(self) -> str:
        return f"{self.domain.replace('.', '')}_{self.name}"


def parse_instantiates_canonical(value: object) -> ProcessReference:
    if not isinstance(value, str) or not value:
        raise TaskFormatError(
            "Task.instantiatesCanonical is missing; expected "
            "http(s)://<domain>/bpe/Process/<name>|<major.minor>"
        )
    match = _CANONICAL.match(value)
    if match is None:
        raise TaskFormatError(
            f"Task.instantiatesCanonical {shortened(repr(value))} is malformed; expected "
            "http(s)://<domain>/bpe/Process/<name>|<major.minor>, "
            "e.g. http://dsf.dev/bpe/Process/ping|1.0"
        )
    return ProcessReference(value, match["domain"], match["name"], match["version"])


@dataclass(frozen=True, slots=True)
class TaskLimits:
    """Bounds on a received Task (``[intake]`` in the configuration, same defaults)."""

    max_task_bytes: int = 1_048_576
    max_depth: int = 64
    max_string_length: int = 65_536
    max_inputs: int = 200


def bounds_violation(task: Mapping[str, Any], limits: TaskLimits) -> str | None:
    """Which bound ``task`` breaks, said without quoting it; ``None`` when it keeps them all.

    Walks the Task without recursion and stops at the first broken bound, so a Task nested far
    deeper than Python's recursion limit, or one of many megabytes, costs one bounded pass:
    nothing else of it (copies, JSON encoding, the authorizer, the store) may run before this.
    Sizes are of compact JSON, escapes not counted.
    """
    inputs = task.get("input")
    if isinstance(inputs, list) and len(inputs) > limits.max_inputs:
        return f"Task has {len(inputs)} inputs; this site takes at most {limits.max_inputs}"
    size = 0
    stack: list[tuple[object, int]] = [(task, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, Mapping | list):
            if depth > limits.max_depth:
                return (
                    f"Task is nested more than {limits.max_depth} levels deep; this site takes "
                    f"at most {limits.max_depth}"
                )
            size += 2 + max(len(value) - 1, 0)  # brackets and commas
            if isinstance(value, Mapping):
                for key, item in value.items():
                    stack.append((str(key), depth))
                    size += 1  # the colon
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            if len(value) > limits.max_string_length:
                return (
                    f"Task has a string of {len(value)} characters; this site takes at most "
                    f"{limits.max_string_length}"
                )
            size += len(value) + 2
        elif isinstance(value, bool) or value is None:
            size += 5
        elif isinstance(value, int):
            size += value.bit_length() // 3 + 1  # str() of a huge int raises (3.11 digit limit)
        else:
            size += len(repr(value))
        if size > limits.max_task_bytes:
            return (
                f"Task is larger than {limits.max_task_bytes} bytes as JSON; this site takes at "
                f"most {limits.max_task_bytes}"
            )
    return None


def unstorable_json(value: object) -> str | None:
    """What of the JSON ``value`` PostgreSQL's JSONB cannot store although JSON can hold it
    (a NUL character in a string, a number that is not finite), said without quoting it;
    ``None`` when there is none. One pass, no recursion."""
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                return "a string with a NUL character"
        elif isinstance(item, float) and not math.isfinite(item):
            return "a number that is not finite (NaN or Infinity)"
    return None


def unstorable(task: Mapping[str, Any]) -> str | None:
    """What of ``task`` no FHIR value holds and PostgreSQL cannot store
    (:func:`unstorable_json`), for a Task within :func:`bounds_violation`'s bounds."""
    problem = unstorable_json(task)
    return None if problem is None else f"Task has {problem}, which no FHIR value holds"


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), "a number" if isinstance(value, int | float) else "null")


def _shape_of_reference(path: str, reference: object) -> str | None:
    if not isinstance(reference, Mapping):
        return f"{path} is {_json_type(reference)}, not an object"
    identifier = reference.get("identifier")
    if identifier is None:
        return None
    if not isinstance(identifier, Mapping):
        return f"{path}.identifier is {_json_type(identifier)}, not an object"
    for name in ("system", "value"):
        if identifier.get(name) is not None and not isinstance(identifier[name], str):
            return f"{path}.identifier.{name} is {_json_type(identifier[name])}, not a string"
    return None


def _shape_of_parameters(path: str, parameters: object) -> str | None:
    if not isinstance(parameters, list):
        return f"{path} is {_json_type(parameters)}, not an array"
    for number, parameter in enumerate(parameters):
        where = f"{path}[{number}]"
        if not isinstance(parameter, Mapping):
            return f"{where} is {_json_type(parameter)}, not an object"
        concept = parameter.get("type")
        if concept is None:
            return f"{where} has no type"
        if not isinstance(concept, Mapping):
            return f"{where}.type is {_json_type(concept)}, not an object"
        codings = concept.get("coding")
        if codings is None:
            continue
        if not isinstance(codings, list):
            return f"{where}.type.coding is {_json_type(codings)}, not an array"
        for index, coding in enumerate(codings):
            if not isinstance(coding, Mapping):
                return f"{where}.type.coding[{index}] is {_json_type(coding)}, not an object"
            for name in ("system", "code"):
                if coding.get(name) is not None and not isinstance(coding[name], str):
                    return (
                        f"{where}.type.coding[{index}].{name} is {_json_type(coding[name])}, "
                        "not a string"
                    )
    return None


def shape_violation(task: Mapping[str, Any]) -> str | None:
    """Which element the bridge reads of ``task`` has a JSON type FHIR does not allow there (an
    input that is no object, a coding list that is an object, a requester that is a string),
    naming the element, never quoting it; ``None`` when all are well-typed.

    A Java DSF server cannot even parse such a Task; the bridge fails it before reading more of
    it (:func:`bounds_violation` first: this walks only the elements named here)."""
    meta = task.get("meta")
    if meta is not None and not isinstance(meta, Mapping):
        return f"Task.meta is {_json_type(meta)}, not an object"
    profiles = meta.get("profile") if isinstance(meta, Mapping) else None
    if profiles is not None:
        if not isinstance(profiles, list):
            return f"Task.meta.profile is {_json_type(profiles)}, not an array"
        for number, profile in enumerate(profiles):
            if not isinstance(profile, str):
                return f"Task.meta.profile[{number}] is {_json_type(profile)}, not a string"
    for name in ("instantiatesCanonical", "status"):
        if task.get(name) is not None and not isinstance(task[name], str):
            return f"Task.{name} is {_json_type(task[name])}, not a string"
    if task.get("requester") is not None:
        problem = _shape_of_reference("Task.requester", task["requester"])
        if problem is not None:
            return problem
    restriction = task.get("restriction")
    if restriction is not None:
        if not isinstance(restriction, Mapping):
            return f"Task.restriction is {_json_type(restriction)}, not an object"
        recipients = restriction.get("recipient")
        if recipients is not None:
            if not isinstance(recipients, list):
                return f"Task.restriction.recipient is {_json_type(recipients)}, not an array"
            for number, recipient in enumerate(recipients):
                problem = _shape_of_reference(f"Task.restriction.recipient[{number}]", recipient)
                if problem is not None:
                    return problem
    for name in ("input", "output"):
        if task.get(name) is not None:
            problem = _shape_of_parameters(f"Task.{name}", task[name])
            if problem is not None:
                return problem
    return None


def _codings(element: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    concept = element.get("type")
    codings = concept.get("coding") if isinstance(concept, Mapping) else None
    return [c for c in codings or [] if isinstance(c, Mapping)]


def input_values(
    task: Mapping[str, Any], code: str, system: str = BPMN_MESSAGE_SYSTEM
) -> list[Any]:
    """The ``value[x]`` of every input of ``task`` coded ``system|code``."""
    values: list[Any] = []
    parameters = task.get("input")
    for parameter in parameters if isinstance(parameters, list) else []:
        if not isinstance(parameter, Mapping):
            continue
        if any(c.get("system") == system and c.get("code") == code for c in _codings(parameter)):
            values.append(
                next(
                    (value for key, value in parameter.items() if key.startswith("value")),
                    None,
                )
            )
    return values


def _single(task: Mapping[str, Any], code: str) -> str | None:
    values = input_values(task, code)
    if len(values) > 1:
        raise TaskFormatError(f"Task has {len(values)} '{code}' inputs; DSF allows one")
    if not values:
        return None
    value = values[0]
    if not isinstance(value, str) or not value.strip():
        raise TaskFormatError(f"Task input '{code}' must be a non-empty valueString")
    return value


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """What a received Task asks for."""

    process: ProcessReference
    message_name: str
    business_key: str | None
    correlation_key: str | None
    profile: str | None


def read_message(task: Mapping[str, Any]) -> TaskMessage:
    """Read the process, message name, keys and profile of a Task; raise TaskFormatError."""
    process = parse_instantiates_canonical(task.get("instantiatesCanonical"))
    message_name = _single(task, MESSAGE_NAME)
    if message_name is None:
        raise TaskFormatError(f"Task has no '{MESSAGE_NAME}' input ({BPMN_MESSAGE_SYSTEM})")
    profiles = (task.get("meta") or {}).get("profile") or []
    return TaskMessage(
        process=process,
        message_name=message_name,
        business_key=_single(task, BUSINESS_KEY),
        correlation_key=_single(task, CORRELATION_KEY),
        profile=str(profiles[0]) if profiles else None,
    )


def _identifier_of(reference: object) -> str | None:
    if not isinstance(reference, Mapping):
        return None
    identifier = reference.get("identifier")
    if not isinstance(identifier, Mapping):
        return None
    if identifier.get("system") != ORGANIZATION_IDENTIFIER_SYSTEM:
        return None
    value = identifier.get("value")
    return str(value) if value else None


def requester_identifier(task: Mapping[str, Any]) -> str | None:
    return _identifier_of(task.get("requester"))


def requester_label(task: Mapping[str, Any]) -> str:
    """Who asked, for audit trails: ``organization:<id>``, or ``practitioner:<id>`` for a
    DSF 2.x user of the local organization (e.g. through the DSF FHIR UI)."""
    organization = requester_identifier(task)
    if organization is not None:
        return f"organization:{organization}"
    requester = task.get("requester")
    identifier = requester.get("identifier") if isinstance(requester, Mapping) else None
    if (
        isinstance(identifier, Mapping)
        and identifier.get("system") == PRACTITIONER_IDENTIFIER_SYSTEM
        and isinstance(identifier.get("value"), str)
        and identifier["value"]
    ):
        return f"practitioner:{identifier['value']}"
    return "unknown requester"


def recipient_identifier(task: Mapping[str, Any]) -> str | None:
    recipients = (task.get("restriction") or {}).get("recipient") or []
    return _identifier_of(recipients[0]) if len(recipients) == 1 else None


def organization_reference(identifier: str) -> dict[str, Any]:
    return {
        "type": "Organization",
        "identifier": {"system": ORGANIZATION_IDENTIFIER_SYSTEM, "value": identifier},
    }


def task_input(system: str, code: str, value: object) -> dict[str, Any]:
    """One Task input; the value's Python type picks ``value[x]``."""
    parameter: dict[str, Any] = {"type": {"coding": [{"system": system, "code": code}]}}
    if isinstance(value, bool):
        parameter["valueBoolean"] = value
    elif isinstance(value, int):
        parameter["valueInteger"] = value
    elif isinstance(value, float):
        parameter["valueDecimal"] = value
    elif isinstance(value, Mapping):
        typed = [key for key in value if key.startswith("value")]
        if len(typed) == 1:  # already {"valueReference": {...}} or similar
            parameter[typed[0]] = value[typed[0]]
        elif "system" in value and "code" in value:
            parameter["valueCoding"] = dict(value)
        else:
            parameter["valueReference"] = dict(value)
    else:
        parameter["valueString"] = str(value)
    return parameter


def build_task(
    *,
    instantiates_canonical: str,
    message_name: str,
    profile: str,
    business_key: str | None,
    correlation_key: str | None,
    requester: str,
    recipient: str,
    inputs: Sequence[Mapping[str, object]] = (),
    authored_on: dt.datetime,
) -> dict[str, Any]:
    """A Task to send, shaped like the Java BPE's ``AbstractTaskMessageSend`` builds it."""
    parameters = [task_input(BPMN_MESSAGE_SYSTEM, MESSAGE_NAME, message_name)]
    if business_key is not None:  # a Task that starts a process at a remote site may have none
        parameters.append(task_input(BPMN_MESSAGE_SYSTEM, BUSINESS_KEY, business_key))
    if correlation_key is not None:
        parameters.append(task_input(BPMN_MESSAGE_SYSTEM, CORRELATION_KEY, correlation_key))
    parameters.extend(
        task_input(str(item["system"]), str(item["code"]), item["value"]) for item in inputs
    )
    return {
        "resourceType": "Task",
        "meta": {"profile": [profile]},
        "instantiatesCanonical": instantiates_canonical,
        "status": "requested",
        "intent": "order",
        "authoredOn": authored_on.astimezone(dt.UTC).isoformat(timespec="milliseconds"),
        "requester": organization_reference(requester),
        "restriction": {"recipient": [organization_reference(recipient)]},
        "input": parameters,
    }


def updated_task(
    task: Mapping[str, Any],
    *,
    status: str,
    business_key: str | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """A copy of ``task`` with a new status, a business-key input added if it had none, and an
    ``error`` output; nothing else changes.

    Only what changes is copied (the Task, its ``meta``, ``input`` and ``output`` lists), the
    rest is shared with ``task``: a deep copy recurses once per level, and a hostile Task nested
    hundreds of levels deep must still be failed. Callers must not change nested parts."""
    updated = dict(task)
    updated["status"] = status
    if isinstance(task.get("meta"), Mapping):
        updated["meta"] = dict(task["meta"])
    for name in ("input", "output"):
        if isinstance(task.get(name), list):
            updated[name] = list(task[name])
    # A hostile Task's input may be no list (failed by shape_violation): it gets no business
    # key then, and an error output replaces an output that is no list.
    if (
        business_key is not None
        and isinstance(updated.get("input", []), list)
        and not input_values(updated, BUSINESS_KEY)
    ):
        updated.setdefault("input", []).append(
            task_input(BPMN_MESSAGE_SYSTEM, BUSINESS_KEY, business_key)
        )
    if error is not None:
        if not isinstance(updated.get("output", []), list):
            updated["output"] = []
        updated.setdefault("output", []).append(
            {
                "type": {"coding": [{"system": BPMN_MESSAGE_SYSTEM, "code": ERROR}]},
                "valueString": error,
            }
        )
    return updated


# Outputs for a Task an instance took in live in process variables until the Task completes or
# fails: DSF 1.x forbids updating a running Task (in-progress -> in-progress), and the Java v1
# plugins keep their Task in the instance and write its outputs with the completing PUT. One
# variable per output (name from the Task id and the output's digest), so that handlers running
# side by side never overwrite each other's outputs and a repeated handler adds nothing twice.
TASK_OUTPUT_PREFIX = "dsf.taskOutput:"


def task_output_variable(task_id: str, output: Mapping[str, Any]) -> str:
    """The process variable that holds ``output`` for Task ``task_id``."""
    digest = hashlib.sha256(json.dumps(output, sort_keys=True).encode()).hexdigest()[:16]
    return f"{TASK_OUTPUT_PREFIX}{task_id}:{digest}"


def task_output_task_ids(variables: Mapping[str, object]) -> set[str]:
    """The Tasks that handlers added outputs for."""
    return {
        name[len(TASK_OUTPUT_PREFIX) :].rsplit(":", 1)[0]
        for name in variables
        if name.startswith(TASK_OUTPUT_PREFIX)
    }


def task_output_value(position: int, output: Mapping[str, Any]) -> dict[str, Any]:
    """What the variable holds: the output and its position among the Task's outputs (the
    order survives PostgreSQL's JSONB, which keeps no key order)."""
    return {"position": position, "output": dict(output)}


def task_outputs(variables: Mapping[str, object], task_id: str) -> list[dict[str, Any]]:
    """The outputs handlers added for Task ``task_id``, in the order they were added."""
    prefix = f"{TASK_OUTPUT_PREFIX}{task_id}:"
    found: list[tuple[int, str, dict[str, Any]]] = []
    for name, value in variables.items():
        if not name.startswith(prefix) or not isinstance(value, Mapping):
            continue
        if isinstance(value.get("output"), Mapping):
            found.append((int(value.get("position", 0)), name, dict(value["output"])))
        elif "type" in value:  # stored before outputs had positions: first, by name
            found.append((-1, name, dict(value)))
    return [output for _position, _name, output in sorted(found, key=lambda f: f[:2])]


def with_outputs(task: Mapping[str, Any], outputs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A copy of ``task`` with ``outputs`` added after those it has; an output already there is
    not repeated (a PUT retried after a crash writes the same Task).

    As :func:`updated_task`, only what changes is copied (the Task and its ``output`` list);
    the rest, and the outputs' nested parts, are shared: callers must not change them."""
    updated = dict(task)
    # An output that is no list (a hostile Task's) is replaced, as updated_task does.
    present = list(task["output"]) if isinstance(task.get("output"), list) else []
    for output in outputs:
        if output not in present:
            present.append(dict(output))
    if present:
        updated["output"] = present
    return updated
