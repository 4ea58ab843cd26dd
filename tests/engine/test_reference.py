"""The reference corpus helper fails (never skips) when the corpus is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reference import reference_dir


def test_missing_corpus_fails_with_instructions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DSF_BRIDGE_REFERENCE_DIR", str(tmp_path / "absent"))
    with pytest.raises(pytest.fail.Exception, match="set DSF_BRIDGE_REFERENCE_DIR"):
        reference_dir()


def test_override_is_honoured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "SOURCES.md").write_text("corpus\n")
    monkeypatch.setenv("DSF_BRIDGE_REFERENCE_DIR", str(tmp_path))
    assert reference_dir() == tmp_path
