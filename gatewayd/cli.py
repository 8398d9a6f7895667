"""Command line: ``gatewayd run``, ``check-config``, ``plugins list|check``, ``status``, ``demo``,
``nodes provision`` and ``models quantize|convert|bundle|keygen|sign|verify``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gatewayd import __version__, config, registry

if TYPE_CHECKING:
    from gatewayd import bundle as bundle_mod


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
    models = sub.add_parser("models", help="offline tools for plugin models (the 'models' extra)")
    models_sub = models.add_subparsers(dest="action", required=True)
    q = models_sub.add_parser(
        "quantize",
        help="INT8-quantize an ONNX model; report size, latency and output agreement vs FP32",
        description="Sets are a .npz (one array per input name, first axis = samples) or a directory "
        "of one .npy/.npz file per sample; see gatewayd.quantize. Exit status 1: agreement below "
        "--min-agreement (the model is still written, marked as not passing); 2: bad arguments or sets.",
    )
    q.add_argument("model", type=Path, help="the FP32 .onnx model")
    q.add_argument("--output", "-o", type=Path, help="default: MODEL with suffix .int8.onnx")
    q.add_argument("--method", choices=["static", "dynamic"], default="static")
    q.add_argument("--format", choices=["qoperator", "qdq"], default="qoperator", help="static only")
    q.add_argument("--per-channel", action="store_true")
    q.add_argument("--activations", choices=["uint8", "int8"], default="uint8", help="static only")
    q.add_argument("--reduce-range", action="store_true", help="7-bit weights, for x86 without VNNI")
    q.add_argument("--op-types", help="quantize only these operator types, comma-separated (e.g. Conv)")
    q.add_argument("--exclude", action="append", default=[], metavar="NODE", help="keep this node in float")
    q.add_argument("--calibration", type=Path, help="calibration set (static)")
    q.add_argument("--eval", type=Path, help="evaluation set; default: the calibration set")
    q.add_argument("--metric", choices=["close", "argmax", "iou"], default="close")
    q.add_argument("--atol", type=float, default=1e-2, help="close: |got-ref| <= atol + rtol*|ref|")
    q.add_argument("--rtol", type=float, default=1e-2)
    q.add_argument("--threshold", type=float, default=0.3, help="iou: output > threshold is the mask")
    q.add_argument("--min-iou", type=float, default=0.9)
    q.add_argument("--min-agreement", type=float, default=0.99, help="fraction of samples that must agree")
    q.add_argument("--threads", type=int, default=1, help="intra-op threads, the same for FP32 and INT8")
    conv = models_sub.add_parser(
        "convert",
        help="convert a GLM checkpoint to an onnxruntime-genai model bundle (with manifest.json)",
    )
    conv.add_argument("checkpoint", type=Path, help="a Hugging Face checkpoint folder (config.json, weights)")
    conv.add_argument("out", type=Path, help="the bundle folder to write")
    conv.add_argument("--precision", choices=["fp32", "int8", "int4"], required=True)
    conv.add_argument("--name", help="bundle name; default: the OUT folder's name")
    conv.add_argument("--version", default="1.0.0", help="bundle version, dotted numbers (default 1.0.0)")
    bun = models_sub.add_parser(
        "bundle", help="write manifest.json for a model folder: every file's size and SHA-256"
    )
    bun.add_argument("folder", type=Path)
    bun.add_argument("--name", required=True)
    bun.add_argument("--version", required=True, help="dotted numbers, e.g. 1.0.0")
    bun.add_argument("--kind", required=True, help="e.g. onnxruntime-genai, onnx")
    bun.add_argument("--quantization", required=True, help="e.g. fp32, int8, int4")
    bun.add_argument("--input-schema", type=Path, help="a JSON schema of the reading fields the model takes")
    bun.add_argument("--min-gatewayd", help="the oldest gatewayd version that may load it, e.g. 0.2.0")
    bun.add_argument("--expires", help="ISO 8601 UTC time after which gateways refuse it")
    kg = models_sub.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing bundles: NAME.pem (private, 0600) and NAME.pub",
        description="Exit status 2: a key of that name exists in OUT (never overwritten).",
    )
    kg.add_argument("--out", type=Path, required=True, help="the folder to write the keys into")
    kg.add_argument("--name", default="signing", help="file name stem (default: signing)")
    sg = models_sub.add_parser(
        "sign",
        help="check a bundle's files, then sign its manifest.json into manifest.sig",
        description="Exit status 1: the bundle does not match its manifest; 2: bad folder or key.",
    )
    sg.add_argument("folder", type=Path)
    sg.add_argument("--key", type=Path, required=True, help="the Ed25519 private key (PEM) from keygen")
    ver = models_sub.add_parser(
        "verify",
        help="check a bundle against its manifest.json, and its signature with --trusted-key",
        description="Exit status 1: refused (a file missing, changed, truncated or added; an invalid "
        "manifest; with --trusted-key: unsigned, untrusted key, bad signature; expired; needs a newer "
        "gatewayd; not newer than --installed); 2: FOLDER is not a directory or a key cannot be read.",
    )
    ver.add_argument("folder", type=Path)
    ver.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        default=[],
        metavar="PUB",
        help="a trusted public key (PEM); repeatable; with any, an unsigned bundle is refused",
    )
    ver.add_argument("--installed", metavar="VERSION", help="refuse a bundle not newer than this (rollback)")
    nodes = sub.add_parser("nodes", help="node identities: OSCORE security contexts")
    nodes_sub = nodes.add_subparsers(dest="action", required=True)
    p = nodes_sub.add_parser(
        "provision",
        help="create an OSCORE context pair for a node: the gateway's side and the node's",
        description="Writes DIR/credentials.json (name it in [security] oscore_credentials) and "
        "DIR/contexts/NODE/ for the gateway, and the node's folder (credentials.json + context/) "
        "to move, not copy, onto the node. Restart gatewayd to load a new node.",
    )
    p.add_argument("node", help="the node id it posts as (/s/NODE)")
    p.add_argument("--dir", type=Path, required=True, help="the gateway's OSCORE folder (gatewayd writes)")
    p.add_argument("--node-dir", type=Path, help="where the node's side goes (default: DIR/nodes/NODE)")
    p.add_argument("--gateway", default="coap://*", help="URI the node reaches the gateway at (default: any)")
    p.add_argument("--force", action="store_true", help="re-key a node that is already provisioned")
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
    if args.cmd == "nodes":
        # Imported here: it pulls in the intake (aiocoap, cbor2), which other commands do not need.
        from gatewayd import credentials

        return credentials.cli(args)
    if args.cmd == "status":
        return _status(args.config)
    if args.cmd == "models":
        tools = {"quantize": _quantize, "convert": _convert, "bundle": _bundle, "keygen": _keygen,
                 "sign": _sign, "verify": _verify}  # fmt: skip
        return tools[args.action](args)
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
    env: dict[str, str] = {}
    if config_path is not None:
        cfg = _load_config(config_path)
        if cfg is None:
            return 2
        env = cfg.models.environ()  # the bundle signature policy, as the daemon's workers get it
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
        worker = await Worker.start(threads, env)
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


def _fail(args: argparse.Namespace, problem: object, status: int = 2) -> int:
    """Print ``gatewayd CMD ACTION: problem`` to stderr and return ``status``; a missing module
    (ModuleNotFoundError) is told as the missing 'models' extra."""
    if isinstance(problem, ModuleNotFoundError):
        problem = f"needs the 'models' extra, pip install 'gatewayd[models]' ({problem})"
    print(f"gatewayd {args.cmd} {args.action}: {problem}", file=sys.stderr)
    return status


def _quantize(args: argparse.Namespace) -> int:
    """Quantize, print the report; 1 when the outputs agree too rarely, 2 when the inputs are wrong."""
    from gatewayd import quantize as qz

    if (args.method == "static") != (args.calibration is not None):
        return _fail(args, "--method static needs --calibration; dynamic takes none")
    if args.eval is None and args.calibration is None:
        return _fail(args, "--eval is required")
    metrics: dict[str, qz.Metric] = {
        "close": qz.Close(args.atol, args.rtol),
        "argmax": qz.SameArgmax(),
        "iou": qz.MaskIoU(args.threshold, args.min_iou),
    }
    try:
        names = qz.model_inputs(args.model)
        report = qz.quantize(
            args.model,
            args.output or args.model.with_suffix(".int8.onnx"),
            evaluation=qz.load_set(args.eval or args.calibration, names),
            method=args.method,
            calibration=qz.load_set(args.calibration, names) if args.calibration else None,
            quant_format=args.format,
            per_channel=args.per_channel,
            activations=args.activations,
            reduce_range=args.reduce_range,
            op_types=args.op_types.split(",") if args.op_types else None,
            exclude=args.exclude,
            metric=metrics[args.metric],
            min_agreement=args.min_agreement,
            threads=args.threads,
        )
    except (ModuleNotFoundError, ValueError, OSError) as e:  # SetError is a ValueError
        return _fail(args, e)
    print("\n".join(report.lines()))
    if not report.passed:
        return _fail(
            args,
            f"FAIL: only {report.agreement:.1%} of samples agree (--min-agreement "
            f"{report.min_agreement:.1%}); {report.output} was written but is marked as not passing",
            1,
        )
    return 0


def _bundle(args: argparse.Namespace) -> int:
    """Write the manifest and print what it lists; 2 for a bad folder, schema file or field value."""
    import json

    from gatewayd import bundle

    schema = None
    if args.input_schema is not None:
        try:
            schema = json.loads(args.input_schema.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return _fail(args, f"--input-schema {args.input_schema}: {e}")
        if not isinstance(schema, dict):
            return _fail(args, f"--input-schema {args.input_schema}: not a JSON object")
    try:
        m = bundle.write_manifest(
            args.folder,
            name=args.name,
            version=args.version,
            kind=args.kind,
            quantization=args.quantization,
            input_schema=schema,
            min_gatewayd=args.min_gatewayd,
            expires=args.expires,
        )
    except (bundle.BundleError, OSError) as e:
        return _fail(args, e)
    _print_bundle(args.folder, m)
    return 0


def _verify(args: argparse.Namespace) -> int:
    """1 when the bundle is refused, 2 when FOLDER is not a directory or a key cannot be read."""
    from gatewayd import bundle

    if not args.folder.is_dir():
        return _fail(args, f"{args.folder}: not a directory")
    try:
        keys = [bundle.load_public_key(p) for p in args.trusted_key]
    except ValueError as e:
        return _fail(args, f"--trusted-key: {e}")
    try:
        # Without keys the signature cannot be checked, but expiry and min_gatewayd still are.
        m = bundle.verify_signed(
            args.folder, keys, require_signature=bool(keys), installed_version=args.installed
        )
    except bundle.BundleError as e:
        return _fail(args, e, 1)
    signed = ", signature ok" if keys else ""  # without keys: as before signatures existed
    print(
        f"ok {m.name} {m.version} {m.quantization}, {len(m.files)} files, {m.total_size / 1e6:.1f} MB{signed}"
    )
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from gatewayd import bundle

    try:
        priv, pub = bundle.generate_keypair(args.out, args.name)
    except OSError as e:  # FileExistsError included
        return _fail(args, e)
    kid = bundle.key_id(bundle.load_public_key(pub))
    print(f"wrote {priv} (private, keep it off gateways) and {pub} (key id {kid}; give it to gateways)")
    return 0


def _sign(args: argparse.Namespace) -> int:
    """1 when the bundle does not match its manifest, 2 for a bad folder or key."""
    from gatewayd import bundle

    if not args.folder.is_dir():
        return _fail(args, f"{args.folder}: not a directory")
    try:
        private = bundle.load_private_key(args.key)
    except ValueError as e:
        return _fail(args, f"--key: {e}")
    try:
        kid = bundle.sign_bundle(args.folder, private)
    except bundle.BundleError as e:
        return _fail(args, e, 1)
    folder = args.folder
    print(f"signed {folder / bundle.MANIFEST_NAME} with key {kid}: wrote {folder / bundle.SIGNATURE_NAME}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    """Convert, then bundle the output; 2 for bad input or a missing 'models' extra."""
    from gatewayd import bundle
    from gatewayd import convert as conv  # torch/transformers only inside conv.convert

    try:
        out = conv.convert(args.checkpoint, args.out, args.precision)
        m = bundle.write_manifest(
            out,
            name=args.name or out.name,
            version=args.version,
            kind="onnxruntime-genai",
            quantization=args.precision,
        )
    except (ModuleNotFoundError, ValueError, OSError) as e:  # BundleError is a ValueError
        return _fail(args, e)
    _print_bundle(out, m)
    return 0


def _print_bundle(folder: Path, m: bundle_mod.Manifest) -> None:
    from gatewayd.bundle import MANIFEST_NAME

    print(f"wrote {folder / MANIFEST_NAME}: {m.name} {m.version} ({m.kind}, {m.quantization})")
    for rel, f in m.files.items():
        print(f"  {f.size:>14,}  {f.sha256[:12]}  {rel}")
    print(f"{len(m.files)} files, {m.total_size / 1e6:.1f} MB")


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
