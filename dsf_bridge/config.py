"""The bridge's configuration: one settings model, read from a TOML file, the environment and flags.

Precedence, highest first: command-line flags, environment variables ``DSF_BRIDGE_*`` (``__``
separates nesting levels, so ``DSF_BRIDGE_DB__URL`` sets ``db.url``), the TOML file named by
``--config`` or ``DSF_BRIDGE_CONFIG``, then the defaults below. Unknown keys and bad values stop
start-up with a :class:`~dsf_bridge.errors.ConfigError` naming the field. Nothing is read at
import time: callers build settings with :func:`load_settings`.

``docs/config.example.toml`` documents every field; a test keeps it in sync with this module.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from dsf_bridge.engine.timers import TimerError, add_duration, parse_duration
from dsf_bridge.errors import ConfigError
from dsf_bridge.proxy import ForwardProxy
from dsf_bridge.retry import CALL_RETRY, RetryPolicy

__all__ = [
    "CONFIG_ENV_VAR",
    "ApiSettings",
    "ConsortiumSettings",
    "DatabaseSettings",
    "DsfSettings",
    "IntakeSettings",
    "LogSettings",
    "OmiServiceSettings",
    "OmiSettings",
    "PluginsSettings",
    "ProxySettings",
    "PseudonymizationSettings",
    "RuntimeConfig",
    "Settings",
    "display_settings",
    "load_settings",
    "redact_url",
    "secret_settings",
]

CONFIG_ENV_VAR = "DSF_BRIDGE_CONFIG"
ENV_PREFIX = "DSF_BRIDGE_"
DEFAULT_DB_URL = "sqlite:///dsf-bridge.db"

_SUPPORTED_DB_SCHEMES = (
    "sqlite",
    "sqlite+aiosqlite",
    "sqlite+pysqlite",
    "postgresql",
    "postgresql+psycopg",
)

# The environment and TOML layers of the settings being built right now, read by the sources.
# A context variable rather than class state: settings are built per call, never at import.
_layers: contextvars.ContextVar[tuple[dict[str, Any], dict[str, Any]]] = contextvars.ContextVar(
    "dsf_bridge_settings_layers", default=({}, {})
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseSettings(_Section):
    """Where process state, Tasks seen, the outbox and the audit trail live."""

    url: str = Field(
        default=DEFAULT_DB_URL,
        description=(
            "SQLAlchemy URL of the store: sqlite:///PATH (embedded default) or "
            "postgresql://USER[:PASSWORD]@HOST:PORT/DB (production); the bridge picks the driver"
        ),
    )
    pool_size: int = Field(
        default=20,
        ge=1,
        le=100,
        description="PostgreSQL connections of the bridge process (a fixed pool: at a peak "
        "steps wait for a free one)",
    )
    echo: bool = Field(default=False, description="Log every SQL statement (debugging only)")
    password: SecretStr | None = Field(
        default=None,
        description="Password of the PostgreSQL user named in url, kept apart from the URL "
        "(DSF_BRIDGE_DB__PASSWORD_FILE for a Docker secret); url must then carry none",
    )

    @model_validator(mode="before")
    @classmethod
    def _password_into_url(cls, data: object) -> object:
        # DSF's own setups keep the database password in a secret file apart from the URL
        # (DEV_DSF_BPE_DB_USER_PASSWORD_FILE); everything downstream reads one URL.
        if not isinstance(data, Mapping) or data.get("password") is None:
            return data
        password = data["password"]
        secret = password.get_secret_value() if isinstance(password, SecretStr) else str(password)
        parts = urlsplit(str(data.get("url", DEFAULT_DB_URL)))
        if not parts.scheme.startswith("postgresql"):
            raise ValueError("db.password is set, but db.url names no PostgreSQL server")
        if parts.password is not None:
            raise ValueError("db.url carries a password and db.password is set too: give one")
        if not parts.username:
            raise ValueError("db.password needs the user in db.url: postgresql://USER@HOST:PORT/DB")
        host = parts.netloc.rpartition("@")[2]
        netloc = f"{parts.username}:{quote(secret, safe='')}@{host}"
        return {**data, "url": urlunsplit(parts._replace(netloc=netloc))}

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in _SUPPORTED_DB_SCHEMES:
            raise ValueError(
                f"unsupported database URL scheme {scheme or '(none)'!r}; use sqlite:///PATH "
                "or postgresql://USER@HOST:PORT/DB"
            )
        if scheme.startswith("sqlite") and not value.startswith(f"{scheme}:///"):
            raise ValueError("an SQLite URL needs three slashes: sqlite:///relative/or/absolute")
        if scheme.startswith("postgresql") and not urlsplit(value).hostname:
            raise ValueError("a PostgreSQL URL needs a host: postgresql://USER@HOST:PORT/DB")
        return value


class LogSettings(_Section):
    """How the bridge logs. Logs never carry payloads or patient data."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level written"
    )
    format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="auto: readable on a terminal, JSON lines otherwise",
    )

    @field_validator("level", "format", mode="before")
    @classmethod
    def _case_insensitive(cls, value: object) -> object:
        # DEBUG and Info as much as debug: Java sites and Docker setups write level names in
        # capitals. A wrong name still fails, naming the field and the names it takes.
        return value.lower() if isinstance(value, str) else value


