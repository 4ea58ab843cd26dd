"""Process diagrams for the instance page: BPMN-DI read from the deployed models, drawn as SVG.

A model's diagram interchange (``bpmndi:BPMNShape`` bounds, ``bpmndi:BPMNEdge`` waypoints) is
read with the engine's safe XML reader (no DTD, no entities, no network, a size cap) and drawn
on the server as inline SVG: activities as rounded rectangles with their names, events as
circles, gateways as diamonds, sequence flows as polylines with arrows. Each element can carry
one mark (:class:`Mark`) that the page's stylesheet colours; no script and no inline style, so
the page's Content-Security-Policy stays strict. A model without DI has no diagram
(:func:`read_diagram` answers ``None``) and the page says so.

:class:`DiagramLibrary` finds the model of a deployed process among the plugins' BPMN files;
:func:`instance_marks` derives the marks of one instance from its engine state and audit trail.
"""

from __future__ import annotations

import enum
import math
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from dsf_bridge.engine import state as instance_state
from dsf_bridge.engine.exceptions import UnsafeXmlError
from dsf_bridge.engine.safexml import read_xml_file
from dsf_bridge.plugins.api import ProcessPlugin, progress_of

__all__ = [
    "Diagram",
    "DiagramLibrary",
    "Edge",
    "Mark",
    "Shape",
    "instance_marks",
    "read_diagram",
    "render_svg",
]

BPMN = "http://www.omg.org/spec/BPMN/20100524/MODEL"
BPMNDI = "http://www.omg.org/spec/BPMN/20100524/DI"
DC = "http://www.omg.org/spec/DD/20100524/DC"
DI = "http://www.omg.org/spec/DD/20100524/DI"

_ACTIVITIES = frozenset(
    {
        "task",
        "serviceTask",
        "sendTask",
        "receiveTask",
        "userTask",
        "scriptTask",
        "businessRuleTask",
        "manualTask",
        "callActivity",
        "subProcess",
        "transaction",
        "adHocSubProcess",
    }
)
_EVENTS = frozenset(
    {
        "startEvent",
        "endEvent",
        "intermediateCatchEvent",
        "intermediateThrowEvent",
        "boundaryEvent",
    }
)
_GATEWAYS = frozenset(
    {
        "exclusiveGateway",
        "parallelGateway",
        "inclusiveGateway",
        "eventBasedGateway",
        "complexGateway",
    }
)
# Elements a token passes without waiting (once it is past the element before them).
_PASSED_THROUGH = _GATEWAYS | {"endEvent", "intermediateThrowEvent"}
_MARGIN = 20.0
# Where audit reasons name an element (runtime.jobs, .timers, .delivery, .outbox, .effects):
# "<handler> at <element>", "async continuation at <element>", "<message> at <element>, ...",
# "at <element>: <error>" and "<element> due <time>".
_NAMED = re.compile(r"(?:^|\s)at ([A-Za-z_][\w.\-]*)|^([A-Za-z_][\w.\-]*) due ")


class Mark(enum.StrEnum):
    """How far an instance got at an element; the value is the element's CSS class."""

    COMPLETED = "completed"
    ACTIVE = "active"
    FAILED = "failed"
    INCIDENT = "incident"


@dataclass(frozen=True, slots=True)
class Shape:
    """One drawn flow node (or pool/lane) with its bounds."""

    element: str
    kind: str  # the BPMN tag without namespace: serviceTask, startEvent, exclusiveGateway, ...
    name: str
    x: float
    y: float
    width: float
    height: float
    event: str = ""  # message, timer, error, signal, conditional, terminate (events only)
    expanded: bool = False  # an expanded subprocess: its children are drawn inside it
    label: tuple[float, float, float, float] | None = None  # BPMNLabel bounds, when given


