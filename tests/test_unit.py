"""systemd/gatewayd.service: hardened (exposure <= 1.5), valid, and gatewayd with its onnxruntime
plugins works under the unit's system-call filter and MemoryDenyWriteExecute.

There is no systemd as PID 1 here, so the restrictions that can break gatewayd (the system-call
allow-list, W^X memory, socket families) are applied by ``tests/unit_sandbox.py`` from the unit
file itself, and the real daemon runs under them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes
from conftest import collect, post, udp_port

from gatewayd.codec import CF_JPEG
from gatewayd.testing import Mosquitto

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "gatewayd.service"
SANDBOX = Path(__file__).with_name("unit_sandbox.py")
GLM_MODELS = ROOT / "plugins" / "glm" / "gatewayd_glm" / "models"
MAX_EXPOSURE = 1.5


def analyze() -> str:
    exe = shutil.which("systemd-analyze")
    # Not a skip: CI must check the score; tests/run.sh installs the package.
    assert exe, "systemd-analyze is missing: install the Debian package 'systemd' (tests/run.sh does)"
    return exe


def sandboxed(*cmd: str) -> list[str]:
    return [sys.executable, str(SANDBOX), "--report", str(UNIT), "--", *cmd]


def test_security_exposure_is_at_most_1_5() -> None:
    """`systemd-analyze security --offline=yes` rates the unit <= 1.5 ("OK")."""
    out = subprocess.run(
        [analyze(), "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    m = re.search(r"Overall exposure level for gatewayd\.service: (\d+\.\d+) (\w+)", out.stdout)
    assert m, out.stdout + out.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, out.stdout
    # The two options this file's other tests check against real inference are the ones scored.
    for option in (
        "MemoryDenyWriteExecute=",
        "SystemCallFilter=~@privileged",
        "SystemCallFilter=~@resources",
    ):
        line = next(x for x in out.stdout.splitlines() if option in x)
        assert line.lstrip().startswith("✓"), line


def test_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing to say (unknown keys, bad values) with the commands
    pointed at this checkout's gatewayd, as /opt/gatewayd does not exist here."""
    gatewayd = Path(sys.executable).with_name("gatewayd")
    assert gatewayd.exists(), gatewayd
    unit = tmp_path / "gatewayd.service"
    unit.write_text(UNIT.read_text().replace("/opt/gatewayd/bin/gatewayd", str(gatewayd)))
    out = subprocess.run(
        [analyze(), "verify", "--no-pager", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout == out.stderr == "", out.stdout + out.stderr


def test_sandbox_applies_the_units_restrictions() -> None:
    """The sandbox is no no-op: under it W+X memory, sched_setaffinity (@resources), chown
    (@privileged) and netlink sockets are refused, while ordinary memory and UDP work."""
    probe = """
import json, mmap, os, socket
def t(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return e.errno
print(json.dumps({
    "wx": t(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)),
    "rw": t(lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE)),
    "affinity": t(lambda: os.sched_setaffinity(0, os.sched_getaffinity(0))),
    "chown": t(lambda: os.chown(os.devnull, os.getuid(), os.getgid())),
    "netlink": t(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)),
    "udp": t(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()),
}))
"""
    out = subprocess.run(sandboxed(sys.executable, "-c", probe), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got == {"wx": 1, "rw": "ok", "affinity": 1, "chown": 1, "netlink": 97, "udp": "ok"}, got
    report = json.loads(out.stderr.split("unit_sandbox ", 1)[1].splitlines()[0])
    assert report["MemoryDenyWriteExecute"]["seccomp"] == "on"


async def test_gatewayd_with_onnxruntime_plugins_runs_under_the_unit_restrictions(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """`gatewayd run` under the unit's system-call filter, MemoryDenyWriteExecute and address
    families: CoAP intake, SQLite, worker processes, and real inference (the anomaly autoencoder and
    the PP-OCRv4 meter reader on onnxruntime) all work; no call was refused on the way."""
    from gatewayd_meter_ocr.frames import render

    frame = render("0427.3", "lcd", seed=11, fmt="jpeg")
    port = udp_port()
    conf = tmp_path / "gw.toml"
    conf.write_text(
        f'[coap]\nbind = "127.0.0.1"\nport = {port}\nmax_body_bytes = 200000\n'
        f'[store]\npath = "{tmp_path}/s.db"\n[mqtt]\nport = {broker.port}\n[metrics]\nenabled = false\n'
        '[security]\nunauthenticated = "allow"\n'
        '[[plugins]]\nname = "anomaly"\nplugin = "anomaly"\nmax_wait_ms = 5\n'
        '[[plugins]]\nname = "meter"\nplugin = "meter_ocr"\nmax_wait_ms = 5\n'
        "options = { digits = 5, decimals = 1 }\n"
    )
    log = tmp_path / "gatewayd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            sandboxed(sys.executable, "-m", "gatewayd.cli", "run", "--config", str(conf)),
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        async with collect(broker.port) as got:

            def ready(plugin: str) -> bool:
                return any(m["state"] == "ready" for m in got.json(f"status/plugins/{plugin}"))

            await got.wait(lambda g: ready("anomaly") and ready("meter"), timeout=120)
            pump = cbor2.dumps({"temperature": 40.0, "humidity": 50.0, "vibration": 1.2})
            assert (await post(coap_client, port, "pump-1", pump)).code == codes.CHANGED
            assert (await post(coap_client, port, "cam-1", frame.image, cf=CF_JPEG)).code == codes.CHANGED
            await got.wait(lambda g: g.json("results/anomaly/pump-1") and g.json("results/meter/cam-1"), 120)
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text(errors="replace")
    anomaly = got.json("results/anomaly/pump-1")[0]
    meter = got.json("results/meter/cam-1")[0]
    assert anomaly["variant"] == "main" and isinstance(anomaly["score"], float), anomaly
    assert meter["variant"] == "main" and meter["text"] == "0427.3", meter
    assert rc == 0, text[-3000:]
    assert '"MemoryDenyWriteExecute"' in text  # the sandbox's report: it was applied
    # onnxruntime logs a refused call (e.g. pthread_setaffinity_np) and carries on: none may appear.
    daemon = text.split("\n", 1)[1]  # after the sandbox's report, which names denied calls
    for bad in (
        "Operation not permitted",
        "setaffinity",
        "worker_failed",
        "batch_failed",
        '"level": "error"',
    ):
        assert bad not in daemon, daemon[-3000:]


def _genai_models() -> list[Path]:
    return sorted(p.parent for p in GLM_MODELS.glob("*/genai_config.json"))


@pytest.mark.skipif(not _genai_models(), reason=f"no onnxruntime-genai model under {GLM_MODELS}")
def test_genai_generates_under_the_unit_restrictions() -> None:
    """onnxruntime-genai (the GLM plugin's runtime) loads a packaged model and generates the same
    greedy tokens under the unit's restrictions as without them."""
    script = """
import sys, onnxruntime_genai as og
m = og.Model(sys.argv[1]); tok = og.Tokenizer(m); ids = tok.encode("pump 3 vibration high")
p = og.GeneratorParams(m); p.set_search_options(max_length=len(ids) + 8, do_sample=False)
g = og.Generator(m, p); g.append_tokens(ids); out = []
while not g.is_done() and len(out) < 8:
    g.generate_next_token(); out.append(int(g.get_next_tokens()[0]))
print(out)
"""
    model = str(_genai_models()[0])
    free = subprocess.run([sys.executable, "-c", script, model], capture_output=True, text=True, timeout=300)
    boxed = subprocess.run(
        sandboxed(sys.executable, "-c", script, model), capture_output=True, text=True, timeout=300
    )
    assert free.returncode == 0, free.stderr
    assert boxed.returncode == 0, boxed.stderr
    assert boxed.stdout == free.stdout and boxed.stdout.startswith("["), (boxed.stdout, free.stdout)
