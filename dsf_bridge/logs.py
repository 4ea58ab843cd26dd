"""Logging: structlog over the standard library, JSON lines off a terminal, readable on one.

Every record carries the context bound for the current step (``process``,
``process_version``, ``instance_id``, ``business_key``, ``task_id``, ``element_id``) through
context variables, so a handler deep in a process plugin logs with the Task it serves without
passing it around. Events are named ``noun.past_verb``.

Logs must never carry payloads or patient data: :func:`redact_sensitive` replaces the values of
keys that typically hold them, as a last line of defence behind careful call sites. DICOM UIDs
(study, series, SOP instance) identify a patient's examination: a line that needs to correlate
one logs :func:`uid_digest` of it, never the UID, and :func:`redact_uids` replaces any UID left
in a record (a library's request line, an exception's message) by its digest.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, Literal, TextIO

import structlog

__all__ = [
    "CONTEXT_KEYS",
    "SENSITIVE_KEYS",
    "bound_context",
    "configure_logging",
    "redact_sensitive",
    "redact_uids",
    "step_log_context",
    "uid_digest",
    "without_uids",
]

SENSITIVE_KEYS = frozenset(
    {
        "payload",
        "resource",
        "body",
        "content",
        "patient",
        "patient_id",
        "patient_name",
        "name",
        "birth_date",
        "birthdate",
        "password",
        "token",
        "secret",
    }
)

CONTEXT_KEYS = (
    "process",
    "process_version",
    "instance_id",
    "business_key",
    "task_id",
    "element_id",
)
"""The context a step's records carry (:func:`bound_context`), in the order of the docs."""


# A DICOM UID as it names a study, series or instance: an OID of five components or more
# (an organization's root plus its suffixes), or a long one of fewer ("2.25." and a UUID as a
# number). The standard's own UIDs (transfer syntaxes, SOP classes: "1.2.840.10008.…") name no
# examination and stay readable; versions ("1.0.0.0") and IPv4 addresses are short.
# Components with leading zeros too: archives send such UIDs, and pydicom's warning about one
# quotes it. Letters or an underscore next to a UID do not protect it ("series_1.2.…_seg").
_OID = re.compile(r"(?<![0-9.])[0-2](?:\.[0-9]+){2,}(?![0-9])(?!\.[0-9])")
_STANDARD_UIDS = "1.2.840.10008."


def _digest_uid(match: re.Match[str]) -> str:
    oid = match.group()
    if oid.startswith(_STANDARD_UIDS) or (oid.count(".") < 4 and len(oid) < 16):
        return oid
    return "uid:" + uid_digest(oid)


def _digest_uids(text: str) -> str:
    return _OID.sub(_digest_uid, text)


def without_uids(text: str) -> str:
    """``text`` with each DICOM UID replaced by ``uid:`` and its :func:`uid_digest`, as the
    log records have them (for texts kept beyond the logs: the audit trail's reasons)."""
    return _digest_uids(text) if "." in text else text


def redact_uids(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Structlog processor: replace DICOM UIDs in string values (the event, a library's
    message, an error text, a formatted traceback, strings in lists and mappings) by ``uid:``
    and their :func:`uid_digest`."""
    for key, value in event_dict.items():
        if not key.startswith("_"):  # structlog's own (the stdlib record of a library line)
            event_dict[key] = _without_uids(value)
    return event_dict


def _without_uids(value: Any) -> Any:
    if isinstance(value, str):
        return _digest_uids(value) if "." in value else value
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_without_uids(item) for item in value]
    if isinstance(value, Mapping):
        return {_without_uids(key): _without_uids(item) for key, item in value.items()}
    # An exception, bytes, a URL or a path: the renderers would write its repr.
    return _without_uids(repr(value))


def redact_sensitive(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Structlog processor: mask the values of keys in :data:`SENSITIVE_KEYS`."""
    for key in event_dict.keys() & SENSITIVE_KEYS:
        event_dict[key] = "[redacted]"
    return event_dict


def configure_logging(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    """Route structlog and stdlib logging through one renderer writing to ``stream``."""
    out = stream if stream is not None else sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_sensitive,
        # The traceback as text before the UIDs go: an exception's message is a UID's way in.
        structlog.processors.format_exc_info,
        redact_uids,
    ]
    renderer: structlog.types.Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Python's warnings (pydicom's about an invalid value quote it) as records through the
    # processors above, not printed straight to standard error.
    logging.captureWarnings(True)
    # Alembic narrates its connection setup, httpx every request (with URLs that can carry
    # search parameters) and highdicom every module it copies into an SR at INFO; keep that for
    # debugging sessions only.
    for chatty in ("alembic", "httpx", "httpcore", "highdicom"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


@contextmanager
def bound_context(**values: str | None) -> Iterator[None]:
    """Bind step context (any of :data:`CONTEXT_KEYS`) for the records logged inside.

    Values that are ``None`` are left out (an outer binding stays); unknown keys are refused so
    that a typo does not silently split the log context.
    """
    unknown = set(values) - set(CONTEXT_KEYS)
    if unknown:
        raise ValueError(f"unknown log context keys: {sorted(unknown)}")
    present = {key: value for key, value in values.items() if value is not None}
    with structlog.contextvars.bound_contextvars(**present):
        yield


def step_log_context() -> dict[str, str]:
    """The step context bound now (to carry it past the block that bound it)."""
    bound = structlog.contextvars.get_contextvars()
    return {key: str(bound[key]) for key in CONTEXT_KEYS if bound.get(key) is not None}


def uid_digest(uid: str) -> str:
    """A short digest of a DICOM UID for log lines: the same UID always gives the same 12 hex
    characters (to follow one study across records and sites), and the UID cannot be read back
    from it; whoever knows the UID finds its records by searching the logs for its digest."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]
