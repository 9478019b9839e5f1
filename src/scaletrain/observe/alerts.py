"""Alert rules over the logged records, with pending -> firing -> resolved
states and sinks, in the manner of Prometheus alerting rules and Alertmanager.

A rule is one ``[[alerts]]`` table::

    [[alerts]]
    name = "loss_spike"
    expr = "loss > 2 * min(loss, 200)"   # see scaletrain.observe.expr
    for_steps = 20                       # optional, default 0
    for_seconds = 0                      # optional, default 0
    severity = "warning"                 # info | warning | critical
    message = "loss {loss:.3f} is {value:.3f}"   # optional; fields and {value}

Like Prometheus' ``for``, a rule whose expression turns true is *pending*
from that record's step and time; it *fires* once both ``step - first step
>= for_steps`` and ``now - first time >= for_seconds`` hold, and *resolves*
on the first record where the expression is false. Each transition is one
event, so a sink sees ``firing`` once and ``resolved`` once. Windows and
``for_steps`` count the records the engine observes (one per logged step).

Built-in rules (:data:`BUILTIN_RULES`) are on by default. A table naming one
changes it (``{name = "step_time_regression", for_steps = 50}``) or turns it
off (``{name = "straggler", enabled = false}``).
"""

from __future__ import annotations

import difflib
import json
import math
import re
import string
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from scaletrain.errors import UserError, warn
from scaletrain.observe.expr import Expression, ExprError, Unknown, compile_expr
from scaletrain.observe.sinks import AlertEvent, JsonlSink, LogSink, Sink, WebhookSink, build_sinks

__all__ = ["AlertEngine", "AlertEvent", "BUILTIN_RULES", "JsonlSink", "LogSink", "Rule", "Sink", "WebhookSink",
           "build_sinks", "parse_rules"]

SEVERITIES = ("info", "warning", "critical")
RULE_KEYS = ("name", "expr", "for_steps", "for_seconds", "severity", "message", "enabled")

# Fields of a metrics.jsonl record that rules may read. The event fields are
# written only when something happened, so their absence means "nothing".
NUMERIC_FIELDS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s",
                  "mem_peak_bytes", "mem_limit_bytes", "flops_per_s_per_device", "mfu", "val_loss",
                  "checkpoint_failed"}
LIST_FIELDS = {"stragglers", "missing_ranks"}
EVENT_DEFAULTS = {"stragglers": [], "missing_ranks": [], "checkpoint_failed": False}

# name -> table; the step-time rule waits for 10 usable records so that a
# median of the first, compile- and cache-warming steps cannot trigger it.
BUILTIN_RULES: dict[str, dict] = {
    "nonfinite": {"expr": "not (isfinite(loss) and isfinite(grad_norm))", "severity": "critical",
                  "message": "non-finite loss {loss} or grad norm {grad_norm}"},
    "straggler": {"expr": "len(stragglers) > 0", "severity": "warning",
                  "message": "straggler rank(s) {stragglers}: data+forward time over "
                             "debug.straggler_factor x the median"},
    "heartbeat_missing": {"expr": "len(missing_ranks) > 0", "severity": "critical",
                          "message": "no heartbeat from rank(s) {missing_ranks}"},
    "checkpoint_failed": {"expr": "checkpoint_failed", "severity": "critical",
                          "message": "checkpoint save failed"},
    # Sustained: one slow step (a checkpoint save, a busy neighbour on a shared host) is not a regression.
    "step_time_regression": {"expr": "count(step_time_s, 50) >= 10 and step_time_s > 1.5 * median(step_time_s, 50)",
                             "for_steps": 3, "severity": "warning",
                             "message": "step time {value:.3g} s is over 1.5x the median of the last 50 logged steps"},
}


@dataclass(frozen=True)
class Rule:
    name: str
    expr: Expression
    severity: str = "warning"
    for_steps: int = 0
    for_seconds: float = 0.0
    message: str = ""

    def describe(self, history: Sequence[Mapping], value: Any) -> str:
        """The message with ``{field}`` and ``{value}`` filled from the current
        record; the expression itself where the rule has no message."""
        if not self.message:
            return self.expr.source if value is None else f"{self.expr.source} (value {_render(value)})"
        names = _Fields({k: _Rendered(v) for k, v in {**EVENT_DEFAULTS, **history[-1]}.items()})
        names["value"] = _Rendered(value)
        try:
            return self.message.format_map(names)
        except (ValueError, TypeError):  # a spec that fits no value; the template still says what fired
            return self.message


