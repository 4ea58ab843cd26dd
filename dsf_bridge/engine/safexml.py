"""Safe XML reading for process models and plugin resources.

Models come from plugin authors and, through ``plugins check``, from anywhere. So: no DTDs, no
entity expansion, no network, no huge trees, a size cap checked before a byte is parsed, and a
document type declaration of any kind is refused outright (XXE, billion laughs and external DTDs
all need one). Errors name the file and line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lxml import etree

from dsf_bridge.engine.exceptions import UnsafeXmlError

__all__ = ["MAX_XML_BYTES", "parse_xml", "read_xml_file"]

MAX_XML_BYTES = 10 * 1024 * 1024
"""The largest model or resource we read. The biggest real DSF BPMN file is about 70 KB."""


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_blank_text=False,
    )


def parse_xml(data: bytes, source: str, *, max_bytes: int = MAX_XML_BYTES) -> etree._Element:
    """Parse ``data`` safely and return the root element; ``source`` names it in errors."""
    if len(data) > max_bytes:
        raise UnsafeXmlError(
            f"file is {len(data)} bytes, larger than the limit of {max_bytes} bytes", source=source
        )
    # The whole document is scanned (a comment can push a DOCTYPE far down); the docinfo check
    # below catches encodings such as UTF-16 that hide it from a byte scan.
    found = max(data.find(b"<!DOCTYPE"), data.find(b"<!ENTITY"))
    if found >= 0:
        first = min(i for i in (data.find(b"<!DOCTYPE"), data.find(b"<!ENTITY")) if i >= 0)
        declaration_line = data[:first].count(b"\n") + 1
        raise UnsafeXmlError(
            "document type declarations (DOCTYPE/ENTITY) are not allowed",
            source=source,
            line=declaration_line,
        )
    try:
        root = etree.fromstring(data, parser=_parser())
    except etree.XMLSyntaxError as exc:
        lineno: object = exc.lineno
        line = lineno if isinstance(lineno, int) and lineno > 0 else None
        raise UnsafeXmlError(f"malformed XML: {exc.msg}", source=source, line=line) from exc
    docinfo: Any = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise UnsafeXmlError(
            "document type declarations (DOCTYPE/ENTITY) are not allowed", source=source, line=1
        )
    return root


def read_xml_file(path: Path, *, max_bytes: int = MAX_XML_BYTES) -> etree._Element:
    """Read and parse ``path`` safely; the size is checked before the file is read."""
    size = os.stat(path).st_size
    if size > max_bytes:
        raise UnsafeXmlError(
            f"file is {size} bytes, larger than the limit of {max_bytes} bytes", source=str(path)
        )
    return parse_xml(path.read_bytes(), str(path), max_bytes=max_bytes)