class DsfSettings(_Section):
    """The site's identity in the DSF network and its local DSF FHIR server."""

    fhir_base_url: str | None = Field(
        default=None,
        description="Base URL of the local DSF FHIR server, e.g. https://dsf.example.org/fhir",
    )
    client_certificate: Path | None = Field(
        default=None, description="Client certificate (PEM or PKCS#12) used for every DSF peer"
    )
    client_key: Path | None = Field(
        default=None, description="Private key of the client certificate (PEM)"
    )
    client_key_password: SecretStr | None = Field(
        default=None, description="Password of an encrypted client key or PKCS#12 file"
    )
    ca_certificates: list[Path] = Field(
        default_factory=list,
        description="PEM files with the CAs trusted for DSF FHIR servers",
    )

    @field_validator("fhir_base_url")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("must be an https:// URL: the DSF side speaks mutual TLS only")
        return value.rstrip("/")


class IntakeSettings(_Section):
    """Bounds on every Task taken in, checked before the bridge reads anything else of it. A
    Task beyond them is failed with the bound it breaks (or, when the server will not take even
    that, recorded and skipped with an audit event); it never stops start-up or other Tasks."""

    max_task_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        description="Largest Task taken in, in bytes of compact JSON (escapes not counted)",
    )
    max_depth: int = Field(
        default=64,
        ge=8,
        le=200,
        description="Deepest nesting of JSON objects and arrays in a Task",
    )
    max_string_length: int = Field(
        default=65_536,
        ge=256,
        description="Longest string (value or key) in a Task, in characters",
    )
    max_inputs: int = Field(default=200, ge=1, description="Most Task.input parameters in one Task")


class RuntimeConfig(_Section):
    """The one retry and lease policy of the workers (jobs, timers, the outbox). The runtime
    alone decides on a retry; adapters only say whether an error is retryable."""

    lease: float = Field(
        default=60.0,
        ge=1,
        le=3600,
        description="Seconds a worker holds a job or outbox entry; a crashed worker's work is "
        "taken over after this",
    )
    job_retries: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Retries of a failing job before it becomes an incident (Camunda's R3)",
    )
    job_retry_delay: float = Field(
        default=5.0, gt=0, le=86_400, description="Seconds between the tries of a failing job"
    )
    outbox_retry_delays: list[float] = Field(
        default_factory=lambda: [1.0, 5.0, 15.0, 60.0, 300.0],
        min_length=1,
        max_length=50,
        description="Seconds before each new try of a send the network refused; after the last "
        "the send fails",
    )
    idle_poll: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Seconds an idle worker waits before it looks for due work again",
    )
    shutdown_grace: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="Seconds a stopping bridge lets running jobs and sends finish before it "
        "gives their leases back",
    )

    inline_handler_budget: float = Field(
        default=0.05,
        ge=0,
        le=10,
        description="Seconds a Task that starts an instance waits for the handlers its start "
        "reaches before it commits: handlers done by then are recorded in the start's "
        "transaction (as Camunda runs synchronous service tasks), a slower one goes on in a "
        "job; 0 runs every handler in a job after the commit",
    )

    call_attempts: int = Field(
        default=CALL_RETRY.attempts,
        ge=1,
        le=10,
        description="Tries of one call to a remote server (the DSF FHIR servers, DICOMweb, the "
        "inference server) that could not connect or got a 5xx or 429 answer; a Task POST or "
        "an inference POST that may have been processed is never repeated here (the outbox "
        "repeats sends)",
    )
    call_retry_delay: float = Field(
        default=CALL_RETRY.initial_delay,
        ge=0,
        le=60,
        description="Seconds before the second try of a call; doubled for each further try",
    )
    call_retry_max_delay: float = Field(
        default=CALL_RETRY.max_delay,
        ge=0,
        le=300,
        description="Longest wait between two tries of a call",
    )
    retry_after_cap: float = Field(
        default=CALL_RETRY.retry_after_cap,
        ge=0,
        le=600,
        description="Longest Retry-After a server may ask for between two tries of a call",
    )

    def call_retry(self) -> RetryPolicy:
        """The adapters' policy for one call (see :mod:`dsf_bridge.retry`)."""
        return RetryPolicy(
            attempts=self.call_attempts,
            initial_delay=self.call_retry_delay,
            max_delay=self.call_retry_max_delay,
            retry_after_cap=self.retry_after_cap,
        )

    @field_validator("outbox_retry_delays")
    @classmethod
    def _positive_delays(cls, value: list[float]) -> list[float]:
        if any(not 0 < delay <= 86_400 for delay in value):
            raise ValueError("every delay must be above 0 and at most 86400 seconds")
        return value

    @model_validator(mode="after")
    def _grace_within_lease(self) -> RuntimeConfig:
        # A grace past the lease would let every draining job run on after its lease, so that
        # another replica may take it while it still runs here. (A job leased long before the
        # stop can still outlive its lease while draining: handlers run at least once.)
        if self.shutdown_grace >= self.lease:
            raise ValueError(
                f"shutdown_grace ({self.shutdown_grace:g} s) must be shorter than lease "
                f"({self.lease:g} s)"
            )
        return self


