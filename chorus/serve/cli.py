"""`chorus serve`: the local web studio and its A1111 / OpenAI-compatible API."""
from __future__ import annotations

import os
import socket
import sys

from chorus.errors import ChorusError

INSTALL_HINT = "pip install 'chorus-diffusion[serve]'"


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="run the local web studio and API (A1111 /sdapi/v1 and OpenAI /v1/images)",
        description="Serve a web page for making images, and the HTTP APIs local clients call (A1111's "
                    "/sdapi/v1/*, used by Open WebUI and SillyTavern; OpenAI's /v1/images/generations), all "
                    "on one job queue. Binds 127.0.0.1:7860 unless told otherwise. Needs the 'serve' extra: "
                    f"{INSTALL_HINT}.")
    p.add_argument("--model", action="append", default=None, metavar="M",
                   help="a model folder, or 'default' (the shipped model); repeat to offer several (the first is "
                        "current; clients switch with /sdapi/v1/options)")
    p.add_argument("--host", default=None, help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (7860, where A1111 clients look)")
    p.add_argument("--listen", action="store_true", help="bind 0.0.0.0: reachable from the network")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /api, /sdapi and /v1 (default: $CHORUS_API_KEY)")
    p.add_argument("--queue-size", type=int, default=16, metavar="N",
                   help="jobs that may wait; more get HTTP 429 (16)")
    p.add_argument("--preview-every", type=int, default=None, metavar="N",
                   help="decode a preview every N steps (default: about 5 per image; 0: no previews)")
    p.add_argument("--device", default=None, help="where the models run: cpu (default), cuda, cuda:N or mps")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="the models' precision (fp32; bf16 is ~1.7× faster on CPUs with AMX / AVX512-BF16)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet of each model when it loads: the first request of each image size "
                        "waits for the compile (a minute or two on a CPU), later ones run ~1.4× faster")
    p.set_defaults(func=run_serve)


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ChorusError(f"Cannot listen on {host}:{port} ({e.strerror or e}); another server may be using "
                              "the port: pass --port N.") from None


def run_serve(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as e:
        raise ChorusError(f"`chorus serve` needs the web server packages Starlette and uvicorn, which are not "
                          f"installed ({e.name} is missing). Install them with: {INSTALL_HINT} (or pip install "
                          "starlette uvicorn), then run `chorus serve` again.") from None
    if not 1 <= args.port <= 65535:
        raise ChorusError(f"--port must be between 1 and 65535, got {args.port}.")
    if args.preview_every is not None and args.preview_every < 0:
        raise ChorusError(f"--preview-every must be 0 or more, got {args.preview_every}.")
    from chorus.serve.app import create_app
    from chorus.serve.engine import Engine, unique_models
    host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    key = args.api_key if args.api_key is not None else os.environ.get("CHORUS_API_KEY") or None
    models = unique_models(args.model or ["default"])
    engine = Engine(models, queue_size=args.queue_size, preview_every=args.preview_every, device=args.device,
                    dtype=args.dtype, compile=args.compile)
    _check_port(host, args.port)
    app = create_app(engine, api_key=key)
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    print(f"chorus serve: the studio is at http://{shown}:{args.port}/ (A1111 API at /sdapi/v1, OpenAI API at /v1); "
          f"model {engine.current!r}, queue {engine.queue_size}{', API key required' if key else ''}. "
          "Ctrl+C stops it.", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "::1", "localhost") and not key:
        print("chorus serve: warning: listening on the network without --api-key; anyone who can reach this "
              "port can generate images.", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=host, port=args.port, log_level="warning", access_log=False)
    finally:
        engine.stop(timeout=5)
    return 0
