"""SQLite for durable service state: one database file per service, WAL journal,
synchronous=FULL, every write a transaction, every call off the event loop.

A kill -9 at any moment leaves the file at the last committed transaction: SQLite's atomic
commit is the whole crash-safety argument, so stores must put each logical change in one
`write()` call.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class Database:
    """A single connection used from one dedicated thread, so SQLite never sees concurrent
    use of a connection and the event loop never blocks on disk."""

    def __init__(self, path: Path, schema: Sequence[str]) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{path.stem}")
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._run_sync(self._open, list(schema))

    def _open(self, schema: list[str]) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in schema:
                conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._conn = conn

    def _run_sync(self, fn: Callable[[T], Any], arg: T) -> Any:
        return self._executor.submit(fn, arg).result()

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return fn(self._connection())

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"database {self.path} is closed")
        return self._conn

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` inside one transaction (all or nothing) on the database thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._write, fn)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._read, fn)

    def write_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """For start-up code that runs before the event loop matters."""
        result: T = self._run_sync(self._write, fn)
        return result

    def read_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        result: T = self._run_sync(self._read, fn)
        return result

    def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._executor.submit(_close).result()
        self._executor.shutdown(wait=True)
