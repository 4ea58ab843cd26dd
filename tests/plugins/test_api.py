"""The plugin API: placeholders, the handler registry, plugins from folders and entry points."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from dsf_bridge.errors import ProcessModelError
from dsf_bridge.plugins import (
    HandlerContext,
    HandlerRegistry,
    Placeholders,
    ProcessPlugin,
    discover_plugins,
    plugin_from_folder,
    resource_version,
)
from dsf_bridge.plugins.loader import process_key
from dsf_bridge.plugins.placeholders import PlaceholderError
from dsf_bridge.runtime.testing import ProcessHarness
from tests.reference import reference_dir

PING_PONG = "dsf-process-ping-pong/src/main/resources"


def test_resource_version_and_placeholders() -> None:
    assert resource_version("1.0.1.0") == "1.0"
    with pytest.raises(PlaceholderError, match=r"not 'a\.b\.c\.d'"):
        resource_version("1.0")
    values = Placeholders("1.2", "2026-02-03", "org.example", {"SOME_PROPERTY": "x"})
    text = "#{version}|#{date}|#{organization}|#{some.property}|#{ some-property }"
    assert values.replace(text) == "1.2|2026-02-03|org.example|x|x"
    with pytest.raises(
        PlaceholderError, match=r"file\.xml: placeholder #\{other\.thing\}.*OTHER_THING"
    ):
        values.replace("#{other.thing}", source="file.xml")


def test_placeholders_with_defaults_as_spring_resolves_them() -> None:
    """DSF hands #{name:default} to Spring as ${name:default}: the property when it is set,
    else the default (which may be empty or hold colons); no default and unset is an error."""
    values = Placeholders("1.0", "2026-01-01", "org.example", {"DEV_DSF_TIMEOUT": "PT1H"})
    assert values.replace("#{dev.dsf.timeout:PT24H}") == "PT1H"
    assert values.replace("#{dev.dsf.other:PT24H}") == "PT24H"
    assert values.replace("#{dev.dsf.other:}") == ""
    assert values.replace("#{dev.dsf.url:https://x.test:8443/fhir}") == "https://x.test:8443/fhir"
    with pytest.raises(PlaceholderError, match=r"#\{dev\.dsf\.other\}.*DEV_DSF_OTHER.*default"):
        values.replace("#{dev.dsf.other}")


def test_registry_decorators_and_missing_handlers() -> None:
    handlers = HandlerRegistry()

    @handlers.service("a.B")
    def service(ctx: HandlerContext) -> None:
        ctx.set("x", 1)

    assert "a.B" in handlers
    assert handlers.get("a.B") is not None
    assert handlers.get("a.B").kind == "service"  # type: ignore[union-attr]
    with pytest.raises(ProcessModelError, match="registered twice"):
        handlers.register("a.B", "service", lambda ctx: None)
    # Registering the same function again is harmless (module reloads).
    handlers.register("a.B", "service", service)
    assert len(handlers) == 1


def _ping_pong_plugin(handlers: HandlerRegistry) -> ProcessPlugin:
    return plugin_from_folder(
        reference_dir() / PING_PONG,
        name="ping-pong",
        version="1.0.1.0",
        release_date=date(2026, 1, 1),
        handlers=handlers,
    )


def test_plugin_from_folder_maps_activity_definitions_to_processes() -> None:
    plugin = _ping_pong_plugin(HandlerRegistry())
    assert plugin.resource_version == "1.0"
    assert sorted(plugin.fhir_resources) == ["dsfdev_ping", "dsfdev_pingAutostart", "dsfdev_pong"]
    ping_files = {path.name for path in plugin.fhir_resources["dsfdev_ping"]}
    assert "dsf-ping.xml" in ping_files
    assert "dsf-pong.xml" not in ping_files
    assert "dsf-task-ping.xml" in ping_files  # shared resources go with every process
    assert process_key("http://medizininformatik-initiative.de/bpe/Process/dataSend|1.0") == (
        "medizininformatik-initiativede_dataSend"
    )


def test_load_refuses_models_with_unregistered_handlers() -> None:
    with pytest.raises(ProcessModelError, match=r"no handler registered for dev\.dsf\.bpe\."):
        _ping_pong_plugin(HandlerRegistry()).load(organization="org.example", environment={})


async def test_loaded_plugin_runs_with_its_handlers() -> None:
    handlers = HandlerRegistry()
    for name in (
        "dev.dsf.bpe.service.LogPing",
        "dev.dsf.bpe.service.LogPong",
        "dev.dsf.bpe.service.LogNoResponse",
        "dev.dsf.bpe.service.LogSendError",
        "dev.dsf.bpe.service.SaveResults",
        "dev.dsf.bpe.service.SelectPingTargets",
        "dev.dsf.bpe.service.SetTargetAndConfigureTimer",
        "dev.dsf.bpe.listener.SetCorrelationKeyListener",
        "dev.dsf.bpe.message.SendPing",
        "dev.dsf.bpe.message.SendStartPing",
        "dev.dsf.bpe.message.SendPong",
    ):
        handlers.register(name, "service", lambda ctx: None)

    @handlers.service("dev.dsf.bpe.service.SelectPongTarget")
    def select(ctx: HandlerContext) -> None:
        ctx.set("target", {"correlationKey": "ck"})

    loaded = _ping_pong_plugin(handlers).load(organization="org.example", environment={})
    assert sorted(loaded.definitions) == ["dsfdev_ping", "dsfdev_pingAutostart", "dsfdev_pong"]
    activity = dict(loaded.resources["dsfdev_ping"])
    published = next(data for path, data in activity.items() if path.name == "dsf-ping.xml")
    assert b"#{" not in published
    assert b"task-start-ping|1.0" in published
    async with ProcessHarness(list(loaded.definitions.values()), handlers) as harness:
        instance = await harness.start("dsfdev_pong", "ping", business_key="bk")
        assert instance.status == "completed"
        assert harness.sent[0].correlation_key == "ck"


@pytest.fixture
def installed_plugin(tmp_path: Path) -> Iterator[Path]:
    """A real distribution on sys.path declaring a ``dsf_bridge.plugins`` entry point."""
    package = tmp_path / "demo_plugin_pkg.py"
    package.write_text(
        "from datetime import date\n"
        "from pathlib import Path\n"
        "from dsf_bridge.plugins import ProcessPlugin\n"
        f"ROOT = Path({str(reference_dir() / PING_PONG)!r})\n"
        "def make():\n"
        "    return ProcessPlugin(name='demo', version='1.0.0.0', release_date=date(2026, 1, 1),\n"
        "                         bpmn_files=(ROOT / 'bpe/pong.bpmn',))\n"
    )
    dist = tmp_path / "demo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dsf_bridge.plugins]\ndemo = demo_plugin_pkg:make\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("demo_plugin_pkg", None)


def test_entry_point_discovery(installed_plugin: Path) -> None:
    plugins = discover_plugins()
    demo = [plugin for plugin in plugins if plugin.name == "demo"]
    assert len(demo) == 1
    assert demo[0].bpmn_files[0].name == "pong.bpmn"


def test_property_placeholders_with_defaults_in_fhir_resources() -> None:
    values = Placeholders("1.0", "2026-01-01", "org.example", {"DEV_DSF_X": "from-env"})
    text = "${dev.dsf.x:default}|${dev.dsf.y:fallback}|${dev.dsf.z}|#{version}"
    assert values.replace_fhir_bytes(text.encode()) == b"from-env|fallback|${dev.dsf.z}|1.0"
    allow_list = (
        reference_dir()
        / "dsf-process-allow-list/src/main/resources/fhir/ActivityDefinition"
        / "dsf-update-allow-list.xml"
    )
    published = values.replace_fhir_bytes(allow_list.read_bytes())
    assert b'<value value="hs-heilbronn.de" />' in published
    assert b"${" not in published
