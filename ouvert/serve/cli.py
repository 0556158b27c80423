"""`ouvert serve`: the OpenAI-compatible server on FastAPI and uvicorn, bound to 127.0.0.1 by default."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from ouvert.checkpoint import io
from ouvert.checkpoint.base import DTYPES


def add_serve_parser(sub) -> None:
    """Register `serve` on the `ouvert` command's subparsers."""
    p = sub.add_parser("serve", help="an OpenAI-compatible server with continuous batching, and a chat page")
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout) or GGUF file")
    p.add_argument("--tokenizer", help="tokenizer directory or GGUF file (default: the model's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="cache slots: requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; then 429")
    p.add_argument("--api-key", default=os.environ.get("OUVERT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 and /metrics (default $OUVERT_API_KEY)")
    p.add_argument("--max-len", type=int, help="tokens per slot, prompt + completion (default: the context length)")
    p.add_argument("--cache-memory", type=float, help="GiB the slot pool may take (default: a quarter of RAM)")
    p.add_argument("--chunk", type=int, default=64, help="prefill chunk, and the unit of prefix reuse")
    p.add_argument("--prefill-chunks", type=int, default=2,
                   help="chunks prefilled per step: more for a sooner first token, fewer for steadier streams")
    p.add_argument("--served-model-name", help="the model id clients use (default: the directory's name)")
    p.add_argument("--max-body", type=int, default=4 << 20, help="largest request body in bytes (default 4 MiB)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive in full; then 408 (default 30)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: as stored")
    p.set_defaults(func=cmd_serve)


def build_app(args: argparse.Namespace, start_engine: bool = True):
    """Load the model and tokenizer named by args and return (app, engine); start_engine=False leaves
    running the engine to the caller."""
    # here, not at the top: the other commands register `serve` without loading FastAPI and pydantic
    from ouvert.serve.api import create_app
    from ouvert.serve.engine import Engine, default_cache_memory

    model, tok = io.load(args.model, args.tokenizer, DTYPES.get(args.dtype))
    memory = int(args.cache_memory * (1 << 30)) if args.cache_memory else default_cache_memory()
    engine = Engine(model, tok, max_batch=args.max_batch, max_len=args.max_len, chunk=args.chunk,
                    prefill_chunks=args.prefill_chunks, max_queue=args.max_queue, cache_memory=memory)
    name = args.served_model_name or Path(args.model).resolve().name
    return create_app(engine, name, api_key=args.api_key, max_body=args.max_body,
                      body_timeout=args.body_timeout, start_engine=start_engine), engine


def cmd_serve(args: argparse.Namespace) -> None:
    """HTTP on a thread, the engine on this one. torch's OpenMP workers belong to the thread that first
    ran a parallel op (this one, loading the model); ops from another thread get a second team of
    workers, more threads than cores, and libgomp then stops spinning between ops: every parallel op
    waits for its workers to wake (one stream decoded 2.5x slower on 2 cores)."""
    import uvicorn

    app, engine = build_app(args, start_engine=False)
    print(f"ouvert serve: {engine.max_batch} slots of {engine.context_length} tokens, "
          f"{engine.cache.nbytes() / 2**20:.0f} MiB of cache; http://{args.host}:{args.port}/", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=5))

    def serve_http() -> None:
        try:
            server.run()  # off the main thread uvicorn leaves the signals to us
        finally:
            engine.stop()  # the server stopped (or could not start): so does the engine

    def shutdown(*_) -> None:
        server.should_exit = True

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    http = threading.Thread(target=serve_http, name="ouvert-http")
    http.start()
    engine.run()
    http.join()
    if not server.started:
        sys.exit("ouvert serve: the HTTP server did not start (the reason is above)")


class BackgroundServer:
    """uvicorn serving `app` from a thread on 127.0.0.1 and a free port (tests, benchmarks):

        with BackgroundServer(app) as url:  # http://127.0.0.1:PORT
            ...
    """

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = None

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
