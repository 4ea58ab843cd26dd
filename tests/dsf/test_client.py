"""The FHIR REST client against an in-memory fake server (``httpx.MockTransport``): retries,
their limits, OperationOutcome diagnostics in JSON and XML, paging, conditional requests."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from dsf_bridge.dsf.client import FhirClient, RetryPolicy, parse_outcome
from dsf_bridge.errors import RemoteError

BASE = "https://dsf.test/fhir"
POLICY = RetryPolicy(attempts=3, initial_delay=0.5, multiplier=2.0, max_delay=5, retry_after_cap=7)


class FakeServer:
    """Answers requests from a script and records them; created Tasks are kept."""

    def __init__(self, script: list[Callable[[httpx.Request], httpx.Response]]) -> None:
        self.script = script
        self.requests: list[httpx.Request] = []
        self.created: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script[min(len(self.requests), len(self.script)) - 1]
        return step(request)


def status(code: int, headers: dict[str, str] | None = None) -> Callable[[httpx.Request], Any]:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(code, headers=headers)

    return answer


def outcome(code: int, text: str) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        body = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
        }
        return httpx.Response(code, json=body, headers={"Content-Type": "application/fhir+json"})

    return answer


def client_for(server: FakeServer, sleeps: list[float]) -> FhirClient:
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    return FhirClient(BASE, transport=httpx.MockTransport(server), retry=POLICY, sleep=sleep)


TASK = {"resourceType": "Task", "status": "requested", "intent": "order"}


async def test_503_twice_then_201_creates_exactly_once() -> None:
    def created(request: httpx.Request) -> httpx.Response:
        resource = json.loads(request.content)
        server.created.append(resource)
        return httpx.Response(
            201,
            headers={"Location": f"{BASE}/Task/t1/_history/1", "ETag": 'W/"1"'},
        )

    server = FakeServer([status(503), status(503), created])
    sleeps: list[float] = []
    async with client_for(server, sleeps) as client:
        result = await client.create(TASK, return_minimal=True)
    assert len(server.created) == 1
    assert len(server.requests) == 3
    assert sleeps == [0.5, 1.0]
    assert result.status == 201
    assert result.id == "t1"
    assert result.version == 1
    assert result.resource is None
    assert server.requests[0].headers["prefer"] == "return=minimal"
    assert server.requests[0].headers["content-type"] == "application/fhir+json"
    assert server.requests[0].headers["accept"] == "application/fhir+json"


async def test_retries_are_bounded_and_the_error_is_retryable() -> None:
    server = FakeServer([outcome(503, "database down")])
    sleeps: list[float] = []
    async with client_for(server, sleeps) as client:
        with pytest.raises(RemoteError, match="HTTP 503: database down") as caught:
            await client.read("Task", "t1")
    assert len(server.requests) == POLICY.attempts
    assert caught.value.retryable is True
    assert caught.value.status == 503


@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 412, 422])
async def test_4xx_is_never_retried(code: int) -> None:
    server = FakeServer([outcome(code, "Task.requester missing")])
    sleeps: list[float] = []
    async with client_for(server, sleeps) as client:
        with pytest.raises(RemoteError) as caught:
            await client.create(TASK)
    assert len(server.requests) == 1
    assert sleeps == []
    assert caught.value.status == code
    assert caught.value.retryable is False
    assert f"POST {BASE}/Task failed with HTTP {code}: Task.requester missing" == str(caught.value)


async def test_429_honours_retry_after_within_the_cap() -> None:
    server = FakeServer(
        [status(429, {"Retry-After": "3"}), status(429, {"Retry-After": "120"}), outcome(200, "x")]
    )
    sleeps: list[float] = []
    async with client_for(server, sleeps) as client:
        await client.request("GET", "Task")
    assert sleeps == [3.0, 7.0]


async def test_xml_operation_outcome_is_surfaced() -> None:
    xml = b"""<?xml version="1.0" encoding="UTF-8"?>
<OperationOutcome xmlns="http://hl7.org/fhir">
  <issue><severity value="error"/><code value="forbidden"/>
    <diagnostics value="Forbidden: create of Task not allowed"/></issue>
  <issue><severity value="error"/><code value="x"/><details><text value="second"/></details>
  </issue>
</OperationOutcome>"""

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, content=xml, headers={"Content-Type": "application/fhir+xml"})

    server = FakeServer([answer])
    async with client_for(server, []) as client:
        with pytest.raises(RemoteError) as caught:
            await client.create(TASK)
    assert str(caught.value).endswith("HTTP 403: Forbidden: create of Task not allowed; second")


def test_xml_entities_are_never_resolved() -> None:
    external = b"""<?xml version="1.0"?>
