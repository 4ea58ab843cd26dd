"""The closed vocabularies the store keeps as text: job kinds, outbox kinds and the statuses of
Task versions seen. One codec (:class:`~dsf_bridge.store.tables.EnumText`) writes and reads all
three, so a misspelt value is an error where it is written, and a value this release does not
know (a row written by a newer one) is an error naming the column where it is read.
"""

from __future__ import annotations

import enum

__all__ = ["JobKind", "OutboxKind", "TaskSeenStatus"]


class JobKind(enum.StrEnum):
    """What a job does when its turn comes."""

    CONTINUE = "continue"  # an asynchronous continuation (asyncBefore/asyncAfter)
    HANDLER = "handler"  # a service, script or listener handler
    SEND = "send"  # a send element's handler; its Task goes to the outbox
    SIGNAL = "signal"  # a signal another instance threw
    OPERATOR = "operator"  # an operator's retry or cancel (dsf_bridge.runtime.operations)


class OutboxKind(enum.StrEnum):
    """What an outbox entry performs on a FHIR server after its step committed."""

    SEND_TASK = "send-task"  # POST a Task to another site (or this one)
    COMPLETE_TASK = "complete-task"  # PUT a Task taken in completed, with its outputs
    FAIL_TASK = "fail-task"  # PUT a Task taken in failed, with the error
    CREATE_USER_TASK = "create-user-task"  # POST a QuestionnaireResponse in-progress
    CANCEL_USER_TASK = "cancel-user-task"  # only performed when queued by earlier releases

    @property
    def local(self) -> bool:
        """An effect on the site's own FHIR server: it waits out that server's outages."""
        return self is not OutboxKind.SEND_TASK

    @property
    def repeats_harmlessly(self) -> bool:
        """Performed again (its done mark lost), it changes nothing and sends nothing: a Task
        already finished is only read (``DsfTaskGateway._finish``). A send or a user task's
        QuestionnaireResponse could be created twice."""
        return self in (OutboxKind.COMPLETE_TASK, OutboxKind.FAIL_TASK)


class TaskSeenStatus(enum.StrEnum):
    """Where a Task version stands with the bridge (``tasks_seen.status``)."""

    # incoming: intake's claim and its outcomes
    CLAIMING = "claiming"  # claimed, intake not finished (recovered at start-up)
    TAKEN_IN = "started"  # its message reached an instance
    HELD = "held"  # a reply that overtook its request's send, kept until the send resolves
    FAILED = "failed"  # PUT back failed with the reason
    CLAIMED_ELSEWHERE = "claimed-elsewhere"  # another bridge took it in first
    REFUSED = "refused"  # the server refused to update it; tried again at start-up
    SKIPPED = "skipped"  # recorded with the reason in the audit trail, never tried again
    IN_PROGRESS = "in-progress"  # the instance's record of a Task it took in
    # outgoing
    REQUESTED = "requested"  # a Task this bridge sent
