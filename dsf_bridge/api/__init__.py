"""The admin HTTP API and web page (FastAPI): health, readiness, metrics, the audit of every
process state. Read-only: it reads the store and the probes, and never changes a process."""

from dsf_bridge.api.app import create_app
from dsf_bridge.api.probes import (
    Probe,
    ProbeResult,
    database_probe,
    heartbeat_probe,
    subscription_probe,
)
from dsf_bridge.api.server import ApiServer

__all__ = [
    "ApiServer",
    "Probe",
    "ProbeResult",
    "create_app",
    "database_probe",
    "heartbeat_probe",
    "subscription_probe",
]
