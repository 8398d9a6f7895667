"""Model bundles: a folder of model files plus ``manifest.json``, checked before a plugin loads it.

The manifest names the bundle (name, version, kind, quantization), lists every file in the folder
with its size and SHA-256, and may carry the JSON schema of the reading fields the model takes and
free-form figures (``extra``). :func:`verify_bundle` refuses a folder that differs from its
manifest in any way: a file missing, changed, truncated or added, a path that would leave the
folder, a symlink or special file. Verification is at load time; the folder must be writable only
by whoever deploys bundles.

Extending the format: :class:`Manifest` forbids unknown keys, so a gatewayd that predates a key
refuses a manifest that carries it instead of silently ignoring a constraint, and
``format_version`` above :data:`FORMAT_VERSION` is refused with its own message. The optional
constraints ``min_gatewayd`` and ``expires`` are written only when set, so a manifest without
them stays readable by a gatewayd that predates them.

Signatures: ``manifest.sig`` is a small JSON object ``{"algorithm": "ed25519", "key_id": ...,
"signature": <base64>}``, a detached Ed25519 signature over the exact bytes of ``manifest.json``
(which in turn pins every file's SHA-256). ``key_id`` is :func:`key_id` of the signer's public
key: the first 16 hex digits of the SHA-256 of its raw 32 bytes; it only picks the key, trust
comes from the key being configured. :func:`verify_bundle` checks files only and tolerates a
``manifest.sig``; :func:`verify_signed` adds the signature and the update policy (expiry,
minimum gatewayd version, rollback), and :func:`verify_for_gateway` reads the daemon's policy
from the environment a plugin worker inherits.

Standard library, pydantic and ``cryptography`` (imported only when signing or checking a
signature): plugin workers import this.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gatewayd import jsonfile

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
#: The newest manifest format this gatewayd reads.
FORMAT_VERSION = 1

_RESERVED = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
_CHUNK = 1 << 20
_VERSION = r"^[0-9]{1,9}(\.[0-9]{1,9}){0,3}$"
#: Environment a plugin worker inherits from the daemon: trusted public key files (os.pathsep
#: separated) and "1"/"0" for whether a signature is required (see :func:`verify_for_gateway`).
ENV_TRUSTED_KEYS = "GATEWAYD_MODELS_TRUSTED_KEYS"
ENV_REQUIRE_SIGNATURE = "GATEWAYD_MODELS_REQUIRE_SIGNATURE"


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
    version: Annotated[str, Field(pattern=_VERSION)]
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
    #: The oldest gatewayd (dotted numbers) that may load the bundle.
    min_gatewayd: Annotated[str | None, Field(pattern=_VERSION)] = None
    #: ISO 8601, UTC: the bundle is refused from this moment on.
    expires: str | None = None

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

    @field_validator("created", "expires")
    @classmethod
    def _utc_timestamp(cls, v: str | None) -> str | None:
        if v is None:
            return v
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

    def expires_at(self) -> datetime | None:
        return None if self.expires is None else datetime.fromisoformat(self.expires)


def write_manifest(
    folder: Path,
    *,
    name: str,
    version: str,
    kind: str,
    quantization: str,
    input_schema: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    min_gatewayd: str | None = None,
    expires: str | None = None,
) -> Manifest:
    """Hash every file under ``folder`` and write its ``manifest.json``; returns the manifest written.

    Raises BundleError for a folder that is not one, holds no files, or holds a symlink or special
    file, and for field values a manifest cannot carry (the message names the key). A signature
    left from before is removed: it was over the old manifest.
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
            min_gatewayd=min_gatewayd,
            expires=expires,
        )
    except ValidationError as e:
        raise BundleError(folder, _problems(e), MANIFEST_NAME) from None
    doc = manifest.model_dump(mode="json")
    for key in ("min_gatewayd", "expires"):  # unset: left out, so older gatewayds still read it
        if doc[key] is None:
            del doc[key]
    (folder / SIGNATURE_NAME).unlink(missing_ok=True)
    jsonfile.write(folder / MANIFEST_NAME, doc, sort_keys=True)
    return manifest


def read_manifest(folder: Path) -> Manifest:
    """The folder's manifest, parsed and validated, without checking any file against it."""
    folder = Path(folder)
    return _parse(folder, _read_manifest_bytes(folder))


