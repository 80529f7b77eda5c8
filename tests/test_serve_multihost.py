"""`python -m grok.serve` over two local processes (JAX's distributed runtime, gloo): process 0
serves HTTP and schedules, process 1 replays its device calls (grok.serving.lockstep). The
answers are the one-process model's, every kind of device call runs (batched prefill, a prefill
shared by n, a chunked prompt, decode, prompt log-probabilities), and SIGTERM ends both."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from precision import assert_within, params_route_bound

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import grok                                             # noqa: E402
from grok.serving import lockstep                       # noqa: E402
from grok.serving.batching import Draw                  # noqa: E402
from grok.serving.sampling import Penalties             # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):"
LONG = "The quick brown fox jumps over the lazy dog. " * 4    # > 16 tokens: prefilled in chunks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def test_a_call_description_round_trips():
    arrays: list[np.ndarray] = []
    pen = Penalties(*(np.arange(6, dtype=np.int32).reshape(2, 3), np.ones((2, 3), np.int32),
                      *np.ones((3, 2), np.float32)))
    draw = Draw(np.array([7, 8], np.uint32), np.array([0, 3], np.int32),
                np.zeros((3, 2), np.float32), pen, True)
    args = (np.arange(4, dtype=np.int32).reshape(1, 4), 256, None, draw)
    specs = [lockstep._describe(a, arrays) for a in args]
    assert [a.shape for a in arrays] == [(1, 4), (2,), (2,), (3, 2), (2, 3), (2, 3), (2,), (2,),
                                         (2,)]
    pool = list(arrays)
    rebuilt = tuple(lockstep._build(s, pool) for s in specs)
    assert not pool
    assert rebuilt[1:3] == (256, None) and rebuilt[3].logprobs is True
    for got, want in zip(rebuilt[3].penalties, pen):
        np.testing.assert_array_equal(got, want)
    assert [a.shape for s in specs for a in lockstep._empty(s)] == [a.shape for a in arrays]
    with pytest.raises(TypeError, match="cannot carry a str"):
        lockstep._describe("text", [])


def test_two_processes_serve_what_one_process_computes(tmp_path):
    coordinator, http = _free_port(), _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
               " --xla_force_host_platform_device_count=2")
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "grok.serve", "--checkpoint", "demo", "--port", str(http),
         "--max-batch", "4", "--prefill-tokens", "16", "--mesh", "1,4",
         "--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", "2",
         "--process-id", str(i)], cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT)
        for i in range(2)]
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http}/v1", api_key="none",
                               max_retries=0, timeout=120)
        deadline = time.monotonic() + 300
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert all(p.poll() is None for p in procs), _logs(logs)
                assert time.monotonic() < deadline, "the server did not start\n" + _logs(logs)
                time.sleep(0.5)
        batched = client.completions.create(model="demo", prompt=[PROMPT, LONG], max_tokens=6,
                                            temperature=0, logprobs=1)
        shared = client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, n=3,
                                           temperature=1.0, seed=5)
        separate = [client.completions.create(model="demo", prompt=PROMPT, max_tokens=6,
                                              temperature=1.0, seed=5 + i).choices[0].text
                    for i in range(3)]
        echoed = client.completions.create(model="demo", prompt=LONG, max_tokens=0, echo=True,
                                           logprobs=1)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="demo", prompt=PROMPT, max_tokens=6, temperature=0, stream=True))
    finally:
        procs[0].send_signal(signal.SIGTERM)
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=60))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append("hung")
    assert codes == [0, 0], _logs(logs)
    assert "device calls; process 0 stopped" in _logs(logs)

    model = grok.load("demo", progress=False)
    b = params_route_bound(model.runner.params, model.config)
    bound = b + b.max()      # as test_serve's logprob bound: each logit and the logsumexp
    for prompt, choice in zip((PROMPT, LONG), batched.choices):
        ids = model.tokenizer.encode(prompt)
        generated = [_piece_id(model, piece) for piece in choice.logprobs.tokens]
        want = _log_softmax(model.logits([ids + generated])[0])[len(ids) - 1:]
        steps = np.arange(len(generated))
        assert_within(choice.logprobs.token_logprobs, want[steps, generated], bound[generated],
                      f"two-process logprobs of {prompt[:20]!r}")
    assert streamed == batched.choices[0].text
    # n choices share one prefill row (its cache row copied): each is the request run alone
    assert len(shared.choices) == 3 and len({c.text for c in shared.choices}) > 1
    assert [c.text for c in shared.choices] == separate
    ids = model.tokenizer.encode(LONG)
    want = _log_softmax(model.logits([ids])[0])
    steps = np.arange(len(ids) - 1)
    assert_within(echoed.choices[0].logprobs.token_logprobs[1:], want[steps, ids[1:]],
                  bound[ids[1:]], "two-process echoed prompt logprobs")


def _piece_id(model, piece: str) -> int:
    """The token id of a piece as the server names it (grok.serving.tokenizer.Tokenizer.piece)."""
    token = model.tokenizer._sp.PieceToId(piece.replace(" ", "\u2581"))
    assert model.tokenizer.piece(token) == piece
    return token


def _logs(files) -> str:
    out = []
    for i, f in enumerate(files):
        f.flush()
        f.seek(0)
        out.append(f"--- process {i}\n{f.read()[-3000:]}")
    return "\n".join(out)
