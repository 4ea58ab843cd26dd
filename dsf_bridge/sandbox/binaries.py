"""Binary content of the sandbox, kept in files and never whole in memory, and the HTTP rules
DSF's ``BinaryServiceJaxrs`` applies to it: which ``Accept`` gets the raw bytes and which the
FHIR resource, and byte ranges (DSF 2.x).

DSF stores a Binary's data apart from its JSON (a PostgreSQL large object since 2.0) and streams
it out (``DeferredBase64BinaryType``); the sandbox keeps the JSON resource without ``data`` in its
resource store and the bytes of every version in a file ``<id>.<version>`` here, so an upload of
hundreds of megabytes neither lands in memory on the way in nor on the way out.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FHIR_MEDIA_TYPES",
    "BinaryContent",
    "BinaryContentStore",
    "ByteRange",
    "InvalidBase64Error",
    "accepts",
    "fhir_media_type_requested",
    "format_supported",
]

CHUNK = 64 * 1024
# DSF's BinaryServiceJaxrs.FHIR_MEDIA_TYPES: only these, as the first Accept type, ask for the
# Binary resource instead of its content.
FHIR_MEDIA_TYPES = frozenset(
    {
        "application/fhir+xml",
        "application/fhir+json",
        "application/xml+fhir",
        "application/json+fhir",
    }
)


class InvalidBase64Error(ValueError):
    """A Binary resource whose ``data`` is not base64 (HAPI refuses to parse it)."""


@dataclass(frozen=True)
class BinaryContent:
    """The bytes of one Binary version: a file and its size."""

    path: Path
    size: int

    async def chunks(self, start: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """The content from ``start``, ``length`` bytes (None: to the end), in chunks."""
        remaining = self.size - start if length is None else length
        with self.path.open("rb") as file:
            file.seek(start)
            while remaining > 0:
                chunk = file.read(min(CHUNK, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    async def base64_chunks(self) -> AsyncIterator[bytes]:
        """The content base64-encoded, in chunks (a multiple of 3 bytes each, so the pieces
        concatenate to the encoding of the whole)."""
        with self.path.open("rb") as file:
            while chunk := file.read(CHUNK * 3):
                yield base64.b64encode(chunk)

    def base64(self) -> str:
        """The whole content base64-encoded: for Binaries inside Bundles only."""
        return base64.b64encode(self.path.read_bytes()).decode("ascii")


class BinaryContentStore:
    """Binary content per resource id and version, in files under ``directory`` (None: a
    temporary directory, made at the first Binary and removed with this object)."""

    def __init__(self, directory: Path | None = None) -> None:
        self._directory = directory

    @property
    def directory(self) -> Path:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="dsf-bridge-sandbox-binaries-"))
            # Most sandboxes are never closed explicitly (tests build hundreds); the directory
            # goes when the store does.
            weakref.finalize(self, shutil.rmtree, self._directory, ignore_errors=True)
        self._directory.mkdir(parents=True, exist_ok=True)
        return self._directory

    def _staging_path(self) -> Path:
        descriptor, name = tempfile.mkstemp(dir=self.directory, prefix="upload-", suffix=".part")
        os.close(descriptor)
        return Path(name)

    async def receive(self, body: AsyncIterable[bytes]) -> BinaryContent:
        """Write a request body to a staging file as it arrives."""
        path = self._staging_path()
        size = 0
        try:
            with path.open("wb") as file:
                async for chunk in body:
                    file.write(chunk)
                    size += len(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return BinaryContent(path, size)

    def stage_base64(self, data: str) -> BinaryContent:
        """A Binary resource's ``data`` decoded into a staging file."""
        try:
            decoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidBase64Error(f"Binary.data is not base64: {exc}") from exc
        path = self._staging_path()
        path.write_bytes(decoded)
        return BinaryContent(path, len(decoded))

    def commit(self, staged: BinaryContent | None, resource_id: str, version: str) -> None:
        """Make staged content that of a stored version (none: an empty Binary)."""
        target = self._path(resource_id, version)
        if staged is None:
            target.write_bytes(b"")
        else:
            staged.path.replace(target)

    def discard(self, staged: BinaryContent | None) -> None:
        """Drop staged content the request did not store (refused, or an existing match)."""
        if staged is not None:
            staged.path.unlink(missing_ok=True)

    def get(self, resource_id: str, version: str) -> BinaryContent | None:
        path = self._path(resource_id, version)
        try:
            return BinaryContent(path, path.stat().st_size)
        except FileNotFoundError:
            return None

    def purge(self, resource_id: str) -> None:
        """Every version's content (DSF's ``$permanent-delete``)."""
        for path in self.directory.glob(f"{_safe(resource_id)}.*"):
            path.unlink(missing_ok=True)

    def _path(self, resource_id: str, version: str) -> Path:
        return self.directory / f"{_safe(resource_id)}.{_safe(version)}"


def _safe(text: str) -> str:
    # Ids come from the store (uuids), versions are numbers; refuse anything that could leave
    # the directory all the same.
    if not re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", text) or text in (".", ".."):
        raise ValueError(f"not a FHIR id: {text!r}")
    return text


