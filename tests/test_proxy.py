"""Which calls go through the forward proxy: the ``no_proxy`` rules, and the credentials."""

from __future__ import annotations

import pytest

from dsf_bridge.proxy import ForwardProxy

PROXY = "http://proxy.example.org:3128"


@pytest.mark.parametrize(
    ("entry", "target", "bypassed"),
    [
        ("localhost", "http://localhost:8080/v2", True),
        ("127.0.0.1", "http://127.0.0.1:8042/dicom-web", True),
        ("::1", "http://[::1]:8080", True),
        ("[::1]:8080", "http://[::1]:8080", True),
        ("[::1]:8080", "http://[::1]:9090", False),
        ("example.org", "https://dsf.example.org/fhir", True),
        (".example.org", "https://dsf.example.org/fhir", True),
        ("example.org", "https://example.org/fhir", True),
        ("example.org", "https://badexample.org/fhir", False),
        ("dsf.example.org:443", "https://dsf.example.org/fhir", True),
        ("dsf.example.org:8443", "https://dsf.example.org/fhir", False),
        ("DSF.Example.ORG", "wss://dsf.example.org/fhir/ws", True),
        ("*", "https://anything.example.net", True),
        ("other.org", "https://dsf.example.org/fhir", False),
    ],
)
def test_no_proxy_entries(entry: str, target: str, bypassed: bool) -> None:
    proxy = ForwardProxy(PROXY, no_proxy=(entry,))
    assert (proxy.route(target) is None) is bypassed


def test_without_no_proxy_everything_goes_through() -> None:
    proxy = ForwardProxy(PROXY)
    assert proxy.route("http://127.0.0.1:8080") is proxy


def test_credentials_stay_out_of_the_repr_and_are_quoted_in_the_url() -> None:
    proxy = ForwardProxy(PROXY, username="site a", password="p@ss:w/rd")
    assert "p@ss" not in repr(proxy)
    assert proxy.auth == ("site a", "p@ss:w/rd")
    assert proxy.url_with_credentials() == "http://site%20a:p%40ss%3Aw%2Frd@proxy.example.org:3128"
    assert ForwardProxy(PROXY).url_with_credentials() == PROXY
    assert ForwardProxy(PROXY).auth is None