class OmiServiceSettings(_Section):
    """One inference service of the local catalogue. A requesting site needs ``organization``
    (where the request goes); a providing site needs ``model_name`` and ``inference_url`` (what
    runs it). A site that is both sets all of them."""

    id: str = Field(min_length=1, description="Service id, named by the start Task's 'service'")
    name: str | None = Field(default=None, description="Human-readable name (default: the id)")
    organization: str | None = Field(
        default=None, description="DSF organization identifier of the providing site"
    )
    model_name: str | None = Field(
        default=None, description="Model name on the provider's inference server"
    )
    model_version: str | None = Field(default=None, description="Model version (optional)")
    inference_url: str | None = Field(
        default=None, description="Base URL of the Open Inference Protocol v2 server"
    )
    contract: str | dict[str, Any] | None = Field(
        default=None,
        description="The service contract (docs/omi.md): a shipped contract's name "
        "(tissue-composition), a .toml or .json file, or the contract inline. A requesting "
        "site that names it checks requests before they leave; a providing site without one "
        "serves the tissue-composition contract",
    )
    tensor_encoding: Literal["auto", "json", "binary"] = Field(
        default="auto",
        description="Providing site: how tensors travel to the inference server: binary (the "
        "OIP v2 binary tensor data extension: KServe, Triton), json (any server; MLServer's "
        "REST takes nothing else), or auto (asked of the server once, docs/omi.md)",
    )
    max_slices: int | None = Field(
        default=None,
        ge=1,
        description="Providing site: most slices one request may have (besides the contract's "
        "accepts.max_slices); more fail with request-invalid before the images are fetched",
    )
    max_request_bytes: int = Field(
        default=1 << 30,
        ge=1,
        description="Providing site: most bytes of model input tensors per request (raw, "
        "before encoding); more fail with request-invalid before anything is sent",
    )
    max_response_bytes: int = Field(
        default=256 << 20,
        ge=1,
        description="Providing site: most bytes of one answer of the inference server; a "
        "larger answer fails the inference",
    )
    transfer: Literal["dsf", "dicomweb"] = Field(
        default="dsf",
        description="Requesting site: how the study reaches the provider. dsf: pseudonymized, "
        "packaged, encrypted for the provider and stored as a Binary on this site's DSF FHIR "
        "server, readable by the provider only (docs/privacy.md); dicomweb: the provider "
        "fetches the original study from the start Task's dicomweb-endpoint (a provider inside "
        "this organization only: nothing is pseudonymized) or from dicomweb_gateway",
    )
    dicomweb_gateway: str | None = Field(
        default=None,
        description='Requesting site, transfer = "dicomweb": base URL of an OMI DICOMweb '
        "gateway the provider may read; the pseudonymized copy of the series is stored there "
        "(STOW-RS) and named in the request instead of this site's archive",
    )


