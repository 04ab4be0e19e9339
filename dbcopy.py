"""Copy message records, idempotency keys and batch answers from one database into
``DATABASE_URL``: ``python admin.py db copy --from sqlite:///var/mailroom.db``.

The target is opened as every process opens it (a missing PostgreSQL database is
created, the schema set up). Rows are copied table by table, a few hundred at a time, and
a row whose key the target already has is left alone there, so running the copy again
copies nothing twice and never overwrites what the target has since. The source is only
read (an older schema too: columns it lacks take their defaults).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Table, inspect, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from config import Settings, redact_url
from store import (
    Store,
    StoreUnavailable,
    batch_answers_table,
    engine_url,
    idempotency_table,
    messages_table,
    templates_table,
)

TABLES = (messages_table, idempotency_table, batch_answers_table, templates_table)
CHUNK = 500  # rows per statement


@dataclass(frozen=True)
class Copied:
    table: str
    found: int  # rows in the source
    copied: int  # of those, new in the target


async def copy_records(source_url: str, settings: Settings) -> list[Copied]:
    """Copy what ``source_url`` holds into ``settings.database_url``; what was done, per
    table. Raises :class:`StoreUnavailable` when either database cannot be used."""
    shown = redact_url(source_url)
    try:
        url = engine_url(source_url)
    except ValueError as exc:
        raise StoreUnavailable(f"{shown}: {exc}") from None
    source_file = make_url(url).database if url.startswith("sqlite") else None
    if source_file is not None and not await asyncio.to_thread(Path(source_file).is_file):
        raise StoreUnavailable(f"{shown}: no such database file: {source_file}")
    if url == engine_url(settings.database_url.get()):
        raise StoreUnavailable(f"{shown} is DATABASE_URL itself: nothing to copy")
    source = create_async_engine(url)
    target = await Store.open(settings)
    try:
        async with source.connect() as reading:
            columns = await reading.run_sync(_columns)
            return [await _copy_table(reading, target, t, columns.get(t.name)) for t in TABLES]
    except (SQLAlchemyError, OSError) as exc:
        raise StoreUnavailable(f"copying from {shown}: {type(exc).__name__}: {exc}") from exc
    except StoreUnavailable as exc:  # a write to the target (Store.write says what failed)
        raise StoreUnavailable(f"copying from {shown}: {exc}") from exc
    finally:
        await source.dispose()
        await target.close()


def _columns(conn: Connection) -> dict[str, list[str]]:
    """The source's tables and their columns."""
    found = inspect(conn)
    return {name: [c["name"] for c in found.get_columns(name)] for name in found.get_table_names()}


async def _copy_table(
    reading: AsyncConnection, target: Store, table: Table, present: list[str] | None
) -> Copied:
    if present is None:
        return Copied(table.name, 0, 0)  # an older schema without this table
    columns = [table.c[name] for name in present if name in table.c]
    found = copied = 0
    result = await reading.stream(select(*columns))
    async for rows in result.mappings().partitions(CHUNK):
        values = [{k: _aware(v) for k, v in row.items()} for row in rows]
        found += len(values)
        copied += await _insert_new(target, table, values)
    return Copied(table.name, found, copied)


async def _insert_new(target: Store, table: Table, values: Sequence[dict[str, Any]]) -> int:
    """Insert the rows whose keys ``table`` does not have yet; how many were new. New
    message records get their lookup rows (the lists by recipient, tag or metadata)."""
    insert = postgresql_insert if target.dialect == "postgresql" else sqlite_insert
    keys = [c.name for c in table.primary_key.columns]
    statement = insert(table).on_conflict_do_nothing(index_elements=keys)

    def work(conn: Connection) -> set[Any]:
        inserted = conn.execute(statement.returning(*table.primary_key.columns), values)
        return {row[0] for row in inserted.all()}

    new = await target.write(work)
    if table is messages_table and new:
        await target.add_lookups([v for v in values if v["id"] in new])
    return len(new)


def _aware(value: Any) -> Any:
    """SQLite hands back naive times (stored in UTC): say so, for PostgreSQL's timestamptz."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def describe(copied: Sequence[Copied]) -> list[str]:
    """One line per table, for the operator."""
    return [
        f"{c.table}: {c.copied} copied"
        + (f", {c.found - c.copied} already there" if c.found > c.copied else "")
        for c in copied
    ]
