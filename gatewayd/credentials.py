"""OSCORE credentials files, in aiocoap's format: read and check them, and provision a node.

The gateway's credentials map (JSON) names one security context directory per node; its label,
without the colon, is the node id the context authenticates (``[security] identities`` maps other
labels)::

    {":pump-1": {"oscore": {"basedir": "contexts/pump-1/"}}}

A context directory holds ``settings.json`` (sender and recipient IDs), ``secret.json`` (master
secret and salt) and, once used, ``sequence.json`` and ``lock``: aiocoap writes the sequence numbers
and the replay window there, so the directory must be writable. Relative ``basedir`` values are
taken relative to the credentials file (aiocoap's own tools take them relative to the working
directory). This module never imports aiocoap's OSCORE code: ``check-config`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatewayd import jsonfile
from gatewayd.intake import NODE_ID

#: Files in a context directory that carry its parameters (aiocoap reads both, "secret.json" singular).
SETTINGS, SECRET, SEQUENCE = "settings.json", "secret.json", "sequence.json"
#: The node's side of a provisioned pair: its credentials map and context directory, in one folder.
NODE_MAP, NODE_CONTEXT = "credentials.json", "context"


class CredentialsError(ValueError):
    """A credentials map or context directory gatewayd cannot use; the message says which and why."""


@dataclass(frozen=True)
class Entry:
    """One security context of the gateway's map: its label, the node it authenticates, its directory."""

    label: str
    node: str
    basedir: Path