def _bounded_duration(value: str) -> str:
    """An ISO 8601 duration of at most P366D, stripped; ValueError otherwise."""
    if not _DURATION.match(value.strip()):
        raise ValueError(f"not an ISO 8601 duration such as PT10M: {value!r}")
    # The bound a start Task's result-timeout has (plugins/inference.py): a site default
    # past it would fail every request as if the requester had asked for too much.
    now = dt.datetime.now(dt.UTC)
    try:
        too_long = add_duration(now, parse_duration(value.strip())) - now > _MAX_RESULT_TIMEOUT
    except TimerError:
        too_long = True
    if too_long:
        raise ValueError(f"longer than P{_MAX_RESULT_TIMEOUT.days}D: {value!r}")
    return value.strip()


class ConsortiumSettings(_Section):
    """Consortium inference (docs/consortium.md): what a data site answers, how long a
    coordinator waits."""

    dicomweb_url: str | None = Field(
        default=None,
        description="Data site: base URL of this site's own DICOMweb archive, where the cohort is "
        "searched and read; unset: this site refuses consortium requests",
    )
    k: int = Field(
        default=5,
        ge=3,
        le=1000,
        description="Data site: no figure computed from fewer than k studies leaves this site, "
        "no quartiles from fewer than 2k (a request may ask for more, never for less); at "
        "least 3: two studies' mean and sd would be their values",
    )
    max_studies: int = Field(
        default=500,
        ge=1,
        description="Data site: most studies one consortium request may run the model on; a "
        "larger cohort is refused",
    )
    obfuscate: bool = Field(
        default=False,
        description="Data site: obfuscate every published count as the MII feasibility plugin "
        "does (Laplace noise, rounded to tens)",
    )
    sensitivity: float = Field(default=1.0, gt=0, description="Laplace sensitivity")
    epsilon: float = Field(default=0.5, gt=0, description="Laplace epsilon")
    approval: bool = Field(
        default=False,
        description="Data site: a person approves each consortium request (a DSF "
        "QuestionnaireResponse in the DSF FHIR UI) before the cohort is searched",
    )
    approval_timeout: str = Field(
        default="P7D",
        description="Data site: an approval not given within this ISO 8601 duration refuses "
        "the request",
    )
    site_timeout: str = Field(
        default="PT2H",
        description="Coordinator: how long to wait for each data site unless the start Task "
        "names a site-timeout (ISO 8601 duration)",
    )

    @field_validator("approval_timeout", "site_timeout")
    @classmethod
    def _check_duration(cls, value: str) -> str:
        return _bounded_duration(value)

    @field_validator("dicomweb_url")
    @classmethod
    def _check_dicomweb_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"must be an http:// or https:// URL of the DICOMweb archive, not {value!r}"
            )
        return value.rstrip("/")


