"""Model updates over the air: verify a bundle, install it beside the current one, switch, roll back.

A command (JSON on ``{prefix}/{gateway}/cmd/models/update``) names a plugin and a bundle folder on
the gateway: ``{"id": "u-17", "plugin": "glm", "bundle": "/srv/incoming/glm-1.3.0"}``.
:func:`handle_update` verifies it under the ``[models]`` policy (refusing a rollback to a version
not newer than the active one), copies it into the model store and checks the copy (what gets
loaded is what was verified, not the incoming folder that someone may still write to), switches
the plugin's ``current`` link, and asks the caller to restart the plugin's workers on it. A restart
that fails switches back to the previous bundle and restarts on that. Each step is reported as a
JSON-able dict through ``report`` (for ``.../cmd/models/response``).

Store layout: ``ROOT/PLUGIN/VERSION/`` per installed bundle, ``ROOT/PLUGIN/current`` and
``ROOT/PLUGIN/previous`` symlinks, each replaced atomically; older versions beyond those two are
pruned. Not yet wired to MQTT or the supervisor (see the README).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from gatewayd import bundle

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


Restart = Callable[[str, Path], Awaitable[None]]
Report = Callable[[dict[str, Any]], None]


async def handle_update(
    cmd: UpdateCommand,
    store: ModelStore,
    restart: Restart,
    report: Report,
    *,
    trusted_keys: list[Path],
    require_signature: bool,
    now: datetime | None = None,
) -> bool:
    """Carry out one update; True when the new bundle is serving. Never raises for a refusal.

    ``restart(plugin, folder)`` must restart the plugin's workers on ``folder`` and raise when they
    fail to load. Reports, in order: ``received``, ``verified`` (or ``refused``), ``installed``,
    ``active`` (or ``load_failed`` then ``rolled_back`` / ``rollback_failed``).
    """

    def step(what: str, **fields: Any) -> None:
        doc = {"id": cmd.id, "plugin": cmd.plugin, "step": what, **fields}
        log.info("model_update", **doc)
        report(doc)

    step("received", bundle=str(cmd.bundle))
    try:
        m = store.install(cmd.plugin, cmd.bundle, trusted_keys, require_signature=require_signature, now=now)
    except (bundle.BundleError, OSError) as e:
        step("refused", error=str(e))
        return False
    step("verified", bundle_name=m.name, version=m.version)
    folder = store.root / cmd.plugin / m.version
    step("installed", path=str(folder))
    old = store.activate(cmd.plugin, m.version)
    try:
        await restart(cmd.plugin, folder)
    except Exception as e:  # whatever the workers' failure, the answer is to go back
        step("load_failed", version=m.version, error=str(e))
        if old is None:
            step("rollback_failed", error="no previous bundle")
            return False
        prev = store.rollback(cmd.plugin)
        try:
            await restart(cmd.plugin, prev)
        except Exception as e2:  # reported; the supervisor's backoff goes on retrying it
            step("rollback_failed", version=prev.name, error=str(e2))
            return False
        step("rolled_back", version=prev.name)
        return False
    store.prune(cmd.plugin)
    step("active", version=m.version, previous=old.name if old else None)
    return True
