"""Model updates: a verified bundle is installed beside the current one, switched to, and rolled back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gatewayd.bundle import generate_keypair, sign_bundle, write_manifest
from gatewayd.updates import ModelStore, UpdateCommand, UpdateError, handle_update, parse_command


def signed_bundle(folder: Path, version: str, key: Path, payload: bytes = b"weights") -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(payload)
    write_manifest(folder, name="glm", version=version, kind="onnx", quantization="int8")
    sign_bundle(folder, key)
    return folder


class Harness:
    """A fake supervisor: records restarts, fails to load the versions listed in ``broken``."""

    def __init__(self, root: Path) -> None:
        self.store = ModelStore(root)
        self.restarts: list[str] = []
        self.reports: list[dict[str, Any]] = []
        self.broken: set[str] = set()

    async def restart(self, plugin: str, folder: Path) -> None:
        self.restarts.append(folder.name)
        if folder.name in self.broken:
            raise RuntimeError(f"worker failed to load {folder.name}")

    def steps(self) -> list[str]:
        return [r["step"] for r in self.reports]


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


async def update(h: Harness, src: Path, pub: Path) -> bool:
    cmd = UpdateCommand("glm", src, "u-1")
    return await handle_update(
        cmd, h.store, h.restart, h.reports.append, trusted_keys=[pub], require_signature=True
    )


async def test_update_installs_switches_and_keeps_the_previous(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    priv, pub = keys
    h = Harness(tmp_path / "models")
    assert await update(h, signed_bundle(tmp_path / "in/1", "1.0.0", priv), pub)
    assert await update(h, signed_bundle(tmp_path / "in/2", "1.1.0", priv, b"w2"), pub)
    assert h.store.current("glm") == tmp_path / "models/glm/1.1.0"
    assert h.store.previous("glm") == tmp_path / "models/glm/1.0.0"
    assert (h.store.current("glm") / "model.onnx").read_bytes() == b"w2"  # type: ignore[operator]
    assert h.restarts == ["1.0.0", "1.1.0"]
    assert h.steps()[-4:] == ["received", "verified", "installed", "active"]
    assert h.reports[-1] == {
        "id": "u-1",
        "plugin": "glm",
        "step": "active",
        "version": "1.1.0",
        "previous": "1.0.0",
    }
    assert await update(h, signed_bundle(tmp_path / "in/3", "1.2.0", priv), pub)
    assert sorted(p.name for p in (tmp_path / "models/glm").iterdir()) == [
        "1.1.0",
        "1.2.0",
        "current",
        "previous",
    ]


async def test_a_refused_bundle_changes_nothing(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """Rollback (same version) and unsigned bundles are refused before anything is copied or restarted."""
    priv, pub = keys
    h = Harness(tmp_path / "models")
    assert await update(h, signed_bundle(tmp_path / "in/1", "1.0.0", priv), pub)
    assert not await update(h, signed_bundle(tmp_path / "in/again", "1.0.0", priv), pub)
    assert h.reports[-1]["step"] == "refused" and "rollback refused" in h.reports[-1]["error"]
    unsigned = signed_bundle(tmp_path / "in/u", "2.0.0", priv)
    (unsigned / "manifest.sig").unlink()
    assert not await update(h, unsigned, pub)
    assert "not signed" in h.reports[-1]["error"]
    assert h.restarts == ["1.0.0"] and h.store.installed_version("glm") == "1.0.0"
    assert not (tmp_path / "models/glm/2.0.0").exists()


async def test_a_bundle_that_fails_to_load_is_rolled_back(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    h = Harness(tmp_path / "models")
    assert await update(h, signed_bundle(tmp_path / "in/1", "1.0.0", priv), pub)
    h.broken.add("1.1.0")
    assert not await update(h, signed_bundle(tmp_path / "in/2", "1.1.0", priv), pub)
    assert h.steps()[-3:] == ["installed", "load_failed", "rolled_back"]
    assert h.restarts == ["1.0.0", "1.1.0", "1.0.0"]
    assert h.store.current("glm") == tmp_path / "models/glm/1.0.0" and h.store.previous("glm") is None
    # The same version, fixed, may be tried again: it is still newer than what is active.
    h.broken.clear()
    assert await update(h, signed_bundle(tmp_path / "in/2b", "1.1.0", priv), pub)


async def test_a_first_bundle_that_fails_to_load_has_nothing_to_roll_back_to(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    priv, pub = keys
    h = Harness(tmp_path / "models")
    h.broken.add("1.0.0")
    assert not await update(h, signed_bundle(tmp_path / "in/1", "1.0.0", priv), pub)
    assert h.steps()[-2:] == ["load_failed", "rollback_failed"]


def test_parse_command_names_what_is_wrong() -> None:
    ok = parse_command(json.dumps({"id": "a", "plugin": "glm", "bundle": "/srv/b"}).encode(), ["glm"])
    assert ok == UpdateCommand("glm", Path("/srv/b"), "a")
    for payload, message in [
        (b"{", "not JSON"),
        (b'{"plugin": "x", "bundle": "/b"}', "plugin 'x' is not configured (configured: glm)"),
        (b'{"plugin": "glm", "bundle": "rel/b"}', "bundle must be an absolute path"),
        (b'{"plugin": "glm", "bundle": "/b", "url": "http://x"}', "unknown key(s): url"),
    ]:
        with pytest.raises(UpdateError) as e:
            parse_command(payload, ["glm"])
        assert e.value.step == "command" and e.value.reason.startswith(message), e.value.reason


def test_rollback_without_a_previous_bundle_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UpdateError, match="no previous bundle"):
        ModelStore(tmp_path).rollback("glm")
