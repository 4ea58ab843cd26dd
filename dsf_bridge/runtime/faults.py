"""The runtime's commit boundaries, where tests stop it as a crash would, and the errors its
parts share."""

from __future__ import annotations

import enum
from collections.abc import Callable

from dsf_bridge.errors import ProcessExecutionError

__all__ = ["FaultHook", "FaultPoint", "InstanceGoneError"]


class FaultPoint(enum.StrEnum):
    """The commit boundaries of the runtime, where tests stop it as a crash would
    (:attr:`ProcessRuntime.fault_hook`). The detail passed with each names what is at stake."""

    # Jobs or outbox entries leased and committed; nothing of them done (detail: "jobs/entries").
    WORK_CLAIMED = "work-claimed"
    # A handler ran; the step it ends is not written (detail: the handler).
    HANDLER_RAN = "handler-ran"
    # A step is written in its transaction, not committed (detail: its audit action).
    STEP_WRITTEN = "step-written"
    # A step is committed; nothing after it (wake-ups, listeners) is done (detail: its action).
    STEP_COMMITTED = "step-committed"
    # The other side accepted a send or a Task update; nothing of it is recorded (detail: kind).
    EFFECT_PERFORMED = "effect-performed"


# Called at every fault point; a test's hook raises (a BaseException, so nothing catches it)
# to stop the runtime there. Never configuration: a site cannot set it.
FaultHook = Callable[[FaultPoint, str], None]


class InstanceGoneError(ProcessExecutionError):
    """The instance an event was for does not exist (any more)."""
