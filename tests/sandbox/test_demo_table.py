"""The demo's table prints every kind of finding ``result_summary`` gives: measurements with
their unit (or none), and classifications with their class and probability."""

from __future__ import annotations

from dsf_bridge.sandbox.demo import DemoResult, _table


def test_measurements_and_classifications_in_the_table() -> None:
    result = DemoResult(
        label="CT_small.dcm (1 slice)",
        study_instance_uid="1.2.3",
        status="completed",
        measurements={
            "muscle-area": {"value": 29.6, "unit": "cm2"},
            "air-mean-hu": {"value": None, "unit": "HU"},
            "nodule-presence": {"value": "present", "probability": 0.6142},
        },
    )
    lines = _table([result]).splitlines()
    assert lines[0] == "CT_small.dcm (1 slice)  study 1.2.3: completed"
    assert lines[2].split() == ["muscle-area", "29.60", "cm2"]
    assert lines[3].split() == ["air-mean-hu", "-", "HU"]
    assert lines[4].split() == ["nodule-presence", "present", "p", "=", "0.6142"]
