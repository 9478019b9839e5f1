"""Alert rules, the alert engine and its sinks, and the exporters, on
synthetic records: no training run is needed."""

import importlib.util
import json
import math
import queue
import socket
import struct
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scaletrain.errors import UserError
from scaletrain.observe.alerts import AlertEngine, JsonlSink, LogSink, WebhookSink, build_sinks, parse_rules
from scaletrain.observe.expr import compile_expr, Unknown
from scaletrain.observe.exporters import (PrometheusExporter, TensorBoardExporter, WandbExporter,
                                          build_exporters, check_exporters, scalars)


def record(step: int, **fields) -> dict:
    base = {"step": step, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens": 512 * step,
            "tokens_per_s": 1000.0, "step_time_s": 0.5, "mem_peak_bytes": 1_000, "mem_limit_bytes": 2_000,
            "flops_per_s_per_device": 1e9, "mfu": None}
    return {**base, **fields}


def run(engine: AlertEngine, records: list[dict]) -> list[tuple[str, str, int]]:
    """Feed records one second apart; (name, state, step) of every event."""
    return [(e.name, e.state, e.step) for r in records for e in engine.observe(r, now=float(r["step"]))]


# ---- rules ----------------------------------------------------------------

@pytest.mark.parametrize("name,changed", [
    ("nonfinite", {"loss": math.nan}),
    ("nonfinite", {"grad_norm": math.inf}),
    ("straggler", {"stragglers": [{"rank": 3, "forward_s": 0.9, "ratio": 2.1}]}),
    ("heartbeat_missing", {"missing_ranks": [1, 2]}),
    ("checkpoint_failed", {"checkpoint_failed": True}),
])
def test_each_builtin_fires_once_and_resolves(name, changed):
    engine = AlertEngine(parse_rules([]))
    records = [record(s) for s in range(1, 21)] + [record(21, **changed), record(22), record(23)]
    assert run(engine, records) == [(name, "firing", 21), (name, "resolved", 22)]
    assert engine.firing() == {n: 0 for n in engine.firing()}


def test_step_time_regression_is_sustained_and_waits_for_warm_up():
    engine = AlertEngine(parse_rules([]))
    # a slow fourth record: too few records for a median to mean anything
    records = [record(s, step_time_s=5.0 if s == 4 else 0.5) for s in range(1, 12)]
    assert run(engine, records) == []
    assert run(engine, [record(12, step_time_s=5.0), record(13)]) == []  # one slow step is not a regression
    slow = [record(s, step_time_s=0.8) for s in range(14, 18)]  # > 1.5 x the median 0.5, for 3 more steps
    assert run(engine, slow + [record(18)]) == [("step_time_regression", "firing", 17),
                                                ("step_time_regression", "resolved", 18)]


def test_issue_examples_fire():
    rules = parse_rules([
        {"name": "loss_spike", "expr": "loss > 2 * min(loss, 200)"},
        {"name": "slow", "expr": "tokens_per_s < 0.7 * median(tokens_per_s, 50)"},
        {"name": "memory", "expr": "mem_peak_bytes > 0.9 * mem_limit_bytes", "severity": "critical"},
    ], builtins=False)
    engine = AlertEngine(rules)
    records = [record(s, loss=3.0 - 0.1 * s) for s in range(1, 11)]  # min loss 2.0 at step 10
    records += [record(11, loss=4.5), record(12, tokens_per_s=600.0), record(13, mem_peak_bytes=1_900)]
    assert run(engine, records) == [("loss_spike", "firing", 11), ("loss_spike", "resolved", 12),
                                    ("slow", "firing", 12), ("slow", "resolved", 13), ("memory", "firing", 13)]


def test_for_steps_needs_the_condition_to_hold_that_long():
    engine = AlertEngine(parse_rules([{"name": "high", "expr": "loss > 3", "for_steps": 3}], builtins=False))
    high = {10, 11, 13, 14, 15, 16, 17}  # the break at 12 restarts the pending time
    records = [record(s, loss=4.0 if s in high else 2.0) for s in range(1, 20)]
    assert run(engine, records) == [("high", "firing", 16), ("high", "resolved", 18)]