class OmiSettings(_Section):
    """OMI inference: the service catalogue, the registry, and timeouts of both process sides."""

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: object) -> object:
        if isinstance(data, Mapping) and "dicomweb_attempts" in data:
            raise ValueError(
                "omi.dicomweb_attempts is gone: every call follows [runtime] call_attempts "
                "(one retry policy, see docs/configuration.md)"
            )
        return data

    catalogue: list[OmiServiceSettings] = Field(
        default_factory=list, description="Inference services known to this site"
    )
    registry_url: str | None = Field(
        default=None,
        description="Base URL of an OMI registry (FHIR); services not in the catalogue are "
        "looked up there",
    )
    registry_ca_certificates: list[Path] = Field(
        default_factory=list,
        description="PEM files with the CAs trusted for an https registry (default: "
        "dsf.ca_certificates); the site's DSF client certificate is presented to it",
    )
    publish: bool = Field(
        default=False,
        description="Providing site: `dsf-bridge run` publishes the services it offers (catalogue "
        "entries with inference_url) in the registry at start-up and keeps their heartbeats "
        "current; needs registry_url",
    )
    heartbeat_interval: float = Field(
        default=60.0,
        gt=0,
        # Requesting sites refuse a heartbeat older than ten minutes: at most half of that, so
        # that one lost beat does not take the service out.
        le=300,
        description="Seconds between two heartbeats of each published service, at most 300 "
        "(requesting sites refuse a service whose heartbeat is older than ten minutes)",
    )
    result_timeout: str = Field(
        default="PT10M",
        description="ISO 8601 duration a request waits for its result unless the start Task "
        "names one",
    )
    dicomweb_timeout: float = Field(
        default=30.0, gt=0, description="Seconds per DICOMweb request at the providing site"
    )
    inference_timeout: float = Field(
        default=60.0, gt=0, description="Seconds per call to the inference server"
    )
    dicomweb_ca_certificates: list[Path] = Field(
        default_factory=list,
        description="Providing site: PEM files with the CAs trusted for https DICOMweb archives "
        "(default: dsf.ca_certificates); the site's DSF client certificate is presented to them",
    )
    transfer_dir: Path | None = Field(
        default=None,
        description="Directory for study and result packages while they are made, encrypted or "
        "read (default: the system's temporary directory); each is deleted when its step ends",
    )
    max_package_bytes: int = Field(
        default=4 << 30,
        ge=1 << 20,
        description="Most bytes of one study or result package this site downloads and "
        "decrypts; a larger Binary is refused before or while it is read",
    )
    max_package_instances: int = Field(
        default=10_000,
        ge=1,
        description="Most DICOM instances one package may hold",
    )
    transfer_retention: str = Field(
        default="PT24H",
        description="Providing site: how long a result package (a SEG) stays on this site's DSF "
        "FHIR server when the requester does not confirm it (ISO 8601 duration)",
    )
    dicomweb_allowed: list[str] = Field(
        default_factory=list,
        description="URL prefixes of DICOMweb archives the providing site fetches from; empty: any",
    )
    consortium: ConsortiumSettings = Field(
        default_factory=ConsortiumSettings,
        description="Consortium inference ([omi.consortium], docs/consortium.md)",
    )

    @field_validator("result_timeout", "transfer_retention")
    @classmethod
    def _check_duration(cls, value: str) -> str:
        return _bounded_duration(value)

    @model_validator(mode="after")
    def _publish_needs_registry(self) -> OmiSettings:
        if self.publish and self.registry_url is None:
            raise ValueError("publish = true needs registry_url (the OMI registry to publish in)")
        if self.publish and not any(entry.inference_url for entry in self.catalogue):
            raise ValueError(
                "publish = true needs a catalogue entry with inference_url (a service this "
                "site offers)"
            )
        return self


class PseudonymizationSettings(_Section):
    """How a requesting site pseudonymizes a study before it leaves (docs/privacy.md)."""

    enabled: bool = Field(
        default=True,
        description='Pseudonymize studies before they leave the site (transfer = "dsf"); '
        "false: this site sends no study through DSF, such requests fail with "
        "request-invalid (docs/privacy.md)",
    )
    dates: Literal["shift", "keep"] = Field(
        default="shift",
        description="shift: every date of a study moves by one per-study offset (intervals "
        "kept); keep: dates stay as they are",
    )
    refused_modalities: list[str] = Field(
        default_factory=lambda: ["US", "SC", "XC", "ES", "OT"],
        description="Modalities refused because their pixels often carry burned-in text",
    )
    safe_private: list[str] = Field(
        default_factory=list,
        description="Private attributes kept, as 'PRIVATE CREATOR:xx' (xx: the element byte in "
        "hex, e.g. 'GEMS_PARM_01:39'); every other private attribute is removed",
    )
    secret: SecretStr | None = Field(
        default=None,
        description="The site's key for replacement UIDs and date offsets, at least 32 "
        "characters (DSF_BRIDGE_PSEUDONYMIZATION__SECRET_FILE for a Docker secret); never share "
        "it: with it, replacements can be matched to guessed originals",
    )

    @field_validator("refused_modalities")
    @classmethod
    def _check_modalities(cls, value: list[str]) -> list[str]:
        modalities = [item.strip().upper() for item in value]
        for modality in modalities:
            if not re.fullmatch(r"[A-Z0-9]{1,16}", modality):
                raise ValueError(f"not a DICOM modality code: {modality!r}")
        return modalities

    @field_validator("safe_private")
    @classmethod
    def _check_safe_private(cls, value: list[str]) -> list[str]:
        for entry in value:
            creator, _, element = entry.rpartition(":")
            if not creator.strip() or not re.fullmatch(r"[0-9A-Fa-f]{2}", element):
                raise ValueError(f"not 'PRIVATE CREATOR:xx' with xx two hex digits: {entry!r}")
        return value

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value().strip()
        if len(secret) < 32:
            raise ValueError("the pseudonymization secret must have at least 32 characters")
        return SecretStr(secret)

    def safe_private_attributes(self) -> frozenset[tuple[str, int]]:
        """``safe_private`` as (private creator, element byte) pairs."""
        pairs = set()
        for entry in self.safe_private:
            creator, _, element = entry.rpartition(":")
            pairs.add((creator.strip(), int(element, 16)))
        return frozenset(pairs)