@dataclass(frozen=True, slots=True)
class Edge:
    """One drawn flow with its waypoints."""

    element: str
    kind: str  # sequenceFlow, messageFlow, association
    name: str
    source: str
    target: str
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True, slots=True)
class Diagram:
    """The diagram of one process: shapes (outer before inner) and edges, in model units."""

    process_key: str
    source: str
    shapes: tuple[Shape, ...]
    edges: tuple[Edge, ...]

    @property
    def elements(self) -> frozenset[str]:
        return frozenset(s.element for s in self.shapes) | frozenset(e.element for e in self.edges)

    def bounds(self) -> tuple[float, float, float, float]:
        """(min x, min y, max x, max y) over shapes, labels and waypoints."""
        xs: list[float] = []
        ys: list[float] = []
        for shape in self.shapes:
            xs += [shape.x, shape.x + shape.width]
            ys += [shape.y, shape.y + shape.height]
            if shape.label is not None:
                lx, ly, lw, lh = shape.label
                xs += [lx, lx + lw]
                ys += [ly, ly + lh]
            elif shape.name and shape.kind in _EVENTS | _GATEWAYS:  # a label drawn below
                half = max(shape.width * 3.5, 120) / 2
                xs += [shape.x + shape.width / 2 - half, shape.x + shape.width / 2 + half]
                ys.append(shape.y + shape.height + 30)
        for edge in self.edges:
            xs += [x for x, _ in edge.points]
            ys += [y for _, y in edge.points]
        if not xs:
            return (0.0, 0.0, 0.0, 0.0)
        return (min(xs), min(ys), max(xs), max(ys))


def _local(element: etree._Element) -> str:
    tag = element.tag
    return etree.QName(tag).localname if isinstance(tag, str) else ""


def _number(element: etree._Element, name: str) -> float:
    value = element.get(name)
    try:
        number = float(value) if value is not None else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{name}={value!r}")
    return number


def _bounds(element: etree._Element) -> tuple[float, float, float, float] | None:
    bounds = element.find(f"{{{DC}}}Bounds")
    if bounds is None:
        return None
    return (
        _number(bounds, "x"),
        _number(bounds, "y"),
        _number(bounds, "width"),
        _number(bounds, "height"),
    )


def _process_elements(process: etree._Element) -> dict[str, etree._Element]:
    """Every element with an id inside the process, subprocesses included."""
    found: dict[str, etree._Element] = {}
    for element in process.iter():
        ident = element.get("id") if isinstance(element.tag, str) else None
        if ident is not None and element is not process:
            found[ident] = element
    return found


def _event_kind(element: etree._Element) -> str:
    for child in element:
        name = _local(child)
        if name.endswith("EventDefinition"):
            return name.removesuffix("EventDefinition")
    return ""


def read_diagram(root: etree._Element, process_key: str, source: str) -> Diagram | None:
    """The diagram of process ``process_key`` in a parsed BPMN document; ``None`` when the
    document has no such process or no BPMN-DI for it. Raises :class:`ValueError` for DI
    whose coordinates are not numbers."""
    process = next((p for p in root.iter(f"{{{BPMN}}}process") if p.get("id") == process_key), None)
    if process is None:
        return None
    elements = _process_elements(process)
    # The pool of the process, when the model draws a collaboration.
    for participant in root.iter(f"{{{BPMN}}}participant"):
        if participant.get("processRef") == process_key and participant.get("id"):
            elements[str(participant.get("id"))] = participant
    shapes: list[Shape] = []
    edges: list[Edge] = []
    for shape in root.iter(f"{{{BPMNDI}}}BPMNShape"):
        element = elements.get(shape.get("bpmnElement") or "")
        bounds = _bounds(shape)
        if element is None or bounds is None:
            continue
        label = shape.find(f"{{{BPMNDI}}}BPMNLabel")
        kind = _local(element)
        shapes.append(
            Shape(
                element=str(element.get("id")),
                kind=kind,
                name=" ".join((element.get("name") or "").split()),
                x=bounds[0],
                y=bounds[1],
                width=bounds[2],
                height=bounds[3],
                event=_event_kind(element) if kind in _EVENTS else "",
                expanded=kind in {"subProcess", "transaction", "adHocSubProcess"}
                and shape.get("isExpanded", "true") != "false",
                label=_bounds(label) if label is not None else None,
            )
        )
    for edge in root.iter(f"{{{BPMNDI}}}BPMNEdge"):
        element = elements.get(edge.get("bpmnElement") or "")
        if element is None:
            continue
        points = tuple(
            (_number(point, "x"), _number(point, "y")) for point in edge.iter(f"{{{DI}}}waypoint")
        )
        if len(points) < 2:
            continue
        edges.append(
            Edge(
                element=str(element.get("id")),
                kind=_local(element),
                name=" ".join((element.get("name") or "").split()),
                source=element.get("sourceRef") or "",
                target=element.get("targetRef") or "",
                points=points,
            )
        )
    if not shapes:
        return None
    # Pools and expanded subprocesses first, so that what they contain is drawn on top.
    shapes.sort(key=lambda s: (s.kind not in {"participant", "lane"}, not s.expanded))
    return Diagram(process_key, source, tuple(shapes), tuple(edges))


