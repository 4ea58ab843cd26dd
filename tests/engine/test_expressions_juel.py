"""JUEL as Camunda 7 evaluates it: operators, coercions, property access and opted-in methods.

Expected values follow Camunda's JUEL (``org.camunda.bpm.engine.impl.juel``: ``Scanner``,
``NumberOperations``, ``BooleanOperations``, ``TypeConverterImpl``) and the EL 2.2
specification, chapters 1.7 (operators) and 1.18 (coercions).
"""

from __future__ import annotations

import html
import math
import re

import pytest

from dsf_bridge.engine.expressions import (
    ExpressionError,
    ExpressionEvaluationError,
    UnknownVariableError,
    compile_expression,
)
from dsf_bridge.errors import ProcessExecutionError
from tests.reference import reference_dir


class _Vars:
    def __init__(self, values: dict[str, object]) -> None:
        self.values = values

    def lookup(self, name: str) -> tuple[bool, object]:
        return (name in self.values), self.values.get(name)

    def lookup_local(self, name: str) -> tuple[bool, object]:
        return self.lookup(name)


class _Targets:
    __juel_methods__ = frozenset({"getEntries", "isActive", "entry", "failing"})

    def __init__(self, entries: list[str]) -> None:
        self.entries = entries

    def getEntries(self) -> list[str]:  # noqa: N802 - the Java name is what models call
        return self.entries

    def isActive(self) -> bool:  # noqa: N802
        return True

    def entry(self, index: int) -> str:
        return self.entries[index]

    def failing(self) -> str:
        raise ValueError("boom")

    def secret(self) -> str:
        return "never"


class _Loose:
    __juel_methods__ = {"secret"}  # a mutable set is not a declaration  # noqa: RUF012

    def secret(self) -> str:
        return "never"


def _vars() -> _Vars:
    return _Vars(
        {
            "stop": "yes",
            "flag": True,
            "count": 3,
            "half": 0.5,
            "text": "",
            "nothing": None,
            "key": "b",
            "targets": {"entries": [1, 2, 3]},
            "a": {"b": {"c": "deep"}},
            "empties": {"list": [], "map": {}, "tuple": ()},
            "obj": _Targets(["x", "y"]),
            "loose": _Loose(),
        }
    )