class ApiSettings(_Section):
    """The admin HTTP API and web page: health, readiness, metrics, the audit of every instance.

    Closed unless configured: without ``token`` only ``/health`` and ``/ready`` answer, every
    other path is refused with 403.
    """

    enabled: bool = Field(
        default=False, description="Serve the admin API and web page from `dsf-bridge run`"
    )
    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address to listen on; keep the loopback default behind a reverse proxy",
    )
    port: int = Field(default=8480, ge=1, le=65535, description="TCP port to listen on")
    token: SecretStr | None = Field(
        default=None,
        description="Bearer token (or Basic auth password) for metrics, audit API and web page; "
        "at least 16 characters; unset: those stay closed",
    )
    operator_token: SecretStr | None = Field(
        default=None,
        description="Bearer token (or Basic auth password) with the operator role: reads, and "
        "retries incidents and cancels instances through the API; at least 16 characters and "
        "not the read token; unset: no operator actions through the API",
    )
    stale_after: float = Field(
        default=900.0,
        gt=0,
        description="Seconds without a sign of life from a subscription or the workers after "
        "which /ready answers 503",
    )
    disconnected_after: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a subscription's websocket may stay down (the bridge reconnecting) "
        "after which /ready answers 503",
    )

    @field_validator("token", "operator_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        # A token read from a secret file often ends with a newline that no client sends.
        token = value.get_secret_value().strip()
        if len(token) < 16:
            raise ValueError("the API token must have at least 16 characters")
        return SecretStr(token)

    @model_validator(mode="after")
    def _roles_apart(self) -> ApiSettings:
        if self.operator_token is not None and self.token is None:
            raise ValueError("operator_token needs token (the API is closed without it)")
        if (
            self.token is not None
            and self.operator_token is not None
            and self.token.get_secret_value() == self.operator_token.get_secret_value()
        ):
            raise ValueError("operator_token must differ from token (the read-only role)")
        return self


class ProxySettings(_Section):
    """The HTTP forward proxy of every outgoing call: the DSF FHIR servers (local and remote,
    REST and websocket), DICOMweb archives, the OMI registry and inference servers. Unset: all
    connect directly. The proxy environment (HTTPS_PROXY, NO_PROXY) is never read."""

    url: str | None = Field(
        default=None,
        description="The proxy, http://HOST:PORT; https targets are tunnelled through it "
        "(CONNECT), TLS and the client certificate end to end",
    )
    username: str | None = Field(
        default=None, description="User for the proxy's Basic authentication"
    )
    password: SecretStr | None = Field(default=None, description="Password of that user")
    no_proxy: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "::1"],
        description="Hosts reached without the proxy: a name (with its subdomains), an "
        "address, either with :PORT for that port only, or * for all",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(
                "must be an http:// URL, http://HOST:PORT (https targets are tunnelled through "
                "it; a proxy spoken to over TLS is not supported)"
            )
        if parts.username is not None or parts.password is not None:
            raise ValueError("put the credentials in proxy.username and proxy.password")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("a proxy URL is http://HOST:PORT, without a path")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        return f"http://{parts.netloc}" if port else f"http://{parts.netloc}:80"

    @field_validator("no_proxy")
    @classmethod
    def _check_no_proxy(cls, value: list[str]) -> list[str]:
        entries = [entry.strip() for entry in value]
        if any(not entry or " " in entry or "/" in entry for entry in entries):
            raise ValueError("entries are host names or addresses, optionally :PORT, or *")
        return entries

    @model_validator(mode="after")
    def _credentials_need_a_proxy(self) -> ProxySettings:
        if self.url is None and (self.username is not None or self.password is not None):
            raise ValueError("proxy.username and proxy.password need proxy.url")
        if self.password is not None and self.username is None:
            raise ValueError("proxy.password needs proxy.username")
        return self

    def forward_proxy(self) -> ForwardProxy | None:
        """The proxy the adapters route through, or None when there is none."""
        if self.url is None:
            return None
        return ForwardProxy(
            url=self.url,
            username=self.username,
            password=self.password.get_secret_value() if self.password is not None else None,
            no_proxy=tuple(self.no_proxy),
        )


