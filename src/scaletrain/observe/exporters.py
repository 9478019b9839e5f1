"""Exporters: the logged records, as Prometheus metrics, TensorBoard event
files and an offline W&B run. Rank 0 calls ``write`` once per logged step.

Config (``[logging]``; all off by default):

- ``tensorboard = true``: event files in ``RUN_DIR/tensorboard``
  (needs ``pip install tensorboard``);
- ``wandb = true``: an offline W&B run in ``RUN_DIR/wandb`` (needs
  ``pip install wandb``; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it);
- ``prometheus_port``: -1 off, 0 any free port (the log names it), or a port;
  ``prometheus_host`` (default 127.0.0.1) is the address it listens on.
"""

from __future__ import annotations

import importlib.util
import math
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Protocol

from scaletrain.errors import UserError

PHASES = ("data", "forward", "backward", "optimizer", "comm_wait")  # ranks[i][f"{phase}_s"]
OBSERVE_EXTRA = "pip install 'scaletrain[observe]'"

# Prometheus' default buckets stop at 10 s; training steps run from
# milliseconds (tiny CPU models) to minutes (large models, long sequences).
STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 300, 600)


class Exporter(Protocol):
    def write(self, record: dict, ranks: list[dict], alerts_firing: dict[str, int]) -> None: ...

    def close(self) -> None: ...


def _number(value: Any) -> float | None:
    """A float for an exporter, None where the value is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _rank_memory(rank: Mapping) -> float | None:
    """The memory a rank's training uses on its device: allocated GPU memory
    where there is a GPU, else the process's resident set."""
    allocated = _number(rank.get("mem_allocated_bytes"))
    return allocated if allocated is not None else _number(rank.get("rss_bytes"))


def _mean_over_ranks(ranks: list[dict], key: str) -> float | None:
    values = [v for r in ranks if (v := _number(r.get(key))) is not None]
    return statistics.fmean(values) if values else None


def scalars(record: Mapping, ranks: list[dict], alerts_firing: Mapping[str, int]) -> dict[str, float]:
    """The flat tag -> value view that TensorBoard and W&B log. Per-rank values
    are reduced to mean and max so the number of tags does not grow with the job."""
    tags = {
        "train/loss": record.get("loss"), "train/learning_rate": record.get("lr"),
        "train/grad_norm": record.get("grad_norm"), "train/tokens": record.get("tokens"),
        "train/tokens_per_second": record.get("tokens_per_s"), "train/step_seconds": record.get("step_time_s"),
        "train/memory_peak_bytes": record.get("mem_peak_bytes"),
        "train/flops_per_second_per_device": record.get("flops_per_s_per_device"),
        "train/mfu": record.get("mfu"), "validation/loss": record.get("val_loss"),
    }
    for phase in PHASES:
        tags[f"time/{phase}_seconds_mean"] = _mean_over_ranks(ranks, f"{phase}_s")
    step_times = [v for r in ranks if (v := _number(r.get("step_time_s"))) is not None]
    memories = [v for r in ranks if (v := _rank_memory(r)) is not None]
    tags["ranks/step_seconds_max"] = max(step_times, default=None)
    tags["ranks/step_seconds_mean"] = statistics.fmean(step_times) if step_times else None
    tags["ranks/memory_bytes_max"] = max(memories, default=None)
    tags["ranks/cpu_util_mean"] = _mean_over_ranks(ranks, "cpu_util")
    tags.update({f"alerts/{name}": firing for name, firing in alerts_firing.items()})
    return {tag: number for tag, value in tags.items() if (number := _number(value)) is not None}


