"""The public names of the engine and plugin packages exist and stay importable."""

from __future__ import annotations

import importlib

import pytest

from dsf_bridge.engine import CorrelationError, UnsafeXmlError
from dsf_bridge.errors import ProcessExecutionError, ProcessModelError


@pytest.mark.parametrize(
    "module",
    [
        "dsf_bridge.engine",
        "dsf_bridge.engine.events",
        "dsf_bridge.engine.exceptions",
        "dsf_bridge.engine.state",
        "dsf_bridge.plugins",
        "dsf_bridge.plugins.registry",
        "dsf_bridge.runtime.testing",
    ],
)
def test_all_names_exist(module: str) -> None:
    imported = importlib.import_module(module)
    names = imported.__all__
    assert names
    missing = [name for name in names if not hasattr(imported, name)]
    assert missing == []


def test_engine_errors_refine_the_bridge_tree() -> None:
    assert issubclass(UnsafeXmlError, ProcessModelError)
    assert issubclass(CorrelationError, ProcessExecutionError)