# -- drawing -------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _sub(parent: etree._Element, tag: str, **attributes: str) -> etree._Element:
    return etree.SubElement(parent, tag, attributes)


def _frame(group: etree._Element, shape: Shape, css: str, **corners: str) -> None:
    """The rectangle of ``shape``'s bounds."""
    _sub(
        group,
        "rect",
        x=_fmt(shape.x),
        y=_fmt(shape.y),
        width=_fmt(shape.width),
        height=_fmt(shape.height),
        **corners,
        **{"class": css},
    )


def _text_lines(parent: etree._Element, lines: Sequence[str], cx: float, top: float) -> None:
    text = _sub(parent, "text", x=_fmt(cx), y=_fmt(top), **{"class": "label"})
    for index, line in enumerate(lines):
        span = _sub(text, "tspan", x=_fmt(cx), dy="0" if index == 0 else "1.2em")
        span.text = line


def _wrap(name: str, width: float) -> list[str]:
    columns = max(6, int(width / 6.5))
    lines = textwrap.wrap(name, columns, break_long_words=True) or [""]
    return lines[:4]


def _activity(group: etree._Element, shape: Shape) -> None:
    _frame(group, shape, "shape", rx="10", ry="10")
    lines = _wrap(shape.name or shape.element, shape.width - 8)
    if shape.expanded:
        _text_lines(group, lines[:1], shape.x + shape.width / 2, shape.y + 16)
        return
    # Vertically centred: 1.2em lines of about 12 px.
    top = shape.y + shape.height / 2 - (len(lines) - 1) * 7.2 + 4
    _text_lines(group, lines, shape.x + shape.width / 2, top)


def _event(group: etree._Element, shape: Shape) -> None:
    cx, cy = shape.x + shape.width / 2, shape.y + shape.height / 2
    r = min(shape.width, shape.height) / 2
    kind = {"endEvent": "end", "startEvent": "start"}.get(shape.kind, "intermediate")
    _sub(group, "circle", cx=_fmt(cx), cy=_fmt(cy), r=_fmt(r), **{"class": f"shape {kind}"})
    if kind == "intermediate":
        _sub(group, "circle", cx=_fmt(cx), cy=_fmt(cy), r=_fmt(r - 3), **{"class": "inner"})
    _event_glyph(group, shape.event, cx, cy, r)


def _event_glyph(group: etree._Element, event: str, cx: float, cy: float, r: float) -> None:
    s = r * 0.45
    if event == "message":
        _sub(
            group,
            "rect",
            x=_fmt(cx - s),
            y=_fmt(cy - s * 0.7),
            width=_fmt(2 * s),
            height=_fmt(1.4 * s),
            **{"class": "glyph"},
        )
        points = f"{_fmt(cx - s)},{_fmt(cy - s * 0.7)} {_fmt(cx)},{_fmt(cy)} "
        points += f"{_fmt(cx + s)},{_fmt(cy - s * 0.7)}"
        _sub(group, "polyline", points=points, **{"class": "glyph"})
    elif event == "timer":
        _sub(group, "circle", cx=_fmt(cx), cy=_fmt(cy), r=_fmt(s * 1.2), **{"class": "glyph"})
        hands = f"{_fmt(cx)},{_fmt(cy - s)} {_fmt(cx)},{_fmt(cy)} {_fmt(cx + s * 0.7)},{_fmt(cy)}"
        _sub(group, "polyline", points=hands, **{"class": "glyph"})
    elif event in {"error", "signal", "escalation", "conditional", "terminate", "link"}:
        if event == "terminate":
            _sub(group, "circle", cx=_fmt(cx), cy=_fmt(cy), r=_fmt(s * 1.3), **{"class": "fill"})
        elif event == "signal":
            points = f"{_fmt(cx)},{_fmt(cy - s)} {_fmt(cx + s)},{_fmt(cy + s * 0.8)} "
            points += f"{_fmt(cx - s)},{_fmt(cy + s * 0.8)}"
            _sub(group, "polygon", points=points, **{"class": "glyph"})
        else:
            letter = _sub(group, "text", x=_fmt(cx), y=_fmt(cy + 4), **{"class": "glyph-text"})
            letter.text = event[0].upper()


