"""Prometheus: exact values over real HTTP, promtool, a real Prometheus server, gunicorn workers."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Recorder, line_of, run_on
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import loopwatch
from loopwatch import _api, _runtime, _timing
from loopwatch._metrics import HistogramSnapshot
from loopwatch._stats import LATENCY_BUCKETS
from loopwatch.exporters import prometheus

Factory = Callable[[], asyncio.AbstractEventLoop]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
HERE = Path(__file__).resolve()
PYTHON = sys.executable
BIN = Path(PYTHON).parent


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def endpoint_url() -> str:
    runtime = _runtime.current()
    assert runtime is not None and runtime.metrics is not None
    endpoint = runtime.metrics.endpoint
    assert endpoint is not None
    host, port = endpoint.address
    return f"http://{host}:{port}/metrics"


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=5.0)
    assert response.status_code == 200
    return parse(response.text)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def need(binary: str) -> str:
    """The path of a binary from the Debian package ``prometheus``; CI must have it."""
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(
                f"{binary} is missing on CI: .ci/run installs the Debian package prometheus"
            )
        pytest.skip(f"{binary} not installed (apt-get install prometheus); CI installs it")
    return path


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# -- a known scenario -----------------------------------------------------------------------


async def fail() -> None:
    raise ValueError("boom")


async def scenario() -> None:
    ok = asyncio.create_task(asyncio.sleep(0))
    bad = asyncio.create_task(fail())
    slow = asyncio.create_task(asyncio.sleep(10))
    await asyncio.sleep(0)
    slow.cancel()
    await asyncio.gather(ok, bad, slow, return_exceptions=True)
    time.sleep(0.15)  # BLOCK:scenario
    asyncio.create_task(asyncio.sleep(10))  # leaked: still pending when the run ends
    asyncio.sleep(0)  # type: ignore[unused-coroutine]  # never awaited
    await asyncio.sleep(0.02)


TASK_COUNTERS = (
    ("loopwatch_tasks_created_total", {}),
    ("loopwatch_tasks_finished_total", {"outcome": "ok"}),
    ("loopwatch_tasks_finished_total", {"outcome": "error"}),
    ("loopwatch_tasks_finished_total", {"outcome": "cancelled"}),
)


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited")
def test_exact_values_after_a_known_scenario(factory: Factory) -> None:
    """Scraped over HTTP: one block, one leak, one never-awaited coroutine; 7 tasks (main, ok,
    failed, cancelled, leaked, and the two the Runner makes to shut down) ended 4 ok, 1 error,
    2 cancelled (the leaked one by asyncio's final cancellation)."""
    gc.collect()  # earlier tests' garbage is not this scenario's (orphans, never awaited)
    events = Recorder()
    _api.activate(log="off").dispatcher.add_sink(events)
    loopwatch.install(metrics_port=0)  # the endpoint of an already active loopwatch
    url = endpoint_url()
    before = scrape(url)
    run_on(factory, scenario())
    gc.collect()
    events.wait_for(3)
    after = scrape(url)
    assert {name: value(after, name) for name in prometheus.COUNTERS} == {
        "loopwatch_slow_callbacks_total": 1.0,
        "loopwatch_loop_stalls_total": 0.0,
        "loopwatch_tasks_leaked_total": 1.0,
        "loopwatch_tasks_orphaned_total": 0.0,
        "loopwatch_task_exceptions_unretrieved_total": 0.0,
        "loopwatch_coroutines_never_awaited_total": 1.0,
        "loopwatch_cancels_swallowed_total": 0.0,
        "loopwatch_cancels_ignored_total": 0.0,
        "loopwatch_deadlocks_total": 0.0,
        "loopwatch_tasks_stuck_total": 0.0,
    }
    # Task counts are process totals (they never go back): compare with the scrape before.
    assert [
        (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)
        for name, labels in TASK_COUNTERS
    ] == [7.0, 4.0, 1.0, 2.0]
    assert value(after, "loopwatch_tasks_active") == 0.0
    assert sorted(e.event for e in events) == [
        "loopwatch.coroutine_never_awaited",
        "loopwatch.slow_callback",
        "loopwatch.task_leaked",
    ]
    lag_count = value(after, "loopwatch_loop_lag_seconds_count")
    assert lag_count is not None and lag_count > 0
    # The block delayed the heartbeat by about 0.15 s: one observation above the 0.1 s edge.
    assert value(after, "loopwatch_loop_lag_seconds_bucket", le="0.1") == lag_count - 1


@pytest.mark.serial  # measures busy time to about 50 ms
def test_loop_busy_seconds_is_the_time_the_loop_ran_callbacks(factory: Factory, kind: str) -> None:
    """loopwatch_loop_busy_seconds_total, scraped over HTTP: a run that blocks 0.3 s in a sleep,
    spins 0.3 s on the processor and waits 0.6 s for timers. On asyncio's loops the pulse sees
    both blocks (0.6 s); on uvloop it is the loop thread's CPU time, so the sleep is not in it."""
    _api.activate(log="off", slow_callback_ms=10_000)
    loopwatch.install(metrics_port=0)
    url = endpoint_url()
    before = value(scrape(url), "loopwatch_loop_busy_seconds_total") or 0.0

    async def main() -> None:
        for _ in range(3):
            time.sleep(0.1)  # busy, asleep
            await asyncio.sleep(0.2)  # waiting for a timer
        start = time.perf_counter()
        while time.perf_counter() - start < 0.3:  # busy, on the processor
            pass

    run_on(factory, main())
    busy = (value(scrape(url), "loopwatch_loop_busy_seconds_total") or 0.0) - before
    if kind == "asyncio":
        assert 0.6 <= busy < 0.6 + 0.1, busy
    else:
        # CPU time: the spin is in it (less whatever the machine's other load preempted), the
        # sleeps are not.
        assert 0.15 <= busy < 0.3 + 0.1, busy


def test_lag_buckets_are_made_for_loop_latencies(events: Recorder) -> None:
    """From 1 ms to 10 s, 0.1 s (the default threshold) kept as an edge, then +Inf."""
    loopwatch.install(metrics_port=0)
    samples = scrape(endpoint_url())
    edges = [
        dict(labels)["le"]
        for (name, labels) in samples
        if name == "loopwatch_loop_lag_seconds_bucket"
    ]
    assert edges == [
        "0.001",
        "0.0025",
        "0.005",
        "0.01",
        "0.025",
        "0.05",
        "0.1",
        "0.25",
        "0.5",
        "1.0",
        "2.5",
        "5.0",
        "10.0",
        "+Inf",
    ]
    assert len(edges) == len(LATENCY_BUCKETS) + 1


def test_metrics_are_in_the_default_registry_while_loopwatch_is_active() -> None:
    assert REGISTRY.get_sample_value("loopwatch_slow_callbacks_total") is None
    loopwatch.install()
    assert REGISTRY.get_sample_value("loopwatch_slow_callbacks_total") == 0.0
    assert REGISTRY.get_sample_value("loopwatch_tasks_active") == 0.0
    loopwatch.uninstall()
    assert REGISTRY.get_sample_value("loopwatch_slow_callbacks_total") is None


def test_prometheus_client_is_not_imported_for_a_program_that_does_not() -> None:
    """Importing it costs 30-50 ms: loopwatch waits for the program to import it, then
    registers (with no endpoint asked for)."""
    code = (
        "import sys, loopwatch\n"
        "loopwatch.install(log='off')\n"
        "print('prometheus_client' in sys.modules)\n"
        "import prometheus_client\n"
        "print(prometheus_client.REGISTRY.get_sample_value('loopwatch_tasks_active'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPWATCH", "PROMETHEUS"))}
    out = subprocess.run(
        [PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout == "False\n0.0\n"


def test_a_registry_of_your_own(factory: Factory, events: Recorder) -> None:
    """``MetricsCollector(registry)`` publishes the same values in the program's registry."""
    registry = CollectorRegistry()
    loopwatch.MetricsCollector(registry)
    run_on(factory, scenario_block())
    events.wait_for(1)
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "loopwatch_slow_callbacks_total") == 1.0
    assert {name for name, _ in samples} >= {
        "loopwatch_loop_lag_seconds_bucket",
        "loopwatch_tasks_created_total",
        "loopwatch_tasks_active",
        "loopwatch_tasks_finished_total",
    }


async def scenario_block() -> None:
    await asyncio.sleep(0.01)
    time.sleep(0.15)  # BLOCK:own-registry
    await asyncio.sleep(0.02)


def fake_histograms(
    names: list[str],
) -> tuple[dict[str, HistogramSnapshot], dict[str, HistogramSnapshot]]:
    """What the timing table gives with its label cap applied: one observation per label."""

    def one(seconds: float) -> HistogramSnapshot:
        edges = (*LATENCY_BUCKETS, float("inf"))
        return HistogramSnapshot([(b, int(seconds <= b)) for b in edges], seconds, 1)

    return {n: one(0.2) for n in names}, {n: one(0.003) for n in names}


def test_coroutine_labels_are_exported_as_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """50 names and ``other``: exactly those 51 label values, for both histograms."""
    names = [f"handler_{i:02d}" for i in range(50)] + ["other"]
    monkeypatch.setattr(_timing.Table, "histograms", lambda self: fake_histograms(names))
    loopwatch.install(metrics_port=0, log="off")
    samples = scrape(endpoint_url())
    for metric, total in (
        ("loopwatch_task_duration_seconds", 0.2),
        ("loopwatch_task_busy_seconds", 0.003),
    ):
        labels = {dict(lab)["coroutine"] for (n, lab) in samples if n == metric + "_count"}
        assert labels == set(names)
        assert value(samples, metric + "_count", coroutine="other") == 1.0
        assert value(samples, metric + "_sum", coroutine="other") == total
        assert value(samples, metric + "_bucket", coroutine="other", le="0.1") == float(
            total <= 0.1
        )


# -- the endpoint ----------------------------------------------------------------------------


@pytest.mark.serial
def test_endpoint_under_concurrent_scrapes(factory: Factory, events: Recorder) -> None:
    """64 scrapes at once, 16 connections: every one answers the same exact values (one block,
    the scenario's: the client's TLS context, tens of milliseconds of certificate loading, is
    made before the loop runs, so that the scrapes' own loop has nothing slow in it)."""
    loopwatch.install(metrics_port=0)
    run_on(factory, scenario_block())
    events.wait_for(1)
    url = endpoint_url()
    assert url.startswith("http://127.0.0.1:"), "loopback unless LOOPWATCH_METRICS_ADDR says"
    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=16), timeout=10.0)

    async def scrapes() -> list[httpx.Response]:
        async with client:
            return await asyncio.gather(*(client.get(url) for _ in range(64)))

    started = time.perf_counter()
    responses = run_on(factory, scrapes())
    elapsed = time.perf_counter() - started
    assert [r.status_code for r in responses] == [200] * 64
    assert {r.headers["content-type"] for r in responses} == {
        "text/plain; version=0.0.4; charset=utf-8"
    }
    slow = {value(parse(r.text), "loopwatch_slow_callbacks_total") for r in responses}
    assert slow == {1.0}
    assert elapsed < 10.0
    print(f"64 concurrent scrapes in {elapsed * 1000:.0f} ms")  # shown with -s


