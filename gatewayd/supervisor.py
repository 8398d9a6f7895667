"""The parent side of plugin workers: start, feed, time out, kill and restart with backoff.

One :class:`PluginRunner` per configured plugin. A worker that dies, hangs past
its deadline or fails to load is replaced after an exponential backoff with
jitter; the daemon keeps accepting and storing readings meanwhile. A batch that
keeps failing is answered with error results after ``max_attempts``, so one
poisonous reading cannot stall its plugin for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import cbor2
import structlog

from gatewayd.batching import PluginQueue
from gatewayd.config import PluginConfig
from gatewayd.plugin_api import Reading
from gatewayd.store import Store, StoreError
from gatewayd.worker import HEADER, MAX_FRAME, encode_frame, reading_to_wire

#: How long a worker may take to import, load and warm up its model.
LOAD_TIMEOUT_S = 120.0
#: A worker that served this long resets the backoff.
HEALTHY_AFTER_S = 30.0


class State(enum.StrEnum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    BACKOFF = "backoff"
    STOPPED = "stopped"


class WorkerFailed(Exception):
    """The worker process is gone or unusable; ``not_ready`` asks for plain backoff."""

    def __init__(self, reason: str, *, not_ready: bool = False) -> None:
        super().__init__(reason)
        self.not_ready = not_ready


class BatchFailed(Exception):
    """The plugin raised on this batch; the worker itself is still fine."""


def backoff_delay(failures: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter in [d/2, d], so restarting fleets do not synchronise."""
    d = min(maximum, initial * 2 ** max(0, failures - 1))
    return rng.uniform(d / 2, d)


