"""The JUEL subset of DSF process models: a small, safe parser compiled to Python closures.

Conditions on sequence flows (``${stop == 'yes'}``), multi-instance collections
(``${targets.entries}``), timer definitions (``${timerInterval}``) and ``camunda:expression``
field values are written in JUEL. We support the subset real DSF plugins use:

- literals: strings in single or double quotes, integers, decimals, ``true``, ``false``, ``null``
- identifiers (process and local variables) and property access (``targets.entries``,
  ``target['correlationKey']``) on mappings
- ``execution.getVariable('x')``, ``execution.getVariableLocal('x')``,
  ``execution.hasVariable('x')``
- operators ``!``/``not``, ``empty``, unary ``-``, ``==``/``eq``, ``!=``/``ne``, ``<``/``lt``,
  ``>``/``gt``, ``<=``/``le``, ``>=``/``ge``, ``&&``/``and``, ``||``/``or``

Expressions are parsed once when a definition is loaded; evaluation walks no text. Nothing here
calls ``eval``: anything outside the grammar is a :class:`ExpressionError` at load time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from dsf_bridge.errors import ProcessExecutionError, ProcessModelError

__all__ = [
    "Expression",
    "ExpressionError",
    "UnknownVariableError",
    "VariableSource",
    "compile_expression",
    "compile_value",
    "is_expression",
]


class ExpressionError(ProcessModelError):
    """An expression is outside the supported JUEL subset or is malformed."""


class UnknownVariableError(ProcessExecutionError):
    """An expression referred to a variable that is not set (JUEL: cannot resolve identifier)."""


class VariableSource(Protocol):
    """What an expression may read: variables visible from one execution."""

    def lookup(self, name: str) -> tuple[bool, object]:
        """Return ``(True, value)`` when ``name`` is visible, else ``(False, None)``."""
        ...

    def lookup_local(self, name: str) -> tuple[bool, object]:
        """Like :meth:`lookup` but only the execution's own (local) variables."""
        ...


_Eval = Callable[[VariableSource], object]


@dataclass(frozen=True, slots=True)
class Expression:
    """A compiled expression; ``source`` is the text as written, for error messages."""

    source: str
    evaluate: _Eval

    def __call__(self, variables: VariableSource) -> object:
        return self.evaluate(variables)


