"""The websocket subscription to the local DSF FHIR server, with REST catch-up.

As the DSF BPE does it: find the Subscription (``criteria=Task?status=requested``, channel
``websocket``), open ``wss://<base>/ws``, send ``bind <id>``, wait for ``bound <id>``; then every
text frame is one resource as JSON, or ``ping <id>`` for a subscription without payload. Any
close (DSF uses 1003 and 1006) or error leads to a full reconnect with bounded back-off: re-read
the Subscription, bind, catch up.

Where DSF is weak we do better:

- We bind first and catch up afterwards (frames arriving meanwhile are handled too), so a
  resource created between catch-up and bind is not missed until the next restart.
- Catch-up searches ``_lastUpdated=ge<cursor>`` (DSF: ``gt`` on a zone-less timestamp, which skips
  resources sharing the cursor's millisecond); duplicates are harmless because intake is
  idempotent by id and version. The cursor keeps its time zone and lives in SQL (the caller's
  :class:`CursorStore`); it moves only after a resource was handled, and only by catch-up, never
  by a frame that might have overtaken an earlier resource.
- A periodic re-sync while connected, from the cursor minus an overlap, finds resources a
  frame never announced (DSF users lost Tasks after network drops).

:attr:`TaskSubscription.heartbeat` is the time of the last sign of life (bound, frame, or a
completed catch-up), :attr:`TaskSubscription.connected` whether the websocket is bound now and
:attr:`TaskSubscription.disconnected_at` since when it is not, for the readiness check.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.tasks import BUSINESS_KEY, input_values
from dsf_bridge.dsf.vocabulary import FHIR_JSON, parse_instant
from dsf_bridge.errors import BridgeError, RemoteError

__all__ = ["CursorStore", "SubscriptionSettings", "TaskSubscription", "websocket_url"]

_log = structlog.get_logger("dsf_bridge.dsf.subscription")

ResourceHandler = Callable[[dict[str, Any]], Awaitable[None]]


class CursorStore(Protocol):
    """Where the last ``meta.lastUpdated`` handled per resource type is kept (SQL in production)."""

    async def load(self, resource_type: str) -> dt.datetime | None: ...

    async def save(self, resource_type: str, last_updated: dt.datetime) -> None: ...


@dataclass(frozen=True)
class SubscriptionSettings:
    page_size: int = 200
    resync_interval: dt.timedelta = dt.timedelta(minutes=5)
    resync_overlap: dt.timedelta = dt.timedelta(seconds=60)
    bind_timeout: dt.timedelta = dt.timedelta(seconds=10)
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    # A connection that stayed bound and caught up this long resets the back-off; one that
    # drops sooner (a server that accepts and fails at once) lets it keep growing.
    stable_after: float = 30.0
    # Resources pushed over the websocket handled at once; the receive loop reads the next
    # frame while they run (one slow intake must not hold up the others), and waits for a
    # free slot past this many.
    frames_at_once: int = 32
    # How long a stopping subscription lets the resources it is handling finish.
    drain_grace: float = 10.0
    # How soon after a frame left to another replica (its claim moments old) a catch-up looks
    # again: by then a claim left behind by a crash counts as abandoned.
    deferred_resync: float = 35.0


def websocket_url(base_url: str) -> str:
    """``https://host/fhir`` becomes ``wss://host/fhir/ws``."""
    parts = urlsplit(base_url.rstrip("/"))
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, f"{parts.path}/ws", "", ""))


def _last_updated(resource: Mapping[str, Any]) -> dt.datetime | None:
    return parse_instant((resource.get("meta") or {}).get("lastUpdated"))


def _version(resource: Mapping[str, Any]) -> str:
    return str((resource.get("meta") or {}).get("versionId") or "")


