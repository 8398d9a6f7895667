"""Signed model bundles: Ed25519 over manifest.json, each refusal with its own reason, the CLI, the config."""

from __future__ import annotations

import base64
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gatewayd import cli, config
from gatewayd.bundle import (
    ENV_REQUIRE_SIGNATURE,
    ENV_TRUSTED_KEYS,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleError,
    Manifest,
    generate_keypair,
    key_id,
    load_public_key,
    read_manifest,
    sign_bundle,
    verify_bundle,
    verify_for_gateway,
    verify_signed,
    version_tuple,
    write_manifest,
)

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def make_bundle(
    folder: Path, version: str = "1.2.0", min_gatewayd: str | None = None, expires: str | None = None
) -> Manifest:
    """A two-file bundle with its manifest (and the optional min_gatewayd / expires)."""
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx-graph" * 100)
    (folder / "tok").mkdir()
    (folder / "tok" / "tokenizer.json").write_text("{}\n")
    return write_manifest(
        folder, name="glm-meter", version=version, kind="onnx", quantization="int8",
        min_gatewayd=min_gatewayd, expires=expires,
    )  # fmt: skip


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys", "vendor")


def refused(folder: Path, trusted: list[Path], **kw: Any) -> BundleError:
    with pytest.raises(BundleError) as e:
        verify_signed(folder, trusted, now=NOW, running_version="0.5.0", **kw)
    assert e.value.path == folder
    return e.value


