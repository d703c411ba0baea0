"""The `smitin` console script. Each package adds its own subcommands; this module only dispatches.

Errors a user can cause are raised as `core.errors.UserError` (or a subclass) and printed as one line with a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def _user_errors() -> tuple[type[BaseException], ...]:
    from core.errors import UserError

    return (UserError, FileNotFoundError)


# Warnings that say nothing about the user's run: Beam's optional Google Cloud client is absent (it is not needed
# unless the Dataflow runner is used); shown with -v.
_NOISE = ("apitools not found",)


def _drop_known_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOISE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smitin", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from pipelines import cli as pipelines_cli

    pipelines_cli.register(commands)
    for module in (
        "models.cli",
        "registry.cli",
        "generation.commands",
        "generation.coconet_commands",
        "generation.studio_commands",
    ):
        __import__(module, fromlist=["register"]).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Commands that drive Beam pass unknown --flags through to it (runner options); others refuse them.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "accepts_beam_args", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.beam_args = extra
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        # Beam's local runner logs every worker's life cycle at INFO; keep the user's screen for progress.
        for noisy in ("apache_beam", "root"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:
            handler.addFilter(_drop_known_noise)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        print(f"smitin: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # the machine refused: a full disk, a folder made read-only or removed mid-run; outputs are written to a
        # temporary name and renamed, so nothing half-written is left under the output's name
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"smitin: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("smitin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
