"""Readiness probes: is the store reachable, are the subscriptions and the workers alive?

A probe is a name and an async check returning :class:`ProbeResult`. ``/ready`` runs all of
them; one that fails makes it answer 503, so that an orchestrator stops routing to, or
restarts, a bridge that no longer takes Tasks in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from dsf_bridge.errors import BridgeError
from dsf_bridge.store import Database
from dsf_bridge.store.queries import ping

__all__ = [
    "Clock",
    "HasConnection",
    "HasHeartbeat",
    "Probe",
    "ProbeResult",
    "database_probe",
    "heartbeat_probe",
    "subscription_probe",
    "utcnow",
]

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str
    age_seconds: float | None = None
    # A subscription's websocket bound now (``None``: the probe checks no connection).
    connected: bool | None = None


@dataclass(frozen=True)
class Probe:
    """One readiness check; ``kind`` groups probes in metrics (``subscription``, ``worker``)."""

    name: str
    check: Callable[[], Awaitable[ProbeResult]]
    kind: str = "other"


class HasHeartbeat(Protocol):
    """Anything that stamps the time of its last sign of life (subscriptions, the workers)."""

    @property
    def heartbeat(self) -> dt.datetime | None: ...


class HasConnection(HasHeartbeat, Protocol):
    """A subscription: its heartbeat, whether its websocket is bound, and since when not."""

    @property
    def connected(self) -> bool: ...

    @property
    def disconnected_at(self) -> dt.datetime | None: ...


def database_probe(database: Database) -> Probe:
    async def check() -> ProbeResult:
        try:
            async with database.transaction() as session:
                await ping(session)
        except (BridgeError, OSError) as exc:
            return ProbeResult(False, f"the store does not answer: {exc}")
        return ProbeResult(True, "reachable")

    return Probe("database", check, kind="database")


def heartbeat_probe(
    name: str,
    source: Callable[[], HasHeartbeat | None],
    stale_after: float,
    *,
    kind: str,
    clock: Clock = utcnow,
) -> Probe:
    """Fails when the source never showed life, or not within ``stale_after`` seconds.

    ``source`` is looked up at every check: the admin API starts before the bridge, whose
    subscriptions and workers only exist once it has started (``None`` until then).
    """

    async def check() -> ProbeResult:
        found = source()
        beat = None if found is None else found.heartbeat
        if beat is None:
            return ProbeResult(False, "no sign of life yet")
        age = max(0.0, (clock() - beat).total_seconds())
        if age > stale_after:
            return ProbeResult(
                False, f"last sign of life {age:.0f} s ago (limit {stale_after:.0f} s)", age
            )
        return ProbeResult(True, f"last sign of life {age:.1f} s ago", age)

    return Probe(name, check, kind=kind)


def subscription_probe(
    name: str,
    source: Callable[[], HasConnection | None],
    stale_after: float,
    disconnected_after: float,
    *,
    clock: Clock = utcnow,
) -> Probe:
    """A subscription's probe: fails when its websocket has been down for more than
    ``disconnected_after`` seconds (the bridge reconnecting without success), and, as
    :func:`heartbeat_probe`, when it shows no life within ``stale_after`` seconds. A drop
    shorter than ``disconnected_after`` passes (a reconnect takes a moment); the result says
    whether the websocket is bound now.
    """
    heartbeat = heartbeat_probe(name, source, stale_after, kind="subscription", clock=clock)

    async def check() -> ProbeResult:
        result = await heartbeat.check()
        found = source()
        connected = found is not None and found.connected
        since = None if found is None else found.disconnected_at
        if connected or since is None:
            return ProbeResult(result.ok, result.detail, result.age_seconds, connected=connected)
        down = max(0.0, (clock() - since).total_seconds())
        if down > disconnected_after:
            detail = f"websocket down for {down:.0f} s (limit {disconnected_after:.0f} s)"
            return ProbeResult(False, f"{detail}, reconnecting", result.age_seconds, False)
        detail = f"websocket down for {down:.1f} s, reconnecting; {result.detail}"
        return ProbeResult(result.ok, detail, result.age_seconds, connected=False)

    return Probe(name, check, kind="subscription")