def test_endpoint_answers_only_at_metrics(events: Recorder) -> None:
    loopwatch.install(metrics_port=0)
    url = endpoint_url()
    base = url.removesuffix("/metrics")
    assert httpx.get(base + "/other").status_code == 404
    assert httpx.post(url).status_code == 405
    head = httpx.head(url)
    assert (head.status_code, head.content) == (200, b"")
    gz = httpx.get(url, headers={"Accept-Encoding": "gzip"})
    assert gz.headers["content-encoding"] == "gzip"
    only = parse(httpx.get(url, params={"name[]": "loopwatch_tasks_active"}).text)
    assert list(only) == [("loopwatch_tasks_active", ())]


def test_a_port_in_use_is_one_line(capfd: pytest.CaptureFixture[str]) -> None:
    """The program goes on without the endpoint; one line names the variable and the value."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        loopwatch.install(metrics_port=port)
        runtime = _runtime.current()
        assert runtime is not None and runtime.metrics is not None
        assert runtime.metrics.endpoint is None
    assert REGISTRY.get_sample_value("loopwatch_slow_callbacks_total") == 0.0
    assert capfd.readouterr().err == (
        f"loopwatch: LOOPWATCH_METRICS_PORT={port} is not accepted: the port is in use on "
        "127.0.0.1; expected a free port; the metrics endpoint is off\n"
    )


def test_uninstall_stops_the_endpoint_and_frees_the_port(events: Recorder) -> None:
    loopwatch.install(metrics_port=0)
    url = endpoint_url()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    started = time.monotonic()
    loopwatch.uninstall()
    assert time.monotonic() - started < 0.5, "close wakes the serving thread, it does not poll"
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


# -- serving from the program's own server ---------------------------------------------------


def test_aiohttp_handler(factory: Factory, events: Recorder) -> None:
    """``/metrics`` in an aiohttp app on the watched loop, scraped over HTTP."""
    from aiohttp import web

    async def main() -> tuple[int, str]:
        app = web.Application()
        app.router.add_get("/metrics", loopwatch.aiohttp_metrics_handler())
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        time.sleep(0.15)  # BLOCK:aiohttp
        try:
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{port}/metrics")
        finally:
            await runner.cleanup()
        return response.status_code, response.text

    loopwatch.install()
    status, text = run_on(factory, main())
    assert status == 200
    assert value(parse(text), "loopwatch_slow_callbacks_total") == 1.0


def test_asgi_app_under_uvicorn(factory: Factory, events: Recorder) -> None:
    """``metrics_app()`` served by uvicorn on the watched loop, scraped over HTTP."""
    import uvicorn

    async def main() -> tuple[int, str, str]:
        port = free_port()
        config = uvicorn.Config(
            loopwatch.metrics_app(), host="127.0.0.1", port=port, log_level="error"
        )
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        time.sleep(0.15)  # BLOCK:asgi
        try:
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{port}/metrics")
        finally:
            server.should_exit = True
            await serving
        return response.status_code, response.headers["content-type"], response.text

    loopwatch.install()
    status, content_type, text = run_on(factory, main())
    assert (status, content_type) == (200, "text/plain; version=0.0.4; charset=utf-8")
    assert value(parse(text), "loopwatch_slow_callbacks_total") == 1.0


# -- promtool and a real Prometheus -----------------------------------------------------------


def test_promtool_check_metrics_passes(
    events: Recorder, monkeypatch: pytest.MonkeyPatch, factory: Factory
) -> None:
    """The whole exposition, with labelled histograms, passes ``promtool check metrics``."""
    promtool = need("promtool")
    monkeypatch.setattr(
        _timing.Table, "histograms", lambda self: fake_histograms(["handle", "other"])
    )
    loopwatch.install(metrics_port=0)
    run_on(factory, scenario_block())
    events.wait_for(1)
    text = httpx.get(endpoint_url()).text
    assert "loopwatch_task_busy_seconds_bucket" in text
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")


SERVICE = """
import asyncio, json, os, sys, time
from aiohttp import web
import loopwatch
from loopwatch import _runtime

