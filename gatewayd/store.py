"""The durable journal and outbox: SQLite in WAL mode, one writer thread, group commit.

Every operation is a function run on the writer thread. The thread takes all
operations queued while the previous commit was in flight and runs them in
one transaction (a savepoint each, so one failing operation does not abort
the others), so many concurrent requests share one fsync.

Tables: ``readings`` (the accepted readings), ``pending`` (plugin, reading)
pairs still to be processed, ``outbox`` (messages to publish, in order). A
reading is deleted once nothing pending or unpublished refers to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cbor2

from gatewayd.codec import Draft
from gatewayd.plugin_api import Reading

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT NOT NULL, ts REAL NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS pending (
    plugin TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (plugin, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_seq ON pending (seq);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, seq INTEGER NOT NULL, plugin TEXT, result BLOB);
CREATE INDEX IF NOT EXISTS outbox_seq ON outbox (seq);
"""


class StoreError(Exception):
    """The store could not do what was asked; nothing of that operation was kept."""


class StoreFull(StoreError):
    """The backlog limit or the disk is full."""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One message waiting to be published: a reading (plugin None) or a plugin's result."""

    id: int
    reading: Reading
    plugin: str | None
    result: dict[str, Any] | None


_Op = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]
_Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]


class Store:
    """Async front of the writer thread; create with :meth:`open`."""

    def __init__(self, path: Path, *, synchronous: str, max_readings: int, max_group: int) -> None:
        self.path = path
        self._synchronous = synchronous
        self.max_readings = max_readings
        self._max_group = max_group
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.instance = ""
        #: Readings held (written only on the writer thread).
        self.readings_count = 0
        self.outbox_count = 0
        self._outbox_added = 0  # only ever grows; compared across a transaction
        self.commits = 0
        #: Readings appended and committed since open (the event loop's count, for metrics).
        self.appended = 0
        #: Called on the event loop after a commit that added outbox entries (the publisher's wake-up).
        self.on_outbox: Callable[[], None] = lambda: None

    @classmethod
    async def open(
        cls, path: Path, *, synchronous: str = "FULL", max_readings: int = 1_000_000, max_group: int = 512
    ) -> Store:
        store = cls(path, synchronous=synchronous, max_readings=max_readings, max_group=max_group)
        store._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = store._loop.create_future()
        store._thread = threading.Thread(target=store._writer, args=(ready,), name="store", daemon=True)
        store._thread.start()
        await ready
        return store

    async def close(self) -> None:
        """Finish queued operations, checkpoint the WAL and stop the writer thread."""
        if self._thread is None:
            return
        self._ops.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    # -- operations --------------------------------------------------------------

    async def append(
        self, node: str, drafts: Sequence[Draft], plugins: Sequence[Sequence[str]]
    ) -> list[Reading]:
        """Store drafts as readings, queued for publishing and for their plugins; durable on return.

        ``plugins[i]`` names the plugins that must process ``drafts[i]``.
        """

        def op(db: sqlite3.Connection) -> list[Reading]:
            if self.readings_count + len(drafts) > self.max_readings:
                raise StoreFull(f"store holds {self.readings_count} readings (max {self.max_readings})")
            out = []
            for d, names in zip(drafts, plugins, strict=True):
                body = cbor2.dumps({"f": d.fields, "u": d.units})
                cur = db.execute("INSERT INTO readings (node, ts, body) VALUES (?, ?, ?)", (node, d.ts, body))
                seq = cur.lastrowid
                assert seq is not None
                db.execute("INSERT INTO outbox (seq) VALUES (?)", (seq,))
                if names:
                    db.executemany(
                        "INSERT INTO pending (plugin, seq) VALUES (?, ?)", [(p, seq) for p in names]
                    )
                out.append(Reading(self._id(seq), node, d.ts, d.fields, d.units))
            self.readings_count += len(drafts)
            self.outbox_count += len(drafts)
            self._outbox_added += len(drafts)
            return out

        readings = await self._run(op)
        self.appended += len(readings)  # only now: the commit succeeded
        return readings

    async def complete(
        self, plugin: str, reading_ids: Sequence[str], results: dict[str, dict[str, Any]]
    ) -> None:
        """Mark readings processed by ``plugin`` and queue their results, in one transaction."""
        seqs = [self.seq_of(r) for r in reading_ids]

        def op(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM pending WHERE plugin = ? AND seq = ?", [(plugin, s) for s in seqs])
            rows = [(self.seq_of(rid), plugin, cbor2.dumps(data)) for rid, data in results.items()]
            db.executemany("INSERT INTO outbox (seq, plugin, result) VALUES (?, ?, ?)", rows)
            self.outbox_count += len(rows)
            self._outbox_added += len(rows)
            self._collect(db, seqs)

        await self._run(op)

    async def pending(self, plugin: str) -> list[Reading]:
        """Readings still waiting for ``plugin``, oldest first (used at start-up)."""

        def op(db: sqlite3.Connection) -> list[Reading]:
            rows = db.execute(
                "SELECT r.seq, r.node, r.ts, r.body FROM pending p JOIN readings r ON r.seq = p.seq"
                " WHERE p.plugin = ? ORDER BY r.seq",
                (plugin,),
            )
            return [self._reading(*row) for row in rows]

        return await self._run(op)

    async def forget_plugins_except(self, keep: Iterable[str]) -> int:
        """Drop pending work of plugins no longer configured, so their readings can be freed."""
        names = list(keep)

        def op(db: sqlite3.Connection) -> int:
            marks = ",".join("?" * len(names))
            where = f"WHERE plugin NOT IN ({marks})" if names else ""
            seqs = [s for (s,) in db.execute(f"SELECT DISTINCT seq FROM pending {where}", names)]
            db.execute(f"DELETE FROM pending {where}", names)
            self._collect(db, seqs)
            return len(seqs)

        return await self._run(op)

    async def outbox_after(self, after_id: int, limit: int) -> list[OutboxEntry]:
        """Up to ``limit`` outbox entries with id > ``after_id``, in order."""

        def op(db: sqlite3.Connection) -> list[OutboxEntry]:
            rows = db.execute(
                "SELECT o.id, o.plugin, o.result, r.seq, r.node, r.ts, r.body FROM outbox o"
                " JOIN readings r ON r.seq = o.seq WHERE o.id > ? ORDER BY o.id LIMIT ?",
                (after_id, limit),
            )
            return [
                OutboxEntry(
                    oid, self._reading(seq, node, ts, body), plugin, None if res is None else cbor2.loads(res)
                )
                for oid, plugin, res, seq, node, ts, body in rows
            ]

        return await self._run(op)

    async def outbox_delete(self, ids: Sequence[int]) -> None:
        """Forget published entries, and the readings nothing refers to any more."""

        def op(db: sqlite3.Connection) -> None:
            seqs = [
                s
                for (s,) in db.execute(
                    f"SELECT seq FROM outbox WHERE id IN ({','.join('?' * len(ids))})", list(ids)
                )
            ]
            db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])
            self.outbox_count -= len(seqs)
            self._collect(db, seqs)

        await self._run(op)

    async def ping(self) -> None:
        """Round-trip through the writer thread (the watchdog's health check)."""
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def oldest_ts(self) -> float | None:
        """The ``ts`` of the oldest reading still held (first by arrival), or None (the backlog age)."""

        def op(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT ts FROM readings ORDER BY seq LIMIT 1").fetchone()  # rowid order: cheap
            return None if row is None else float(row[0])

        return await self._run(op)

    # -- helpers -------------------------------------------------------------------

    def _id(self, seq: int) -> str:
        return f"{self.instance}-{seq}"

    def seq_of(self, reading_id: str) -> int:
        return int(reading_id.rpartition("-")[2])

    def _reading(self, seq: int, node: str, ts: float, body: bytes) -> Reading:
        doc = cbor2.loads(body)
        return Reading(self._id(seq), node, ts, doc["f"], doc["u"])

    def _collect(self, db: sqlite3.Connection, seqs: Iterable[int]) -> None:
        """Delete those of ``seqs`` that no pending work or outbox entry still needs."""
        cur = db.executemany(
            "DELETE FROM readings WHERE seq = ?1"
            " AND NOT EXISTS (SELECT 1 FROM pending WHERE seq = ?1)"
            " AND NOT EXISTS (SELECT 1 FROM outbox WHERE seq = ?1)",
            [(s,) for s in set(seqs)],
        )
        self.readings_count -= cur.rowcount

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._thread is None or self._loop is None:
            raise StoreError("store is closed")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._ops.put((fn, fut))
        return await fut

    # -- the writer thread -----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.executescript(_SCHEMA)
        row = db.execute("SELECT v FROM meta WHERE k = 'instance'").fetchone()
        if row is None:
            # Reading ids carry this, so a wiped store never repeats an id a consumer already saw.
            db.execute("INSERT INTO meta VALUES ('instance', ?)", (secrets.token_hex(4),))
            row = db.execute("SELECT v FROM meta WHERE k = 'instance'").fetchone()
        self.instance = row[0]
        self.readings_count = db.execute("SELECT count(*) FROM readings").fetchone()[0]
        self.outbox_count = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        return db

    def _writer(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        loop = self._loop
        try:
            db = self._connect()
        except (sqlite3.Error, OSError) as e:
            err = StoreError(f"cannot open store {self.path}: {e}")
            loop.call_soon_threadsafe(_settle, ready, None, err)
            return
        loop.call_soon_threadsafe(_settle, ready, None, None)
        stopping = False
        while not stopping:
            first = self._ops.get()
            batch: list[_Op] = []
            if first is None:
                stopping = True
            else:
                batch.append(first)
            while not stopping and len(batch) < self._max_group:
                try:
                    nxt = self._ops.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                else:
                    batch.append(nxt)
            if batch:
                added_before = self._outbox_added
                outcomes = self._transaction(db, batch)
                then = self.on_outbox if self._outbox_added != added_before else None
                loop.call_soon_threadsafe(_settle_all, outcomes, then)
        with contextlib.suppress(sqlite3.Error):  # the WAL is replayed at the next open
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()

    def _transaction(self, db: sqlite3.Connection, batch: list[_Op]) -> list[_Outcome]:
        counts = (self.readings_count, self.outbox_count)
        outcomes: list[_Outcome] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for fn, fut in batch:
                db.execute("SAVEPOINT op")
                before = (self.readings_count, self.outbox_count)
                try:
                    outcomes.append((fut, fn(db), None))
                except (sqlite3.Error, StoreError, ValueError, KeyError) as e:
                    db.execute("ROLLBACK TO op")
                    self.readings_count, self.outbox_count = before
                    outcomes.append((fut, None, _store_error(e)))
                db.execute("RELEASE op")
            db.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as e:
            if db.in_transaction:
                db.rollback()
            self.readings_count, self.outbox_count = counts
            err = _store_error(e)
            return [(fut, None, err) for _, fut in batch]
        return outcomes


def _store_error(e: BaseException) -> BaseException:
    if isinstance(e, StoreError):
        return e
    if isinstance(e, sqlite3.Error) and e.sqlite_errorcode == sqlite3.SQLITE_FULL:
        return StoreFull(f"disk full: {e}")
    return StoreError(f"{type(e).__name__}: {e}")


def _settle(fut: asyncio.Future[Any], value: Any, err: BaseException | None) -> None:
    if fut.cancelled():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(value)


def _settle_all(outcomes: list[_Outcome], then: Callable[[], None] | None) -> None:
    for fut, value, err in outcomes:
        _settle(fut, value, err)
    if then is not None:
        then()
