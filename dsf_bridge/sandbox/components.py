"""Real peers started as child processes: Orthanc with DICOMweb, and MLServer and KServe
serving the reference model (DESIGN section 7). Tests and ``dsf-bridge demo`` start them;
nothing here is downloaded at run time.

- Orthanc comes from Debian (``apt-get install orthanc orthanc-dicomweb``). Each server gets a
  config in its own directory: local access only, no DICOM port, storage in that directory,
  the DICOMweb plugin loaded, HTTP on a free port.
- MLServer lives in its own virtual environment made by ``scripts/setup-mlserver.sh`` (its pins
  clash with ours). Each server gets ``settings.json`` (``parallel_workers: 0``: its worker pool
  crashes with current uvloop; no metrics server; gRPC on a free port, it cannot be turned off)
  and one folder per model, served by a runtime of ``refmodel/`` from this source tree or by a
  stock MLServer runtime (scikit-learn), a model file trained into its folder first.
- KServe's Python model server lives in its own virtual environment made by
  ``scripts/setup-kserve.sh``; it runs ``refmodel/kserve_model.py`` (a ``kserve.Model``
  subclass around the same tissue composition) on a free port, gRPC off. Its REST endpoint
  speaks the binary tensor data extension, which MLServer's does not.

A component that is not installed raises :class:`ComponentMissingError`, whose message is the
command that installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import structlog

from dsf_bridge.errors import BridgeError

__all__ = [
    "DENSITY_MODEL",
    "KSERVE_SETUP_COMMAND",
    "MLSERVER_SETUP_COMMAND",
    "NODULE_MODEL",
    "ORTHANC_INSTALL_COMMAND",
    "ComponentError",
    "ComponentMissingError",
    "KServeProcess",
    "MLServerProcess",
    "ModelSpec",
    "OrthancProcess",
    "find_orthanc",
    "free_port",
    "kserve_venv",
    "mlserver_venv",
]

_log = structlog.get_logger()

ORTHANC_INSTALL_COMMAND = "apt-get update && apt-get install -y orthanc orthanc-dicomweb"
MLSERVER_SETUP_COMMAND = "scripts/setup-mlserver.sh"
KSERVE_SETUP_COMMAND = "scripts/setup-kserve.sh"

_REPO_ROOT = Path(__file__).resolve().parents[2]
_REFMODEL_DIR = Path(__file__).resolve().with_name("refmodel")
# Where Debian's orthanc-dicomweb puts the plugin; the versioned file is the real library.
_DICOMWEB_PLUGIN_CANDIDATES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)


class ComponentError(BridgeError):
    """A real component did not start, or stopped answering."""


class ComponentMissingError(ComponentError):
    """A component is not installed; the message says how to install it."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def find_orthanc() -> tuple[Path, Path]:
    """The Orthanc executable and its DICOMweb plugin, or :class:`ComponentMissingError`."""
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if found is None:
        raise ComponentMissingError(
            f"Orthanc is not installed; install it with: {ORTHANC_INSTALL_COMMAND}"
        )
    for candidate in _DICOMWEB_PLUGIN_CANDIDATES:
        if candidate.exists():
            return Path(found), candidate
    raise ComponentMissingError(
        f"Orthanc's DICOMweb plugin is not installed; install it with: {ORTHANC_INSTALL_COMMAND}"
    )


def mlserver_venv() -> Path:
    """The MLServer virtual environment: ``DSF_BRIDGE_MLSERVER_VENV`` or the checkout's cache."""
    configured = os.environ.get("DSF_BRIDGE_MLSERVER_VENV")
    return Path(configured) if configured else _REPO_ROOT / ".cache" / "mlserver-venv"


def kserve_venv() -> Path:
    """The KServe virtual environment: ``DSF_BRIDGE_KSERVE_VENV`` or the checkout's cache."""
    configured = os.environ.get("DSF_BRIDGE_KSERVE_VENV")
    return Path(configured) if configured else _REPO_ROOT / ".cache" / "kserve-venv"


