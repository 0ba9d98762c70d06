"""``LOOPWATCH_OTEL=1``: loopwatch through OpenTelemetry (the ``otel`` extra).

Three things go out, with the meaning the Prometheus ones have:

- **Metrics**, named as on the Prometheus endpoint without the suffixes an OTLP-to-Prometheus
  conversion adds back (``loopwatch_slow_callbacks`` for ``loopwatch_slow_callbacks_total``;
  a histogram or counter in seconds keeps ``_seconds`` and has the unit ``s``):
  - the program set a ``MeterProvider`` (``metrics.set_meter_provider``, or the
    ``opentelemetry-instrument`` launcher): they are its instruments. Counters and the gauge
    are observable (read when the provider collects, nothing in between); a histogram has no
    observable form in OpenTelemetry, so each observation since the last tick is recorded into
    the provider's histogram from loopwatch's thread (buckets, count and sum exact), within a
    budget of :data:`RECORD_BUDGET` of that thread's time per tick; what does not fit waits for
    the next tick.
  - it did not: loopwatch exports them itself with the OTLP/HTTP exporter, configured by the
    standard ``OTEL_EXPORTER_OTLP_*`` variables, every ``OTEL_METRIC_EXPORT_INTERVAL``
    (60 s by default), built from its own counts (no instrument, no per-observation cost), the
    resource from ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``.
  Which one is decided at every tick: a provider set later takes over.
- **A log record per finding**, through the program's ``LoggerProvider`` or an OTLP/HTTP one of
  loopwatch's, as above. Its body is the text line, its attributes the finding's fields, its
  event name the finding's, its severity WARN, and it carries the trace and span of the task's
  request when it has one (``context``).
- **A span event per finding of a task**, named like the finding, on the span current in that
  task, when that span still records. A block is put on the span while the loop is still
  blocked (seen from the watchdog's thread), with the time blocked so far: the request's span
  typically ends as soon as the block does, before the finding could be reported.

OpenTelemetry is imported only here, and this module only with ``LOOPWATCH_OTEL=1``. A missing
package is one line on standard error; an export that fails is said once and retried at the next
tick (the collector may come back); anything else that fails turns this exporter off, said once.
Nothing of this runs on the loop's thread: the log records and span events on the reporter's,
the metrics on a thread of loopwatch's own (invisible, see ``_threads``).
"""

from __future__ import annotations

import _thread
import contextlib
import importlib.metadata
import logging
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .. import _context, _metrics, _threads
from .._config import otel_export_interval, report
from .._events import Event, SlowCallback
from .._stats import HistogramSnapshot
from .._threads import Worker, discard
from ._text import render

if TYPE_CHECKING:
    from .._runtime import Runtime

NEEDS = "pip install 'loopwatch[otel]'"
TICK_S = 1.0  # loopwatch's metrics thread: a provider decided, histograms recorded
RECORD_BUDGET = 0.005  # seconds of recording into a program's histograms per tick, at most
SCOPE = "loopwatch"
# An export (metrics, or one log record from the reporter's thread), retries included, at most.
EXPORT_TIMEOUT_S = 2.0
_SPANS_KEPT = 4096  # spans named by findings not yet reported, at most (weakly held)


_quiet = threading.local()  # .on: loopwatch's own export is running on this thread


