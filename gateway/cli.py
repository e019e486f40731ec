"""The ``lastmile`` command. The only place in the package that exits."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from gateway.errors import ConfigError, GatewayError

if TYPE_CHECKING:
    from gateway.config.schema import Config

DEFAULT_CONFIG = "config/gateway.yaml"


def _load(path: str) -> Config:
    """The validated config with logging set up from it (errors exit 2 via main)."""
    from gateway.config import load_config
    from gateway.observability import configure_logging

    config = load_config(path)
    configure_logging(config.log.level, config.log.format)
    return config


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    rules_dir = args.rules or config.rules.dir
    if config.workers > 1:
        from gateway.supervisor import run_supervisor

        return run_supervisor(config, rules_dir, args.config)
    return run_worker(config, rules_dir)


def run_worker(config: Config, rules_dir: str, worker_id: int = 0,
               bootstrap: dict[str, str] | None = None, reuse_port: bool = False) -> int:
    import uvloop

    from gateway.app import serve
    from gateway.pipeline import tune_gc

    tune_gc()  # after the imports: their objects are frozen out of collection

    log = structlog.get_logger("lastmile")
    try:
        uvloop.run(serve(config, rules_dir, worker_id, bootstrap, reuse_port))
    except (GatewayError, OSError) as exc:  # config, rules, Kafka unreachable, port in use
        log.error("gateway_failed", error=str(exc))
        print(f"lastmile: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.exception("gateway_failed", error=str(exc))
        return 1
    return 0


def _worker(args: argparse.Namespace) -> int:
    """One worker process under the supervisor (listeners shared with SO_REUSEPORT)."""
    config = _load(args.config)
    bootstrap = dict(item.split("=", 1) for item in args.bootstrap)
    return run_worker(config, args.rules, args.worker_id, bootstrap, reuse_port=True)


def _spool_inspect(args: argparse.Namespace) -> int:
    from gateway.buffer.inspect import main_inspect

    directory = args.dir
    if directory is None:
        from gateway.config import load_config

        directory = load_config(args.config).spool.dir
    return int(main_inspect(directory, args.json))


def _consume(args: argparse.Namespace) -> int:
    from gateway.consume import consume

    bootstrap = args.bootstrap
    if bootstrap is None:
        from gateway.config import load_config

        config = load_config(args.config)
        servers = config.kafka.clusters[args.cluster].bootstrap_servers
        emb = config.kafka.embedded
        bootstrap = f"{emb.host}:{emb.port}" if servers == "embedded" else servers
    return consume(bootstrap, args.topic, args.idle, args.headers)


def _bench(args: argparse.Namespace) -> int:
    """Run the benchmark suite of a source checkout (benchmarks/ is not installed)."""
    import subprocess
    from pathlib import Path

    if not Path("benchmarks/run.py").exists():
        print("lastmile: bench runs from a source checkout (benchmarks/run.py not found here)",
              file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "benchmarks.run", *(["--quick"] if args.quick else [])]
    return subprocess.call(cmd)


def version() -> str:
    """The installed distribution's version (pyproject.toml's)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lastmile")
    except PackageNotFoundError:  # a source tree run without installing it
        return "unknown (not installed)"


class _Version(argparse.Action):
    """``--version``, looked up only when asked (reading metadata costs ~0.1 s)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **_: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"lastmile {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lastmile", description="MQTT/HTTP-to-Kafka last-mile gateway")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default=DEFAULT_CONFIG, help="gateway settings YAML")
    serve.add_argument("--rules", default=None, help="rules directory (default: rules.dir)")
    serve.set_defaults(func=_serve)

    worker = sub.add_parser("worker")  # internal: started by the supervisor; no help entry
    worker.add_argument("--config", default=DEFAULT_CONFIG)
    worker.add_argument("--rules", required=True)
    worker.add_argument("--worker-id", type=int, required=True)
    worker.add_argument("--bootstrap", action="append", default=[])
    worker.set_defaults(func=_worker)

    from gateway.routing.cli_rules import add_rules_parser

    add_rules_parser(sub)

    from gateway.auth.passwd_cli import add_passwd_parser

    add_passwd_parser(sub)

    spool = sub.add_parser("spool", help="inspect the durable spool")
    spool_sub = spool.add_subparsers(dest="spool_command", metavar="COMMAND", required=True)
    inspect = spool_sub.add_parser("inspect", help="records, bytes and age per Kafka topic")
    inspect.add_argument("dir", nargs="?", default=None, help="spool directory")
    inspect.add_argument("--config", default=DEFAULT_CONFIG)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=_spool_inspect)
    read = sub.add_parser("consume", help="print the records of a Kafka topic (from the start)")
    read.add_argument("topic")
    read.add_argument("--bootstrap", default=None, help="default: the config's cluster")
    read.add_argument("--config", default=DEFAULT_CONFIG)
    read.add_argument("--cluster", default="default")
    read.add_argument("--idle", type=float, default=2.0, help="stop after S seconds with nothing")
    read.add_argument("--headers", action="store_true", help="print headers too")
    read.set_defaults(func=_consume)

    bench = sub.add_parser("bench", help="measure against Mosquitto; writes docs/benchmarks.md")
    bench.add_argument("--quick", action="store_true", help="smaller, faster run")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as exc:
        for error in getattr(exc, "errors", None) or [exc]:  # every one, a line each
            print(f"lastmile: config error: {error}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