def _own_env(pythonpath: Path) -> dict[str, str]:
    """The environment of a server in a venv of its own: our venv's packages must not leak."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    }
    env["PYTHONPATH"] = str(pythonpath)
    return env


class _ChildProcess:
    """A server child process with a log file, stopped by PID (SIGTERM, then SIGKILL)."""

    name = "component"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _spawn(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - fixed executables, no shell
                list(command),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,  # a Ctrl-C at the terminal must not hit it first
            )
        _log.info("component.started", component=self.name, pid=self._process.pid)

    def _wait_until(self, probe: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.running:
                    raise ComponentError(
                        f"{self.name} exited during start-up; its log:\n{self.log_tail()}"
                    )
                try:
                    if probe(client):
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.stop()
        raise ComponentError(
            f"{self.name} was not ready after {timeout:.0f} s; its log:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
        _log.info("component.stopped", component=self.name, pid=process.pid)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class OrthancProcess(_ChildProcess):
    """An Orthanc archive with DICOMweb on ``base_url``/dicom-web, storing under ``workdir``."""

    name = "orthanc"

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        super().__init__(workdir)
        self.port = port if port is not None else free_port()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    def config(self, plugin: Path) -> dict[str, Any]:
        return {
            "Name": "dsf-bridge-sandbox",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }

    def start(self, timeout: float = 30.0) -> Self:
        executable, plugin = find_orthanc()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(plugin), indent=2))
        self._spawn([str(executable), str(config_path)])

        def ready(client: httpx.Client) -> bool:
            # /system answers before plugins finish; the DICOMweb root proves the plugin is up.
            response = client.get(f"{self.dicomweb_url}/studies")
            return response.status_code in (200, 204)

        self._wait_until(ready, timeout)
        return self


@dataclass(frozen=True)
class ModelSpec:
    """One model folder of an MLServer repository, served by ``implementation``: a runtime of
    ``refmodel/`` (the reference tissue-composition model unless named) or a stock MLServer
    runtime. ``train(folder, python)`` writes the model's files into its folder before MLServer
    starts, with ``python`` MLServer's interpreter; ``uri`` names the file the runtime loads;
    ``requires`` a module the runtime needs in MLServer's environment."""

    name: str
    version: str = "1"
    extra: Mapping[str, Any] = field(default_factory=dict)
    implementation: str = "tissue_model.TissueCompositionModel"
    uri: str | None = None
    requires: str | None = None
    train: Callable[[Path, Path], None] | None = None

    def settings(self) -> dict[str, Any]:
        parameters: dict[str, Any] = {"version": self.version}
        if self.uri is not None:
            parameters["uri"] = self.uri
        if self.extra:
            parameters["extra"] = dict(self.extra)
        return {
            "name": self.name,
            "implementation": self.implementation,
            "parameters": parameters,
        }


REFERENCE_MODEL = ModelSpec("tissue-composition")
#: The second reference model, ``my-model`` (``refmodel/nodule.py``): the worked example of a
#: provider's own contract (docs/examples/my-model.toml).
NODULE_MODEL = ModelSpec("my-model", implementation="nodule_model.NoduleModel")


def _train_density(folder: Path, python: Path) -> None:
    from dsf_bridge.omi.contract import resolve_contract  # noqa: PLC0415 - only when trained
    from dsf_bridge.sandbox.refmodel.density import train  # noqa: PLC0415

    train(folder, python, resolve_contract("ct-density"))


#: The second real model, ``ct-density`` (the shipped contract of that name): a scikit-learn
#: classifier over DICOM-derived features, trained when MLServer starts and served by
#: MLServer's stock scikit-learn runtime (the demo and the tests).
DENSITY_MODEL = ModelSpec(
    "ct-density",
    implementation="mlserver_sklearn.SKLearnModel",
    uri="./model.joblib",
    requires="mlserver_sklearn",
    train=_train_density,
)


