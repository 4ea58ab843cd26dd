"""The timer worker: fires due timers, one instance step each.

A timer is taken (its row deleted) in the transaction that steps its instance, so a crash
before the commit leaves it due and a second runtime fires it. A step the engine undid is
audited ``timer.failed``: the timer fires again later, or becomes an incident.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from dsf_bridge.engine.events import TimerFired
from dsf_bridge.errors import BridgeError, ConcurrencyError, StoreError
from dsf_bridge.runtime.effects import StepRecord
from dsf_bridge.store import repository as repo

if TYPE_CHECKING:
    from dsf_bridge.runtime.processes import ProcessRuntime

__all__ = ["TimerWorker"]

log = structlog.get_logger("dsf_bridge.runtime")


class TimerWorker:
    """Fires the due timers of ``runtime``."""

    def __init__(self, runtime: ProcessRuntime) -> None:
        self.runtime = runtime

    async def fire_due(self) -> int:
        """Fire due timers (at most a batch), each in its own transaction; return how many.

        A timer whose step fails for a reason of its own instance (a bug of the bridge's own,
        a definition no longer deployed, a state the store refuses; an engine error instead
        undoes the step and is ``timer.failed``) is logged and fires again after the lease's
        length: it must not come first, and fail, in every round, holding up the timers after
        it and the work the round leased. The store away, or the instance changed under the
        step, fail the round as before: the timer is due again at once."""
        runtime = self.runtime
        fired = 0
        while fired < runtime.settings.batch:
            now = runtime.clock()
            pending: StepRecord | None = None
            taken: tuple[str, repo.TimerKey] | None = None
            try:
                async with runtime.database.transaction() as session:
                    due = await repo.due_timers(session, now, limit=1)
                    if not due:
                        return fired
                    taken = due[0]
                    instance_id, timer = taken
                    record = await repo.load_instance(session, instance_id)
                    await repo.cancel_timer(session, instance_id, timer.timer_id)
                    if record is not None:
                        pending = await runtime.stepper.write(
                            session,
                            runtime.deployments.of_record(record),
                            record,
                            TimerFired(timer.timer_id, now),
                            actor=runtime.owner,
                            action="timer.fired",
                            failed_action="timer.failed",
                            reason=f"{timer.element_id} due {timer.due_at.isoformat()}",
                        )
            except Exception as exc:
                if taken is None or _passing(exc):
                    raise
                pending = None  # rolled back: nothing of the step happened
                bound = log.bind(instance_id=taken[0], element_id=taken[1].element_id)
                if isinstance(exc, BridgeError):
                    bound.error("timer.deferred", error=str(exc))
                else:
                    bound.exception("timer.crashed")
                async with runtime.database.transaction() as session:
                    await repo.delay_timer(
                        session, taken[0], taken[1].timer_id, now + runtime.settings.lease
                    )
            if pending is not None:
                runtime.stepper.committed(pending, "timer.fired")
            fired += 1
        return fired


def _passing(exc: Exception) -> bool:
    """Whether a timer's failure passes by itself (the store away, the instance changed under
    the step): the timer stays due, and the round reports the failure."""
    return isinstance(exc, ConcurrencyError) or (isinstance(exc, StoreError) and exc.retryable)
