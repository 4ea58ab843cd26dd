"""Where the DSF reference corpus lives for tests: ``../shared/reference/dsf`` next to the repo.

Set ``DSF_BRIDGE_REFERENCE_DIR`` to use another checkout. A missing corpus fails the test that
needs it with instructions; it is never a reason to skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

__all__ = ["reference_dir", "reference_file"]

_REPO_ROOT = Path(__file__).resolve().parent.parent


def reference_dir() -> Path:
    """The reference corpus folder; fails the calling test when it is missing."""
    configured = os.environ.get("DSF_BRIDGE_REFERENCE_DIR")
    path = Path(configured) if configured else _REPO_ROOT.parent / "shared" / "reference" / "dsf"
    if not (path / "SOURCES.md").is_file():
        pytest.fail(
            f"DSF reference corpus not found at {path}: check out the shared reference files "
            "there or set DSF_BRIDGE_REFERENCE_DIR to the folder that holds SOURCES.md",
            pytrace=False,
        )
    return path


def reference_file(relative: str) -> Path:
    """One file of the corpus, by its path inside the reference folder."""
    path = reference_dir() / relative
    if not path.is_file():
        pytest.fail(f"reference file {relative} is missing from {reference_dir()}", pytrace=False)
    return path
