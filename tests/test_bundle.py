"""Model bundles: manifest.json written over a folder, and every way a folder can fail to match it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from gatewayd import cli
from gatewayd import convert as conv
from gatewayd.bundle import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleError,
    Manifest,
    read_manifest,
    verify_bundle,
    write_manifest,
)

SCHEMA = {"type": "object", "properties": {"temp_c": {"type": "number"}}, "required": ["temp_c"]}


def make_bundle(folder: Path) -> Manifest:
    """A small genai-like folder, one file in a subfolder, with its manifest."""
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx-graph" * 100)
    (folder / "model.onnx.data").write_bytes(bytes(range(256)) * 4096)  # 1 MiB: more than one chunk
    (folder / "genai_config.json").write_text('{"model": {"type": "chatglm"}}\n')
    (folder / "tok").mkdir()
    (folder / "tok" / "tokenizer.json").write_text("{}\n")
    return write_manifest(
        folder, name="glm-meter", version="1.0.0", kind="onnxruntime-genai", quantization="int8",
        input_schema=SCHEMA, extra={"eval_accuracy": 0.97},
    )  # fmt: skip


def edit_manifest(folder: Path, change: dict[str, Any]) -> None:
    doc = json.loads((folder / MANIFEST_NAME).read_text())
    doc.update(change)
    (folder / MANIFEST_NAME).write_text(json.dumps(doc))


def refusal(folder: Path) -> BundleError:
    with pytest.raises(BundleError) as e:
        verify_bundle(folder)
    assert e.value.path == folder and str(e.value).startswith(f"{folder}: ")
    return e.value


def test_written_manifest_lists_every_file_and_verifies(tmp_path: Path) -> None:
    """Sorted relative POSIX paths with size and SHA-256; the file on disk is stable, sorted JSON."""
    b = tmp_path / "b"
    m = make_bundle(b)
    assert list(m.files) == ["genai_config.json", "model.onnx", "model.onnx.data", "tok/tokenizer.json"]
    assert m.files["model.onnx.data"].size == 1 << 20
    assert m.total_size == 1000 + (1 << 20) + 31 + 3  # the four files' bytes
    assert m.format_version == FORMAT_VERSION and m.created.endswith("Z") and m.input_schema == SCHEMA
    text = (b / MANIFEST_NAME).read_text()
    assert text.endswith("}\n") and text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert verify_bundle(b) == m == read_manifest(b)
    (b / SIGNATURE_NAME).write_bytes(b"sig")  # reserved for signatures: neither listed nor refused
    assert verify_bundle(b) == m
    assert write_manifest(b, name="x", version="2", kind="onnx", quantization="fp32").files == m.files


def test_a_changed_byte_of_the_same_size_is_a_sha256_mismatch(tmp_path: Path) -> None:
    b = tmp_path / "b"
    make_bundle(b)
    data = bytearray((b / "model.onnx.data").read_bytes())
    data[-1] ^= 1
    (b / "model.onnx.data").write_bytes(bytes(data))
    e = refusal(b)
    assert e.file == "model.onnx.data" and e.reason.startswith("sha256 mismatch (manifest ")
    assert f"{b}: model.onnx.data: sha256 mismatch" in str(e)


def test_a_truncated_file_is_a_size_mismatch(tmp_path: Path) -> None:
    b = tmp_path / "b"
    make_bundle(b)
    os.truncate(b / "model.onnx", 10)
    e = refusal(b)
    assert e.file == "model.onnx" and e.reason == "size mismatch (manifest 1000 bytes, file 10)"


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    b = tmp_path / "b"
    make_bundle(b)
    (b / "tok" / "tokenizer.json").unlink()
    e = refusal(b)
    assert e.file == "tok/tokenizer.json" and e.reason == "missing"


def test_an_added_file_is_refused(tmp_path: Path) -> None:
    """Someone dropped files in: refused, the first named and the count of the rest."""
    b = tmp_path / "b"
    make_bundle(b)
    (b / "evil.onnx").write_bytes(b"x")
    (b / "tok" / "more.json").write_text("{}")
    e = refusal(b)
    assert e.file == "evil.onnx" and "not listed in the manifest" in e.reason
    assert e.reason.endswith("; 1 more added: tok/more.json")


def test_a_symlink_in_the_bundle_is_refused(tmp_path: Path) -> None:
    b = tmp_path / "b"
    make_bundle(b)
    (tmp_path / "outside").write_text("x")
    (b / "link").symlink_to(tmp_path / "outside")
    e = refusal(b)
    assert e.file == "link" and "symlink" in e.reason


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": "latest"}, "version: String should match pattern"),
        ({"size_mb": 3}, "size_mb: unknown key"),
        ({"created": "2026-01-01T00:00:00"}, "created: '2026-01-01T00:00:00' is not in UTC"),
        ({"format_version": 2}, "format_version 2 is newer than this gatewayd reads (up to 1)"),
        ({"files": {"model.onnx": {"sha256": "ab", "size": 1}}}, "files.model.onnx.sha256: String should"),
        ({"files": {"../x": {"sha256": "0" * 64, "size": 1}}}, "files: '../x': escapes the bundle folder"),
        ({"files": {"/etc/passwd": {"sha256": "0" * 64, "size": 1}}}, "files: '/etc/passwd': absolute path"),
        ({"files": {"a/./b": {"sha256": "0" * 64, "size": 1}}}, "files: 'a/./b': not a normalised path"),
    ],
)
def test_an_invalid_manifest_names_the_key(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    b = tmp_path / "b"
    make_bundle(b)
    edit_manifest(b, change)
    e = refusal(b)
    assert e.file == MANIFEST_NAME and e.reason.startswith(message), e.reason


def test_a_missing_key_or_broken_json(tmp_path: Path) -> None:
    b = tmp_path / "b"
    make_bundle(b)
    doc = json.loads((b / MANIFEST_NAME).read_text())
    del doc["name"]
    (b / MANIFEST_NAME).write_text(json.dumps(doc))
    assert refusal(b).reason == "name: missing key"
    (b / MANIFEST_NAME).write_text("{not json")
    assert refusal(b).reason.startswith("not valid JSON: ")
    (b / MANIFEST_NAME).write_text("[]")
    assert refusal(b).reason == "not a JSON object but list"


def test_a_folder_without_manifest_is_not_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    e = refusal(tmp_path)
    assert e.file == MANIFEST_NAME and e.reason.startswith("missing")
    with pytest.raises(BundleError, match="no such directory"):
        verify_bundle(tmp_path / "nope")


def test_write_manifest_refuses_bad_fields_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no files to bundle"):
        write_manifest(tmp_path, name="a", version="1", kind="onnx", quantization="fp32")
    (tmp_path / "m.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"manifest.json: name: String should match pattern"):
        write_manifest(tmp_path, name="a b", version="1", kind="onnx", quantization="fp32")
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_cli_bundle_then_verify_then_tamper(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 0 for a bundle that matches, 1 with the reason on stderr after a change, 2 for bad input."""
    b = tmp_path / "b"
    b.mkdir()
    (b / "model.onnx").write_bytes(b"\0" * 2_500_000)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    rc = cli.main(
        ["models", "bundle", str(b), "--name", "anomaly", "--version", "1.2.0", "--kind", "onnx",
         "--quantization", "fp32", "--input-schema", str(schema)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "anomaly 1.2.0 (onnx, fp32)" in out and "1 files, 2.5 MB" in out
    assert read_manifest(b).input_schema == SCHEMA

    assert cli.main(["models", "verify", str(b)]) == 0
    assert capsys.readouterr().out == "ok anomaly 1.2.0 fp32, 1 files, 2.5 MB\n"

    (b / "model.onnx").write_bytes(b"\1" * 2_500_000)
    assert cli.main(["models", "verify", str(b)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"gatewayd models verify: {b}: model.onnx: sha256 mismatch (manifest ")

    assert cli.main(["models", "verify", str(tmp_path / "nope")]) == 2
    assert "gatewayd models verify: " in capsys.readouterr().err
    schema.write_text("[1]")
    rc = cli.main(
        ["models", "bundle", str(b), "--name", "a", "--version", "1", "--kind", "onnx", "--quantization",
         "fp32", "--input-schema", str(schema)]
    )  # fmt: skip
    assert rc == 2 and "--input-schema" in capsys.readouterr().err


def test_cli_convert_bundles_what_the_converter_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The converter's refusal and a missing 'models' extra exit 2 with the reason on stderr; what it
    wrote (stubbed: torch is slow) gets a manifest with the precision."""
    none = tmp_path / "none"
    assert cli.main(["models", "convert", str(none), str(tmp_path / "o"), "--precision", "fp32"]) == 2
    assert capsys.readouterr().err == f"gatewayd models convert: checkpoint {none}: not a directory\n"

    calls: list[tuple[Path, Path, str]] = []

    def fake_convert(checkpoint: Path, out: Path, precision: str) -> Path:
        calls.append((checkpoint, out, precision))
        out.mkdir()
        (out / "model.onnx").write_bytes(b"m")
        (out / "genai_config.json").write_text("{}")
        return out

    monkeypatch.setattr(conv, "convert", fake_convert)
    out = tmp_path / "glm-int4"
    assert cli.main(["models", "convert", str(tmp_path), str(out), "--precision", "int4"]) == 0
    assert calls == [(tmp_path, out, "int4")]
    m = verify_bundle(out)
    assert (m.name, m.version, m.kind, m.quantization) == ("glm-int4", "1.0.0", "onnxruntime-genai", "int4")
    assert "2 files" in capsys.readouterr().out

    def without_genai(checkpoint: Path, out: Path, precision: str) -> Path:
        raise ModuleNotFoundError("No module named 'onnxruntime_genai'")

    monkeypatch.setattr(conv, "convert", without_genai)
    assert cli.main(["models", "convert", str(tmp_path), str(tmp_path / "o"), "--precision", "fp32"]) == 2
    assert "gatewayd models convert: needs the 'models' extra" in capsys.readouterr().err