def _gateway(group: etree._Element, shape: Shape) -> None:
    cx, cy = shape.x + shape.width / 2, shape.y + shape.height / 2
    w, h = shape.width / 2, shape.height / 2
    points = " ".join(
        f"{_fmt(x)},{_fmt(y)}" for x, y in ((cx, cy - h), (cx + w, cy), (cx, cy + h), (cx - w, cy))
    )
    _sub(group, "polygon", points=points, **{"class": "shape"})
    s = min(w, h) * 0.4
    if shape.kind == "exclusiveGateway":
        path = f"M{_fmt(cx - s)},{_fmt(cy - s)} L{_fmt(cx + s)},{_fmt(cy + s)} "
        path += f"M{_fmt(cx + s)},{_fmt(cy - s)} L{_fmt(cx - s)},{_fmt(cy + s)}"
        _sub(group, "path", d=path, **{"class": "glyph thick"})
    elif shape.kind in {"parallelGateway", "complexGateway"}:
        path = f"M{_fmt(cx)},{_fmt(cy - s * 1.2)} L{_fmt(cx)},{_fmt(cy + s * 1.2)} "
        path += f"M{_fmt(cx - s * 1.2)},{_fmt(cy)} L{_fmt(cx + s * 1.2)},{_fmt(cy)}"
        _sub(group, "path", d=path, **{"class": "glyph thick"})
    elif shape.kind == "inclusiveGateway":
        _sub(group, "circle", cx=_fmt(cx), cy=_fmt(cy), r=_fmt(s), **{"class": "glyph thick"})
    elif shape.kind == "eventBasedGateway":
        _sub(group, "circle", cx=_fmt(cx), cy=_fmt(cy), r=_fmt(s * 1.1), **{"class": "glyph"})
        pentagon = " ".join(
            f"{_fmt(cx + s * 0.7 * math.sin(a))},{_fmt(cy - s * 0.7 * math.cos(a))}"
            for a in (2 * math.pi * i / 5 for i in range(5))
        )
        _sub(group, "polygon", points=pentagon, **{"class": "glyph"})


def _outside_label(group: etree._Element, shape: Shape) -> None:
    if not shape.name:
        return
    if shape.label is not None and shape.label[2] > 0:
        lx, ly, lw, _lh = shape.label
        lines = _wrap(shape.name, max(lw, 60))
        _text_lines(group, lines, lx + lw / 2, ly + 10)
        return
    lines = _wrap(shape.name, max(shape.width * 3.5, 120))
    _text_lines(group, lines, shape.x + shape.width / 2, shape.y + shape.height + 14)


