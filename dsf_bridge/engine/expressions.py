"""The JUEL of DSF process models: a small, safe parser compiled to Python closures.

Conditions on sequence flows (``${stop == 'yes'}``), multi-instance collections
(``${targets.entries}``), timer definitions (``${timerInterval}``) and ``camunda:expression``
field values are written in JUEL, the EL implementation inside Camunda 7
(``org.camunda.bpm.engine.impl.juel``, based on JUEL 2.2.1 and the EL 2.2 specification).
We support, with Camunda's semantics:

- literals: strings in single or double quotes (escapes ``\\\\`` and the enclosing quote only,
  as Camunda's scanner), integers (``Long``), decimals and exponents (``Double``), ``true``,
  ``false``, ``null``
- identifiers (process and local variables), property access ``a.b.c`` and ``a['b']`` on
  mappings (a missing key is ``null``), lists (out of range is ``null``) and opted-in objects
- ``execution.getVariable('x')``, ``execution.getVariableLocal('x')``,
  ``execution.hasVariable('x')``, and methods that a value's class exposes (below)
- by precedence, lowest first: ``a ? b : c``; ``||``/``or``; ``&&``/``and``;
  ``==``/``eq``, ``!=``/``ne``; ``<``/``lt``, ``>``/``gt``, ``<=``/``le``, ``>=``/``ge``;
  binary ``+``, ``-``; ``*``, ``/``/``div``, ``%``/``mod``; unary ``-``, ``!``/``not``,
  ``empty``

Coercions follow Camunda's ``TypeConverterImpl``, ``NumberOperations`` and
``BooleanOperations``: ``+ - * %`` work on ``Long`` unless an operand is a float or a string
with ``.``/``e``/``E`` (then ``Double``); ``/`` is always ``Double`` (``1/0`` is ``Infinity``);
``+`` never concatenates strings; ``null`` is 0 in arithmetic, never equal to a non-null value,
and every ordering comparison with ``null`` is false; a number compared with a string coerces
the string to a number (failing when it is not one); booleans coerce from strings with
``Boolean.valueOf``. Python ``int`` plays ``Long`` (without 64-bit wrap-around), ``float``
plays ``Double``.

Method calls are opt-in per class: a value's class lists the methods expressions may call in
``__juel_methods__ = frozenset({"getEntries"})``; a getter listed there also serves the
property (``targets.entries`` calls ``getEntries()``). Nothing else is ever looked up on a
value, so dicts, lists and strings have no methods at all.

Expressions are parsed once when a definition is loaded; evaluation walks no text. Nothing here
calls ``eval``: anything outside the grammar is an :class:`ExpressionError` at load time;
failures while evaluating are :class:`ExpressionEvaluationError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from dsf_bridge.errors import BridgeError, ProcessExecutionError, ProcessModelError

__all__ = [
    "JUEL_METHODS_ATTRIBUTE",
    "Expression",
    "ExpressionError",
    "ExpressionEvaluationError",
    "UnknownVariableError",
    "VariableSource",
    "compile_expression",
    "compile_value",
    "is_expression",
]

JUEL_METHODS_ATTRIBUTE = "__juel_methods__"
"""Class attribute (a ``frozenset`` of method names) opting methods in to expressions."""


class ExpressionError(ProcessModelError):
    """An expression is outside the supported JUEL subset or is malformed."""


class ExpressionEvaluationError(ProcessExecutionError):
    """Evaluating an expression failed (JUEL: ``ELException``), e.g. a failed coercion."""


class UnknownVariableError(ExpressionEvaluationError):
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
    """A compiled expression; ``source`` is the text as written, for error messages.

    ``constant`` marks plain text (no ``${...}``): its value is ``source`` itself, which the
    interpreter reads without a call on its hot path.
    """

    source: str
    evaluate: _Eval
    constant: bool = False

    def __call__(self, variables: VariableSource) -> object:
        try:
            return self.evaluate(variables)
        except ExpressionEvaluationError as exc:
            raise type(exc)(f"{exc.message} (in {self.source})") from exc


_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<num>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
      | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<op>==|!=|<=|>=|&&|\|\||[!<>().,\[\]?:+\-*/%])
      | (?P<name>[A-Za-z_$][A-Za-z0-9_$]*)
    )""",
    re.VERBOSE | re.ASCII,
)
_ESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)

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
    "div": "/",
    "mod": "%",
}
_RESERVED = frozenset({"instanceof"})
_EXECUTION_METHODS = frozenset({"getVariable", "getVariableLocal", "hasVariable"})
_LONG_MAX = 2**63 - 1
_LONG_RE = re.compile(r"[+-]?[0-9]+", re.ASCII)
_DOUBLE_RE = re.compile(
    r"[+-]?(?:NaN|Infinity|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[fFdD]?)", re.ASCII
)


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
    return Expression(text, _const(text), constant=True)


