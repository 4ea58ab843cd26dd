"""The instance page's words for where tokens stand (read through the engine's state codec) and
its process diagram (BPMN-DI drawn as SVG)."""

from __future__ import annotations

import json
from pathlib import Path

from lxml import etree

from dsf_bridge.api.diagram import Diagram, DiagramLibrary, Mark, read_diagram, render_svg
from dsf_bridge.api.ui import INSTANCE_STATUSES, describe_state
from dsf_bridge.engine.safexml import read_xml_file
from dsf_bridge.plugins.inference import plugin as inference_plugin
from dsf_bridge.plugins.pingpong import plugin as pingpong_plugin
from tests.reference import reference_file

DATA = Path(__file__).parents[1] / "engine" / "data"


def test_statuses_are_the_store_labels() -> None:
    assert INSTANCE_STATUSES == ("running", "completed", "failed")


def test_describe_state_words_waits_boundaries_and_incidents() -> None:
    state = json.loads((DATA / "states_v1.json").read_text())["working"]
    state["tk"]["4"]["bw"] = [["cancelReview", "m", "cancel"]]
    state["tk"]["16"]["x"] = {"m": "RuntimeError: down", "e": "work", "at": "2026-01-01T00:05Z"}
    rows = {row["token"]: row for row in describe_state(state)}
    assert list(rows) == ["1", "2", "3", "4", "7", "8", "10", "11", "13", "16"]  # oldest first
    assert rows["1"] == {
        "token": "1",
        "element": "sub",
        "phase": "inside an embedded subprocess",
        "waiting_for": "timer 1/subLate/5 at boundary event subLate",
        "incident": "",
    }
    assert rows["4"]["phase"] == "user task (QuestionnaireResponse)"
    assert rows["4"]["waiting_for"] == "message cancel at boundary event cancelReview"
    assert (
        rows["10"]["waiting_for"] == "message answer at waitAnswer; timer 10/timeout/14 at timeout"
    )
    assert rows["16"]["phase"] == "handler running"
    assert rows["16"]["incident"] == "incident: RuntimeError: down"


# -- diagrams ------------------------------------------------------------------------------

SHIPPED = Path(__file__).parents[2] / "bpmn"
REQUEST_REPLY = Path(__file__).parents[1] / "runtime" / "request_reply.bpmn"
NO_DI = b"""<?xml version="1.0" encoding="UTF-8"?>
<bpmn:definitions xmlns:bpmn="http://www.omg.org/spec/BPMN/20100524/MODEL" id="d">
  <bpmn:process id="testorg_plain" isExecutable="true"><bpmn:startEvent id="S" /></bpmn:process>
</bpmn:definitions>
"""


def _diagram(path: Path, key: str) -> Diagram:
    drawn = read_diagram(read_xml_file(path), key, str(path))
    assert drawn is not None
    return drawn


def test_the_dsf_ping_model_is_read_from_its_bpmn_di() -> None:
    """The Java plugin's own ping.bpmn (drawn in the Camunda Modeler): every shape and edge."""
    path = reference_file("dsf-process-ping-pong/src/main/resources/bpe/ping.bpmn")
    root = read_xml_file(path)
    diagram = _diagram(path, "dsfdev_ping")
    shapes = {shape.element: shape for shape in diagram.shapes}
    assert len(shapes) == len(root.findall(".//{*}BPMNShape"))
    assert len(diagram.edges) == len(root.findall(".//{*}BPMNEdge"))
    assert shapes["SubProcess"].expanded
    assert shapes["PongTimer"].event == "timer"
    assert shapes["EventBasedGateway"].kind == "eventBasedGateway"
    # Outer shapes first, so that the subprocess does not hide what it contains.
    order = [shape.element for shape in diagram.shapes]
    assert order.index("SubProcess") < order.index("PongCatchEvent")
    flow = next(edge for edge in diagram.edges if edge.element == "Flow_0y9usku")
    assert len(flow.points) >= 2
    assert (flow.source, flow.target) != ("", "")


def test_the_svg_draws_each_kind_with_its_shape_and_mark() -> None:
    diagram = _diagram(REQUEST_REPLY, "testorg_requestReply")
    marks = {"Prepare": Mark.COMPLETED, "Wait": Mark.ACTIVE, "StoreResult": Mark.INCIDENT}
    svg = etree.fromstring(render_svg(diagram, marks))
    groups = {g.get("data-element"): g for g in svg.iter("g")}
    assert _attr(groups["Prepare"], "class") == "element serviceTask completed"
    assert _attr(_child(groups["Prepare"], "rect"), "rx") == "10"  # a rounded rectangle
    assert "Prepare" in "".join(str(t) for t in _child(groups["Prepare"], "text").itertext())
    assert groups["Start"].find("circle") is not None
    assert _attr(groups["Wait"], "class") == "element eventBasedGateway active"
    assert len(_attr(_child(groups["Wait"], "polygon"), "points").split()) == 4  # a diamond
    assert _attr(groups["StoreResult"], "class").endswith("incident")
    assert _attr(groups["HandleTimeout"], "class") == "element serviceTask"
    assert _attr(_child(groups["f1"], "polyline"), "marker-end") == "url(#arrow)"
    assert {m.get("id") for m in svg.iter("marker")} >= {"arrow", "arrow-completed"}
    # Everything lies inside the view box.
    x, y, width, height = map(float, _attr(svg, "viewBox").split())
    for group in groups.values():
        for rect in group.iter("rect"):
            assert x <= float(_attr(rect, "x")) <= x + width
            assert y <= float(_attr(rect, "y")) <= y + height


