"""The parent side of plugin workers: start, feed, time out, recycle, and restart with backoff.

One :class:`PluginRunner` per configured plugin runs ``instances`` worker
loops over the plugin's queue, and a fallback while no main worker is ready.
A worker that dies, hangs past its deadline or fails to load is replaced after
an exponential backoff with jitter; more than ``restart_budget`` restarts in
``restart_window_s`` put the plugin in a cool-down, after which it is tried
again: it is never left dead until a person acts. The daemon keeps accepting
and storing readings whatever a plugin does.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import structlog

from gatewayd.batching import PluginQueue
from gatewayd.config import PluginConfig
from gatewayd.plugin_api import Reading
from gatewayd.scheduler import Slots
from gatewayd.store import Store, StoreError
from gatewayd.worker import HEADER, MAX_FRAME, encode_frame, reading_to_wire

#: A worker that served this long resets the backoff.
HEALTHY_AFTER_S = 30.0

Results = dict[str, dict[str, Any]]


class State(enum.StrEnum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    BACKOFF = "backoff"
    COOLING_DOWN = "cooling-down"
    DEGRADED = "degraded"  # the plugin as a whole: no main worker ready, the fallback serves
    STOPPED = "stopped"


class WorkerFailed(Exception):
    """The worker process is gone or unusable; ``not_ready`` means the plugin asked for backoff."""

    def __init__(self, reason: str, *, not_ready: bool = False) -> None:
        super().__init__(reason)
        self.not_ready = not_ready


class BatchFailed(Exception):
    """The plugin raised on this batch; the worker itself is still fine."""


def backoff_delay(failures: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with jitter in [d/2, d], so restarting fleets do not synchronise."""
    d = min(maximum, initial * 2 ** max(0, failures - 1))
    return rng.uniform(d / 2, d)


@dataclass(frozen=True, slots=True)
class LoadInfo:
    version: str
    warmup_s: float
    #: The plugin's ``answer_keys`` (None: its whole result is its answer).
    answer_keys: tuple[str, ...] | None = None


