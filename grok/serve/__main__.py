"""`python -m grok.serve`: an OpenAI-compatible HTTP server (/v1/completions,
/v1/chat/completions) on a model's long-lived engine. Errors before serving (a bad flag, a
missing checkpoint or chat template) are one line on stderr, exit status 2; SIGTERM or Ctrl-C
shuts down cleanly (requests in flight get --shutdown-timeout seconds to finish, then are
cancelled; the engine's thread is stopped).

Several hosts (the multi-host flags, as run.py's): every process runs this same command; process
0 serves HTTP and schedules, the others run each device call it announces
(`grok.serving.lockstep`) and serve nothing; they exit when process 0 does."""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from grok.launch import (DEFAULT_CHECKPOINT, GET_WEIGHTS, add_placement_flags, check_placement,
                         default_checkpoint, distributed_mesh, enable_compile_cache, holds_model,
                         load_options, tokenizer_file)
from grok.config import DEMO, DEMO_DIR, PREFILL_TOKENS, model_dir
from grok.errors import GrokError

PROG = "python -m grok.serve"
SPARE_FILES = 64                      # open files kept for the checkpoint, logs, the listener


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from grok.serve.app import DEFAULT_MAX_WAITING
    from grok.serve.connections import DEFAULT_MAX_CONNECTIONS
    from grok.serve.protocol import DEFAULT_MAX_PROMPT_CHARS, DEFAULT_MAX_STOP_CHARS
    from grok.serve.state import DEFAULT_READ_TIMEOUT
    p = _Parser(prog=PROG, description="Serve a Grok checkpoint over HTTP with OpenAI's "
                "completions and chat completions APIs (POST /v1/completions, "
                "/v1/chat/completions; GET /v1/models, /health, /metrics) and vLLM's tokenizer "
                "endpoints (GET /tokenizer_info; POST /tokenize, /detokenize).")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help=f"a Grok-1 directory (ckpt-0/ and tokenizer.model), a Grok-2 release "
                        f"directory, or '{DEMO}' (default: {DEFAULT_CHECKPOINT}, or the demo "
                        f"model when that holds no ckpt-0/)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=8, metavar="B",
                   help="requests decoded together (default: %(default)s)")
    p.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING, metavar="N",
                   help="answer 429 (Retry-After) while N requests wait for a slot "
                        "(default: %(default)s)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every request (default: the "
                        "GROK_API_KEY environment variable; unset: no key)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the name clients pass as `model` (default: 'demo' for the demo model, "
                        "else the model family's: 'grok-1', 'grok-2')")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template for /v1/chat/completions (default: the model "
                        "family's; a base model such as Grok-1 has none, and answers chats 400)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds requests in flight may take to finish before they "
                        "are cancelled (default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=None, metavar="C",
                   help="connections open at once; one more is answered 503 and closed "
                        f"(default: {DEFAULT_MAX_CONNECTIONS}, or fewer where ulimit -n allows "
                        "fewer)")
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT, metavar="S",
                   help="seconds a client has to send a whole request, from connecting or its "
                        "previous answer; then the connection is closed (a slow body: 408) "
                        "(default: %(default)s)")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   metavar="N", help="longest prompt in characters, refused (400) before it "
                                     "is tokenized (default: 32 a token of the model's context, "
                                     f"at least {DEFAULT_MAX_PROMPT_CHARS})")
    p.add_argument("--max-stop-chars", type=int, default=DEFAULT_MAX_STOP_CHARS, metavar="N",
                   help="longest stop string in characters (default: %(default)s)")
    p.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS, metavar="T",
                   help="prompt tokens prefilled per engine step; a longer prompt is prefilled "
                        "in chunks, between the other requests' decode steps "
                        "(default: %(default)s)")
    add_placement_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log loading and requests")
    args = p.parse_args(argv)
    check_placement(p, args)
    for flag, value, least in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1),
                               ("--max-waiting", args.max_waiting, 1),
                               ("--max-connections", args.max_connections, 1),
                               ("--max-prompt-chars", args.max_prompt_chars, 1),
                               ("--max-stop-chars", args.max_stop_chars, 1),
                               ("--prefill-tokens", args.prefill_tokens, 1)):
        if value is not None and value < least:   # (None: the default, decided later)
            p.error(f"{flag} must be >= {least}, got {value}")
    if args.port > 65535:
        p.error(f"--port must be <= 65535, got {args.port}")
    if not args.shutdown_timeout >= 0:
        p.error(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if not 0 < args.read_timeout < math.inf:
        p.error(f"--read-timeout must be a number of seconds > 0, got {args.read_timeout}")
    files = open_files_limit()
    if args.max_connections is None:   # the default, within what this process may open
        room = DEFAULT_MAX_CONNECTIONS if files is None else files - SPARE_FILES
        args.max_connections = max(1, min(DEFAULT_MAX_CONNECTIONS, room))
    elif files is not None and args.max_connections > files - SPARE_FILES:
        p.error(f"--max-connections {args.max_connections} needs more files than this process "
                f"may open ({files}, ulimit -n; {SPARE_FILES} kept for the rest)")
    return args


def open_files_limit() -> int | None:
    """How many files this process may open (the soft limit), or None when unlimited/unknown."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY or soft <= 0 else soft


def checkpoint_dir(checkpoint: str | None) -> str:
    """The model directory to serve; GrokError when there is none, or it has no tokenizer
    (which family's release a directory holds, grok.load decides)."""
    if checkpoint is None:
        found = default_checkpoint()
        if found is None and (DEMO_DIR / "ckpt-0").is_dir():
            print(f"{PROG}: no checkpoint in {DEFAULT_CHECKPOINT} (see checkpoints/README.md); "
                  f"serving the demo model {DEMO_DIR}", file=sys.stderr)
            checkpoint = DEMO
        else:
            checkpoint = str(found or DEFAULT_CHECKPOINT)
    path = model_dir(checkpoint)
    if not path.is_dir():
        raise GrokError(f"checkpoint not found: {path} is not a directory; {GET_WEIGHTS}")
    if holds_model(path) and not tokenizer_file(path).is_file():
        raise GrokError(f"tokenizer not found: {tokenizer_file(path)} is missing; "
                        f"{GET_WEIGHTS}")
    return str(path)


def default_model_name(path: str, model: Any) -> str:
    """What /v1/models calls the model unless --model-name says: 'demo' for the demo model,
    else its family's name ('grok-1', 'grok-2')."""
    if Path(path) == DEMO_DIR:
        return DEMO
    family = getattr(model, "family", None)
    return family.model_name if family is not None else "grok-1"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        path = checkpoint_dir(args.checkpoint)
        import uvicorn

        import grok
        from grok.serve.app import create_app
        from grok.serve.connections import server_config
        from grok.serving import lockstep
        enable_compile_cache()
        mesh = distributed_mesh(args)
        # Every process loads with the same flags; the followers' pool is the leader's (they
        # replay its new_pool call), the prefix cache only the leader's bookkeeping.
        model = grok.load(path, mesh, max_batch=args.max_batch, prefill_tokens=args.prefill_tokens,
                          chat_template=args.chat_template, **load_options(args))
        if model.tokenizer is None:
            raise GrokError(f"{path} holds no tokenizer: the server reads and writes text")
        import jax
        if jax.process_count() > 1 and jax.process_index() > 0:
            calls = lockstep.follow(model.runner)
            print(f"{PROG}: process {jax.process_index()}: ran {calls} device calls; process 0 "
                  "stopped", file=sys.stderr)
            return 0
        leader = lockstep.Leader(model.runner) if jax.process_count() > 1 else None
        model.new_engine(steps=leader)
        api_key = args.api_key if args.api_key is not None else os.environ.get("GROK_API_KEY")
        name = args.model_name or default_model_name(path, model)
        app = create_app(model, model_name=name, api_key=api_key,
                         max_waiting=args.max_waiting, max_prompt_chars=args.max_prompt_chars,
                         max_stop_chars=args.max_stop_chars, read_timeout=args.read_timeout)
    except (GrokError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    state = app.state.grok

    if leader is not None:          # after the engine's last step: the others stop following
        state.on_close.append(leader.close)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            # The app ends what still runs after the grace period with a clear error; uvicorn's
            # own limit, a little later, is the backstop. Not uvicorn's handler: it re-raises
            # the signal once shut down, so a clean shutdown would end "killed by SIGTERM".
            if not state.closing:
                state.shut_down(args.shutdown_timeout)
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True      # a second Ctrl-C
            self.should_exit = True

    config = server_config(app, host=args.host, port=args.port,
                           max_connections=args.max_connections, read_timeout=args.read_timeout,
                           shutdown_timeout=args.shutdown_timeout,
                           log_level="info" if args.verbose else "warning")
    server = Server(config)
    print(f"{PROG}: serving {path} as {app.state.grok.model_name!r} on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        if leader is not None:      # if the app's shutdown did not run
            leader.close()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
