"""SQLite for durable service state: one database file per service, WAL journal,
synchronous=FULL, every write a transaction, every call off the event loop.

A kill -9 at any moment leaves the file at the last committed transaction: SQLite's atomic
commit is the whole crash-safety argument, so stores must put each logical change in one
`write()` call.

Every store uses it the same way: `Database(path, schema)` does no I/O; `await db.open()`
creates or opens the file and applies the schema; `await db.write(fn)` / `await db.read(fn)`
run `fn(conn)` on the database's own thread; `await db.close()` lets everything queued finish,
then closes the file. The stores over it follow the same shape (`Store(path)`, `await
store.open()`, `await store.close()`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, TypeVar

T = TypeVar("T")


class Database:
    """A single connection used from one dedicated thread, so SQLite never sees concurrent
    use of a connection and the event loop never blocks on disk. Calls run in the order they
    were made: a read sees every write submitted before it."""

    def __init__(self, path: Path, schema: Sequence[str]) -> None:
        self.path = path
        self._schema = list(schema)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Open (creating if needed) the file and apply the schema in one transaction."""
        if self._executor is not None:
            raise RuntimeError(f"database {self.path} is open already")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{self.path.stem}")
        self._executor = executor
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._open)
        except BaseException:
            # Also when cancelled while the thread is still opening: it closes after that.
            self._executor = None
            executor.submit(self._close_connection)
            executor.shutdown(wait=False)
            raise

    async def close(self) -> None:
        """Wait for every call already made, then close the file. Idempotent."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_connection)
        except BaseException:
            executor.shutdown(wait=False)  # the thread ends once its queue is done
            raise
        executor.shutdown(wait=True)  # idle by now: only joins the thread

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` inside one transaction (all or nothing) on the database thread."""
        return await self._run(self._write, fn)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` on the database thread, outside any explicit transaction."""
        return await self._run(self._read, fn)

    async def _run(
        self,
        call: Callable[[Callable[[sqlite3.Connection], T]], T],
        fn: Callable[[sqlite3.Connection], T],
    ) -> T:
        executor = self._executor
        if executor is None:
            raise RuntimeError(f"database {self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(executor, call, fn)

    # -- on the database thread --

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in self._schema:
                    conn.execute(statement)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        self._conn = conn

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

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class SqliteStore:
    """The shape of every store over one `Database`: `Store(path)` does no I/O, `await
    open()` opens the file (and runs the store's own `_opened`, e.g. loading or migrating;
    if that fails the file is closed again), `await close()` lets every queued call finish,
    then closes it (idempotent). A subclass names its `schema`."""

    schema: ClassVar[Sequence[str]]

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = Database(path, self.schema)

    async def open(self) -> None:
        await self.db.open()
        try:
            await self._opened()
        except BaseException:
            await self.db.close()
            raise

    async def _opened(self) -> None:
        """What the store does once the file is open (nothing, unless it says)."""

    async def close(self) -> None:
        await self.db.close()
