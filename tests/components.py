"""Session fixtures for the real components of DESIGN section 7: Orthanc with DICOMweb and
MLServer serving the reference model. Each starts once per test session on free ports in a
temporary directory and is stopped by PID at the end.

A component that is not installed FAILS the test with the command that installs it: the README
promises these integrations, so they are never skipped. Import the fixtures into a conftest.py
(``from tests.components import mlserver, orthanc``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import pytest

from dsf_bridge.sandbox.components import (
    NODULE_MODEL,
    REFERENCE_MODEL,
    ComponentMissingError,
    MLServerProcess,
    ModelSpec,
    OrthancProcess,
)

__all__ = [
    "BROKEN_MODEL",
    "NODULE_MODEL",
    "REFERENCE_MODEL",
    "WARMING_MODEL",
    "mlserver",
    "orthanc",
    "running",
]

# Variants of the reference model that stand for failures: never ready, and failing every call.
WARMING_MODEL = ModelSpec("tissue-composition-warming", extra={"ready": False})
BROKEN_MODEL = ModelSpec("tissue-composition-broken", extra={"fail": True})


_Server = TypeVar("_Server", OrthancProcess, MLServerProcess)


def running(server: _Server) -> Iterator[_Server]:
    """Start ``server``, yield it, stop it; a component not installed fails the test with
    the command that installs it (for fixtures: ``yield from running(...)``)."""
    try:
        server.start()
    except ComponentMissingError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """A running Orthanc with DICOMweb at ``orthanc.dicomweb_url``, empty at session start."""
    yield from running(OrthancProcess(tmp_path_factory.mktemp("orthanc")))


@pytest.fixture(scope="session")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServerProcess]:
    """A running MLServer serving the reference model, its failure variants and ``my-model``
    (the second reference model, with a contract of its own)."""
    yield from running(
        MLServerProcess(
            tmp_path_factory.mktemp("mlserver"),
            models=(REFERENCE_MODEL, WARMING_MODEL, BROKEN_MODEL, NODULE_MODEL),
        )
    )