def compile_expression(text: str) -> Expression:
    """Compile one ``${...}`` JUEL expression; raises :class:`ExpressionError` if unsupported."""
    stripped = text.strip()
    if not (stripped.startswith("${") and stripped.endswith("}")):
        raise ExpressionError(f"Not a JUEL expression (expected '${{...}}'): {text!r}")
    parser = _Parser(stripped[2:-1], text)
    evaluate = parser.parse()
    return Expression(text, evaluate)


def _unquote(literal: str, source: str) -> str:
    quote = literal[0]

    def _escape(match: re.Match[str]) -> str:
        char = match.group(1)
        if char not in ("\\", quote):
            raise ExpressionError(
                f"Invalid escape sequence '\\{char}' in string literal (JUEL allows "
                f"\\{quote} and \\\\ only) in {source!r}"
            )
        return char

    return _ESCAPE_RE.sub(_escape, literal[1:-1])


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
                raise ExpressionError(
                    f"Unsupported syntax at {body[pos:].lstrip()!r} in {source!r}"
                )
            pos = match.end()
            kind = match.lastgroup or ""
            value = match.group(kind)
            if kind == "name":
                if value in _KEYWORD_OPS:
                    kind, value = "op", _KEYWORD_OPS[value]
                elif value in _RESERVED:
                    raise ExpressionError(f"Operator {value!r} is not supported in {source!r}")
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

    def _name(self, what: str) -> str:
        token = self._peek()
        if token is None or token[0] != "name":
            raise ExpressionError(f"Expected {what} in {self.source!r}")
        self.pos += 1
        return token[1]

    def parse(self) -> _Eval:
        if not self.tokens:
            raise ExpressionError(f"Empty expression {self.source!r}")
        result = self._expression()
        if self.pos != len(self.tokens):
            raise ExpressionError(f"Unexpected {self.tokens[self.pos][1]!r} in {self.source!r}")
        return result

    def _expression(self) -> _Eval:
        condition = self._or()
        if not self._accept("?"):
            return condition
        when_true = self._expression()
        self._expect(":")
        when_false = self._expression()
        return lambda v: when_true(v) if _to_boolean(condition(v)) else when_false(v)

    def _or(self) -> _Eval:
        left = self._and()
        while self._accept("||"):
            left = _make_or(left, self._and())
        return left

    def _and(self) -> _Eval:
        left = self._equality()
        while self._accept("&&"):
            left = _make_and(left, self._equality())
        return left

    def _equality(self) -> _Eval:
        left = self._relational()
        while True:
            if self._accept("=="):
                left = _make_binary(left, self._relational(), _equal)
            elif self._accept("!="):
                left = _make_binary(left, self._relational(), _not_equal)
            else:
                return left

    def _relational(self) -> _Eval:
        left = self._additive()
        while True:
            for op, function in _RELATIONAL:
                if self._accept(op):
                    left = _make_binary(left, self._additive(), function)
                    break
            else:
                return left

    def _additive(self) -> _Eval:
        left = self._multiplicative()
        while True:
            if self._accept("+"):
                left = _make_binary(left, self._multiplicative(), _add)
            elif self._accept("-"):
                left = _make_binary(left, self._multiplicative(), _subtract)
            else:
                return left

    def _multiplicative(self) -> _Eval:
        left = self._unary()
        while True:
            if self._accept("*"):
                left = _make_binary(left, self._unary(), _multiply)
            elif self._accept("/"):
                left = _make_binary(left, self._unary(), _divide)
            elif self._accept("%"):
                left = _make_binary(left, self._unary(), _modulo)
            else:
                return left

    def _unary(self) -> _Eval:
        if self._accept("!"):
            inner = self._unary()
            return lambda v: not _to_boolean(inner(v))
        if self._accept("-"):
            inner = self._unary()
            return lambda v: _negate(inner(v))
        if self._peek() == ("name", "empty"):
            self.pos += 1
            inner = self._unary()
            return lambda v: _is_empty(inner(v))
        return self._postfix()

    def _postfix(self) -> _Eval:
        if self._peek() == ("name", "execution"):
            self.pos += 1
            return self._execution_call()
        first = self._peek()
        literal = first is not None and first[0] in ("num", "str")
        current = self._primary()
        while True:
            if self._accept("."):
                name = self._name("a property name")
                if self._peek() == ("op", "("):
                    if literal:
                        raise ExpressionError(
                            f"Method calls on literals are not supported: {name!r} in "
                            f"{self.source!r}"
                        )
                    if name.startswith("_"):
                        raise ExpressionError(
                            f"Method calls to private names are not supported: {name!r} in "
                            f"{self.source!r}"
                        )
                    current = _make_method_call(current, name, self._arguments())
                else:
                    current = _make_property(current, _const(name))
            elif self._accept("["):
                key = self._expression()
                self._expect("]")
                current = _make_property(current, key)
            else:
                return current

    def _arguments(self) -> tuple[_Eval, ...]:
        self._expect("(")
        arguments: list[_Eval] = []
        if not self._accept(")"):
            arguments.append(self._expression())
            while self._accept(","):
                arguments.append(self._expression())
            self._expect(")")
        return tuple(arguments)

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
        arguments = self._arguments()
        if len(arguments) != 1:
            raise ExpressionError(f"execution.{method} takes one argument in {self.source!r}")
        argument = arguments[0]
        if method == "hasVariable":
            return lambda v: v.lookup(_to_string(argument(v)))[0]
        if method == "getVariableLocal":
            return lambda v: v.lookup_local(_to_string(argument(v)))[1]
        return lambda v: v.lookup(_to_string(argument(v)))[1]

    def _primary(self) -> _Eval:
        token = self._peek()
        if token is None:
            raise ExpressionError(f"Unexpected end of expression {self.source!r}")
        kind, value = token
        self.pos += 1
        if kind == "num":
            return _const(self._number(value))
        if kind == "str":
            return _const(_unquote(value, self.source))
        if kind == "name":
            if value == "true":
                return _const(True)
            if value == "false":
                return _const(False)
            if value == "null":
                return _const(None)
            if self._peek() == ("op", "("):
                raise ExpressionError(
                    f"Function calls are not supported: {value!r} in {self.source!r}"
                )
            return _make_variable(value)
        if value == "(":
            inner = self._expression()
            self._expect(")")
            return inner
        raise ExpressionError(f"Unexpected {value!r} in {self.source!r}")

    def _number(self, text: str) -> int | float:
        if any(char in text for char in ".eE"):
            return float(text)
        number = int(text)
        if number > _LONG_MAX:
            raise ExpressionError(f"Integer literal {text} is out of range in {self.source!r}")
        return number


