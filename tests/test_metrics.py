"""Observability: /metrics on the server and on a worker, /api/stats, worker health,
JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from config import JsonFormatter, Secret, Settings
from tests.conftest import running_app, running_worker, wait_ready
from tests.support import ROOT, SmtpServer, TcpProxy, free_port
from tests.test_status_api import wait_status

TOKEN = "metrics-token-0123456789"
BODY = {"to": "a@example.com", "subject": "metrics", "text": "t"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, of a text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_server_metrics_count_and_need_the_token(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(api_tokens=(Secret(TOKEN),), allow_loopback=False)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        assert (await client.get("/metrics")).status_code == 401
        before = samples(await (await client.get("/metrics", headers=auth)).get_data(as_text=True))
        assert (await client.post("/api/messages", json=BODY, headers=auth)).status_code == 202
        bad = {**BODY, "to": "not an address"}
        assert (await client.post("/api/messages", json=bad, headers=auth)).status_code == 400
        assert (await client.post("/api/messages", json=BODY)).status_code == 401
        response = await client.get("/metrics", headers=auth)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        after = samples(await response.get_data(as_text=True))

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("mailroom_messages_accepted_total") == 1
    assert delta("mailroom_messages_published_total", queue="send") == 1
    assert delta("mailroom_messages_refused_total", reason="invalid") == 1
    assert delta("mailroom_messages_refused_total", reason="unauthorized") == 1
    assert delta("mailroom_accept_seconds_count") == 1
    send_queue = (("kind", "send"), ("queue", f"{settings.queue_prefix}.send"))
    assert after[("mailroom_queue_messages", send_queue)] >= 0


async def test_accept_wait_metrics_say_where_an_accepted_request_waited(
    make_settings: Callable[..., Settings],
) -> None:
    """mailroom_accept_wait_seconds: one confirm wait and one record wait per accepted
    request (a batch request: one each for all its items), none for a refused one; the
    two waits lie within the request's own accept time."""
    settings = make_settings(api_tokens=(Secret(TOKEN),), allow_loopback=False)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    async def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return samples(await (await client.get("/metrics", headers=auth)).get_data(as_text=True))

    def wait(values: dict[Any, float], step: str, part: str) -> float:
        return values.get((f"mailroom_accept_wait_seconds_{part}", (("step", step),)), 0.0)

    async with running_app(settings) as (app, client):
        await wait_ready(app)
        before = await scrape(client)
        assert (await client.post("/api/messages", json=BODY, headers=auth)).status_code == 202
        one = await scrape(client)
        accept_time = (
            one[("mailroom_accept_seconds_sum", ())] - before[("mailroom_accept_seconds_sum", ())]
        )
        waited = sum(wait(one, s, "sum") - wait(before, s, "sum") for s in ("confirm", "record"))
        assert 0 < waited <= accept_time
        legacy = await client.get("/?sendmail=b@example.com", headers=auth)
        assert legacy.status_code == 200
        bad = {**BODY, "to": "not an address"}
        assert (await client.post("/api/messages", json=bad, headers=auth)).status_code == 400
        items = [BODY, bad, {**BODY, "to": "c@example.com"}]
        batch = await client.post("/api/messages/batch", json=items, headers=auth)
        assert batch.status_code == 200, await batch.get_data(as_text=True)
        after = await scrape(client)

    for step in ("confirm", "record"):
        assert wait(after, step, "count") - wait(before, step, "count") == 3
    assert (
        after[("mailroom_messages_accepted_total", ())]
        - before[("mailroom_messages_accepted_total", ())]
        == 4
    )


