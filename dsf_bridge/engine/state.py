"""The instance state as every module outside the interpreter reads it: one typed codec.

The interpreter (:mod:`~dsf_bridge.engine.interpreter`) keeps working on the compact JSON dict
its module docstring documents, because copying it into objects on every step would cost more
than the step itself. Everyone else (the runtime, the admin API, the test harness, correlation)
reads a state only through this module, so the two-letter keys are spelled out in one place:

- :func:`loads` / :func:`dumps` turn stored JSON into a checked state and back, unchanged (old
  rows load: a version-1 state written before boundary message waits and incidents existed is
  a valid version-1 state);
- :func:`check` says whether a dict is a state this engine can read, naming what is wrong;
- the queries (:func:`instance_status`, :func:`business_key`, :func:`process_variables`,
  :func:`tokens`, :func:`waiting_for`, :func:`incidents`, :func:`local_variable`, ...) answer
  what readers ask, with :class:`InstanceStatus`, :class:`Phase` and :class:`WaitKind` whose
  values are the stored codes, so nothing in the stored JSON changes.

The queries take the state as stored (any mapping); they trust it the way the interpreter does
and raise :class:`~dsf_bridge.engine.exceptions.StateError` only for codes they do not know.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from dsf_bridge.engine.exceptions import StateError
from dsf_bridge.engine.interpreter import STATE_VERSION

__all__ = [
    "ALTERNATIVE_BUSINESS_KEY",
    "STATE_VERSION",
    "Incident",
    "InstanceStatus",
    "Phase",
    "TokenView",
    "Wait",
    "WaitKind",
    "alternative_business_key",
    "business_key",
    "check",
    "dumps",
    "incident_tokens",
    "incidents",
    "instance_status",
    "is_running",
    "loads",
    "local_variable",
    "message_waits",
    "process_key",
    "process_variables",
    "token",
    "tokens",
    "waiting_for",
]

ALTERNATIVE_BUSINESS_KEY = "alternativeBusinessKey"
"""DSF's alternative business key: a process variable a reply may carry instead of the key."""


class InstanceStatus(StrEnum):
    """Where an instance is in its life; the value is the stored code (``st``)."""

    RUNNING = "run"
    COMPLETED = "done"
    FAILED = "failed"

    @property
    def label(self) -> str:
        """The word the store, the API and the harness use: running, completed or failed."""
        return _STATUS_LABELS[self]

    @classmethod
    def from_label(cls, label: str) -> InstanceStatus:
        for status, word in _STATUS_LABELS.items():
            if word == label:
                return status
        raise ValueError(f"{label!r} is not an instance status")


_STATUS_LABELS = {
    InstanceStatus.RUNNING: "running",
    InstanceStatus.COMPLETED: "completed",
    InstanceStatus.FAILED: "failed",
}


class Phase(StrEnum):
    """What a token is doing at its element; the value is the stored code (``p``)."""

    MOVING = ""
    ASYNC_BEFORE = "ab"
    ASYNC_AFTER = "aa"
    START_LISTENER = "sl"
    END_LISTENER = "el"
    TASK_LISTENER = "tl"
    HANDLER = "h"
    USER_TASK = "u"
    JOIN = "j"
    WAITING = "w"
    SUBPROCESS = "sp"
    MULTI_INSTANCE = "mi"


class WaitKind(StrEnum):
    """What a waiting token waits for; the value is the stored code in ``w`` and ``bw``."""

    MESSAGE = "m"
    TIMER = "t"
    SIGNAL = "s"
    CONDITION = "c"


@dataclass(frozen=True, slots=True)
class Wait:
    """One thing a token waits for.

    ``key`` is the message or signal name, the timer id, or ``""`` for a condition.
    ``boundary`` is true for a boundary event of the activity the token is at (its
    ``element`` is the boundary event), which waits in whatever phase the activity is.
    """

    token: str
    element: str
    kind: WaitKind
    key: str
    boundary: bool = False


@dataclass(frozen=True, slots=True)
class Incident:
    """A job whose retries are used up: the token stays where it is until an operator acts."""

    token: str
    element: str
    message: str
    at: datetime | None


@dataclass(frozen=True, slots=True)
class TokenView:
    """One token (execution) of an instance, as a reader sees it."""

    id: str
    element: str
    scope: int
    phase: Phase
    waits: tuple[Wait, ...]
    incident: Incident | None


# -- codec ------------------------------------------------------------------------------------


def loads(data: str | bytes) -> dict[str, Any]:
    """Read a state from its stored JSON and :func:`check` it."""
    try:
        state = json.loads(data)
    except ValueError as exc:
        raise StateError(f"Instance state is not JSON: {exc}") from exc
    return check(state)


def dumps(state: Mapping[str, Any]) -> str:
    """The state as compact JSON text; ``loads(dumps(state)) == state``.

    The store keeps the same JSON in a JSON column (JSONB on PostgreSQL); this is the text the
    test harness round-trips and measures.
    """
    return json.dumps(state, separators=(",", ":"))


def check(state: object) -> dict[str, Any]:
    """Return ``state`` if this engine can read it, else raise StateError saying why.

    Keys this version does not know are allowed (they are the interpreter's business); the ones
    readers decode must have the documented types and codes.
    """
    if not isinstance(state, dict):
        raise StateError(f"Instance state must be a JSON object, not {type(state).__name__}")
    version = state.get("v")
    if version != STATE_VERSION:
        raise StateError(f"Unsupported instance state version {version!r}")
    _expect(state, "k", str, "the state")
    _expect(state, "bk", str, "the state")
    _expect(state, "n", int, "the state")
    if not isinstance(state.get("vt"), str | None):
        raise StateError("the state: 'vt' must be a string or null")
    if state.get("st") not in _STATUS_CODES:
        raise StateError(f"Unknown instance status {state.get('st')!r}")
    for key in ("vars", "sc", "tk", "j"):
        _expect(state, key, dict, "the state")
    for sid, scope in state["sc"].items():
        where = f"scope {sid}"
        if not isinstance(scope, dict):
            raise StateError(f"{where} must be an object")
        _expect(scope, "p", int, where)
        _expect(scope, "t", str, where)
        _expect(scope, "v", dict, where)
    for tid, raw in state["tk"].items():
        _check_token(state, tid, raw)
    return state


def _check_token(state: Mapping[str, Any], tid: str, raw: object) -> None:
    where = f"token {tid}"
    if not isinstance(raw, dict):
        raise StateError(f"{where} must be an object")
    _expect(raw, "n", str, where)
    _expect(raw, "s", int, where)
    if raw.get("p") not in _PHASE_CODES:
        raise StateError(f"{where} has an unknown phase {raw.get('p')!r}")
    if raw["s"] and str(raw["s"]) not in state["sc"]:
        raise StateError(f"{where} is in scope {raw['s']}, which the state does not have")
    if "v" in raw:
        _expect(raw, "v", dict, where)
    for key in ("w", "bw"):
        for entry in raw.get(key, ()):
            if (
                not isinstance(entry, list)
                or len(entry) != 3  # [element, kind, key]
                or not all(isinstance(part, str) for part in entry)
                or entry[1] not in _KIND_CODES
            ):
                raise StateError(f"{where} has a malformed wait {entry!r} in {key!r}")
    for timer_id in raw.get("bt", ()):
        if not isinstance(timer_id, str):
            raise StateError(f"{where} has a malformed boundary timer {timer_id!r}")
    if "x" in raw:
        incident = raw["x"]
        if not isinstance(incident, dict) or not isinstance(incident.get("m"), str):
            raise StateError(f"{where} has a malformed incident {incident!r}")
        _parse_time(incident.get("at"), where)


def _expect(holder: Mapping[str, Any], key: str, kind: type, where: str) -> None:
    value = holder.get(key)
    # bool is an int to isinstance; no field of the state is ever a boolean where an int is due.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StateError(f"{where}: {key!r} must be {kind.__name__}, not {value!r}")


