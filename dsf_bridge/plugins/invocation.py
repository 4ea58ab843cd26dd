"""Calling a registered handler for an engine effect, and turning the outcome into an event.

The production runtime and the in-memory harness both call handlers the same way: build the
context the handler sees from a :class:`~dsf_bridge.engine.events.CallHandler` or
:class:`~dsf_bridge.engine.events.SendTask` effect, run the function (sync or ``async``), and
report :class:`HandlerCompleted` with the variables it set, or :class:`HandlerFailed` with a BPMN
error code (catchable by error boundary events) or a technical failure message.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from dsf_bridge.engine.events import CallHandler, HandlerCompleted, HandlerFailed, SendTask
from dsf_bridge.plugins.registry import BpmnError, HandlerContext, HandlerRegistry, SendContext

__all__ = ["Invocation", "context_for", "invoke"]


@dataclass(frozen=True, slots=True)
class Invocation:
    """The event to feed back to the engine; ``send`` is the filled-in context of a send."""

    event: HandlerCompleted | HandlerFailed
    send: SendContext | None = None

    @property
    def ok(self) -> bool:
        return isinstance(self.event, HandlerCompleted)


def context_for(
    effect: CallHandler | SendTask, services: Mapping[str, object] | None = None
) -> HandlerContext:
    """The context a handler sees for ``effect``, with the runtime's ``services``."""
    if isinstance(effect, SendTask):
        return SendContext(
            effect.handler,
            effect.element_id,
            effect.business_key,
            effect.variables,
            effect.fields,
            None,
            instantiates_canonical=effect.instantiates_canonical,
            message_name=effect.message_name,
            profile=effect.profile,
            correlation_key=effect.correlation_key,
            target=effect.target,
            services=services or {},
        )
    return HandlerContext(
        effect.handler,
        effect.element_id,
        effect.business_key,
        effect.variables,
        effect.fields,
        effect.event,
        services=services or {},
    )


async def invoke(
    registry: HandlerRegistry,
    effect: CallHandler | SendTask,
    now: datetime,
    services: Mapping[str, object] | None = None,
) -> Invocation:
    """Run the handler ``effect`` names; never raises for a handler's own failure."""
    context = context_for(effect, services)
    registered = registry.get(effect.handler)
    if registered is None:
        message = f"no handler registered for {effect.handler!r}"
        return Invocation(HandlerFailed(effect.token, now, None, message))
    try:
        outcome = registered.function(context)
        if inspect.isawaitable(outcome):
            await outcome
    except BpmnError as exc:
        failed = HandlerFailed(effect.token, now, exc.code, exc.message, variables=context.updates)
        return Invocation(failed)
    except Exception as exc:  # a handler's bug must fail its step, not the runtime
        # Its other variables are rolled back; Task outputs it added go with the failing PUT.
        # The message alone, as DSF writes exception.getMessage() into the failed Task.
        failed = HandlerFailed(
            effect.token,
            now,
            None,
            str(exc) or type(exc).__name__,
            variables=context.task_output_updates,
        )
        return Invocation(failed)
    completed = HandlerCompleted(effect.token, now, context.updates, context.local_updates)
    return Invocation(completed, context if isinstance(context, SendContext) else None)