def render_svg(diagram: Diagram, marks: Mapping[str, Mark] | None = None) -> str:
    """The diagram as one ``<svg>`` element (a string for the page): every element is a group
    ``<g class="element <kind> <mark>" data-element="<id>">`` with a ``<title>``."""
    marks = marks or {}
    x0, y0, x1, y1 = diagram.bounds()
    width, height = x1 - x0 + 2 * _MARGIN, y1 - y0 + 2 * _MARGIN
    # No namespace: inline in HTML, the parser puts <svg> and its children in SVG's.
    svg = etree.Element(
        "svg",
        {
            "viewBox": f"{_fmt(x0 - _MARGIN)} {_fmt(y0 - _MARGIN)} {_fmt(width)} {_fmt(height)}",
            "width": _fmt(width),
            "height": _fmt(height),
            "role": "img",
            "class": "bpmn",
            "id": "diagram",
        },
    )
    title = _sub(svg, "title")
    title.text = f"BPMN diagram of {diagram.process_key}"
    defs = _sub(svg, "defs")
    for mark in ("", *Mark):
        marker = _sub(
            defs,
            "marker",
            id=f"arrow{'-' + mark if mark else ''}",
            viewBox="0 0 10 10",
            refX="10",
            refY="5",
            markerUnits="userSpaceOnUse",  # the same size on thick (marked) flows
            markerWidth="10",
            markerHeight="10",
            orient="auto-start-reverse",
        )
        _sub(marker, "path", d="M0,0 L10,5 L0,10 z", **{"class": f"arrow {mark}".strip()})
    for shape in diagram.shapes:
        mark = marks.get(shape.element)
        classes = " ".join(c for c in ("element", shape.kind, mark or "") if c)
        group = _sub(svg, "g", **{"class": classes, "data-element": shape.element})
        tip = _sub(group, "title")
        tip.text = " · ".join(p for p in (shape.name, shape.element, mark or "") if p)
        if shape.kind in _ACTIVITIES:
            _activity(group, shape)
        elif shape.kind in _EVENTS:
            _event(group, shape)
            _outside_label(group, shape)
        elif shape.kind in _GATEWAYS:
            _gateway(group, shape)
            _outside_label(group, shape)
        else:  # pools, lanes, data objects, annotations: a frame with the name
            _frame(group, shape, "shape frame")
            if shape.name:
                _text_lines(group, [shape.name], shape.x + shape.width / 2, shape.y + 14)
    for edge in diagram.edges:
        mark = marks.get(edge.element)
        classes = " ".join(c for c in ("flow", edge.kind, mark or "") if c)
        group = _sub(svg, "g", **{"class": classes, "data-element": edge.element})
        tip = _sub(group, "title")
        tip.text = " · ".join(p for p in (edge.name, edge.element, mark or "") if p)
        attributes = {
            "points": " ".join(f"{_fmt(x)},{_fmt(y)}" for x, y in edge.points),
            "class": "line",
        }
        if edge.kind in {"sequenceFlow", "messageFlow"}:
            attributes["marker-end"] = f"url(#arrow{'-' + mark if mark else ''})"
        _sub(group, "polyline", **attributes)
        if edge.name:
            (ax, ay), (bx, by) = edge.points[0], edge.points[1]
            _text_lines(group, _wrap(edge.name, 90), (ax + bx) / 2 + 4, (ay + by) / 2 - 6)
    return etree.tostring(svg, encoding="unicode")


# -- which model, which marks --------------------------------------------------------------


class DiagramLibrary:
    """The BPMN files of the deployed plugins, by process key: where a diagram is drawn from.

    Files are scanned for their process ids when added; a diagram is drawn when a page first
    asks for it and then kept. A file that cannot be read gives no diagram and a note saying
    why.
    """

    def __init__(self, plugins: Iterable[ProcessPlugin] = ()) -> None:
        self._files: dict[str, list[tuple[str, Path]]] = {}
        self._cache: dict[tuple[str, str], tuple[Diagram | None, str]] = {}
        self._plugins = tuple(plugins)
        for plugin in self._plugins:
            for path in plugin.bpmn_files:
                self.add(path, version=plugin.resource_version, label=plugin.name)

    def progress(
        self, process_key: str, variables: Mapping[str, Any]
    ) -> list[dict[str, Any]] | None:
        """What the process's plugin shows of an instance beyond its state (e.g. the sites of
        a consortium request with their states); None if it shows nothing."""
        return progress_of(self._plugins, process_key, variables)

    def add(self, path: Path, *, version: str, label: str = "") -> None:
        """Offer the processes of ``path`` at ``version``; ``label`` names the plugin."""
        try:
            root = read_xml_file(path)
        except (OSError, UnsafeXmlError):
            return  # the plugin's own checks report an unreadable model
        for process in root.iter(f"{{{BPMN}}}process"):
            key = process.get("id")
            if key:
                self._files.setdefault(key, []).append((version, path))

    def diagram(self, process_key: str, version: str) -> tuple[Diagram | None, str]:
        """The diagram of ``process_key`` at ``version`` and a note for the page: why there is
        none, or that it was drawn from another version's model."""
        cached = self._cache.get((process_key, version))
        if cached is not None:
            return cached
        files = self._files.get(process_key, [])
        exact = [path for v, path in files if v == version]
        note = ""
        if exact:
            path = exact[0]
        elif files:
            other, path = files[-1]
            note = (
                f"Drawn from the model of version {other}; this instance runs version "
                f"{version}, whose model is not deployed here."
            )
        else:
            found: tuple[Diagram | None, str] = (
                None,
                f"No diagram: no deployed plugin here has a model for {process_key}.",
            )
            self._cache[(process_key, version)] = found
            return found
        try:
            drawn = read_diagram(read_xml_file(path), process_key, str(path))
        except (OSError, UnsafeXmlError, ValueError) as exc:
            found = (None, f"No diagram: the model {path.name} cannot be read ({exc}).")
        else:
            if drawn is None:
                found = (
                    None,
                    f"No diagram: the model {path.name} has no diagram interchange "
                    "(BPMN-DI); open it in a BPMN modeler and save it to add one.",
                )
            else:
                found = (drawn, note)
        self._cache[(process_key, version)] = found
        return found


