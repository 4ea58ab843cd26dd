"""Fixtures with real certificates and a running sandbox FHIR server (see tests/sandbox/harness)."""

from tests.sandbox.harness import sandbox, sandbox_ca, sandbox_sites

__all__ = ["sandbox", "sandbox_ca", "sandbox_sites"]
