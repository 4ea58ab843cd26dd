"""The JUEL subset: what DSF models write evaluates as Camunda would; the rest is refused."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dsf_bridge.engine.expressions import (
    ExpressionError,
    UnknownVariableError,
    compile_expression,
    compile_value,
)
from dsf_bridge.engine.timers import (
    TimerError,
    add_duration,
    parse_date,
    parse_duration,
    parse_retry_cycle,
)


class _Vars:
    def __init__(self, values: dict[str, object], local: dict[str, object] | None = None) -> None:
        self.values = values
        self.local = local or {}

    def lookup(self, name: str) -> tuple[bool, object]:
        if name in self.local:
            return True, self.local[name]
        if name in self.values:
            return True, self.values[name]
        return False, None

    def lookup_local(self, name: str) -> tuple[bool, object]:
        return (name in self.local), self.local.get(name)


VARS = _Vars(
    {
        "stop": "yes",
        "flag": True,
        "count": 3,
        "statusCode": "not-reachable",
        "targets": {"entries": [1, 2, 3]},
        "text": "",
    },
    {"correlationKey": "ck"},
)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("${stop == 'yes'}", True),
        ("${stop != 'yes'}", False),
        ('${stop eq "yes"}', True),
        ("${flag}", True),
        ("${!flag}", False),
        ("${not flag}", False),
        ("${count > 2 && count <= 3}", True),
        ("${count < 2 || count >= 4}", False),
        ("${count gt 2 and count lt 4}", True),
        ("${count == '3'}", True),
        ("${-count < 0}", True),
        (
            "${execution.hasVariable('statusCode') && (statusCode == 'not-allowed' "
            "|| statusCode == 'not-reachable')}",
            True,
        ),
        ("${execution.hasVariable('missing') && missing == 'x'}", False),
        ("${execution.getVariable('count')}", 3),
        ("${execution.getVariableLocal('correlationKey')}", "ck"),
        ("${targets.entries}", [1, 2, 3]),
        ("${targets['entries'][0]}", 1),
        ("${empty text}", True),
        ("${null == null}", True),
        ("${1.5 > 1}", True),
    ],
)
def test_expressions_evaluate(source: str, expected: object) -> None:
    assert compile_expression(source)(VARS) == expected


@pytest.mark.parametrize(
    "source",
    [
        "${'text'.toString()}",
        "${x._secret()}",
        "${foo(1)}",
        "${execution.setVariable('a', 1)}",
        "${a ? b}",
        "${",
        "${}",
        "${a ==}",
        "${a b}",
        "no dollar",
    ],
)
def test_unsupported_expressions_are_refused_at_load(source: str) -> None:
    with pytest.raises(ExpressionError):
        compile_expression(source)


def test_composite_values_are_refused_and_plain_text_is_constant() -> None:
    with pytest.raises(ExpressionError, match="Composite"):
        compile_value("prefix ${a}")
    assert compile_value("PT5M")(VARS) == "PT5M"


def test_unknown_variable_is_an_execution_error() -> None:
    with pytest.raises(UnknownVariableError, match="Cannot resolve identifier 'nope'"):
        compile_expression("${nope == 1}")(VARS)


def test_no_eval_of_python() -> None:
    with pytest.raises(ExpressionError):
        compile_expression("${__import__('os').system('true')}")


def test_durations_dates_and_retry_cycles() -> None:
    moment = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
    assert add_duration(moment, parse_duration("PT20S")) == datetime(
        2026, 1, 31, 12, 0, 20, tzinfo=UTC
    )
    assert add_duration(moment, parse_duration("P1M")) == datetime(2026, 2, 28, 12, 0, tzinfo=UTC)
    assert add_duration(moment, parse_duration("P1DT2H")) == datetime(2026, 2, 1, 14, 0, tzinfo=UTC)
    assert parse_date("2026-03-01T10:00:00") == datetime(2026, 3, 1, 10, tzinfo=UTC)
    # Camunda counts R3 as three tries in all (two retries), R0 and R1 as one try, a list of
    # k durations as k retries.
    policy = parse_retry_cycle("R3/PT5S")
    assert policy.retries == 2
    assert policy.delay(2)[1].total_seconds() == 5
    assert parse_retry_cycle("R1/PT5S").retries == parse_retry_cycle("R0/PT5S").retries == 0
    assert parse_retry_cycle("PT1M,PT5M").retries == 2
    assert parse_retry_cycle("PT1M,PT5M").delay(1)[1].total_seconds() == 300
    # Arabic-Indic and full-width digits are digits to \d, not to ISO 8601.
    for bad in ("P", "PT", "5 minutes", "P\u0661D", "PT\uff15S"):
        with pytest.raises(TimerError):
            parse_duration(bad)
    # A duration from a Task may be huge: the error quotes only its start.
    with pytest.raises(TimerError) as caught:
        parse_duration("P" + "x" * 70_000)
    assert len(str(caught.value)) < 200
    assert "70001 characters" in str(caught.value)
    with pytest.raises(TimerError, match="Unbounded"):
        parse_retry_cycle("R/PT5S")
