"""Session fixtures for the real components of DESIGN section 7: Orthanc with DICOMweb, and
MLServer and KServe serving the reference model. Each starts once per test session on free
ports in a temporary directory and is stopped by PID at the end.

A component that is not installed FAILS the test with the command that installs it: the README
promises these integrations, so they are never skipped. Import the fixtures into a conftest.py
(``from tests.components import kserve, mlserver, orthanc``).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from typing import TypeVar

import pytest
import structlog

from dsf_bridge.logs import configure_logging
from dsf_bridge.omi.contract import CONTRACTS_DIR
from dsf_bridge.sandbox.components import (
    DENSITY_MODEL,
    NODULE_MODEL,
    REFERENCE_MODEL,
    ComponentMissingError,
    KServeProcess,
    MLServerProcess,
    ModelSpec,
    OrthancProcess,
)

__all__ = [
    "BROKEN_MODEL",
    "DENSITY_CONTRACT",
    "DENSITY_MODEL",
    "NODULE_MODEL",
    "REFERENCE_MODEL",
    "WARMING_MODEL",
    "kserve",
    "mlserver",
    "orthanc",
    "running",
]

# Variants of the reference model that stand for failures: never ready, and failing every call.
WARMING_MODEL = ModelSpec("tissue-composition-warming", extra={"ready": False})
BROKEN_MODEL = ModelSpec("tissue-composition-broken", extra={"fail": True})
# The second real model: a scikit-learn classifier over DICOM-derived features, trained when
# MLServer starts and served by MLServer's stock scikit-learn runtime (the demo serves it too).
DENSITY_CONTRACT = CONTRACTS_DIR / "ct-density.toml"


_Server = TypeVar("_Server", OrthancProcess, MLServerProcess, KServeProcess)


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
    """A running MLServer serving the reference model, its failure variants, ``my-model`` and
    ``ct-density`` (models with contracts of their own; the latter on a stock runtime)."""
    yield from running(
        MLServerProcess(
            tmp_path_factory.mktemp("mlserver"),
            models=(REFERENCE_MODEL, WARMING_MODEL, BROKEN_MODEL, NODULE_MODEL, DENSITY_MODEL),
        )
    )


@pytest.fixture(scope="session")
def kserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KServeProcess]:
    """A running KServe model server serving the reference model (binary tensors over REST)."""
    yield from running(KServeProcess(tmp_path_factory.mktemp("kserve")))


@contextlib.contextmanager
def json_logs(level: str) -> Iterator[io.StringIO]:
    """Every log line (structlog and standard logging) at ``level`` and above, as JSON lines,
    while in the block; logging is reset after."""
    out = io.StringIO()
    configure_logging(level, "json", stream=out)
    try:
        yield out
    finally:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        structlog.reset_defaults()
