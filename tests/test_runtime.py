"""Plugin runtime: every kind of plugin fault leaves the daemon serving, and the plugin heals itself."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes
from conftest import Collected, collect, make_config, post, running

from gatewayd.testing import Mosquitto

FAST = {
    "max_wait_ms": 5,
    "backoff_initial_s": 0.1,
    "backoff_max_s": 0.4,
    "restart_budget": 100,
    "deadline_s": 1.5,
    "max_attempts": 20,
}


def echo(name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "plugin": "fake_plugins:Echo", **FAST} | kw


def states(got: Collected, plugin: str) -> list[str]:
    return [m["state"] for m in got.json(f"status/plugins/{plugin}")]


def results(got: Collected, plugin: str) -> list[dict[str, Any]]:
    return got.json(f"results/{plugin}/")


@pytest.mark.parametrize("fault", ["load", "not_ready", "crash", "segv", "hang", "raise", "import"])
async def test_fault_leaves_daemon_serving_and_plugin_recovers(
    fault: str,
    tmp_path: Path,
    broker: Mosquitto,
    coap_client: aiocoap.Context,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the plugin fails, POSTs get 2.04, another plugin keeps publishing and the fault shows on
    MQTT; once the fault stops the plugin is ready again and its backlog is processed, error-free."""
    flag = tmp_path / "fault"
    flag.touch()
    faulty = echo("faulty", options={"flag": str(flag), "fault": fault})
    if fault == "import":
        monkeypatch.setenv("GATEWAYD_TEST_IMPORT_FLAG", str(flag))
        faulty = echo("faulty", plugin="fake_broken:Echo")
    cfg = make_config(tmp_path, broker.port, plugins=[faulty, echo("healthy")])
    async with collect(broker.port) as got, running(cfg):
        answers = [await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"i": i})) for i in range(5)]
        assert all(a.code == codes.CHANGED for a in answers)
        await got.wait(lambda g: len(results(g, "healthy")) == 5)
        await got.wait(lambda g: "backoff" in states(g, "faulty"))
        assert results(got, "faulty") == []  # nothing was processed, nothing was given up
        flag.unlink()
        await got.wait(lambda g: len(results(g, "faulty")) == 5, timeout=30)
        assert states(got, "faulty")[-1] == "ready"
    done = results(got, "faulty")
    assert sorted(r["reading_id"] for r in done) == sorted(r["reading_id"] for r in results(got, "healthy"))
    assert all("error" not in r and r["variant"] == "main" for r in done)


async def test_leaking_worker_is_recycled_between_batches(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """A worker whose RSS passes memory_limit_mb is replaced after its batch; no reading is lost."""
    flag = tmp_path / "fault"
    flag.touch()
    cfg = make_config(
        tmp_path,
        broker.port,
        plugins=[
            echo("leaky", max_batch=1, memory_limit_mb=100, options={"flag": str(flag), "fault": "leak"})
        ],
    )
    async with collect(broker.port) as got, running(cfg) as app:
        for i in range(6):
            assert (await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"i": i}))).code == codes.CHANGED
        await got.wait(lambda g: len(results(g, "leaky")) == 6, timeout=30)
        recycled = app.runners[0].recycled
    pids = {r["pid"] for r in results(got, "leaky")}
    assert recycled >= 1 and len(pids) >= 2
    assert all("error" not in r for r in results(got, "leaky"))


async def test_restart_budget_leads_to_cool_down_then_retry(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """More restarts than the budget allows: cooling-down, then tried again, and ready once fixed."""
    flag = tmp_path / "fault"
    flag.touch()
    cfg = make_config(
        tmp_path,
        broker.port,
        plugins=[
            echo(
                "flaky",
                restart_budget=2,
                restart_window_s=60,
                cooldown_s=1.5,
                options={"flag": str(flag), "fault": "load"},
            )
        ],
    )
    async with collect(broker.port) as got, running(cfg):
        await got.wait(lambda g: "cooling-down" in states(g, "flaky"))
        flag.unlink()
        assert (await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"x": 1}))).code == codes.CHANGED
        await got.wait(lambda g: len(results(g, "flaky")) == 1, timeout=20)
    seen = states(got, "flaky")
    assert seen.index("cooling-down") < len(seen) - 1 - seen[::-1].index("ready")