# -- evaluation helpers -----------------------------------------------------------------------


def _const(value: object) -> _Eval:
    return lambda _: value


def _make_variable(name: str) -> _Eval:
    def _read(variables: VariableSource) -> object:
        found, value = variables.lookup(name)
        if not found:
            raise UnknownVariableError(f"Cannot resolve identifier '{name}'")
        return value

    return _read


def _make_binary(left: _Eval, right: _Eval, operation: Callable[[object, object], object]) -> _Eval:
    return lambda v: operation(left(v), right(v))


def _make_and(left: _Eval, right: _Eval) -> _Eval:
    return lambda v: _to_boolean(left(v)) and _to_boolean(right(v))


def _make_or(left: _Eval, right: _Eval) -> _Eval:
    return lambda v: _to_boolean(left(v)) or _to_boolean(right(v))


def _exposed_methods(value: object) -> frozenset[str]:
    # Only the class's own declaration counts, never the instance's, and only a frozenset.
    declared = getattr(type(value), JUEL_METHODS_ATTRIBUTE, None)
    return declared if isinstance(declared, frozenset) else frozenset()


def _invoke(value: object, name: str, arguments: Sequence[object]) -> object:
    if name.startswith("_") or name not in _exposed_methods(value):
        raise ExpressionEvaluationError(
            f"Method {name!r} is not exposed to expressions by {type(value).__name__}"
        )
    method = getattr(value, name)
    if not callable(method):
        raise ExpressionEvaluationError(f"{type(value).__name__}.{name} is not a method")
    try:
        return method(*arguments)
    except BridgeError:
        raise
    except Exception as exc:  # a handler's value failed: report it as an evaluation error
        raise ExpressionEvaluationError(
            f"{type(value).__name__}.{name}() failed: {type(exc).__name__}: {exc}"
        ) from exc


