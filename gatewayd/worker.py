"""The child side of a plugin worker: runs one plugin, talking length-prefixed CBOR on stdin/stdout.

Run as ``python -m gatewayd.worker``. The parent sends ``{"op": "load"}`` once,
then ``{"op": "process"}`` per batch; the worker exits when stdin closes. The
plugin's own prints go to stderr, so they cannot corrupt the protocol stream.
"""

from __future__ import annotations

import os
import struct
import sys
import time
import traceback
from typing import Any, BinaryIO

import cbor2

from gatewayd.plugin_api import Plugin, PluginNotReady, Reading

HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024


def encode_frame(obj: Any) -> bytes:
    body = cbor2.dumps(obj)
    return HEADER.pack(len(body)) + body


def reading_to_wire(r: Reading) -> list[Any]:
    return [r.id, r.node, r.ts, dict(r.fields), dict(r.units)]


def reading_from_wire(w: list[Any]) -> Reading:
    return Reading(w[0], w[1], w[2], w[3], w[4])


def _read(src: BinaryIO) -> Any | None:
    head = src.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (n,) = HEADER.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes")
    return cbor2.loads(src.read(n))


def _failure(e: BaseException) -> dict[str, Any]:
    return {
        "error": f"{type(e).__name__}: {e}",
        "not_ready": isinstance(e, PluginNotReady),
        "trace": traceback.format_exc(limit=8),
    }


def serve(src: BinaryIO, dst: BinaryIO) -> int:
    """Serve requests until EOF; returns the exit code."""
    from gatewayd.registry import load_class

    def send(obj: Any) -> None:
        dst.write(encode_frame(obj))
        dst.flush()

    hello = _read(src)
    if hello is None or hello.get("op") != "load":
        return 2
    try:
        cls: type[Plugin] = load_class(hello["target"])
        options = hello.get("options", {})
        if (bundle := hello.get("bundle")) is not None:  # a bundle installed by a model update
            if cls.bundle_option is None:
                raise ValueError(f"plugin {cls.name!r} takes no model bundle (it sets no bundle_option)")
            options = {**options, cls.bundle_option: bundle}
        plugin = cls(options)
        plugin.threads = int(hello.get("threads", 1))
        plugin.load()
        send({"state": "warming"})
        t0 = time.perf_counter()
        plugin.process(list(plugin.sample()))
        warmup_s = time.perf_counter() - t0
        send(
            {
                "state": "ready",
                "warmup_s": warmup_s,
                "version": plugin.version,
                "answer_keys": plugin.answer_keys,
            }
        )
    except Exception as e:
        send(_failure(e))
        return 1
    while (req := _read(src)) is not None:
        try:
            batch = [reading_from_wire(w) for w in req["batch"]]
            results = plugin.process(batch)
            send({"results": [[r.reading_id, dict(r.data)] for r in results]})
        except Exception as e:
            send(_failure(e))
    return 0


def main() -> None:
    # Keep the protocol on a private fd; anything the plugin prints lands on stderr.
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.exit(serve(sys.stdin.buffer, proto_out))


if __name__ == "__main__":
    main()