class Worker:
    """One worker process speaking length-prefixed CBOR over its stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls, threads: int = 1, env: Mapping[str, str] | None = None, cpus: Iterable[int] | None = None
    ) -> Worker:
        """A worker process; ``env`` is added to its environment (e.g. ``[models]``' signature policy),
        ``cpus`` limits where it runs (set before it has started any thread of its own)."""
        # Native libraries size their own pools from these; keep them to the worker's share.
        environment = {
            **os.environ,
            **(env or {}),
            "OMP_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads),
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gatewayd.worker",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=MAX_FRAME,
                env=environment,
            )  # fmt: skip
        except OSError as e:  # out of processes or memory: back off like any other failure
            raise WorkerFailed(f"cannot start worker: {e}") from None
        if cpus is not None:
            try:
                os.sched_setaffinity(proc.pid, cpus)
            except OSError as e:  # e.g. a CPU taken offline since the config was checked
                proc.kill()
                await proc.wait()
                raise WorkerFailed(f"cannot set the worker's CPUs {sorted(cpus)}: {e}") from None
        return cls(proc)

    async def load(
        self, target: str, options: dict[str, Any], threads: int, timeout_s: float,
        on_warming: Callable[[], None] = lambda: None, bundle: Path | None = None,
    ) -> LoadInfo:  # fmt: skip
        """Import, construct, load and warm up the plugin in the worker; ``bundle`` goes to the
        plugin's ``bundle_option`` (a model installed by an update)."""
        load = {"op": "load", "target": target, "options": options, "threads": threads}
        self._send(load if bundle is None else {**load, "bundle": str(bundle)})
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = await asyncio.wait_for(self._receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.kill()
                raise WorkerFailed(f"load took longer than {timeout_s:.0f}s") from None
            if "error" in reply:
                raise WorkerFailed(f"load failed: {reply['error']}", not_ready=reply.get("not_ready", False))
            if reply.get("state") == "warming":
                on_warming()
            elif reply.get("state") == "ready":
                keys = reply.get("answer_keys")
                return LoadInfo(
                    str(reply.get("version", "?")),
                    float(reply["warmup_s"]),
                    None if keys is None else tuple(keys),
                )

    async def process(self, batch: list[Reading], deadline_s: float) -> Results:
        """Results by reading id; BatchFailed if the plugin raised, WorkerFailed if the worker is lost."""
        self.send(batch)
        return await self.reply(batch, deadline_s)

    def send(self, batch: list[Reading]) -> None:
        """Queue a batch in the worker's pipe; it runs batches in the order sent, one reply each."""
        self._send({"op": "process", "batch": [reading_to_wire(r) for r in batch]})

    async def reply(self, batch: list[Reading], deadline_s: float) -> Results:
        """The reply to ``batch``, the oldest batch sent and not yet answered (see ``process``)."""
        try:
            reply = await asyncio.wait_for(self._receive(), deadline_s)
        except TimeoutError:
            self.kill()
            raise WorkerFailed(f"batch of {len(batch)} passed its {deadline_s}s deadline") from None
        if "error" in reply:
            if reply.get("not_ready"):
                raise WorkerFailed(f"plugin not ready: {reply['error']}", not_ready=True)
            raise BatchFailed(reply["error"])
        ids = {r.id for r in batch}
        return {rid: data for rid, data in reply["results"] if rid in ids}

    def rss_mb(self) -> float:
        """The worker's resident memory, from /proc (0 where unavailable)."""
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        # A closed pipe is a worker that exited: its reply, awaited next, says so with its exit code.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.proc.stdin.write(encode_frame(obj))

    async def _receive(self) -> dict[str, Any]:
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


@dataclass
class Instance:
    """One worker loop of a plugin: main instances 0..n-1, or the fallback."""

    label: str
    variant: str  # "main" or "fallback": published with each result
    target: str
    options: dict[str, Any]
    state: State = State.STOPPED
    detail: str = ""
    pid: int | None = None
    worker: Worker | None = None
    #: The runner's generation this worker was loaded for; a switch of bundle makes it old.
    generation: int = 0


@dataclass
class Probe:
    """How the main workers of one generation (one bundle) have done since it began."""

    readings: int = 0
    #: Inference time per reading of each batch, ms.
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


#: Sees each main batch's readings, results and inference seconds (a model update's shadow run).
Tap = Callable[[list[Reading], Results, float], None]


class PluginRunner:
    """Runs one configured plugin: its workers, its batches, its fallback and its state."""

    def __init__(
        self,
        cfg: PluginConfig,
        target: str,
        queue: PluginQueue,
        store: Store,
        slots: Slots,
        threads: int,
        fallback_target: str | None = None,
        on_state: Callable[[PluginRunner], None] = lambda r: None,
        on_batch: Callable[[str, int, float], None] | None = None,
        worker_env: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.worker_env = worker_env
        self.queue = queue
        self.store = store
        self.slots = slots
        self.threads = threads
        self.on_state = on_state
        #: Called after each batch a worker processed: (variant, size, seconds in worker.process).
        self.on_batch = on_batch
        self.log = structlog.get_logger("gatewayd.supervisor").bind(plugin=cfg.name)
        self.instances = [Instance(f"main-{i}", "main", target, cfg.options) for i in range(cfg.instances)]
        self.fallback: Instance | None = None
        if cfg.fallback is not None and not cfg.fallback.degraded:
            self.fallback = Instance("fallback", "fallback", fallback_target or target, cfg.fallback.options)
        self.fallback_active = False
        #: A bundle installed by a model update, given to the main workers instead of the configured one.
        self.bundle: Path | None = None
        self.generation = 0
        #: Set by a model update while it watches the bundle it switched to (not kept otherwise).
        self.probe: Probe | None = None
        self.tap: Tap | None = None
        self._handover: tuple[Worker, LoadInfo] | None = None  # a loaded worker for the next generation
        self._switched = asyncio.Event()
        # Counters, for status and metrics.
        self.restarts = 0
        self.batches = 0
        self.processed = 0
        self.errors = 0
        self.expired = 0
        self.recycled = 0
        self.sent_ahead = 0  # batches sent while the worker ran the one before
        #: Readings completed, by variant: main, fallback, degraded, expired, error.
        self.results: dict[str, int] = {}
        self.last_error = ""
        self.batch_sizes: deque[int] = deque(maxlen=256)
        self._rng = random.Random()
        self._attempts: dict[str, int] = {}  # failed attempts per reading id
        self._suspects: set[str] = set()  # readings of failed batches, retried one by one
        self._restart_times: deque[float] = deque()
        self._cooling_until = 0.0
        self._latency_s = 0.0  # moving average of a batch's time, for max_age
        self._stopping = False
        #: The last result commit: commits run in batch order while the worker goes on to the next batch.
        self._committing: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._changed = asyncio.Event()

    # -- state ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        states = {i.state for i in self.instances}
        if State.READY in states:
            return State.READY
        if self.fallback_active:
            return State.DEGRADED
        for s in (State.WARMING, State.LOADING, State.BACKOFF, State.COOLING_DOWN):
            if s in states:
                return s
        return State.STOPPED

    @property
    def detail(self) -> str:
        return "; ".join(f"{i.label}: {i.detail}" for i in self._all() if i.detail)

    def _all(self) -> list[Instance]:
        return [*self.instances, *([self.fallback] if self.fallback else [])]

    def snapshot(self) -> dict[str, Any]:
        """The plugin's state and counters, as published on its status topic."""
        return {
            "state": str(self.state),
            "detail": self.detail,
            "instances": {i.label: {"state": str(i.state), "pid": i.pid} for i in self._all()},
            "restarts": self.restarts,
            "batches": self.batches,
            "processed": self.processed,
            "errors": self.errors,
            "expired": self.expired,
            "recycled": self.recycled,
            "last_error": self.last_error,
            "queue": self.queue.waiting,
            "bundle": None if self.bundle is None else str(self.bundle),
            "ts": time.time(),
        }

    def _set(self, inst: Instance, state: State, detail: str = "") -> None:
        if (state, detail) != (inst.state, inst.detail):
            inst.state, inst.detail = state, detail
            self.log.info("plugin_state", instance=inst.label, state=str(state), detail=detail, pid=inst.pid)
            self._changed.set()
            self.on_state(self)

    # -- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the runner to finish its current batches and stop."""
        self._stopping = True
        self._stopped.set()
        self._changed.set()
        self.queue.close()

    async def _loaded(self, inst: Instance, bundle: Path | None, *, own: bool) -> tuple[Worker, LoadInfo]:
        """A worker for ``inst``'s plugin, started and loaded (on ``bundle`` if given), stopped again if
        the load fails. ``own``: it is ``inst``'s worker, whose pid and warming ``inst`` shows; else a
        candidate beside it."""
        threads = self.cfg.threads or self.threads
        worker = await Worker.start(threads, self.worker_env, self.cfg.cpus)
        if own:
            inst.worker, inst.pid = worker, worker.proc.pid
        try:
            info = await worker.load(
                inst.target, inst.options, threads, self.cfg.load_timeout_s,
                on_warming=(lambda: self._set(inst, State.WARMING)) if own else (lambda: None),
                bundle=bundle,
            )  # fmt: skip
        except BaseException:
            await worker.stop()
            raise
        return worker, info

    async def load_candidate(self, bundle: Path) -> tuple[Worker, LoadInfo]:
        """A main worker loaded on ``bundle`` beside the serving ones (not serving); WorkerFailed if not."""
        return await self._loaded(self.instances[0], bundle, own=False)

    def switch(
        self, bundle: Path | None, loaded: tuple[Worker, LoadInfo] | None = None, probe: Probe | None = None
    ) -> None:
        """Serve from ``bundle`` (None: the configured model) from each worker's next batch on.

        A batch in a worker finishes there and is completed as usual; then the worker is replaced,
        the first one by ``loaded`` (no reload), so no reading is lost or processed twice. ``probe``,
        if given, counts how the new bundle's main workers do (until it is set to None again).
        """
        self.bundle = bundle
        self.generation += 1
        self.probe = probe
        if self._handover is not None:  # an earlier switch's worker no instance took
            self._handover[0].kill()
        self._handover = loaded
        self._switched.set()
        self._switched = asyncio.Event()
        self.log.info(
            "bundle_switched", bundle=str(bundle) if bundle else "configured", generation=self.generation
        )
        self.on_state(self)

    async def run(self) -> None:
        loops = [self._instance_loop(i) for i in self.instances]
        if self.cfg.fallback is not None:
            loops.append(self._fallback_loop())
        try:
            await asyncio.gather(*loops)
        finally:
            if self._committing is not None:
                await self._committing  # the chain's tail: every result taken is in the store

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), delay)

    async def _instance_loop(self, inst: Instance) -> None:
        failures = 0
        while not self._stopping:
            if (wait := self._cooling_until - time.monotonic()) > 0:
                self._set(inst, State.COOLING_DOWN, f"restart budget spent; trying again in {wait:.0f}s")
                await self._sleep(wait)
                continue
            started = time.monotonic()
            main = inst.variant == "main"
            inst.generation = self.generation
            try:
                if main and self._handover is not None:
                    (worker, info), self._handover = self._handover, None
                    inst.worker, inst.pid = worker, worker.proc.pid
                else:
                    self._set(inst, State.LOADING)
                    worker, info = await self._loaded(inst, self.bundle if main else None, own=True)
                self.log.info("plugin_warm", instance=inst.label, warmup_s=round(info.warmup_s, 4),
                              version=info.version, generation=inst.generation)  # fmt: skip
                self._set(inst, State.READY)
                await self._serve(inst, worker)  # returns on stop, or to recycle the worker
            except WorkerFailed as e:
                if self._stopping:
                    break
                self.log.warning("worker_failed", instance=inst.label, error=str(e))
                self.last_error = str(e)
                self._failure(inst, str(e))
                failures = 1 if time.monotonic() - started > HEALTHY_AFTER_S else failures + 1
                self.restarts += 1
                if self._over_budget():
                    self._cooling_until = time.monotonic() + self.cfg.cooldown_s
                    failures = 0
                    continue
                delay = backoff_delay(failures, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self._rng)
                self._set(inst, State.BACKOFF, f"{e}; retry in {delay:.1f}s")
                await self._sleep(delay)
            finally:
                if inst.worker is not None:
                    await inst.worker.stop()
                    inst.worker, inst.pid = None, None
        self._set(inst, State.STOPPED)

    def _over_budget(self) -> bool:
        now = time.monotonic()
        self._restart_times.append(now)
        while self._restart_times and self._restart_times[0] < now - self.cfg.restart_window_s:
            self._restart_times.popleft()
        if len(self._restart_times) > self.cfg.restart_budget:
            self._restart_times.clear()
            self.log.error("restart_budget_spent", cooldown_s=self.cfg.cooldown_s)
            return True
        return False

    async def _fallback_loop(self) -> None:
        """Serve the queue with the fallback while no main instance is ready."""
        while not self._stopping:
            self._changed.clear()
            if self.state in (State.BACKOFF, State.COOLING_DOWN):
                self.fallback_active = True
                self.log.warning("fallback_on", degraded=self.fallback is None)
                serving = asyncio.create_task(
                    self._instance_loop(self.fallback) if self.fallback else self._serve_degraded()
                )
                while not self._stopping and not any(i.state == State.READY for i in self.instances):
                    self._changed.clear()
                    await self._changed.wait()
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
                if self.fallback is not None:
                    self._set(self.fallback, State.STOPPED)
                self.fallback_active = False
                self.log.info("fallback_off")
                self.on_state(self)
                continue
            await self._changed.wait()

    # -- serving ---------------------------------------------------------------------------

    async def _take(self) -> list[Reading]:
        """The next batch, minus expired readings; a suspect of a failed batch goes alone."""
        while True:
            batch = await self.queue.next_batch(self.cfg.max_batch, self.cfg.max_wait_ms / 1000)
            if not batch:
                return []
            if batch := self._shaped(batch):
                return batch

    def _shaped(self, batch: list[Reading]) -> list[Reading]:
        if self._suspects and len(batch) > 1:
            alone = next((r for r in batch if r.id in self._suspects), None)
            if alone is not None:
                self.queue.requeue([r for r in batch if r is not alone])
                batch = [alone]
        return self._drop_expired(batch)

    def _ahead(self, inst: Instance, worker: Worker) -> list[Reading]:
        """A full batch to send while the worker runs the current one, if one is waiting and no
        other plugin waits for a slot: the worker then never idles for the event loop's turn.
        None with ``max_age_s``: a reading's age is judged when its turn comes, not a batch early."""
        if (
            self.cfg.max_age_s is not None
            or self.queue.waiting < self.cfg.max_batch
            or self.slots.waiting
            or self.queue.closed
            or (inst.variant == "main" and inst.generation != self.generation)
            or self._over_memory(worker)
        ):
            return []
        return self._shaped(self.queue.take(self.cfg.max_batch))

    def _drop_expired(self, batch: list[Reading]) -> list[Reading]:
        if self.cfg.max_age_s is None:
            return batch
        due = time.time() + self._latency_s  # when a result would be out
        old = [r for r in batch if due - r.ts > self.cfg.max_age_s]
        if not old:
            return batch
        self.expired += len(old)
        self.log.warning("readings_expired", count=len(old), max_age_s=self.cfg.max_age_s)
        self._complete(old, {r.id: {"expired": True, "error": f"older than max_age_s "
                                           f"{self.cfg.max_age_s:g} s when its turn came"} for r in old},
                             "expired")  # fmt: skip
        return [r for r in batch if r not in old]

    async def _serve(self, inst: Instance, worker: Worker) -> None:
        exited = asyncio.create_task(worker.proc.wait())
        main = inst.variant == "main"  # only main workers change bundle
        switched = asyncio.create_task(self._switched.wait() if main else asyncio.Event().wait())
        taking: asyncio.Task[list[Reading]] | None = None
        failures = 0  # consecutive failed batches: back off between them too
        try:
            while not (main and inst.generation != self.generation):
                taking = asyncio.create_task(self._take())
                await asyncio.wait({taking, exited, switched}, return_when=asyncio.FIRST_COMPLETED)
                if not taking.done():
                    taking.cancel()  # no batch is to blame
                    with contextlib.suppress(asyncio.CancelledError):
                        await taking
                    if switched.done():
                        return  # a new bundle: this worker makes way
                    raise WorkerFailed(f"worker exited with code {exited.result()} while idle")
                batch = taking.result()
                if not batch:
                    return
                try:
                    await self._run_batch(inst, worker, batch)
                    failures = 0
                except BatchFailed as e:
                    failures += 1
                    delay = backoff_delay(
                        failures, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self._rng
                    )
                    self._set(inst, State.BACKOFF, f"batch failed: {e}; next batch in {delay:.1f}s")
                    await self._sleep(delay)
                    self._set(inst, State.READY)
                    continue
                if rss := self._over_memory(worker):
                    self.recycled += 1
                    self.log.warning(
                        "worker_recycled", instance=inst.label, rss_mb=round(rss, 1),
                        limit_mb=self.cfg.memory_limit_mb,
                    )  # fmt: skip
                    return
        finally:
            exited.cancel()
            switched.cancel()
            if taking is not None:
                taking.cancel()  # when we are cancelled (fallback off), no orphan may take a batch

    def _over_memory(self, worker: Worker) -> float:
        """The worker's RSS in MB if it is over ``memory_limit_mb`` (to be recycled), else 0."""
        limit = self.cfg.memory_limit_mb
        return rss if limit is not None and (rss := worker.rss_mb()) > limit else 0.0

    async def _run_batch(self, inst: Instance, worker: Worker, batch: list[Reading]) -> None:
        """Run ``batch``, and the full batches sent ahead of their turn (``_ahead``), under one slot."""
        unanswered = [batch]  # oldest first: what a failure gives back to the queue
        try:
            async with self.slots.slot(self.cfg.priority):
                worker.send(batch)
                while unanswered:
                    if len(unanswered) == 1 and (ahead := self._ahead(inst, worker)):
                        worker.send(ahead)
                        unanswered.append(ahead)
                        self.sent_ahead += 1
                    t0 = time.monotonic()
                    results = await worker.reply(unanswered[0], self.cfg.deadline_s)
                    self._done(inst, unanswered.pop(0), results, time.monotonic() - t0)
        except BatchFailed as e:
            failed, *rest = unanswered
            self.log.warning("batch_failed", instance=inst.label, error=str(e), size=len(failed))
            self._failure(inst, str(e))
            self._requeue(rest)
            self._failed(failed, str(e))
            if rest:  # the worker runs it anyway: its reply must leave the pipe
                with contextlib.suppress(BatchFailed):
                    await worker.reply(rest[0], self.cfg.deadline_s)
            raise
        except WorkerFailed as e:
            failed, *rest = unanswered
            self._requeue(rest)
            if e.not_ready:
                self.queue.requeue(failed)
            else:
                self._failed(failed, str(e))
            raise
        except asyncio.CancelledError:  # the fallback was switched off mid-batch
            self._requeue(unanswered)
            raise

    def _requeue(self, batches: list[list[Reading]]) -> None:
        """Give back taken batches (oldest first) in front of the queue, in their order."""
        for batch in reversed(batches):
            self.queue.requeue(batch)

    def _done(self, inst: Instance, batch: list[Reading], results: Results, inference_s: float) -> None:
        self._latency_s = 0.8 * self._latency_s + 0.2 * inference_s
        self.batch_sizes.append(len(batch))
        if self.on_batch is not None:
            self.on_batch(inst.variant, len(batch), inference_s)
        if inst.variant == "main" and inst.generation == self.generation:
            if self.probe is not None:
                self.probe.readings += len(batch)
                self.probe.latencies_ms.append(inference_s * 1000 / len(batch))
            if self.tap is not None:
                self.tap(batch, {rid: dict(d) for rid, d in results.items()}, inference_s)
        self._complete(batch, results, inst.variant)

    async def _serve_degraded(self) -> None:
        """The "publish degraded" fallback: answer each reading at once, flagged degraded."""
        while batch := await self._take():
            reason = f"plugin unavailable: {self.last_error or self.state}"
            self._complete(batch, {r.id: {"degraded": True, "error": reason} for r in batch}, "degraded")
            await asyncio.sleep(0)  # let the commits run between batches

    def _failure(self, inst: Instance, reason: str) -> None:
        if self.probe is not None and inst.variant == "main" and inst.generation == self.generation:
            self.probe.failures.append(reason)

    def _failed(self, batch: list[Reading], reason: str) -> None:
        """A failed batch: suspects are retried one by one; a single reading has max_attempts."""
        if len(batch) > 1:
            self._suspects.update(r.id for r in batch)
            self.queue.requeue(batch)
            return
        (r,) = batch
        self._attempts[r.id] = attempts = self._attempts.get(r.id, 0) + 1
        if attempts < self.cfg.max_attempts:
            self.queue.requeue(batch)
            return
        self.log.error("reading_given_up", reading_id=r.id, attempts=attempts, reason=reason)
        self.errors += 1
        self._complete(batch, {r.id: {"error": f"gave up after {attempts} attempts: {reason}"}}, "error")

    def _complete(self, batch: list[Reading], results: Results, variant: str) -> None:
        """Commit the batch's results after those of earlier batches, without waiting for it: the
        worker starts on the next batch meanwhile (an fsync per batch left it idle ~20% of the time)."""
        for data in results.values():
            data["variant"] = variant
        self._committing = asyncio.create_task(self._commit(self._committing, batch, results, variant))

    async def _commit(
        self, after: asyncio.Task[None] | None, batch: list[Reading], results: Results, variant: str
    ) -> None:
        if after is not None:
            await after  # per-node order of results, as of readings
        while True:
            try:
                await self.store.complete(self.cfg.name, [r.id for r in batch], results)
                break
            except StoreError as e:
                self.log.error("store_complete_failed", error=str(e))
                if self._stopping:
                    return  # still pending in the store: processed again after the restart
                await asyncio.sleep(1.0)
        for r in batch:
            self._attempts.pop(r.id, None)
            self._suspects.discard(r.id)
        self.queue.done(len(batch))
        self.batches += 1
        self.processed += len(batch)
        self.results[variant] = self.results.get(variant, 0) + len(batch)
