"""The PostgreSQL database ``DATABASE_URL`` names: created when it is missing.

:func:`create_missing_database` runs before a process opens its store. When the database
does not exist it connects to the maintenance database (``postgres``, else ``template1``)
with the same user and creates it, if the user may (a superuser, or the ``CREATEDB``
right); otherwise it says which ``createdb`` command makes it. Any other failure is left
to the store to report, as before.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.engine import URL, make_url

log = logging.getLogger(__name__)

MAINTENANCE_DATABASES = ("postgres", "template1")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "")


def _dsn(url: URL, database: str | None = None) -> str:
    """An asyncpg DSN (postgresql://...) for ``url``, on ``database`` if given."""
    url = url.set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


def createdb_command(url: URL) -> str:
    """The command that creates ``url``'s database, owned by its user, as an admin would."""
    owner = f" --owner={url.username}" if url.username else ""
    if (url.host or "") in LOCAL_HOSTS and not url.query.get("host"):
        return f"sudo -u postgres createdb{owner} {url.database}"
    port = f" -p {url.port}" if url.port else ""
    return f"createdb -h {url.host}{port} -U <an admin user>{owner} {url.database}"


async def create_missing_database(database_url: str, connect_timeout: float) -> str | None:
    """Make sure the PostgreSQL database of ``database_url`` exists. None when it does (or
    was just created, or the failure is another one: the store reports that); else why
    it cannot be created, naming the command that would."""
    url = make_url(database_url)
    if not url.drivername.startswith("postgres") or not url.database:
        return None
    import asyncpg  # only for PostgreSQL: SQLite deployments never load it (14 MB)

    try:
        connection = await asyncpg.connect(_dsn(url), timeout=connect_timeout)
    except asyncpg.InvalidCatalogNameError:
        pass  # the database does not exist: create it below
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return None  # not this module's business: Store.open reports it
    else:
        await connection.close()
        return None
    admin = await _maintenance_connection(url, connect_timeout)
    if admin is None:
        return (
            f'database "{url.database}" does not exist, and no maintenance database '
            f"({' or '.join(MAINTENANCE_DATABASES)}) could be reached to create it; create "
            f"it with: {createdb_command(url)}"
        )
    quoted = '"' + url.database.replace('"', '""') + '"'
    try:
        await admin.execute(f"CREATE DATABASE {quoted}")
    except asyncpg.DuplicateDatabaseError:
        return None  # another process created it meanwhile
    except asyncpg.InsufficientPrivilegeError:
        who = f'user "{url.username}"' if url.username else "this user"
        return (
            f'database "{url.database}" does not exist, and {who} may not create it; '
            f"create it with: {createdb_command(url)}"
        )
    except asyncpg.PostgresError as exc:
        return f'database "{url.database}" does not exist, and creating it failed: {exc}'
    finally:
        await admin.close()
    log.warning('created the PostgreSQL database "%s" (DATABASE_URL)', url.database)
    return None


async def _maintenance_connection(url: URL, connect_timeout: float) -> Any:
    """A connection to ``postgres`` (else ``template1``) as the URL's user, or None."""
    import asyncpg

    for database in MAINTENANCE_DATABASES:
        try:
            return await asyncpg.connect(_dsn(url, database), timeout=connect_timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError):
            continue
    return None