class PluginsSettings(_Section):
    """Drop-in process plugins: a folder the bridge loads plugins from at start-up, besides the
    installed ones (entry points). Trusted like site-packages: its code runs in the bridge."""

    folder: Path | None = Field(
        default=None,
        description="Folder of drop-in plugins: plugin folders (plugin.toml, BPMN, FHIR "
        "resources, an optional Python module) and wheel files; unset: installed plugins only. "
        "Owner-only permissions recommended; a world-writable folder is refused",
    )


# The duration forms the engine's timers accept (dsf_bridge.engine.timers).
# The longest result-timeout a request may wait (also the bound for a start Task's input).
_MAX_RESULT_TIMEOUT = dt.timedelta(days=366)
_DURATION = re.compile(
    r"^P(?!$)(?:\d+Y)?(?:\d+M)?(?:\d+W)?(?:\d+D)?"
    r"(?:T(?=\d)(?:\d+H)?(?:\d+M)?(?:\d+(?:\.\d+)?S)?)?$"
)


class Settings(BaseSettings):
    """The effective configuration of one bridge process."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
    )

    db: DatabaseSettings = Field(default_factory=DatabaseSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    dsf: DsfSettings = Field(default_factory=DsfSettings)
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    omi: OmiSettings = Field(default_factory=OmiSettings)
    pseudonymization: PseudonymizationSettings = Field(default_factory=PseudonymizationSettings)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    api: ApiSettings = Field(default_factory=ApiSettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    plugins: PluginsSettings = Field(default_factory=PluginsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        env_values, toml_values = _layers.get()
        return (
            init_settings,
            InitSettingsSource(settings_cls, init_kwargs=env_values),
            InitSettingsSource(settings_cls, init_kwargs=toml_values),
        )


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist", field="--config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"configuration file {path} cannot be read: {exc}") from exc


def _env_values(environ: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Nested setting values from ``DSF_BRIDGE_SECTION__KEY`` variables.

    Variables of that form with an unknown section or key stop start-up like unknown TOML keys
    do: a typo must not pass silently. Other ``DSF_BRIDGE_*`` variables are not settings.
    List-valued settings take JSON (``'["a.pem", "b.pem"]'``) or a comma-separated list. A
    secret (:func:`secret_settings`) may come from a file instead, named by
    ``DSF_BRIDGE_SECTION__KEY_FILE`` (Docker's and DSF's convention).
    """
    sections = _sections()
    secrets = secret_settings()
    values: dict[str, dict[str, Any]] = {}
    origins: dict[tuple[str, str], str] = {}
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        if "__" not in name:
            # Not a setting (DSF_BRIDGE_CONFIG, test and tool variables), unless it looks like
            # one with a single underscore, a typo that would otherwise pass silently.
            guess_section, _, guess_key = name.partition("_")
            if guess_key in getattr(sections.get(guess_section), "model_fields", {}) or (
                f"{guess_section}.{guess_key.removesuffix('_file')}" in secrets
            ):
                fixed = f"{ENV_PREFIX}{guess_section.upper()}__{guess_key.upper()}"
                raise ConfigError(
                    f"{key}: settings use two underscores after the section: {fixed}", field=key
                )
            continue
        parts = name.split("__")
        section = sections.get(parts[0])
        from_file = (
            len(parts) == 2
            and parts[1].endswith("_file")
            and f"{parts[0]}.{parts[1].removesuffix('_file')}" in secrets
        )
        setting = (parts[0], parts[1].removesuffix("_file") if from_file else parts[-1])
        if section is None or len(parts) != 2 or setting[1] not in section.model_fields:
            raise ConfigError(
                f"{key}: unknown setting in the environment (expected DSF_BRIDGE_SECTION__KEY, "
                "see docs/config.example.toml)"
                + (
                    f"; only secrets are read from a file (*_FILE): {', '.join(secrets)}"
                    if name.endswith("_file")
                    else ""
                ),
                field=key,
            )
        if setting in origins:
            raise ConfigError(
                f"{origins[setting]} and {key} both set {'.'.join(setting)}: set only one",
                field=key,
            )
        origins[setting] = key
        raw: Any = _read_secret_file(key, environ[key]) if from_file else environ[key]
        if typing.get_origin(section.model_fields[setting[1]].annotation) is list:
            raw = _parse_list(key, raw)
        values.setdefault(setting[0], {})[setting[1]] = raw
    return values


