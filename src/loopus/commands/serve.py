"""`loopus serve MODEL`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for a LoopUS model.

Requests may set `num_loops`, `exit_strategy` and `exit_threshold`; responses report the mean loop
passes per generated token in `usage.mean_loop_passes`. Listens on 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from .chat import add_loop_arguments, loop_settings
from .convert import add_model_arguments, load_model

LOOPBACK = ("127.0.0.1", "localhost", "::1")

HELP = "serve a LoopUS model over an OpenAI-compatible HTTP API"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help=HELP)
    add_model_arguments(p)
    add_loop_arguments(p, "server-wide default; requests may override it")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default %(default)s: this machine only; 0.0.0.0 opens it to the "
                        "network, without authentication)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s; 0: any free port)")
    p.add_argument("--served-model-name", default=None,
                   help="the name requests give as `model` (default: MODEL's last path component)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="new tokens for a request that gives no max_tokens (default %(default)s)")
    p.add_argument("--loop-limit", type=int, default=32,
                   help="largest num_loops a request may ask for (default %(default)s)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serving.app import build_app
    from ..serving.engine import Engine

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.loop_limit < 1:
        raise ValueError(f"--loop-limit must be >= 1, got {args.loop_limit}")
    settings = loop_settings(args)
    sock = listen(args.host, args.port)  # a busy port is refused before the (slow) model load
    try:
        model, tokenizer = load_model(args)
        name = args.served_model_name or Path(args.model.rstrip("/")).name
        engine = Engine(model, tokenizer, name, settings, args.loop_limit)
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        if args.host not in LOOPBACK:
            print(f"loopus serve: warning: listening on {args.host}, reachable from the network without "
                  "authentication", file=sys.stderr)
        print(f"loopus serve: {name} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
        server = uvicorn.Server(uvicorn.Config(build_app(engine, args.max_tokens), log_level="warning",
                                               timeout_graceful_shutdown=10))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then hands the signal on
            pass
        print("loopus serve: stopped", flush=True)
    finally:
        sock.close()
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); connections queue in its backlog until uvicorn accepts them."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock
