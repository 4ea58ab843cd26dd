"""The interpreter: ``(definition, state, event) -> (new state, effects)``.

State is a plain JSON-compatible dict (schema version :data:`STATE_VERSION`) and never holds a
copy of the definition: tokens name nodes by id. Its shape, with short keys because thousands of
waiting instances are stored::

    {"v": 1, "k": process key, "vt": versionTag, "bk": business key,
     "st": "run" | "done" | "failed",
     "n": next id, "vars": {process variables},
     "sc": {scope id: {"p": parent scope, "t": owning token, "v": {local variables}}},
     "tk": {token id: {"n": node, "s": scope, "p": phase, ...}},
     "j": {"scope:node": arrivals at a parallel join}}

A token's phase says what it waits for: ``ab``/``aa`` an async job before/after the node, ``sl``,
``el``, ``tl`` the start/end/task listener number ``i``, ``h`` a handler, ``u`` a user task,
``j`` arrived at a parallel join that waits for other branches, ``w`` the events in ``w``
(``[node, kind, key]``: ``m`` message name, ``t`` timer id, ``s`` signal name, ``c``
condition), ``sp`` an embedded subprocess, ``mi`` the instances of a multi-instance activity.
An activity's boundary events are subscribed in ``bt`` (timer ids) and ``bw`` (message waits)
whatever its phase. A job parked as an incident carries ``x`` (``m`` message, ``e`` element,
``at`` time) and its retries left ``r``. Scope ``0`` is the process instance; its variables
live in ``vars`` (read them outside the engine through :mod:`dsf_bridge.engine.state`).

A handler that raises fails the instance with effects, as DSF's delegate wrappers do. Engine
errors (no exclusive-gateway flow, an unset variable in a condition) undo the step when a Task
or a job started it (:class:`~dsf_bridge.engine.exceptions.RolledBackError`; the job is retried,
then becomes an incident) and fail the instance otherwise, so the outcome is durable like any
other step. Events that no longer apply (a timer that fired after its wait ended, a handler
result for a cancelled token) change nothing. Events that cannot apply (a message that
correlates to nothing) raise :class:`~dsf_bridge.engine.exceptions.CorrelationError` and leave
the state untouched.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from dsf_bridge.engine.events import (
    CallHandler,
    CancelTimer,
    CancelUserTask,
    CompleteTasks,
    CreateQuestionnaireResponse,
    Effect,
    Event,
    FailTasks,
    HandlerCompleted,
    HandlerFailed,
    IncidentRetried,
    InstanceCancelled,
    JobDue,
    MessageReceived,
    ProcessCompleted,
    ProcessFailed,
    ScheduleJob,
    SendTask,
    SignalReceived,
    Start,
    StartTimer,
    ThrowSignal,
    TimerFired,
    UserTaskCompleted,
)
from dsf_bridge.engine.exceptions import CorrelationError, NoOutgoingFlowError, RolledBackError
from dsf_bridge.engine.expressions import Expression, UnknownVariableError
from dsf_bridge.engine.model import EventKind, Node, NodeKind, ProcessDefinition, TimerSpec
from dsf_bridge.engine.timers import (
    TimerError,
    add_duration,
    parse_date,
    parse_duration,
    parse_retry_cycle,
)
from dsf_bridge.errors import ProcessExecutionError

__all__ = ["STATE_VERSION", "Step", "start", "step"]

STATE_VERSION = 1
"""Bumped when the state layout changes; :func:`step` refuses versions it cannot read."""

State = dict[str, Any]
_T = TypeVar("_T")

# Camunda's default for jobs without failedJobRetryTimeCycle: three tries in all, at once.
_DEFAULT_RETRY = parse_retry_cycle("R3/PT0S")
_HANDLER_PHASES = frozenset({"h", "sl", "el", "tl"})
_MAX_CONDITIONAL_ROUNDS = 100
_NO_CHANGES: set[tuple[str, str]] = set()  # shared, never written (``_Run.track`` is off)
# A token that enters this many elements in one step without a wait state is in a loop.
_LOOP_BOUND = 10_000
_LOOP_TRACE = 64
_ACTIVITIES = frozenset(
    {
        NodeKind.SERVICE_TASK,
        NodeKind.SEND_TASK,
        NodeKind.USER_TASK,
        NodeKind.RECEIVE_TASK,
        NodeKind.SUB_PROCESS,
    }
)


@dataclass(slots=True)
class Step:
    """The outcome of one event: the new state and the effects to perform, in order."""

    state: State
    effects: tuple[Effect, ...]
    error: str | None = None
    """Set when the step was undone: the engine error of a failed job (retried or parked)."""


def start(definition: ProcessDefinition, event: Start) -> Step:
    """Create a new instance and run it until every token waits."""
    if event.message_name is not None:
        node_id = definition.message_starts.get(event.message_name)
        if node_id is None:
            raise CorrelationError(
                f"Process {definition.key!r} has no message start event for {event.message_name!r}"
            )
    else:
        if definition.none_start is None:
            raise CorrelationError(f"Process {definition.key!r} has no none start event")
        node_id = definition.none_start
    state: State = {
        "v": STATE_VERSION,
        "k": definition.key,
        "vt": definition.version_tag,
        "bk": event.business_key,
        "st": "run",
        "n": 1,
        "vars": dict(event.variables),
        "sc": {},
        "tk": {},
        "j": {},
    }
    run = _Run(definition, state, event.now)
    tid = run.new_token(node_id, 0)
    run.guarded(lambda: run.enter(tid))
    if definition.has_conditionals and run.state["st"] == "run":
        run.guarded(run.check_conditions)
    return Step(run.state, tuple(run.effects))


def step(definition: ProcessDefinition, state: Mapping[str, Any] | None, event: Event) -> Step:
    """Apply ``event`` to ``state`` (not modified) and return the new state and effects."""
    if isinstance(event, Start):
        if state is not None:
            raise ProcessExecutionError("A Start event creates a new instance; pass state=None")
        return start(definition, event)
    if state is None:
        raise ProcessExecutionError(f"{type(event).__name__} needs an instance state")
    if (
        state.get("v") != STATE_VERSION
        or state.get("k") != definition.key
        or state.get("vt") != definition.version_tag
    ):
        _refuse_state(definition, state)
    run = _Run(definition, _copy_state(state, definition), event.now)
    if run.state["st"] != "run":
        if isinstance(event, MessageReceived):
            raise CorrelationError(
                f"Unable to correlate Task{_task_label(event.task_id)}: instance with "
                f"business-key {state.get('bk')!r} has already ended"
            )
        return Step(run.state, ())
    handler = _DISPATCH[type(event)]
    # A step that a Task, a completed user task or a job started is a transaction of its own
    # in Camunda: an engine error in it (an expression, a gateway without a way on) undoes it
    # instead of failing the instance. The Task fails with the error (the user task stays
    # open); the job is retried, then becomes an incident.
    if type(event) in _ROLLBACK_EVENTS:
        run.rollback = True
    try:
        handler(run, event)
        if definition.has_conditionals and run.state["st"] == "run":
            run.guarded(run.check_conditions)
    except CorrelationError:
        raise
    except ProcessExecutionError as exc:
        if isinstance(event, MessageReceived | UserTaskCompleted):
            raise RolledBackError(exc.message) from exc
        if isinstance(event, JobDue):
            return _job_failed(definition, state, event, exc.message)
        if isinstance(event, TimerFired):
            return _timer_failed(definition, state, event, exc.message)
        raise
    return Step(run.state, tuple(run.effects))


def _refuse_state(definition: ProcessDefinition, state: Mapping[str, Any]) -> None:
    """Raise why ``state`` is not an instance state of ``definition``."""
    version = state.get("v")
    if version != STATE_VERSION:
        raise ProcessExecutionError(f"Unsupported instance state version {version!r}")
    if state.get("k") != definition.key:
        raise ProcessExecutionError(
            f"State of process {state.get('k')!r} given with definition {definition.key!r}"
        )
    raise ProcessExecutionError(
        f"State of {definition.key!r} version {state.get('vt')!r} given with definition "
        f"version {definition.version_tag!r}; instances finish on the version they began on"
    )


def _timer_failed(
    definition: ProcessDefinition, state: Mapping[str, Any], event: TimerFired, message: str
) -> Step:
    """Undo a fired timer's failed step; the timer fires again after the retry cycle's delay
    (the timer event's own ``failedJobRetryTimeCycle``, else three tries at once), then it is
    parked as an incident, still waiting (Camunda's timer jobs retry like any job)."""
    run = _Run(definition, _copy_state(state, definition), event.now)
    tid, _, rest = event.timer_id.partition("/")
    token = run.tokens[tid]
    node = run.d.nodes[rest.partition("/")[0]]
    policy = node.retry or _DEFAULT_RETRY
    left: int = token.get("tr", {}).get(event.timer_id, policy.retries)
    if left <= 0:
        _park(token, message, node.id, event.now, t=event.timer_id)
        return Step(run.state, (), message)
    run.rearm(tid, token, event.timer_id, add_duration(event.now, policy.delay(left)), left - 1)
    return Step(run.state, tuple(run.effects), message)


def _job_failed(
    definition: ProcessDefinition, state: Mapping[str, Any], event: JobDue, message: str
) -> Step:
    """Undo a failed job's step; run it again after the retry cycle's delay, or, with no
    retries left, park it as an incident (Camunda's ``DefaultJobRetryCmd``: ``R3`` is three
    tries in all, no cycle is three tries at once)."""
    run = _Run(definition, _copy_state(state, definition), event.now)
    token = run.tokens[event.token]
    retries: int = token.get("r", 0)
    node = run.node_of(token)
    loop = node.multi_instance
    if token.get("mc") and loop is not None:
        policy = loop.retry or _DEFAULT_RETRY
    else:
        policy = node.retry or _DEFAULT_RETRY
    if retries <= 0:
        token["r"] = 0
        _park(token, message, node.id, event.now)
        return Step(run.state, (), message)
    token["r"] = retries - 1
    due = add_duration(event.now, policy.delay(retries))
    return Step(run.state, (ScheduleJob(event.token, node.id, due, retries - 1),), message)


def _park(token: dict[str, Any], message: str, element: str, now: datetime, **extra: str) -> None:
    """Mark ``token`` as an incident (``x``): what failed, where, when (and, for a timer's,
    the timer ``t`` a retry fires again)."""
    token["x"] = {"m": message, "e": element, "at": now.isoformat(), **extra}


def _text(expression: Expression, view: _View) -> str:
    """A send field's text: a constant as written, else the expression's value as a string."""
    return expression.source if expression.constant else str(expression(view))


def _task_label(task_id: str | None) -> str:
    return f" {task_id}" if task_id else ""


def _copy_state(state: Mapping[str, Any], definition: ProcessDefinition) -> State:
    """Copy what a step may change: two levels of dicts; values themselves are never mutated.
    Refuses a state with a token at an element ``definition`` does not have.

    Plain loops and ``dict.copy`` rather than comprehensions: this runs once per step and is
    a tenth of the engine's time.
    """
    copied = dict(state)
    copied["vars"] = state["vars"].copy()
    scopes = state["sc"]
    if scopes:
        copied["sc"] = {key: {**scope, "v": scope["v"].copy()} for key, scope in scopes.items()}
    else:
        copied["sc"] = {}
    nodes = definition.nodes
    tokens = {}
    for key, stored in state["tk"].items():
        if stored["n"] not in nodes:
            raise ProcessExecutionError(
                f"State refers to element {stored['n']!r}, which {definition.key!r} does not have"
            )
        token = stored.copy()
        local = token.get("v")
        if local is not None:
            token["v"] = local.copy()
        tokens[key] = token
    copied["tk"] = tokens
    copied["j"] = state["j"].copy()
    return copied


class _View:
    """Variables visible from one token: its locals, then its scopes outwards, then the process."""

    __slots__ = ("run", "token")

    def __init__(self, run: _Run, token: dict[str, Any]) -> None:
        self.run = run
        self.token = token

    def lookup(self, name: str) -> tuple[bool, object]:
        local = self.token.get("v")
        if local is not None and name in local:
            return True, local[name]
        scopes = self.run.state["sc"]
        sid = self.token["s"]
        while sid:
            scope = scopes[str(sid)]
            if name in scope["v"]:
                return True, scope["v"][name]
            sid = scope["p"]
        variables = self.run.state["vars"]
        if name in variables:
            return True, variables[name]
        return False, None

    def lookup_local(self, name: str) -> tuple[bool, object]:
        local = self.token.get("v")
        if local is not None and name in local:
            return True, local[name]
        if self.token["p"] == "sp":  # a subprocess's own execution: its scope's variables
            own = self.run.state["sc"][str(self.token["c"])]["v"]
            if name in own:
                return True, own[name]
        sid = self.token["s"]
        scope_vars = self.run.state["sc"][str(sid)]["v"] if sid else self.run.state["vars"]
        if name in scope_vars:
            return True, scope_vars[name]
        return False, None


class _Run:
    """One step in progress: the state being changed, the clock reading and collected effects."""

    # Defaults at class level: most steps never set them (one step is the engine's hot path).
    # True when an engine error undoes the step rather than failing the instance.
    rollback = False
    # Elements entered in this step, then per element once that is suspiciously many, and the
    # last elements entered (see ``looping``).
    moved = 0
    moves: dict[str, int] | None = None
    trace: deque[str] | None = None
    # Variable changes in this step, (name, "create" | "update"): only conditional events
    # read them, so only a model that has some records them (``track``).
    track = False
    changes: set[tuple[str, str]] = _NO_CHANGES

    def __init__(self, definition: ProcessDefinition, state: State, now: datetime) -> None:
        self.d = definition
        self.state = state
        self.now = now
        self.effects: list[Effect] = []
        self.tokens: dict[str, dict[str, Any]] = state["tk"]
        self.pending: deque[str] = deque()
        if definition.has_conditionals:
            self.track = True
            self.changes = set()

    # -- plumbing -----------------------------------------------------------------------------

    def guarded(self, action: Any) -> None:
        """Run ``action``; an execution error fails the instance instead of escaping."""
        try:
            action()
            self.drain()
        except CorrelationError:
            raise
        except ProcessExecutionError as exc:
            if self.rollback:
                raise
            self.fail(exc.message)

    def drain(self) -> None:
        """Advance tokens that moved along sequence flows, one at a time.

        Moving a token only queues it; this loop enters the nodes. That keeps the Python stack
        flat however long a chain of pass-through nodes is.
        """
        pending = self.pending
        tokens = self.tokens
        moved = self.moved
        bound = _LOOP_BOUND
        while pending:
            tid = pending.popleft()
            if tid in tokens and self.state["st"] == "run":
                moved += 1
                if moved > bound:
                    self.moved = moved
                    if self.looping(tid):
                        continue
                self.enter(tid)
        self.moved = moved

    def looping(self, tid: str) -> bool:
        """Watch a step that has moved suspiciously often; park a token arriving at an element
        it keeps entering as an incident that names the loop, instead of spinning forever (as
        Camunda would, holding the whole bridge).

        Once the step as a whole has entered :data:`_LOOP_BOUND` elements, each element's
        entries are counted; an element entered :data:`_LOOP_BOUND` more times in the same
        step lies on a cycle without a wait state, whether one token runs it or a parallel
        gateway hands it from token to token. A large multi-instance enters each of its
        elements once per instance and never trips it.
        """
        if self.moves is None or self.trace is None:
            self.moves, self.trace = {}, deque(maxlen=_LOOP_TRACE)
        node = self.tokens[tid]["n"]
        count = self.moves.get(node, 0) + 1
        self.moves[node] = count
        self.trace.append(node)
        if count <= _LOOP_BOUND:
            return False
        token = self.tokens[tid]
        cycle = _cycle(list(self.trace))
        token["p"] = "ab"
        token["r"] = 0
        message = (
            f"Path loops without a wait state ({' -> '.join(cycle)}): stopped after "
            f"{self.moved} steps"
        )
        _park(token, message, node, self.now)
        return True

    def next_id(self) -> int:
        value: int = self.state["n"]
        self.state["n"] = value + 1
        return value

    def new_token(self, node_id: str, scope: int) -> str:
        tid = str(self.next_id())
        self.tokens[tid] = {"n": node_id, "s": scope, "p": ""}
        return tid

    def node_of(self, token: dict[str, Any]) -> Node:
        return self.d.nodes[token["n"]]

    def snapshot(self, token: dict[str, Any]) -> dict[str, object]:
        """All variables the token sees, inner scopes shadowing outer ones."""
        merged = dict(self.state["vars"])
        sid = token["s"]
        if sid:
            chain = []
            scopes = self.state["sc"]
            while sid:
                scope = scopes[str(sid)]
                chain.append(scope["v"])
                sid = scope["p"]
            for scope_vars in reversed(chain):
                merged.update(scope_vars)
        local = token.get("v")
        if local:
            merged.update(local)
        return merged

    def set_variable(self, token: dict[str, Any], name: str, value: object) -> None:
        """Camunda ``setVariable``: where the name already lives, else on the process instance."""
        local = token.get("v")
        if local is not None and name in local:
            local[name] = value
            if self.track:
                self.changes.add((name, "update"))
            return
        scopes = self.state["sc"]
        sid = token["s"]
        while sid:
            scope = scopes[str(sid)]
            if name in scope["v"]:
                scope["v"][name] = value
                if self.track:
                    self.changes.add((name, "update"))
                return
            sid = scope["p"]
        variables = self.state["vars"]
        if self.track:
            self.changes.add((name, "update" if name in variables else "create"))
        variables[name] = value

    def set_local(self, token: dict[str, Any], name: str, value: object) -> None:
        """Camunda ``setVariableLocal``: on the token's own execution (its scope, or its
        multi-instance/input locals when it has them)."""
        local = token.get("v")
        if local is None:
            local = self.state["sc"][str(token["s"])]["v"] if token["s"] else self.state["vars"]
        if self.track:
            self.changes.add((name, "update" if name in local else "create"))
        local[name] = value

    def apply(self, token: dict[str, Any], variables: Mapping[str, object]) -> None:
        for name, value in variables.items():
            self.set_variable(token, name, value)

    def fields(self, token: dict[str, Any], node_fields: Mapping[str, Any]) -> dict[str, object]:
        values: dict[str, object] = {}
        view = None
        for name, expression in node_fields.items():
            if expression.constant:  # plain text, the common case: no call
                values[name] = expression.source
            else:
                if view is None:
                    view = _View(self, token)
                values[name] = expression(view)
        return values

    def fail(self, message: str) -> None:
        for tid in list(self.tokens):
            if tid in self.tokens:
                self.cancel(tid)
        self.state["st"] = "failed"
        self.state["j"] = {}
        bk = self.state["bk"]
        self.effects.append(FailTasks(bk, message))
        self.effects.append(ProcessFailed(bk, message))

    def schedule(self, tid: str, token: dict[str, Any], phase: str, retries: int) -> None:
        token["p"] = phase
        token["r"] = retries
        self.effects.append(ScheduleJob(tid, token["n"], self.now, retries))

    # -- entering a node ----------------------------------------------------------------------

    def enter(self, tid: str) -> None:
        token = self.tokens[tid]
        node = self.d.nodes[token["n"]]
        if node.simple:
            self.execute(tid, token, node)
            return
        if node.async_before and not token.get("mc"):
            policy = node.retry or _DEFAULT_RETRY
            self.schedule(tid, token, "ab", policy.retries)
            return
        if node.multi_instance is not None and not token.get("mc"):
            self.multi_instance_start(tid)
            return
        self.begin(tid)

    def begin(self, tid: str) -> None:
        """After async-before: input parameters, then start listeners, then the behaviour."""
        token = self.tokens[tid]
        node = self.node_of(token)
        if node.inputs:
            view = _View(self, token)
            values = {name: expression(view) for name, expression in node.inputs}
            token["v"] = {**token.get("v", {}), **values}
        self.start_listeners(tid, 0)

    def start_listeners(self, tid: str, index: int) -> None:
        token = self.tokens[tid]
        node = self.node_of(token)
        listeners = node.listeners
        for position in range(index, len(listeners)):
            listener = listeners[position]
            if listener.event == "start":
                token["p"] = "sl"
                token["i"] = position
                self.effects.append(
                    CallHandler(
                        listener.handler,
                        "listener",
                        node.id,
                        tid,
                        self.state["bk"],
                        self.snapshot(token),
                        self.fields(token, listener.fields),
                        "start",
                    )
                )
                return
        token.pop("i", None)
        self.execute(tid, token, node)

    def execute(self, tid: str, token: dict[str, Any], node: Node) -> None:
        """The behaviour of the token's node, chosen by kind (a table, for the hot path)."""
        token["p"] = ""
        if not node.simple and node.kind in _ACTIVITIES and not token.get("mc"):
            self.start_boundaries(tid, token, node)
        if node.send is not None:
            self.send(tid, token, node)
            return
        _BEHAVIOUR[node.kind](self, tid, token, node)

    def service_task(self, tid: str, token: dict[str, Any], node: Node) -> None:
        token["p"] = "h"
        self.effects.append(
            CallHandler(
                _need(node.handler),
                "service",
                node.id,
                tid,
                self.state["bk"],
                self.snapshot(token),
                self.fields(token, node.fields),
            )
        )

    def pass_through(self, tid: str, token: dict[str, Any], node: Node) -> None:
        self.leave_node(tid, token, node)

    def end_event(self, tid: str, token: dict[str, Any], node: Node) -> None:
        if node.event is EventKind.SIGNAL:
            self.effects.append(ThrowSignal(_need(node.signal_name)))
        elif node.event is EventKind.ERROR:
            self.throw_error(tid, node.error_code, "", from_activity=False)
            return
        self.leave_node(tid, token, node)

    def throw_event(self, tid: str, token: dict[str, Any], node: Node) -> None:
        if node.event is EventKind.SIGNAL:
            self.effects.append(ThrowSignal(_need(node.signal_name)))
        self.leave_node(tid, token, node)

    def catch_event(self, tid: str, token: dict[str, Any], node: Node) -> None:
        entry = self.wait_entry(tid, token, node)
        if entry is None:
            self.leave(tid)  # a conditional event whose condition already holds
            return
        token["p"] = "w"
        token["w"] = [entry]
        self.wait_started(token)

    def event_gateway(self, tid: str, token: dict[str, Any], node: Node) -> None:
        nodes = self.d.nodes
        if self.d.has_conditionals:
            # A conditional event behind the gateway whose condition already holds wins at
            # once, before any other event is subscribed (Camunda evaluates it on subscribing).
            for target_id in node.targets:
                target = nodes[target_id]
                if target.event is EventKind.CONDITIONAL and _holds(
                    target.condition, _View(self, token)
                ):
                    token["n"] = target_id
                    self.leave(tid)
                    return
        entries = []
        for target_id in node.targets:
            target = nodes[target_id]
            if target.event is EventKind.CONDITIONAL:
                entries.append([target_id, "c", ""])
                continue
            entry = self.wait_entry(tid, token, target)
            if entry is not None:
                entries.append(entry)
        token["p"] = "w"
        token["w"] = entries
        self.wait_started(token)

    def exclusive_gateway(self, tid: str, token: dict[str, Any], node: Node) -> None:
        token["f"] = [self.choose_flow(token, node)]
        self.leave(tid)

    def user_task(self, tid: str, token: dict[str, Any], node: Node) -> None:
        self.task_listeners(tid, 0)

    def sub_process(self, tid: str, token: dict[str, Any], node: Node) -> None:
        sid = self.next_id()
        self.state["sc"][str(sid)] = {"p": token["s"], "t": tid, "v": token.pop("v", {})}
        token["p"] = "sp"
        token["c"] = sid
        child = self.new_token(_need(node.start_node), sid)
        self.enter(child)

    def send(self, tid: str, token: dict[str, Any], node: Node) -> None:
        spec = _need(node.send)
        handler = _need(node.handler)
        view = _View(self, token)
        found, target = view.lookup("target")
        target_map = target if found and isinstance(target, dict | Mapping) else None
        correlation = None
        if target_map is not None:
            value = target_map.get("correlationKey")
            correlation = value if isinstance(value, str) else None
        token["p"] = "h"
        self.effects.append(
            SendTask(
                handler=handler,
                element_id=node.id,
                token=tid,
                business_key=self.state["bk"],
                instantiates_canonical=_text(spec.instantiates_canonical, view),
                message_name=_text(spec.message_name, view),
                profile=_text(spec.profile, view),
                correlation_key=correlation,
                target=target_map,
                variables=self.snapshot(token),
                fields=self.fields(token, node.fields),
            )
        )

    def task_listeners(self, tid: str, index: int) -> None:
        token = self.tokens[tid]
        node = self.node_of(token)
        for position in range(index, len(node.task_listeners)):
            listener = node.task_listeners[position]
            if listener.event == "create":
                token["p"] = "tl"
                token["i"] = position
                self.effects.append(
                    CallHandler(
                        listener.handler,
                        "task_listener",
                        node.id,
                        tid,
                        self.state["bk"],
                        self.snapshot(token),
                        self.fields(token, listener.fields),
                        "create",
                    )
                )
                return
        token.pop("i", None)
        token["p"] = "u"
        self.wait_started(token)
        self.effects.append(
            CreateQuestionnaireResponse(
                _need(node.form_key), node.id, tid, self.state["bk"], self.snapshot(token)
            )
        )

    def due(self, token: dict[str, Any], timer: TimerSpec) -> datetime:
        if timer.expression is not None:
            value = timer.expression(_View(self, token))
            try:
                if isinstance(value, datetime):
                    return value
                text = str(value)
                if timer.kind == "duration":
                    return add_duration(self.now, parse_duration(text))
                return parse_date(text)
            except TimerError as exc:
                raise ProcessExecutionError(
                    f"Timer expression {timer.expression.source!r} gave {value!r}: {exc.message}"
                ) from exc
        if timer.duration is not None:
            return add_duration(self.now, timer.duration)
        return parse_date(_need(timer.date))

    def timer(self, tid: str, token: dict[str, Any], node: Node) -> str:
        timer_id = f"{tid}/{node.id}/{self.next_id()}"
        self.effects.append(StartTimer(timer_id, node.id, tid, self.due(token, _need(node.timer))))
        return timer_id

    def wait_entry(self, tid: str, token: dict[str, Any], node: Node) -> list[str] | None:
        if node.kind is NodeKind.RECEIVE_TASK or node.event is EventKind.MESSAGE:
            return [node.id, "m", _need(node.message_name)]
        if node.event is EventKind.TIMER:
            return [node.id, "t", self.timer(tid, token, node)]
        if node.event is EventKind.SIGNAL:
            return [node.id, "s", _need(node.signal_name)]
        if _holds(node.condition, _View(self, token)):
            return None
        return [node.id, "c", ""]

    def start_boundaries(self, tid: str, token: dict[str, Any], node: Node) -> None:
        """Subscribe the activity's boundary events: timers (``bt``) and messages (``bw``)."""
        timers = []
        messages = []
        for boundary_id in node.boundaries:
            boundary = self.d.nodes[boundary_id]
            if boundary.event is EventKind.TIMER:
                timers.append(self.timer(tid, token, boundary))
            elif boundary.event is EventKind.MESSAGE:
                messages.append([boundary_id, "m", _need(boundary.message_name)])
        if timers:
            token["bt"] = timers
        if messages:
            token["bw"] = messages

    def choose_flow(self, token: dict[str, Any], node: Node) -> str:
        view = _View(self, token)
        for flow_id in node.outgoing:
            if flow_id == node.default_flow:
                continue
            condition = self.d.flows[flow_id].condition
            if condition is None or _truthy(condition(view)):
                return flow_id
        if node.default_flow is not None:
            return node.default_flow
        raise NoOutgoingFlowError(
            f"No outgoing sequence flow of exclusive gateway {node.id!r} can be taken"
        )

    def parallel(self, tid: str, token: dict[str, Any], node: Node) -> None:
        if len(node.incoming) > 1:
            scope = token["s"]
            key = f"{scope}:{node.id}"
            joins = self.state["j"]
            arrived = joins.get(key, 0) + 1
            if arrived < len(node.incoming):
                # As Camunda's inactive concurrent execution at the join: the token stays
                # (phase ``j``), so a join still waiting for a branch keeps its scope open.
                joins[key] = arrived
                token["p"] = "j"
                return
            joins.pop(key, None)
            for other in [
                k
                for k, t in self.tokens.items()
                if t["p"] == "j" and t["n"] == node.id and t["s"] == scope
            ]:
                del self.tokens[other]
        self.leave(tid)

    # -- multi-instance -----------------------------------------------------------------------

    def multi_instance_start(self, tid: str) -> None:
        token = self.tokens[tid]
        node = self.node_of(token)
        loop = _need(node.multi_instance)
        items = loop.collection(_View(self, token))
        if isinstance(items, Mapping) or not isinstance(items, list | tuple):
            raise ProcessExecutionError(
                f"Multi-instance collection {loop.collection.source!r} of {node.id!r} is not a "
                f"list but {type(items).__name__}"
            )
        token["p"] = "mi"
        token["m"] = {"n": len(items), "d": 0}
        self.start_boundaries(tid, token, node)
        if not items:
            self.multi_instance_done(tid)
            return
        if loop.sequential:
            token["m"]["it"] = list(items)
            token["m"]["i"] = 1
            self.multi_instance_child(tid, token, node, items[0], 0)
        else:
            for index, item in enumerate(items):
                self.multi_instance_child(tid, token, node, item, index)

    def multi_instance_child(
        self, body_id: str, body: dict[str, Any], node: Node, item: object, index: int
    ) -> None:
        loop = _need(node.multi_instance)
        cid = self.new_token(node.id, body["s"])
        child = self.tokens[cid]
        child["mc"] = 1
        child["o"] = body_id
        local: dict[str, object] = {"loopCounter": index}
        if loop.element_variable:
            local[loop.element_variable] = item
        child["v"] = local
        if loop.async_before:
            policy = loop.retry or _DEFAULT_RETRY
            self.schedule(cid, child, "ab", policy.retries)
            return
        self.begin(cid)

    def multi_instance_child_done(self, cid: str) -> None:
        child = self.tokens.pop(cid)
        body_id = child["o"]
        body = self.tokens[body_id]
        node = self.node_of(body)
        loop = _need(node.multi_instance)
        progress = dict(body["m"])
        progress["d"] += 1
        body["m"] = progress
        if loop.sequential and progress["i"] < progress["n"]:
            index = progress["i"]
            progress["i"] = index + 1
            self.multi_instance_child(body_id, body, node, progress["it"][index], index)
            return
        if progress["d"] >= progress["n"]:
            self.multi_instance_done(body_id)

    def multi_instance_done(self, tid: str) -> None:
        token = self.tokens[tid]
        node = self.node_of(token)
        token.pop("m", None)
        self.cancel_boundaries(token)
        if node.async_after:
            self.schedule(tid, token, "aa", (node.retry or _DEFAULT_RETRY).retries)
            return
        self.take_outgoing(tid)

    # -- leaving a node -----------------------------------------------------------------------

    def leave(self, tid: str) -> None:
        token = self.tokens[tid]
        self.leave_node(tid, token, self.d.nodes[token["n"]])

    def leave_node(self, tid: str, token: dict[str, Any], node: Node) -> None:
        """:meth:`leave` for a caller that holds the token and its node already."""
        if node.simple:
            self.take_outgoing(tid, token, node)
            return
        if node.outputs:
            view = _View(self, token)
            values = [(name, expression(view)) for name, expression in node.outputs]
            # Output parameters are written to the scope around the activity, not its locals.
            outer = {"s": token["s"]}
            for name, value in values:
                self.set_variable(outer, name, value)
        self.cancel_boundaries(token)
        self.end_listeners(tid, 0)

    def end_listeners(self, tid: str, index: int) -> None:
        token = self.tokens[tid]
        node = self.node_of(token)
        for position in range(index, len(node.listeners)):
            listener = node.listeners[position]
            if listener.event == "end":
                token["p"] = "el"
                token["i"] = position
                self.effects.append(
                    CallHandler(
                        listener.handler,
                        "listener",
                        node.id,
                        tid,
                        self.state["bk"],
                        self.snapshot(token),
                        self.fields(token, listener.fields),
                        "end",
                    )
                )
                return
        token.pop("i", None)
        is_child = bool(token.get("mc"))
        loop = node.multi_instance
        if is_child and loop is not None:
            if loop.async_after:
                self.schedule(tid, token, "aa", (loop.retry or _DEFAULT_RETRY).retries)
                return
        elif node.async_after:
            self.schedule(tid, token, "aa", (node.retry or _DEFAULT_RETRY).retries)
            return
        self.after_leave(tid)

    def after_leave(self, tid: str) -> None:
        if self.tokens[tid].get("mc"):
            self.multi_instance_child_done(tid)
        else:
            self.take_outgoing(tid)

    def take_outgoing(
        self, tid: str, token: dict[str, Any] | None = None, node: Node | None = None
    ) -> None:
        if token is None or node is None:
            token = self.tokens[tid]
            node = self.d.nodes[token["n"]]
        if "f" not in token and len(node.targets) == 1:
            # One unconditional way on: by far the most common case.
            self.tokens[tid] = {"n": node.targets[0], "s": token["s"], "p": ""}
            self.pending.append(tid)
            return
        flows = token.pop("f", None) or node.outgoing
        if not flows:
            self.end_token(tid)
            return
        scope = token["s"]
        targets = [self.d.flows[flow_id].target for flow_id in flows]
        # Fork tokens exist before the first branch runs, so its end cannot close the scope.
        forks = [self.new_token(target, scope) for target in targets[1:]]
        self.move(tid, targets[0])
        self.pending.append(tid)
        self.pending.extend(forks)

    def move(self, tid: str, node_id: str) -> None:
        self.tokens[tid] = {"n": node_id, "s": self.tokens[tid]["s"], "p": ""}

    def end_token(self, tid: str) -> None:
        token = self.tokens.pop(tid)
        scope = token["s"]
        for other in self.tokens.values():
            if other["s"] == scope:
                return
        self.complete_scope(scope)

    def complete_scope(self, sid: int) -> None:
        if sid == 0:
            self.state["st"] = "done"
            self.state["j"] = {}
            bk = self.state["bk"]
            self.effects.append(CompleteTasks(bk))
            self.effects.append(ProcessCompleted(bk))
            return
        scope = self.state["sc"].pop(str(sid))
        self.drop_joins(sid)
        owner = scope["t"]
        owner_token = self.tokens[owner]
        owner_token.pop("c", None)
        owner_token["p"] = ""
        self.leave(owner)

    def drop_joins(self, sid: int) -> None:
        prefix = f"{sid}:"
        joins = self.state["j"]
        for key in [key for key in joins if key.startswith(prefix)]:
            del joins[key]

    # -- cancelling ---------------------------------------------------------------------------

    def cancel_boundaries(self, token: dict[str, Any]) -> None:
        """End the activity's boundary subscriptions: cancel its timers, drop its messages."""
        token.pop("bw", None)
        for timer_id in token.pop("bt", ()):
            self.effects.append(CancelTimer(timer_id))

    def cancel(self, tid: str) -> None:
        """Remove a token and everything below it, cancelling its timers and user task."""
        token = self.tokens.pop(tid, None)
        if token is None:
            return
        self.cancel_boundaries(token)
        if token["p"] == "u":
            self.effects.append(CancelUserTask(tid, token["n"]))
        self.cancel_work(tid, token)

    def cancel_work(self, tid: str, token: dict[str, Any]) -> None:
        """Cancel what runs below a token: its subprocess scope or multi-instance children."""
        if token["p"] == "sp":
            sid = token["c"]
            for child_id in [k for k, t in self.tokens.items() if t["s"] == sid]:
                self.cancel(child_id)
            self.state["sc"].pop(str(sid), None)
            self.drop_joins(sid)
        elif token["p"] == "mi":
            for child_id in [k for k, t in self.tokens.items() if t.get("o") == tid]:
                self.cancel(child_id)
        elif token["p"] == "w":
            for entry in token.get("w", ()):
                if entry[1] == "t":
                    self.effects.append(CancelTimer(entry[2]))

    # -- errors -------------------------------------------------------------------------------

    def throw_error(self, tid: str, code: str | None, message: str, *, from_activity: bool) -> None:
        """Find the error boundary event that catches ``code``, innermost first, and take it."""
        token = self.tokens[tid]
        catcher: str | None = tid if from_activity else None
        scope = token["s"]
        if catcher is None:
            catcher, scope = self.scope_owner(scope)
        while catcher is not None:
            owner = self.tokens[catcher]
            if owner.get("mc"):
                catcher = owner["o"]  # boundary events of a multi-instance activity sit on its body
                owner = self.tokens[catcher]
            node = self.node_of(owner)
            for boundary_id in node.boundaries:
                boundary = self.d.nodes[boundary_id]
                if boundary.event is EventKind.ERROR and boundary.error_code in (None, code):
                    self.catch_error(catcher, boundary, code, message)
                    return
            catcher, scope = self.scope_owner(owner["s"])
        # No catcher: Camunda's BpmnExceptionHandler.propagateError logs a warning and ends the
        # execution as a none end event would (execution.end(true)), unless the engine sets
        # enableExceptionsAfterUnhandledBpmnError, which neither Camunda, Operaton nor DSF does.
        self.end_quietly(tid)

    def end_quietly(self, tid: str) -> None:
        """End the execution at ``tid`` as if it reached a none end event there."""
        token = self.tokens[tid]
        self.cancel_boundaries(token)
        if token.get("mc"):
            self.multi_instance_child_done(tid)
        else:
            self.end_token(tid)

    def scope_owner(self, sid: int) -> tuple[str | None, int]:
        if sid == 0:
            return None, 0
        scope = self.state["sc"][str(sid)]
        owner: str = scope["t"]
        return owner, scope["p"]

    def catch_error(self, tid: str, boundary: Node, code: str | None, message: str) -> None:
        token = self.tokens[tid]
        scope = token["s"]
        self.cancel(tid)
        self.tokens[tid] = {"n": boundary.id, "s": scope, "p": ""}
        # Camunda sets both with setVariable on the boundary's execution: where the name already
        # lives, else on the process instance, so they outlive the subprocess they were set in.
        holder = {"s": scope}
        if boundary.error_code_variable:
            self.set_variable(holder, boundary.error_code_variable, code)
        if boundary.error_message_variable:
            self.set_variable(holder, boundary.error_message_variable, message)
        self.begin(tid)

    # -- event handlers -----------------------------------------------------------------------

    def on_message(self, event: MessageReceived) -> None:
        candidates: list[tuple[str, list[str], bool]] = []
        name = event.message_name
        only = event.token
        keyed = event.correlation_key is not None
        for tid, token in self.tokens.items():
            if only is not None and tid != only:
                continue
            if token["p"] == "w":
                for entry in token["w"]:
                    if (
                        entry[1] == "m"
                        and entry[2] == name
                        and (not keyed or self.key_matches(token, event))
                    ):
                        candidates.append((tid, entry, False))
            for entry in token.get("bw", ()):
                if entry[2] == name and (not keyed or self.key_matches(token, event)):
                    candidates.append((tid, entry, True))
        if len(candidates) != 1:
            raise CorrelationError(
                f"Unable to correlate Task{_task_label(event.task_id)}: {len(candidates)} "
                f"waiting executions for message {event.message_name!r}, business-key "
                f"{self.state['bk']!r}, correlation-key {event.correlation_key!r}"
            )
        tid, entry, boundary = candidates[0]
        if boundary:
            self.guarded(partial(self.boundary_event, tid, self.d.nodes[entry[0]], event.variables))
            return
        self.guarded(partial(self.continue_at, tid, entry, event.variables))

    def continue_at(self, tid: str, entry: list[str], variables: Mapping[str, object]) -> None:
        """A message caught at a wait entry: its variables first, then on from there."""
        self.apply(self.tokens[tid], variables)
        self.trigger(tid, entry)

    def key_matches(self, token: dict[str, Any], event: MessageReceived) -> bool:
        """No correlation-key, or the waiting execution's own one equals it. DSF correlates with
        localVariableEquals: a key inherited from an outer scope does not count."""
        if event.correlation_key is None:
            return True
        found, key = _View(self, token).lookup_local("correlationKey")
        return found and key == event.correlation_key

    def trigger(self, tid: str, entry: list[str]) -> None:
        """A wait entry fired: cancel the other alternatives and leave the caught node."""
        token = self.tokens[tid]
        for other in token.pop("w", ()):
            if other is not entry and other[1] == "t":
                self.effects.append(CancelTimer(other[2]))
        token["n"] = entry[0]
        token["p"] = ""
        self.leave_node(tid, token, self.d.nodes[entry[0]])

    def on_timer(self, event: TimerFired) -> None:
        tid, _, _ = event.timer_id.partition("/")
        token = self.tokens.get(tid)
        if token is None:
            return
        for entry in token.get("w", ()):
            if entry[1] == "t" and entry[2] == event.timer_id:
                self.guarded(partial(self.trigger, tid, entry))
                return
        if event.timer_id in token.get("bt", ()):
            boundary_id = event.timer_id.split("/")[1]
            self.guarded(lambda: self.boundary_timer(tid, boundary_id, event.timer_id))

    def boundary_timer(self, tid: str, boundary_id: str, timer_id: str) -> None:
        token = self.tokens[tid]
        token["bt"] = [t for t in token["bt"] if t != timer_id]
        self.boundary_event(tid, self.d.nodes[boundary_id], {})

    def boundary_event(self, tid: str, boundary: Node, variables: Mapping[str, object]) -> None:
        """A timer or message boundary event of the activity at ``tid`` fired.

        Interrupting: the activity is cancelled with everything below it (subprocess tokens,
        multi-instance executions, their timers and user tasks) and a new execution leaves by
        the boundary event. Non-interrupting: the activity goes on and a new execution leaves
        by the boundary event; a message boundary stays subscribed and may fire again (a
        timer duration fires once). The new execution has a fresh id, so a late result of a
        cancelled handler can never reach it.
        """
        scope = self.tokens[tid]["s"]
        if boundary.cancel_activity:
            self.cancel(tid)
        new = self.new_token(boundary.id, scope)
        if variables:
            self.apply(self.tokens[new], variables)
        self.begin(new)

    def on_signal(self, event: SignalReceived) -> None:
        for tid in list(self.tokens):
            token = self.tokens.get(tid)
            if token is None or token["p"] != "w":
                continue
            for entry in token["w"]:
                if entry[1] == "s" and entry[2] == event.signal_name:
                    self.guarded(partial(self.trigger, tid, entry))
                    break
            if self.state["st"] != "run":
                return

    def check_conditions(self) -> None:
        """Evaluate waiting conditional events after variable changes, as Camunda does.

        A conditional event is evaluated when a variable changes, limited by its
        ``camunda:variableName`` (only that variable) and ``camunda:variableEvents`` (only
        those kinds of change: an ``update`` listener does not fire when the variable is
        created). A step that changed no variable evaluates nothing.
        """
        for _ in range(_MAX_CONDITIONAL_ROUNDS):
            if not self.changes:
                return
            fired = False
            for tid, token in list(self.tokens.items()):
                if token["p"] != "w" or tid not in self.tokens:
                    continue
                for entry in token["w"]:
                    if entry[1] != "c":
                        continue
                    node = self.d.nodes[entry[0]]
                    if not self.changed_for(node):
                        continue
                    if _holds(node.condition, _View(self, token)):
                        self.trigger(tid, entry)
                        self.drain()
                        fired = True
                        break
            if not fired or self.state["st"] != "run":
                return

    def changed_for(self, node: Node) -> bool:
        """Whether a change in this step concerns the conditional event ``node``."""
        name = node.variable_name
        events = node.variable_events
        return any(
            (name is None or changed == name) and (not events or kind in events)
            for changed, kind in self.changes
        )

    def on_handler_completed(self, event: HandlerCompleted) -> None:
        tid = event.token
        token = self.tokens.get(tid)
        if token is None or token["p"] not in _HANDLER_PHASES:
            return
        try:  # inline rather than guarded(): this is the most frequent event
            if event.variables:
                self.apply(token, event.variables)
            for name, value in event.local_variables.items():
                self.set_local(token, name, value)
            phase = token["p"]
            if phase == "h":
                token["p"] = ""
                self.leave_node(tid, token, self.d.nodes[token["n"]])
            elif phase == "sl":
                self.start_listeners(tid, token["i"] + 1)
            elif phase == "el":
                self.end_listeners(tid, token["i"] + 1)
            else:
                self.task_listeners(tid, token["i"] + 1)
            self.drain()
        except CorrelationError:
            raise
        except ProcessExecutionError as exc:
            self.fail(exc.message)

    def on_handler_failed(self, event: HandlerFailed) -> None:
        token = self.tokens.get(event.token)
        if event.user_task is not None:
            if token is None or token["p"] != "u" or token["n"] != event.user_task:
                return  # the user task ended meanwhile (a boundary event): nothing to fail
            # The user task's QuestionnaireResponse could not be created (no Questionnaire, an
            # item type DSF cannot answer): DSF's DefaultUserTaskListener fails the instance.
            node = self.node_of(token)

            def _fatal() -> None:
                raise ProcessExecutionError(
                    f"Process {self.d.key} has fatal error in step {node.id}, reason: "
                    f"{event.message or 'no message'}"
                )

            self.guarded(_fatal)
            return
        if token is None or token["p"] not in _HANDLER_PHASES:
            return
        tid = event.token

        def _continue() -> None:
            self.apply(token, event.variables)
            if event.error_code is not None:
                self.throw_error(tid, event.error_code, event.message, from_activity=True)
                return
            # DSF's delegate wrappers (API v1 AbstractServiceDelegate, API v2
            # ServiceTaskDelegate, ExecutionListenerDelegate, UserTaskListenerDelegate) catch
            # what the plugin code throws, fail the instance's in-progress Tasks with this text
            # and delete the instance: no job retry, no rollback. Outputs the handler added are
            # written with the failing PUT.
            node = self.node_of(token)
            if node.send is not None and token["p"] == "h":
                raise ProcessExecutionError(event.message or f"Sending from {node.id!r} failed")
            raise ProcessExecutionError(
                f"Process {self.d.key} has fatal error in step {node.id}, reason: "
                f"{event.message or 'no message'}"
            )

        self.guarded(_continue)

    def wait_started(self, token: dict[str, Any]) -> None:
        """A real wait state: Camunda commits here; the retries of the job that led here (``r``,
        only read if that job's step fails) are dropped to keep the state small."""
        token.pop("r", None)
        sid = token["s"]
        while sid:
            scope = self.state["sc"][str(sid)]
            owner = self.tokens.get(scope["t"])
            if owner is not None:
                owner.pop("r", None)
            sid = scope["p"]

    def on_user_task(self, event: UserTaskCompleted) -> None:
        token = self.tokens.get(event.token)
        if token is None or token["p"] != "u":
            return
        tid = event.token

        def _continue() -> None:
            self.apply(token, event.variables)
            token["p"] = ""
            self.leave(tid)

        self.guarded(_continue)

    def on_job(self, event: JobDue) -> None:
        token = self.tokens.get(event.token)
        if token is None or token["p"] not in ("ab", "aa") or "x" in token:
            return  # gone, moved on, or parked in an incident until an operator retries it
        tid = event.token
        phase = token["p"]
        token["p"] = ""
        node = self.node_of(token)
        if phase == "aa":
            token.pop("r", None)
            self.guarded(lambda: self.after_leave(tid))
        elif node.multi_instance is not None and not token.get("mc"):
            token.pop("r", None)
            self.guarded(lambda: self.multi_instance_start(tid))
        else:
            self.guarded(lambda: self.begin(tid))

    def on_incident_retried(self, event: IncidentRetried) -> None:
        token = self.tokens.get(event.token)
        if token is None or "x" not in token:
            raise ProcessExecutionError(f"Execution {event.token!r} has no incident to retry")
        if event.retries < 1:
            raise ProcessExecutionError(f"Retries must be at least 1, not {event.retries}")
        incident = token.pop("x")
        if "t" in incident:  # a timer's incident: it fires again now
            self.rearm(event.token, token, incident["t"], self.now, event.retries - 1)
            return
        self.schedule(event.token, token, token["p"], event.retries - 1)

    def rearm(
        self, tid: str, token: dict[str, Any], timer_id: str, due: datetime, left: int
    ) -> None:
        """Start a timer again under a new id (the old one has fired), ``left`` retries after."""
        element = timer_id.split("/")[1]
        fresh = f"{tid}/{element}/{self.next_id()}"
        if "w" in token:  # entries are shared with the caller's state: replace, never mutate
            token["w"] = [
                [entry[0], entry[1], fresh] if entry[1] == "t" and entry[2] == timer_id else entry
                for entry in token["w"]
            ]
        if "bt" in token:
            token["bt"] = [fresh if each == timer_id else each for each in token["bt"]]
        token["tr"] = {fresh: left}
        self.effects.append(StartTimer(fresh, element, tid, due))

    def on_instance_cancelled(self, event: InstanceCancelled) -> None:
        self.fail(event.reason)


def _need(value: _T | None) -> _T:
    """Unwrap a model attribute the parser guarantees for this node kind."""
    if value is None:  # pragma: no cover - the parser rejects such models
        raise ProcessExecutionError("internal: a model attribute is missing")
    return value


def _cycle(trace: list[str]) -> list[str]:
    """The shortest repeating tail of ``trace``, closed (``a -> gw -> a``), as the loop's name."""
    last = trace[-1]
    for length in range(1, len(trace)):
        if trace[-1 - length] == last:
            return trace[-1 - length :]
    return trace[-8:]


def _holds(condition: Expression | None, view: _View) -> bool:
    """A conditional event's condition, as Camunda's ``tryEvaluate``: a variable that is not
    set yet makes it false (the event waits), any other error is an error."""
    try:
        return _truthy(_need(condition)(view))
    except UnknownVariableError:
        return False


def _truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, str):
        return value.lower() == "true"
    raise ProcessExecutionError(f"Condition gave {type(value).__name__}, not a boolean")


_BEHAVIOUR: dict[NodeKind, Any] = {
    NodeKind.SERVICE_TASK: _Run.service_task,
    NodeKind.START_EVENT: _Run.pass_through,
    NodeKind.BOUNDARY_EVENT: _Run.pass_through,
    NodeKind.END_EVENT: _Run.end_event,
    NodeKind.INTERMEDIATE_THROW_EVENT: _Run.throw_event,
    NodeKind.INTERMEDIATE_CATCH_EVENT: _Run.catch_event,
    NodeKind.RECEIVE_TASK: _Run.catch_event,
    NodeKind.EVENT_BASED_GATEWAY: _Run.event_gateway,
    NodeKind.EXCLUSIVE_GATEWAY: _Run.exclusive_gateway,
    NodeKind.PARALLEL_GATEWAY: _Run.parallel,
    NodeKind.USER_TASK: _Run.user_task,
    NodeKind.SUB_PROCESS: _Run.sub_process,
}

_ROLLBACK_EVENTS = frozenset({MessageReceived, JobDue, UserTaskCompleted, TimerFired})

_DISPATCH: dict[type, Any] = {
    MessageReceived: _Run.on_message,
    TimerFired: _Run.on_timer,
    SignalReceived: _Run.on_signal,
    HandlerCompleted: _Run.on_handler_completed,
    HandlerFailed: _Run.on_handler_failed,
    UserTaskCompleted: _Run.on_user_task,
    JobDue: _Run.on_job,
    IncidentRetried: _Run.on_incident_retried,
    InstanceCancelled: _Run.on_instance_cancelled,
}