class PrometheusExporter:
    """A ``/metrics`` endpoint with its own registry (so nothing else in the
    process leaks into it) and its own HTTP server thread. ``port`` 0 takes a
    free port; ``self.port`` is the one bound. Labels stay low-cardinality:
    ``rank``, ``phase``, ``alertname``, ``severity``."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", severities: Mapping[str, str] | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        self.severities = dict(severities or {})

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry)

        self.loss = gauge("scaletrain_train_loss", "Training loss of the last logged step (global batch mean).")
        self.val_loss = gauge("scaletrain_validation_loss", "Validation loss of the last evaluation.")
        self.lr = gauge("scaletrain_train_learning_rate", "Learning rate of the last logged step.")
        self.grad_norm = gauge("scaletrain_train_grad_norm", "Gradient norm before clipping, last logged step.")
        self.tokens_per_s = gauge("scaletrain_train_tokens_per_second", "Training throughput, all ranks together.")
        self.flops = gauge("scaletrain_train_flops_per_second_per_device", "Achieved model FLOP/s per device.")
        self.mfu = gauge("scaletrain_train_mfu_ratio", "Model FLOPs utilisation, 0..1 (NaN where the peak is unknown).")
        self.mem_peak = gauge("scaletrain_train_memory_peak_bytes", "Rank 0's peak memory (CUDA allocator or RSS).")
        self.memory = gauge("scaletrain_train_memory_bytes",
                            "Memory a rank's training uses: allocated GPU memory, else resident set.", ("rank",))
        self.phase = gauge("scaletrain_train_phase_seconds",
                           "Mean over ranks of the time in each part of the last logged step.", ("phase",))
        self.last_step_time = gauge("scaletrain_train_last_step_timestamp_seconds",
                                    "Unix time of the last logged step (for staleness alerts).")
        self.alerts = gauge("scaletrain_alerts_firing", "1 while the alert fires, else 0.", ("alertname", "severity"))
        self.steps = Counter("scaletrain_train_step", "Optimizer steps taken.", registry=self.registry)
        self.tokens = Counter("scaletrain_train_tokens", "Tokens trained on.", registry=self.registry)
        self.step_seconds = Histogram("scaletrain_train_step_seconds", "Wall time of a logged step.",
                                      buckets=STEP_SECONDS_BUCKETS, registry=self.registry)
        self.val_loss.set(math.nan)  # not 0 before the first evaluation
        self.last_step: int | None = None
        self.last_tokens = 0.0
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UserError(f"logging.prometheus_port = {port}: cannot listen on {host}:{port} "
                            f"({exc.strerror or exc}); pick a free port or 0 for any") from None
        self.host, self.port = host, self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/metrics"

    def write(self, record: dict, ranks: list[dict], alerts_firing: dict[str, int]) -> None:
        for metric, key in ((self.loss, "loss"), (self.val_loss, "val_loss"), (self.lr, "lr"),
                            (self.grad_norm, "grad_norm"), (self.tokens_per_s, "tokens_per_s"),
                            (self.flops, "flops_per_s_per_device"), (self.mem_peak, "mem_peak_bytes")):
            if (value := _number(record.get(key))) is not None:
                metric.set(value)
        mfu = _number(record.get("mfu"))
        self.mfu.set(math.nan if mfu is None else mfu)
        self._count(record)
        if (step_time := _number(record.get("step_time_s"))) is not None:
            self.step_seconds.observe(step_time)
        for rank in ranks:
            if (memory := _rank_memory(rank)) is not None:
                self.memory.labels(rank=str(rank["rank"])).set(memory)
        for phase in PHASES:
            if (seconds := _mean_over_ranks(ranks, f"{phase}_s")) is not None:
                self.phase.labels(phase=phase).set(seconds)
        for name, firing in alerts_firing.items():
            self.alerts.labels(alertname=name, severity=self.severities.get(name, "")).set(firing)
        self.last_step_time.set(time.time())

    def _count(self, record: dict) -> None:
        """Counters only go up: add the steps and tokens since the last write.
        The first write after a resume adds everything up to it, so the
        counter equals the run's step, and a scrape sees a counter reset."""
        step, tokens = record.get("step"), _number(record.get("tokens"))
        if isinstance(step, int) and step > (self.last_step or 0):
            self.steps.inc(step - (self.last_step or 0))
            self.last_step = step
        if tokens is not None and tokens > self.last_tokens:
            self.tokens.inc(tokens - self.last_tokens)
            self.last_tokens = tokens

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class TensorBoardExporter:
    """Scalars in TensorBoard event files under ``log_dir``, flushed on every
    write so ``tensorboard --logdir`` shows a run while it trains."""

    def __init__(self, log_dir: str | Path):
        _require("tensorboard", "logging.tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, record: dict, ranks: list[dict], alerts_firing: dict[str, int]) -> None:
        for tag, value in scalars(record, ranks, alerts_firing).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbExporter:
    """An offline W&B run under ``run_dir/wandb`` (nothing leaves the machine;
    ``wandb sync`` uploads it later)."""

    def __init__(self, run_dir: str | Path, project: str, name: str, config: Mapping | None = None):
        _require("wandb", "logging.wandb")
        import wandb

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(mode="offline", dir=str(self.run_dir), project=project, name=name,
                              config=dict(config or {}),
                              settings=wandb.Settings(console="off", silent=True))

    def write(self, record: dict, ranks: list[dict], alerts_firing: dict[str, int]) -> None:
        self.run.log(scalars(record, ranks, alerts_firing), step=record["step"])

    def close(self) -> None:
        self.run.finish()
        # finish() returns once the run is marked done, but W&B's service
        # process may still hold buffered records; teardown waits for it, so
        # the offline run is complete on disk when close returns.
        self.wandb.teardown()


def _require(module: str, key: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{key} = true needs the {module} package: pip install {module} (or {OBSERVE_EXTRA})")


def check_exporters(values: Mapping[str, Any], check_port: bool = True) -> None:
    """Refuse bad exporter settings before any worker starts: wrong types, a
    missing optional package, and (with ``check_port``, where rank 0 will run
    on this host) a Prometheus port that is taken."""
    for key in ("tensorboard", "wandb"):
        if not isinstance(values.get(key, False), bool):
            raise UserError(f"logging.{key} must be true or false, got {values[key]!r}")
        if values.get(key, False):
            _require(key, f"logging.{key}")
    port, host = values.get("prometheus_port", -1), values.get("prometheus_host", "127.0.0.1")
    if type(port) is not int or not -1 <= port <= 65535:
        raise UserError(f"logging.prometheus_port must be -1 (off), 0 (any free port) or a port up to 65535, "
                        f"got {port!r}")
    if not isinstance(host, str) or not host:
        raise UserError(f"logging.prometheus_host must be an address such as 127.0.0.1, got {host!r}")
    if check_port and port >= 0:
        _check_listen(host, port)


def _check_listen(host: str, port: int) -> None:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # the exporter's server reuses addresses too, so a port in TIME_WAIT is not "taken"
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise UserError(f"logging.prometheus_port = {port}: cannot listen on {host}:{port} "
                        f"({exc.strerror or exc}); pick a free port or 0 for any") from None


def build_exporters(values: Mapping[str, Any], run_dir: str | Path, severities: Mapping[str, str] | None = None,
                    wandb_config: Mapping | None = None) -> list[Exporter]:
    """The exporters the ``logging`` values turn on, for rank 0. ``severities``
    (``AlertEngine.severities()``) labels ``scaletrain_alerts_firing``;
    ``wandb_config`` (e.g. the resolved config) is stored with the W&B run."""
    check_exporters(values, check_port=False)
    run_dir = Path(run_dir)
    exporters: list[Exporter] = []
    try:
        if values.get("tensorboard", False):
            exporters.append(TensorBoardExporter(run_dir / "tensorboard"))
        if values.get("wandb", False):
            exporters.append(WandbExporter(run_dir, project="scaletrain", name=run_dir.name, config=wandb_config))
        if values.get("prometheus_port", -1) >= 0:
            exporter = PrometheusExporter(values["prometheus_port"], values.get("prometheus_host", "127.0.0.1"),
                                          severities)
            print(f"prometheus metrics at {exporter.url}", file=sys.stderr, flush=True)
            exporters.append(exporter)
    except BaseException:
        for exporter in exporters:  # a later failure must not leave a writer or a W&B run open
            exporter.close()
        raise
    return exporters
