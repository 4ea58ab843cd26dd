"""What the runtime needs from the DSF side, as an interface: the seam between engine and wire.

The DSF network layer implements :class:`TaskGateway` over mutual TLS; tests use an in-memory
one. Every call may be repeated after a crash (effects are performed at least once from the
outbox), so implementations make them idempotent where the protocol allows: setting a Task
``completed`` twice is harmless, a send is recorded before it is performed, and a repeated
send first looks for the Task an earlier attempt may have delivered.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["OutgoingTask", "TaskGateway", "UserTaskRequest"]


@dataclass(frozen=True, slots=True)
class OutgoingTask:
    """A Task a send element produced, ready to be addressed and posted."""

    instance_id: str
    business_key: str
    instantiates_canonical: str
    message_name: str
    profile: str
    correlation_key: str | None
    target: Mapping[str, object] | None
    inputs: Sequence[Mapping[str, object]] = field(default_factory=tuple)
    # Fixed when the send was queued, the same in every attempt: with the requester, it is
    # how a repeated attempt finds a Task an earlier one delivered.
    authored_on: dt.datetime | None = None
    # An earlier attempt may have reached the target (a crash or a lost answer after the
    # POST): look for its Task before posting again.
    maybe_delivered: bool = False


@dataclass(frozen=True, slots=True)
class UserTaskRequest:
    """A user task: a QuestionnaireResponse ``in-progress`` to create for ``form_key``."""

    instance_id: str
    business_key: str
    user_task_id: str
    form_key: str
    # Texts of QuestionnaireResponse items by link id, as the user task's create listener set
    # them (QUESTIONNAIRE_ITEM_TEXTS): DSF's beforeQuestionnaireResponseCreate.
    item_texts: Mapping[str, str] = field(default_factory=dict)


class TaskGateway(Protocol):
    async def send_task(self, task: OutgoingTask) -> str:
        """Post ``task`` to its target; return the created Task's id (or location)."""
        ...

    async def complete_task(
        self, task_id: str, *, outputs: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        """Set a Task this site took in to ``completed``, adding ``outputs`` in the same PUT."""
        ...

    async def fail_task(
        self, task_id: str, message: str, *, outputs: Sequence[Mapping[str, Any]] = ()
    ) -> None:
        """Set a Task this site took in to ``failed`` with ``outputs`` and an ``error`` output."""
        ...

    async def create_user_task(self, request: UserTaskRequest) -> str:
        """Create the QuestionnaireResponse of a user task; return its id."""
        ...

    async def cancel_user_task(self, user_task_id: str) -> None:
        """Withdraw the QuestionnaireResponse of a cancelled user task."""
        ...
