"""Command line: `osteoscreen serve | demo | config check`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from config import ConfigError, default_toml, load_settings
from dicom_node import __version__


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"osteoscreen: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.logging.level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dicom_node.service import Service

    try:
        service = Service(settings)
    except Exception as exc:  # noqa: BLE001 - start-up problems are operator errors: say what and where
        print(f"osteoscreen: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        service.serve_forever()
    except OSError as exc:
        print(f"osteoscreen: {exc}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dicom_node.demo import run_demo

    return run_demo(output=args.output, workdir=args.workdir)


def _config(args: argparse.Namespace) -> int:
    if args.action == "default":
        sys.stdout.write(default_toml())
        return 0
    try:
        s = load_settings(args.file)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(f"{args.file}: OK (AE {s.node.ae_title} on {s.node.host}:{s.node.port}, "
          f"{len(s.destinations)} destination(s), state in {s.node.state_dir})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="osteoscreen", description="Opportunistic osteoporosis screening DICOM node "
                                "(research use only).")
    p.add_argument("--version", action="version", version=f"osteoscreen {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the node")
    s.add_argument("--config", type=Path, help="TOML configuration file (default: embedded defaults)")
    s.set_defaults(func=_serve)
    d = sub.add_parser("demo", help="run the whole path once on loopback with the bundled real CT")
    d.add_argument("--output", type=Path, help="also leave sr.dcm, sc.dcm and sc.png here")
    d.add_argument("--workdir", type=Path, help="working directory (default: a new temporary one)")
    d.set_defaults(func=_demo)
    c = sub.add_parser("config", help="configuration tools")
    c.add_argument("action", choices=["check", "default"])
    c.add_argument("file", type=Path, nargs="?")
    c.set_defaults(func=_config)
    args = p.parse_args(argv)
    if args.command == "config" and args.action == "check" and not args.file:
        p.error("config check needs a FILE")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
