"""Hostile models are refused quickly with a clear error naming the file (and line)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dsf_bridge.engine import (
    UnsafeXmlError,
    UnsupportedElementError,
    parse_bpmn,
    parse_bpmn_file,
)
from dsf_bridge.engine.safexml import parse_xml

_BODY = (
    '<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL" id="d">'
    '<bpmn:process id="a_b" isExecutable="true"><bpmn:startEvent id="s"/></bpmn:process>'
    "</bpmn:definitions>"
)

XXE = (
    '<?xml version="1.0"?>\n<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
    + _BODY.replace('id="d">', 'id="d">&xxe;')
)
BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + "".join(
        f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n'
        for i in range(1, 10)
    )
    + "]>\n"
    + _BODY.replace('id="d">', 'id="d">&lol9;')
)
EXTERNAL_DTD = (
    '<?xml version="1.0"?>\n<!DOCTYPE definitions SYSTEM "http://127.0.0.1:9/evil.dtd">\n' + _BODY
)


def _assert_quick(start: float) -> None:
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("document", "line"),
    [(XXE, 2), (BILLION_LAUGHS, 2), (EXTERNAL_DTD, 2)],
    ids=["xxe", "billion-laughs", "external-dtd"],
)
def test_doctype_based_attacks_are_refused(document: str, line: int) -> None:
    start = time.perf_counter()
    with pytest.raises(UnsafeXmlError, match="DOCTYPE") as caught:
        parse_bpmn(document.encode(), "evil.bpmn")
    _assert_quick(start)
    assert caught.value.source == "evil.bpmn"
    assert caught.value.line == line
    assert str(caught.value).startswith(f"evil.bpmn:{line}: ")


def test_doctype_hidden_behind_a_long_comment_is_refused() -> None:
    padded = BILLION_LAUGHS.replace("\n<!DOCTYPE", "\n<!--" + "x" * 10_000 + "-->\n<!DOCTYPE", 1)
    start = time.perf_counter()
    with pytest.raises(UnsafeXmlError, match="not allowed"):
        parse_bpmn(padded.encode(), "padded.bpmn")
    _assert_quick(start)


def test_utf16_doctype_is_refused() -> None:
    data = XXE.replace('version="1.0"', 'version="1.0" encoding="UTF-16"').encode("utf-16")
    with pytest.raises(UnsafeXmlError, match="DOCTYPE"):
        parse_xml(data, "utf16.xml")


def test_file_of_50_mb_is_refused_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "big.bpmn"
    with big.open("wb") as handle:
        handle.write(_BODY.encode())
        handle.truncate(50 * 1024 * 1024)
    start = time.perf_counter()
    with pytest.raises(UnsafeXmlError, match="larger than the limit") as caught:
        parse_bpmn_file(big)
    _assert_quick(start)
    assert caught.value.source == str(big)


def test_50_mb_in_memory_is_refused_quickly() -> None:
    data = _BODY.encode() + b" " * (50 * 1024 * 1024)
    start = time.perf_counter()
    with pytest.raises(UnsafeXmlError, match="larger than the limit"):
        parse_bpmn(data, "big.bpmn")
    _assert_quick(start)


def test_malformed_xml_names_file_and_line() -> None:
    broken = _BODY.replace("</bpmn:process>", "</bpmn:proces>").replace("><", ">\n<")
    with pytest.raises(UnsafeXmlError, match=r"^broken\.bpmn:4: malformed XML") as caught:
        parse_bpmn(broken.encode(), "broken.bpmn")
    assert caught.value.line == 4


def test_entities_are_never_expanded_in_text() -> None:
    # A predefined entity is fine; it is part of XML itself, not of a DTD.
    root = parse_xml(b"<a>&amp;</a>", "ok.xml")
    assert root.text == "&"


def test_elements_from_unknown_namespaces_are_refused_quickly() -> None:
    hostile = _BODY.replace(
        '<bpmn:startEvent id="s"/>',
        '<bpmn:startEvent id="s"/><x:exec xmlns:x="urn:evil" id="run">rm -rf /</x:exec>',
    )
    start = time.perf_counter()
    with pytest.raises(UnsupportedElementError, match="unknown element in a process"):
        parse_bpmn(hostile.encode(), "ns.bpmn")
    _assert_quick(start)