async def block(request):
    time.sleep(0.15)  # BLOCK:service
    return web.Response(text=str(os.getpid()))

async def main():
    app = web.Application()
    app.router.add_get("/block", block)
    app.router.add_get("/metrics", loopwatch.aiohttp_metrics_handler())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    endpoint = _runtime.current().metrics.endpoint.address
    print(json.dumps({"app": runner.addresses[0][1], "endpoint": endpoint[1]}), flush=True)
    await asyncio.Event().wait()

if sys.argv[1] == "uvloop":
    import uvloop
    factory = uvloop.new_event_loop
else:
    factory = asyncio.new_event_loop
with asyncio.Runner(loop_factory=factory) as runner:
    runner.run(main())
"""


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; each is stopped at the end, whatever happened."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in started:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def watched_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPWATCH", "PROMETHEUS"))}
    env.update(LOOPWATCH="1", **extra)
    return env


def slow_callbacks_in(path: Path) -> int:
    if not path.exists():
        return 0
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return sum(1 for e in lines if e["event"] == "loopwatch.slow_callback")


def test_a_real_prometheus_scrapes_watched_services(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    """Prometheus (1 s scrapes, loopback) reads both ways of serving, on both loops: the
    ``LOOPWATCH_METRICS_PORT`` endpoint and the aiohttp handler; its query API returns the
    services' exact counts of slow callbacks."""
    prometheus_bin = need("prometheus")
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    ports: dict[str, dict[str, int]] = {}
    logs: dict[str, Path] = {}
    for kind in ("asyncio", "uvloop"):
        logs[kind] = tmp_path / f"{kind}.jsonl"
        env = watched_env(
            LOOPWATCH_METRICS_PORT="0",
            LOOPWATCH_LOG="json",
            LOOPWATCH_LOG_FILE=str(logs[kind]),
            LOOPWATCH_LOG_FOLD_MS="0",
        )
        process = subprocess.Popen(
            [PYTHON, str(script), kind], env=env, stdout=subprocess.PIPE, text=True
        )
        processes.append(process)
        assert process.stdout is not None
        ports[kind] = json.loads(process.stdout.readline())
    for port in ports.values():
        for _ in range(3):
            response = httpx.get(f"http://127.0.0.1:{port['app']}/block", timeout=10)
            assert response.status_code == 200
    for kind in ports:
        wait_until(lambda k=kind: slow_callbacks_in(logs[k]) >= 3, 5, f"{kind} events")
    expected = {kind: slow_callbacks_in(logs[kind]) for kind in ports}

    web_port = free_port()
    targets = {
        (job, kind): f"127.0.0.1:{ports[kind][key]}"
        for job, key in (("endpoint", "endpoint"), ("aiohttp", "app"))
        for kind in ports
    }
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [
                    {"targets": [targets[job, kind]], "labels": {"loop": kind}} for kind in ports
                ],
            }
            for job in ("endpoint", "aiohttp")
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    server = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
        text=True,
    )
    processes.append(server)
    api = f"http://127.0.0.1:{web_port}/api/v1/query"

    def query() -> dict[tuple[str, str], float] | None:
        try:
            response = httpx.get(api, params={"query": "loopwatch_slow_callbacks_total"})
        except httpx.TransportError:
            return None
        if response.status_code != 200:
            return None
        found = {
            (r["metric"]["job"], r["metric"]["loop"]): float(r["value"][1])
            for r in response.json()["data"]["result"]
        }
        return found if len(found) == 4 else None

    found = wait_until(query, 30, "Prometheus to scrape all four targets")
    assert found == {
        (job, kind): float(expected[kind]) for job in ("endpoint", "aiohttp") for kind in ports
    }
    assert all(v >= 3 for v in found.values())


