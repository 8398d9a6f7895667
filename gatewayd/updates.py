"""Model updates over the air: verify a bundle, install it beside the current one, switch, roll back.

A command (JSON on ``{prefix}/{gateway}/cmd/models/update``) names a plugin and a bundle folder on
the gateway: ``{"id": "u-17", "plugin": "glm", "bundle": "/srv/incoming/glm-1.3.0"}``.
:class:`Updater` verifies it under the ``[models]`` policy (signed, by a trusted key, unexpired,
newer than the installed one), copies it into the model store and checks the copy (what gets
loaded is what was verified, not the incoming folder that someone may still write to), loads it in
a new worker, runs it in shadow on live readings against the serving model, switches the plugin's
``current`` link and its workers, and rolls back if the new model fails or is too slow on probation.

Store layout: ``ROOT/PLUGIN/VERSION/`` per installed bundle, ``ROOT/PLUGIN/current`` and
``ROOT/PLUGIN/previous`` symlinks, each replaced atomically; older versions beyond those two are
pruned. gatewayd starts a plugin on its ``current`` bundle, so an update outlives a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from gatewayd import bundle
from gatewayd.config import UpdatePolicy
from gatewayd.plugin_api import Reading
from gatewayd.supervisor import BatchFailed, PluginRunner, Probe, Worker, WorkerFailed

log = structlog.get_logger("gatewayd.updates")

CURRENT = "current"
PREVIOUS = "previous"


class UpdateError(ValueError):
    """A command that cannot be carried out; ``step`` is where it stopped."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass(frozen=True)
class UpdateCommand:
    plugin: str
    bundle: Path
    id: str | None = None


