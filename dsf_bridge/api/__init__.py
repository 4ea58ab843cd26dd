"""The HTTP API: health, readiness, metrics, the audit API and the web UI."""