def instance_marks(
    diagram: Diagram,
    state: Mapping[str, Any],
    audit: Iterable[tuple[str, str]],
) -> dict[str, Mark]:
    """The marks of one instance's elements and flows.

    ``active`` and ``incident`` come from the engine state (where its tokens stand and the
    events they wait at). The state
    keeps no history, so ``completed`` and ``failed`` come from the instance's audit trail
    (``audit`` as ``(action, reason)`` pairs, oldest first): every element an event names was
    passed; the element of the last ``*.failed`` event of a failed instance is where it
    failed. Flows out of a passed element into a marked one, the start events before them, the
    gateways and events on the way and the gateways, end and throw events right after a passed
    element with one way out are completed too.
    """
    known = {shape.element: shape for shape in diagram.shapes}
    marks: dict[str, Mark] = {}
    failed_at: str | None = None
    for action, reason in audit:
        named = [word for pair in _NAMED.findall(reason) for word in pair if word and word in known]
        for element in named:
            marks[element] = Mark.COMPLETED
        if action.endswith(".failed") and named:
            failed_at = named[-1]
    status = instance_state.instance_status(state)
    for token in instance_state.tokens(state):
        if token.element in known:
            marks[token.element] = Mark.INCIDENT if token.incident is not None else Mark.ACTIVE
        for wait in token.waits:  # the events an event-based gateway waits at
            if not wait.boundary and wait.element in known and wait.element not in marks:
                marks[wait.element] = Mark.ACTIVE
    if status is instance_state.InstanceStatus.FAILED and failed_at is not None:
        marks[failed_at] = Mark.FAILED
    sequence = [edge for edge in diagram.edges if edge.kind == "sequenceFlow"]
    incoming: dict[str, list[Edge]] = {}
    outgoing: dict[str, list[Edge]] = {}
    for edge in sequence:
        incoming.setdefault(edge.target, []).append(edge)
        outgoing.setdefault(edge.source, []).append(edge)
    if marks:
        for shape in diagram.shapes:  # the instance started: at a start event of the process
            if shape.kind == "startEvent" and shape.element not in marks:
                ahead = [e.target for e in outgoing.get(shape.element, [])]
                if any(target in marks for target in ahead) or len(_starts(diagram)) == 1:
                    marks[shape.element] = Mark.COMPLETED
    # Unmarked gateways and events between marked elements were passed on the way; so were a
    # gateway, end or throw event right after a passed element with a single way out (the
    # token left it along that flow and stands nowhere there now).
    changed = True
    while changed:
        changed = False
        for shape in diagram.shapes:
            if shape.element in marks or shape.kind not in _GATEWAYS | _EVENTS:
                continue
            before = any(e.source in marks for e in incoming.get(shape.element, []))
            after = any(e.target in marks for e in outgoing.get(shape.element, []))
            onward = shape.kind in _PASSED_THROUGH and any(
                marks.get(e.source) is Mark.COMPLETED and len(outgoing.get(e.source, [])) == 1
                for e in incoming.get(shape.element, [])
            )
            if (before and after) or onward:
                marks[shape.element] = Mark.COMPLETED
                changed = True
    for edge in sequence:  # taken: out of a passed element into a marked one
        if marks.get(edge.source) is Mark.COMPLETED and marks.get(edge.target):
            marks[edge.element] = Mark.COMPLETED
    return marks


def _starts(diagram: Diagram) -> list[Shape]:
    return [s for s in diagram.shapes if s.kind == "startEvent"]