class Worker:
    """One worker process speaking length-prefixed CBOR over its stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls) -> Worker:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gatewayd.worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=MAX_FRAME,
            )
        except OSError as e:  # out of processes or memory: back off like any other failure
            raise WorkerFailed(f"cannot start worker: {e}") from None
        return cls(proc)

    def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode_frame(obj))

    async def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            head = await self.proc.stdout.readexactly(HEADER.size)
            (n,) = HEADER.unpack(head)
            reply: dict[str, Any] = cbor2.loads(await self.proc.stdout.readexactly(n))
            return reply
        except (asyncio.IncompleteReadError, ConnectionError):
            code = await self.proc.wait()
            raise WorkerFailed(f"worker exited with code {code}") from None

    async def stop(self, grace_s: float = 2.0) -> None:
        """Close stdin (the worker exits at EOF); kill it if it does not go in time."""
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), grace_s)
            except TimeoutError:
                self.kill()
        await self.proc.wait()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class PluginRunner:
    """Runs one configured plugin: its worker, its batches, its state."""

    def __init__(
        self,
        cfg: PluginConfig,
        target: str,
        queue: PluginQueue,
        store: Store,
        on_state: Callable[[PluginRunner], None] = lambda r: None,
    ) -> None:
        self.cfg = cfg
        self.target = target
        self.queue = queue
        self.store = store
        self.on_state = on_state
        self.state = State.STOPPED
        self.detail = ""
        self.restarts = 0
        self.batches = 0
        self.log = structlog.get_logger("gatewayd.supervisor").bind(plugin=cfg.name)
        self._rng = random.Random()
        self._attempts = 0  # failed attempts at the batch now at the head of the queue
        self._stopping = False
        self._stopped = asyncio.Event()
        self._worker: Worker | None = None

    def _set(self, state: State, detail: str = "") -> None:
        if (state, detail) != (self.state, self.detail):
            self.state, self.detail = state, detail
            self.log.info("plugin_state", state=str(state), detail=detail)
            self.on_state(self)

    def stop(self) -> None:
        """Ask the runner to finish its current batch and stop."""
        self._stopping = True
        self._stopped.set()
        self.queue.close()

    async def run(self) -> None:
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                self._set(State.LOADING)
                self._worker = await Worker.start()
                await self._load(self._worker)
                self._set(State.READY)
                await self._serve(self._worker)
            except WorkerFailed as e:
                if self._stopping:
                    break
                if time.monotonic() - started > HEALTHY_AFTER_S:
                    failures = 0
                failures += 1
                self.restarts += 1
                delay = backoff_delay(failures, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self._rng)
                self._set(State.BACKOFF, f"{e}; retry in {delay:.1f}s")
                await self._sleep(delay)
            finally:
                if self._worker is not None:
                    await self._worker.stop()
                    self._worker = None
        self._set(State.STOPPED)

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), delay)

    async def _load(self, worker: Worker) -> None:
        worker.send({"op": "load", "target": self.target, "options": self.cfg.options})
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while True:
            try:
                reply = await asyncio.wait_for(worker.receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                worker.kill()
                raise WorkerFailed(f"load took longer than {LOAD_TIMEOUT_S:.0f}s") from None
            if "error" in reply:
                self.log.error("plugin_load_failed", error=reply["error"], trace=reply.get("trace"))
                raise WorkerFailed(f"load failed: {reply['error']}", not_ready=reply.get("not_ready", False))
            if reply.get("state") == "warming":
                self._set(State.WARMING)
            elif reply.get("state") == "ready":
                self.log.info(
                    "plugin_warm", warmup_s=round(reply["warmup_s"], 4), version=reply.get("version")
                )
                return

    async def _serve(self, worker: Worker) -> None:
        exited = asyncio.create_task(worker.proc.wait())
        try:
            while True:
                next_batch = asyncio.create_task(
                    self.queue.next_batch(self.cfg.max_batch, self.cfg.max_wait_ms / 1000)
                )
                await asyncio.wait({next_batch, exited}, return_when=asyncio.FIRST_COMPLETED)
                if not next_batch.done():
                    # Died while idle: no batch is to blame.
                    next_batch.cancel()
                    raise WorkerFailed(f"worker exited with code {exited.result()} while idle")
                batch = next_batch.result()
                if not batch:
                    return
                try:
                    results = await self._process(worker, batch)
                except BatchFailed as e:
                    await self._failed_attempt(batch, str(e))
                    continue
                except WorkerFailed as e:
                    if not e.not_ready:
                        await self._failed_attempt(batch, str(e))
                    raise
                await self._complete(batch, results)
        finally:
            exited.cancel()

    async def _process(self, worker: Worker, batch: list[Reading]) -> dict[str, dict[str, Any]]:
        worker.send({"op": "process", "batch": [reading_to_wire(r) for r in batch]})
        try:
            reply = await asyncio.wait_for(worker.receive(), self.cfg.deadline_s)
        except TimeoutError:
            worker.kill()
            raise WorkerFailed(f"batch of {len(batch)} passed its {self.cfg.deadline_s}s deadline") from None
        if "error" in reply:
            if reply.get("not_ready"):
                raise WorkerFailed(f"plugin not ready: {reply['error']}", not_ready=True)
            self.log.warning("batch_failed", error=reply["error"], trace=reply.get("trace"), size=len(batch))
            raise BatchFailed(reply["error"])
        ids = {r.id for r in batch}
        return {rid: data for rid, data in reply["results"] if rid in ids}

    async def _failed_attempt(self, batch: list[Reading], reason: str) -> None:
        """Count a failed attempt; after max_attempts answer the batch with error results."""
        self._attempts += 1
        if self._attempts >= self.cfg.max_attempts:
            self.log.error("batch_given_up", attempts=self._attempts, reason=reason, size=len(batch))
            error = {"error": f"gave up after {self._attempts} attempts: {reason}"}
            await self._complete(batch, {r.id: error for r in batch})

    async def _complete(self, batch: list[Reading], results: dict[str, dict[str, Any]]) -> None:
        while True:
            try:
                await self.store.complete(self.cfg.name, [r.id for r in batch], results)
                break
            except StoreError as e:
                self.log.error("store_complete_failed", error=str(e))
                if self._stopping:
                    return  # still pending in the store: processed again after the restart
                await asyncio.sleep(1.0)
        self.queue.done(len(batch))
        self._attempts = 0
        self.batches += 1