def test_a_signed_bundle_verifies_and_the_signature_file_is_documented_json(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """manifest.sig is {"algorithm", "key_id", "signature"}; verify returns the manifest."""
    priv, pub = keys
    b = tmp_path / "b"
    m = make_bundle(b)
    kid = sign_bundle(b, priv)
    doc = json.loads((b / SIGNATURE_NAME).read_text())
    assert doc["algorithm"] == "ed25519" and doc["key_id"] == kid == key_id(load_public_key(pub))
    assert verify_signed(b, [pub], now=NOW, running_version="0.5.0") == m
    assert verify_signed(b, [pub], now=NOW, installed_version="1.1.9", running_version="0.5.0") == m
    assert verify_bundle(b) == m  # the files-only check still passes with a signature present


def test_unsigned_bundle_is_refused_when_keys_are_configured(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    b = tmp_path / "b"
    make_bundle(b)
    e = refused(b, [keys[1]])
    assert e.file == SIGNATURE_NAME and "not signed" in e.reason
    # Signatures not required (a transition): unsigned passes, but no keys at all cannot mean "required".
    assert verify_signed(b, [keys[1]], require_signature=False, now=NOW, running_version="0.5.0")
    assert "no trusted keys are configured" in refused(b, []).reason


def test_a_bad_signature_is_refused_even_when_signatures_are_optional(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    priv, pub = keys
    b = tmp_path / "b"
    make_bundle(b)
    sign_bundle(b, priv)
    doc = json.loads((b / SIGNATURE_NAME).read_text())
    sig = bytearray(base64.b64decode(doc["signature"]))
    sig[0] ^= 1
    doc["signature"] = base64.b64encode(bytes(sig)).decode()
    (b / SIGNATURE_NAME).write_text(json.dumps(doc))
    for required in (True, False):
        e = refused(b, [pub], require_signature=required)
        assert e.file == SIGNATURE_NAME and e.reason.startswith("bad signature"), e.reason
    (b / SIGNATURE_NAME).write_text("not json")
    assert refused(b, [pub]).reason.startswith("not a valid signature file")


def test_a_signature_by_an_untrusted_key_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    b = tmp_path / "b"
    make_bundle(b)
    other = Ed25519PrivateKey.generate()
    sign_bundle(b, other)
    e = refused(b, [keys[1]])
    assert e.file == SIGNATURE_NAME
    assert f"signed with key {key_id(other.public_key())}, which is not a trusted key" in e.reason
    assert verify_signed(b, [other.public_key()], now=NOW, running_version="0.5.0")


def test_tampering_after_signing_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """A changed file fails its hash; a manifest edited to match it fails the signature."""
    priv, pub = keys
    b = tmp_path / "b"
    make_bundle(b)
    sign_bundle(b, priv)
    data = bytearray((b / "model.onnx").read_bytes())
    data[5] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))
    e = refused(b, [pub])
    assert e.file == "model.onnx" and e.reason.startswith("sha256 mismatch")
    sig = (b / SIGNATURE_NAME).read_bytes()
    write_manifest(b, name="glm-meter", version="1.2.0", kind="onnx", quantization="int8")
    (b / SIGNATURE_NAME).write_bytes(sig)  # the old signature over the old manifest
    assert refused(b, [pub]).reason.startswith("bad signature")


def test_expired_bundle_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    b = tmp_path / "b"
    make_bundle(b, expires="2026-05-31T00:00:00Z")
    sign_bundle(b, priv)
    e = refused(b, [pub])
    assert e.file == MANIFEST_NAME and e.reason.startswith("expired at 2026-05-31T00:00:00Z"), e.reason
    assert verify_signed(b, [pub], now=datetime(2026, 5, 30, tzinfo=UTC), running_version="0.5.0")


def test_min_gatewayd_newer_than_this_gatewayd_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    b = tmp_path / "b"
    make_bundle(b, min_gatewayd="0.6")
    sign_bundle(b, priv)
    e = refused(b, [pub])
    assert e.reason == "needs gatewayd >= 0.6; this is gatewayd 0.5.0"
    assert verify_signed(b, [pub], now=NOW, running_version="0.6.0")
    # Default: the installed distribution's version (0.1.0 in this tree).
    with pytest.raises(BundleError, match=r"needs gatewayd >= 0\.6; this is gatewayd 0\.1"):
        verify_signed(b, [pub], now=NOW)


def test_rollback_to_an_older_or_equal_version_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    b = tmp_path / "b"
    make_bundle(b, version="1.2")
    sign_bundle(b, priv)
    for installed in ("1.2.0", "1.10"):
        e = refused(b, [pub], installed_version=installed)
        assert e.reason == f"version 1.2 is not newer than the installed {installed} (rollback refused)"
    assert version_tuple("1.10") > version_tuple("1.9") and version_tuple("1.0") == version_tuple("1")


def test_manifests_without_the_new_keys_stay_valid_and_unset_keys_are_not_written(tmp_path: Path) -> None:
    b = tmp_path / "b"
    make_bundle(b)
    doc = json.loads((b / MANIFEST_NAME).read_text())
    assert "min_gatewayd" not in doc and "expires" not in doc
    m = read_manifest(b)
    assert m.min_gatewayd is None and m.expires is None
    with pytest.raises(BundleError, match="expires: '2026-01-01T00:00:00' is not in UTC"):
        write_manifest(
            b, name="x", version="1", kind="onnx", quantization="fp32", expires="2026-01-01T00:00:00"
        )


def test_rewriting_the_manifest_drops_the_stale_signature(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    b = tmp_path / "b"
    make_bundle(b)
    sign_bundle(b, keys[0])
    write_manifest(b, name="glm-meter", version="1.3.0", kind="onnx", quantization="int8")
    assert not (b / SIGNATURE_NAME).exists()


def test_sign_refuses_a_bundle_that_does_not_match_its_manifest(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    b = tmp_path / "b"
    make_bundle(b)
    (b / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="an added file"):
        sign_bundle(b, keys[0])
    assert not (b / SIGNATURE_NAME).exists()


def test_verify_for_gateway_reads_the_policy_the_daemon_exports(
    tmp_path: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    b = tmp_path / "b"
    make_bundle(b)
    cfg = config.parse(f'[models]\ntrusted_keys = ["{keys[1]}"]\n', "gw.toml")
    for k, v in cfg.models.environ().items():
        monkeypatch.setenv(k, v)
    assert os.environ[ENV_REQUIRE_SIGNATURE] == "1" and os.environ[ENV_TRUSTED_KEYS] == str(keys[1])
    with pytest.raises(BundleError, match="not signed"):
        verify_for_gateway(b)
    sign_bundle(b, keys[0])
    assert verify_for_gateway(b).version == "1.2.0"
    with pytest.raises(BundleError, match="rollback refused"):
        verify_for_gateway(b, installed_version="1.2.0")
    monkeypatch.delenv(ENV_TRUSTED_KEYS)
    monkeypatch.delenv(ENV_REQUIRE_SIGNATURE)
    assert verify_for_gateway(b).version == "1.2.0"  # no policy: files and constraints only


def test_config_checks_trusted_keys_with_file_line_key(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    text = f'[gateway]\nid = "gw1"\n\n[models]\ntrusted_keys = ["{keys[1]}", "{bad}"]\n'
    with pytest.raises(config.ConfigError) as e:
        config.parse(text, "gw.toml")
    assert e.value.problems == [
        f"gw.toml:5: models.trusted_keys.1: Value error, {bad} is not a PEM public key"
    ]
    with pytest.raises(config.ConfigError) as e:
        config.parse("[models]\nrequire_signature = true\n", "gw.toml")
    assert e.value.problems[0].startswith("gw.toml:1: models: Value error, require_signature = true needs")
    assert config.parse("", "gw.toml").models.signature_required() is False
    opt = config.parse(f'[models]\ntrusted_keys = ["{keys[1]}"]\nrequire_signature = false\n', "gw.toml")
    assert opt.models.signature_required() is False


def test_cli_keygen_sign_verify_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit codes: 0 ok; 1 refused (unsigned, untrusted, tampered, rollback); 2 bad key or folder."""
    kd = tmp_path / "keys"
    assert cli.main(["models", "keygen", "--out", str(kd), "--name", "vendor"]) == 0
    priv, pub = kd / "vendor.pem", kd / "vendor.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert cli.main(["models", "keygen", "--out", str(kd), "--name", "vendor"]) == 2  # never overwrites
    b = tmp_path / "b"
    b.mkdir()
    (b / "model.onnx").write_bytes(b"m" * 64)
    rc = cli.main(
        ["models", "bundle", str(b), "--name", "m", "--version", "2.0.0", "--kind", "onnx",
         "--quantization", "fp32", "--min-gatewayd", "0.1", "--expires", "2999-01-01T00:00:00Z"]
    )  # fmt: skip
    assert rc == 0
    capsys.readouterr()
    assert cli.main(["models", "verify", str(b), "--trusted-key", str(pub)]) == 1
    assert "not signed" in capsys.readouterr().err
    assert cli.main(["models", "sign", str(b), "--key", str(priv)]) == 0
    assert cli.main(["models", "verify", str(b), "--trusted-key", str(pub)]) == 0
    assert "ok m 2.0.0 fp32" in capsys.readouterr().out
    assert cli.main(["models", "verify", str(b), "--trusted-key", str(pub), "--installed", "2.0"]) == 1
    assert "rollback refused" in capsys.readouterr().err
    generate_keypair(tmp_path / "other")
    assert cli.main(["models", "verify", str(b), "--trusted-key", str(tmp_path / "other/signing.pub")]) == 1
    assert "not a trusted key" in capsys.readouterr().err
    assert cli.main(["models", "verify", str(b), "--trusted-key", str(priv)]) == 2  # a private key
    assert cli.main(["models", "sign", str(b), "--key", str(pub)]) == 2
    (b / "model.onnx").write_bytes(b"n" * 64)
    assert cli.main(["models", "verify", str(b), "--trusted-key", str(pub)]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
    assert cli.main(["models", "sign", str(b), "--key", str(priv)]) == 1  # won't sign a tampered bundle
