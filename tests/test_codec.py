"""Decoding CBOR maps and SenML-CBOR packs, and the errors a node hears about."""

from __future__ import annotations

import cbor2
import pytest

from gatewayd.codec import decode
from gatewayd.errors import BadPayload, UnsupportedFormat

NOW = 1_800_000_000.0


def test_cbor_map_array_and_node_time() -> None:
    """An array of maps gives one draft each; 't' is the node's time, relative when small."""
    out = decode(60, cbor2.dumps([{"a": 1, "t": 1_700_000_000}, {"b": "x", "t": -5}, {"c": True}]), NOW)
    assert [(d.ts, d.fields) for d in out] == [
        (1_700_000_000.0, {"a": 1}),
        (NOW - 5, {"b": "x"}),
        (NOW, {"c": True}),
    ]


def test_senml_relative_time_base_unit_and_data_value() -> None:
    """SenML: bt+t relative to now below 2**28, bu as default unit, vd bytes, vb booleans."""
    pack = [{-3: -10, -4: "V", 0: "volt", 2: 3.3}, {0: "blob", 8: b"\x01"}, {0: "on", 4: False, 6: 10}]
    first, second = decode(112, cbor2.dumps(pack), NOW)
    assert first.ts == NOW - 10 and first.fields == {"volt": 3.3, "blob": b"\x01"}
    assert first.units == {"volt": "V", "blob": "V"}
    assert second.ts == NOW and second.fields == {"on": False}


@pytest.mark.parametrize(
    ("cf", "body", "message"),
    [
        (60, b"\xa1", "invalid CBOR"),
        (60, cbor2.dumps({}), "at least one field"),
        (60, cbor2.dumps({1: 2}), "non-empty text"),
        (60, cbor2.dumps({"a": [1]}), "unsupported value type"),
        (60, cbor2.dumps({"a": float("nan")}), "finite"),
        (60, cbor2.dumps([]), "empty array"),
        (112, cbor2.dumps({0: "a"}), "non-empty array"),
        (112, cbor2.dumps([{0: "a", 2: 1, 3: "x"}]), "more than one value"),
        (112, cbor2.dumps([{2: 1}]), "no name"),
        (112, cbor2.dumps([{0: "a", 2: "text"}]), "must be a number"),
        (112, cbor2.dumps([{0: "a", 99: 1, 2: 1}]), "unknown SenML label"),
        (112, cbor2.dumps([{-2: "base"}]), "no values"),
        (60, b"\x9f" * 100_000, "invalid CBOR"),  # absurd nesting is refused, not a crash
    ],
)
def test_bad_bodies_are_bad_payload_with_diagnostic(cf: int, body: bytes, message: str) -> None:
    """Each malformed body raises BadPayload (4.00) whose diagnostic says what is wrong."""
    with pytest.raises(BadPayload, match=message):
        decode(cf, body, NOW)


def test_other_content_format_is_unsupported() -> None:
    """Anything but 60 and 112 is 4.15."""
    with pytest.raises(UnsupportedFormat):
        decode(50, b"{}", NOW)