def _media_types(accept: str) -> list[tuple[str, dict[str, str]]]:
    """``Accept`` as (type/subtype, parameters), in the order of Jersey's
    ``getAcceptableMediaTypes`` (``AcceptableMediaType.COMPARATOR``): highest quality first,
    then concrete types before ``type/*`` before ``*/*``, then as sent; an absent header is
    ``*/*``. An explicit ``q`` stays among the parameters, as Jersey keeps it
    (``Quality.enhanceWithQualityParameter``), so ``application/fhir+json;q=1.0`` is not
    DSF's FHIR media type."""
    entries: list[tuple[float, int, int, str, dict[str, str]]] = []
    for index, part in enumerate(p for p in accept.split(",") if p.strip()):
        name, *raw_parameters = (s.strip() for s in part.split(";"))
        parameters: dict[str, str] = {}
        quality = 1.0
        for raw in raw_parameters:
            key, _, value = raw.partition("=")
            if key.strip().lower() == "q":
                with contextlib.suppress(ValueError):
                    quality = float(value)
            if key.strip():
                parameters[key.strip().lower()] = value.strip().strip('"')
        main, _, sub = name.lower().partition("/")
        rank = (main == "*") << 1 | (sub == "*")
        entries.append((-quality, rank, index, name.lower(), parameters))
    if not entries:
        return [("*/*", {})]
    return [(name, parameters) for *_, name, parameters in sorted(entries, key=lambda e: e[:3])]


def fhir_media_type_requested(accept: str, format_parameter: str | None) -> bool:
    """Whether a read asks for the Binary resource (DSF's ``getValidFhirMediaType``): a
    ``_format`` parameter, or a first ``Accept`` type that is exactly a FHIR media type (with
    parameters, say ``charset``, it is not: DSF compares the whole media type)."""
    if format_parameter is not None:
        return True
    name, parameters = _media_types(accept)[0]
    return name in FHIR_MEDIA_TYPES and not parameters


# ParameterConverter.getMediaTypeIfSupported (2.1 and 1.9): the _format values DSF knows; 2.x
# adds "inline".
_FORMATS = frozenset(FHIR_MEDIA_TYPES | {"application/json", "application/xml", "text/xml"}) | {
    "text/html",
    "xml",
    "json",
    "html",
}
# ParameterConverter.getMediaType: an Accept header containing none of these has no FHIR format.
_ACCEPT_FORMATS = ("text/html", *sorted(FHIR_MEDIA_TYPES), "application/json", "application/xml")
_ACCEPT_FORMATS += ("text/xml", "*/*")


def format_supported(format_parameter: str, accept: str, *, inline: bool) -> bool:
    """Whether DSF's ``getMediaTypeThrowIfNotSupported`` accepts a Binary read's ``_format``
    (else it answers 415): a known format, or, when ``_format`` is blank, an ``Accept`` header
    naming a FHIR or HTML media type or ``*/*`` (an absent one counts as ``*/*``). ``inline``:
    DSF 2.x also knows ``_format=inline``."""
    if format_parameter.strip():
        return format_parameter in _FORMATS or (inline and format_parameter == "inline")
    return not accept.strip() or any(media_type in accept for media_type in _ACCEPT_FORMATS)


def accepts(accept: str, content_type: str) -> bool:
    """DSF's ``mediaTypeMatches``: some ``Accept`` type is compatible with the content type
    (wildcards match)."""
    essence = content_type.split(";", maxsplit=1)[0].strip().lower()
    wanted_type, _, wanted_subtype = essence.partition("/")
    for name, _ in _media_types(accept):
        main, _, sub = name.partition("/")
        if main in ("*", wanted_type) and sub in ("*", wanted_subtype, ""):
            return True
    return False


_RANGE = re.compile(r"bytes=(?:(?P<start>\d+)-(?P<end>\d+)|(?P<prefix>\d+)-|(?P<suffix>-\d+))")


@dataclass(frozen=True)
class ByteRange:
    """DSF 2.x's ``RangeRequestImpl``: ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n``; a header it
    cannot read is no range at all (the whole content, 200). Unlike RFC 9110, ``a-b`` needs
    ``b > a`` (``bytes=0-0`` is not satisfiable) and an end beyond the content is too."""

    start: int | None
    end: int | None  # inclusive; negative for a suffix (-n: the last n bytes)

    @classmethod
    def parse(cls, header: str | None) -> ByteRange:
        match = _RANGE.fullmatch(header.strip()) if header else None
        if match is None:
            return cls(None, None)
        if match["start"] is not None:
            return cls(int(match["start"]), int(match["end"]))
        if match["prefix"] is not None:
            return cls(int(match["prefix"]), None)
        return cls(None, int(match["suffix"]))

    @property
    def defined(self) -> bool:
        return self.start is not None or self.end is not None

    def span(self, size: int) -> tuple[int, int] | None:
        """(start, length) of a satisfiable range, None for an unsatisfiable one."""
        if not self.defined:
            return 0, size
        if self.start is not None and 0 <= self.start < size:
            if self.end is None:
                return self.start, size - self.start
            if self.start < self.end < size:
                return self.start, self.end + 1 - self.start
            return None
        if self.start is None and self.end is not None and self.end < 0 and -self.end < size:
            return size + self.end, -self.end
        return None