def _eval(source: str) -> object:
    return compile_expression(source)(_vars())


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # literals and JUEL string escapes (only \\ and the enclosing quote)
        ("${'it\\'s'}", "it's"),
        ('${"say \\"hi\\""}', 'say "hi"'),
        ("${'back\\\\slash'}", "back\\slash"),
        ('${"it\'s"}', "it's"),
        ("${'say \"hi\"'}", 'say "hi"'),
        ("${'}'}", "}"),
        ("${42}", 42),
        ("${1.5}", 1.5),
        ("${1e3}", 1000.0),
        ("${.5}", 0.5),
        ("${true}", True),
        ("${false}", False),
        ("${null}", None),
        # conditional: right-associative, lazy, condition coerced to boolean
        ("${flag ? 'a' : 'b'}", "a"),
        ("${!flag ? 'a' : 'b'}", "b"),
        ("${count > 5 ? 'big' : count > 2 ? 'mid' : 'small'}", "mid"),
        ("${true ? 1 : missing}", 1),
        ("${false ? missing : 2}", 2),
        ("${'TRUE' ? 1 : 2}", 1),
        ("${null ? 1 : 2}", 2),
        ("${flag ? count + 1 : 0}", 4),
        ("${execution.hasVariable('stop') ? stop : 'none'}", "yes"),
        ("${execution.hasVariable('missing') ? missing : 'none'}", "none"),
        # empty
        ("${empty nothing}", True),
        ("${empty text}", True),
        ("${empty empties.list}", True),
        ("${empty empties.map}", True),
        ("${empty empties.tuple}", True),
        ("${empty targets}", False),
        ("${empty stop}", False),
        ("${empty count}", False),
        ("${not empty targets.entries}", True),
        ("${!empty text}", False),
        # not / ! coerce to boolean: null and '' are false, strings by Boolean.valueOf
        ("${not flag}", False),
        ("${!'true'}", False),
        ("${!'yes'}", True),
        ("${!null}", True),
        ("${!text}", True),
        # and / or, short-circuit
        ("${false && missing}", False),
        ("${true || missing}", True),
        ("${flag and 'true'}", True),
        ("${false or 'TRUE'}", True),
        ("${null or false}", False),
        # equality
        ("${null == null}", True),
        ("${null eq 0}", False),
        ("${text == null}", False),
        ("${nothing != null}", False),
        ("${count == 3.0}", True),
        ("${count == '3'}", True),
        ("${1.5 == '1.5'}", True),
        ("${half eq 0.5}", True),
        ("${flag == 'TRUE'}", True),
        ("${flag ne 'yes'}", True),
        ("${'a' ne 'b'}", True),
        ("${stop eq 'yes'}", True),
        ("${targets == targets}", True),
        ("${a.b == a.b}", True),
        # relational: numbers as numbers, strings as strings, null is never ordered
        ("${count lt 10}", True),
        ("${'10' < 9}", False),
        ("${'10' < '9'}", True),
        ("${'abc' lt 'abd'}", True),
        ("${2.5 ge 2}", True),
        ("${3 le '3'}", True),
        ("${count gt 2.5}", True),
        ("${false < true}", True),
        ("${null < 1}", False),
        ("${1 > null}", False),
        ("${null <= 1}", False),
        ("${null >= null}", True),
        ("${targets < targets}", False),
        # arithmetic: Long unless a Double or a string with . e E is involved; / is Double
        ("${1 + 2}", 3),
        ("${1 + 2.0}", 3.0),
        ("${'1' + 2}", 3),
        ("${'1.5' + 1}", 2.5),
        ("${'1e1' + 1}", 11.0),
        ("${null + null}", 0),
        ("${null + 1}", 1),
        ("${text + 1}", 1),
        ("${7 - 10}", -3),
        ("${10 - 2 - 3}", 5),
        ("${3 * 4}", 12),
        ("${half * 4}", 2.0),
        ("${7 / 2}", 3.5),
        ("${4 / 2}", 2.0),
        ("${7 div 2}", 3.5),
        ("${1 / 0}", math.inf),
        ("${-1 / 0}", -math.inf),
        ("${7 % 3}", 1),
        ("${-7 % 3}", -1),
        ("${7 mod -3}", 1),
        ("${7.5 % 2}", 1.5),
        ("${-7.5 % 2}", -1.5),
        ("${1 + 2 * 3}", 7),
        ("${(1 + 2) * 3}", 9),
        ("${12 / 3 / 2}", 2.0),
        ("${2 * 3 > 5}", True),
        ("${count + 1 == 4}", True),
        ("${-count}", -3),
        ("${-half}", -0.5),
        ("${-'2'}", -2),
        ("${-'2.5'}", -2.5),
        ("${-null}", 0),
        ("${- -1}", 1),
        ("${-count + 1}", -2),
        # property access: maps (missing key is null), lists (out of range is null)
        ("${targets.entries}", [1, 2, 3]),
        ("${a.b.c}", "deep"),
        ("${a['b']['c']}", "deep"),
        ("${a[key].c}", "deep"),
        ('${a["b"].c}', "deep"),
        ("${a.missing}", None),
        ("${a.missing.deeper}", None),
        ("${nothing.anything}", None),
        ("${targets.entries[1]}", 2),
        ("${targets.entries['1']}", 2),
        ("${targets.entries[1.9]}", 2),
        ("${targets.entries[5]}", None),
        ("${targets.entries[-1]}", None),
        # methods and getters a class opted in to
        ("${obj.getEntries()}", ["x", "y"]),
        ("${obj.entries}", ["x", "y"]),
        ("${obj.active}", True),
        ("${obj.entry(1)}", "y"),
        ("${obj.entry(count - 3)}", "x"),
        ("${obj.getEntries()[0]}", "x"),
        ("${empty obj.getEntries()}", False),
        ("${execution.getVariable('missing')}", None),
        ("${execution.getVariable('ob' == 'ob' ? 'count' : 'x')}", 3),
    ],
)
def test_juel_evaluates_as_camunda(source: str, expected: object) -> None:
    result = _eval(source)
    assert result == expected
    assert type(result) is type(expected)


def test_invalid_double_operations_give_nan() -> None:
    assert math.isnan(_eval("${0 / 0}"))  # type: ignore[arg-type]
    assert math.isnan(_eval("${7.0 % 0}"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "${'a' + 'b'}",
            "Cannot coerce 'a' (str) to an integer for '+' (JUEL '+' adds numbers; it does not "
            "concatenate strings)",
        ),
        (
            "${stop + 1}",
            "Cannot coerce 'yes' (str) to a number for '+' (JUEL '+' adds numbers; it does not "
            "concatenate strings)",
        ),
        (
            "${'x.y' + 1}",
            "Cannot coerce 'x.y' (str) to a number for '+' (JUEL '+' adds numbers; it does not "
            "concatenate strings)",
        ),
        ("${flag + 1}", "Cannot coerce True (bool) to an integer for '+'"),
        ("${targets * 2}", "Cannot coerce dict to an integer for '*'"),
        ("${stop / 2}", "Cannot coerce 'yes' (str) to a number for '/'"),
        ("${7 % 0}", "Division by zero in '%' on integers"),
        ("${-flag}", "Cannot negate True (bool)"),
        ("${-stop}", "Cannot coerce 'yes' (str) to a number for unary '-'"),  # 'e': Double
        ("${-'no'}", "Cannot coerce 'no' (str) to an integer for unary '-'"),
        ("${count == 'abc'}", "Cannot coerce 'abc' (str) to an integer"),
        ("${count > 'x'}", "Cannot coerce 'x' (str) to an integer"),
        ("${targets < 1}", "Cannot coerce dict to an integer"),
        ("${targets.entries < targets}", "Cannot compare list with dict"),
        ("${count ? 1 : 2}", "Cannot coerce 3 (int) to a boolean"),
        ("${count && true}", "Cannot coerce 3 (int) to a boolean"),
        ("${!targets}", "Cannot coerce dict to a boolean"),
        ("${targets.entries.size}", "Cannot use 'size' as a list index"),
        ("${stop.length}", "Cannot read property 'length' of str"),
        ("${count.value}", "Cannot read property 'value' of int"),
        ("${obj.missing}", "Cannot read property 'missing' of _Targets"),
        ("${obj.secret()}", "Method 'secret' is not exposed to expressions by _Targets"),
        ("${loose.secret()}", "Method 'secret' is not exposed to expressions by _Loose"),
        ("${targets.keys()}", "Method 'keys' is not exposed to expressions by dict"),
        ("${stop.upper()}", "Method 'upper' is not exposed to expressions by str"),
        ("${targets.entries.clear()}", "Method 'clear' is not exposed to expressions by list"),
        ("${nothing.getEntries()}", "Cannot call 'getEntries' on null"),
        ("${obj.failing()}", "_Targets.failing() failed: ValueError: boom"),
    ],
)
def test_evaluation_errors_name_the_rule_and_the_expression(source: str, message: str) -> None:
    with pytest.raises(ExpressionEvaluationError) as caught:
        _eval(source)
    assert caught.value.message == f"{message} (in {source})"
    assert isinstance(caught.value, ProcessExecutionError)


