"""The exception tree of dsf-bridge.

Every error the bridge raises on purpose derives from :class:`BridgeError`. Adapters translate
library errors at the boundary (``raise ... from exc``) and say whether trying again could help;
only the runtime decides to retry or to fail a Task::

    BridgeError
    ├── ConfigError              bad or unknown configuration; start-up stops, naming the field
    ├── StoreError               the SQL store failed (retryable: connection lost, serialization)
    │   ├── ConcurrencyError     optimistic locking lost: someone else changed the row first
    │   └── MigrationError       the schema is missing, behind, or a revision is unknown
    ├── AuditChainError          the audit trail's hash chain is broken (names the first bad event)
    ├── ProcessModelError        a BPMN model or plugin resource is malformed or unsupported
    ├── ProcessExecutionError    a running instance cannot continue (correlation, handler failure)
    └── RemoteError              a remote peer (DSF FHIR, DICOMweb, inference server) failed
        └── BinaryTooLargeError  a Binary exceeds the caller's size limit (dsf/client.py)

``retryable`` is a property of the error instance, never of its class alone: a ``RemoteError``
for HTTP 503 is retryable, one for HTTP 403 is not.
"""

from __future__ import annotations

__all__ = [
    "AuditChainError",
    "BridgeError",
    "ConcurrencyError",
    "ConfigError",
    "MigrationError",
    "ProcessExecutionError",
    "ProcessModelError",
    "RemoteError",
    "StoreError",
]


class BridgeError(Exception):
    """Root of all errors raised by dsf-bridge on purpose."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable


class ConfigError(BridgeError):
    """The configuration is invalid; ``field`` names the offending setting (dotted path)."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, retryable=False)
        self.field = field


class StoreError(BridgeError):
    """The SQL store failed."""


class ConcurrencyError(StoreError):
    """An optimistic-locking update lost: the row changed since it was read."""

    retryable = True


class TaskAlreadyDeliveredError(BridgeError):
    """The Task version was delivered to an instance already (by another replica, or an
    earlier run): the transaction that would deliver it again is rolled back."""


class MigrationError(StoreError):
    """The database schema is missing, outdated, or a migration revision is unknown."""


class AuditChainError(BridgeError):
    """The audit trail's hash chain does not verify."""

    def __init__(self, message: str, *, sequence: int | None = None) -> None:
        super().__init__(message, retryable=False)
        self.sequence = sequence


class ProcessModelError(BridgeError):
    """A process model or plugin resource is malformed, unsupported or invalid."""


class ProcessExecutionError(BridgeError):
    """A process instance cannot continue."""


class RemoteError(BridgeError):
    """A remote peer failed; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.status = status