# A secret file is a password or a token; a bigger one is the wrong file.
_MAX_SECRET_BYTES = 65_536


def _read_secret_file(variable: str, path_text: str) -> str:
    """The content of the file ``variable`` names, without its trailing newline.

    Errors name the variable and the path, never what the file holds."""
    if not path_text.strip():
        raise ConfigError(f"{variable}: names no file", field=variable)
    path = Path(path_text)
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_SECRET_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{variable}: cannot read {path}: {reason}", field=variable) from exc
    if len(data) > _MAX_SECRET_BYTES:
        raise ConfigError(
            f"{variable}: {path} is larger than {_MAX_SECRET_BYTES} bytes, not a secret",
            field=variable,
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # Not chained: the decode error holds the file's bytes.
        raise ConfigError(f"{variable}: {path} is not UTF-8 text", field=variable) from None
    # `echo secret > file` and most editors end the file with a newline no one means.
    text = text.rstrip("\r\n")
    if not text:
        raise ConfigError(f"{variable}: {path} is empty", field=variable)
    return text


def secret_settings() -> tuple[str, ...]:
    """The settings that hold secrets (``section.key``): hidden by ``config show`` and
    readable from a file named by ``DSF_BRIDGE_SECTION__KEY_FILE``. ``db.url`` is one: it may
    carry the database password."""
    found = ["db.url"]
    for section_name, section in _sections().items():
        for key, field in section.model_fields.items():
            annotation = field.annotation
            if annotation is SecretStr or SecretStr in typing.get_args(annotation):
                found.append(f"{section_name}.{key}")
    return tuple(found)


def _parse_list(key: str, raw: str) -> list[Any]:
    text = raw.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{key}: not a JSON list: {exc}", field=key) from exc
        if not isinstance(parsed, list):
            raise ConfigError(f"{key}: expected a JSON list", field=key)
        return parsed
    return [item.strip() for item in text.split(",") if item.strip()]


def _sections() -> dict[str, type[BaseModel]]:
    sections: dict[str, type[BaseModel]] = {}
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections[name] = annotation
    return sections


def _describe(error: ValidationError) -> ConfigError:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown setting (check the spelling against docs/config.example.toml)"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return ConfigError(f"{location}: {message}{suffix}", field=location)


def load_settings(
    config_file: Path | str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the effective settings; raise :class:`ConfigError` naming the first bad field.

    ``overrides`` holds command-line flags as nested sections (``{"db": {"url": ...}}``); flags
    that were not given must be left out, not passed as ``None``. ``environ`` defaults to the
    process environment.
    """
    env = dict(os.environ if environ is None else environ)
    path = config_file if config_file is not None else env.get(CONFIG_ENV_VAR) or None
    toml_values = _read_toml(Path(path)) if path is not None else {}
    token = _layers.set((_env_values(env), toml_values))
    try:
        # model_validate would skip the settings sources; the constructor runs them.
        values: dict[str, Any] = dict(overrides or {})
        return Settings(**values)
    except ValidationError as exc:
        raise _describe(exc) from exc
    finally:
        _layers.reset(token)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else f":***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def display_settings(settings: Settings) -> dict[str, dict[str, Any]]:
    """The settings as plain data with every secret hidden, for ``dsf-bridge config show``."""
    shown: dict[str, dict[str, Any]] = {}
    for section_name in type(settings).model_fields:
        section = getattr(settings, section_name)
        values: dict[str, Any] = {}
        for key in type(section).model_fields:
            value = getattr(section, key)
            if isinstance(value, SecretStr):
                value = "***"
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, list):
                value = [
                    str(item)
                    if isinstance(item, Path)
                    else item.model_dump(exclude_none=True)
                    if isinstance(item, BaseModel)
                    else item
                    for item in value
                ]
            elif isinstance(value, BaseModel):  # a nested section ([omi.consortium])
                value = value.model_dump(mode="json", exclude_none=True)
            if section_name == "db" and key == "url":
                value = redact_url(value)
            values[key] = value
        shown[section_name] = values
    return shown
