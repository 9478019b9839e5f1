"""Alert expressions: a small, safe subset of Python, parsed with ``ast`` and
checked against a whitelist before anything is evaluated, so a config file
can never run code.

Allowed: numeric and boolean literals, record field names, ``+ - * /``,
comparisons (chains too), ``and`` / ``or`` / ``not``, and the functions

- ``min|max|mean|median|std|count(field, window)`` over the last ``window``
  records, the current one included. They skip missing and non-finite
  values, so one NaN step does not poison a window; ``std`` is the sample
  standard deviation; ``count`` is how many usable values the window holds.
- ``abs(x)``, ``isfinite(x)``, and ``len(list_field)`` for list fields
  (e.g. ``len(stragglers) > 0``).

A field that is absent (or None) in the current record makes the whole
expression *unknown* (:class:`Unknown`): the caller leaves the alert's state
as it was, so a sparse field such as ``val_loss`` neither fires nor resolves
an alert on the steps that do not carry it.
"""

from __future__ import annotations

import ast
import difflib
import itertools
import math
import operator
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence


class ExprError(ValueError):
    """A rejected expression; the message says what is wrong and what is allowed."""


class Unknown(Exception):
    """The expression cannot be decided on this record."""


def _std(values: list[float]) -> float:
    if len(values) < 2:
        raise Unknown  # a sample deviation needs two values
    return statistics.stdev(values)


WINDOW_FUNCTIONS: dict[str, Callable[[list[float]], float]] = {
    "min": min, "max": max, "mean": statistics.fmean, "median": statistics.median,
    "std": _std, "count": len,
}
VALUE_FUNCTIONS = ("abs", "isfinite", "len")

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}
_ALLOWED = "numbers, field names, + - * /, comparisons, and/or/not, " \
           f"{'/'.join(WINDOW_FUNCTIONS)}(field, window), abs(x), isfinite(x), len(list_field)"


@dataclass(frozen=True)
class Expression:
    """A checked expression. ``evaluate(history)`` reads ``history[-1]`` as the
    current record and earlier entries for the window functions."""

    source: str
    tree: ast.expr
    fields: frozenset[str]
    window: int  # the longest window any function reads; 1 without window functions
    defaults: Mapping[str, Any]  # what an absent field means, where absence has a meaning

    def evaluate(self, history: Sequence[Mapping]) -> Any:
        return _Evaluator(history, self.defaults).eval(self.tree)

    def value(self, history: Sequence[Mapping]) -> Any:
        """What an alert reports as its value: the left side of the last
        top-level comparison (``a > b`` -> a; ``w and a > b`` -> a), else None."""
        node = self.tree
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
            node = node.values[-1]
        if not isinstance(node, ast.Compare):
            return None
        try:
            return _Evaluator(history, self.defaults).eval(node.left)
        except (Unknown, ArithmeticError, TypeError, ValueError):
            return None


def compile_expr(source: str, numeric_fields: set[str], list_fields: set[str],
                 defaults: Mapping[str, Any] | None = None) -> Expression:
    """Parse and check ``source``; raise :class:`ExprError` on anything outside the whitelist."""
    if not isinstance(source, str) or not source.strip():
        raise ExprError("expr must be a non-empty string")
    checker = _Checker(numeric_fields, list_fields)
    try:
        tree = ast.parse(source.strip(), mode="eval").body
        checker.check(tree)
    except SyntaxError as exc:
        raise ExprError(f"syntax error at column {exc.offset}: {exc.msg}") from None
    except RecursionError:
        raise ExprError("expression is nested too deeply") from None
    return Expression(source.strip(), tree, frozenset(checker.fields), checker.window, dict(defaults or {}))


