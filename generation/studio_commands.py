"""`smitin studio`: serve the studio page and its API (thin: parse, check the binding is safe, run uvicorn)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

TOKEN_ENV = "SMITIN_STUDIO_TOKEN"


def register(commands: argparse._SubParsersAction) -> None:
    s = commands.add_parser(
        "studio",
        help="the web page to hear, steer, compare and harmonize (http://127.0.0.1:8000)",
        description="Serve the studio on the loopback interface. To open it to other machines, give --host and a "
        f"--token (or ${TOKEN_ENV}); every API call then needs it, and the page takes it once as ?token=.",
        epilog="example: smitin studio   # then open http://127.0.0.1:8000",
    )
    s.add_argument("--host", default=None, help="interface to listen on (default: params studio.host, 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default: params studio.port, 8000)")
    s.add_argument("--token", default=None, help=f"access token (default: ${TOKEN_ENV}); required beyond the loopback")
    s.add_argument("--workers", type=int, default=None, help="concurrent jobs (default: params studio.workers)")
    s.add_argument("--params", default="params.yaml", help="params file (sections studio, generate, registry, ...)")
    s.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI, else params)")
    s.set_defaults(func=_studio)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _studio(args) -> int:
    from pathlib import Path

    from core.config import load_section
    from core.errors import UserError
    from generation.studio.app import StudioParams, create_app

    params = load_section(StudioParams, args.params, "studio") if Path(args.params).exists() else StudioParams()
    over = {k: v for k, v in (("host", args.host), ("port", args.port), ("workers", args.workers)) if v is not None}
    params = params.with_overrides(over, "command line") if over else params
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(params.host) and not token:
        raise UserError(
            f"--host {params.host} opens the studio beyond this machine: give --token TOKEN (or set {TOKEN_ENV}) "
            f"so that only those who have it can generate"
        )
    import uvicorn

    app = create_app(params, params_path=args.params, tracking_uri=args.tracking_uri, token=token)
    where = f"http://{params.host}:{params.port}"
    print(f"studio: {where}" + (" (token required: open it with ?token=...)" if token else ""), file=sys.stderr)
    uvicorn.run(app, host=params.host, port=params.port, log_level="warning")
    return 0