async def test_fallback_serves_while_main_is_out_and_results_say_so(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """With the main worker failing, the fallback's results carry variant 'fallback' and the plugin is
    'degraded'; after the main recovers, results carry variant 'main' again."""
    flag = tmp_path / "fault"
    flag.touch()
    cfg = make_config(
        tmp_path,
        broker.port,
        plugins=[echo("fb", options={"flag": str(flag), "fault": "load"}, fallback={"options": {}})],
    )
    async with collect(broker.port) as got, running(cfg):
        await got.wait(lambda g: "degraded" in states(g, "fb"))
        assert (await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"a": 1}))).code == codes.CHANGED
        await got.wait(lambda g: len(results(g, "fb")) == 1)
        flag.unlink()
        await got.wait(lambda g: states(g, "fb")[-1] == "ready", timeout=20)
        assert (await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"b": 1}))).code == codes.CHANGED
        await got.wait(lambda g: len(results(g, "fb")) == 2)
    first, second = results(got, "fb")
    assert (first["fields"], first["variant"]) == (["a"], "fallback")
    assert (second["fields"], second["variant"]) == (["b"], "main")


async def test_degraded_fallback_publishes_flagged_results(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """fallback = {degraded = true}: readings get a result flagged degraded, with the reason."""
    flag = tmp_path / "fault"
    flag.touch()
    cfg = make_config(
        tmp_path,
        broker.port,
        plugins=[echo("dg", options={"flag": str(flag), "fault": "load"}, fallback={"degraded": True})],
    )
    async with collect(broker.port) as got, running(cfg):
        await got.wait(lambda g: "degraded" in states(g, "dg"))
        assert (await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"a": 1}))).code == codes.CHANGED
        await got.wait(lambda g: len(results(g, "dg")) == 1)
    (r,) = results(got, "dg")
    assert r["degraded"] is True and r["variant"] == "degraded" and "load failure requested" in r["error"]