def parse_command(payload: bytes, plugins: Iterable[str]) -> UpdateCommand:
    """The command in an MQTT payload; UpdateError("command", why) for anything else."""
    try:
        doc = json.loads(payload)
    except ValueError as e:
        raise UpdateError("command", f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise UpdateError("command", "not a JSON object")
    if unknown := sorted(doc.keys() - {"id", "plugin", "bundle"}):
        raise UpdateError("command", f"unknown key(s): {', '.join(unknown)}")
    plugin, path, cid = doc.get("plugin"), doc.get("bundle"), doc.get("id")
    known = sorted(plugins)
    if plugin not in known:
        raise UpdateError("command", f"plugin {plugin!r} is not configured (configured: {', '.join(known)})")
    if not isinstance(path, str) or not os.path.isabs(path):
        raise UpdateError("command", "bundle must be an absolute path on the gateway")
    if cid is not None and not isinstance(cid, str):
        raise UpdateError("command", "id must be a string")
    return UpdateCommand(str(plugin), Path(path), cid)


class ModelStore:
    """Installed bundles per plugin under ``root``, with ``current`` and ``previous`` links."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def current(self, plugin: str) -> Path | None:
        return self._target(plugin, CURRENT)

    def previous(self, plugin: str) -> Path | None:
        return self._target(plugin, PREVIOUS)

    def installed_version(self, plugin: str) -> str | None:
        cur = self.current(plugin)
        return None if cur is None else bundle.read_manifest(cur).version

    def install(
        self,
        plugin: str,
        src: Path,
        trusted_keys: list[Path],
        *,
        require_signature: bool,
        now: datetime | None = None,
    ) -> bundle.Manifest:
        """Verify ``src``, copy it to ``ROOT/PLUGIN/VERSION`` and verify the copy; not yet active."""
        m = bundle.verify_signed(
            src, trusted_keys, require_signature=require_signature, now=now,
            installed_version=self.installed_version(plugin),
        )  # fmt: skip
        dest = self.root / plugin / m.version
        if dest.exists():  # left by an earlier, later rolled-back install: replaced by this verified one
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{m.version}-", dir=dest.parent))
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True, symlinks=True)
            # The copy is what loads: check it again, with its own manifest and signature.
            bundle.verify_signed(tmp, trusted_keys, require_signature=require_signature, now=now)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return m

    def activate(self, plugin: str, version: str) -> Path | None:
        """Point ``current`` at VERSION and ``previous`` at what was current; returns that."""
        old = self.current(plugin)
        if old is not None and old.name != version:
            self._link(plugin, PREVIOUS, old.name)
        self._link(plugin, CURRENT, version)
        return old

    def deactivate(self, plugin: str) -> None:
        """No installed bundle serves: the plugin's configured one does (a first update rolled back)."""
        (self.root / plugin / CURRENT).unlink(missing_ok=True)

    def rollback(self, plugin: str) -> Path:
        """Point ``current`` back at ``previous``; UpdateError when there is none."""
        prev = self.previous(plugin)
        if prev is None:
            raise UpdateError("rollback", "no previous bundle to roll back to")
        self._link(plugin, CURRENT, prev.name)
        (self.root / plugin / PREVIOUS).unlink()
        return prev

    def prune(self, plugin: str) -> list[str]:
        """Remove versions that are neither current nor previous; returns their names."""
        keep = {p.name for p in (self.current(plugin), self.previous(plugin)) if p is not None}
        gone = []
        for d in sorted((self.root / plugin).iterdir()):
            if d.is_dir() and not d.is_symlink() and not d.name.startswith(".") and d.name not in keep:
                shutil.rmtree(d)
                gone.append(d.name)
        return gone

    def _target(self, plugin: str, link: str) -> Path | None:
        p = self.root / plugin / link
        return (self.root / plugin / os.readlink(p)) if p.is_symlink() else None

    def _link(self, plugin: str, link: str, version: str) -> None:
        # A relative link replaced with rename: a reader sees the old target or the new, never none.
        tmp = self.root / plugin / f".{link}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(version)
        os.replace(tmp, self.root / plugin / link)


Report = Callable[[dict[str, Any]], None]


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def _answer(data: dict[str, Any] | None, keys: tuple[str, ...] | None) -> object:
    if data is None:
        return None
    return data if keys is None else {k: data.get(k) for k in keys}


class Updater:
    """Carries out update commands for the plugin runners, one at a time, each step reported.

    Steps (``step`` of each report, on ``.../cmd/models/response``): ``received``; ``refused`` (with
    ``stage`` and ``error``) or ``verified``, ``installed``, ``loaded`` (a new worker on the new
    bundle, beside the serving ones), ``shadow`` (both models on the same live readings: agreement and
    p95 latency), ``switched`` (from each worker's next batch), then ``active`` after the probation, or
    ``rolled_back``. The serving model keeps serving until ``switched``; a refusal leaves it untouched.
    """

    def __init__(
        self, store: ModelStore, runners: Mapping[str, PluginRunner], report: Report,
        *, trusted_keys: list[Path], require_signature: bool,
    ) -> None:  # fmt: skip
        self.store = store
        self.runners = runners
        self.report = report
        self.trusted_keys = trusted_keys
        self.require_signature = require_signature
        self._task: asyncio.Task[bool] | None = None

    def submit(self, payload: bytes) -> None:
        """An MQTT command: refused at once if malformed or while another update runs."""
        try:
            cmd = parse_command(payload, self.runners)
        except UpdateError as e:
            self._step(None, None, "refused", stage=e.step, error=e.reason)
            return
        if not self.require_signature:
            why = "updates over the air need signed bundles: set [models] trusted_keys"
            self._step(cmd.id, cmd.plugin, "refused", stage="command", error=why)
            return
        if self._task is not None and not self._task.done():
            busy = f"busy with update {self._task.get_name().removeprefix('update:')}"
            self._step(cmd.id, cmd.plugin, "refused", stage="command", error=busy)
            return
        self._task = asyncio.create_task(self.run(cmd), name=f"update:{cmd.id or cmd.bundle}")

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _step(self, cid: str | None, plugin: str | None, what: str, **fields: Any) -> None:
        doc = {"id": cid, "plugin": plugin, "step": what, **fields, "ts": time.time()}
        (log.warning if what in ("refused", "rolled_back") else log.info)("model_update", **doc)
        self.report(doc)

    async def run(self, cmd: UpdateCommand) -> bool:
        """Carry out one command; True when the new bundle is serving after its probation."""
        runner = self.runners[cmd.plugin]
        policy = runner.cfg.update

        def step(what: str, **fields: Any) -> None:
            self._step(cmd.id, cmd.plugin, what, **fields)

        step("received", bundle=str(cmd.bundle))
        try:
            # Signed, always: ``submit`` refuses every command where signatures are not required.
            m = self.store.install(cmd.plugin, cmd.bundle, self.trusted_keys, require_signature=True)
        except (bundle.BundleError, OSError) as e:
            step("refused", stage="verify", error=str(e))
            return False
        folder = self.store.root / cmd.plugin / m.version
        step("verified", bundle_name=m.name, version=m.version)
        step("installed", path=str(folder))
        try:
            worker, info = await runner.load_candidate(folder)
        except WorkerFailed as e:
            self.store.prune(cmd.plugin)
            step("refused", stage="load", version=m.version, error=str(e))
            return False
        step("loaded", version=m.version, warmup_s=round(info.warmup_s, 4))
        try:
            verdict = await self._shadow(runner, worker, info.answer_keys, policy)
        except BaseException:
            await worker.stop()
            raise
        step("shadow", version=m.version, **verdict.report)
        if verdict.refusal is not None:
            await worker.stop()
            self.store.prune(cmd.plugin)
            step("refused", stage="shadow", version=m.version, error=verdict.refusal)
            return False
        old = self.store.activate(cmd.plugin, m.version)
        probe = Probe()
        runner.switch(folder, (worker, info), probe)
        step("switched", version=m.version, previous=old.name if old else "configured")
        try:
            failure = await self._probation(probe, policy, verdict.budget_ms)
        finally:
            runner.probe = None
        if failure is None:
            self.store.prune(cmd.plugin)
            step("active", version=m.version, readings=probe.readings)
            return True
        step("rolled_back", version=m.version, reason=failure, to=old.name if old else "configured")
        if old is None:
            self.store.deactivate(cmd.plugin)
            runner.switch(None)
        else:
            runner.switch(self.store.rollback(cmd.plugin))
        return False

    async def _shadow(
        self, runner: PluginRunner, worker: Worker, keys: tuple[str, ...] | None, policy: UpdatePolicy
    ) -> Verdict:
        """Both models on the same live batches (the serving model's results are what is published)."""
        batches: asyncio.Queue[tuple[list[Reading], dict[str, dict[str, Any]], float]] = asyncio.Queue(4)

        def tap(batch: list[Reading], results: dict[str, dict[str, Any]], seconds: float) -> None:
            with contextlib.suppress(
                asyncio.QueueFull
            ):  # shadowing samples the traffic; it never holds it up
                batches.put_nowait((batch, results, seconds))

        compared = agreed = 0
        current_ms: list[float] = []
        new_ms: list[float] = []
        deadline = time.monotonic() + policy.shadow_timeout_s
        runner.tap = tap
        try:
            while compared < policy.shadow_readings:
                try:
                    batch, current, seconds = await asyncio.wait_for(
                        batches.get(), deadline - time.monotonic()
                    )
                except TimeoutError:
                    break
                t0 = time.monotonic()
                try:
                    new = await worker.process(batch, runner.cfg.deadline_s)
                except (BatchFailed, WorkerFailed) as e:
                    return Verdict({"readings": compared}, f"the new model failed on live readings: {e}", 0.0)
                new_ms.append((time.monotonic() - t0) * 1000 / len(batch))
                current_ms.append(seconds * 1000 / len(batch))
                compared += len(batch)
                agreed += sum(_answer(current.get(r.id), keys) == _answer(new.get(r.id), keys) for r in batch)
        finally:
            runner.tap = None
        report: dict[str, Any] = {"readings": compared}
        if not compared:  # a quiet gateway: the new model's warm-up on its sample is all there is
            report["note"] = f"no live reading in {policy.shadow_timeout_s:g} s"
            return Verdict(report, None, policy.latency_budget_ms or 0.0)
        agreement, current_p95, new_p95 = agreed / compared, _p95(current_ms), _p95(new_ms)
        budget = policy.latency_budget_ms or 2 * current_p95
        report |= {
            "agreement": round(agreement, 4),
            "p95_ms": {"current": round(current_p95, 3), "new": round(new_p95, 3)},
            "budget_ms": round(budget, 3),
        }
        if agreement < policy.min_agreement:
            return Verdict(
                report, f"agreement {agreement:.1%} < min_agreement {policy.min_agreement:.1%}", budget
            )
        return Verdict(report, _over_budget(new_p95, budget), budget)

    async def _probation(self, probe: Probe, policy: UpdatePolicy, budget_ms: float) -> str | None:
        """Why the new bundle must go (a failure, or over budget); None once it has served its probation."""
        deadline = time.monotonic() + policy.probation_timeout_s
        while probe.readings < policy.probation_readings and time.monotonic() < deadline:
            if probe.failures:
                break
            await asyncio.sleep(0.05)
        if probe.failures:
            return probe.failures[0]
        return _over_budget(_p95(probe.latencies_ms), budget_ms) if budget_ms and probe.latencies_ms else None


def _over_budget(p95_ms: float, budget_ms: float) -> str | None:
    return f"p95 {p95_ms:.3g} ms per reading > budget {budget_ms:.3g} ms" if p95_ms > budget_ms else None


@dataclass(frozen=True)
class Verdict:
    """The shadow run's figures, why it refuses the new model (None: it may switch), and the budget."""

    report: dict[str, Any]
    refusal: str | None
    budget_ms: float
