"""Logging: structlog over the standard library, JSON lines off a terminal, readable on one.

Every record carries the context bound for the current step (``task_id``, ``instance_id``,
``business_key``, ``process``) through context variables, so a handler deep in a process plugin
logs with the Task it serves without passing it around. Events are named ``noun.past_verb``.

Logs must never carry payloads or patient data: :func:`redact_sensitive` replaces the values of
keys that typically hold them, as a last line of defence behind careful call sites.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, Literal, TextIO

import structlog

__all__ = ["SENSITIVE_KEYS", "bound_context", "configure_logging", "redact_sensitive"]

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

_CONTEXT_KEYS = ("task_id", "instance_id", "business_key", "process")


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
    ]
    renderer: structlog.types.Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
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
    # Alembic narrates its connection setup and httpx every request at INFO (with URLs that can
    # carry search parameters); keep that for debugging sessions only.
    for chatty in ("alembic", "httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


@contextmanager
def bound_context(**values: str | None) -> Iterator[None]:
    """Bind process context (``task_id``, ``instance_id``, ``business_key``, ``process``).

    Values that are ``None`` are left out; unknown keys are refused so that a typo does not
    silently split the log context.
    """
    unknown = set(values) - set(_CONTEXT_KEYS)
    if unknown:
        raise ValueError(f"unknown log context keys: {sorted(unknown)}")
    present = {key: value for key, value in values.items() if value is not None}
    with structlog.contextvars.bound_contextvars(**present):
        yield