# -- several processes ------------------------------------------------------------------------

FORKS = """
import asyncio, json, os, sys, threading, time
import prometheus_client
import loopwatch
from loopwatch import _runtime
from loopwatch.exporters import prometheus

def block(n):
    async def main():
        for _ in range(n):
            await asyncio.sleep(0.01)
            time.sleep(0.12)
        await asyncio.sleep(0.02)
    factory = getattr(loopwatch, sys.argv[1])
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    time.sleep(0.2)

def mine():
    return prometheus.snapshot().events["loopwatch_slow_callbacks_total"]

loopwatch.install(metrics_port=0, log="off")
url = "http://%s:%d/metrics" % _runtime.current().metrics.endpoint.address
block(1)
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    from loopwatch import _threads
    threads = sorted(w.name for w in _threads._all if w.running)
    threads += [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    block(2)
    os.write(write, json.dumps({"child": mine(), "threads_after_fork": threads}).encode())
    loopwatch.uninstall()
    os._exit(0)
os.waitpid(pid, 0)
child = json.loads(os.read(read, 4096))
import httpx
parent_scrape = httpx.get(url).text
merged = prometheus_client.generate_latest(prometheus.exposition_registry()).decode()
def total(text):
    for line in text.splitlines():
        if line.startswith("loopwatch_slow_callbacks_total "):
            return float(line.split()[1])
print(json.dumps({**child, "parent": mine(), "parent_scrape": total(parent_scrape),
                  "merged": total(merged)}))
loopwatch.uninstall()
"""


