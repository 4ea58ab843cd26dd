"""Drop-in plugins (``[plugins] folder``): plugin folders and wheels load with the checks of an
installed plugin; a bad one is reported and left out, the good ones still load and run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog.testing

from dsf_bridge.errors import ConfigError
from dsf_bridge.plugins.dropin import load_plugin_folder, site_plugins
from dsf_bridge.plugins.loader import discover_plugins
from dsf_bridge.runtime.testing import ProcessHarness

ROOT = Path(__file__).resolve().parents[2]

BPMN = """<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL"
    xmlns:camunda="http://camunda.org/schema/1.0/bpmn" id="d" targetNamespace="http://x">
  <bpmn:process id="{domain}_{name}" isExecutable="true" camunda:versionTag="#{{version}}">
    <bpmn:startEvent id="Start">
      <bpmn:outgoing>f1</bpmn:outgoing>
      <bpmn:messageEventDefinition messageRef="m_start" />
    </bpmn:startEvent>
    <bpmn:serviceTask id="Work" camunda:class="{handler}">
      <bpmn:incoming>f1</bpmn:incoming>
      <bpmn:outgoing>f2</bpmn:outgoing>
    </bpmn:serviceTask>
    <bpmn:endEvent id="Done">
      <bpmn:incoming>f2</bpmn:incoming>
    </bpmn:endEvent>
    <bpmn:sequenceFlow id="f1" sourceRef="Start" targetRef="Work" />
    <bpmn:sequenceFlow id="f2" sourceRef="Work" targetRef="Done" />
  </bpmn:process>
  <bpmn:message id="m_start" name="start{name}" />
</bpmn:definitions>
"""

HANDLERS = """from dsf_bridge.plugins import HandlerContext, HandlerRegistry

handlers = HandlerRegistry()


@handlers.service("{handler}")
def work(ctx: HandlerContext) -> None:
    ctx.set("greeting", "hello from {name}")