_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<num>\d+(?:\.\d+)?)
      | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<op>==|!=|<=|>=|&&|\|\||[!<>().,\[\]-])
      | (?P<name>[A-Za-z_$][A-Za-z0-9_$]*)
    )""",
    re.VERBOSE,
)

_KEYWORD_OPS = {
    "and": "&&",
    "or": "||",
    "not": "!",
    "eq": "==",
    "ne": "!=",
    "lt": "<",
    "gt": ">",
    "le": "<=",
    "ge": ">=",
}
_EXECUTION_METHODS = frozenset({"getVariable", "getVariableLocal", "hasVariable"})


def is_expression(text: str) -> bool:
    """True when ``text`` is a JUEL value expression ``${...}`` (possibly padded by spaces)."""
    stripped = text.strip()
    return stripped.startswith("${") and stripped.endswith("}")


def compile_value(text: str) -> Expression:
    """Compile ``${...}`` as an expression, anything else as a constant string."""
    if is_expression(text):
        return compile_expression(text)
    if "${" in text:
        raise ExpressionError(f"Composite expressions are not supported: {text!r}")
    constant = text

    def _const(_: VariableSource) -> object:
        return constant

    return Expression(text, _const)


def compile_expression(text: str) -> Expression:
    """Compile one ``${...}`` JUEL expression; raises :class:`ExpressionError` if unsupported."""
    stripped = text.strip()
    if not (stripped.startswith("${") and stripped.endswith("}")):
        raise ExpressionError(f"Not a JUEL expression (expected '${{...}}'): {text!r}")
    parser = _Parser(stripped[2:-1], text)
    evaluate = parser.parse()
    return Expression(text, evaluate)


def _unquote(literal: str) -> str:
    body = literal[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


class _Parser:
    """Recursive descent over the token list; each rule returns a closure."""

    def __init__(self, body: str, source: str) -> None:
        self.source = source
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        body = body.rstrip()
        while pos < len(body):
            match = _TOKEN_RE.match(body, pos)
            if match is None or match.end() == pos:
                raise ExpressionError(f"Unsupported syntax at {body[pos:]!r} in {source!r}")
            pos = match.end()
            kind = match.lastgroup or ""
            value = match.group(kind)
            if kind == "name" and value in _KEYWORD_OPS:
                kind, value = "op", _KEYWORD_OPS[value]
            self.tokens.append((kind, value))
        self.pos = 0

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _accept(self, op: str) -> bool:
        token = self._peek()
        if token is not None and token[0] == "op" and token[1] == op:
            self.pos += 1
            return True
        return False

    def _expect(self, op: str) -> None:
        if not self._accept(op):
            raise ExpressionError(f"Expected {op!r} in {self.source!r}")

    def parse(self) -> _Eval:
        if not self.tokens:
            raise ExpressionError(f"Empty expression {self.source!r}")
        result = self._or()
        if self.pos != len(self.tokens):
            raise ExpressionError(f"Unexpected {self.tokens[self.pos][1]!r} in {self.source!r}")
        return result

    def _or(self) -> _Eval:
        left = self._and()
        while self._accept("||"):
            right = self._and()
            left = _make_or(left, right)
        return left

    def _and(self) -> _Eval:
        left = self._equality()
        while self._accept("&&"):
            right = self._equality()
            left = _make_and(left, right)
        return left

    def _equality(self) -> _Eval:
        left = self._relational()
        while True:
            if self._accept("=="):
                left = _make_compare(left, self._relational(), "==")
            elif self._accept("!="):
                left = _make_compare(left, self._relational(), "!=")
            else:
                return left

    def _relational(self) -> _Eval:
        left = self._unary()
        while True:
            for op in ("<=", ">=", "<", ">"):
                if self._accept(op):
                    left = _make_compare(left, self._unary(), op)
                    break
            else:
                return left

    def _unary(self) -> _Eval:
        if self._accept("!"):
            inner = self._unary()
            return lambda v: not _truthy(inner(v))
        if self._accept("-"):
            inner = self._unary()
            return lambda v: -_number(inner(v))
        token = self._peek()
        if token == ("name", "empty"):
            self.pos += 1
            inner = self._unary()
            return lambda v: _is_empty(inner(v))
        return self._postfix()

    def _postfix(self) -> _Eval:
        token = self._peek()
        if token == ("name", "execution"):
            self.pos += 1
            return self._execution_call()
        current = self._primary()
        while True:
            if self._accept("."):
                token = self._peek()
                if token is None or token[0] != "name":
                    raise ExpressionError(f"Expected a property name in {self.source!r}")
                self.pos += 1
                if self._peek() == ("op", "("):
                    raise ExpressionError(
                        f"Method calls other than execution.getVariable/hasVariable are not "
                        f"supported: {token[1]!r} in {self.source!r}"
                    )
                current = _make_property(current, _const(token[1]))
            elif self._accept("["):
                key = self._or()
                self._expect("]")
                current = _make_property(current, key)
            else:
                return current

    def _execution_call(self) -> _Eval:
        self._expect(".")
        token = self._peek()
        if token is None or token[0] != "name" or token[1] not in _EXECUTION_METHODS:
            raise ExpressionError(
                f"Only execution.getVariable/getVariableLocal/hasVariable are supported in "
                f"{self.source!r}"
            )
        method = token[1]
        self.pos += 1
        self._expect("(")
        argument = self._or()
        self._expect(")")
        if method == "hasVariable":
            return lambda v: v.lookup(str(argument(v)))[0]
        if method == "getVariableLocal":
            return lambda v: v.lookup_local(str(argument(v)))[1]
        return lambda v: v.lookup(str(argument(v)))[1]

    def _primary(self) -> _Eval:
        token = self._peek()
        if token is None:
            raise ExpressionError(f"Unexpected end of expression {self.source!r}")
        kind, value = token
        self.pos += 1
        if kind == "num":
            return _const(float(value) if "." in value else int(value))
        if kind == "str":
            return _const(_unquote(value))
        if kind == "name":
            if value == "true":
                return _const(True)
            if value == "false":
                return _const(False)
            if value == "null":
                return _const(None)
            return _make_variable(value)
        if value == "(":
            inner = self._or()
            self._expect(")")
            return inner
        raise ExpressionError(f"Unexpected {value!r} in {self.source!r}")


def _const(value: object) -> _Eval:
    return lambda _: value


def _make_variable(name: str) -> _Eval:
    def _read(variables: VariableSource) -> object:
        found, value = variables.lookup(name)
        if not found:
            raise UnknownVariableError(f"Cannot resolve identifier '{name}'")
        return value

    return _read


def _make_property(base: _Eval, key: _Eval) -> _Eval:
    def _get(variables: VariableSource) -> object:
        container = base(variables)
        name = key(variables)
        if isinstance(container, Mapping):
            if name not in container:
                raise UnknownVariableError(f"Property {name!r} not found")
            return container[name]
        if isinstance(container, list | tuple) and isinstance(name, int):
            return container[name]
        raise UnknownVariableError(f"Cannot read property {name!r} of {type(container).__name__}")

    return _get


def _make_and(left: _Eval, right: _Eval) -> _Eval:
    return lambda v: _truthy(left(v)) and _truthy(right(v))


def _make_or(left: _Eval, right: _Eval) -> _Eval:
    return lambda v: _truthy(left(v)) or _truthy(right(v))


def _make_compare(left: _Eval, right: _Eval, op: str) -> _Eval:
    def _compare(variables: VariableSource) -> object:
        a = left(variables)
        b = right(variables)
        if op == "==":
            return _equal(a, b)
        if op == "!=":
            return not _equal(a, b)
        if a is None or b is None:
            # JUEL coerces null to 0 for relational operators; we refuse, as DSF models never
            # compare against null and a silent 0 would hide a missing variable.
            raise UnknownVariableError(f"Cannot compare null with {op}")
        if isinstance(a, str) and isinstance(b, str):
            x: float | str = a
            y: float | str = b
        else:
            x, y = _number(a), _number(b)
        if op == "<":
            return x < y  # type: ignore[operator]
        if op == ">":
            return x > y  # type: ignore[operator]
        if op == "<=":
            return x <= y  # type: ignore[operator]
        return x >= y  # type: ignore[operator]

    return _compare


def _equal(a: object, b: object) -> bool:
    # JUEL coerces a number compared with a string to a number; strings compare as strings.
    if isinstance(a, bool) or isinstance(b, bool):
        if isinstance(a, str):
            return a.lower() == str(b).lower()
        if isinstance(b, str):
            return b.lower() == str(a).lower()
        return a == b
    if isinstance(a, int | float) and isinstance(b, str):
        try:
            return a == float(b)
        except ValueError:
            return False
    if isinstance(b, int | float) and isinstance(a, str):
        return _equal(b, a)
    return a == b


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise UnknownVariableError(f"Cannot use boolean {value!r} as a number")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise UnknownVariableError(f"Cannot use {value!r} as a number") from None
    raise UnknownVariableError(f"Cannot use {type(value).__name__} as a number")


def _truthy(value: object) -> bool:
    # JUEL coerces to Boolean: null is false, strings are parsed ("true" ignoring case).
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, str):
        return value.lower() == "true"
    raise UnknownVariableError(f"Cannot coerce {type(value).__name__} to a boolean")


def _is_empty(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str | list | tuple | dict):
        return len(value) == 0
    return False