def _make_method_call(base: _Eval, name: str, arguments: tuple[_Eval, ...]) -> _Eval:
    def _call(variables: VariableSource) -> object:
        target = base(variables)
        if target is None:
            raise ExpressionEvaluationError(f"Cannot call {name!r} on null")
        return _invoke(target, name, [argument(variables) for argument in arguments])

    return _call


def _make_property(base: _Eval, key: _Eval) -> _Eval:
    return lambda v: _get_property(base(v), key(v))


def _get_property(container: object, name: object) -> object:
    # AstProperty: a null base gives null; MapELResolver: a missing key gives null.
    if container is None:
        return None
    if isinstance(container, Mapping):
        try:
            return container.get(name)
        except TypeError:
            raise ExpressionEvaluationError(
                f"Cannot use {type(name).__name__} as a map key"
            ) from None
    if isinstance(container, list | tuple):
        index = _list_index(name)
        return container[index] if 0 <= index < len(container) else None
    if isinstance(name, str) and name:
        exposed = _exposed_methods(container)
        suffix = name[0].upper() + name[1:]
        for getter in ("get" + suffix, "is" + suffix):
            if getter in exposed:
                return _invoke(container, getter, ())
    raise ExpressionEvaluationError(f"Cannot read property {name!r} of {type(container).__name__}")


def _list_index(name: object) -> int:
    if isinstance(name, int | float) and not isinstance(name, bool):
        return _to_long(name)
    if isinstance(name, str) and _LONG_RE.fullmatch(name):
        return int(name)
    raise ExpressionEvaluationError(f"Cannot use {name!r} as a list index")


# -- coercions (TypeConverterImpl) ------------------------------------------------------------


def _describe(value: object) -> str:
    if isinstance(value, str | bool | int | float):
        return f"{value!r} ({type(value).__name__})"
    return type(value).__name__


def _to_long(value: object, context: str = "") -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        return value
    elif isinstance(value, float):
        if math.isnan(value):
            return 0
        if math.isinf(value):
            return _LONG_MAX if value > 0 else -_LONG_MAX - 1
        return int(value)
    elif isinstance(value, str) and _LONG_RE.fullmatch(value):
        number = int(value)
        if -_LONG_MAX - 1 <= number <= _LONG_MAX:
            return number
    raise ExpressionEvaluationError(f"Cannot coerce {_describe(value)} to an integer{context}")


def _to_double(value: object, context: str = "") -> float:
    if value is None or value == "":
        return 0.0
    if isinstance(value, bool):
        pass
    elif isinstance(value, float):
        return value
    elif isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    elif isinstance(value, str):
        text = value.strip()
        if _DOUBLE_RE.fullmatch(text):
            return float(text.rstrip("fFdD"))
    raise ExpressionEvaluationError(f"Cannot coerce {_describe(value)} to a number{context}")


def _to_boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, str):
        return value.lower() == "true"
    raise ExpressionEvaluationError(f"Cannot coerce {_describe(value)} to a boolean")


def _to_string(value: object) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    # Java's toString of doubles, maps and lists differs from Python's: refuse rather than guess.
    raise ExpressionEvaluationError(f"Cannot coerce {_describe(value)} to a string")


# -- operators (NumberOperations, BooleanOperations) -------------------------------------------


def _is_float(value: object) -> bool:
    return isinstance(value, float)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_double_operand(value: object) -> bool:
    # NumberOperations.isFloatOrDoubleOrDotEe
    if isinstance(value, float):
        return True
    return isinstance(value, str) and ("." in value or "e" in value or "E" in value)


def _arithmetic(
    symbol: str,
    on_long: Callable[[int, int], int | float],
    on_double: Callable[[float, float], float],
    *,
    double_only: bool = False,
) -> Callable[[object, object], object]:
    context = f" for {symbol!r}"

    def _apply(a: object, b: object) -> object:
        if a is None and b is None:
            return 0
        try:
            if double_only or _is_double_operand(a) or _is_double_operand(b):
                return on_double(_to_double(a, context), _to_double(b, context))
            return on_long(_to_long(a, context), _to_long(b, context))
        except ExpressionEvaluationError as exc:
            if symbol == "+" and (isinstance(a, str) or isinstance(b, str)):
                hint = " (JUEL '+' adds numbers; it does not concatenate strings)"
                raise ExpressionEvaluationError(exc.message + hint) from None
            raise

    return _apply