"""


def _activity_definition(name: str) -> dict[str, object]:
    """The ping-autostart ActivityDefinition we ship, renamed to process ``name``."""
    template = ROOT / "profiles/pingpong/ActivityDefinition/ping-autostart.json"
    resource: dict[str, object] = json.loads(template.read_text())
    resource["url"] = f"http://example.org/bpe/Process/{name}"
    resource["name"] = name.capitalize()
    return resource


def plugin_folder(folder: Path, name: str, *, module: str | None = "handlers") -> Path:
    """A plugin folder as an administrator drops it in: plugin.toml, bpe/, fhir/, a module."""
    handler = f"org.example.{name}.Work"
    (folder / "bpe").mkdir(parents=True)
    (folder / "bpe" / f"{name}.bpmn").write_text(
        BPMN.format(domain="exampleorg", name=name, handler=handler)
    )
    (folder / "fhir" / "ActivityDefinition").mkdir(parents=True)
    (folder / "fhir" / "ActivityDefinition" / f"{name}.json").write_text(
        json.dumps(_activity_definition(name), indent=2)
    )
    manifest = f'name = "{name}"\nversion = "1.0.0.0"\nrelease_date = 2026-02-01\n'
    if module is not None:
        manifest += f'module = "{module}"\n'
        (folder / f"{module}.py").write_text(HANDLERS.format(handler=handler, name=name))
    (folder / "plugin.toml").write_text(manifest)
    folder.chmod(0o755)
    return folder


def wheel(directory: Path, name: str) -> Path:
    """A wheel of a plugin package ``{name}_plugin`` with a dsf_bridge.plugins entry point."""
    package = f"{name}_plugin"
    handler = f"org.example.{name}.Work"
    path = directory / f"{package}-1.0-py3-none-any.whl"
    code = HANDLERS.format(handler=handler, name=name) + (
        "\nfrom datetime import date\nfrom pathlib import Path\n"
        "from dsf_bridge.plugins import ProcessPlugin\n"
        f"plugin = ProcessPlugin(name={name!r}, version='1.0.0.0', release_date=date(2026, 2, 1),"
        f" bpmn_files=(Path(__file__).parent / '{name}.bpmn',), handlers=handlers)\n"
    )
    info = f"{package}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{package}/__init__.py", code)
        archive.writestr(
            f"{package}/{name}.bpmn", BPMN.format(domain="exampleorg", name=name, handler=handler)
        )
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n")
        archive.writestr(
            f"{info}/entry_points.txt", f"[dsf_bridge.plugins]\n{name} = {package}:plugin\n"
        )
        archive.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def plugins_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "plugins"
    folder.mkdir(mode=0o700)
    modules = set(sys.modules)
    path = list(sys.path)
    yield folder
    for added in set(sys.modules) - modules:  # what the drop-ins imported
        top = added.split(".", 1)[0]
        if top.startswith("dsf_bridge_dropin_") or top.endswith("_plugin"):
            del sys.modules[added]
    sys.path[:] = path


async def test_a_folder_plugin_loads_and_runs(plugins_dir: Path) -> None:
    plugin_folder(plugins_dir / "hello", "hello")
    found = load_plugin_folder(plugins_dir)

    assert found.rejected == []
    [plugin] = found.plugins
    assert (plugin.name, plugin.version) == ("hello", "1.0.0.0")
    assert found.sources == {"hello": plugins_dir / "hello"}
    assert [p.name for p in plugin.fhir_resources["exampleorg_hello"]] == ["hello.json"]
    loaded = plugin.load(organization="org.example", environment={})
    async with ProcessHarness(list(loaded.definitions.values()), plugin.handlers) as harness:
        instance = await harness.start("exampleorg_hello", "starthello", business_key="bk")
        await harness.advance(1)
        assert instance.status == "completed"
        assert instance.variables["greeting"] == "hello from hello"


def _broken_bpmn(folder: Path) -> None:
    plugin_folder(folder, "broken")
    (folder / "bpe" / "broken.bpmn").write_text("<bpmn:definitions")


def _import_error(folder: Path) -> None:
    plugin_folder(folder, "noimport")
    (folder / "handlers.py").write_text("import a_module_nobody_installed\n")


def _missing_handler(folder: Path) -> None:
    plugin_folder(folder, "nohandler", module=None)


def _invalid_resource(folder: Path) -> None:
    plugin_folder(folder, "badfhir")
    resource = _activity_definition("badfhir")
    # An authorization without the Task profile it admits: DSF would refuse every Task.
    authorization = resource["extension"][0]  # type: ignore[index]
    authorization["extension"] = [
        e for e in authorization["extension"] if e["url"] != "task-profile"
    ]
    (folder / "fhir" / "ActivityDefinition" / "badfhir.json").write_text(json.dumps(resource))


def _no_manifest(folder: Path) -> None:
    plugin_folder(folder, "nomanifest")
    (folder / "plugin.toml").unlink()


def _world_writable(folder: Path) -> None:
    plugin_folder(folder, "writable")
    folder.chmod(0o777)


def _exits(folder: Path) -> None:
    plugin_folder(folder, "exits")
    (folder / "handlers.py").write_text("import sys\nsys.exit(3)\n")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_broken_bpmn, "broken.bpmn"),
        (_import_error, "ModuleNotFoundError: No module named 'a_module_nobody_installed'"),
        (_missing_handler, "no handler registered for org.example.nohandler.Work"),
        (_invalid_resource, "badfhir.json: process-authorization 'startPingAutostart': needs"),
        (_no_manifest, "no plugin.toml"),
        (_world_writable, "writable by every user"),
        (_exits, "SystemExit: 3"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
def test_a_bad_plugin_is_reported_and_the_good_ones_still_load(
    plugins_dir: Path, make: object, reason: str
) -> None:
    plugin_folder(plugins_dir / "a-good", "good")
    assert callable(make)
    make(plugins_dir / "b-bad")
    plugin_folder(plugins_dir / "c-good", "other")

    with structlog.testing.capture_logs() as logs:
        found = load_plugin_folder(plugins_dir)

    assert [p.name for p in found.plugins] == ["good", "other"]
    [rejected] = found.rejected
    assert rejected.source == plugins_dir / "b-bad"
    assert reason in rejected.reason
    [error] = [e for e in logs if e["event"] == "plugin.rejected"]
    assert error["log_level"] == "error"
    assert error["source"] == str(plugins_dir / "b-bad")
    assert reason in error["reason"]


def test_a_drop_in_may_not_take_an_installed_plugins_process(plugins_dir: Path) -> None:
    copy = plugins_dir / "ping-again"
    plugin_folder(copy, "ping")
    # The same process key as the installed ping/pong plugin's ping.
    bpmn = copy / "bpe" / "ping.bpmn"
    bpmn.write_text(bpmn.read_text().replace("exampleorg_ping", "dsfdev_ping"))
    (copy / "fhir" / "ActivityDefinition" / "ping.json").unlink()

    plugins, found = site_plugins(plugins_dir)

    assert found is not None
    assert [r.reason for r in found.rejected] == [
        "plugin 'ping': process dsfdev_ping is already run by another plugin"
    ]
    assert [p.name for p in plugins] == [p.name for p in discover_plugins()]


def test_a_world_writable_folder_is_refused(plugins_dir: Path) -> None:
    plugin_folder(plugins_dir / "hello", "hello")
    plugins_dir.chmod(0o777)
    with pytest.raises(ConfigError, match=r"writable by every user.*chmod o-w"):
        load_plugin_folder(plugins_dir)
    with pytest.raises(ConfigError, match="is not a folder"):
        load_plugin_folder(plugins_dir / "hello" / "plugin.toml")


async def test_a_wheel_plugin_loads_and_runs(plugins_dir: Path, tmp_path: Path) -> None:
    wheel(plugins_dir, "wheeled")
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()

    found = load_plugin_folder(plugins_dir, unpack_to=unpacked)

    assert found.rejected == []
    [plugin] = found.plugins
    assert plugin.name == "wheeled"
    assert plugin.bpmn_files[0].is_relative_to(unpacked)
    # Its entry point is not unpacked: the wheel never passes for an installed plugin.
    assert "wheeled" not in [p.name for p in discover_plugins()]
    loaded = plugin.load(organization="org.example", environment={})
    async with ProcessHarness(list(loaded.definitions.values()), plugin.handlers) as harness:
        instance = await harness.start("exampleorg_wheeled", "startwheeled", business_key="bk")
        await harness.advance(1)
        assert instance.variables["greeting"] == "hello from wheeled"


def test_a_wheel_that_would_shadow_an_installed_module_is_rejected(
    plugins_dir: Path, tmp_path: Path
) -> None:
    path = wheel(plugins_dir, "json")  # a package json_plugin: fine
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("json/__init__.py", "raise SystemExit('must never run')\n")

    found = load_plugin_folder(plugins_dir, unpack_to=tmp_path)

    assert found.plugins == []
    assert "its modules json already exist" in found.rejected[0].reason


def test_plugins_list_shows_loaded_and_rejected_drop_ins(plugins_dir: Path, tmp_path: Path) -> None:
    plugin_folder(plugins_dir / "hello", "hello")
    _import_error(plugins_dir / "noimport")
    config = tmp_path / "bridge.toml"
    config.write_text(f'[plugins]\nfolder = "{plugins_dir}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSF_BRIDGE_")}
    done = subprocess.run(
        [sys.executable, "-m", "dsf_bridge", "plugins", "list", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    listing = json.loads(done.stdout)
    rows = {row["name"]: row for row in listing["plugins"]}
    assert rows["hello"]["source"] == str(plugins_dir / "hello")
    assert rows["hello"]["processes"] == ["exampleorg_hello"]
    assert rows["dsf-bridge-ping-pong"]["source"] == "installed"
    [rejected] = listing["rejected"]
    assert rejected["source"] == str(plugins_dir / "noimport")
    assert "a_module_nobody_installed" in rejected["reason"]


def test_a_wheel_that_fails_its_checks_leaves_nothing_importable(
    plugins_dir: Path, tmp_path: Path
) -> None:
    path = wheel(plugins_dir, "unchecked")
    with zipfile.ZipFile(path, "a") as archive:  # a second model naming an unknown handler
        archive.writestr(
            "unchecked_plugin/other.bpmn",
            BPMN.format(domain="exampleorg", name="other", handler="org.example.Missing"),
        )
        code = archive.read("unchecked_plugin/__init__.py").decode()
    rewritten = tmp_path / "rewritten.whl"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(rewritten, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "unchecked_plugin/__init__.py":
                data = code.replace(
                    "bpmn_files=(Path(__file__).parent / 'unchecked.bpmn',)",
                    "bpmn_files=(Path(__file__).parent / 'unchecked.bpmn', "
                    "Path(__file__).parent / 'other.bpmn')",
                ).encode()
            target.writestr(item, data)
    rewritten.replace(path)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()

    found = load_plugin_folder(plugins_dir, unpack_to=unpacked)

    assert found.plugins == []
    assert "no handler registered for org.example.Missing" in found.rejected[0].reason
    assert not any(entry.startswith(str(unpacked)) for entry in sys.path)
    assert "unchecked_plugin" not in sys.modules


def test_a_second_copy_of_a_plugin_runs_no_code_and_leaves_the_first_alone(
    plugins_dir: Path,
) -> None:
    """An old version left beside the new one: the second copy's module is never imported,
    and the accepted copy's module stays the one in sys.modules."""
    plugin_folder(plugins_dir / "a-old", "hello")
    plugin_folder(plugins_dir / "b-new", "hello")
    with (plugins_dir / "a-old" / "handlers.py").open("a") as module:
        module.write("\nCOPY = 'old'\n")
    with (plugins_dir / "b-new" / "handlers.py").open("a") as module:
        module.write("\nraise RuntimeError('the second copy ran')\n")

    found = load_plugin_folder(plugins_dir)

    assert [r.reason for r in found.rejected] == ["plugin name 'hello' is already taken"]
    assert [p.name for p in found.plugins] == ["hello"]
    assert found.sources == {"hello": plugins_dir / "a-old"}
    assert sys.modules["dsf_bridge_dropin_hello"].COPY == "old"


