"""The instance page's words for where tokens stand, read through the engine's state codec."""

from __future__ import annotations

import json
from pathlib import Path

from dsf_bridge.api.ui import INSTANCE_STATUSES, describe_state

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