<!DOCTYPE x [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<OperationOutcome xmlns="http://hl7.org/fhir"><issue>
<diagnostics value="&secret;"/></issue></OperationOutcome>"""
    internal = b"""<?xml version="1.0"?>
<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>
<OperationOutcome xmlns="http://hl7.org/fhir"><issue>
<diagnostics><extension url="x"/></diagnostics><details><text value="ok &b;"/></details>
</issue></OperationOutcome>"""
    assert "root:" not in parse_outcome(external, "application/fhir+xml")
    assert "aaaaaaaaaa" not in parse_outcome(internal, "application/fhir+xml")


def test_parse_outcome_ignores_non_outcomes() -> None:
    assert parse_outcome(b'{"resourceType": "Task"}', "application/fhir+json") == ""
    assert parse_outcome(b"<html>oops</html>", "text/html") == ""
    assert parse_outcome(b"not json", "application/json") == ""
    assert parse_outcome(b"", "application/json") == ""


async def test_connection_errors_are_retried_for_reads() -> None:
    calls: list[int] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) == 2:
            raise httpx.ReadError("reset", request=request)
        return httpx.Response(200, json={"resourceType": "Task", "id": "t1"})

    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async with FhirClient(
        BASE, transport=httpx.MockTransport(flaky), retry=POLICY, sleep=sleep
    ) as client:
        task = await client.read("Task", "t1")
    assert task["id"] == "t1"
    assert len(calls) == 3


async def test_plain_post_is_not_repeated_after_the_request_may_have_arrived() -> None:
    calls: list[int] = []

    def broken(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ReadError("reset after send", request=request)

    async with FhirClient(
        BASE, transport=httpx.MockTransport(broken), retry=POLICY, sleep=_no_sleep
    ) as client:
        with pytest.raises(RemoteError, match="connection failed") as caught:
            await client.create(TASK)
        assert len(calls) == 1
        assert caught.value.retryable is True
        # A conditional create is idempotent: repeating it cannot make a second Task.
        with pytest.raises(RemoteError):
            await client.create(TASK, if_none_exist="identifier=x|y")
    assert len(calls) == 1 + POLICY.attempts


async def test_connect_error_on_post_is_retried_because_nothing_was_sent() -> None:
    calls: list[int] = []

    def refused_once(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(201, headers={"Location": f"{BASE}/Task/t9/_history/1"})

    async with FhirClient(
        BASE, transport=httpx.MockTransport(refused_once), retry=POLICY, sleep=_no_sleep
    ) as client:
        result = await client.create(TASK, return_minimal=True)
    assert result.id == "t9"
    assert len(calls) == 2


async def test_search_follows_next_links() -> None:
    def page(request: httpx.Request) -> httpx.Response:
        number = int(request.url.params.get("_page", "1"))
        links = [{"relation": "self", "url": str(request.url)}]
        if number < 3:
            links.append(
                {"relation": "next", "url": f"{BASE}/Task?status=requested&_page={number + 1}"}
            )
        entries = [
            {
                "resource": {"resourceType": "Task", "id": f"t{number}-{i}"},
                "search": {"mode": "match"},
            }
            for i in range(2)
        ]
        entries.append(
            {"resource": {"resourceType": "Organization", "id": "o"}, "search": {"mode": "include"}}
        )
        bundle = {"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries}
        return httpx.Response(200, json=bundle)

    server = FakeServer([page])
    async with client_for(server, []) as client:
        tasks = await client.search("Task", {"status": "requested", "_count": "2"})
        with_includes = await client.search("Task", [("status", "requested")], include_mode=True)
    assert [t["id"] for t in tasks] == ["t1-0", "t1-1", "t2-0", "t2-1", "t3-0", "t3-1"]
    assert len(with_includes) == 9
    assert server.requests[0].url.params["_count"] == "2"
    assert server.requests[1].url.params["_page"] == "2"


async def test_paging_link_to_another_server_is_refused() -> None:
    def page(request: httpx.Request) -> httpx.Response:
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "next", "url": "https://evil.test/fhir/Task?_page=2"}],
            "entry": [],
        }
        return httpx.Response(200, json=bundle)

    server = FakeServer([page])
    async with client_for(server, []) as client:
        with pytest.raises(RemoteError, match="leaves the server"):
            await client.search("Task", {})
    assert len(server.requests) == 1


async def test_update_sends_if_match_and_conditional_create_if_none_exist() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        body["meta"] = {"versionId": "4"}
        return httpx.Response(200, json=body, headers={"ETag": 'W/"4"'})

    server = FakeServer([answer])
    async with client_for(server, []) as client:
        updated = await client.update({**TASK, "id": "t1"}, if_match=3)
        await client.update({**TASK, "id": "t1"}, if_match='W/"3"')
        existing = await client.create(TASK, if_none_exist="identifier=http://x|1")
    assert server.requests[0].method == "PUT"
    assert server.requests[0].url.path == "/fhir/Task/t1"
    assert server.requests[0].headers["if-match"] == 'W/"3"'
    assert server.requests[1].headers["if-match"] == 'W/"3"'
    assert updated.version == 4
    assert updated.id == "t1"
    assert server.requests[2].headers["if-none-exist"] == "identifier=http://x|1"
    assert server.requests[2].headers["prefer"] == "return=representation"
    assert existing.status == 200


async def test_bundle_posts_to_the_base_url() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "batch-response"})

    server = FakeServer([answer])
    async with client_for(server, []) as client:
        response = await client.bundle({"resourceType": "Bundle", "type": "batch", "entry": []})
        with pytest.raises(ValueError, match="batch or transaction"):
            await client.bundle({"resourceType": "Bundle", "type": "searchset"})
    assert response["type"] == "batch-response"
    assert str(server.requests[0].url) == BASE


async def _no_sleep(seconds: float) -> None:
    return None


async def test_retry_after_as_http_date() -> None:
    when = email.utils.format_datetime(
        dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30), usegmt=True
    )
    server = FakeServer([status(503, {"Retry-After": when}), outcome(200, "x")])
    sleeps: list[float] = []
    async with client_for(server, sleeps) as client:
        await client.request("GET", "Task")
    # 30 s wanted, capped at the policy's 7 s.
    assert sleeps == [7.0]


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(initial_delay=-1)
    assert [RetryPolicy(initial_delay=1, max_delay=3).delay(n) for n in (1, 2, 3)] == [1, 2, 3]


async def test_bare_401_explains_the_likely_cause() -> None:
    def html(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, text="<html><body>Unauthorized</body></html>")

    async with client_for(FakeServer([html]), []) as client:
        with pytest.raises(RemoteError, match="thumbprint in the allow list") as caught:
            await client.read("Task", "t1")
    assert caught.value.status == 401
    assert caught.value.retryable is False


@pytest.mark.parametrize("code", [500, 502, 504])
async def test_a_plain_post_that_may_have_been_processed_is_left_to_the_outbox(code: int) -> None:
    """500, 502 or 504 to a POST: the server (or the backend behind a proxy) may have created
    the Task. The client does not repeat it; the error is retryable for the runtime, whose
    outbox looks for the earlier delivery before it posts again. 503 and 429 say "not
    processed" and are repeated at once; a PUT is repeated whatever the 5xx."""
    server = FakeServer([status(code), status(201)])
    sleeps: list[float] = []
    async with client_for(server, sleeps) as client:
        with pytest.raises(RemoteError) as caught:
            await client.create(TASK, return_minimal=True)
        assert len(server.requests) == 1
        assert caught.value.retryable is True
        assert caught.value.status == code

        repeated = FakeServer([status(code), status(200)])
    async with client_for(repeated, sleeps) as client:
        await client.update({**TASK, "id": "t1"})
    assert len(repeated.requests) == 2


async def test_a_batch_of_conditional_creates_is_repeated_a_plain_post_in_one_is_not() -> None:
    """The plugin resources published at start-up go as a batch of conditional creates:
    repeating it is harmless, so a 502 from a proxy while the server starts is tried again.
    A batch with a plain POST may have created something and is left to the caller."""
    conditional = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": {"resourceType": "ActivityDefinition"},
                "request": {"method": "POST", "url": "ActivityDefinition", "ifNoneExist": "url=x"},
            },
            {
                "resource": {"resourceType": "CodeSystem"},
                "request": {"method": "PUT", "url": "CodeSystem?url=y"},
            },
        ],
    }
    answered = {"resourceType": "Bundle", "type": "batch-response", "entry": []}
    server = FakeServer([status(502), lambda request: httpx.Response(200, json=answered)])
    sleeps: list[float] = []
    async with client_for(server, sleeps) as client:
        assert (await client.bundle(conditional))["type"] == "batch-response"
    assert len(server.requests) == 2

    plain = {
        **conditional,
        "entry": [{"resource": TASK, "request": {"method": "POST", "url": "Task"}}],
    }
    refused = FakeServer([status(502), lambda request: httpx.Response(200, json=answered)])
    async with client_for(refused, sleeps) as client:
        with pytest.raises(RemoteError):
            await client.bundle(plain)
    assert len(refused.requests) == 1


def test_a_cap_below_the_back_off_never_shortens_it() -> None:
    policy = RetryPolicy(attempts=3, initial_delay=2.0, retry_after_cap=0.0)
    assert policy.delay_for_answer(1, "30") == 2.0
    assert policy.delay_for_answer(1, None) == 2.0
    assert RetryPolicy(initial_delay=1.0, retry_after_cap=10).delay_for_answer(1, "30") == 10.0