def test_for_seconds_uses_the_clock_not_the_steps():
    engine = AlertEngine(parse_rules([{"name": "high", "expr": "loss > 3", "for_seconds": 60}], builtins=False))
    assert engine.observe(record(1, loss=4.0), now=1000.0) == []
    assert engine.observe(record(2, loss=4.0), now=1059.0) == []
    [event] = engine.observe(record(3, loss=4.0), now=1060.0)
    assert (event.state, event.step, event.time, event.value) == ("firing", 3, 1060.0, 4.0)


def test_events_are_deduplicated():
    engine = AlertEngine(parse_rules([{"name": "high", "expr": "loss > 3"}], builtins=False))
    records = [record(s, loss=4.0 if 5 <= s < 15 else 2.0) for s in range(1, 25)]
    assert run(engine, records) == [("high", "firing", 5), ("high", "resolved", 15)]


def test_a_missing_field_neither_fires_nor_resolves():
    engine = AlertEngine(parse_rules([{"name": "val", "expr": "val_loss > 3"}], builtins=False))
    records = [record(1, val_loss=4.0), record(2), record(3), record(4, val_loss=2.0)]
    assert run(engine, records) == [("val", "firing", 1), ("val", "resolved", 4)]


def test_window_functions_skip_missing_and_nonfinite_values():
    history = [{"loss": v} for v in (4.0, math.nan, None, 1.0, 2.0, 3.0)]
    fields, lists = {"loss"}, set()
    value = lambda src: compile_expr(src, fields, lists).evaluate(history)  # noqa: E731
    assert value("min(loss, 100)") == 1.0 and value("max(loss, 100)") == 4.0
    assert value("mean(loss, 100)") == 2.5 and value("median(loss, 100)") == 2.5
    assert value("std(loss, 100)") == pytest.approx(math.sqrt(5 / 3))  # sample deviation of 1..4
    assert value("count(loss, 5)") == 3 and value("mean(loss, 2)") == 2.5  # the last 5 and 2 records
    assert value("abs(1 - loss) + 0 == 2") is True and value("not isfinite(loss)") is False
    with pytest.raises(Unknown):
        value("std(loss, 1)")  # one value has no sample deviation
    with pytest.raises(Unknown):
        value("loss / (loss - 3)")  # division by zero is undecidable, not an error


def test_builtins_can_be_disabled_and_changed_by_name():
    rules = {r.name: r for r in parse_rules([{"name": "straggler", "enabled": False},
                                             {"name": "step_time_regression", "for_steps": 5, "severity": "info"}])}
    assert set(rules) == {"nonfinite", "heartbeat_missing", "checkpoint_failed", "step_time_regression"}
    changed = rules["step_time_regression"]
    assert (changed.for_steps, changed.severity) == (5, "info")
    assert "median(step_time_s, 50)" in changed.expr.source and "1.5x" in changed.message
    [own] = parse_rules([{"name": "step_time_regression", "expr": "step_time_s > 2 * mean(step_time_s, 9)"}])[-1:]
    assert (own.severity, own.message) == ("warning", "")  # the built-in's message described its own expr


