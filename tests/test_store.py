"""The journal: durable appends share commits, survive reopening, and are freed only when done."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gatewayd.codec import Draft
from gatewayd.store import Store, StoreFull


def drafts(n: int, start: int = 0) -> list[Draft]:
    return [Draft(ts=1000.0 + i, fields={"i": i}) for i in range(start, start + n)]


async def test_concurrent_appends_share_commits(tmp_path: Path) -> None:
    """200 concurrent single-reading appends take far fewer than 200 commits (group commit)."""
    store = await Store.open(tmp_path / "s.db")
    try:
        results = await asyncio.gather(*(store.append("n", drafts(1, i), [[]]) for i in range(200)))
        commits = store.commits
    finally:
        await store.close()
    assert len({r[0].id for r in results}) == 200
    assert commits < 100, commits


async def test_reopen_restores_outbox_pending_and_never_reuses_ids(tmp_path: Path) -> None:
    """After a reopen the outbox and pending work are still there, and new ids continue past old ones."""
    path = tmp_path / "s.db"
    store = await Store.open(path)
    first = await store.append("n", drafts(3), [["p"], [], ["p"]])
    entries = await store.outbox_after(0, 10)
    await store.outbox_delete([e.id for e in entries])  # all published
    await store.close()

    store = await Store.open(path)
    try:
        assert [r.id for r in await store.pending("p")] == [first[0].id, first[2].id]
        assert store.readings_count == 2  # the reading no plugin wanted is gone once published
        again = await store.append("n", drafts(1), [[]])
        assert again[0].id not in {r.id for r in first}
        await store.complete("p", [first[0].id, first[2].id], {first[0].id: {"score": 1.0}})
        entries = await store.outbox_after(0, 10)
        assert [(e.reading.id, e.plugin, e.result) for e in entries] == [
            (again[0].id, None, None),
            (first[0].id, "p", {"score": 1.0}),
        ]
        await store.outbox_delete([e.id for e in entries])
        assert store.readings_count == 0 and store.outbox_count == 0
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM readings").fetchone() == (0,)


async def test_wiped_store_gets_new_id_prefix(tmp_path: Path) -> None:
    """A fresh store file never repeats ids of an earlier one (consumers dedupe by id)."""
    a = await Store.open(tmp_path / "a.db")
    b = await Store.open(tmp_path / "b.db")
    try:
        ra = await a.append("n", drafts(1), [[]])
        rb = await b.append("n", drafts(1), [[]])
    finally:
        await a.close()
        await b.close()
    assert ra[0].id != rb[0].id


async def test_full_store_refuses_without_losing_anything(tmp_path: Path) -> None:
    """Past max_readings an append raises StoreFull and keeps nothing of it; earlier readings stay."""
    store = await Store.open(tmp_path / "s.db", max_readings=5)
    try:
        await store.append("n", drafts(4), [[]] * 4)
        with pytest.raises(StoreFull):
            await store.append("n", drafts(2, 4), [[]] * 2)
        assert store.readings_count == 4 and len(await store.outbox_after(0, 100)) == 4
    finally:
        await store.close()


async def test_forgetting_an_unconfigured_plugin_frees_its_readings(tmp_path: Path) -> None:
    """Pending work of a plugin removed from the config is dropped, so its readings can be freed."""
    store = await Store.open(tmp_path / "s.db")
    try:
        await store.append("n", drafts(2), [["old", "keep"], ["old"]])
        await store.outbox_delete([e.id for e in await store.outbox_after(0, 10)])
        assert await store.forget_plugins_except(["keep"]) == 2
        assert store.readings_count == 1 and len(await store.pending("keep")) == 1
    finally:
        await store.close()