class ResourceDeferredError(BridgeError):
    """Raised by a handler that leaves a resource for now (another replica is taking it in):
    the cursor stays before it, and a later catch-up brings it again."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


def _order_key(resource: Mapping[str, Any]) -> str:
    """What orders the handling of resources: a Task's business key (its messages reach one
    instance in the order they came), else the resource itself."""
    try:
        keys = input_values(resource, BUSINESS_KEY)
    except (AttributeError, TypeError):  # a hostile shape: intake refuses it by itself
        keys = []
    if keys and isinstance(keys[0], str):
        return f"business-key:{keys[0]}"
    return f"{resource.get('resourceType')}/{resource.get('id')}"


def _search_criteria(criteria: str) -> tuple[str, list[tuple[str, str]]]:
    resource_type, _, query = criteria.partition("?")
    params = [tuple(part.split("=", 1)) for part in query.split("&") if "=" in part]
    return resource_type, [(key, value) for key, value in params]


class TaskSubscription:
    """Keeps one subscription alive and feeds every matching resource to ``handle``.

    ``handle`` must be idempotent (it sees duplicates after reconnects) and should raise a
    retryable :class:`BridgeError` when it could not take the resource in (the cursor then stays
    where it was and the resource comes back at the next catch-up).
    """

    def __init__(
        self,
        client: FhirClient,
        ssl_context: ssl.SSLContext | None,
        handle: ResourceHandler,
        cursor: CursorStore,
        *,
        criteria: str = "Task?status=requested",
        settings: SubscriptionSettings | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.client = client
        self.ssl_context = ssl_context
        self.handle = handle
        self.cursor = cursor
        self.criteria = criteria
        self.resource_type, self._criteria_params = _search_criteria(criteria)
        self.settings = settings or SubscriptionSettings()
        self.clock = clock
        self.heartbeat: dt.datetime | None = None
        self.bound = asyncio.Event()
        # When the websocket was lost: set at a drop, kept through failed reconnects and
        # connections that drop again before their catch-up, cleared once one has caught up.
        self.disconnected_at: dt.datetime | None = None
        self.connections = 0
        # Connections that were bound and finished their first catch-up; a change resets the
        # reconnect back-off in :meth:`run`.
        self.caught_up_connections = 0
        # Resources of frames being handled off the receive loop, the slots they hold, and
        # whether one failed (the loop then catches up, as a failure in the loop did).
        self._handling: set[asyncio.Task[Exception | None]] = set()
        # The newest resource handed off per business key (its handling ends the future).
        self._last_of: dict[str, asyncio.Future[None]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._queued: asyncio.Semaphore | None = None
        self._resync = asyncio.Event()
        self._resync_timer: asyncio.TimerHandle | None = None

    @property
    def connected(self) -> bool:
        """Whether the websocket is bound now, and, after a drop, has caught up since."""
        return self.bound.is_set() and self.disconnected_at is None

    # -- one subscription ----------------------------------------------------------------------

    async def find_subscription(self) -> tuple[str, bool]:
        """The id of the one active websocket Subscription for our criteria with a JSON
        payload, as the DSF BPE searches it (``criteria:exact``, ``status=active``,
        ``type=websocket``, ``payload=application/fhir+json``: frames carry the resources).
        Like the BPE, anything but exactly one match is an error."""
        found = await self.client.search(
            "Subscription",
            [
                ("criteria:exact", self.criteria),
                ("status", "active"),
                ("type", "websocket"),
                ("payload", FHIR_JSON),
            ],
        )
        if len(found) != 1:
            raise RemoteError(
                f"{len(found)} active websocket Subscriptions with criteria {self.criteria!r} "
                f"and payload {FHIR_JSON} on {self.client.base_url}, the DSF BPE needs exactly "
                "one; the DSF FHIR server creates it at start-up (check its bundle of initial "
                "resources)",
                retryable=True,
            )
        subscription = found[0]
        payload = (subscription.get("channel") or {}).get("payload")
        return str(subscription["id"]), bool(payload)

    async def catch_up(self, *, overlap: dt.timedelta | None = None) -> int:
        """Fetch matching resources changed since the cursor, oldest first; return how many.

        Handling a Task takes it out of ``status=requested``, which shifts offset-based pages
        (DSF pages by offset), so instead of following ``next`` links this searches the first
        page again until it brings nothing new.
        """
        since = await self.cursor.load(self.resource_type)
        start = None if since is None else since - (overlap or dt.timedelta(0))
        seen: set[tuple[str, str]] = set()
        handled = 0
        deferred = False
        while True:
            params = [
                *self._criteria_params,
                ("_sort", "_lastUpdated"),
                ("_count", str(self.settings.page_size)),
            ]
            if start is not None:
                params.append(("_lastUpdated", f"ge{start.isoformat(timespec='microseconds')}"))
            page = await self._first_page(params)
            fresh = [r for r in page if (str(r.get("id")), _version(r)) not in seen]
            # A page's resources are handled side by side (``frames_at_once``), those of one
            # business key one after the other in the page's order; the cursor is then moved
            # in their order, as if all had been handled one after the other.
            handing = [await self._hand_off(resource, report=False) for resource in fresh]
            outcomes = [await task for task in handing]
            # One write per page: where the cursor would stand after the page's resources one
            # by one (a crash before it brings the page again; its claims are kept, so nothing
            # is taken in twice).
            moved_to: dt.datetime | None = None
            # What stops the catch-up, raised once the cursor stands after the resources
            # before it (as when it was written per resource).
            stop: Exception | None = None
            for resource, outcome in zip(fresh, outcomes, strict=True):
                seen.add((str(resource.get("id")), _version(resource)))
                if isinstance(outcome, RemoteError) and outcome.status is None:
                    stop = outcome  # the server is away: stop, reconnect, catch up again
                    break
                if isinstance(outcome, ResourceDeferredError | RemoteError):
                    # Left for now (another replica takes it in), or the server answered an
                    # error for this resource alone: the others go on; the cursor stays before
                    # it, so the next catch-up brings it again.
                    left = isinstance(outcome, ResourceDeferredError)
                    (_log.info if left else _log.warning)(
                        "subscription.resource_left" if left else "subscription.resource_deferred",
                        resource_type=self.resource_type,
                        resource_id=str(resource.get("id")),
                        error=str(outcome),
                    )
                    deferred = True
                    continue
                if outcome is not None:
                    stop = outcome
                    break
                handled += 1
                updated = _last_updated(resource)
                if not deferred and updated is not None and (since is None or updated > since):
                    moved_to = since = updated
            if moved_to is not None:
                await self.cursor.save(self.resource_type, moved_to)
            if stop is not None:
                raise stop
            if not fresh or len(page) < self.settings.page_size:
                break
        self.heartbeat = self.clock()
        if handled:
            _log.info("subscription.caught_up", resource_type=self.resource_type, count=handled)
        return handled

    async def _first_page(self, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        async for bundle in self.client.search_pages(self.resource_type, params):
            return [
                entry["resource"]
                for entry in bundle.get("entry") or []
                if isinstance(entry.get("resource"), dict)
                and (entry.get("search") or {}).get("mode", "match") == "match"
            ]
        return []

    async def _bind(self, connection: ClientConnection, subscription_id: str) -> None:
        await connection.send(f"bind {subscription_id}")
        deadline = self.settings.bind_timeout.total_seconds()
        async with asyncio.timeout(deadline):
            while True:
                frame = await connection.recv()
                if isinstance(frame, str) and frame.strip() == f"bound {subscription_id}":
                    return

    async def _frame(self, frame: str | bytes, subscription_id: str) -> bool:
        """Handle one frame; ``True`` when it asks for a catch-up (payload-less ping)."""
        self.heartbeat = self.clock()
        text = frame.decode() if isinstance(frame, bytes) else frame
        if text.startswith("ping "):
            return True
        if text.startswith("bound "):
            return False
        try:
            resource = json.loads(text)
        except json.JSONDecodeError:
            _log.warning("subscription.frame_ignored", reason="not JSON")
            return False
        except (ValueError, RecursionError) as exc:
            # A number too long for Python's int limit, or nesting deeper than the parser's
            # recursion: hostile, never readable. The frame goes; catch-up reads the page.
            _log.warning("subscription.frame_ignored", reason=type(exc).__name__)
            return False
        if isinstance(resource, dict) and resource.get("resourceType") == self.resource_type:
            await self._hand_off(resource)
        return False

    async def _hand_off(
        self, resource: dict[str, Any], *, report: bool = True
    ) -> asyncio.Task[Exception | None]:
        """Handle ``resource`` in a task of its own, after the resources of its business key
        handed off before it, in one of ``frames_at_once`` slots; the task returns the
        failure, if any. The caller waits while four times that many are queued (memory
        stays bounded). ``report``: a frame's failure is logged and asks for a catch-up (the
        catch-up's own resources are judged by the catch-up)."""
        if self._slots is None or self._queued is None:
            self._slots = asyncio.Semaphore(self.settings.frames_at_once)
            self._queued = asyncio.Semaphore(4 * self.settings.frames_at_once)
        queued = self._queued
        await queued.acquire()
        key = _order_key(resource)
        before = self._last_of.get(key)
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last_of[key] = mine
        task = asyncio.ensure_future(self._handled(resource, before, self._slots, report=report))

        def done(finished: asyncio.Task[Exception | None]) -> None:
            # Also when the task was cancelled before it ran a line: the next of its key
            # must not wait for ever, and its place in the queue is free again.
            queued.release()
            if not mine.done():
                mine.set_result(None)
            if self._last_of.get(key) is mine:
                del self._last_of[key]
            self._handling.discard(finished)

        self._handling.add(task)
        task.add_done_callback(done)
        return task

    async def _handled(
        self,
        resource: dict[str, Any],
        before: asyncio.Future[None] | None,
        slots: asyncio.Semaphore,
        *,
        report: bool,
    ) -> Exception | None:
        try:
            if before is not None:
                # In the order received (a start, then the messages of its key); shielded, so
                # a cancelled successor does not cancel what its predecessor resolves.
                await asyncio.shield(before)
            async with slots:  # taken after the wait: waiting holds up no other key
                await self.handle(resource)
        except ResourceDeferredError as exc:
            if not report:
                return exc
            # Left to another replica: a catch-up once its claim is old enough brings it
            # again if that replica died meanwhile.
            self._resync_later()
        except Exception as exc:  # the next catch-up brings it again, as before the hand-off
            if not report:
                return exc
            if isinstance(exc, BridgeError):
                _log.warning("subscription.frame_failed", error=str(exc), retryable=exc.retryable)
            else:
                _log.exception("subscription.frame_crashed")
            self._resync.set()
        return None

    def _resync_later(self) -> None:
        if self._resync_timer is None or self._resync_timer.cancelled():
            loop = asyncio.get_running_loop()

            def due() -> None:
                self._resync_timer = None
                self._resync.set()

            self._resync_timer = loop.call_later(self.settings.deferred_resync, due)

    async def settled(self, grace: float | None = None) -> None:
        """Wait until the resources handed off so far are handled; past ``grace`` seconds,
        cancel the rest and wait until they have unwound."""
        if not self._handling:
            return
        _done, late = await asyncio.wait(set(self._handling), timeout=grace)
        for task in late:
            task.cancel()
        if late:
            await asyncio.gather(*late, return_exceptions=True)

    async def run_connected(self, stop: asyncio.Event) -> None:
        """One connection: find, connect, bind, catch up, then handle frames until it drops."""
        subscription_id, _payload = await self.find_subscription()
        url = websocket_url(self.client.base_url)
        # Through the FHIR client's proxy, if it has one; never one from the environment
        # (websockets would read HTTPS_PROXY by default).
        proxy = self.client.proxy.url_with_credentials() if self.client.proxy else None
        async with connect(
            url,
            ssl=self.ssl_context,
            open_timeout=10,
            ping_interval=30,
            max_size=2**24,
            proxy=proxy,
        ) as connection:
            await self._bind(connection, subscription_id)
            self.connections += 1
            self.heartbeat = self.clock()
            self.bound.set()
            _log.info("subscription.bound", subscription_id=subscription_id, url=url)
            try:
                await self.catch_up(overlap=self.settings.resync_overlap)
                self.caught_up_connections += 1
                self.disconnected_at = None
                next_resync = self.clock() + self.settings.resync_interval
                while not stop.is_set():
                    timeout = max(0.0, (next_resync - self.clock()).total_seconds())
                    receive = asyncio.ensure_future(connection.recv())
                    stopper = asyncio.ensure_future(stop.wait())
                    resync = asyncio.ensure_future(self._resync.wait())
                    done, _ = await asyncio.wait(
                        {receive, stopper, resync},
                        timeout=timeout,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    stopper.cancel()
                    resync.cancel()
                    if self._resync.is_set() and receive not in done:
                        # A handed-off resource failed: read the matching ones again now.
                        receive.cancel()
                        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                            await receive
                        self._resync.clear()
                        await self.catch_up(overlap=self.settings.resync_overlap)
                        continue
                    if receive not in done:
                        receive.cancel()
                        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                            await receive
                        if stop.is_set():
                            return
                        await self.catch_up(overlap=self.settings.resync_overlap)
                        next_resync = self.clock() + self.settings.resync_interval
                        continue
                    if await self._frame(receive.result(), subscription_id):
                        await self.catch_up(overlap=self.settings.resync_overlap)
            finally:
                self.bound.clear()
                if self.disconnected_at is None:
                    self.disconnected_at = self.clock()

    async def run(self, stop: asyncio.Event) -> None:
        """Stay subscribed until ``stop`` is set, reconnecting with back-off after any failure.

        The back-off doubles while connecting keeps failing. A connection that was bound,
        caught up and stayed up for ``stable_after`` seconds counts as a success, so the next
        outage starts again at ``backoff_initial`` (otherwise eight short drops in a day would
        leave a minute's gap); one that drops sooner does not, so a server that accepts and
        fails at once is not hammered.
        """
        try:
            await self._run(stop)
        finally:
            if self._resync_timer is not None:
                self._resync_timer.cancel()
            await self.settled(self.settings.drain_grace)

    async def _run(self, stop: asyncio.Event) -> None:
        delay = self.settings.backoff_initial
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            caught_up_before = self.caught_up_connections
            started = loop.time()
            try:
                await self.run_connected(stop)
            except (ConnectionClosed, InvalidHandshake, OSError, TimeoutError) as exc:
                _log.warning("subscription.disconnected", error=str(exc) or type(exc).__name__)
            except BridgeError as exc:
                _log.warning("subscription.failed", error=str(exc), retryable=exc.retryable)
            if stop.is_set():
                return
            stable = loop.time() - started >= self.settings.stable_after
            if self.caught_up_connections != caught_up_before and stable:
                delay = self.settings.backoff_initial
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(self.settings.backoff_max, delay * 2)