def _parse_time(value: object, where: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise StateError(f"{where}: incident time {value!r} is not ISO 8601")
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise StateError(f"{where}: incident time {value!r} is not ISO 8601") from exc


_STATUS_CODES = frozenset(status.value for status in InstanceStatus)
_PHASE_CODES = frozenset(phase.value for phase in Phase)
_KIND_CODES = frozenset(kind.value for kind in WaitKind)


# -- queries ----------------------------------------------------------------------------------


def instance_status(state: Mapping[str, Any]) -> InstanceStatus:
    code = state["st"]
    try:
        return InstanceStatus(code)
    except ValueError as exc:
        raise StateError(f"Unknown instance status {code!r}") from exc


def is_running(state: Mapping[str, Any]) -> bool:
    """True while the instance has not ended (the cheap check the hot paths make)."""
    return bool(state["st"] == InstanceStatus.RUNNING)


def process_key(state: Mapping[str, Any]) -> str:
    key: str = state["k"]
    return key


def business_key(state: Mapping[str, Any]) -> str:
    key: str = state["bk"]
    return key


def alternative_business_key(state: Mapping[str, Any]) -> str | None:
    """DSF's alternative business key when a handler set one that differs from the key."""
    value = state["vars"].get(ALTERNATIVE_BUSINESS_KEY)
    if isinstance(value, str) and value and value != state["bk"]:
        return value
    return None


def process_variables(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The process instance's variables (scope 0); do not change them through this."""
    variables: Mapping[str, Any] = state["vars"]
    return variables


def local_variable(state: Mapping[str, Any], token_id: str, name: str, default: Any = None) -> Any:
    """Camunda's local variable ``name`` of the token's execution, or ``default``.

    The same lookup as the interpreter's ``lookup_local``: the token's own locals (inputs,
    multi-instance element), then the variables of the scope it runs in (its embedded
    subprocess, or the process instance in scope 0), never an outer scope's.
    """
    raw = state["tk"][token_id]
    own = raw.get("v")
    if own is not None and name in own:
        return own[name]
    if raw["p"] == "sp":  # a subprocess's own execution: its scope's variables
        inner = state["sc"][str(raw["c"])]["v"]
        if name in inner:
            return inner[name]
    sid = raw["s"]
    scope_vars: Mapping[str, Any] = state["sc"][str(sid)]["v"] if sid else state["vars"]
    return scope_vars.get(name, default)


def token(state: Mapping[str, Any], token_id: str) -> TokenView:
    return _view(token_id, state["tk"][token_id])


def tokens(state: Mapping[str, Any]) -> list[TokenView]:
    """Every token, oldest first."""
    return [_view(tid, raw) for tid, raw in sorted(state["tk"].items(), key=_by_age)]


def waiting_for(state: Mapping[str, Any]) -> list[Wait]:
    """Everything the instance waits for, token by token, oldest first (empty once ended).

    Catch events and event-based gateways (phase ``w``) and the boundary events of activities,
    in whatever phase the activity is: message boundaries (``bw``) and timer boundaries
    (``bt``, whose key is the timer id).
    """
    if not is_running(state):
        return []
    result: list[Wait] = []
    for tid, raw in sorted(state["tk"].items(), key=_by_age):
        if raw["p"] == Phase.WAITING or "bw" in raw or "bt" in raw:
            result.extend(_waits(tid, raw))
    return result


def message_waits(state: Mapping[str, Any]) -> list[tuple[str, str, str, object]]:
    """``(token, element, message name, local correlationKey)`` of every message the instance
    waits for: catch events, receive tasks and event-based gateways, then boundary events. The
    hot path of correlation (every Task and every stored step), so it walks the raw tokens in
    stored order, builds no views, and looks the key up as :func:`local_variable` does."""
    result: list[tuple[str, str, str, object]] = []
    if state["st"] != "run":
        return result
    for tid, raw in state["tk"].items():
        waits = raw["w"] if raw["p"] == "w" else ()
        boundary = raw.get("bw") or ()
        if not waits and not boundary:
            continue
        key = local_variable(state, tid, "correlationKey")
        for element, kind, name in waits:
            if kind == "m":
                result.append((tid, element, name, key))
        for element, _, name in boundary:
            result.append((tid, element, name, key))
    return result


def incident_count(state: Mapping[str, Any]) -> int:
    """How many tokens are parked in an incident (the store keeps it beside the state, for the
    counts of /metrics); 0 for a state without tokens."""
    return sum(1 for raw in state.get("tk", {}).values() if "x" in raw)


def incident_tokens(state: Mapping[str, Any]) -> set[str]:
    """The tokens parked in an incident (cheap: no views; for "did a step add one?")."""
    return {tid for tid, raw in state["tk"].items() if "x" in raw}


def incidents(state: Mapping[str, Any]) -> list[Incident]:
    """The executions stuck on a job whose retries are used up, oldest token first."""
    return [
        _incident(tid, raw) for tid, raw in sorted(state["tk"].items(), key=_by_age) if "x" in raw
    ]


def _by_age(item: tuple[str, Any]) -> tuple[int, str]:
    # Token ids are the interpreter's counter as text: "10" is younger than "9".
    tid = item[0]
    return (int(tid), tid) if tid.isdigit() else (-1, tid)


def _view(tid: str, raw: Mapping[str, Any]) -> TokenView:
    code = raw["p"]
    try:
        phase = Phase(code)
    except ValueError as exc:
        raise StateError(f"token {tid} has an unknown phase {code!r}") from exc
    return TokenView(
        id=tid,
        element=raw["n"],
        scope=raw["s"],
        phase=phase,
        waits=tuple(_waits(tid, raw)),
        incident=_incident(tid, raw) if "x" in raw else None,
    )


def _waits(tid: str, raw: Mapping[str, Any]) -> list[Wait]:
    result: list[Wait] = []
    if raw["p"] == Phase.WAITING:
        result.extend(_wait(tid, entry, boundary=False) for entry in raw.get("w", ()))
    result.extend(_wait(tid, entry, boundary=True) for entry in raw.get("bw", ()))
    for timer_id in raw.get("bt", ()):
        # Timer ids are "token/element/counter" (the interpreter's ``timer``); element ids are
        # XML NCNames, which never contain "/".
        parts = timer_id.split("/")
        element = parts[1] if len(parts) == 3 else raw["n"]
        result.append(Wait(tid, element, WaitKind.TIMER, timer_id, boundary=True))
    return result


def _wait(tid: str, entry: list[str], *, boundary: bool) -> Wait:
    element, code, key = entry
    try:
        kind = WaitKind(code)
    except ValueError as exc:
        raise StateError(f"token {tid} waits for an unknown kind {code!r}") from exc
    return Wait(tid, element, kind, key, boundary)


def _incident(tid: str, raw: Mapping[str, Any]) -> Incident:
    incident = raw["x"]
    return Incident(
        token=tid,
        element=incident.get("e") or raw["n"],
        message=incident["m"],
        at=_parse_time(incident.get("at"), f"token {tid}"),
    )
