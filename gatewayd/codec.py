"""Decode CoAP bodies (CBOR maps, SenML-CBOR packs, JPEG/PNG frames) into reading drafts.

A draft is what a node said, before the store gives it an id. Bad input raises
:class:`~gatewayd.errors.BadPayload`, which becomes 4.00 with a diagnostic.

A camera frame is a reading too: a bare JPEG (Content-Format 22) or PNG (23)
body becomes the fields ``image`` (the bytes) and ``format`` ("jpeg"/"png"); a
CBOR map may carry the same ``image`` byte string next to its own metadata
fields. Either way the bytes are checked to be a whole JPEG or PNG (signature
and end marker: a truncated upload is 4.00 here, not a puzzle for a plugin).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from gatewayd.errors import BadPayload, UnsupportedFormat
from gatewayd.plugin_api import FieldValue

CF_JPEG = 22
CF_PNG = 23
CF_CBOR = 60
CF_SENML_CBOR = 112
SUPPORTED_FORMATS = (CF_CBOR, CF_SENML_CBOR, CF_JPEG, CF_PNG)
_IMAGE_FORMATS = {CF_JPEG: "jpeg", CF_PNG: "png"}

# RFC 8428 §6 integer labels used by SenML-CBOR.
_BN, _BT, _BU, _BV, _BS, _BVER = -2, -3, -4, -5, -6, -1
_N, _U, _V, _VS, _VB, _S, _T, _UT, _VD = 0, 1, 2, 3, 4, 5, 6, 7, 8
_SENML_LABELS = {_BN, _BT, _BU, _BV, _BS, _BVER, _N, _U, _V, _VS, _VB, _S, _T, _UT, _VD}
# RFC 8428 §4.5.3: times below 2**28 are relative to "now".
_RELATIVE_TIME_LIMIT = 2**28

#: The CBOR map key a node may use for its own measurement time (Unix seconds).
TIME_KEY = "t"
#: The field holding a camera frame (JPEG or PNG bytes), and the one naming its format.
IMAGE_KEY = "image"
FORMAT_KEY = "format"
_JPEG_START, _JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"  # SOI + the next marker's 0xFF, and EOI
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last 8 bytes of every PNG
MAX_FIELDS = 256
MAX_NAME_LEN = 128


@dataclass(slots=True)
class Draft:
    """One reading as decoded, before it is stored."""

    ts: float
    fields: dict[str, FieldValue]
    units: dict[str, str] = field(default_factory=dict)


def decode(content_format: int | None, body: bytes, now: float | None = None) -> list[Draft]:
    """Decode a POST body into one or more drafts, or raise a typed request error."""
    if content_format not in SUPPORTED_FORMATS:
        raise UnsupportedFormat(
            f"content-format {content_format} not accepted; "
            "use 60 (cbor), 112 (senml+cbor), 22 (image/jpeg) or 23 (image/png)"
        )
    now = time.time() if now is None else now
    if content_format in _IMAGE_FORMATS:
        fmt = _IMAGE_FORMATS[content_format]
        if image_format(body) != fmt:
            raise BadPayload(f"body is not a complete {fmt.upper()} image{_why_not_image(body)}")
        return [Draft(ts=now, fields={IMAGE_KEY: body, FORMAT_KEY: fmt})]
    try:
        doc = cbor2.loads(body)
    except (cbor2.CBORDecodeError, ValueError, OverflowError, RecursionError) as e:
        raise BadPayload(f"invalid CBOR: {e}") from None
    if content_format == CF_SENML_CBOR:
        return _decode_senml(doc, now)
    return _decode_maps(doc, now)


def _decode_maps(doc: Any, now: float) -> list[Draft]:
    maps = doc if isinstance(doc, list) else [doc]
    if not maps:
        raise BadPayload("empty array: expected at least one reading")
    drafts = []
    for i, m in enumerate(maps):
        where = f"item {i}: " if isinstance(doc, list) else ""
        if not isinstance(m, Mapping):
            raise BadPayload(f"{where}expected a map of field -> value, got {type(m).__name__}")
        ts = now
        fields: dict[str, FieldValue] = {}
        for k, v in m.items():
            _check_name(k, where)
            if k == TIME_KEY:
                ts = _time(v, now, f"{where}'{TIME_KEY}'")
                continue
            fields[k] = _value(v, f"{where}field '{k}'")
        if not fields:
            raise BadPayload(f"{where}a reading needs at least one field")
        _check_count(len(fields), where)
        if IMAGE_KEY in fields:
            _check_image_field(fields, where)
        drafts.append(Draft(ts=ts, fields=fields))
    return drafts


def image_format(data: bytes) -> str | None:
    """``"jpeg"`` or ``"png"`` when ``data`` starts and ends like a whole image of that kind, else None."""
    if data.startswith(_JPEG_START) and data.rstrip(b"\x00").endswith(_JPEG_END):
        return "jpeg"  # some cameras pad a frame with zeros after its EOI marker
    if data.startswith(_PNG_SIGNATURE) and data.endswith(_PNG_END):
        return "png"
    return None


def _why_not_image(data: bytes) -> str:
    if data.startswith((_JPEG_START, _PNG_SIGNATURE)):
        return ": it ends before its end marker (truncated)"
    return f": it starts with {data[:8].hex() or 'nothing'}"


def _check_image_field(fields: dict[str, FieldValue], where: str) -> None:
    image = fields[IMAGE_KEY]
    if not isinstance(image, bytes):
        raise BadPayload(f"{where}field '{IMAGE_KEY}' must be a byte string (JPEG or PNG)")
    fmt = image_format(image)
    if fmt is None:
        raise BadPayload(f"{where}field '{IMAGE_KEY}' is not a complete JPEG or PNG{_why_not_image(image)}")
    declared = fields.setdefault(FORMAT_KEY, fmt)
    if declared != fmt:
        raise BadPayload(f"{where}field '{FORMAT_KEY}' says {declared!r:.20} but the image is {fmt}")


def _decode_senml(doc: Any, now: float) -> list[Draft]:
    if not isinstance(doc, list) or not doc:
        raise BadPayload("SenML pack must be a non-empty array of records")
    bn, bt, bu = "", 0.0, None
    by_time: dict[float, Draft] = {}
    for i, rec in enumerate(doc):
        where = f"record {i}: "
        if not isinstance(rec, Mapping):
            raise BadPayload(f"{where}expected a map")
        unknown = [k for k in rec if k not in _SENML_LABELS]
        if unknown:
            raise BadPayload(f"{where}unknown SenML label(s) {unknown}")
        if _BN in rec:
            bn = _text(rec[_BN], f"{where}bn")
        if _BT in rec:
            bt = _number(rec[_BT], f"{where}bt")
        if _BU in rec:
            bu = _text(rec[_BU], f"{where}bu")
        value_keys = [k for k in (_V, _VS, _VB, _VD) if k in rec]
        if len(value_keys) > 1:
            raise BadPayload(f"{where}more than one value")
        if not value_keys:
            if _N in rec or _S in rec:
                raise BadPayload(f"{where}record has a name but no value")
            continue  # a base-only record
        name = bn + (_text(rec[_N], f"{where}n") if _N in rec else "")
        if not name:
            raise BadPayload(f"{where}record has no name (n or bn)")
        _check_name(name, where)
        raw = rec[value_keys[0]]
        value: FieldValue
        if value_keys[0] == _V:
            value = _number(raw, f"{where}v")
        elif value_keys[0] == _VS:
            value = _text(raw, f"{where}vs")
        elif value_keys[0] == _VB:
            if not isinstance(raw, bool):
                raise BadPayload(f"{where}vb must be a boolean")
            value = raw
        else:
            if not isinstance(raw, bytes):
                raise BadPayload(f"{where}vd must be a byte string")
            value = raw
        t = float(bt + (_number(rec[_T], f"{where}t") if _T in rec else 0.0))  # int bt + int t is an int
        ts = now + t if t < _RELATIVE_TIME_LIMIT else t
        if not math.isfinite(ts):  # bt + t can overflow: 1e308 + 1e308 is inf
            raise BadPayload(f"{where}time out of range")
        unit = _text(rec[_U], f"{where}u") if _U in rec else bu
        draft = by_time.setdefault(ts, Draft(ts=ts, fields={}))
        draft.fields[name] = value
        if unit:
            draft.units[name] = unit
        _check_count(len(draft.fields), where)
    if not by_time:
        raise BadPayload("SenML pack has no values")
    return list(by_time.values())


def _check_name(k: Any, where: str) -> None:
    if not isinstance(k, str) or not k:
        raise BadPayload(f"{where}field names must be non-empty text, got {k!r:.40}")
    if len(k) > MAX_NAME_LEN:
        raise BadPayload(f"{where}field name longer than {MAX_NAME_LEN} characters")


def _check_count(n: int, where: str) -> None:
    if n > MAX_FIELDS:
        raise BadPayload(f"{where}more than {MAX_FIELDS} fields")


def _value(v: Any, what: str) -> FieldValue:
    if isinstance(v, bool | str | bytes):
        return v
    if isinstance(v, int | float):
        return _number(v, what)
    raise BadPayload(f"{what}: unsupported value type {type(v).__name__}")


def _number(v: Any, what: str) -> float | int:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BadPayload(f"{what} must be a number")
    if isinstance(v, float) and not math.isfinite(v):
        raise BadPayload(f"{what} must be finite")
    if isinstance(v, int) and abs(v) > 2**63:
        raise BadPayload(f"{what} out of range")
    return v


def _time(v: Any, now: float, what: str) -> float:
    t = float(_number(v, what))
    return now + t if t < _RELATIVE_TIME_LIMIT else t


def _text(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise BadPayload(f"{what} must be text")
    return v
