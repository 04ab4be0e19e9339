"""Mailroom as its database grows (issue 17): lists and accepts at 0, 1M and 3M records.

    .venv/bin/python bench/scale.py                                       # the full run
    .venv/bin/python bench/scale.py --sizes 0,100000 --systems mailroom   # a quick look

It shares bench.py's parts (processes, the smtp-sink, the load generator, the report's
machine description) and its rules: loopback only, everything it starts is stopped on any
exit, temporary files removed unless ``--keep``.

Per system (``mailroom``: SQLite, ``mailroom-pg``: PostgreSQL) one server and one worker
run for the whole run, with ``MESSAGE_RETENTION_DAYS=0`` (nothing is deleted). The
database grows to each size of ``--sizes`` in turn with ``admin.py records seed``
(records spread over the last ``--days`` days, as the service writes them; the seeding
is timed), and at each size:

* **lists**, ``--list-concurrency`` (8) keep-alive clients, each sending
  ``--list-requests`` of every kind, the kinds in turn (after two uncounted rounds):
  ``GET /api/messages/<id>`` of stored ids picked at random, ``?limit=50`` (the plain
  newest-first list), ``?status=failed&limit=50`` and ``?status=sent&limit=50``: p50, p99;
* **accepts**, keep-alive bursts of ``GET /?sendmail=`` (``-n`` at ``-c``), alternately
  alone and with ``--list-loops`` clients listing ``status=sent`` and ``status=failed``
  (limit 50) back to back for as long as the burst runs, ``--repeat`` times each: the
  median accept p99 of each kind.

The report gives each list's p99 against the plain list's at the same size (issue 17:
within 2x at 1M records and more), the accept p99 with lists against without (within 1.5x
at 1M), and every figure against the empty database. Results go to
``bench/results/<UTC time>-<commit>-scale/`` (``results.json``, ``results.md``) and the
report to ``bench/scale-results.md`` (``--latest``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg

from bench import (
    PG_SERVER,
    BenchError,
    KeepAliveConnection,
    Mailroom,
    Options,
    Sink,
    _terminate,
    add_run_options,
    finish_results,
    fmt,
    git,
    machine_description,
    measure,
    percentile,
    preflight,
    ratio,
    setup_logging,
    stop_and_clean_up,
    warm_up,
    work_dirs_and_source,
)

log = logging.getLogger("bench.scale")

LISTS = (
    "by id",
    "limit=50",
    "status=failed",
    "status=sent",
    "recipient",
    "tag",
    "metadata",
    "status=sent, page n",
)
SEED_TAGS = ("receipt", "newsletter", "password-reset", "welcome")  # seeding.TAGS
OTHER_LISTS = tuple(n for n in LISTS if n != "limit=50")  # against the plain list
LOOP_TARGETS = ("/api/messages?status=sent&limit=50", "/api/messages?status=failed&limit=50")
LIST_TARGET = 2.0  # issue 17: any list's p99 within 2x the plain list's, at 1M and more
ACCEPT_TARGET = 1.5  # accept p99 with lists in a loop within 1.5x of without, at 1M
TARGET_FROM = 1_000_000
LIST_WARMUP = 2  # rounds of every kind per list client before its measured ones


async def list_load(
    port: int,
    targets: Mapping[str, Sequence[str]],
    concurrency: int,
    per_client: int,
    within: float,
) -> dict[str, dict[str, Any]]:
    """``concurrency`` keep-alive clients, each sending ``per_client`` requests of every
    kind of ``targets``, the kinds in turn (so whatever else the machine does meanwhile
    falls on every kind alike), after LIST_WARMUP rounds that are not counted (the first
    reads after seeding find cold caches). Per kind: the latencies of the 200 answers."""
    kinds = list(targets)
    latencies: dict[str, list[float]] = {k: [] for k in kinds}
    failures: dict[str, dict[str, int]] = {k: {} for k in kinds}

    async def client(c: int) -> None:
        conn = KeepAliveConnection(port)
        try:
            for i in range((LIST_WARMUP + per_client) * len(kinds)):
                kind = kinds[(i + c) % len(kinds)]
                found = targets[kind]
                target = found[(i * concurrency + c) % len(found)]
                t0 = time.perf_counter()
                try:
                    status, _ = await conn.request("GET", target, within)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    status = 0
                    failures[kind][type(exc).__name__] = (
                        failures[kind].get(type(exc).__name__, 0) + 1
                    )
                if i < LIST_WARMUP * len(kinds):
                    continue
                if status == 200:
                    latencies[kind].append(time.perf_counter() - t0)
                elif status:
                    failures[kind][str(status)] = failures[kind].get(str(status), 0) + 1
        finally:
            await conn.close()

    started = time.monotonic()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    seconds = round(time.monotonic() - started, 2)
    return {
        kind: {
            "requests": concurrency * per_client,
            "ok": len(latencies[kind]),
            "failures": failures[kind],
            "seconds_all_kinds": seconds,
            "p50_ms": percentile(latencies[kind], 50) * 1000,
            "p99_ms": percentile(latencies[kind], 99) * 1000,
        }
        for kind in kinds
    }


async def deep_page(port: int, sample: Sample, within: float) -> str | None:
    """A cursor into the middle of the sent records: the page after the newest sent
    record accepted up to ``sample`` (None when there is none)."""
    until = datetime.fromisoformat(sample.created_at) + timedelta(milliseconds=1)
    conn = KeepAliveConnection(port)
    try:
        target = f"/api/messages?status=sent&limit=1&until={quote(until.isoformat())}"
        status, body = await conn.request("GET", target, within)
    finally:
        await conn.close()
    if status != 200:
        raise BenchError(f"GET {target} answered {status}: {body[:200]!r}")
    cursor = json.loads(body).get("next_cursor")
    return str(cursor) if cursor else None


async def list_loops(port: int, loops: int, within: float, done: list[int]) -> None:
    """``loops`` clients listing LOOP_TARGETS back to back until cancelled; ``done``
    counts the lists answered."""

    async def loop(k: int) -> None:
        conn = KeepAliveConnection(port)
        try:
            n = k
            while True:
                with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
                    status, _ = await conn.request(
                        "GET", LOOP_TARGETS[n % len(LOOP_TARGETS)], within
                    )
                    done[0] += status == 200
                n += 1
        finally:
            await conn.close()

    await asyncio.gather(*(loop(k) for k in range(loops)))


class Database:
    """The system's database, seen from the bench: seeding, size, stored ids."""

    def __init__(self, system: Mailroom, opts: Options) -> None:
        self.system = system
        self.opts = opts
        self.sqlite = None if system.database else system.run_dir / "mailroom.db"

    async def seed(self, count: int, days: float) -> dict[str, Any]:
        """``admin.py records seed`` with the system's settings; its timing."""
        argv = [
            str(self.opts.mailroom_python),
            str(self.opts.mailroom_src / "admin.py"),
            "records",
            "seed",
            "--count",
            str(count),
            "--days",
            f"{days:g}",
        ]
        started = time.monotonic()
        done = await asyncio.to_thread(
            subprocess.run,
            argv,
            env=self.system.env,
            cwd=self.system.run_dir,
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        took = time.monotonic() - started
        if done.returncode != 0:
            raise BenchError(f"admin.py records seed failed: {done.stderr.strip()[-800:]}")
        log.info("%s: %s", self.system.name, done.stdout.strip())
        return {"count": count, "seconds": round(took, 1), "per_s": round(count / took)}

    async def size_mb(self) -> float:
        if self.sqlite is not None:
            files = [Path(f"{self.sqlite}{s}") for s in ("", "-wal")]
            return sum(f.stat().st_size for f in files if f.exists()) / 1e6
        conn = await asyncpg.connect(f"{PG_SERVER}/{self.system.database}", timeout=10)
        try:
            return float(await conn.fetchval("SELECT pg_database_size(current_database())")) / 1e6
        finally:
            await conn.close()

    async def sample(self, n: int) -> list[Sample]:
        """About ``n`` stored records from all over the table."""
        if self.sqlite is not None:
            path = self.sqlite

            def pick() -> list[Sample]:
                conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                try:
                    top = conn.execute("SELECT max(rowid) FROM mailroom_messages").fetchone()[0]
                    rowids = [random.randint(1, top or 1) for _ in range(n)]
                    return [
                        Sample.of(*row)
                        for r in rowids
                        for row in conn.execute(
                            "SELECT id, results, created_at, meta FROM mailroom_messages "
                            "WHERE rowid = ?",
                            (r,),
                        )
                    ]
                finally:
                    conn.close()

            return await asyncio.to_thread(pick)
        conn = await asyncpg.connect(f"{PG_SERVER}/{self.system.database}", timeout=10)
        try:
            total = await conn.fetchval("SELECT count(*) FROM mailroom_messages")
            percent = min(100.0, max(0.01, 100.0 * 4 * n / max(total, 1)))
            rows = await conn.fetch(
                "SELECT id, results::text, created_at, meta::text FROM mailroom_messages "  # noqa: S608
                f"TABLESAMPLE SYSTEM ({percent:.4f})"
            )
        finally:
            await conn.close()
        found = [Sample.of(*r) for r in rows]
        random.shuffle(found)
        return found[:n]


@dataclass(frozen=True)
class Sample:
    """A stored record the lists look for: its id, a recipient, when it was accepted
    (RFC 3339), its metadata as a ``?metadata=`` value (or None)."""

    id: str
    recipient: str
    created_at: str
    metadata: str | None

    @classmethod
    def of(cls, record_id: str, results: str, created_at: Any, meta: str | None) -> Sample:
        if isinstance(created_at, str):  # SQLite's text: UTC, without its offset
            created_at = datetime.fromisoformat(created_at).replace(tzinfo=UTC)
        pairs = json.loads(meta) if meta else None
        return cls(
            record_id,
            next(iter(json.loads(results))),
            created_at.isoformat(),
            ":".join(next(iter(pairs.items()))) if pairs else None,
        )


async def at_size(
    system: Mailroom, sink: Sink, db: Database, opts: Options, args: argparse.Namespace, tag: str
) -> dict[str, Any]:
    """Every figure at the database's current size."""
    port = system.ports[0]
    out: dict[str, Any] = {"database_mb": round(await db.size_mb(), 1)}
    samples = await db.sample(400)
    if not samples:
        raise BenchError(f"{system.name}: no stored records to read")
    pages = [c for s in samples[:50] if (c := await deep_page(port, s, opts.request_timeout))]
    if not pages:
        raise BenchError(f"{system.name}: no sent record to page from")
    targets = {
        "by id": [f"/api/messages/{s.id}" for s in samples],
        "limit=50": ["/api/messages?limit=50"],
        "status=failed": ["/api/messages?status=failed&limit=50"],
        "status=sent": ["/api/messages?status=sent&limit=50"],
        "recipient": [f"/api/messages?recipient={quote(s.recipient)}&limit=50" for s in samples],
        "tag": [f"/api/messages?tag={t}&limit=50" for t in SEED_TAGS],
        # None before seeding: the warm-up's mail has no metadata (an empty list, then).
        "metadata": [
            f"/api/messages?metadata={quote(m)}&limit=50"
            for m in [s.metadata for s in samples if s.metadata] or ["customer:c1"]
        ],
        "status=sent, page n": [f"/api/messages?status=sent&limit=50&cursor={c}" for c in pages],
    }
    out["lists"] = await list_load(
        port, targets, args.list_concurrency, args.list_requests, opts.request_timeout
    )
    for name, figures in out["lists"].items():
        log.info(
            "%s %s: p50 %.1f ms, p99 %.1f ms (%d/%d ok)",
            system.name,
            name,
            figures["p50_ms"],
            figures["p99_ms"],
            figures["ok"],
            figures["requests"],
        )
    bursts: dict[str, list[dict[str, Any]]] = {"alone": [], "with lists": []}
    for r in range(opts.repeat):
        for kind in ("alone", "with lists"):
            done = [0]
            loops = (
                asyncio.create_task(list_loops(port, args.list_loops, opts.request_timeout, done))
                if kind == "with lists"
                else None
            )
            try:
                batch = await measure(
                    system, sink, f"{tag}.{kind[0]}{r}", opts.requests, opts, "keepalive"
                )
            finally:
                if loops is not None:
                    loops.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await loops
            seconds = batch.detail["load_seconds"]
            bursts[kind].append(
                {
                    "p50_ms": batch.p50_ms,
                    "p99_ms": batch.p99_ms,
                    "accepted": batch.accepted,
                    "requested": batch.requested,
                    "accepted_per_s": batch.accepted_per_s,
                    "e2e_mails_per_s": batch.e2e_mails_per_s,
                    "lost": batch.lost,
                    "peak_rss_mb": batch.peak_rss_mb,
                    "lists_answered": done[0],
                    "load_seconds": seconds,
                }
            )
    out["accepts"] = {
        kind: {
            "p99_ms": statistics.median(b["p99_ms"] for b in found),
            "p50_ms": statistics.median(b["p50_ms"] for b in found),
            "accepted_per_s": statistics.median(b["accepted_per_s"] for b in found),
            "e2e_mails_per_s": statistics.median(b["e2e_mails_per_s"] for b in found),
            "bursts": found,
        }
        for kind, found in bursts.items()
    }
    return out


async def run_system(
    name: str, sink: Sink, opts: Options, args: argparse.Namespace, run_id: str
) -> dict[str, Any]:
    system = Mailroom(opts, 1, None, name, postgres=name == "mailroom-pg")
    system.configure(sink.port)
    system.env["MESSAGE_RETENTION_DAYS"] = "0"  # the seeded records span --days
    db = Database(system, opts)
    out: dict[str, Any] = {"name": name, "label": system.label, "sizes": {}}
    seeded = 0
    try:
        await system.start()
        await warm_up(system, sink, f"{run_id}.{name}.w", opts)
        for size in args.sizes:
            if size > seeded:
                seeding = await db.seed(size - seeded, args.days)
                seeded = size
            else:
                seeding = None
            log.info("=== %s at %d seeded records", name, size)
            figures = await at_size(system, sink, db, opts, args, f"{run_id}.{name}.{size}")
            figures["seeding"] = seeding
            out["sizes"][str(size)] = figures
    finally:
        await system.stop()
    out["notes"] = system.notes
    out.update(system.extra)
    return out


def check(system: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of issue 17 at each size they apply to."""
    rows = []
    for size, figures in system["sizes"].items():
        if int(size) < TARGET_FROM:
            continue
        plain = figures["lists"]["limit=50"]["p99_ms"]
        others = [n for n in OTHER_LISTS if n in figures["lists"]]
        worst = max(others, key=lambda n: figures["lists"][n]["p99_ms"])
        worst_ratio = figures["lists"][worst]["p99_ms"] / plain if plain else float("nan")
        rows.append(
            {
                "size": int(size),
                "target": f"every list's p99 within {LIST_TARGET:g}x of ?limit=50's",
                "measured": f"{worst}: {worst_ratio:.2f}x",
                "met": worst_ratio <= LIST_TARGET,
            }
        )
        if int(size) == TARGET_FROM:
            alone = figures["accepts"]["alone"]["p99_ms"]
            busy = figures["accepts"]["with lists"]["p99_ms"]
            rows.append(
                {
                    "size": int(size),
                    "target": f"accept p99 with lists in a loop within {ACCEPT_TARGET:g}x",
                    "measured": f"{busy:.0f} / {alone:.0f} ms = {busy / alone:.2f}x",
                    "met": busy / alone <= ACCEPT_TARGET,
                }
            )
    return rows


def render(results: dict[str, Any]) -> str:
    cfg, env = results["config"], results["environment"]
    mailroom = results.get("mailroom", {})
    out = [
        "# Mailroom at scale: lists and accepts as the database grows (issue 17)",
        "",
        f"{results['date']}; Mailroom {mailroom.get('commit', mailroom.get('head', '?'))} "
        f"(last code change: {mailroom.get('last_code_change', '?')}); bench "
        f"{results.get('bench_commit', '?')}; {results.get('duration_s', 0):.0f} s in all.",
        "",
        f"Machine: {env['machine']}; Python {env['python']}; load average "
        f"{env['loadavg_before']} before, {env.get('loadavg_after', '?')} after.",
        "",
        f"Records seeded with `admin.py records seed` over the last {cfg['days']:g} days "
        f"(MESSAGE_RETENTION_DAYS=0). Lists: {cfg['list_concurrency']} keep-alive clients, "
        f"{cfg['list_requests']} requests each, limit 50. Accepts: keep-alive bursts of "
        f"{cfg['requests']} `GET /?sendmail=` at {cfg['concurrency']} at a time, alone and "
        f"with {cfg['list_loops']} clients listing status=sent and status=failed back to "
        f"back; median of {cfg['repeat']} each.",
    ]
    for system in results["systems"]:
        sizes = system["sizes"]
        base = sizes.get("0")
        kinds = [n for n in LISTS if all(n in f["lists"] for f in sizes.values())]
        out += ["", f"## {system['label']}", ""]
        out += [
            f"List p99 at c{cfg['list_concurrency']}, limit 50:",
            "",
            "| list |" + "".join(f" {int(size):,} records |" for size in sizes),
            "|---|" + "---|" * len(sizes),
        ]
        for n in kinds:
            row = f"| {n} |"
            for size, f in sizes.items():
                p99 = f["lists"][n]["p99_ms"]
                vs = f" ({ratio(p99, base['lists'][n]['p99_ms'])})" if base and size != "0" else ""
                row += f" {fmt(p99, '{:.1f}')} ms{vs} |"
            out.append(row)
        row = "| slowest other list / limit=50 |"
        for f in sizes.values():
            others = [f["lists"][n]["p99_ms"] for n in kinds if n in OTHER_LISTS]
            row += f" {ratio(max(others), f['lists']['limit=50']['p99_ms'])} |"
        out += [row, ""]
        out += [
            "| records | database | seeding | accept p99 alone | with lists | with / alone |",
            "|---|---|---|---|---|---|",
        ]
        for size, f in sizes.items():
            seeding = f.get("seeding")
            row = f"| {int(size):,} | {f['database_mb']:,.0f} MB | "
            row += f"{seeding['per_s']:,}/s |" if seeding else "- |"
            alone = f["accepts"]["alone"]["p99_ms"]
            busy = f["accepts"]["with lists"]["p99_ms"]
            for value, key in ((alone, "alone"), (busy, "with lists")):
                vs = (
                    f" ({ratio(value, base['accepts'][key]['p99_ms'])})"
                    if base and size != "0"
                    else ""
                )
                row += f" {value:.0f} ms{vs} |"
            row += f" {ratio(busy, alone)} |"
            out.append(row)
        out += [
            "",
            "In brackets: the ratio to the empty database (0 records) of the same run.",
            "",
            "| records | target | measured | met |",
            "|---|---|---|---|",
        ]
        for target in check(system):
            met = "yes" if target["met"] else "**no**"
            out.append(
                f"| {target['size']:,} | {target['target']} | {target['measured']} | {met} |"
            )
        details = []
        for size, f in sizes.items():
            for kind in ("alone", "with lists"):
                a = f["accepts"][kind]
                details.append(
                    f"| {int(size):,} | {kind} | {a['accepted_per_s']:.0f} | {a['p50_ms']:.0f} | "
                    f"{a['p99_ms']:.0f} | {a['e2e_mails_per_s']:.0f} | "
                    f"{sum(b['lists_answered'] for b in a['bursts'])} |"
                )
        out += [
            "",
            "Accept bursts (medians): accepted/s, p50 and p99 (ms), mails/s end to end "
            "(the worker's writes go on meanwhile), lists answered during the bursts.",
            "",
            "| records | bursts | accepted/s | p50 | p99 | e2e mails/s | lists |",
            "|---|---|---|---|---|---|---|",
            *details,
        ]
        if system.get("notes"):
            out += ["", *(f"* {n}" for n in system["notes"])]
    return "\n".join(out) + "\n"


def write_report(results: dict[str, Any], run_dir: Path, latest: Path | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    report = render(results)
    print(report)
    (run_dir / "results.md").write_text(report)
    if latest is not None:
        where = os.path.relpath(run_dir, latest.parent)
        latest.write_text(
            f"<!-- generated by bench/scale.py: the latest run, stored in {where}/ -->\n"
            f"The latest run; it is stored with its raw data in [{where}/]({where}/).\n\n" + report
        )
    log.info("wrote %s", run_dir / "results.md")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="0,1000000,3000000", help="records (0,1000000,3000000)")
    p.add_argument("--days", type=float, default=60.0, help="seeded records span (60 days)")
    p.add_argument("--systems", default="mailroom,mailroom-pg", help="mailroom, mailroom-pg (both)")
    p.add_argument("--list-concurrency", type=int, default=8, help="list clients (8)")
    p.add_argument(
        "--list-requests", type=int, default=60, help="requests of each kind per list client (60)"
    )
    p.add_argument("--list-loops", type=int, default=2, help="clients listing during a burst (2)")
    p.add_argument("-n", "--requests", type=int, default=1500, help="mails per burst (1500)")
    p.add_argument("-c", "--concurrency", type=int, default=32, help="burst connections (32)")
    p.add_argument("--repeat", type=int, default=2, help="bursts of each kind per size (2)")
    p.add_argument("--warmup", type=int, default=500, help="warm-up mails per system (500)")
    add_run_options(p, "scale-results.md", "results.md")
    args = p.parse_args(argv)
    args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if any(s not in ("mailroom", "mailroom-pg") for s in args.systems):
        p.error("--systems: mailroom and/or mailroom-pg")
    if 0 not in args.sizes:
        p.error("--sizes must include 0: the ratios are to the empty database")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    latest = Path(args.latest) if args.latest else None
    if args.report_only is not None:
        write_report(json.loads(args.report_only.read_text()), args.report_only.parent, latest)
        return 0
    prepared = work_dirs_and_source("scale", args.mailroom_src)
    if prepared is None:
        return 1
    workdir, sink_dir, mailroom_src, mailroom_info = prepared
    opts = Options(
        requests=args.requests,
        concurrency=args.concurrency,
        warmup=args.warmup,
        repeat=args.repeat,
        request_timeout=60.0,
        load_timeout=300.0,
        delivery_timeout=300.0,
        stall_timeout=60.0,
        settle=0.5,
        ref_dir=Path("/nonexistent"),
        ref_venv=Path("/nonexistent"),
        mailroom_python=args.mailroom_python,
        mailroom_src=mailroom_src,
        mailroom_log_level="WARNING",
        workdir=workdir,
        sink_dir=sink_dir,
        modes=("keepalive",),
    )
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "config": {
            "sizes": args.sizes,
            "days": args.days,
            "systems": args.systems,
            "list_concurrency": args.list_concurrency,
            "list_requests": args.list_requests,
            "list_loops": args.list_loops,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "repeat": args.repeat,
            "warmup": args.warmup,
        },
        "environment": {
            **machine_description(),
            "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "disk_free_gb_before": round(shutil.disk_usage(workdir).free / 1e9, 1),
        },
        "mailroom": mailroom_info,
        "systems": [],
    }
    try:
        results["bench_commit"] = git("rev-parse", "--short=10", "HEAD")
    except (subprocess.SubprocessError, OSError):
        results["bench_commit"] = "?"

    async def run(sink_binary: str) -> None:
        sink = Sink(sink_binary, opts.sink_dir)
        await sink.start()
        try:
            run_id = uuid.uuid4().hex[:6]
            for name in args.systems:
                results["systems"].append(await run_system(name, sink, opts, args, run_id))
        finally:
            sink.stop()

    try:
        asyncio.run(run(preflight(opts, [], install=not args.no_install)))
    except BenchError as exc:
        log.error("scale: %s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("scale: interrupted; stopping everything it started")
        return 130
    finally:
        stop_and_clean_up(workdir, sink_dir, args.keep)
    commit = finish_results(results, started, mailroom_info)
    write_report(results, args.out / f"{stamp}-{commit}-scale", latest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