@pytest.mark.parametrize("multiprocess", [False, True], ids=["plain", "multiprocess"])
def test_a_forked_child_counts_only_its_own(kind: str, multiprocess: bool, tmp_path: Path) -> None:
    """Parent 1 block, child 2: each counts its own; the child starts none of the parent's
    threads but its own file writer (multiprocess), and the parent's endpoint still answers.
    In multiprocess mode one scrape sees both: 3."""
    script = tmp_path / "forks.py"
    script.write_text(FORKS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPWATCH", "PROMETHEUS"))}
    if multiprocess:
        (tmp_path / "mp").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "mp")
    factory = {"asyncio": "new_event_loop", "uvloop": "new_uvloop_event_loop"}[kind]
    out = subprocess.run(
        [PYTHON, str(script), factory], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result == {
        "child": 2,
        "parent": 1,
        "parent_scrape": 3.0 if multiprocess else 1.0,  # the endpoint serves the merged files
        "merged": 3.0 if multiprocess else 1.0,
        "threads_after_fork": ["metrics file writer"] if multiprocess else [],
    }


APP = """
import os, time
import loopwatch
from uvicorn_worker import UvicornWorker


class AsyncioWorker(UvicornWorker):
    CONFIG_KWARGS = {"loop": "asyncio", "http": "h11", "lifespan": "off"}


class UvloopWorker(UvicornWorker):
    CONFIG_KWARGS = {"loop": "uvloop", "http": "h11", "lifespan": "off"}


metrics = loopwatch.metrics_app()


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/metrics":
        await metrics(scope, receive, send)
        return
    time.sleep(0.15)  # BLOCK:gunicorn
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
"""

GUNICORN_CONF = """
from prometheus_client import multiprocess

control_socket_disable = True  # gunicorn 27+ would make ~/.gunicorn/gunicorn.ctl


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)
"""


def test_gunicorn_workers_are_seen_in_one_scrape(
    kind: str, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    """gunicorn, 2 uvicorn workers, multiprocess mode: blocks hit both workers, and a scrape
    through either shows the sum of both workers' exact counts."""
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "gunicorn.conf.py").write_text(GUNICORN_CONF)
    (tmp_path / "mp").mkdir()
    events_file = tmp_path / "events.jsonl"
    port = free_port()
    worker = {"asyncio": "app.AsyncioWorker", "uvloop": "app.UvloopWorker"}[kind]
    env = watched_env(
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "mp"),
        LOOPWATCH_LOG="json",
        LOOPWATCH_LOG_FILE=str(events_file),
        LOOPWATCH_LOG_FOLD_MS="0",
    )
    server = subprocess.Popen(
        [
            *(str(BIN / "gunicorn"), "-w", "2", "-k", worker, "-b", f"127.0.0.1:{port}"),
            *("-c", "gunicorn.conf.py", "--chdir", str(tmp_path), "app:app"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "gunicorn.log").open("w"),
        text=True,
    )
    processes.append(server)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(base + "/metrics", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, 20, "gunicorn to serve")
    pids: list[str] = []

    def block() -> None:
        pids.append(httpx.get(base + "/block", timeout=10).text)

    # Two requests 50 ms apart: while one worker is blocked, the other accepts the second.
    for _ in range(10):
        first = threading.Thread(target=block)
        first.start()
        time.sleep(0.05)
        block()
        first.join()
        if len(set(pids)) == 2:
            break
    assert len(set(pids)) == 2, (pids, (tmp_path / "gunicorn.log").read_text())

    marker = f"app.py:{line_of(tmp_path / 'app.py', 'BLOCK:gunicorn')} in app"

    def blocks_logged() -> list[dict[str, Any]] | None:
        lines = [json.loads(line) for line in events_file.read_text().splitlines()]
        slow = [e for e in lines if e["event"] == "loopwatch.slow_callback"]
        ours = [e for e in slow if e["location"].endswith(marker)]
        return slow if len(ours) == len(pids) else None

    slow = wait_until(blocks_logged, 10, "every block in the event log")
    assert {str(e["pid"]) for e in slow if e["location"].endswith(marker)} == set(pids)

    def scraped() -> float | None:
        total = value(scrape(base + "/metrics"), "loopwatch_slow_callbacks_total")
        return total if total == len(slow) else None

    # Each worker writes its file once a second; the answering worker writes its own first.
    assert wait_until(scraped, 10, "the merged count") == float(len(slow))


def test_promtool_accepts_the_multiprocess_exposition(tmp_path: Path) -> None:
    """Merged from the files of a process, the exposition still passes promtool."""
    promtool = need("promtool")
    code = textwrap.dedent(
        """
        import asyncio, sys, time
        import prometheus_client, loopwatch
        from loopwatch.exporters import prometheus
        async def main():
            await asyncio.sleep(0.01)
            time.sleep(0.12)
            await asyncio.sleep(0.02)
        loopwatch.install(log="off")
        with asyncio.Runner(loop_factory=loopwatch.new_event_loop) as runner:
            runner.run(main())
        time.sleep(0.2)
        sys.stdout.write(prometheus_client.generate_latest(prometheus.exposition_registry()).decode())
        loopwatch.uninstall()
        """
    )
    (tmp_path / "mp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPWATCH", "PROMETHEUS"))}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "mp")
    out = subprocess.run(
        [PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert value(parse(out.stdout), "loopwatch_slow_callbacks_total") == 1.0
    assert value(parse(out.stdout), "loopwatch_loop_lag_seconds_bucket", le="+Inf") is not None
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=out.stdout, capture_output=True, text=True
    )
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")


# -- the dashboard and the alerting rules in docs/ ---------------------------------------------

DOCS = HERE.parent.parent / "docs"
ALERT_TESTS = """
rule_files: [ALERTS]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'loopwatch_loop_stalls_total{job="api",instance="a"}'
        values: '0 0 1 1 1 1'
      - series: 'loopwatch_loop_stalls_total{job="api",instance="b"}'
        values: '0x6'
      - series: 'loopwatch_loop_lag_seconds_bucket{job="api",instance="a",le="0.1"}'
        values: '0+90x30'
      - series: 'loopwatch_loop_lag_seconds_bucket{job="api",instance="a",le="0.25"}'
        values: '0+100x30'
      - series: 'loopwatch_loop_lag_seconds_bucket{job="api",instance="a",le="+Inf"}'
        values: '0+100x30'
      - series: 'loopwatch_loop_lag_seconds_bucket{job="api",instance="b",le="0.1"}'
        values: '0+100x30'
      - series: 'loopwatch_loop_lag_seconds_bucket{job="api",instance="b",le="+Inf"}'
        values: '0+100x30'
      - series: 'loopwatch_loop_busy_seconds_total{job="api",instance="a"}'
        values: '0+57x30'
      - series: 'loopwatch_loop_busy_seconds_total{job="api",instance="b"}'
        values: '0+30x30'
      - series: 'loopwatch_tasks_leaked_total{job="api",instance="a"}'
        values: '0 0 2 2 2'
      - series: 'loopwatch_tasks_orphaned_total{job="api",instance="a"}'
        values: '0 0 0 1 1'
      - series: 'loopwatch_tasks_leaked_total{job="api",instance="b"}'
        values: '0x5'
      - series: 'loopwatch_tasks_orphaned_total{job="api",instance="b"}'
        values: '0x5'
    alert_rule_test:
      - eval_time: 3m
        alertname: LoopwatchEventLoopStalled
        exp_alerts:
          - exp_labels: {severity: critical, job: api, instance: a}
            exp_annotations:
              summary: Event loop of a stalled past LOOPWATCH_STALL_MS
              description: >-
                1 loop stall(s) in the last 5 minutes on a (api). The loopwatch.loop_stalled
                events in its log name the line (location) and the stack taken while it was
                blocked.
      - eval_time: 20m
        alertname: LoopwatchHighLoopLag
        exp_alerts:
          - exp_labels: {severity: warning, job: api, instance: a}
            exp_annotations:
              summary: Event loop of a runs late
              description: >-
                99th percentile loop lag is 235ms on a (api): callbacks that were due waited
                that long.
      - eval_time: 20m
        alertname: LoopwatchLoopSaturated
        exp_alerts:
          - exp_labels: {severity: warning, job: api, instance: a}
            exp_annotations:
              summary: Event loop of a is saturated
              description: >-
                The event loop of a (api) ran callbacks 95% of the time for 10 minutes. Spread
                the load over more processes, or find what holds it in
                loopwatch_task_busy_seconds by coroutine.
      - eval_time: 4m
        alertname: LoopwatchTasksLeaked
        exp_alerts:
          - exp_labels: {severity: warning, job: api, instance: a}
            exp_annotations:
              summary: Tasks leaked or lost on a
              description: >-
                3 task(s) leaked or orphaned in the last 15 minutes on a (api). Their creation
                sites (created_at) are in the loopwatch.task_leaked and loopwatch.task_orphaned
                events.
"""


def test_alert_rules_are_valid_and_fire_when_they_should(tmp_path: Path) -> None:
    """``promtool check rules``, then ``promtool test rules``: a stall, lag past 0.1 s, a loop
    busy 95% of the time and leaked tasks fire for instance ``a``; the healthy instance ``b``
    (busy half the time) fires nothing."""
    promtool = need("promtool")
    rules = DOCS / "alerts.yml"
    checked = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(ALERT_TESTS.replace("ALERTS", str(rules)))
    tested = subprocess.run(
        [promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=30
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_dashboard_queries_are_promql_over_published_metrics(tmp_path: Path) -> None:
    """Every panel query parses as PromQL (through promtool, Grafana's variables filled in) and
    names only metrics loopwatch publishes."""
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 12
    published = {prometheus._base(name) for name in prometheus.HELP}
    named = {
        name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        for expr in exprs
        for name in re.findall(r"loopwatch_[a-z_]+", expr)
    }
    assert {prometheus._base(n) for n in named} <= published
    promtool = need("promtool")
    filled = [
        e.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$job", ".*")
        for e in exprs
    ]
    filled = [e.replace("$instance", ".*") for e in filled]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(filled)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
