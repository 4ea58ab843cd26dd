"""dsf_bridge.plugins.transfer: what a malicious peer could make a site fetch or keep."""

from __future__ import annotations

import httpx
import pytest

from dsf_bridge.plugins.transfer import TransferError, check_package_url

SERVER = "https://dsf.hospital-a.example/fhir"


@pytest.mark.parametrize(
    "url",
    [
        f"{SERVER}/Binary/..",  # httpx removes the dot segment: GET /fhir
        f"{SERVER}/Binary/.",
        f"{SERVER}/Binary/../../../admin",
        f"{SERVER}/Binary/x/../..",  # four segments, but no _history: GET /fhir
        f"{SERVER}/Binary/x/anything/1",
        f"{SERVER}/Binary/x/_history/..",
        f"{SERVER}/Binary/a%2F..%2F..%2FTask",
        f"{SERVER}/Binary/%2e%2e",
        f"{SERVER}/Binary/x;jsessionid=1",
        f"{SERVER}/Binary/" + "a" * 65,
    ],
)
def test_a_package_url_is_exactly_a_binary_on_the_senders_server(url: str) -> None:
    with pytest.raises(TransferError):
        check_package_url(url, SERVER)


def test_a_dot_segment_would_leave_the_binary_endpoint() -> None:
    """Why dot segments matter: the client normalizes them away before it sends."""
    assert httpx.URL(f"{SERVER}/Binary/x/../..").path == "/fhir"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            f"{SERVER}/Binary/4f0c1f5e-1111-4222-8333-944445555666",
            "4f0c1f5e-1111-4222-8333-944445555666",
        ),
        (f"{SERVER}/Binary/abc.1-2/_history/3", "abc.1-2"),
    ],
)
def test_a_binary_url_is_accepted(url: str, expected: str) -> None:
    assert check_package_url(url, SERVER) == expected
