"""The subscription's reconnect back-off against the sandbox DSF FHIR server over real mutual TLS.

A loopback TCP relay sits between the bridge and the server so a test can cut the live
connections (a network drop: no close frame, 1006) while the server itself stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.subscription import (
    ResourceDeferredError,
    SubscriptionSettings,
    TaskSubscription,
)
from dsf_bridge.dsf.vocabulary import BPMN_MESSAGE_SYSTEM
from dsf_bridge.errors import StoreError
from tests.sandbox.harness import (
    FAST_RETRY,
    LOCAL,
    Sandbox,
    sandbox,
    sandbox_ca,
    sandbox_sites,
)

__all__ = ["sandbox", "sandbox_ca", "sandbox_sites"]


class MemoryCursor:
    def __init__(self) -> None:
        self.cursors: dict[str, dt.datetime] = {}

    async def load(self, resource_type: str) -> dt.datetime | None:
        return self.cursors.get(resource_type)

    async def save(self, resource_type: str, last_updated: dt.datetime) -> None:
        self.cursors[resource_type] = last_updated


class Relay:
    """Forwards TCP (TLS passes through untouched) to the sandbox; ``cut`` drops every link."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


@pytest.fixture
async def relay(sandbox: Sandbox) -> AsyncIterator[Relay]:
    async with Relay(sandbox.server.port) as running:
        yield running


async def _caught_up(subscription: TaskSubscription, count: int) -> None:
    # Polling: "caught up for the n-th time" is a count, not an event the subscription offers.
    while subscription.caught_up_connections < count:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def test_the_back_off_starts_again_after_each_successful_bind(
    sandbox: Sandbox, relay: Relay
) -> None:
    """Ten short drops in a row: each reconnect waits ``backoff_initial``, not 2**n times it
    (before the fix the tenth waited 0.05 s * 2**9 = 25 s)."""
    async with _running(sandbox, relay, stable_after=0.2) as subscription:
        await asyncio.wait_for(_caught_up(subscription, 1), 10)
        reconnects: list[float] = []
        for drop in range(1, 11):
            await asyncio.sleep(0.3)  # the connection has been stable for stable_after
            started = time.monotonic()
            relay.cut()
            await asyncio.wait_for(_caught_up(subscription, drop + 1), 5)
            reconnects.append(time.monotonic() - started)
        assert subscription.connections == 11
        # Bind, find the Subscription and catch up take a few tens of milliseconds here.
        assert max(reconnects) < 2.0, reconnects


async def test_a_server_that_drops_right_after_catch_up_still_gets_a_growing_back_off(
    sandbox: Sandbox, relay: Relay
) -> None:
    """Bound and caught up, then cut at once, again and again: not a stable connection, so the
    waits keep doubling instead of reconnecting at ``backoff_initial`` forever."""
    async with _running(sandbox, relay, stable_after=30.0) as subscription:
        await asyncio.wait_for(_caught_up(subscription, 1), 10)
        gaps: list[float] = []
        for drop in range(1, 6):
            started = time.monotonic()
            relay.cut()
            await asyncio.wait_for(_caught_up(subscription, drop + 1), 10)
            gaps.append(time.monotonic() - started)
        # 0.05, 0.1, 0.2, 0.4, 0.8 s of back-off (plus the reconnect itself).
        assert gaps[-1] >= 0.8, gaps
        assert gaps[-1] > 2 * gaps[0], gaps


@contextlib.asynccontextmanager
async def _running(
    sandbox: Sandbox, relay: Relay, *, stable_after: float, cursor: MemoryCursor | None = None
) -> AsyncIterator[TaskSubscription]:
    """A subscription through ``relay`` running in the background (back-off from 0.05 s),
    stopped and closed on exit."""
    client = FhirClient(
        f"https://127.0.0.1:{relay.port}/fhir", ssl_context=sandbox.context(LOCAL), retry=FAST_RETRY
    )

    async def handle(resource: dict[str, Any]) -> None:
        return None

    subscription = TaskSubscription(
        client,
        sandbox.context(LOCAL),
        handle,
        cursor or MemoryCursor(),
        settings=SubscriptionSettings(
            backoff_initial=0.05, backoff_max=60.0, stable_after=stable_after
        ),
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(subscription.run(stop))
    try:
        yield subscription
    finally:
        stop.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runner, 10)
        await client.aclose()