async def test_dynamic_batching_is_seen_by_the_plugin(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """Readings arriving together are processed in batches of up to max_batch; max_batch 1 means alone."""
    cfg = make_config(
        tmp_path,
        broker.port,
        plugins=[echo("batched", max_batch=8, max_wait_ms=300), echo("single", max_batch=1)],
    )
    async with collect(broker.port) as got, running(cfg):
        answers = await asyncio.gather(
            *(post(coap_client, cfg.coap.port, f"n{i}", cbor2.dumps({"i": i})) for i in range(20))
        )
        assert all(a.code == codes.CHANGED for a in answers)
        await got.wait(lambda g: len(results(g, "batched")) == 20 and len(results(g, "single")) == 20)
    sizes = [r["batch"] for r in results(got, "batched")]
    assert max(sizes) > 1 and max(sizes) <= 8
    assert {r["batch"] for r in results(got, "single")} == {1}


async def test_failing_reading_in_a_batch_is_isolated(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """One bad reading in a batch: the others are processed normally, the bad one gets an error result."""
    cfg = make_config(
        tmp_path, broker.port, plugins=[echo("iso", max_batch=8, max_wait_ms=300, max_attempts=2)]
    )
    async with collect(broker.port) as got, running(cfg):
        bodies = [{"i": i} for i in range(5)] + [{"boom": 1}]
        await asyncio.gather(*(post(coap_client, cfg.coap.port, "n", cbor2.dumps(b)) for b in bodies))
        await got.wait(lambda g: len(results(g, "iso")) == 6)
    errors = [r for r in results(got, "iso") if "error" in r]
    assert len(errors) == 1 and "boom requested" in errors[0]["error"] and errors[0]["variant"] == "error"


@pytest.mark.parametrize("fault", ["boom", "crash"])
async def test_a_batch_sent_ahead_survives_a_failure_of_the_one_before(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context, fault: str
) -> None:
    """With a backlog the next full batch waits in the worker's pipe; when the batch before it raises or
    kills the worker, every reading still gets exactly one result, in the node's order."""
    cfg = make_config(tmp_path, broker.port, plugins=[echo("ahead", max_batch=2, max_attempts=2)])
    names = ["slow", "r0", fault, "r1", "r2", "r3", "r4", "r5"]
    bodies = [{"sleep": 0.5} if n == "slow" else {n: 1} for n in names]
    async with collect(broker.port) as got, running(cfg) as app:
        await got.wait(lambda g: states(g, "ahead")[-1:] == ["ready"])
        for body in bodies:  # one by one: the node's order is the order of posting
            assert (await post(coap_client, cfg.coap.port, "n", cbor2.dumps(body))).code == codes.CHANGED
        await got.wait(lambda g: len(results(g, "ahead")) == len(names))
        await asyncio.sleep(0.3)  # no second result for any reading
        sent_ahead = app.runners[0].sent_ahead
    out = results(got, "ahead")
    seen = ["error" if "error" in r else "slow" if r["fields"] == ["sleep"] else r["fields"][0] for r in out]
    assert seen == [n if n != fault else "error" for n in names]
    error = next(r["error"] for r in out if "error" in r)
    assert ("boom requested" if fault == "boom" else "exited with code 3") in error
    assert sent_ahead >= 1


async def test_higher_priority_is_served_first_under_contention(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """With one inference slot busy, a high-priority batch that queued later still runs first."""
    cfg = make_config(
        tmp_path,
        broker.port,
        runtime={"inference_slots": 1},
        plugins=[
            echo("low", priority="low", max_batch=1, match={"nodes": ["low-*"]}),
            echo("high", priority="high", max_batch=1, match={"nodes": ["high-*"]}),
        ],
    )
    async with collect(broker.port) as got, running(cfg):
        await got.wait(lambda g: states(g, "low")[-1:] == ["ready"] and states(g, "high")[-1:] == ["ready"])
        port = cfg.coap.port
        await post(coap_client, port, "low-1", cbor2.dumps({"sleep": 0.6}))  # holds the only slot
        await asyncio.sleep(0.2)
        await post(coap_client, port, "low-1", cbor2.dumps({"second": 1}))  # waits for the slot first...
        await asyncio.sleep(0.1)
        await post(coap_client, port, "high-1", cbor2.dumps({"urgent": 1}))  # ...this one waits later
        await got.wait(lambda g: len(results(g, "low")) == 2 and len(results(g, "high")) == 1)
    low_second = next(r for r in results(got, "low") if r["fields"] == ["second"])
    (high,) = results(got, "high")
    assert high["t"] < low_second["t"]


async def test_old_readings_expire_instead_of_being_processed_late(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """Readings whose turn comes after max_age_s get a counted 'expired' result; fresh ones are processed."""
    cfg = make_config(tmp_path, broker.port, plugins=[echo("fresh", max_batch=1, max_age_s=0.5)])
    async with collect(broker.port) as got, running(cfg) as app:
        await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"sleep": 1.2}))
        for i in range(3):
            await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"i": i}))
        await got.wait(lambda g: len(results(g, "fresh")) == 4)
        await asyncio.sleep(0.1)
        assert (await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"late": 1}))).code == codes.CHANGED
        await got.wait(lambda g: len(results(g, "fresh")) == 5)
        expired = app.runners[0].expired
    out = results(got, "fresh")
    assert expired == 3 and sum(r.get("expired", False) for r in out) == 3
    assert out[-1]["fields"] == ["late"] and "error" not in out[-1]


