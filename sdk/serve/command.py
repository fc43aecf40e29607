"""``milliwatt serve``: the endpoint of ``milliwatt.serve.create_app`` on uvicorn.

Imported only when the command runs (Starlette and uvicorn are the ``serve`` extra)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import ConfigError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML or TOML configuration file (its serve: section gives the defaults below)")
    p.add_argument("--host", help="address to bind (default serve.host, 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, help="port to listen on (default serve.port, 8000)")
    p.add_argument("--api-keys-env", metavar="VAR",
                   help="environment variable holding the client keys, comma-separated; clients send "
                        "'Authorization: Bearer <key>' (default serve.api_keys_env; none: no authentication)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def client_keys(variable: str | None) -> list[str] | None:
    """The client keys from ``variable`` (comma-separated); None when no variable is named."""
    if not variable:
        return None
    raw = os.environ.get(variable, "")
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    if not keys:
        raise ConfigError(f"--api-keys-env {variable}", "the variable is not set, or holds no key")
    return keys


def run(args: argparse.Namespace) -> int:
    from .._extras import require

    require("serve", "milliwatt serve", "starlette", "uvicorn")
    import uvicorn

    from ..client import Milliwatt
    from ..config import load_settings
    from ..redaction import RedactingFilter
    from .app import create_app

    settings = load_settings(args.config)
    host = args.host or settings.serve.host
    port = settings.serve.port if args.port is None else args.port
    keys = client_keys(args.api_keys_env or settings.serve.api_keys_env)
    if keys is None and host not in LOOPBACK:
        print(f"milliwatt: warning: serving on {host} without client keys: anyone who reaches it spends your "
              "provider budget (set --api-keys-env)", file=sys.stderr)  # fmt: skip
    # Built now, so a configuration problem is named before the port is bound; the app's
    # lifespan closes it (the ledger drained) when the server stops.
    mw = Milliwatt.from_config(settings)
    app = create_app(mw, api_keys=keys, close_on_shutdown=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=args.log_level, lifespan="on", server_header=False)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # a key in a URL never reaches the server's log
        logging.getLogger(name).addFilter(RedactingFilter())
    print(f"milliwatt: serving the OpenAI API at http://{host}:{port}/v1 ({'keys required' if keys else 'no authentication'})",
          file=sys.stderr)  # fmt: skip
    uvicorn.Server(config).run()
    return 0