def parse_rules(raw: Sequence[Mapping] | None, builtins: bool = True) -> list[Rule]:
    """The active rules: the built-ins (unless ``builtins`` is False), changed,
    disabled or joined by the ``[[alerts]]`` tables in ``raw``. Raises
    :class:`UserError` naming the table and what is wrong."""
    tables = {name: dict(table) for name, table in BUILTIN_RULES.items()} if builtins else {}
    seen: set[str] = set()
    for index, table in enumerate(raw or ()):
        where = f"alerts[{index}]"
        if not isinstance(table, Mapping):
            raise UserError(f"{where} must be a table with name and expr, got {table!r}")
        name = table.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
            raise UserError(f"{where}: name must be a word of letters, digits, _ . - (got {name!r})")
        where = f"{where} ('{name}')"
        if name in seen:
            raise UserError(f"{where}: a second rule with this name")
        seen.add(name)
        _check_keys(where, table)
        if table.get("enabled", True) is False:
            if name not in tables and name not in BUILTIN_RULES:
                raise UserError(f"{where}: enabled = false names no built-in rule; "
                                f"built-ins: {', '.join(BUILTIN_RULES)}")
            tables.pop(name, None)
            continue
        if name not in tables and "expr" not in table:
            raise UserError(f"{where}: expr is missing (e.g. expr = \"loss > 2 * min(loss, 200)\")")
        base = tables.get(name, {})
        if "expr" in table and "message" not in table:
            base = {k: v for k, v in base.items() if k != "message"}  # it described the old expr
        tables[name] = {**base, **table}
    return [_build_rule(name, table, f"alert '{name}'") for name, table in tables.items()]


def _check_keys(where: str, table: Mapping) -> None:
    for key in table:
        if key in RULE_KEYS:
            continue
        if key == "for":
            raise UserError(f"{where}: unknown field 'for'; say for_steps = N or for_seconds = S")
        close = difflib.get_close_matches(str(key), RULE_KEYS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"{where}: unknown field '{key}'{hint}; fields: {', '.join(RULE_KEYS)}")
    if "enabled" in table and not isinstance(table["enabled"], bool):
        raise UserError(f"{where}: enabled must be true or false, got {table['enabled']!r}")


def _build_rule(name: str, table: Mapping, where: str) -> Rule:
    try:
        expr = compile_expr(table["expr"], NUMERIC_FIELDS, LIST_FIELDS, EVENT_DEFAULTS)
    except ExprError as exc:
        shown = table["expr"] if len(str(table["expr"])) <= 80 else f"{str(table['expr'])[:77]}..."
        raise UserError(f"{where}: expr {shown!r}: {exc}") from None
    severity = table.get("severity", "warning")
    if severity not in SEVERITIES:
        raise UserError(f"{where}: severity must be one of {', '.join(SEVERITIES)}, got {severity!r}")
    for_steps, for_seconds = table.get("for_steps", 0), table.get("for_seconds", 0)
    if type(for_steps) is not int or for_steps < 0:
        raise UserError(f"{where}: for_steps must be a whole number >= 0, got {for_steps!r}")
    if isinstance(for_seconds, bool) or not isinstance(for_seconds, (int, float)) \
            or not math.isfinite(for_seconds) or for_seconds < 0:
        raise UserError(f"{where}: for_seconds must be a number >= 0, got {for_seconds!r}")
    message = table.get("message", "")
    if not isinstance(message, str):
        raise UserError(f"{where}: message must be a string, got {message!r}")
    _check_template(where, message)
    return Rule(name, expr, severity, for_steps, float(for_seconds), message)


def _check_template(where: str, message: str) -> None:
    try:
        names = [field for _, field, _, _ in string.Formatter().parse(message) if field is not None]
    except ValueError as exc:
        raise UserError(f"{where}: message {message!r}: {exc} (write {{{{ and }}}} for braces)") from None
    allowed = NUMERIC_FIELDS | LIST_FIELDS | {"value"}
    for field in names:
        if field not in allowed:
            raise UserError(f"{where}: message {message!r} names {{{field}}}; "
                            f"allowed: {{value}} and the record fields {', '.join(sorted(allowed - {'value'}))}")


