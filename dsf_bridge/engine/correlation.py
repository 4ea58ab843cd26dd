"""Message correlation as the DSF BPE does it, as pure functions over instance states.

A Task for a running process is matched by message name and business key (or the instance's
alternative business key), and, when the Task carries a ``correlation-key`` input, by the
``correlationKey`` local variable of the waiting execution (its own variables and those of the
scope it runs in, as Camunda's ``localVariableEquals``; set, for example, as the element
variable of a multi-instance subprocess). Exactly one waiting execution must match; zero or
several is "Unable to correlate Task ...", and the Task fails.

:func:`message_subscriptions` lists what an instance waits for so the runtime can keep the list
in SQL and find candidates without loading every state. Both read the state through
:mod:`~dsf_bridge.engine.state`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from dsf_bridge.engine import state as instance_state
from dsf_bridge.engine.exceptions import CorrelationError
from dsf_bridge.engine.state import ALTERNATIVE_BUSINESS_KEY, WaitKind

__all__ = [
    "ALTERNATIVE_BUSINESS_KEY",
    "MessageSubscription",
    "SignalWait",
    "correlate",
    "message_subscriptions",
    "signal_waits",
]

K = TypeVar("K")


@dataclass(slots=True)
class MessageSubscription:
    """One waiting message catch: what the runtime stores per instance.

    Never changed after construction; not declared ``frozen``, which constructs several
    times slower, as the engine's events and effects (this is on every step's path)."""

    message_name: str
    business_key: str
    correlation_key: str | None
    token: str
    element_id: str


def message_subscriptions(state: Mapping[str, Any]) -> list[MessageSubscription]:
    """The message subscriptions of one instance state (empty once it has ended).

    Message catch events, receive tasks and event-based gateways, and the message boundary
    events of the activities tokens are at, whatever those activities are doing.
    """
    # DSF's alternative business key (process variable ``alternativeBusinessKey``): a reply to
    # a Task sent with it carries it, and reaches the instance as if it carried its own key.
    keys = [instance_state.business_key(state)]
    alternative = instance_state.alternative_business_key(state)
    if alternative is not None:
        keys.append(alternative)
    result: list[MessageSubscription] = []
    for tid, element, name, key in instance_state.message_waits(state):
        # DSF correlates with Camunda's localVariableEquals("correlationKey", ...): the waiting
        # execution's own variable, never one inherited from an outer subprocess.
        correlation_key = key if isinstance(key, str) else None
        for each in keys:
            result.append(MessageSubscription(name, each, correlation_key, tid, element))
    return result


@dataclass(frozen=True, slots=True)
class SignalWait:
    """One waiting signal catch (signals are broadcast: no business key, no correlation)."""

    signal_name: str
    token: str
    element_id: str


def signal_waits(state: Mapping[str, Any]) -> list[SignalWait]:
    """The signal catches an instance state waits at (empty once it has ended)."""
    return [
        SignalWait(wait.key, wait.token, wait.element)
        for wait in instance_state.waiting_for(state)
        if wait.kind is WaitKind.SIGNAL
    ]


def correlate(
    candidates: Iterable[tuple[K, Iterable[MessageSubscription]]],
    *,
    message_name: str,
    business_key: str,
    correlation_key: str | None,
    task_id: str | None = None,
) -> tuple[K, MessageSubscription]:
    """Find the one (instance, subscription) a Task continues; raise CorrelationError if not one.

    ``candidates`` pairs an instance identifier of the caller's choosing with its subscriptions.
    """
    matches: list[tuple[K, MessageSubscription]] = []
    for instance, subscriptions in candidates:
        for subscription in subscriptions:
            if subscription.message_name != message_name:
                continue
            if subscription.business_key != business_key:
                continue
            if correlation_key is not None and subscription.correlation_key != correlation_key:
                continue
            matches.append((instance, subscription))
    if len(matches) != 1:
        label = f" {task_id}" if task_id else ""
        raise CorrelationError(
            f"Unable to correlate Task{label}: {len(matches)} waiting executions for message "
            f"{message_name!r}, business-key {business_key!r}, correlation-key "
            f"{correlation_key!r}"
        )
    return matches[0]
