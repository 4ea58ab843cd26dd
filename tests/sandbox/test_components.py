"""The real components' start-up checks that run before anything is spawned."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsf_bridge.sandbox.components import (
    KSERVE_SETUP_COMMAND,
    MLSERVER_SETUP_COMMAND,
    ComponentMissingError,
    KServeProcess,
    MLServerProcess,
    ModelSpec,
    mlserver_venv,
)


def test_a_model_whose_runtime_the_mlserver_venv_lacks_names_the_setup_command(
    tmp_path: Path,
) -> None:
    venv = mlserver_venv()
    if not (venv / "bin" / "mlserver").exists():
        pytest.fail(f"the MLServer environment is missing at {venv}: {MLSERVER_SETUP_COMMAND}")
    model = ModelSpec("needs-more", requires="dsf_bridge_no_such_runtime")
    server = MLServerProcess(tmp_path, models=[model])
    with pytest.raises(ComponentMissingError) as info:
        server.start()
    assert "lacks dsf_bridge_no_such_runtime (model needs-more)" in str(info.value)
    assert MLSERVER_SETUP_COMMAND in str(info.value)
    assert server.pid is None  # nothing was started
    assert not (tmp_path / "models").exists()


def test_a_missing_kserve_venv_names_the_setup_command(tmp_path: Path) -> None:
    # A venv without kserve (an interrupted setup) counts as missing too.
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").touch()
    for venv in (tmp_path / "nowhere", tmp_path / "venv"):
        server = KServeProcess(tmp_path / "work", venv=venv)
        with pytest.raises(ComponentMissingError) as info:
            server.start()
        assert f"the KServe environment is missing at {venv}" in str(info.value)
        assert KSERVE_SETUP_COMMAND in str(info.value)
        assert server.pid is None  # nothing was started
