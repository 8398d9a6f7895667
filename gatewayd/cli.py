"""Command line: ``gatewayd run``, ``check-config``, ``plugins list`` and ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from gatewayd import __version__, config, registry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gatewayd", description="Edge gateway daemon")
    ap.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c", type=Path, required=True)
    chk = sub.add_parser("check-config", help="validate a config file; errors name file, line and key")
    chk.add_argument("file", type=Path)
    plugins = sub.add_parser("plugins", help="plugins installed through entry points")
    plugins_sub = plugins.add_subparsers(dest="action", required=True)
    plugins_sub.add_parser("list", help="installed plugins and their versions")
    check = plugins_sub.add_parser("check", help="load a plugin in a worker, warm it up, report")
    check.add_argument("name", help="a [[plugins]] name from --config, an entry-point name, or module:Class")
    check.add_argument("--config", "-c", type=Path, help="take target and options from this config")
    status = sub.add_parser("status", help="the running daemon's state and each plugin's")
    status.add_argument("--config", "-c", type=Path, required=True)
    demo = sub.add_parser(
        "demo", help="run a simulated node against a built-in config and print MQTT traffic"
    )
    demo.add_argument("--count", type=int, default=20)
    demo.add_argument("--interval", type=float, default=0.5)
    args = ap.parse_args(argv)

    if args.cmd == "check-config":
        cfg = _load_config(args.file)
        if cfg is None:
            return 2
        print(f"{args.file}: OK ({len(cfg.plugins)} plugin(s))")
        return 0
    if args.cmd == "run":
        return _run(args.config)
    if args.cmd == "plugins" and args.action == "list":
        for d in registry.discovered():
            print(f"{d.name}\t{d.target}\t{d.distribution} {d.version}")
        return 0
    if args.cmd == "plugins":
        return _check_plugin(args.name, args.config)
    if args.cmd == "status":
        return _status(args.config)
    from gatewayd import demo as demo_mod

    return asyncio.run(demo_mod.run(args.count, args.interval))


def _load_config(path: Path) -> config.Config | None:
    """The config, or None after printing its problems (file:line: key: message) to stderr."""
    try:
        return config.load(path)
    except config.ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return None


def _check_plugin(name: str, config_path: Path | None) -> int:
    """Load the plugin in a real worker and warm it up: does its model load, how long does it take."""
    from gatewayd.supervisor import Worker, WorkerFailed

    ref, options, threads, timeout = name, {}, 1, 120.0
    if config_path is not None:
        cfg = _load_config(config_path)
        if cfg is None:
            return 2
        for p in cfg.plugins:
            if p.name == name:
                ref, options = p.plugin, p.options
                threads, timeout = p.threads or cfg.runtime.threads(), p.load_timeout_s
    try:
        target = registry.resolve(ref)
    except registry.PluginNotFound as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1

    async def go() -> int:
        worker = await Worker.start(threads)
        t0 = time.perf_counter()
        try:
            info = await worker.load(target, options, threads, timeout)
        except WorkerFailed as e:
            print(f"{name}: FAILED ({target}): {e}", file=sys.stderr)
            return 1
        finally:
            await worker.stop()
        print(
            f"{name}: OK  {target}  version {info.version}  "
            f"load+warm-up {time.perf_counter() - t0:.3f}s (warm-up inference {info.warmup_s * 1000:.1f} ms)"
        )
        return 0

    return asyncio.run(go())


def _status(config_path: Path) -> int:
    """Print the status file the daemon keeps beside its store."""
    import json

    from gatewayd.app import status_path

    cfg = _load_config(config_path)
    if cfg is None:
        return 2
    path = status_path(cfg)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"no status at {path}: {e} (is gatewayd running with this config?)", file=sys.stderr)
        return 1
    alive = _pid_alive(int(doc.get("pid", 0)))
    state = "serving" if alive and doc.get("serving") else "stopped" if not alive else "not serving"
    print(
        f"gatewayd {doc['gateway']}: {state} (pid {doc['pid']}), MQTT "
        f"{'connected' if doc.get('mqtt_connected') else 'disconnected'}, "
        f"{doc.get('readings_stored')} readings stored, outbox {doc.get('outbox')}"
    )
    for name, p in doc.get("plugins", {}).items():
        print(
            f"  {name:<16} {p['state']:<13} restarts {p['restarts']:<4} processed {p['processed']:<8} "
            f"errors {p['errors']:<4} expired {p['expired']:<4} queue {p['queue']}"
            + (f"  ({p['detail']})" if p.get("detail") else "")
        )
    return 0 if alive else 3


def _pid_alive(pid: int) -> bool:
    import os

    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run(path: Path) -> int:
    from gatewayd import log
    from gatewayd.app import App

    cfg = _load_config(path)
    if cfg is None:
        return 2
    log.setup(cfg.log.level, cfg.log.format)
    return asyncio.run(App(cfg).run())


if __name__ == "__main__":
    sys.exit(main())
