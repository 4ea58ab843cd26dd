"""Message correlation as the DSF BPE does it, as pure functions over instance states.

A Task for a running process is matched by message name and business key, and, when the Task
carries a ``correlation-key`` input, by the ``correlationKey`` local variable of the waiting
execution (set, for example, by a listener per multi-instance target). Exactly one waiting
execution must match; zero or several is "Unable to correlate Task ...", and the Task fails.

:func:`message_subscriptions` lists what an instance waits for so the runtime can keep the list
in SQL and find candidates without loading every state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from dsf_bridge.engine.exceptions import CorrelationError

__all__ = [
    "ALTERNATIVE_BUSINESS_KEY",
    "MessageSubscription",
    "correlate",
    "message_subscriptions",
]

ALTERNATIVE_BUSINESS_KEY = "alternativeBusinessKey"

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class MessageSubscription:
    """One waiting message catch: what the runtime stores per instance."""

    message_name: str
    business_key: str
    correlation_key: str | None
    token: str
    element_id: str


def _correlation_key(state: Mapping[str, Any], token: Mapping[str, Any]) -> str | None:
    local = token.get("v")
    if local and "correlationKey" in local:
        value = local["correlationKey"]
        return value if isinstance(value, str) else None
    sid = token["s"]
    scopes = state["sc"]
    while sid:
        scope = scopes[str(sid)]
        if "correlationKey" in scope["v"]:
            value = scope["v"]["correlationKey"]
            return value if isinstance(value, str) else None
        sid = scope["p"]
    value = state["vars"].get("correlationKey")
    return value if isinstance(value, str) else None


def message_subscriptions(state: Mapping[str, Any]) -> list[MessageSubscription]:
    """The message subscriptions of one instance state (empty once it has ended)."""
    if state.get("st") != "run":
        return []
    business_key: str = state["bk"]
    # DSF's alternative business key (process variable ``alternativeBusinessKey``): a reply to
    # a Task sent with it carries it, and reaches the instance as if it carried its own key.
    alternative = state["vars"].get(ALTERNATIVE_BUSINESS_KEY)
    keys = [business_key]
    if isinstance(alternative, str) and alternative and alternative != business_key:
        keys.append(alternative)
    result: list[MessageSubscription] = []
    for tid, token in state["tk"].items():
        if token.get("p") != "w":
            continue
        for node_id, kind, key in token["w"]:
            if kind == "m":
                correlation_key = _correlation_key(state, token)
                result.extend(
                    MessageSubscription(key, each, correlation_key, tid, node_id) for each in keys
                )
    return result


@dataclass(frozen=True, slots=True)
class SignalWait:
    """One waiting signal catch (signals are broadcast: no business key, no correlation)."""

    signal_name: str
    token: str
    element_id: str


def signal_waits(state: Mapping[str, Any]) -> list[SignalWait]:
    """The signal catches an instance state waits at (empty once it has ended)."""
    if state.get("st") != "run":
        return []
    return [
        SignalWait(key, tid, node_id)
        for tid, token in state["tk"].items()
        if token.get("p") == "w"
        for node_id, kind, key in token["w"]
        if kind == "s"
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