def test_plugins_whose_names_spell_one_module_name_keep_their_own_modules(
    plugins_dir: Path,
) -> None:
    """Plugins "x-y" and "x_y" once shared dsf_bridge_dropin_x_y: a package plugin's submodules
    (found through sys.modules) were then the other plugin's."""
    for folder, name, word in (("p1", "x-y", "first"), ("p2", "x_y", "second")):
        plugin_folder(plugins_dir / folder, "xy", module=None)
        manifest = plugins_dir / folder / "plugin.toml"
        manifest.write_text(
            manifest.read_text().replace('name = "xy"', f'name = "{name}"') + 'module = "pkg"\n'
        )
        bpmn = plugins_dir / folder / "bpe" / "xy.bpmn"
        bpmn.write_text(bpmn.read_text().replace("exampleorg_xy", f"exampleorg_{folder}"))
        (plugins_dir / folder / "fhir").rename(plugins_dir / f".{folder}-fhir")
        package = plugins_dir / folder / "pkg"
        package.mkdir()
        (package / "__init__.py").write_text("from .work import handlers\n")
        (package / "work.py").write_text(HANDLERS.format(handler="org.example.xy.Work", name=word))

    found = load_plugin_folder(plugins_dir)

    assert found.rejected == []
    greetings = {}
    for plugin in found.plugins:
        handler = plugin.handlers.get("org.example.xy.Work")
        assert handler is not None
        module = sys.modules[handler.function.__module__]
        greetings[plugin.name] = module.__name__, module.__file__
    assert greetings["x-y"][1] == str(plugins_dir / "p1" / "pkg" / "work.py")
    assert greetings["x_y"][1] == str(plugins_dir / "p2" / "pkg" / "work.py")
    assert greetings["x-y"][0] != greetings["x_y"][0]