class _Checker:
    def __init__(self, numeric_fields: set[str], list_fields: set[str]):
        self.numeric, self.lists = set(numeric_fields), set(list_fields)
        self.fields: set[str] = set()
        self.window = 1

    def check(self, node: ast.AST) -> None:
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float)):  # bool is an int
                raise ExprError(f"literal {node.value!r} is not allowed: only numbers and True/False")
        elif isinstance(node, ast.Name):
            self._field(node.id, list_ok=False)
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            self.check(node.left)
            self.check(node.right)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            self.check(node.operand)
        elif isinstance(node, ast.BoolOp):
            for value in node.values:
                self.check(value)
        elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            for value in (node.left, *node.comparators):
                self.check(value)
        elif isinstance(node, ast.Call):
            self._call(node)
        else:
            raise ExprError(f"{_describe(node)} is not allowed; allowed: {_ALLOWED}")

    def _field(self, name: str, list_ok: bool) -> None:
        if name in self.lists and not list_ok:
            raise ExprError(f"'{name}' is a list: use len({name})")
        if name not in self.numeric and name not in self.lists:
            close = difflib.get_close_matches(name, sorted(self.numeric | self.lists), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ExprError(f"unknown field '{name}'{hint}; fields: {', '.join(sorted(self.numeric | self.lists))}")
        self.fields.add(name)

    def _call(self, node: ast.Call) -> None:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in WINDOW_FUNCTIONS and name not in VALUE_FUNCTIONS:
            shown = name or ast.unparse(node.func)
            raise ExprError(f"unknown function '{shown}'; allowed: {', '.join([*WINDOW_FUNCTIONS, *VALUE_FUNCTIONS])}")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise ExprError(f"{name}() takes positional arguments only")
        if name in WINDOW_FUNCTIONS:
            self._window_call(name, node.args)
        elif len(node.args) != 1:
            raise ExprError(f"{name}() takes 1 argument, got {len(node.args)}")
        elif name == "len":
            if not (isinstance(node.args[0], ast.Name) and node.args[0].id in self.lists):
                raise ExprError(f"len() takes a list field: {', '.join(sorted(self.lists))}")
            self._field(node.args[0].id, list_ok=True)
        else:
            self.check(node.args[0])

    def _window_call(self, name: str, args: list[ast.expr]) -> None:
        usage = f"{name}(field, window) takes a field name and a whole number of records"
        if len(args) != 2 or not isinstance(args[0], ast.Name):
            raise ExprError(usage)
        window = args[1]
        if not (isinstance(window, ast.Constant) and type(window.value) is int and window.value >= 1):
            raise ExprError(f"{usage}; got window {ast.unparse(window)}")
        self._field(args[0].id, list_ok=False)
        self.window = max(self.window, window.value)


def _describe(node: ast.AST) -> str:
    op = getattr(node, "op", None)
    if op is not None:
        return f"operator {type(op).__name__}"
    if isinstance(node, ast.Compare):
        return f"comparison {' '.join(type(op).__name__ for op in node.ops)}"
    return f"'{ast.unparse(node)}' ({type(node).__name__})"


class _Evaluator:
    def __init__(self, history: Sequence[Mapping], defaults: Mapping[str, Any]):
        self.history, self.defaults = history, defaults

    def eval(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self._lookup(node.id)
        if isinstance(node, ast.BinOp):
            try:
                return _BINARY[type(node.op)](self.eval(node.left), self.eval(node.right))
            except ZeroDivisionError:
                raise Unknown from None
        if isinstance(node, ast.UnaryOp):
            value = self.eval(node.operand)
            return not value if isinstance(node.op, ast.Not) else (-value if isinstance(node.op, ast.USub) else +value)
        if isinstance(node, ast.BoolOp):
            return self._bool(node)
        if isinstance(node, ast.Compare):
            return self._compare(node)
        return self._call(node)

    def _lookup(self, name: str) -> Any:
        value = self.history[-1].get(name) if self.history else None
        if value is None:
            if name in self.defaults:
                return self.defaults[name]
            raise Unknown
        return value

    def _bool(self, node: ast.BoolOp) -> bool:
        is_and = isinstance(node.op, ast.And)
        for value in node.values:
            if bool(self.eval(value)) != is_and:
                return not is_and
        return is_and

    def _compare(self, node: ast.Compare) -> bool:
        left = self.eval(node.left)
        for op, comparator in zip(node.ops, node.comparators):
            right = self.eval(comparator)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True

    def _call(self, node: ast.Call) -> Any:
        name = node.func.id
        if name in WINDOW_FUNCTIONS:
            field, window = node.args[0].id, node.args[1].value
            recent = itertools.islice(self.history, max(0, len(self.history) - window), None)
            values = [v for r in recent if _usable(v := r.get(field))]
            if not values and name != "count":
                raise Unknown
            return WINDOW_FUNCTIONS[name](values)
        arg = self.eval(node.args[0])
        if name == "len":
            return len(arg)
        return abs(arg) if name == "abs" else math.isfinite(arg)


def _usable(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