@pytest.mark.parametrize("table,expected", [
    ({"name": "a", "expr": "loss > 1", "sevrity": "info"},
     "alerts[0] ('a'): unknown field 'sevrity' (did you mean 'severity'?)"),
    ({"name": "a", "expr": "loss > 1", "for": 3}, "say for_steps = N or for_seconds = S"),
    ({"name": "a", "expr": "loss >"}, "alert 'a': expr 'loss >': syntax error"),
    ({"name": "a", "expr": "exp(loss) > 1"}, "alert 'a': expr 'exp(loss) > 1': unknown function 'exp'"),
    ({"name": "a", "expr": "__import__('os').system('true')"}, "unknown function '__import__('os').system'"),
    ({"name": "a", "expr": "loss.real > 1"}, "'loss.real' (Attribute) is not allowed"),
    ({"name": "a", "expr": "loss ** 2 > 1"}, "operator Pow is not allowed"),
    ({"name": "a", "expr": "(" * 5000 + "loss" + ")" * 5000}, "too many nested parentheses"),
    ({"name": "a", "expr": "-" * 5000 + "loss > 1"}, "nested too deeply"),
    ({"name": "a", "expr": "[x for x in ()]"}, "(ListComp) is not allowed"),
    ({"name": "a", "expr": 3}, "expr must be a non-empty string"),
    ({"name": "a", "expr": "loss > '1'"}, "literal '1' is not allowed"),
    ({"name": "a", "expr": "los > 1"}, "unknown field 'los' (did you mean 'loss'?)"),
    ({"name": "a", "expr": "stragglers > 0"}, "'stragglers' is a list: use len(stragglers)"),
    ({"name": "a", "expr": "loss > min(loss, 2.5)"},
     "takes a field name and a whole number of records; got window 2.5"),
    ({"name": "a", "expr": "loss > min(loss, 0)"}, "got window 0"),
    ({"name": "a", "expr": "loss > min(2 * loss, 5)"}, "min(field, window) takes a field name"),
    ({"name": "a", "expr": "abs(loss, 1) > 0"}, "abs() takes 1 argument, got 2"),
    ({"name": "a", "expr": "loss > 1", "severity": "page"},
     "severity must be one of info, warning, critical, got 'page'"),
    ({"name": "a", "expr": "loss > 1", "for_steps": -1}, "for_steps must be a whole number >= 0, got -1"),
    ({"name": "a", "expr": "loss > 1", "for_steps": True}, "for_steps must be a whole number >= 0, got True"),
    ({"name": "a", "expr": "loss > 1", "for_seconds": "5m"}, "for_seconds must be a number >= 0, got '5m'"),
    ({"name": "a", "expr": "loss > 1", "message": "loss {lss}"}, "names {lss}"),
    ({"name": "a", "expr": "loss > 1", "message": "loss {"}, "write {{ and }} for braces"),
    ({"name": "a"}, "alerts[0] ('a'): expr is missing"),
    ({"name": "a", "enabled": False}, "enabled = false names no built-in rule"),
    ({"name": "a", "expr": "loss > 1", "enabled": "no"}, "enabled must be true or false"),
    ({"name": "two words", "expr": "loss > 1"}, "alerts[0]: name must be a word"),
    ({"expr": "loss > 1"}, "alerts[0]: name must be a word"),
    ("loss > 1", "alerts[0] must be a table"),
])
def test_bad_rules_are_user_errors_naming_the_rule(table, expected):
    with pytest.raises(UserError) as excinfo:
        parse_rules([table])
    assert expected in str(excinfo.value)


def test_duplicate_rule_names_are_refused():
    with pytest.raises(UserError, match=r"alerts\[1\] \('a'\): a second rule with this name"):
        parse_rules([{"name": "a", "expr": "loss > 1"}, {"name": "a", "expr": "loss > 2"}])


# ---- sinks ----------------------------------------------------------------

def test_log_and_jsonl_sinks(tmp_path, capsys):
    engine = AlertEngine(parse_rules([]), build_sinks(tmp_path))
    run(engine, [record(1), record(2, loss=math.nan), record(3)])
    engine.close()
    assert capsys.readouterr().err.splitlines() == [
        "alert FIRING [critical] nonfinite: non-finite loss nan or grad norm 1 (step 2)",
        "alert RESOLVED [critical] nonfinite: non-finite loss nan or grad norm 1 (step 3)",
    ]
    rows = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(r["name"], r["state"], r["step"], r["time"], r["severity"]) for r in rows] == [
        ("nonfinite", "firing", 2, 2.0, "critical"), ("nonfinite", "resolved", 3, 3.0, "critical")]
    assert set(rows[0]) == {"time", "step", "name", "severity", "state", "message", "value"}