def test_a_plugin_rejected_after_its_import_leaves_no_module(plugins_dir: Path) -> None:
    _broken_bpmn(plugins_dir / "broken")
    found = load_plugin_folder(plugins_dir)
    assert len(found.rejected) == 1
    assert not [m for m in sys.modules if m.startswith("dsf_bridge_dropin_broken")]


def test_an_import_raising_a_base_exception_stops_no_one(plugins_dir: Path) -> None:
    plugin_folder(plugins_dir / "a-cancels", "cancels")
    (plugins_dir / "a-cancels" / "handlers.py").write_text(
        "import asyncio\nraise asyncio.CancelledError()\n"
    )
    plugin_folder(plugins_dir / "b-good", "good")
    found = load_plugin_folder(plugins_dir)
    assert [p.name for p in found.plugins] == ["good"]
    assert [r.reason for r in found.rejected] == ["CancelledError: "]


@pytest.mark.parametrize("link", [False, True], ids=["file", "linked file"])
def test_a_world_writable_file_in_a_plugin_is_rejected(
    plugins_dir: Path, tmp_path: Path, link: bool
) -> None:
    folder = plugin_folder(plugins_dir / "hello", "hello")
    module = folder / "handlers.py"
    if link:
        elsewhere = tmp_path / "shared"
        elsewhere.mkdir()
        (elsewhere / "handlers.py").write_text(module.read_text())
        elsewhere.chmod(0o777)  # anyone may replace the file the link points to
        module.unlink()
        module.symlink_to(elsewhere / "handlers.py")
    else:
        module.chmod(0o666)
    found = load_plugin_folder(plugins_dir)
    assert found.plugins == []
    [rejected] = found.rejected
    assert rejected.reason == f"{module} is writable by every user (chmod o-w)"


def test_a_wheel_naming_one_plugin_twice_is_rejected(plugins_dir: Path) -> None:
    """Two entry points of one wheel are checked against each other too: one plugin twice
    (or two running one process) would be deployed twice."""
    path = wheel(plugins_dir, "twice")
    with zipfile.ZipFile(path) as archive:
        files = {item.filename: archive.read(item) for item in archive.infolist()}
    files["twice_plugin-1.0.dist-info/entry_points.txt"] = (
        b"[dsf_bridge.plugins]\ntwice = twice_plugin:plugin\nagain = twice_plugin:plugin\n"
    )
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)

    found = load_plugin_folder(plugins_dir)

    assert found.plugins == []
    assert [r.reason for r in found.rejected] == ["plugin name 'twice' is already taken"]
    assert "twice_plugin" not in sys.modules