class _Fields(dict):
    def __missing__(self, key: str) -> "_Rendered":
        return _Rendered(None)  # a field this record lacks prints as None


class _Rendered:
    """A template value: lists of rank entries print as their rank numbers,
    and a format spec that does not fit the value falls back to str()."""

    def __init__(self, value: Any):
        self.value = value

    def __format__(self, spec: str) -> str:
        if not spec or not isinstance(self.value, (int, float)):
            return _render(self.value)
        return format(self.value, spec)


def _render(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v["rank"]) if isinstance(v, Mapping) and "rank" in v else str(v) for v in value)
    return f"{value:.6g}" if isinstance(value, float) else str(value)


@dataclass
class _State:
    pending_step: int | None = None
    pending_time: float | None = None
    firing: bool = False
    message: str = ""  # the firing event's; the resolved event repeats it, as Alertmanager does


class AlertEngine:
    """Evaluates the rules on each observed record, keeps the window of
    records the rules need, and hands every transition to every sink.
    A sink that raises is reported once and skipped: alerts never stop training."""

    def __init__(self, rules: Sequence[Rule], sinks: Sequence[Sink] = ()):
        self.rules = list(rules)
        self.sinks = list(sinks)
        self.history: deque[Mapping] = deque(maxlen=max([r.expr.window for r in self.rules] + [1]))
        self.states = {rule.name: _State() for rule in self.rules}
        self._broken_sinks: set[int] = set()

    def observe(self, record: Mapping, now: float) -> list[AlertEvent]:
        self.history.append(record)
        events = [event for rule in self.rules if (event := self._advance(rule, record, now)) is not None]
        for event in events:
            self._send(event)
        return events

    def restore(self, path: str | Path, records: Sequence[Mapping] = ()) -> None:
        """Carry an earlier run in this run directory across a resume: the
        window refills from its ``records`` (metrics.jsonl up to the resumed
        step), and its firing alerts (``alerts.jsonl`` at ``path``) stay firing,
        so one still true is not announced again and one that cleared
        meanwhile gets its resolved event."""
        self.history.extend(records)
        if not Path(path).exists():
            return
        last: dict[str, dict] = {}
        for line in Path(path).read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(row, dict) and row.get("name") in self.states:
                last[row["name"]] = row
        for name, row in last.items():
            if row.get("state") == "firing":
                self.states[name] = _State(firing=True, message=str(row.get("message", "")))

    def firing(self) -> dict[str, int]:
        """Every rule's name -> 1 while it fires, else 0 (for the exporters)."""
        return {name: int(state.firing) for name, state in self.states.items()}

    def severities(self) -> dict[str, str]:
        return {rule.name: rule.severity for rule in self.rules}

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def _advance(self, rule: Rule, record: Mapping, now: float) -> AlertEvent | None:
        try:
            active = bool(rule.expr.evaluate(self.history))
        except (Unknown, ArithmeticError, TypeError, ValueError):
            return None  # undecidable on this record: keep the state
        state, step = self.states[rule.name], int(record.get("step", 0))
        if not active:
            self.states[rule.name] = _State()
            return self._event(rule, "resolved", step, now, state.message) if state.firing else None
        if state.firing:
            return None
        if state.pending_step is None:
            state.pending_step, state.pending_time = step, now
        if step - state.pending_step >= rule.for_steps and now - state.pending_time >= rule.for_seconds:
            event = self._event(rule, "firing", step, now)
            state.firing, state.message = True, event.message
            return event
        return None

    def _event(self, rule: Rule, state: str, step: int, now: float, message: str | None = None) -> AlertEvent:
        value = rule.expr.value(self.history)
        return AlertEvent(time=now, step=step, name=rule.name, severity=rule.severity, state=state,
                          message=rule.describe(self.history, value) if message is None else message, value=value)

    def _send(self, event: AlertEvent) -> None:
        for index, sink in enumerate(self.sinks):
            try:
                sink.send(event)
            except Exception as exc:  # noqa: BLE001 - a broken sink must not stop training
                if index not in self._broken_sinks:
                    self._broken_sinks.add(index)
                    warn(f"alert sink {type(sink).__name__} failed: {exc!r}; further failures are not shown")