class MLServerProcess(_ChildProcess):
    """MLServer serving the reference model (and test variants of it) on ``base_url``."""

    name = "mlserver"

    def __init__(
        self,
        workdir: Path,
        *,
        models: Sequence[ModelSpec] = (REFERENCE_MODEL,),
        venv: Path | None = None,
        port: int | None = None,
    ) -> None:
        super().__init__(workdir)
        self.models = tuple(models)
        self.venv = venv if venv is not None else mlserver_venv()
        self.port = port if port is not None else free_port()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self) -> dict[str, Any]:
        return {
            "debug": False,
            "parallel_workers": 0,
            "host": "127.0.0.1",
            "http_port": self.port,
            "grpc_port": free_port(),
            "metrics_endpoint": None,
            "load_models_at_startup": True,
        }

    def start(self, timeout: float = 90.0) -> Self:
        executable = self.venv / "bin" / "mlserver"
        if not executable.exists():
            raise ComponentMissingError(
                f"the MLServer environment is missing at {self.venv}; create it with: "
                f"{MLSERVER_SETUP_COMMAND}"
            )
        for model in self.models:
            if model.requires is not None and not any(
                (path / model.requires).is_dir()
                for path in self.venv.glob("lib/python3*/site-packages")
            ):
                raise ComponentMissingError(
                    f"the MLServer environment at {self.venv} lacks {model.requires} (model "
                    f"{model.name}); rebuild it with: {MLSERVER_SETUP_COMMAND}"
                )
        repository = self.workdir / "models"
        repository.mkdir(parents=True, exist_ok=True)
        (repository / "settings.json").write_text(json.dumps(self.settings(), indent=2))
        for model in self.models:
            folder = repository / model.name
            folder.mkdir(exist_ok=True)
            (folder / "model-settings.json").write_text(json.dumps(model.settings(), indent=2))
            if model.train is not None:
                model.train(folder, self.venv / "bin" / "python")
        # Only MLServer's venv on the path: our own venv's packages must not leak into it.
        self._spawn([str(executable), "start", str(repository)], env=_own_env(_REFMODEL_DIR))
        ready_models = [model.name for model in self.models if model.extra.get("ready", True)]

        def ready(client: httpx.Client) -> bool:
            # /v2/health/ready is false while any model is not ready, and tests serve one on
            # purpose; so: live, plus every model that should become ready.
            if client.get(f"{self.base_url}/v2/health/live").status_code != 200:
                return False
            return all(
                client.get(f"{self.base_url}/v2/models/{name}/ready").status_code == 200
                for name in ready_models
            )

        self._wait_until(ready, timeout)
        return self


class KServeProcess(_ChildProcess):
    """KServe's Python model server serving the reference model as ``model`` on ``base_url``
    (``refmodel/kserve_model.py``; REST only, gRPC off)."""

    name = "kserve"

    def __init__(
        self,
        workdir: Path,
        *,
        model: str = REFERENCE_MODEL.name,
        venv: Path | None = None,
        port: int | None = None,
    ) -> None:
        super().__init__(workdir)
        self.model = model
        self.venv = venv if venv is not None else kserve_venv()
        self.port = port if port is not None else free_port()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Self:
        python = self.venv / "bin" / "python"
        if not (python.exists() and any(self.venv.glob("lib/python3*/site-packages/kserve"))):
            raise ComponentMissingError(
                f"the KServe environment is missing at {self.venv}; create it with: "
                f"{KSERVE_SETUP_COMMAND}"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            str(python),
            str(_REFMODEL_DIR / "kserve_model.py"),
            f"--model_name={self.model}",
            f"--http_port={self.port}",
            f"--grpc_port={free_port()}",
            "--enable_grpc=false",
            "--workers=1",
        ]
        self._spawn(command, env=_own_env(_REFMODEL_DIR))

        def ready(client: httpx.Client) -> bool:
            response = client.get(f"{self.base_url}/v2/models/{self.model}/ready")
            return response.status_code == 200

        self._wait_until(ready, timeout)
        return self