def _read_map(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CredentialsError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CredentialsError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise CredentialsError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CredentialsError(f"{path}: a credentials map is a JSON object of label -> entry")
    return data


def read(path: Path, identities: Mapping[str, str] | None = None) -> list[Entry]:
    """The OSCORE contexts a gateway's credentials map names, or CredentialsError.

    String entries (aiocoap's references, a client-side notion) are skipped; anything but
    ``{"oscore": {"basedir": ...}}`` is refused rather than ignored.
    """
    entries = _entries(path, _read_map(path), identities or {})
    for e in entries:
        check_dir(e)
    return entries


def _entries(path: Path, data: dict[str, Any], identities: Mapping[str, str]) -> list[Entry]:
    """The entries of the map ``data`` read from ``path``; their directories not checked."""
    entries = []
    for label, value in data.items():
        if isinstance(value, str):
            continue
        if not (isinstance(value, dict) and list(value) == ["oscore"] and isinstance(value["oscore"], dict)):
            kind = ", ".join(value) if isinstance(value, dict) else type(value).__name__
            raise CredentialsError(f"{path}: {label!r}: only 'oscore' entries are supported (found {kind})")
        basedir = value["oscore"].get("basedir")
        if not isinstance(basedir, str) or set(value["oscore"]) != {"basedir"}:
            raise CredentialsError(f'{path}: {label!r}: an oscore entry is {{"basedir": "DIR"}}')
        node = identities.get(label) or label.removeprefix(":")
        if not NODE_ID.match(node):
            raise CredentialsError(
                f"{path}: label {label!r} is not ':' + a node id; map it to one in security.identities"
            )
        entries.append(Entry(label, node, (path.parent / basedir).resolve()))
    missing = sorted(set(identities) - set(data))
    if missing:
        raise CredentialsError(
            f"{path}: security.identities names labels not in the map: {', '.join(missing)}"
        )
    return entries


def check_dir(entry: Entry) -> None:
    d = entry.basedir
    if not d.is_dir():
        raise CredentialsError(f"{entry.label}: context directory {d} does not exist")
    if not ((d / SETTINGS).is_file() or (d / SECRET).is_file()):
        raise CredentialsError(f"{entry.label}: {d} holds neither {SETTINGS} nor {SECRET}")
    if not os.access(d, os.W_OK | os.X_OK):
        # aiocoap replaces sequence.json atomically (a new file) and creates its lock file there.
        raise CredentialsError(f"{entry.label}: {d} is not writable; OSCORE keeps its sequence numbers there")


# -- provisioning --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provisioned:
    node: str
    #: The gateway's credentials map (``[security] oscore_credentials``) and the node's context in it.
    gateway_map: Path
    gateway_context: Path
    #: The node's folder: its credentials map (``credentials.json``) and its context (``context/``).
    node_dir: Path
    recipient_id: bytes


def _recipient_ids(entries: list[Entry]) -> set[bytes]:
    used = set()
    for e in entries:
        for name in (SETTINGS, SECRET):
            try:
                data = json.loads((e.basedir / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("recipient-id_hex"), str):
                used.add(bytes.fromhex(data["recipient-id_hex"]))
    return used


def _id(n: int) -> bytes:
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")


def _write_context(d: Path, sender_id: bytes, recipient_id: bytes, secret: bytes, salt: bytes) -> None:
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A new key starts a new sequence: the old numbers (and lock) belong to the old key.
    for stale in (SEQUENCE, "lock"):
        (d / stale).unlink(missing_ok=True)
    jsonfile.write(d / SETTINGS, {"sender-id_hex": sender_id.hex(), "recipient-id_hex": recipient_id.hex()})
    jsonfile.write(d / SECRET, {"secret_hex": secret.hex(), "salt_hex": salt.hex()}, mode=0o600)


def provision(
    node: str,
    directory: Path,
    *,
    node_dir: Path | None = None,
    gateway: str = "coap://*",
    force: bool = False,
) -> Provisioned:
    """Create an OSCORE context pair for ``node``: the gateway's side under ``directory`` (added to its
    ``credentials.json``) and the node's side in ``node_dir`` (default ``directory/nodes/NODE``).

    The gateway's recipient ID for the node is the smallest unused one (1 byte up to 255 nodes):
    it travels in every request. The gateway's own sender ID is empty. ``force`` re-keys a node
    that is already provisioned (same ID, new secret, fresh sequence numbers).
    """
    if not NODE_ID.match(node):
        raise CredentialsError(f"{node!r} is not a node id (1-64 characters of A-Z a-z 0-9 _ . -)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    gateway_map = directory / "credentials.json"
    data = _read_map(gateway_map) if gateway_map.exists() else {}
    entries = _entries(gateway_map, data, {})
    label = f":{node}"
    mine = [e for e in entries if e.label == label]
    if mine and not force:
        raise CredentialsError(f"{node} is already provisioned in {gateway_map} (--force re-keys it)")
    context = mine[0].basedir if mine else directory / "contexts" / node
    own = _recipient_ids(mine)
    if own:
        recipient_id = next(iter(own))
    else:
        used = _recipient_ids(entries)
        recipient_id = next(_id(i) for i in range(1, 1 << 56) if _id(i) not in used)
    secret, salt = secrets.token_bytes(16), secrets.token_bytes(8)
    _write_context(context, b"", recipient_id, secret, salt)
    node_dir = node_dir if node_dir is not None else directory / "nodes" / node
    _write_context(node_dir / NODE_CONTEXT, recipient_id, b"", secret, salt)
    jsonfile.write(
        node_dir / NODE_MAP, {f"{gateway.rstrip('/')}/*": {"oscore": {"basedir": f"{NODE_CONTEXT}/"}}}
    )
    if not mine:
        rel = os.path.relpath(context, directory)
        data[label] = {"oscore": {"basedir": f"{rel}/"}}
        jsonfile.write(gateway_map, data)
    return Provisioned(node, gateway_map, context, node_dir, recipient_id)


def client_map(path: Path) -> dict[str, Any]:
    """A node's credentials map for ``Context.client_credentials.load_from_dict``, with its relative
    ``basedir`` values taken relative to the file (aiocoap would take them from the working directory)."""
    data = _read_map(path)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(value.get("oscore"), dict) and "basedir" in value["oscore"]:
            value = {"oscore": {**value["oscore"], "basedir": str(path.parent / value["oscore"]["basedir"])}}
        out[key] = value
    return out


# -- `gatewayd nodes provision` (its arguments are defined in gatewayd.cli) ---------------------------


def cli(args: argparse.Namespace) -> int:
    try:
        done = provision(args.node, args.dir, node_dir=args.node_dir, gateway=args.gateway, force=args.force)
    except (CredentialsError, OSError) as e:
        print(f"gatewayd nodes provision: {e}", file=sys.stderr)
        return 1
    print(f"{done.node}: recipient ID {done.recipient_id.hex()}")
    print(f"  gateway side: {done.gateway_context} (in {done.gateway_map})")
    print(f"  node side:    {done.node_dir} (move it to the node; never use a copy of it twice)")
    print(f"config: [security] oscore_credentials = {json.dumps(str(done.gateway_map.resolve()))}")
    print("restart gatewayd to load it")
    return 0