def test_message_template_and_value(tmp_path):
    sink = JsonlSink(tmp_path / "alerts.jsonl")
    engine = AlertEngine(parse_rules([{"name": "spike", "expr": "loss > 2 * min(loss, 10)",
                                       "message": "loss {loss:.2f} at lr {lr}"}], builtins=False), [sink])
    [event] = [e for r in (record(1, loss=1.0), record(2, loss=2.5)) for e in engine.observe(r, now=0.0)]
    assert (event.message, event.value) == ("loss 2.50 at lr 0.001", 2.5)
    rule = parse_rules([{"name": "v", "expr": "loss > 1", "message": "val {val_loss:.2f}, mfu {mfu:.1%}"}],
                       builtins=False)[0]
    assert rule.describe([record(1)], None) == "val None, mfu None"  # absent or None: no crash, no fake number


def test_a_raising_sink_is_reported_once_and_the_others_still_get_events(capsys):
    class Broken:
        def send(self, event):
            raise OSError("disk full")

        def close(self):
            pass

    engine = AlertEngine(parse_rules([]), [Broken(), LogSink()])
    run(engine, [record(1, loss=math.nan), record(2), record(3, loss=math.nan)])
    err = capsys.readouterr().err
    assert err.count("alert sink Broken failed") == 1
    assert err.count("alert FIRING [critical] nonfinite") == 2