class FailingCursor(MemoryCursor):
    """Fails the next ``failures`` loads (a store away): each catch-up after a bind fails."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    async def load(self, resource_type: str) -> dt.datetime | None:
        if self.failures:
            self.failures -= 1
            raise StoreError("database unavailable", retryable=True)
        return await super().load(resource_type)


def _dropped_at(subscription: TaskSubscription) -> dt.datetime | None:
    # A call, so that the type checker does not carry an earlier assert on the attribute over.
    return subscription.disconnected_at


async def _until_connected(subscription: TaskSubscription, connected: bool) -> None:
    while subscription.connected is not connected:  # noqa: ASYNC110 - a state, not an event
        await asyncio.sleep(0.01)


async def test_disconnected_since_the_first_drop_until_a_connection_caught_up(
    sandbox: Sandbox, relay: Relay
) -> None:
    """What /ready reads: a drop sets ``disconnected_at``; reconnects that bind and drop again
    before their catch-up keep the first drop's time (a flapping server stays down for
    readiness); the first connection that catches up clears it."""
    cursor = FailingCursor()
    async with _running(sandbox, relay, stable_after=30.0, cursor=cursor) as subscription:
        await asyncio.wait_for(_caught_up(subscription, 1), 10)
        assert subscription.connected and subscription.disconnected_at is None

        cursor.failures = 3
        relay.cut()
        await asyncio.wait_for(_until_connected(subscription, False), 10)
        dropped = _dropped_at(subscription)
        assert dropped is not None
        # Three binds whose catch-up fails, then one that catches up.
        await asyncio.wait_for(_caught_up(subscription, 2), 20)
        assert subscription.connections == 5
        assert subscription.connected and subscription.disconnected_at is None

        relay.cut()
        await asyncio.wait_for(_until_connected(subscription, False), 10)
        again = _dropped_at(subscription)
        assert again is not None and again > dropped


async def test_a_flapping_connection_keeps_its_first_drop_time(
    sandbox: Sandbox, relay: Relay
) -> None:
    cursor = FailingCursor()
    async with _running(sandbox, relay, stable_after=30.0, cursor=cursor) as subscription:
        await asyncio.wait_for(_caught_up(subscription, 1), 10)
        cursor.failures = 1_000_000  # every catch-up fails from now on
        relay.cut()
        await asyncio.wait_for(_until_connected(subscription, False), 10)
        dropped = subscription.disconnected_at
        binds = subscription.connections
        while subscription.connections < binds + 3:  # noqa: ASYNC110 - a count
            await asyncio.sleep(0.01)
        assert not subscription.connected
        assert subscription.disconnected_at == dropped
        cursor.failures = 0


async def test_a_frame_no_parser_can_read_is_dropped_not_fatal(
    sandbox: Sandbox, relay: Relay
) -> None:
    """A number past Python's int digit limit or nesting past the parser's recursion: the
    frame is dropped with a log line (catch-up reads the page), the bridge goes on."""
    client = FhirClient(
        f"https://127.0.0.1:{relay.port}/fhir", ssl_context=sandbox.context(LOCAL), retry=FAST_RETRY
    )
    seen: list[dict[str, Any]] = []

    async def handle(resource: dict[str, Any]) -> None:
        seen.append(resource)

    subscription = TaskSubscription(client, sandbox.context(LOCAL), handle, MemoryCursor())
    try:
        huge = '{"resourceType": "Task", "n": ' + "9" * 5000 + "}"
        deep = '{"resourceType": "Task", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
        for frame in (huge, deep):
            assert await subscription._frame(frame, "sub") is False
        await subscription.settled()
        assert seen == []
        assert await subscription._frame('{"resourceType": "Task", "id": "1"}', "sub") is False
        await subscription.settled()
        assert seen == [{"resourceType": "Task", "id": "1"}]
    finally:
        await client.aclose()


async def test_a_slow_resource_does_not_hold_up_the_frames_after_it(sandbox: Sandbox) -> None:
    """Frames are handed off: the receive loop reads the next while one is still handled (an
    intake waiting for its server), up to ``frames_at_once``; a failure makes it catch up."""
    client = FhirClient(sandbox.base_url, ssl_context=sandbox.context(LOCAL), retry=FAST_RETRY)
    release = asyncio.Event()
    handled: list[str] = []

    async def handle(resource: dict[str, Any]) -> None:
        if str(resource["id"]).startswith("slow"):
            await release.wait()
        handled.append(str(resource["id"]))

    subscription = TaskSubscription(
        client,
        sandbox.context(LOCAL),
        handle,
        MemoryCursor(),
        settings=SubscriptionSettings(frames_at_once=2),
    )
    try:
        await subscription._frame('{"resourceType": "Task", "id": "slow"}', "sub")
        await asyncio.wait_for(
            subscription._frame('{"resourceType": "Task", "id": "quick"}', "sub"), 1
        )
        for _ in range(100):
            if handled:
                break
            await asyncio.sleep(0.01)
        assert handled == ["quick"]  # past the slow one
        await subscription._frame('{"resourceType": "Task", "id": "slow-too"}', "sub")
        # Both slots are held by slow ones: the next waits for a slot, the loop reads on.
        await asyncio.wait_for(
            subscription._frame('{"resourceType": "Task", "id": "third"}', "sub"), 1
        )
        await asyncio.sleep(0.2)
        assert handled == ["quick"]
        # Past four times frames_at_once handed off, the loop itself waits (bounded memory).
        for number in range(5):
            await subscription._frame(f'{{"resourceType": "Task", "id": "slow-{number}"}}', "sub")
        blocked = asyncio.ensure_future(
            subscription._frame('{"resourceType": "Task", "id": "ninth"}', "sub")
        )
        await asyncio.sleep(0.2)
        assert not blocked.done()
        release.set()
        await asyncio.wait_for(blocked, 5)
        await subscription.settled(5)
        assert sorted(handled) == sorted(
            ["quick", "slow", "slow-too", "third", "ninth", *(f"slow-{n}" for n in range(5))]
        )
    finally:
        await client.aclose()


async def test_a_handed_off_resource_that_fails_asks_for_a_catch_up(sandbox: Sandbox) -> None:
    client = FhirClient(sandbox.base_url, ssl_context=sandbox.context(LOCAL), retry=FAST_RETRY)

    async def handle(resource: dict[str, Any]) -> None:
        raise StoreError("database unavailable", retryable=True)

    subscription = TaskSubscription(client, sandbox.context(LOCAL), handle, MemoryCursor())
    try:
        await subscription._frame('{"resourceType": "Task", "id": "1"}', "sub")
        await subscription.settled(5)
        assert subscription._resync.is_set()  # the receive loop catches up next
    finally:
        await client.aclose()


class _OnePage:
    """A server whose first search answers ``resources`` and every later one nothing."""

    base_url = "https://fake.invalid/fhir"

    def __init__(self, resources: list[dict[str, Any]]) -> None:
        self.resources = resources
        self.searches = 0

    async def search_pages(self, resource_type: str, params: Any) -> AsyncIterator[Any]:
        self.searches += 1
        yield {"entry": [{"resource": r} for r in self.resources if self.searches == 1]}


def _requested(task_id: str, second: int, business_key: str | None) -> dict[str, Any]:
    task: dict[str, Any] = {
        "resourceType": "Task",
        "id": task_id,
        "status": "requested",
        "meta": {"versionId": "1", "lastUpdated": f"2026-01-01T00:00:0{second}Z"},
    }
    if business_key is not None:
        task["input"] = [
            {
                "type": {"coding": [{"system": BPMN_MESSAGE_SYSTEM, "code": "business-key"}]},
                "valueString": business_key,
            }
        ]
    return task


async def test_a_pages_tasks_of_one_business_key_are_taken_in_in_order() -> None:
    """A start and the message after it (one business key) in one catch-up page: the message
    waits for the start, however slow its intake; other keys go on beside them."""
    done: list[str] = []
    release = asyncio.Event()

    async def handle(resource: dict[str, Any]) -> None:
        if resource["id"] == "start":
            await release.wait()  # its in-progress PUT is slow
        done.append(str(resource["id"]))
        if resource["id"] == "other":
            release.set()  # ran while the start of the other key waited

    page = [
        _requested("start", 1, "bk-1"),
        _requested("message", 2, "bk-1"),
        _requested("other", 3, "bk-2"),
    ]
    subscription = TaskSubscription(
        _OnePage(page),  # type: ignore[arg-type]
        None,
        handle,
        MemoryCursor(),
    )
    assert await asyncio.wait_for(subscription.catch_up(), 5) == 3
    assert done == ["other", "start", "message"]


class _Pages:
    """A server answering each search with the next of ``pages`` (then nothing), as DSF's
    first page of ``Task?status=requested`` shrinks while the bridge takes Tasks in."""

    base_url = "https://fake.invalid/fhir"

    def __init__(self, pages: list[list[dict[str, Any]]]) -> None:
        self.pages = pages
        self.searches = 0

    async def search_pages(self, resource_type: str, params: Any) -> AsyncIterator[Any]:
        page = self.pages[self.searches] if self.searches < len(self.pages) else []
        self.searches += 1
        yield {"entry": [{"resource": r} for r in page]}


class CountingCursor(MemoryCursor):
    def __init__(self) -> None:
        super().__init__()
        self.saved: list[dt.datetime] = []

    async def save(self, resource_type: str, last_updated: dt.datetime) -> None:
        self.saved.append(last_updated)
        await super().save(resource_type, last_updated)


def _catching_up(
    pages: list[list[dict[str, Any]]], handle: Callable[[dict[str, Any]], Awaitable[None]]
) -> tuple[TaskSubscription, CountingCursor]:
    """A subscription whose catch-up searches ``pages`` (pages of 3) and writes a counting
    cursor."""
    cursor = CountingCursor()
    subscription = TaskSubscription(
        _Pages(pages),  # type: ignore[arg-type]
        None,
        handle,
        cursor,
        settings=SubscriptionSettings(page_size=3),
    )
    return subscription, cursor


async def test_the_catch_up_cursor_is_written_once_per_page_where_the_page_ended() -> None:
    """A catch-up of two full pages and a short one writes the cursor three times (not once
    per Task: a write per Task was a third of a catch-up's transactions), each time at the
    newest Task of the page taken in."""
    pages = [
        [_requested(f"t{n}", n, None) for n in (1, 2, 3)],
        [_requested(f"t{n}", n, None) for n in (4, 5, 6)],
        [_requested("t7", 7, None)],
    ]
    taken: list[str] = []

    async def handle(resource: dict[str, Any]) -> None:
        taken.append(str(resource["id"]))

    subscription, cursor = _catching_up(pages, handle)
    assert await asyncio.wait_for(subscription.catch_up(), 5) == 7
    assert sorted(taken) == [f"t{n}" for n in range(1, 8)]
    second = [dt.datetime(2026, 1, 1, 0, 0, n, tzinfo=dt.UTC) for n in (3, 6, 7)]
    assert cursor.saved == second


async def test_the_catch_up_cursor_stays_before_a_task_left_for_later() -> None:
    """A Task left for now (another replica claimed it moments ago) in the middle of a page:
    the cursor is written where the page stood before it, so the next catch-up brings it."""
    pages = [[_requested(f"t{n}", n, None) for n in (1, 2, 3)]]

    async def handle(resource: dict[str, Any]) -> None:
        if resource["id"] == "t2":
            raise ResourceDeferredError("claimed by another replica moments ago")

    subscription, cursor = _catching_up(pages, handle)
    assert await asyncio.wait_for(subscription.catch_up(), 5) == 2
    assert cursor.saved == [dt.datetime(2026, 1, 1, 0, 0, 1, tzinfo=dt.UTC)]


async def test_a_catch_up_stopped_mid_page_keeps_the_cursor_of_the_tasks_taken_in() -> None:
    """The second Task of a page stops the catch-up (the store was busy past the pool's
    timeout): the first was taken in, so the cursor stands after it, as it did when it was
    written per Task; the next catch-up starts there."""
    pages = [[_requested(f"t{n}", n, None) for n in (1, 2, 3)]]

    async def handle(resource: dict[str, Any]) -> None:
        if resource["id"] == "t2":
            raise StoreError("database busy: QueuePool limit reached", retryable=True)

    subscription, cursor = _catching_up(pages, handle)
    with pytest.raises(StoreError):
        await asyncio.wait_for(subscription.catch_up(), 5)
    assert cursor.saved == [dt.datetime(2026, 1, 1, 0, 0, 1, tzinfo=dt.UTC)]


async def test_a_cancelled_waiter_neither_breaks_its_predecessor_nor_blocks_its_key() -> None:
    """Two Tasks of one business key: the second, waiting for the first, is cancelled (a
    stopping bridge). The first ends normally and a third of the key still runs."""
    release = asyncio.Event()
    handled: list[str] = []

    async def handle(resource: dict[str, Any]) -> None:
        if resource["id"] == "first":
            await release.wait()
        handled.append(str(resource["id"]))

    subscription = TaskSubscription(
        _OnePage([]),  # type: ignore[arg-type]
        None,
        handle,
        MemoryCursor(),
    )
    first = await subscription._hand_off(_requested("first", 1, "bk"), report=False)
    second = await subscription._hand_off(_requested("second", 2, "bk"), report=False)
    await asyncio.sleep(0)
    second.cancel()
    third = await subscription._hand_off(_requested("third", 3, "bk"), report=False)
    release.set()
    assert await asyncio.wait_for(first, 5) is None
    assert await asyncio.wait_for(third, 5) is None
    assert handled == ["first", "third"]
    assert subscription._last_of == {}
