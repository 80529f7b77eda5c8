"""Load benchmark of `grok.serve`: N concurrent streaming clients against the server on loopback,
beside the same requests through the engine directly, in one run on one model.

    python benchmarks/serve_load.py [--checkpoint demo] [--clients 32] [--requests 64]
                                    [--max-tokens 32] [--max-batch 32] [--json FILE]

Each request is a completion of `--max-tokens` tokens (the model's sampling.json settings at
temperature 1, its own seed, no stop) of a prompt cut from the demo's held-out text.
Engine: `--clients` threads, each submitting a request and reading its event stream, then the
next. Server: the app in uvicorn on a thread, and `--clients` asyncio clients (httpx, in a
process of their own) streaming server-sent events, each starting its next request when its
last ends. Both run the same requests after a warm-up that compiles every shape (the cache at
its largest, every prefill row count, then both runs once, untimed).

Per side: requests/s, generated tokens/s, time to first token (submit -> first token event or
SSE chunk) and inter-token latency (gaps between a request's token events or chunks), p50 and
p99. On a small CPU box the clients, the HTTP stack and the engine share the cores: the
server's overhead measured there is an upper bound of what it adds beside an accelerator.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts(model, count: int, seed: int = 0) -> list[str]:
    """`count` prompts of 8-48 words from the model directory's held-out text (or a fixed
    sentence when it has none)."""
    path = ROOT / "checkpoints" / "demo" / "heldout.txt"
    words = path.read_text(encoding="utf-8").split() if path.is_file() else \
        ("the quick brown fox jumps over the lazy dog " * 64).split()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(8, 48))
        start = int(rng.integers(0, max(1, len(words) - n)))
        out.append(" ".join(words[start:start + n]))
    return out


def summary(name: str, wall: float, ttft: list[float], gaps: list[float], tokens: int,
            requests: int) -> dict:
    ms = lambda xs, q: float(np.percentile(xs, q) * 1e3) if xs else float("nan")
    return {"side": name, "requests": requests, "seconds": wall, "req_per_s": requests / wall,
            "tok_per_s": tokens / wall, "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
            "itl_p50_ms": ms(gaps, 50), "itl_p99_ms": ms(gaps, 99)}


def warm_up(model, texts: list[str], max_batch: int) -> None:
    """Compile what the runs meet, so that they time steady serving: the cache at its largest
    (every slot, the whole context), then a prefill of every row count (powers of two up to
    `max_batch`) at every prompt-length bucket of `texts`."""
    from grok import Request
    from grok.serving.batching import bucket
    engine, context = model.engine, model.config.sequence_len
    full = engine.submit_all([Request([5 + i], context - 1) for i in range(max_batch)])
    for rid in full:
        next(iter(engine.events(rid)))
        engine.release(rid)
    buckets = {bucket(len(model.tokenizer.encode(t)), context) for t in texts}
    rows, rng = 1, np.random.default_rng(1)
    while rows <= max_batch:
        for length in sorted(buckets):
            ids = engine.submit_all([
                Request(rng.integers(3, model.config.vocab_size, length - 2).tolist(), 2)
                for _ in range(rows)])
            for rid in ids:
                engine.wait(rid)
                engine.pop(rid)
        rows *= 2


def run_engine(model, texts: list[str], max_tokens: int, clients: int) -> dict:
    """`clients` threads, as the server's clients: each submits a request, reads its events,
    then takes the next."""
    from grok import Request
    engine = model.engine
    ttft, gaps, tokens = [], [], [0]
    lock = threading.Lock()

    def one(i: int, text: str) -> None:
        ids = model.tokenizer.encode(text)
        start = time.perf_counter()
        # the model's sampling.json settings at temperature 1, as the server's requests get
        sampling = dataclasses.replace(model.sampling_defaults, temperature=1.0)
        rid = engine.submit(Request(ids, max_tokens, sampling, seed=i))
        last, mine, n = None, [], 0
        for event in engine.events(rid):
            now = time.perf_counter()
            if event.token is not None:
                n += 1
                if last is None:
                    first = now - start
                else:
                    mine.append(now - last)
                last = now
        engine.pop(rid)
        with lock:
            ttft.append(first)
            gaps.extend(mine)
            tokens[0] += n

    engine.start()
    try:
        t0 = time.perf_counter()
        queue = list(enumerate(texts))

        def client() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    i, text = queue.pop(0)
                one(i, text)
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
    return summary("engine", wall, ttft, gaps, tokens[0], len(texts))


async def _clients(url: str, texts: list[str], max_tokens: int, clients: int) -> dict:
    import httpx
    queue = list(enumerate(texts))
    ttft, gaps, tokens = [], [], [0]

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            i, text = queue.pop(0)
            body = {"model": "demo", "prompt": text, "max_tokens": max_tokens,
                    "temperature": 1.0, "seed": i, "stream": True}
            start, last = time.perf_counter(), None
            async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if not chunk["choices"] or not chunk["choices"][0]["text"]:
                        continue
                    now = time.perf_counter()
                    tokens[0] += 1
                    if last is None:
                        ttft.append(now - start)
                    else:
                        gaps.append(now - last)
                    last = now

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return summary("server", time.perf_counter() - t0, ttft, gaps, tokens[0], len(texts))


def run_server(model, texts: list[str], max_tokens: int, clients: int) -> dict:
    import uvicorn

    from grok.serve import create_app
    app = create_app(model, model_name="demo", max_waiting=10 ** 6)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        # The clients in a process of their own: their Python does not share the server's GIL.
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(texts, f)
            f.flush()
            out = subprocess.run([sys.executable, __file__, "--client-of", url, "--texts", f.name,
                                  "--max-tokens", str(max_tokens), "--clients", str(clients)],
                                 capture_output=True, text=True, timeout=1800)
        if out.returncode:
            raise RuntimeError(f"the clients failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout)
    finally:
        server.should_exit = True
        thread.join(60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="demo")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--client-of", default=None, help=argparse.SUPPRESS)   # the clients' process
    p.add_argument("--texts", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client_of:
        texts = json.loads(args.texts.read_text())
        print(json.dumps(asyncio.run(_clients(args.client_of, texts, args.max_tokens,
                                              args.clients))))
        return 0
    import grok
    from grok.cli import enable_compile_cache
    enable_compile_cache()
    model = grok.load(args.checkpoint, max_batch=args.max_batch, progress=False)
    texts = prompts(model, args.requests)
    warm_up(model, texts, args.max_batch)
    run_engine(model, texts, args.max_tokens, args.clients)   # once each, untimed
    run_server(model, texts, args.max_tokens, args.clients)
    rows = []
    for run in (lambda: run_engine(model, texts, args.max_tokens, args.clients),
                lambda: run_server(model, texts, args.max_tokens, args.clients)):
        steps = sum(model.engine.attend_spans.values())
        prefills = sum(model.engine.prefill_shapes.values())
        rows.append(run())
        rows[-1]["prefill_calls"] = sum(model.engine.prefill_shapes.values()) - prefills
        # generated tokens per decode step: how full the batch was
        rows[-1]["tokens_per_step"] = (args.requests * args.max_tokens /
                                       max(1, sum(model.engine.attend_spans.values()) - steps))
    engine, server = rows
    print(f"# {args.requests} requests x {args.max_tokens} tokens, {args.clients} clients, "
          f"max batch {args.max_batch}, {args.checkpoint}")
    print("| side | req/s | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
          "tokens/step | prefill calls |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} | "
              f"{r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.1f} | "
              f"{r['itl_p99_ms']:.1f} | {r['tokens_per_step']:.1f} | {r['prefill_calls']} |")
    print(f"server / engine tokens/s: {server['tok_per_s'] / engine['tok_per_s']:.3f}; "
          f"TTFT p50 added: {server['ttft_p50_ms'] - engine['ttft_p50_ms']:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