async def test_threads_and_cpus_come_from_the_budget_or_the_plugin(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """Each worker gets plugin.threads and OMP_NUM_THREADS from [runtime] or the plugin's own setting,
    and runs on the plugin's ``cpus`` where it names them."""
    last_cpu = max(os.sched_getaffinity(0))
    cfg = make_config(
        tmp_path,
        broker.port,
        runtime={"inference_slots": 1, "threads_per_slot": 3},
        plugins=[echo("budget"), echo("own", threads=2, cpus=[last_cpu])],
    )
    async with collect(broker.port) as got, running(cfg):
        await post(coap_client, cfg.coap.port, "n", cbor2.dumps({"x": 1}))
        await got.wait(lambda g: len(results(g, "budget")) == 1 and len(results(g, "own")) == 1)
    assert (results(got, "budget")[0]["threads"], results(got, "budget")[0]["omp"]) == (3, "3")
    assert (results(got, "own")[0]["threads"], results(got, "own")[0]["omp"]) == (2, "2")
    assert results(got, "own")[0]["cpus"] == [last_cpu]
    assert results(got, "budget")[0]["cpus"] == sorted(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match=r"CPU 4096 does not exist here"):
        make_config(tmp_path, broker.port, plugins=[echo("x", cpus=[4096])])


async def test_instances_share_the_queue(
    tmp_path: Path, broker: Mosquitto, coap_client: aiocoap.Context
) -> None:
    """Two instances of a plugin both serve its queue, each reading exactly once."""
    cfg = make_config(
        tmp_path,
        broker.port,
        runtime={"inference_slots": 2},
        plugins=[echo("pair", instances=2, max_batch=1)],
    )
    async with collect(broker.port) as got, running(cfg):
        await got.wait(
            lambda g: (
                len(
                    [
                        m
                        for m in g.json("status/plugins/pair")
                        if all(i["state"] == "ready" for i in m["instances"].values())
                    ]
                )
                > 0
            )
        )
        await asyncio.gather(
            *(post(coap_client, cfg.coap.port, "n", cbor2.dumps({"sleep": 0.1, "i": i})) for i in range(8))
        )
        await got.wait(lambda g: len(results(g, "pair")) == 8)
    out = results(got, "pair")
    assert len({r["reading_id"] for r in out}) == 8 and len({r["pid"] for r in out}) == 2


def test_cli_status_and_plugins_check(tmp_path: Path, broker: Mosquitto) -> None:
    """`gatewayd status` shows a running daemon's plugin states; `plugins check` loads and warms a plugin."""
    from conftest import udp_port

    conf = tmp_path / "gw.toml"
    conf.write_text(
        f'[coap]\nbind = "127.0.0.1"\nport = {udp_port()}\n[store]\npath = "{tmp_path}/s.db"\n'
        f'[mqtt]\nport = {broker.port}\n[[plugins]]\nname = "anomaly"\nplugin = "anomaly"\n'
    )
    cli = [sys.executable, "-m", "gatewayd.cli"]
    proc = subprocess.Popen([*cli, "run", "-c", str(conf)], stdout=subprocess.DEVNULL, env=os.environ.copy())
    try:
        out = ""
        for _ in range(100):
            out = subprocess.run(
                [*cli, "status", "-c", str(conf)], capture_output=True, text=True, timeout=30
            ).stdout
            if "anomaly" in out and " ready " in out:
                break
            subprocess.run(["sleep", "0.1"], check=True)
        assert "serving" in out and " ready " in out, out
    finally:
        proc.terminate()
        proc.wait(30)
    after = subprocess.run([*cli, "status", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert after.returncode == 3 and "stopped" in after.stdout
    ok = subprocess.run(
        [*cli, "plugins", "check", "anomaly", "-c", str(conf)], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0 and "anomaly: OK" in ok.stdout and "warm-up" in ok.stdout
    bad = subprocess.run(
        [*cli, "plugins", "check", "fake_plugins:NotAPlugin"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and "not a subclass" in bad.stderr