async def test_metrics_public_needs_no_token(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(api_tokens=(Secret(TOKEN),), metrics_public=True)
    async with running_app(settings) as (_, client):
        remote = {"scope_base": {"client": ("192.0.2.7", 40000)}}  # not loopback
        assert (await client.get("/metrics", **remote)).status_code == 200
        assert (await client.get("/api/stats", **remote)).status_code == 401


async def test_stats_counts_queues_and_records(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(**smtp.settings_overrides(None, login=False))
    async with running_app(settings) as (app, client):
        await wait_ready(app)
        ids = []
        for _ in range(2):
            response = await client.post("/api/messages", json=BODY)
            ids.append((await response.get_json())["id"])
        stats = await (await client.get("/api/stats")).get_json()
        assert stats["queues"][f"{settings.queue_prefix}.send"] == 2
        assert stats["queues"][f"{settings.queue_prefix}.dead"] == 0
        assert stats["messages"]["queued"] == 2
        assert stats["messages"]["sent"] == 0
        async with running_worker(settings):
            for message_id in ids:
                await wait_status(client, message_id, "sent")
        stats = await (await client.get("/api/stats")).get_json()
        assert stats["messages"]["sent"] == 2
        assert stats["messages"]["queued"] == 0


async def test_worker_metrics_and_health(
    make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    """The worker's own port: /metrics counts what it sent (behind the token), /healthz
    turns 503 while it cannot consume and 200 again once it can."""
    proxy = await TcpProxy("127.0.0.1", 5672).start()
    port = free_port()
    worker_settings = make_settings(
        amqp_url=Secret(f"amqp://guest:guest@127.0.0.1:{proxy.port}/"),
        worker_metrics_port=port,
        api_tokens=(Secret(TOKEN),),
        allow_loopback=False,
        **smtp.settings_overrides(None, login=False),
    )
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with (
            running_app(make_settings()) as (app, client),
            running_worker(worker_settings),
            httpx.AsyncClient(trust_env=False, timeout=10) as http,
        ):
            await wait_ready(app)
            assert (await http.get(f"{base}/healthz")).status_code == 200
            assert (await http.get(f"{base}/metrics")).status_code == 401
            before = samples((await http.get(f"{base}/metrics", headers=auth)).text)
            response = await client.post("/api/messages", json=BODY)
            await wait_status(client, (await response.get_json())["id"], "sent")
            after = samples((await http.get(f"{base}/metrics", headers=auth)).text)
            for name in ("mailroom_messages_sent_total", "mailroom_accept_to_sent_seconds_count"):
                assert after[(name, ())] - before.get((name, ()), 0.0) == 1
            assert after[("mailroom_smtp_transaction_seconds_count", ())] >= 1
            assert after[("mailroom_smtp_connections_open", ())] == 1
            assert after[("mailroom_messages_in_flight", ())] == 0

            proxy.accepting = False
            proxy.cut()
            health: list[int] = []

            async def probe() -> bool:
                health.append((await http.get(f"{base}/healthz")).status_code)
                return health[-1] == 503

            await wait_until_async(probe)
            proxy.accepting = True

            async def healthy() -> bool:
                return (await http.get(f"{base}/healthz")).status_code == 200

            await wait_until_async(healthy, 30)
    finally:
        await proxy.close()


async def wait_until_async(check: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)


def test_json_log_lines_carry_the_message_id() -> None:
    record = logging.LogRecord(
        "worker", logging.INFO, __file__, 1, "message %s: sent (attempt %d)", ("ab12", 1), None
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message_id"] == "ab12"
    assert entry["message"] == "message ab12: sent (attempt 1)"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "worker"
    plain = logging.LogRecord("server", logging.INFO, __file__, 1, "serving", (), None)
    assert "message_id" not in json.loads(JsonFormatter().format(plain))


LOGGING_SCRIPT = r"""
import atexit, logging, sys, threading, time
import config

class Recorder:
    # Forwards to the real stderr; notes which thread wrote, and each write.
    def __init__(self, real):
        self.real, self.writers, self.writes = real, set(), []
    def write(self, text):
        self.writers.add(threading.current_thread().name)
        self.writes.append(text)
        return self.real.write(text)
    def flush(self):
        self.real.flush()

recorder = Recorder(sys.stderr)
sys.stderr = recorder
settings = config.Settings.from_env({"LOG_FORMAT": sys.argv[1]}, env_file=None)
config.configure_logging(settings)
config.configure_logging(settings)  # a second call changes nothing
log = logging.getLogger("worker")
for n in range(300):
    log.info("message %s: sent (attempt %d)", f"id{n}", 1)
log.info("message %s: long %s", "idlong", "x" * 5000)
deadline = time.monotonic() + 10
while not recorder.writers and time.monotonic() < deadline:
    time.sleep(0.01)  # the writer thread writes while the process runs, not only at exit
print("written while running:", bool(recorder.writers))
log.info("message %s: before the print", "idflush")
config.flush_logging()
print("printed after the flush", file=recorder.real, flush=True)  # not a log line
try:
    1 / 0
except ZeroDivisionError:
    log.exception("message %s: failed", "idz")
for n in range(50):
    log.info("message %s: at exit", f"exit{n}")  # left for logging's shutdown to write


def report():
    logging.shutdown()  # atexit would run it after this; run it first, then look
    print(sorted(recorder.writers))
    print(max(len(w.encode()) for w in recorder.writes if "idlong" not in w))
    long = [len(w) for w in recorder.writes if "idlong" in w]
    print(len(long), long[0])


atexit.register(report)
"""


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_log_lines_are_written_by_their_own_thread_in_order_and_whole(
    log_format: str, tmp_path: Path
) -> None:
    """configure_logging: a thread of its own writes the lines (never the event loop's),
    while the process runs, before what is printed after flush_logging(), and what is
    left at exit; in order, whole, at most PIPE_BUF bytes a write but for a longer line
    alone; tracebacks included, message ids kept."""
    script = tmp_path / "log_lines.py"
    script.write_text(LOGGING_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), log_format],
        cwd=tmp_path,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    running, writers, longest, long_line = done.stdout.strip().splitlines()
    assert running == "written while running: True"
    assert writers == "['log-lines']"
    assert 0 < int(longest) <= 4096
    count, size = long_line.split()
    assert count == "1"
    assert 5000 < int(size) < 5200
    lines = done.stderr.splitlines()
    flushed = lines.index("printed after the flush")
    assert "idflush" in lines[flushed - 1]
    ids = [f"id{n}" for n in range(300)] + ["idlong", "idflush", "idz"]
    ids += [f"exit{n}" for n in range(50)]
    if log_format == "json":
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        assert [e["message_id"] for e in entries] == ids
        assert "ZeroDivisionError" in entries[-51]["exc_info"]
    else:
        said = [line.split(" worker: message ", 1)[1] for line in lines if " worker: " in line]
        assert [line.split(":")[0] for line in said] == ids
        assert said[0] == "id0: sent (attempt 1)"
        assert "ERROR worker: message idz: failed" in done.stderr
        assert "ZeroDivisionError" in done.stderr
