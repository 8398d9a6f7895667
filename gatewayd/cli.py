"""Command line: ``gatewayd run``, ``check-config``, ``plugins list`` and ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import sys
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
    plugins.add_argument("action", choices=["list"])
    demo = sub.add_parser(
        "demo", help="run a simulated node against a built-in config and print MQTT traffic"
    )
    demo.add_argument("--count", type=int, default=20)
    demo.add_argument("--interval", type=float, default=0.5)
    args = ap.parse_args(argv)

    if args.cmd == "check-config":
        try:
            cfg = config.load(args.file)
        except config.ConfigError as e:
            print("\n".join(e.problems), file=sys.stderr)
            return 2
        print(f"{args.file}: OK ({len(cfg.plugins)} plugin(s))")
        return 0
    if args.cmd == "run":
        return _run(args.config)
    if args.cmd == "plugins":
        for d in registry.discovered():
            print(f"{d.name}\t{d.target}\t{d.distribution} {d.version}")
        return 0
    from gatewayd import demo as demo_mod

    return asyncio.run(demo_mod.run(args.count, args.interval))


def _run(path: Path) -> int:
    from gatewayd import log
    from gatewayd.app import App

    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        print("\n".join(e.problems), file=sys.stderr)
        return 2
    log.setup(cfg.log.level, cfg.log.format)
    return asyncio.run(App(cfg).run())


if __name__ == "__main__":
    sys.exit(main())
