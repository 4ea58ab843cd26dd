"""dsf-bridge: a Python business process engine for the Data Sharing Framework (DSF)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from dsf_bridge.errors import BridgeError

__all__ = ["BridgeError", "__version__"]

try:
    __version__ = version("dsf-bridge")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"