def _java_divide(x: float, y: float) -> float:
    if y == 0.0:
        if x == 0.0 or math.isnan(x):
            return math.nan
        return math.copysign(math.inf, x) * math.copysign(1.0, y)
    return x / y


def _java_double_remainder(x: float, y: float) -> float:
    if y == 0.0 or math.isinf(x) or math.isnan(x) or math.isnan(y):
        return math.nan
    return math.fmod(x, y)


def _java_long_remainder(x: int, y: int) -> int:
    if y == 0:
        raise ExpressionEvaluationError("Division by zero in '%' on integers")
    remainder = abs(x) % abs(y)
    return -remainder if x < 0 else remainder


_add = _arithmetic("+", lambda x, y: x + y, lambda x, y: x + y)
_subtract = _arithmetic("-", lambda x, y: x - y, lambda x, y: x - y)
_multiply = _arithmetic("*", lambda x, y: x * y, lambda x, y: x * y)
_divide = _arithmetic("/", _java_divide, _java_divide, double_only=True)
_modulo = _arithmetic("%", _java_long_remainder, _java_double_remainder)


def _negate(value: object) -> object:
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ExpressionEvaluationError(f"Cannot negate {_describe(value)}")
    if isinstance(value, int | float):
        return -value
    if isinstance(value, str):
        if _is_double_operand(value):
            return -_to_double(value, " for unary '-'")
        return -_to_long(value, " for unary '-'")
    raise ExpressionEvaluationError(f"Cannot negate {_describe(value)}")


def _equal(a: object, b: object) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    if type(a) is str and type(b) is str:  # the common case in DSF models
        return a == b
    if _is_float(a) or _is_float(b):
        x, y = _to_double(a), _to_double(b)
        # Double.equals: NaN equals NaN, 0.0 does not equal -0.0
        if math.isnan(x):
            return math.isnan(y)
        return x == y and math.copysign(1.0, x) == math.copysign(1.0, y)
    if _is_integer(a) or _is_integer(b):
        return _to_long(a) == _to_long(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return _to_boolean(a) == _to_boolean(b)
    if isinstance(a, str) or isinstance(b, str):
        return _to_string(a) == _to_string(b)
    return a == b


def _not_equal(a: object, b: object) -> bool:
    return not _equal(a, b)


def _ordered(a: object, b: object) -> tuple[float, float] | tuple[int, int] | tuple[str, str]:
    if _is_float(a) or _is_float(b):
        return _to_double(a), _to_double(b)
    if _is_integer(a) or _is_integer(b):
        return _to_long(a), _to_long(b)
    if isinstance(a, str) or isinstance(b, str):
        return _to_string(a), _to_string(b)
    if isinstance(a, bool) and isinstance(b, bool):  # Boolean is Comparable: false < true
        return int(a), int(b)
    raise ExpressionEvaluationError(f"Cannot compare {_describe(a)} with {_describe(b)}")


def _less0(a: object, b: object) -> bool:
    x, y = _ordered(a, b)
    return x < y  # type: ignore[operator]


def _greater0(a: object, b: object) -> bool:
    x, y = _ordered(a, b)
    return x > y  # type: ignore[operator]


def _less(a: object, b: object) -> bool:
    if a is b or a is None or b is None:
        return False
    return _less0(a, b)


def _greater(a: object, b: object) -> bool:
    if a is b or a is None or b is None:
        return False
    return _greater0(a, b)


def _less_equal(a: object, b: object) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    return not _greater0(a, b)


def _greater_equal(a: object, b: object) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    return not _less0(a, b)


_RELATIONAL: tuple[tuple[str, Callable[[object, object], object]], ...] = (
    ("<=", _less_equal),
    (">=", _greater_equal),
    ("<", _less),
    (">", _greater),
)


def _is_empty(value: object) -> bool:
    if value is None or value == "":
        return True
    if isinstance(value, str):
        return False
    if isinstance(value, Mapping | list | tuple | set | frozenset):
        return len(value) == 0
    return False