class _Receiver(ThreadingHTTPServer):
    """A local webhook endpoint; ``delay_s`` makes it hold each request."""

    def __init__(self, delay_s: float = 0.0):
        self.bodies: queue.Queue = queue.Queue()
        self.delay_s = delay_s
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                time.sleep(server.delay_s)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.bodies.put((self.headers["Content-Type"], json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


def test_webhook_is_received_by_a_local_server():
    receiver = _Receiver()
    try:
        sink = WebhookSink(receiver.url, timeout_s=5.0, run="run-1")
        engine = AlertEngine(parse_rules([]), [sink])
        run(engine, [record(1), record(2, missing_ranks=[3]), record(3)])
        engine.close()
        got = [receiver.bodies.get(timeout=10) for _ in range(2)]
    finally:
        receiver.shutdown()
        receiver.server_close()
    assert [ctype for ctype, _ in got] == ["application/json"] * 2
    firing, resolved = (body for _, body in got)
    assert firing["text"] == "[FIRING] heartbeat_missing (critical) run-1: no heartbeat from rank(s) 3 (step 2)"
    assert (firing["state"], firing["step"], firing["run"], firing["value"]) == ("firing", 2, "run-1", 1)
    assert (resolved["state"], resolved["step"]) == ("resolved", 3)
    assert receiver.bodies.empty()  # de-duplicated: nothing more was sent


def test_a_failing_webhook_never_raises_and_is_reported_once(capsys):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
    sink = WebhookSink(url, timeout_s=2.0)
    engine = AlertEngine(parse_rules([]), [sink])
    run(engine, [record(1, loss=math.nan), record(2), record(3, loss=math.nan)])
    engine.close()
    err = capsys.readouterr().err
    assert err.count(f"alert webhook {url} failed") == 1
    assert "ConnectionRefusedError" in err or "Connection refused" in err


def test_a_slow_webhook_blocks_neither_send_nor_close_past_the_timeout():
    receiver = _Receiver(delay_s=3.0)
    try:
        sink = WebhookSink(receiver.url, timeout_s=0.5)
        engine = AlertEngine(parse_rules([]), [sink])
        start = time.monotonic()
        run(engine, [record(1, loss=math.nan), record(2), record(3, loss=math.nan)])
        sent = time.monotonic() - start
        engine.close()
        closed = time.monotonic() - start
    finally:
        receiver.shutdown()
        receiver.server_close()
    # blocking POSTs would take 0.5 s (the timeout) per event; the receiver holds each for 3 s
    assert sent < 0.4  # the POSTs happen on the sink's thread
    assert closed < 0.5 + 1.0  # close waits the timeout, with slack for a loaded machine


def test_webhook_url_must_be_http():
    with pytest.raises(UserError, match="http:// or https://"):
        WebhookSink("file:///etc/passwd")


# ---- exporters ------------------------------------------------------------

def ranks_of(step: int) -> list[dict]:
    return [{"rank": r, "step_time_s": 0.5 + 0.1 * r, "data_s": 0.01 * (r + 1), "forward_s": 0.1,
             "backward_s": 0.2, "optimizer_s": 0.05, "comm_wait_s": 0.02 * r, "rss_bytes": 1_000_000 * (r + 1),
             "mem_allocated_bytes": None, "cpu_util": 50.0 + r} for r in range(2)]


def test_scalars_reduce_ranks_to_mean_and_max():
    tags = scalars(record(3, val_loss=1.5), ranks_of(3), {"nonfinite": 1})
    assert tags["train/loss"] == 2.0 and tags["validation/loss"] == 1.5 and tags["train/tokens"] == 1536
    assert "train/mfu" not in tags  # None on CPU: no point rather than a fake zero
    assert tags["time/data_seconds_mean"] == pytest.approx(0.015)
    assert tags["time/comm_wait_seconds_mean"] == pytest.approx(0.01)
    assert tags["ranks/step_seconds_max"] == pytest.approx(0.6)
    assert tags["ranks/memory_bytes_max"] == 2_000_000 and tags["ranks/cpu_util_mean"] == 50.5
    assert tags["alerts/nonfinite"] == 1


def _scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_prometheus_endpoint_serves_conventional_metrics():
    exporter = PrometheusExporter(0, severities={"nonfinite": "critical"})
    try:
        assert exporter.port > 0 and exporter.url.startswith("http://127.0.0.1:")
        exporter.write(record(10, loss=2.5, val_loss=2.7), ranks_of(10), {"nonfinite": 0})
        exporter.write(record(20, loss=2.25, step_time_s=30.0), ranks_of(20), {"nonfinite": 1})
        got = _scrape(exporter.url)
    finally:
        exporter.close()
    assert got[("scaletrain_train_loss", ())] == 2.25
    assert got[("scaletrain_validation_loss", ())] == 2.7
    assert got[("scaletrain_train_tokens_per_second", ())] == 1000.0
    assert got[("scaletrain_train_learning_rate", ())] == 1e-3
    assert got[("scaletrain_train_step_total", ())] == 20  # counts steps, not writes
    assert got[("scaletrain_train_tokens_total", ())] == 512 * 20
    assert got[("scaletrain_train_step_seconds_count", ())] == 2
    assert got[("scaletrain_train_step_seconds_sum", ())] == 30.5
    assert got[("scaletrain_train_step_seconds_bucket", (("le", "0.5"),))] == 1
    assert got[("scaletrain_train_step_seconds_bucket", (("le", "25.0"),))] == 1
    assert math.isnan(got[("scaletrain_train_mfu_ratio", ())])
    assert got[("scaletrain_train_memory_bytes", (("rank", "1"),))] == 2_000_000
    assert got[("scaletrain_train_phase_seconds", (("phase", "backward"),))] == pytest.approx(0.2)
    assert got[("scaletrain_alerts_firing", (("alertname", "nonfinite"), ("severity", "critical")))] == 1
    assert abs(got[("scaletrain_train_last_step_timestamp_seconds", ())] - time.time()) < 60
    with pytest.raises(OSError):  # closed: the port no longer answers
        urllib.request.urlopen(exporter.url, timeout=2)


def test_a_taken_prometheus_port_is_a_user_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"logging.prometheus_port = {port}: cannot listen on 127.0.0.1:{port}"):
            check_exporters({"prometheus_port": port})
        with pytest.raises(UserError, match=f"logging.prometheus_port = {port}"):
            PrometheusExporter(port)


@pytest.mark.parametrize("values,expected", [
    ({"prometheus_port": 70000}, "logging.prometheus_port must be -1 (off), 0 (any free port) or a port"),
    ({"prometheus_port": "9100"}, "logging.prometheus_port must be"),
    ({"prometheus_port": 0, "prometheus_host": ""}, "logging.prometheus_host must be an address"),
    ({"tensorboard": "yes"}, "logging.tensorboard must be true or false"),
])
def test_bad_exporter_values_are_user_errors(values, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        check_exporters(values)


@pytest.mark.parametrize("key", ["tensorboard", "wandb"])
def test_a_missing_package_names_the_key_and_the_pip_command(key, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == key else real(name, *a))
    with pytest.raises(UserError) as excinfo:
        check_exporters({key: True})
    assert str(excinfo.value) == (f"logging.{key} = true needs the {key} package: pip install {key} "
                                  "(or pip install 'scaletrain[observe]')")
    check_exporters({key: False})  # off: the package is not needed


def test_everything_off_builds_nothing(tmp_path):
    assert build_exporters({"tensorboard": False, "wandb": False, "prometheus_port": -1}, tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install tensorboard (the test extra has it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [exporter] = build_exporters({"tensorboard": True}, tmp_path)
    assert isinstance(exporter, TensorBoardExporter) and exporter.log_dir == tmp_path / "tensorboard"
    for step, loss in ((1, 3.0), (2, 2.5), (3, 2.0)):
        exporter.write(record(step, loss=loss), ranks_of(step), {"nonfinite": int(step == 2)})
    exporter.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(1, 3.0), (2, 2.5), (3, 2.0)]
    assert [e.value for e in events.Scalars("alerts/nonfinite")] == [0, 1, 0]
    assert [e.value for e in events.Scalars("ranks/memory_bytes_max")] == [2_000_000] * 3


def _wandb_records(path):
    """The protobuf records of a .wandb file: a 7-byte header (":W&B", magic,
    version), then LevelDB-log blocks of 32 KiB whose chunks carry a
    crc32/length/type header (full=1, first=2, middle=3, last=4)."""
    from wandb.proto import wandb_internal_pb2

    data, offset, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        length, kind = struct.unpack("<HB", data[offset + 4:offset + 7])
        chunk, offset = data[offset + 7:offset + 7 + length], offset + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            message = wandb_internal_pb2.Record()
            message.ParseFromString(pending)
            yield message


def test_wandb_offline_run_holds_the_history(tmp_path):
    pytest.importorskip("wandb", reason="pip install wandb (the test extra has it)")
    [exporter] = build_exporters({"wandb": True}, tmp_path / "run-7", wandb_config={"model": {"name": "debug"}})
    assert isinstance(exporter, WandbExporter)
    for step, loss in ((5, 3.0), (10, 2.5)):
        exporter.write(record(step, loss=loss), ranks_of(step), {})
    exporter.close()
    [run_file] = (tmp_path / "run-7" / "wandb").glob("offline-run-*/run-*.wandb")
    history = []
    for message in _wandb_records(run_file):
        if message.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in message.history.item}
            history.append((items["_step"], items["train/loss"], items["train/tokens"]))
        elif message.WhichOneof("record_type") == "run":
            assert (message.run.project, message.run.display_name) == ("scaletrain", "run-7")
    assert history == [(5, 3.0, 2560), (10, 2.5, 5120)]


def test_a_resumed_run_neither_repeats_nor_forgets_firing_alerts(tmp_path):
    before = [record(s) for s in range(1, 21)] + [record(21, missing_ranks=[1])]
    before += [record(s, step_time_s=0.9) for s in range(22, 26)]
    first = AlertEngine(parse_rules([]), build_sinks(tmp_path))
    run(first, before)
    first.close()  # stops here: heartbeat_missing resolved, step_time_regression still firing
    again = AlertEngine(parse_rules([]), build_sinks(tmp_path))
    again.restore(tmp_path / "alerts.jsonl", before)
    assert again.firing()["step_time_regression"] == 1 and again.firing()["heartbeat_missing"] == 0
    assert run(again, [record(26, step_time_s=0.9)]) == []  # no second "firing"
    assert run(again, [record(27)]) == [("step_time_regression", "resolved", 27)]
    rows = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert [(r["name"], r["state"]) for r in rows[-2:]] == [("step_time_regression", "firing"),
                                                          ("step_time_regression", "resolved")]
    assert rows[-1]["message"] == rows[-2]["message"] == \
        "step time 0.9 s is over 1.5x the median of the last 50 logged steps"