def verify_bundle(folder: Path) -> Manifest:
    """The manifest of a bundle whose files match it exactly; BundleError naming the file otherwise.

    Cheap checks first over all files (missing, unlisted, size), then SHA-256 in 1 MiB chunks.
    No signature or policy check: see :func:`verify_signed`.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    _verify_files(folder, manifest)
    return manifest


def _verify_files(folder: Path, manifest: Manifest) -> None:
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


# --- signatures and update policy -------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key's id in ``manifest.sig``: 16 hex digits of the SHA-256 of its raw 32 bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file; ValueError saying why not."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError:
        raise ValueError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is a {type(key).__name__}, not an Ed25519 public key")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from an unencrypted PEM file; ValueError saying why not."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, TypeError):  # TypeError: the key is encrypted
        raise ValueError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is a {type(key).__name__}, not an Ed25519 private key")
    return key


def generate_keypair(out: Path, name: str = "signing") -> tuple[Path, Path]:
    """Write ``NAME.pem`` (private, PKCS#8, mode 0600) and ``NAME.pub`` into ``out``; refuses to
    overwrite either (FileExistsError). Returns both paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.pem", out / f"{name}.pub"
    if pub_path.exists():
        raise FileExistsError(f"{pub_path} exists; not overwriting a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # O_EXCL with the mode set at creation: the key is never readable by others, not even briefly.
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv_path, pub_path


def sign_bundle(folder: Path, private_key: Path | Ed25519PrivateKey) -> str:
    """Check the bundle's files, then write ``manifest.sig`` over its manifest; returns the key id.

    Files are checked first: a signature vouches for the files, so a folder that no longer matches
    its manifest is refused (BundleError) rather than signed.
    """
    folder = Path(folder)
    if isinstance(private_key, Path | str):
        private_key = load_private_key(Path(private_key))
    raw = _read_manifest_bytes(folder)
    _verify_files(folder, _parse(folder, raw))
    kid = key_id(private_key.public_key())
    signature = base64.b64encode(private_key.sign(raw)).decode("ascii")
    jsonfile.write(
        folder / SIGNATURE_NAME,
        {"algorithm": "ed25519", "key_id": kid, "signature": signature},
        sort_keys=True,
    )
    return kid


def version_tuple(v: str) -> tuple[int, ...]:
    """Dotted numbers as a tuple for ordering, trailing zeros dropped ("1.0" == "1"); the numeric
    prefix only, so a development version like "0.2.0.dev1" orders as 0.2.0."""
    parts: list[int] = []
    for p in v.split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def gatewayd_version() -> str:
    """The running gatewayd's version: the installed distribution's, else the package's."""
    from importlib import metadata

    try:
        return metadata.version("gatewayd")
    except metadata.PackageNotFoundError:  # running from a source tree
        from gatewayd import __version__

        return __version__


def verify_signed(
    folder: Path,
    trusted_keys: Iterable[Path | Ed25519PublicKey],
    *,
    require_signature: bool = True,
    now: datetime | None = None,
    installed_version: str | None = None,
    running_version: str | None = None,
) -> Manifest:
    """:func:`verify_bundle` plus signature and update policy; BundleError with a distinct reason.

    In order: the signature over the exact manifest bytes (unsigned when required; unreadable;
    signed by a key not in ``trusted_keys``; not matching), then the manifest, its expiry (against
    ``now``, default the current time), ``min_gatewayd`` (against ``running_version``, default
    :func:`gatewayd_version`), rollback (version not above ``installed_version``, when given), and
    last the files. Without ``require_signature`` an unsigned bundle passes, but a signature that is
    there is still checked whenever keys are given: a bad one is never ignored.
    """
    folder = Path(folder)
    keys = {key_id(k): k for k in (_as_public_key(k) for k in trusted_keys)}
    if require_signature and not keys:
        raise BundleError(folder, "a signature is required but no trusted keys are configured")
    raw = _read_manifest_bytes(folder)  # once: the bytes checked are the bytes parsed
    if keys:
        _check_signature(folder, raw, keys, require_signature)
    manifest = _parse(folder, raw)
    now = now or datetime.now(UTC)
    if (expires := manifest.expires_at()) is not None and now >= expires:
        raise BundleError(
            folder, f"expired at {manifest.expires} (now {now.strftime('%Y-%m-%dT%H:%M:%SZ')})", MANIFEST_NAME
        )
    running = running_version or gatewayd_version()
    if manifest.min_gatewayd is not None and version_tuple(running) < version_tuple(manifest.min_gatewayd):
        raise BundleError(
            folder, f"needs gatewayd >= {manifest.min_gatewayd}; this is gatewayd {running}", MANIFEST_NAME
        )
    if installed_version is not None and version_tuple(manifest.version) <= version_tuple(installed_version):
        raise BundleError(
            folder,
            f"version {manifest.version} is not newer than the installed {installed_version} "
            "(rollback refused)",
            MANIFEST_NAME,
        )
    _verify_files(folder, manifest)
    return manifest


def verify_for_gateway(
    folder: Path, installed_version: str | None = None, *, now: datetime | None = None
) -> Manifest:
    """:func:`verify_signed` under the daemon's ``[models]`` policy, for a plugin loading a bundle.

    The daemon exports ``[models] trusted_keys`` and ``require_signature`` to its workers'
    environment (:data:`ENV_TRUSTED_KEYS`, :data:`ENV_REQUIRE_SIGNATURE`); a key file that cannot
    be loaded is a BundleError naming it.
    """
    paths = [Path(p) for p in os.environ.get(ENV_TRUSTED_KEYS, "").split(os.pathsep) if p]
    required = os.environ.get(ENV_REQUIRE_SIGNATURE, "1" if paths else "0") == "1"
    keys = []
    for p in paths:
        try:
            keys.append(load_public_key(p))
        except ValueError as e:
            raise BundleError(Path(folder), f"trusted key: {e}") from None
    return verify_signed(
        folder, keys, require_signature=required, now=now, installed_version=installed_version
    )


def _as_public_key(k: Path | Ed25519PublicKey) -> Ed25519PublicKey:
    return load_public_key(k) if isinstance(k, Path | str) else k


def _check_signature(folder: Path, raw: bytes, keys: Mapping[str, Ed25519PublicKey], required: bool) -> None:
    from cryptography.exceptions import InvalidSignature

    try:
        sig_raw = (folder / SIGNATURE_NAME).read_bytes()
    except FileNotFoundError:
        if not required:
            return
        raise BundleError(
            folder, "missing: the bundle is not signed and this gateway requires a signature", SIGNATURE_NAME
        ) from None
    except OSError as e:
        raise BundleError(folder, f"cannot read: {e.strerror}", SIGNATURE_NAME) from None
    try:
        doc = json.loads(sig_raw)
        if not isinstance(doc, dict) or doc.get("algorithm") != "ed25519":
            raise ValueError('not {"algorithm": "ed25519", ...}')
        kid, sig = doc["key_id"], base64.b64decode(doc["signature"], validate=True)
        if not isinstance(kid, str):
            raise ValueError("key_id is not a string")
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise BundleError(folder, f"not a valid signature file: {e}", SIGNATURE_NAME) from None
    key = keys.get(kid)
    if key is None:
        raise BundleError(
            folder,
            f"signed with key {kid}, which is not a trusted key (trusted: {', '.join(sorted(keys))})",
            SIGNATURE_NAME,
        )
    try:
        key.verify(sig, raw)
    except InvalidSignature:
        raise BundleError(
            folder,
            f"bad signature: does not match {MANIFEST_NAME} under key {kid} (changed after signing?)",
            SIGNATURE_NAME,
        ) from None


def _more(paths: list[str], what: str) -> str:
    """The note on the paths after the first one reported: "; 2 more missing: a, b"."""
    rest = paths[1:]
    if not rest:
        return ""
    shown = ", ".join(rest[:3]) + (", …" if len(rest) > 3 else "")
    return f"; {len(rest)} more {what}: {shown}"


def _read_manifest_bytes(folder: Path) -> bytes:
    # Bytes, not text: a signature check will verify exactly what was parsed.
    _require_dir(folder)
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


def _require_dir(folder: Path) -> None:
    if not folder.is_dir():
        raise BundleError(folder, "not a directory" if folder.exists() else "no such directory")


def _walk(folder: Path) -> list[str]:
    """Every file under folder as sorted relative POSIX paths, less the reserved names.

    Symlinks and special files are refused: one could point outside the folder or change under us.
    """
    _require_dir(folder)

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