def _child(element: etree._Element, tag: str) -> etree._Element:
    found = element.find(tag)
    assert found is not None, tag
    return found


def _attr(element: etree._Element, name: str) -> str:
    value = element.get(name)
    assert value is not None, name
    return str(value)


def test_names_and_ids_are_escaped_in_the_svg(tmp_path: Path) -> None:
    hostile = REQUEST_REPLY.read_text().replace(
        'id="Prepare"', 'id="Prepare" name="&lt;script&gt;alert(1)&lt;/script&gt; &amp; co"'
    )
    path = tmp_path / "hostile.bpmn"
    path.write_text(hostile)
    svg = render_svg(_diagram(path, "testorg_requestReply"))
    assert "<script>" not in svg
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in svg


def test_every_shipped_model_has_a_diagram_of_all_its_elements() -> None:
    """The models in bpmn/ carry BPMN-DI: each flow node and sequence flow is drawn."""
    for path in sorted(SHIPPED.glob("*.bpmn")):
        root = read_xml_file(path)
        [process] = root.findall("{*}process")
        diagram = _diagram(path, str(process.get("id")))
        drawn = {shape.element for shape in diagram.shapes}
        nodes = {
            e.get("id")
            for e in process.iter()
            if isinstance(e.tag, str)
            and e.get("id")
            and etree.QName(e).localname.endswith(("Event", "Task", "Gateway", "subProcess"))
        }
        flows = {e.get("id") for e in process.iter("{*}sequenceFlow")}
        redraw = "open it in a BPMN modeler (Camunda Modeler) and save it with its diagram"
        assert nodes <= drawn, f"{path.name}: {sorted(map(str, nodes - drawn))} not drawn: {redraw}"
        undrawn = flows - {edge.element for edge in diagram.edges}
        assert not undrawn, f"{path.name}: {sorted(map(str, undrawn))} not drawn: {redraw}"
        for shape in diagram.shapes:  # no two nodes on top of each other
            for other in diagram.shapes:
                if shape is other or shape.kind in ("subProcess", "boundaryEvent"):
                    continue
                if other.kind in ("subProcess", "boundaryEvent"):
                    continue
                apart = (
                    shape.x + shape.width <= other.x
                    or other.x + other.width <= shape.x
                    or shape.y + shape.height <= other.y
                    or other.y + other.height <= shape.y
                )
                assert apart, (path.name, shape.element, other.element)


def test_the_library_says_why_there_is_no_diagram(tmp_path: Path) -> None:
    plain = tmp_path / "plain.bpmn"
    plain.write_bytes(NO_DI)
    hostile = tmp_path / "hostile.bpmn"
    hostile.write_bytes(
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
        + NO_DI.split(b"?>", 1)[1].replace(b"testorg_plain", b"testorg_hostile")
    )
    library = DiagramLibrary()
    library.add(plain, version="1.0")
    library.add(REQUEST_REPLY, version="1.0")
    library.add(hostile, version="1.0")  # refused when offered: no process is known from it
    none, note = library.diagram("testorg_plain", "1.0")
    assert none is None
    assert "has no diagram interchange (BPMN-DI)" in note
    drawn, note = library.diagram("testorg_requestReply", "1.0")
    assert drawn is not None
    assert note == ""
    other, note = library.diagram("testorg_requestReply", "2.0")
    assert other is drawn or other == drawn
    assert "version 1.0" in note
    assert "runs version 2.0" in note
    missing, note = library.diagram("testorg_hostile", "1.0")
    assert missing is None
    assert "no deployed plugin here has a model for testorg_hostile" in note


def test_the_shipped_plugins_offer_their_models() -> None:
    library = DiagramLibrary([pingpong_plugin, inference_plugin])
    for key in ("dsfdev_ping", "dsfdev_pong", "dsf-bridgedev_inferenceRequest"):
        drawn, note = library.diagram(key, pingpong_plugin.resource_version)
        assert drawn is not None, key
    drawn, note = library.diagram("dsfdev_ping", pingpong_plugin.resource_version)
    assert note == ""
