"""The DSF FHIR client and its websocket through the site's forward proxy (``[proxy]``): mutual
TLS end to end inside a CONNECT tunnel, credentials, hosts that bypass it, and no proxy from
the environment."""

from __future__ import annotations

import pytest

from dsf_bridge.config import DsfSettings
from dsf_bridge.dsf.client import FhirClient
from dsf_bridge.dsf.connection import check_connection
from dsf_bridge.dsf.organization import find_local_organization
from dsf_bridge.errors import RemoteError
from dsf_bridge.proxy import ForwardProxy
from tests.forward_proxy import ForwardProxyServer, ProxiedRequest
from tests.sandbox.harness import FAST_RETRY, LOCAL, Sandbox


def _authority(base_url: str) -> str:
    return base_url.split("://", 1)[1].split("/", 1)[0]


async def test_requests_go_through_a_connect_tunnel_with_mutual_tls(sandbox: Sandbox) -> None:
    async with (
        ForwardProxyServer() as proxy,
        FhirClient(
            sandbox.base_url,
            ssl_context=sandbox.context(LOCAL),
            retry=FAST_RETRY,
            proxy=ForwardProxy(proxy.url),
        ) as client,
    ):
        # The sandbox answers only a client certificate it knows: TLS ran end to end.
        organization = await find_local_organization(client, sandbox.base_url)
    assert organization.identifier == LOCAL
    assert proxy.seen
    assert set(proxy.seen) == {ProxiedRequest("CONNECT", _authority(sandbox.base_url), None)}


async def test_proxy_credentials_are_sent_and_a_refusal_is_an_error(sandbox: Sandbox) -> None:
    async with ForwardProxyServer(credentials=("bridge", "pä ss:w")) as proxy:
        good = ForwardProxy(proxy.url, username="bridge", password="pä ss:w")
        async with FhirClient(
            sandbox.base_url, ssl_context=sandbox.context(LOCAL), retry=FAST_RETRY, proxy=good
        ) as client:
            await client.search("Endpoint", {"status": "active"})
        assert proxy.seen[0].authorization is not None
        assert proxy.seen[0].authorization.startswith("Basic ")

        wrong = ForwardProxy(proxy.url, username="bridge", password="guess")
        async with FhirClient(
            sandbox.base_url, ssl_context=sandbox.context(LOCAL), retry=FAST_RETRY, proxy=wrong
        ) as client:
            with pytest.raises(RemoteError):
                await client.search("Endpoint", {"status": "active"})


async def test_a_host_in_no_proxy_is_reached_directly(sandbox: Sandbox) -> None:
    async with ForwardProxyServer() as proxy:
        bypassed = ForwardProxy(proxy.url, no_proxy=("localhost", "127.0.0.1"))
        async with FhirClient(
            sandbox.base_url, ssl_context=sandbox.context(LOCAL), retry=FAST_RETRY, proxy=bypassed
        ) as client:
            assert client.proxy is None
            await client.search("Endpoint", {"status": "active"})
    assert proxy.seen == []


async def test_the_proxy_environment_is_not_read(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ForwardProxyServer() as proxy:
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        async with FhirClient(
            sandbox.base_url, ssl_context=sandbox.context(LOCAL), retry=FAST_RETRY
        ) as client:
            await client.search("Endpoint", {"status": "active"})
        settings = _dsf_settings(sandbox)
        steps = [step async for step in check_connection(settings)]
    assert all(step.ok for step in steps), steps
    assert proxy.seen == []


def _dsf_settings(sandbox: Sandbox) -> DsfSettings:
    site = sandbox.sites[LOCAL]
    return DsfSettings(
        fhir_base_url=sandbox.base_url,
        client_certificate=site.client_certificate,
        client_key=site.client_key,
        ca_certificates=[site.ca],
    )


async def test_every_check_passes_through_the_proxy(sandbox: Sandbox) -> None:
    async with ForwardProxyServer() as proxy:
        proxied = ForwardProxy(proxy.url)
        steps = [step async for step in check_connection(_dsf_settings(sandbox), proxy=proxied)]
    assert [step.name for step in steps if not step.ok] == []
    assert steps[-1].name == "Subscription QuestionnaireResponse?status=completed"
    assert {request.method for request in proxy.seen} == {"CONNECT"}


async def test_the_websocket_goes_through_the_proxy_too(sandbox: Sandbox) -> None:
    async with ForwardProxyServer() as proxy:
        steps = []
        async for step in check_connection(_dsf_settings(sandbox), proxy=ForwardProxy(proxy.url)):
            steps.append(step)
            if step.name.startswith("Subscription Task"):
                # REST is done on a kept-alive tunnel; from here on the proxy refuses new ones:
                # a websocket that went around it would still bind.
                proxy.refuse = True
    by_name = {step.name: step for step in steps}
    assert by_name["TLS configuration"].ok
    assert f"through the proxy {proxy.url}" in by_name["TLS configuration"].detail
    assert by_name["local organization"].ok
    assert not by_name["websocket"].ok
    assert "403" in by_name["websocket"].detail
    assert proxy.seen[-1] == ProxiedRequest("CONNECT", _authority(sandbox.base_url), None)