class _Quiet(logging.Filter):
    """Drops the OTLP exporters' own log lines (retries, failures) while loopwatch's export runs:
    they would go to the program's standard error; loopwatch says a failure once instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet, "on", False)


_QUIET = _Quiet()


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if (
            name.startswith("opentelemetry.")
            and isinstance(logger, logging.Logger)
            and _QUIET not in logger.filters
        ):
            logger.addFilter(_QUIET)
    _quiet.on = True
    try:
        yield
    finally:
        _quiet.on = False


class Unavailable(Exception):
    """OpenTelemetry (or its OTLP/HTTP exporter) is not installed."""


def _modules() -> Any:
    try:
        # (deferred: OpenTelemetry is an optional package, imported only with LOOPWATCH_OTEL=1)
        import opentelemetry._logs as logs_api
        import opentelemetry.metrics as metrics_api
        import opentelemetry.trace as trace_api
        from opentelemetry.exporter.otlp.proto.http import _log_exporter, metric_exporter
        from opentelemetry.sdk import _logs as sdk_logs
        from opentelemetry.sdk import resources
        from opentelemetry.sdk._logs import export as sdk_logs_export
        from opentelemetry.sdk.metrics import export as sdk_export
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    except ImportError as exc:
        raise Unavailable(f"{exc.name or exc} is missing: {NEEDS}") from None

    return types.SimpleNamespace(
        logs_api=logs_api,
        metrics_api=metrics_api,
        trace_api=trace_api,
        log_exporter=_log_exporter,
        metric_exporter=metric_exporter,
        sdk_logs=sdk_logs,
        sdk_logs_export=sdk_logs_export,
        sdk_export=sdk_export,
        resources=resources,
        Scope=InstrumentationScope,
    )


def _resource(m: Any) -> Any:
    """The resource of loopwatch's own pipelines: the SDK's defaults and what
    ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` say. Not ``Resource.create()``: its
    detectors run in a pool of threads, which a program could count."""
    r = m.resources
    base = r.Resource(
        {
            r.TELEMETRY_SDK_LANGUAGE: "python",
            r.TELEMETRY_SDK_NAME: "opentelemetry",
            r.SERVICE_NAME: "unknown_service",
        }
    )
    return base.merge(r.OTELResourceDetector().detect())


def otel_name(prometheus_name: str) -> str:
    """The instrument's name: the Prometheus one without the ``_total`` a conversion adds back."""
    return prometheus_name.removesuffix("_total")


def _unit(prometheus_name: str) -> str:
    return "s" if "_seconds" in prometheus_name else ""


def _flat(event: Event) -> dict[str, Any]:
    """A finding's fields as OpenTelemetry attributes (scalars or lists of one type; no None)."""
    out: dict[str, Any] = {}
    for key, value in event.as_dict().items():
        if key in ("event", "time"):
            continue
        if key == "context" and isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, (str, bool, int, float)):
                    out[f"context.{k}"] = v
                elif v is not None:
                    out[f"context.{k}"] = str(v)
            continue
        if value is None:
            continue
        if isinstance(value, list):
            if all(isinstance(v, str) for v in value):
                out[key] = value
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                out[key] = [float(v) for v in value]
            else:
                out[key] = [str(v) for v in value]
        elif isinstance(value, (str, bool, int, float)):
            out[key] = value
        else:
            out[key] = str(value)
    return out


class OTel:
    """The exporter: a callable for the dispatcher (log records, span events), and the thread of
    the metrics."""

    name = "otel"

    def __init__(self, runtime: Runtime) -> None:
        self.m = _modules()
        self.runtime = runtime
        self.interval = otel_export_interval()
        self.start_ns = time.time_ns()
        self.failed_exports: set[str] = set()  # what was said once: "metrics", "logs"
        # Logs: the program's provider's logger, or ours (made at the first finding).
        self._own_logs: Any = None
        self._export_failed = False  # the last export to the collector failed (it may be down)
        self._loggers: dict[int, Any] = {}
        # Spans the findings' contexts named (span_id -> span), weakly; and the blocks already
        # put on their span while they lasted (span_id, location).
        self._spans: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._on_span: set[tuple[str, str | None]] = set()
        # Metrics: ours (an OTLP exporter) or the program's provider's instruments.
        self._own_metrics: Any = None
        self._next_export = time.monotonic() + self.interval
        self._program: _ProgramMeters | None = None
        self._bell = _thread.allocate_lock()
        self._bell.acquire()
        self.worker = Worker("OpenTelemetry metrics", self._run, self._ring)
        _context.span_sink = self._keep_span
        _context.block_sink = self.block_seen
        runtime.loops.workers.append(self.worker)
        self.worker.start()
        # The last values go out before the interpreter's shutdown stops what the exporters
        # need (new futures are refused once threading has shut down, before atexit runs).
        self._flushed = False
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            with contextlib.suppress(RuntimeError):  # already shutting down
                register(self.flush_at_exit)

    def flush_at_exit(self) -> None:
        """Once: the last metrics exported and the held log records sent."""
        if self._flushed:
            return
        self._flushed = True
        with contextlib.suppress(Exception):  # best effort at the end
            self.tick(final=True)
        if self._own_logs is not None:
            with contextlib.suppress(Exception):
                self._own_logs.force_flush()

    # -- spans and log records (the reporter's thread; a block's span: the watchdog's) ----------

    def _keep_span(self, span_id: str, span: Any) -> None:
        if len(self._spans) < _SPANS_KEPT:
            with contextlib.suppress(TypeError):  # a span type that cannot be weakly held
                self._spans[span_id] = span

    def block_seen(self, block: Any, so_far: float, threshold: float, kind: str) -> None:
        """The watchdog's thread, while the loop is blocked and the block is a finding already:
        it goes on its task's span now, while that span is still open (it usually ends as soon
        as the block does). ``duration_s`` is the time blocked so far."""
        try:
            span_id = (block.context or {}).get("span_id")
            span = self._spans.get(span_id) if span_id else None
            if span is None or not span.is_recording():
                return
            self._on_span.add((str(span_id), block.location))
            event = SlowCallback(
                duration_s=round(so_far, 6),
                threshold_s=threshold,
                task=block.task_name,
                coroutine=block.coroutine,
                location=block.location,
                stack=block.stack,
                loop=kind,
                origin=block.origin,
                route=block.route,
                context=block.context,
            )
            attributes = _flat(event)
            attributes["blocking"] = True  # still blocked when put on the span
            span.add_event(event.event, attributes, timestamp=int((time.time() - so_far) * 1e9))
        except Exception as exc:  # noqa: BLE001 - never in the watchdog's way
            _context.block_sink = None
            report(f"loopwatch: OpenTelemetry span events of blocks failed ({exc!r}); stopped")

    def __call__(self, event: Event) -> None:
        attributes = _flat(event)
        self._log(event, attributes)
        self._span_event(event, attributes)

    def _span_event(self, event: Event, attributes: dict[str, Any]) -> None:
        span_id = (event.context or {}).get("span_id")
        if not span_id:
            return
        if isinstance(event, SlowCallback):
            key = (span_id, event.location)
            if key in self._on_span:
                self._on_span.discard(key)  # put on the span while it lasted
                return
        span = self._spans.get(span_id)
        if span is not None and span.is_recording():
            span.add_event(event.event, attributes, timestamp=int(event.time * 1e9))

    def _logger(self) -> Any:
        provider = self.m.logs_api.get_logger_provider()
        if type(provider).__name__ in ("ProxyLoggerProvider", "NoOpLoggerProvider"):
            if self._own_logs is None:
                # Sent as each record is emitted, from the reporter's thread: a batch
                # processor would start a thread of its own, which a program could count.
                own = self.m.sdk_logs.LoggerProvider(
                    resource=_resource(self.m), shutdown_on_exit=False
                )
                exporter = self.m.log_exporter.OTLPLogExporter(timeout=EXPORT_TIMEOUT_S)
                send = exporter.export

                def export(batch: Any) -> Any:
                    result = send(batch)
                    self._export_failed = getattr(result, "name", "SUCCESS") != "SUCCESS"
                    if self._export_failed:
                        self._say_once(
                            "logs",
                            "sending log records by OTLP failed (is the collector at "
                            "OTEL_EXPORTER_OTLP_ENDPOINT up?); trying again with the next",
                        )
                    return result

                exporter.export = export  # (loopwatch's own exporter object)
                own.add_log_record_processor(
                    self.m.sdk_logs_export.SimpleLogRecordProcessor(exporter)
                )
                self._own_logs = own
            provider = self._own_logs
        logger = self._loggers.get(id(provider))
        if logger is None:
            logger = self._loggers[id(provider)] = provider.get_logger(SCOPE)
        return logger

    def _log(self, event: Event, attributes: dict[str, Any]) -> None:
        context = None
        ids = event.context or {}
        if ids.get("trace_id") and ids.get("span_id"):
            trace = self.m.trace_api
            span_context = trace.SpanContext(
                trace_id=int(ids["trace_id"], 16),
                span_id=int(ids["span_id"], 16),
                is_remote=False,
                trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
            )
            context = trace.set_span_in_context(trace.NonRecordingSpan(span_context))
        with _quietly():
            self._emit(event, attributes, context)

    def _emit(self, event: Event, attributes: dict[str, Any], context: Any) -> None:
        self._logger().emit(
            timestamp=int(event.time * 1e9),
            context=context,
            severity_number=self.m.logs_api.SeverityNumber.WARN,
            severity_text="WARNING",
            body=render(event),
            attributes=attributes,
            event_name=event.event,
        )

    # -- metrics (loopwatch's thread) ---------------------------------------------------------

    def _ring(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._bell.release()

    def _run(self, keep_going: Callable[[], bool]) -> None:
        while True:
            _threads.wake_due(time.monotonic() + TICK_S)
            self._bell.acquire(True, TICK_S)
            _threads.woken()
            if not keep_going():
                return
            self.tick()

    def tick(self, *, final: bool = False) -> None:
        """Decide whose provider, and publish: the program's instruments fed, or ours exported
        when due (``final``: now, whatever is due)."""
        provider = self.m.metrics_api.get_meter_provider()
        proxy = type(provider).__name__ == "_ProxyMeterProvider"
        if not proxy:
            if self._program is None:
                self._program = _ProgramMeters(self, provider)
                if self._own_metrics is not None:  # the program's provider takes over
                    self._export(final=True)
                    self._own_metrics = None
            self._program.record()
            return
        now = time.monotonic()
        if final or now >= self._next_export:
            self._next_export = now + self.interval
            self._export(final=final)

    def _export(self, *, final: bool = False) -> None:
        if self._own_metrics is None:
            self._own_metrics = self.m.metric_exporter.OTLPMetricExporter(timeout=EXPORT_TIMEOUT_S)
            self._resource = _resource(self.m)
        data = self.metrics_data(_metrics.snapshot(self.runtime))
        if final and self._export_failed:
            return  # the collector did not answer last time: the program's exit is not held up
        with _quietly():
            result = self._own_metrics.export(data, timeout_millis=EXPORT_TIMEOUT_S * 1000)
        self._export_failed = getattr(result, "name", "SUCCESS") != "SUCCESS"
        if self._export_failed:
            self._say_once(
                "metrics",
                "exporting metrics by OTLP failed (is the collector at OTEL_EXPORTER_OTLP_"
                "ENDPOINT up?); trying again at each interval",
            )

    def _say_once(self, what: str, line: str) -> None:
        if what not in self.failed_exports:
            self.failed_exports.add(what)
            report(f"loopwatch: OpenTelemetry: {line}")

    def metrics_data(self, snap: _metrics.Snapshot) -> Any:
        """The snapshot as OTLP metrics: cumulative sums, a gauge and explicit-bucket
        histograms, with the Prometheus endpoint's values."""
        e = self.m.sdk_export
        now, start = time.time_ns(), self.start_ns
        cumulative = e.AggregationTemporality.CUMULATIVE

        def number(value: float, attributes: dict[str, str] | None = None) -> Any:
            return e.NumberDataPoint(
                attributes=attributes or {},
                start_time_unix_nano=start,
                time_unix_nano=now,
                value=value,
            )

        def counter(name: str, points: list[Any]) -> Any:
            return e.Metric(
                name=otel_name(name),
                description=_metrics.HELP[name],
                unit=_unit(name),
                data=e.Sum(
                    data_points=points, aggregation_temporality=cumulative, is_monotonic=True
                ),
            )

        def histogram(name: str, label: str | None, series: dict[str, HistogramSnapshot]) -> Any:
            points = [
                _histogram_point(e, h, {label: key} if label else {}, start, now)
                for key, h in series.items()
            ]
            return e.Metric(
                name=otel_name(name),
                description=_metrics.HELP[name],
                unit="s",
                data=e.Histogram(data_points=points, aggregation_temporality=cumulative),
            )

        metrics = [counter(name, [number(value)]) for name, value in snap.events.items()]
        metrics += [
            histogram(_metrics.LAG, None, {"": snap.loop_lag}),
            counter(_metrics.LOOP_BUSY, [number(snap.loop_busy_s)]),
            counter(_metrics.TASKS_CREATED, [number(snap.tasks_created)]),
            e.Metric(
                name=_metrics.TASKS_ACTIVE,
                description=_metrics.HELP[_metrics.TASKS_ACTIVE],
                unit="",
                data=e.Gauge(data_points=[number(snap.tasks_active)]),
            ),
            counter(
                _metrics.TASKS_FINISHED,
                [number(n, {"outcome": k}) for k, n in snap.tasks_finished.items()],
            ),
            histogram(_metrics.TASK_DURATION, "coroutine", snap.task_duration),
            histogram(_metrics.TASK_BUSY, "coroutine", snap.task_busy),
            histogram(_metrics.REQUEST_BUSY, "route", snap.request_busy),
        ]
        metrics = [metric for metric in metrics if metric.data.data_points]
        scope = self.m.Scope(SCOPE, _version())
        return e.MetricsData(
            resource_metrics=[
                e.ResourceMetrics(
                    resource=self._resource,
                    scope_metrics=[e.ScopeMetrics(scope=scope, metrics=metrics, schema_url="")],
                    schema_url="",
                )
            ]
        )

    # -- the end ------------------------------------------------------------------------------

    def close(self) -> None:
        """``uninstall()`` or exit: the last values and the records held back go out."""
        if _context.span_sink == self._keep_span:
            _context.span_sink = None
        if _context.block_sink == self.block_seen:
            _context.block_sink = None
        self.worker.stop(timeout=5.0)
        discard(self.worker)
        self.flush_at_exit()
        if self._own_metrics is not None:
            with contextlib.suppress(Exception):
                self._own_metrics.shutdown()
        if self._own_logs is not None:
            with contextlib.suppress(Exception):
                self._own_logs.shutdown()  # flushes what the batch processor holds

    def after_fork_in_child(self) -> None:
        """The parent's thread and pipelines are the parent's: the child makes its own, its
        thread started with the loop's others (at its first watched loop), its counts its own."""
        self._own_metrics = None
        self._own_logs = None
        self._loggers.clear()
        if self._program is not None:  # its instruments stay (the provider is inherited too)
            self._program.done.clear()  # the child's counts start at 0
            self._program.sums.clear()
        self.start_ns = time.time_ns()
        self._next_export = time.monotonic() + self.interval
        self._bell = _thread.allocate_lock()
        self._bell.acquire()


def _histogram_point(
    e: Any, h: HistogramSnapshot, attributes: dict[str, str], start: int, now: int
) -> Any:
    bounds = [b for b, _ in h.buckets[:-1]]
    counts, before = [], 0
    for _, cumulative in h.buckets:
        counts.append(cumulative - before)
        before = cumulative
    return e.HistogramDataPoint(
        attributes=attributes,
        start_time_unix_nano=start,
        time_unix_nano=now,
        count=h.count,
        sum=h.sum,
        bucket_counts=counts,
        explicit_bounds=bounds,
        min=None,  # not kept (neither is it on the Prometheus endpoint)
        max=None,
    )


def _version() -> str:
    try:
        return importlib.metadata.version("loopwatch")
    except importlib.metadata.PackageNotFoundError:  # a tree on sys.path, not installed
        return "0"


Observed = tuple[float, dict[str, str]]  # a value and its attributes


class _ProgramMeters:
    """loopwatch's instruments on the program's MeterProvider."""

    def __init__(self, owner: OTel, provider: Any) -> None:
        self.owner = owner
        meter = provider.get_meter(SCOPE, _version())
        self.sums: dict[tuple[str, str], float] = {}  # series -> sum when last fully recorded
        m = owner.m.metrics_api

        def observe(read: Callable[[_metrics.Snapshot], Iterator[Observed]]) -> Any:
            def callback(_options: Any) -> Iterator[Any]:
                snap = _metrics.snapshot(owner.runtime)
                for value, attributes in read(snap):
                    yield m.Observation(value, attributes)

            return [callback]

        def event_count(name: str) -> Callable[[_metrics.Snapshot], Iterator[Observed]]:
            return lambda s: iter([(s.events.get(name, 0), {})])

        for name in _metrics.COUNTERS:
            meter.create_observable_counter(
                otel_name(name),
                callbacks=observe(event_count(name)),
                unit="",
                description=_metrics.HELP[name],
            )
        meter.create_observable_counter(
            otel_name(_metrics.LOOP_BUSY),
            callbacks=observe(lambda s: iter([(s.loop_busy_s, {})])),
            unit="s",
            description=_metrics.HELP[_metrics.LOOP_BUSY],
        )
        meter.create_observable_counter(
            otel_name(_metrics.TASKS_CREATED),
            callbacks=observe(lambda s: iter([(s.tasks_created, {})])),
            unit="",
            description=_metrics.HELP[_metrics.TASKS_CREATED],
        )
        meter.create_observable_gauge(
            _metrics.TASKS_ACTIVE,
            callbacks=observe(lambda s: iter([(s.tasks_active, {})])),
            unit="",
            description=_metrics.HELP[_metrics.TASKS_ACTIVE],
        )
        meter.create_observable_counter(
            otel_name(_metrics.TASKS_FINISHED),
            callbacks=observe(
                lambda s: iter([(n, {"outcome": k}) for k, n in s.tasks_finished.items()])
            ),
            unit="",
            description=_metrics.HELP[_metrics.TASKS_FINISHED],
        )
        # Histograms: recorded from loopwatch's thread, what was counted since the last tick,
        # in loopwatch's own buckets (OpenTelemetry's advisory bounds).
        self.histograms = {
            name: meter.create_histogram(
                otel_name(name),
                unit="s",
                description=_metrics.HELP[name],
                explicit_bucket_boundaries_advisory=list(_metrics.BOUNDS[name]),
            )
            for name in _metrics.BOUNDS
        }
        self.done: dict[tuple[str, str], list[int]] = {}  # series -> bucket counts recorded

    def record(self) -> None:
        """The observations since the last tick, into the program's histograms, within
        RECORD_BUDGET (the rest at the next tick). Each goes in its own bucket, so counts and
        buckets are exact; each is recorded at its series' mean for the tick when that falls in
        its bucket (the sum is then exact), else at the bucket's middle."""
        snap = _metrics.snapshot(self.owner.runtime)
        deadline = time.monotonic() + RECORD_BUDGET
        for name, label, by_key in (
            (_metrics.LAG, None, {"": snap.loop_lag}),
            (_metrics.TASK_DURATION, "coroutine", snap.task_duration),
            (_metrics.TASK_BUSY, "coroutine", snap.task_busy),
            (_metrics.REQUEST_BUSY, "route", snap.request_busy),
        ):
            instrument = self.histograms[name]
            for key, h in by_key.items():
                attributes = {label: key} if label else {}
                if not self._record(instrument, (name, key), attributes, h, deadline):
                    return

    def _record(
        self,
        instrument: Any,
        series: tuple[str, str],
        attributes: dict[str, str],
        h: HistogramSnapshot,
        deadline: float,
    ) -> bool:
        counts, before = [], 0
        for _, cumulative in h.buckets:
            counts.append(cumulative - before)
            before = cumulative
        done = self.done.get(series)
        if done is None or len(done) != len(counts):
            done = self.done[series] = [0] * len(counts)
            self.done[series] = done
        todo = [max(n - d, 0) for n, d in zip(counts, done, strict=True)]
        total = sum(todo)
        if not total:
            return True
        last = self.sums.get(series, 0.0)
        mean = max(h.sum - last, 0.0) / total
        bounds = [b for b, _ in h.buckets]
        for i, n in enumerate(todo):
            low = bounds[i - 1] if i else 0.0
            high = bounds[i]
            if low < mean <= high or (i == 0 and mean <= high):
                value = mean
            elif high == float("inf"):
                value = low * 1.5
            else:
                value = (low + high) / 2
            for _ in range(n):
                instrument.record(value, attributes)
                done[i] += 1
                if time.monotonic() > deadline:
                    return False
        self.sums[series] = h.sum
        return True
