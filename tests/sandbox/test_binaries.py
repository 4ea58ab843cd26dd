"""The HTTP rules of ``sandbox/binaries.py`` on their own: DSF 2.x's byte ranges, which
``Accept`` asks for the resource and which is compatible with the content, and the content
store's files."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from dsf_bridge.sandbox.binaries import (
    BinaryContentStore,
    ByteRange,
    InvalidBase64Error,
    accepts,
    fhir_media_type_requested,
)


@pytest.mark.parametrize(
    ("header", "size", "span"),
    [
        (None, 10, (0, 10)),
        ("bytes=0-1", 10, (0, 2)),
        ("bytes=4-", 10, (4, 6)),
        ("bytes=-2", 10, (8, 2)),
        ("bytes=9-", 10, (9, 1)),
        # RangeRequestImpl's own edges: end must be above start and inside the content.
        ("bytes=0-0", 10, None),
        ("bytes=3-10", 10, None),
        ("bytes=10-", 10, None),
        ("bytes=-10", 10, None),
        # What the pattern does not match is no range at all: the whole content.
        ("bytes=1-2,4-5", 10, (0, 10)),
        ("items=0-1", 10, (0, 10)),
    ],
)
def test_byte_ranges_as_dsf_2(header: str | None, size: int, span: tuple[int, int] | None) -> None:
    assert ByteRange.parse(header).span(size) == span


@pytest.mark.parametrize(
    ("accept", "fhir"),
    [
        ("application/fhir+json", True),
        ("application/json+fhir", True),
        ("application/fhir+xml", True),
        ("application/fhir+json;charset=utf-8", False),  # DSF compares the whole media type
        ("application/json", False),
        ("*/*", False),
        ("", False),
        ("text/plain, application/fhir+json;q=0.5", False),
        ("text/plain;q=0.1, application/fhir+json", True),  # highest quality first
    ],
)
def test_which_accept_asks_for_the_resource(accept: str, fhir: bool) -> None:
    assert fhir_media_type_requested(accept, None) is fhir


@pytest.mark.parametrize(
    ("accept", "fhir"),
    [
        ("*/*, application/fhir+json", True),
        ("application/*, application/fhir+json", True),
        ("text/*, application/fhir+json", True),
        ("application/fhir+json;q=1.0", False),
        ("application/fhir+json;q=0.9, */*;q=0.8", False),
        ("application/fhir+json, text/plain;q=1", True),
    ],
)
def test_the_first_accept_type_is_the_one_jersey_sorts_first(accept: str, fhir: bool) -> None:
    """DSF 2.1 ``BinaryServiceJaxrs.getValidFhirMediaType`` (lines 385-390) takes the first of
    Jersey's ``getAcceptableMediaTypes``: sorted by quality, then more specific before
    wildcards (``AcceptableMediaType.COMPARATOR``: ``Quality.QUALIFIED_COMPARATOR``, then
    ``MediaTypes.PARTIAL_ORDER_COMPARATOR``), and compares its ``toString()``, which keeps an
    explicit ``q`` (``Quality.enhanceWithQualityParameter`` leaves it among the parameters).
    The sandbox kept the header's order among equal qualities and dropped ``q``."""
    assert fhir_media_type_requested(accept, None) is fhir


def test_format_asks_for_the_resource_whatever_accept_says() -> None:
    assert fhir_media_type_requested("application/octet-stream", "json")


@pytest.mark.parametrize(
    ("accept", "content_type", "compatible"),
    [
        ("application/zip", "application/zip", True),
        ("application/*", "application/zip", True),
        ("*/*", "application/zip", True),
        ("", "application/zip", True),
        ("application/octet-stream", "application/zip", False),
        ("text/plain, application/zip;q=0.1", "application/zip", True),
        ("text/plain", "text/plain;charset=utf-8", True),
    ],
)
def test_accept_compatible_with_the_content(
    accept: str, content_type: str, compatible: bool
) -> None:
    assert accepts(accept, content_type) is compatible


def test_content_store_keeps_versions_in_files(tmp_path: Path) -> None:
    store = BinaryContentStore(tmp_path / "binaries")
    staged = store.stage_base64(base64.b64encode(b"version one").decode())
    store.commit(staged, "abc", "1")
    store.commit(None, "abc", "2")
    first, second = store.get("abc", "1"), store.get("abc", "2")
    assert first is not None and first.path.read_bytes() == b"version one"
    assert second is not None and second.size == 0
    assert not staged.path.exists()
    store.purge("abc")
    assert store.get("abc", "1") is None and store.get("abc", "2") is None


def test_content_store_refuses_what_is_no_base64_or_no_id(tmp_path: Path) -> None:
    store = BinaryContentStore(tmp_path)
    with pytest.raises(InvalidBase64Error):
        store.stage_base64("not base64!")
    with pytest.raises(ValueError, match="not a FHIR id"):
        store.get("../etc", "1")


async def test_base64_chunks_concatenate_to_the_encoding_of_the_whole(tmp_path: Path) -> None:
    store = BinaryContentStore(tmp_path)
    data = bytes(range(256)) * 1000 + b"odd"
    store.commit(store.stage_base64(base64.b64encode(data).decode()), "x", "1")
    content = store.get("x", "1")
    assert content is not None
    encoded = b"".join([chunk async for chunk in content.base64_chunks()])
    assert base64.b64decode(encoded) == data
    assert b"".join([c async for c in content.chunks(5, 7)]) == data[5:12]