def test_refused_method_calls_have_no_effect() -> None:
    variables = _vars()
    with pytest.raises(ExpressionEvaluationError):
        compile_expression("${targets.entries.clear()}")(variables)
    assert variables.values["targets"] == {"entries": [1, 2, 3]}


def test_instance_attributes_cannot_expose_methods() -> None:
    variables = _vars()
    target = variables.values["obj"]
    target.__juel_methods__ = frozenset({"secret"})  # type: ignore[attr-defined]
    with pytest.raises(ExpressionEvaluationError, match="'secret' is not exposed"):
        compile_expression("${obj.secret()}")(variables)


def test_unknown_identifier_stays_an_unknown_variable_error() -> None:
    with pytest.raises(UnknownVariableError, match=r"Cannot resolve identifier 'nope' \(in "):
        _eval("${nope + 1}")
    assert issubclass(UnknownVariableError, ExpressionEvaluationError)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("${'\\n'}", "Invalid escape sequence '\\n'"),
        ("${'\\\"'}", "Invalid escape sequence '\\\"'"),
        ('${"\\\'"}', "Invalid escape sequence '\\''"),
        ("${'open}", 'Unsupported syntax at "\'open"'),
        ("${9223372036854775808}", "Integer literal 9223372036854775808 is out of range"),
        ("${a = 1}", "Unsupported syntax at '= 1'"),
        ("${a & b}", "Unsupported syntax at '& b'"),
        ("${a | b}", "Unsupported syntax at '| b'"),
        ("${a instanceof b}", "Operator 'instanceof' is not supported"),
        ("${a ? b}", "Expected ':'"),
        ("${a ? : b}", "Unexpected ':'"),
        ("${(a}", "Expected ')'"),
        ("${a.}", "Expected a property name"),
        ("${a.b(}", "Unexpected end of expression"),
        ("${a.b(1,)}", "Unexpected ')'"),
        ("${a[1}", "Expected ']'"),
        ("${a.and}", "Expected a property name"),
        ("${foo(1)}", "Function calls are not supported: 'foo'"),
        ("${'text'.length()}", "Method calls on literals are not supported: 'length'"),
        ("${1.5.floor()}", "Method calls on literals are not supported: 'floor'"),
        ("${obj._secret()}", "Method calls to private names are not supported: '_secret'"),
        ("${obj.__class__()}", "Method calls to private names are not supported"),
        ("${execution.getVariable()}", "execution.getVariable takes one argument"),
        ("${execution.getVariable('a', 'b')}", "execution.getVariable takes one argument"),
        ("${execution.setVariable('a', 1)}", "Only execution.getVariable"),
        ("${execution}", "Expected '.'"),
        ("${1 +}", "Unexpected end of expression"),
        ("${a; b}", "Unsupported syntax at '; b'"),
    ],
)
def test_unsupported_syntax_is_refused_at_load(source: str, message: str) -> None:
    with pytest.raises(ExpressionError, match=re.escape(message)):
        compile_expression(source)


_EXPRESSION_RE = re.compile(r"\$\{[^}]*\}")


def test_every_expression_in_the_reference_corpus_compiles() -> None:
    sources = sorted(
        {
            html.unescape(found)
            for path in reference_dir().rglob("*.bpmn")
            for found in _EXPRESSION_RE.findall(path.read_text(encoding="utf-8"))
        }
    )
    assert len(sources) >= 30  # the corpus has ~40 distinct expressions; none may be lost
    for source in sources:
        compile_expression(source)
