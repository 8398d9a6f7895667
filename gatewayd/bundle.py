"""Model bundles: a folder of model files plus ``manifest.json``, checked before a plugin loads it.

The manifest names the bundle (name, version, kind, quantization), lists every file in the folder
with its size and SHA-256, and may carry the JSON schema of the reading fields the model takes and
free-form figures (``extra``). :func:`verify_bundle` refuses a folder that differs from its
manifest in any way: a file missing, changed, truncated or added, a path that would leave the
folder, a symlink or special file. Verification is at load time; the folder must be writable only
by whoever deploys bundles.

Extending the format: :class:`Manifest` forbids unknown keys, so a gatewayd that predates a key
(an expiry, a minimum gatewayd version) refuses a manifest that carries it instead of silently
ignoring a constraint, and ``format_version`` above :data:`FORMAT_VERSION` is refused with its own
message. A detached signature goes in ``manifest.sig`` over the exact bytes of ``manifest.json``;
both names are left out of the file list, and ``manifest.sig`` is tolerated (not yet checked).

Standard library and pydantic only: plugin workers import this.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
#: The newest manifest format this gatewayd reads.
FORMAT_VERSION = 1

_RESERVED = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle that cannot be used; ``str()`` is ``"<folder>: <file>: <reason>"`` (file when known)."""

    def __init__(self, path: Path, reason: str, file: str | None = None) -> None:
        self.path = path  #: the bundle folder
        self.file = file  #: the file in it, as a relative POSIX path, or None for the folder itself
        self.reason = reason
        super().__init__(f"{path}: {file}: {reason}" if file is not None else f"{path}: {reason}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: Annotated[int, Field(ge=0)]


class Manifest(_Strict):
    format_version: Annotated[int, Field(ge=1)] = FORMAT_VERSION
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    #: Dotted numbers only, so that rollback checks can order versions without guessing.
    version: Annotated[str, Field(pattern=r"^[0-9]{1,9}(\.[0-9]{1,9}){0,3}$")]
    kind: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    quantization: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    #: Relative POSIX path -> entry, for every file in the folder but manifest.json and manifest.sig.
    files: Annotated[dict[str, FileEntry], Field(min_length=1)]
    #: JSON schema of the reading fields the model takes.
    input_schema: dict[str, Any] | None = None
    #: ISO 8601, UTC.
    created: str
    #: Free-form, e.g. training or evaluation figures; no gatewayd check depends on it.
    extra: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _known_format(cls, data: Any) -> Any:
        # Checked before the fields: a newer format's keys would only show up as "unknown key".
        v = data.get("format_version") if isinstance(data, dict) else None
        if isinstance(v, int) and v > FORMAT_VERSION:
            raise ValueError(
                f"format_version {v} is newer than this gatewayd reads (up to {FORMAT_VERSION}); "
                "upgrade gatewayd"
            )
        return data

    @field_validator("files")
    @classmethod
    def _paths_stay_inside(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for p in files:
            problem = _path_problem(p)
            if problem:
                raise ValueError(f"{p!r}: {problem}")
        return files

    @field_validator("created")
    @classmethod
    def _utc_timestamp(cls, v: str) -> str:
        try:
            t = datetime.fromisoformat(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an ISO 8601 timestamp") from None
        if t.utcoffset() != timedelta(0):  # None too: a naive time could be any zone
            raise ValueError(f"{v!r} is not in UTC (end it with Z or +00:00)")
        return v

    @property
    def total_size(self) -> int:
        """Bytes in all listed files."""
        return sum(f.size for f in self.files.values())


def write_manifest(
    folder: Path,
    *,
    name: str,
    version: str,
    kind: str,
    quantization: str,
    input_schema: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Hash every file under ``folder`` and write its ``manifest.json``; returns the manifest written.

    Raises BundleError for a folder that is not one, holds no files, or holds a symlink or special
    file, and for field values a manifest cannot carry (the message names the key).
    """
    folder = Path(folder)
    files = {
        rel: FileEntry(sha256=_sha256(folder, rel), size=(folder / rel).stat().st_size)
        for rel in _walk(folder)
    }
    if not files:
        raise BundleError(folder, "no files to bundle")
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        manifest = Manifest(
            name=name,
            version=version,
            kind=kind,
            quantization=quantization,
            files=files,
            input_schema=input_schema,
            created=created,
            extra=extra or {},
        )
    except ValidationError as e:
        raise BundleError(folder, _problems(e), MANIFEST_NAME) from None
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / MANIFEST_NAME)  # a reader never sees half a manifest
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def read_manifest(folder: Path) -> Manifest:
    """The folder's manifest, parsed and validated, without checking any file against it."""
    return _parse(Path(folder), _read_manifest_bytes(Path(folder)))


def verify_bundle(folder: Path) -> Manifest:
    """The manifest of a bundle whose files match it exactly; BundleError naming the file otherwise.

    Cheap checks first over all files (missing, unlisted, size), then SHA-256 in 1 MiB chunks.
    """
    folder = Path(folder)
    manifest = _parse(folder, _read_manifest_bytes(folder))
    present = set(_walk(folder))
    if missing := sorted(manifest.files.keys() - present):
        rel = missing[0]
        what = "listed in the manifest but is a directory" if (folder / rel).is_dir() else "missing"
        raise BundleError(folder, what + _more(missing, "missing"), rel)
    if added := sorted(present - manifest.files.keys()):
        raise BundleError(
            folder, "not listed in the manifest (an added file)" + _more(added, "added"), added[0]
        )
    for rel, entry in sorted(manifest.files.items()):
        size = (folder / rel).stat().st_size
        if size != entry.size:
            raise BundleError(folder, f"size mismatch (manifest {entry.size} bytes, file {size})", rel)
    for rel, entry in sorted(manifest.files.items()):
        got = _sha256(folder, rel)
        if got != entry.sha256:
            raise BundleError(
                folder, f"sha256 mismatch (manifest {entry.sha256[:12]}…, file {got[:12]}…)", rel
            )
    return manifest


def _more(paths: list[str], what: str) -> str:
    """The note on the paths after the first one reported: "; 2 more missing: a, b"."""
    rest = paths[1:]
    if not rest:
        return ""
    shown = ", ".join(rest[:3]) + (", …" if len(rest) > 3 else "")
    return f"; {len(rest)} more {what}: {shown}"


def _read_manifest_bytes(folder: Path) -> bytes:
    # Bytes, not text: a signature check will verify exactly what was parsed.
    if not folder.is_dir():
        raise BundleError(folder, "not a directory" if folder.exists() else "no such directory")
    try:
        return (folder / MANIFEST_NAME).read_bytes()
    except FileNotFoundError:
        raise BundleError(folder, "missing (not a model bundle?)", MANIFEST_NAME) from None
    except OSError as e:
        raise BundleError(folder, f"cannot read: {e.strerror}", MANIFEST_NAME) from None


def _parse(folder: Path, raw: bytes) -> Manifest:
    try:
        doc = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise BundleError(folder, f"not valid JSON: {e}", MANIFEST_NAME) from None
    if not isinstance(doc, dict):
        raise BundleError(folder, f"not a JSON object but {type(doc).__name__}", MANIFEST_NAME)
    try:
        return Manifest.model_validate(doc)
    except ValidationError as e:
        raise BundleError(folder, _problems(e), MANIFEST_NAME) from None


def _problems(e: ValidationError) -> str:
    """Pydantic's errors as "key: message; ...", with the key path dotted (files.model.onnx.sha256)."""
    out = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "missing key"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        out.append(f"{key}: {msg}" if key else msg)  # no key: a check of the whole manifest
    return "; ".join(out)


def _path_problem(p: str) -> str | None:
    """Why a manifest path is unacceptable, or None: it must be relative, normalised and inside."""
    if not p or "\\" in p or "\x00" in p:
        return "not a relative POSIX path"
    if p.startswith("/"):
        return "absolute path; paths must be relative to the bundle"
    parts = p.split("/")
    if ".." in parts:
        return "escapes the bundle folder"
    if any(part in ("", ".") for part in parts):
        return "not a normalised path (empty or '.' component)"
    if p in _RESERVED:
        return "reserved name; the manifest does not list itself or its signature"
    return None


def _walk(folder: Path) -> list[str]:
    """Every file under folder as sorted relative POSIX paths, less the reserved names.

    Symlinks and special files are refused: one could point outside the folder or change under us.
    """
    if not folder.is_dir():
        raise BundleError(folder, "not a directory" if folder.exists() else "no such directory")

    def fail(e: OSError) -> None:
        raise BundleError(folder, f"cannot list: {e.strerror}", e.filename)

    out = []
    for root, dirs, names in os.walk(folder, onerror=fail):
        base = Path(root)
        for n in sorted([*dirs, *names]):
            path = base / n
            rel = PurePosixPath(path.relative_to(folder)).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(folder, "a symlink; a bundle holds regular files only", rel)
            if n in names and not stat.S_ISREG(mode):
                raise BundleError(folder, "not a regular file", rel)
            if n in names and rel not in _RESERVED:
                out.append(rel)
    return sorted(out)


def _sha256(folder: Path, rel: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    try:
        with open(folder / rel, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    except OSError as e:
        raise BundleError(folder, f"cannot read: {e.strerror}", rel) from None
    return h.hexdigest()
