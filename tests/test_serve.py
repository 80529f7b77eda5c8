"""The OpenAI-compatible server (grok.serve) on loopback, driven by the real `openai` client and
httpx, serving the demo model from one in-process uvicorn server (one model load for the file)."""
from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from precision import assert_within, params_route_bound
from rawhttp import closed_by_server, connect, exchange, read_answer, request

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

import grok                                            # noqa: E402
from grok.serve import create_app                      # noqa: E402
from grok.serve.connections import server_config       # noqa: E402

KEY = "test-key"
NAME = "demo"
PROMPT = "def fibonacci(n):"
GREEDY = dict(temperature=0, max_tokens=8)


class Served:
    """A uvicorn server running `app` on a free loopback port, in a thread, configured as
    `python -m grok.serve` configures it (its connection limits at their defaults)."""

    def __init__(self, app):
        self.app, self.state = app, app.state.grok
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(server_config(app, shutdown_timeout=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True      # what uvicorn's SIGTERM handler does
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def model():
    return grok.load("demo", progress=False)


@pytest.fixture(scope="module")
def served(model):
    served = Served(create_app(model, model_name=NAME, api_key=KEY))
    # Run 8 requests at once first: the pool is made and the common prefill and decode shapes
    # compiled, so that the tests below mostly reuse them.
    engine, ids = model.engine, model.tokenizer.encode(PROMPT)
    warm = engine.submit_all([grok.Request(ids, model.config.sequence_len - len(ids))] * 8)
    for rid in warm:
        next(iter(engine.events(rid)))
        engine.release(rid)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as http:
        yield http


def _complete(client, **kwargs):
    return client.completions.create(model=NAME, **{"prompt": PROMPT, **kwargs})


def _streamed(client, **kwargs):
    """(text per choice index, finish_reason per index) of a streamed completion."""
    texts, reasons = {}, {}
    for chunk in _complete(client, stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons


def _settled(engine, timeout=10.0, state=None) -> bool:
    """Whether the engine holds no request (none waiting, in a slot or kept) within `timeout`,
    nor the server (`state`) any in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.waiting and all(s is None for s in engine.slots) and not engine.results \
                and not (state is not None and state.live):
            return True
        time.sleep(0.02)
    return False


def test_concurrent_streams_each_get_their_text_alone(client, model):
    """64 greedy streams at once on 8 slots (56 of them wait their turn): each gets the text it
    gets alone."""
    prompts = [f"def f{i}(x):" for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(lambda p: _streamed(client, prompt=p, **GREEDY)[0][0], prompts))
    alone = [_complete(client, prompt=p, **GREEDY).choices[0].text for p in prompts]
    assert together == alone
    assert len(set(alone)) > 1
    assert _settled(model.engine)


def test_stream_and_whole_give_the_same_text(client):
    whole = _complete(client, **GREEDY)
    texts, reasons = _streamed(client, **GREEDY)
    assert whole.object == "text_completion" and whole.model == NAME
    assert texts == {0: whole.choices[0].text} and whole.choices[0].text
    assert reasons == {0: whole.choices[0].finish_reason}


def test_same_seed_same_text_and_n_uses_seed_plus_index(client):
    sampled = dict(temperature=1.0, top_p=1.0, max_tokens=8)
    first = _complete(client, seed=7, **sampled).choices[0].text
    assert _complete(client, seed=7, **sampled).choices[0].text == first
    second = _complete(client, seed=8, **sampled).choices[0].text
    both = _complete(client, seed=7, n=2, **sampled)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [first, second]
    texts, _ = _streamed(client, seed=7, n=2, **sampled)
    assert texts == {0: first, 1: second}


def test_usage_finish_reason_echo_and_prompt_forms(client, model):
    ids = model.tokenizer.encode(PROMPT)
    out = _complete(client, temperature=0, max_tokens=4)
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == 4 and out.usage.total_tokens == len(ids) + 4
    assert out.choices[0].finish_reason == "length"
    echoed = _complete(client, temperature=0, max_tokens=4, echo=True)
    assert echoed.choices[0].text == PROMPT + out.choices[0].text
    texts, _ = _streamed(client, temperature=0, max_tokens=4, echo=True)
    assert texts[0] == PROMPT + out.choices[0].text
    # token ids, lists of strings and of token lists: one choice per prompt, in order
    assert _complete(client, prompt=ids, temperature=0, max_tokens=4).choices[0].text \
        == out.choices[0].text
    other = _complete(client, prompt="import os", temperature=0, max_tokens=4).choices[0].text
    many = _complete(client, prompt=[PROMPT, "import os"], temperature=0, max_tokens=4)
    assert [c.text for c in many.choices] == [out.choices[0].text, other]
    lists = _complete(client, prompt=[ids, model.tokenizer.encode("import os")],
                      temperature=0, max_tokens=4)
    assert [c.text for c in lists.choices] == [out.choices[0].text, other]


def test_stop_strings_end_the_text_before_them(client):
    plain = _complete(client, temperature=0, max_tokens=24).choices[0].text
    stop = plain[len(plain) // 2:len(plain) // 2 + 2]
    assert stop
    cut = _complete(client, temperature=0, max_tokens=24, stop=[stop, "@@@@"])
    assert cut.choices[0].text == plain[:plain.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    texts, reasons = _streamed(client, temperature=0, max_tokens=24, stop=stop)
    assert texts[0] == plain[:plain.find(stop)] and reasons[0] == "stop"


def _error(response, status: int, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert "\n" not in error["message"]
    return error["message"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "foo": 1}, "foo"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10 ** 6}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": 1.5}, "top_k"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "echo": 1}, "echo"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": [5] * 250, "max_tokens": 16}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "model": 3}, "model"),
    ({"prompt": "x", "stop": "s" * 257}, "stop"),
    ({"prompt": ["a"] * 65}, "prompt"),
    ({"prompt": ["a"] * 40, "n": 2}, "n"),
    ({"prompt": [None]}, "prompt"),
])
def test_bad_requests_are_400_naming_the_field(http, body, param):
    _error(http.post("/v1/completions", json={"model": NAME, **body}), 400, param)


def test_bad_bodies_unsupported_fields_and_unknown_models(http, client):
    assert "JSON" in _error(http.post("/v1/completions", content=b"{"), 400, None)
    assert "NaN" in _error(http.post("/v1/completions", content=b'{"prompt": NaN}'), 400, None)
    _error(http.post("/v1/completions", json=["x"]), 400, None)
    for bad in (-1, 21, 1.5, True):
        _error(http.post("/v1/completions", json={"model": NAME, "prompt": "x",
                                                  "logprobs": bad}), 400, "logprobs")
    # max_tokens 0 only with echo and logprobs (a log-likelihood request)
    _error(http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 0}),
           400, "max_tokens")
    long = http.post("/v1/completions", json={"model": NAME, "prompt": [5] * 250})
    assert long.json()["error"]["code"] == "context_length_exceeded"
    response = http.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert "gpt-4" in _error(response, 404, "model")
    assert response.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="use /v1/completions"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    _error(http.get("/v1/nothing"), 404, None)


def test_api_key_is_required(served, client):
    response = httpx.get(f"{served.url}/v1/models")
    assert _error(response, 401, None) and response.json()["error"]["code"] == "invalid_api_key"
    # Exactly one key: with two headers, which one decides is up to each proxy and server.
    for keys in ((KEY, "nope"), ("nope", KEY), (KEY, KEY)):
        twice = httpx.get(f"{served.url}/v1/models",
                          headers=[("Authorization", f"Bearer {key}") for key in keys])
        assert "2 Authorization headers" in _error(twice, 401, None)
    loose = httpx.get(f"{served.url}/v1/models", headers={"Authorization": f"bearer   {KEY}"})
    assert loose.status_code == 200                   # RFC 7235: the scheme is case-insensitive
    # liveness probes need no key (as vLLM's); everything else does, /metrics included
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok", "model": NAME}
    _error(httpx.get(f"{served.url}/metrics"), 401, None)
    wrong = httpx.post(f"{served.url}/v1/completions", headers={"Authorization": "Bearer nope"},
                       json={"model": NAME, "prompt": "x"})
    _error(wrong, 401, None)
    bad = openai.OpenAI(base_url=f"{served.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=NAME, prompt="x", max_tokens=1)


def _metrics(http) -> dict[str, float]:
    """/metrics' samples: {name{labels}: value}."""
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_models_health_and_metrics(client, http, model):
    """The metrics count this test's own requests (whatever ran before it, on this server)."""
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert http.get("/health").json() == {"status": "ok", "model": NAME}
    before = _metrics(http)
    list(_complete(client, stream=True, max_tokens=3, temperature=0))
    usage = list(_complete(client, stream=True, max_tokens=3, temperature=0,
                           stream_options={"include_usage": True}))
    assert usage[-1].choices == [] and usage[-1].usage.completion_tokens == 3
    _error(http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": -1}),
           400, "max_tokens")
    samples = _metrics(http)
    grew = lambda name: samples.get(name, 0.0) - before.get(name, 0.0)
    assert grew('grok_requests_total{endpoint="/v1/completions",status="200"}') == 2
    assert grew('grok_requests_total{endpoint="/v1/completions",status="400"}') == 1
    assert grew("grok_generated_tokens_total") == 6
    assert grew("grok_prompt_tokens_total") == 2 * usage[-1].usage.prompt_tokens
    assert samples["grok_queue_depth"] == 0 and samples["grok_slots_in_use"] == 0
    assert grew("grok_time_to_first_token_seconds_count") == 2
    assert grew("grok_time_per_output_token_seconds_count") >= 4   # 2 gaps per 3-token answer
    assert 'grok_time_per_output_token_seconds_bucket{le="+Inf"}' in samples


def _shared(a: list[int], b: list[int]) -> int:
    """How many tokens two prompts begin with alike."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _cached(prompt: list[int], earlier: list[int], page: int) -> int:
    """The prompt tokens the prefix cache serves `prompt` after `earlier` ran: the whole pages
    they share, the prompt's last token aside (always recomputed: its logits draw the first
    token)."""
    return min(_shared(prompt, earlier), len(prompt) - 1) // page * page


def test_a_prompt_sharing_a_prefix_reports_its_cached_tokens(client, http, model):
    """usage.prompt_tokens_details.cached_tokens: none for a new prompt, the shared whole pages
    for one beginning as an earlier one (whole and streamed), each prompt once whatever n (as
    prompt_tokens); /metrics' prefix-cache counters count the same tokens, per engine request."""
    page = model.engine.page_size
    prefix = "Prefix caching, a test of usage: " + "the quick brown fox jumps over a dog; " * 3
    first, second = prefix + "alpha", prefix + "beta, and an ending running past a page: " * 2
    ids = [model.tokenizer.encode(p) for p in (first, second)]
    expected, whole = _cached(ids[1], ids[0], page), _cached(ids[1], ids[1], page)
    assert page <= expected < whole < len(ids[1])       # the prompts are long enough to tell
    before = _metrics(http)
    raw = http.post("/v1/completions", json={"model": NAME, "prompt": first, **GREEDY}).json()
    assert raw["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    out = _complete(client, prompt=second, **GREEDY)
    assert out.usage.prompt_tokens == len(ids[1])
    assert out.usage.prompt_tokens_details.cached_tokens == expected
    # the same prompt again: all its whole pages (the first request cached them), streamed
    *_, last = _complete(client, prompt=second, stream=True, **GREEDY,
                         stream_options={"include_usage": True})
    assert last.choices == [] and last.usage.prompt_tokens_details.cached_tokens == whole
    both = _complete(client, prompt=second, n=2, **GREEDY)
    assert both.usage.prompt_tokens == len(ids[1])
    assert both.usage.prompt_tokens_details.cached_tokens == whole
    assert _settled(model.engine)
    samples = _metrics(http)
    grew = lambda name: samples.get(name, 0.0) - before.get(name, 0.0)
    assert grew("grok_prefix_cache_queried_tokens_total") == len(ids[0]) + 4 * len(ids[1])
    assert grew("grok_prefix_cache_hit_tokens_total") == expected + 3 * whole
    assert samples["grok_prefix_cache_hit_rate"] == pytest.approx(
        samples["grok_prefix_cache_hit_tokens_total"]
        / samples["grok_prefix_cache_queried_tokens_total"])
    assert samples["grok_kv_page_size_tokens"] == page
    assert samples["grok_kv_pages"] == model.engine.pages
    assert samples["grok_kv_pages_used"] == 0             # nothing runs: every page is free
    assert samples["grok_kv_pages_free"] == model.engine.pages
    assert samples["grok_kv_pages_cached"] >= whole // page
    assert grew("grok_kv_evictions_total") >= 0 and grew("grok_preemptions_total") >= 0


def test_a_client_that_disconnects_frees_its_request(served, model):
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 200, "temperature": 0,
            "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, headers=headers,
                      timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        assert served.state.live
    assert _settled(model.engine, timeout=10, state=served.state)
    # a whole (not streamed) completion whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/completions", json=dict(body, stream=False),
                   headers=headers, timeout=0.5)
    assert _settled(model.engine, timeout=10, state=served.state)


def test_a_full_queue_is_answered_429(served, client, model):
    engine = model.engine
    ids = model.tokenizer.encode(PROMPT)
    served.state.max_waiting = 1
    held = engine.submit_all([grok.Request(ids, 40) for _ in range(24)])   # 8 run, 16 wait
    try:
        assert len(engine.waiting) >= 1
        response = httpx.post(f"{served.url}/v1/completions",
                              headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": NAME, "prompt": "x", "max_tokens": 1})
        assert _error(response, 429, None) and response.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=NAME, prompt="x", max_tokens=1)
    finally:
        served.state.max_waiting = 64
        for rid in held:
            engine.release(rid)
    assert _settled(engine)


def _data(lines) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


def test_shutdown_finishes_requests_in_flight_and_stops_the_engine(model):
    """A second server on the same model, stopped (as on SIGTERM) while two streams run: the
    short one finishes, the long one is ended by the grace period with a clear error, the server
    exits and the engine's thread stops."""
    served = Served(create_app(model, model_name=NAME, max_waiting=8))
    body = {"model": NAME, "prompt": PROMPT, "temperature": 0, "stream": True}
    try:
        with httpx.stream("POST", f"{served.url}/v1/completions", timeout=60,
                          json=dict(body, max_tokens=240)) as long, \
                httpx.stream("POST", f"{served.url}/v1/completions", timeout=60,
                             json=dict(body, max_tokens=12)) as short:
            long_lines, short_lines = long.iter_lines(), short.iter_lines()
            next(line for line in long_lines if line.startswith("data: "))
            next(line for line in short_lines if line.startswith("data: "))
            stopper = threading.Thread(target=served.stop)
            stopper.start()                       # no new connections; in-flight ones go on
            short_rest = _data(short_lines)
            assert stopper.is_alive() and served.state.live
            served.state.shut_down(0)             # the grace period is over
            long_rest = _data(long_lines)
        stopper.join(30)
        assert not stopper.is_alive()
        assert short_rest[-1] == "[DONE]"
        assert json.loads(short_rest[-2])["choices"][0]["finish_reason"] == "length"
        assert long_rest[-1] == "[DONE]"
        assert json.loads(long_rest[-2])["error"]["code"] == "server_shutdown"
        assert not model.engine.driving
        assert _settled(model.engine, state=served.state)
    finally:
        model.engine.start()      # the module's server goes on using the engine


def test_command_line_refuses_bad_flags(capsys):
    from grok.serve.__main__ import main
    for argv in (["--port", "-1"], ["--max-waiting", "0"], ["--checkpoint", "/nonexistent"],
                 ["--max-connections", "0"],
                 ["--read-timeout", "0"], ["--read-timeout", "nan"], ["--read-timeout", "x"],
                 ["--max-prompt-chars", "0"], ["--max-stop-chars", "-1"]):
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code
        assert status == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "error" in err, err


def test_max_connections_must_fit_the_open_files_limit(monkeypatch, capsys):
    import grok.serve.__main__ as command
    monkeypatch.setattr(command, "open_files_limit", lambda: 1024)
    assert command.parse_args(["--max-connections", "960"]).max_connections == 960
    with pytest.raises(SystemExit) as exit_:
        command.parse_args(["--max-connections", "961"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "ulimit -n" in err and len(err.strip().splitlines()) == 1


def _readme_section() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("## Serve")
    return readme[start:readme.index("\n## ", start)]


def test_the_readme_examples_work_as_written(served, http, monkeypatch, capsys):
    section = _readme_section()
    lines = section.splitlines()
    first = lines.index("    import os")
    code = []
    for line in lines[first:]:
        if not line.startswith("    "):
            break
        code.append(line[4:])
    monkeypatch.setenv("GROK_API_KEY", KEY)
    exec(compile("\n".join(code).replace("http://127.0.0.1:8000", served.url), "README.md",
                 "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()
    curl = re.search(r"curl -s (\S+) .*?-d '(.*?)'", section, re.S)
    assert curl.group(1) == "http://127.0.0.1:8000/v1/completions"
    response = http.post("/v1/completions", json=json.loads(curl.group(2)))
    assert response.status_code == 200 and response.json()["choices"][0]["text"]


def test_every_flag_the_readme_names_is_a_flag_of_the_server(capsys):
    from grok.serve.__main__ import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    known = set(re.findall(r"(--[a-z][a-z-]*)", capsys.readouterr().out))
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", _readme_section()))
    assert len(flags) >= 8 and flags <= known, sorted(flags - known)


# --- hostile input --------------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@contextlib.contextmanager
def _logged(*names: str):
    """The log records these loggers (and their children) emit while inside."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.fixture
def tokenized(model, monkeypatch):
    """The length of every text the server's tokenizer encodes during the test."""
    lengths: list[int] = []
    encode = model.tokenizer.encode
    monkeypatch.setattr(model.tokenizer, "encode",
                        lambda text: lengths.append(len(text)) or encode(text))
    return lengths


def test_a_flood_is_refused_before_any_work_while_health_answers(served, tokenized):
    """Three 3-4 MB bodies at once (640,000 prompts; a 300,000-character prompt; a 3 MB stop
    string) are refused by their sizes, nothing tokenized, while /health answers every probe
    within a second (it froze for 3-8 s a body when prompts were tokenized on the event loop
    before they were counted)."""
    floods = [({"prompt": ["ab"] * 640_000}, "prompt", "640000 prompts"),
              ({"prompt": "x" * 300_000}, "prompt", "300000 characters"),
              ({"prompt": "x", "stop": "s" * 3_000_000}, "stop", "3000000 characters")]
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=served.url, timeout=30) as plain:
            while not done.is_set():
                start = time.monotonic()
                status = plain.get("/health").status_code
                latencies.append(time.monotonic() - start if status == 200 else float("inf"))
                time.sleep(0.01)

    def send(flood) -> httpx.Response:
        return httpx.post(f"{served.url}/v1/completions", headers=AUTH, timeout=60,
                          json={"model": NAME, "max_tokens": 1, **flood[0]})

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        time.sleep(0.1)
        with ThreadPoolExecutor(len(floods)) as pool:
            answers = list(pool.map(send, floods))
        time.sleep(0.1)
    finally:
        done.set()
        prober.join()
    for answer, (_, param, words) in zip(answers, floods):
        assert words in _error(answer, 400, param)
    assert tokenized == []
    print(f"/health under the flood: {len(latencies)} probes, the slowest "
          f"{max(latencies) * 1000:.0f} ms")
    assert len(latencies) >= 5 and max(latencies) < 1.0, latencies


def test_text_limits_hold_at_their_bounds_before_tokenizing(http, tokenized):
    limit = 1 << 18                   # the server's default --max-prompt-chars
    over = http.post("/v1/completions", json={"model": NAME, "prompt": "x" * (limit + 1)})
    assert f"{limit + 1} characters" in _error(over, 400, "prompt")
    assert over.json()["error"]["code"] == "string_above_max_length" and tokenized == []
    at = http.post("/v1/completions", json={"model": NAME, "prompt": "x" * limit})
    assert at.json()["error"]["code"] == "context_length_exceeded" and tokenized == [limit]
    stop = http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 1,
                                              "stop": ["s" * 256, "t"]})
    assert stop.status_code == 200, stop.text
    assert "257 characters" in _error(http.post("/v1/completions", json={
        "model": NAME, "prompt": "x", "stop": ["t", "s" * 257]}), 400, "stop")


@pytest.mark.parametrize("body, param", [
    (b'"prompt": "a\\ud800b"', "prompt"),
    (b'"prompt": ["ok", "\\udc00"]', "prompt"),
    (b'"prompt": "x", "\\ud800": 1', "\\ud800"),
    (b'"prompt": "x", "stop": ["\\udfff"]', "stop"),
    (b'"prompt": "x", "user": "\\ud83d"', "user"),
    (b'"prompt": "x", "stream": true, "stream_options": {"\\ud800": true}', "stream_options"),
])
def test_lone_surrogates_are_400_naming_the_field_and_the_connection_goes_on(served, body,
                                                                             param):
    with _logged("uvicorn", "grok") as records, connect(served.url) as sock:
        answer = exchange(sock, request("POST", "/v1/completions",
                                        b'{"model": "demo", ' + body + b"}", AUTH))
        assert answer.status == 400, answer.body
        error = answer.json()["error"]
        assert error["param"] == param and "lone surrogate" in error["message"], error
        # the same keep-alive connection serves the next request
        assert exchange(sock, request("GET", "/v1/models", headers=AUTH)).status == 200
    assert not [r for r in records if r.levelno >= logging.WARNING]


def test_an_escaped_surrogate_pair_is_text(http):
    pair = http.post("/v1/completions", headers={"Content-Type": "application/json"},
                     content=b'{"model": "demo", "prompt": "\\ud83d\\ude00 hi", "max_tokens": 1,'
                             b' "echo": true}')
    assert pair.status_code == 200 and pair.json()["choices"][0]["text"].startswith("\U0001F600")


def test_clients_that_leave_mid_body_or_mid_stream_are_no_server_error(served, http, model):
    """Each is an info line at most, and counted 499 (nginx's "client closed request")."""
    before = _metrics(http)
    grew = lambda samples, status: samples.get(
        f'grok_requests_total{{endpoint="/v1/completions",status="{status}"}}', 0.0) \
        - before.get(f'grok_requests_total{{endpoint="/v1/completions",status="{status}"}}', 0.0)
    with _logged("uvicorn", "grok", "starlette", "fastapi") as records:
        for _ in range(5):
            with connect(served.url) as sock:
                sock.sendall(request("POST", "/v1/completions", b'{"model": "demo", "pro',
                                     AUTH, length=1000))
        with httpx.stream("POST", f"{served.url}/v1/completions", headers=AUTH, timeout=60,
                          json={"model": NAME, "prompt": PROMPT, "max_tokens": 200,
                                "stream": True}) as response:
            next(line for line in response.iter_lines() if line.startswith("data: "))
        deadline = time.monotonic() + 10
        while grew(_metrics(http), 499) < 5:
            assert time.monotonic() < deadline, "the half-sent bodies were not counted"
            time.sleep(0.05)
        assert _settled(model.engine, state=served.state)
    assert grew(_metrics(http), 500) == 0
    assert not [r for r in records if r.levelno >= logging.WARNING or r.exc_info], records


def test_a_body_too_slow_to_arrive_is_408_and_its_connection_closed(served):
    served.state.read_timeout = 0.5
    try:
        with connect(served.url) as sock:
            sock.sendall(request("POST", "/v1/completions", b'{"model": ', AUTH, length=1000))
            start = time.monotonic()
            answer = read_answer(sock)
            assert 0.4 <= time.monotonic() - start < 5
            assert answer.status == 408 and answer.json()["error"]["code"] == "request_timeout"
            time.sleep(0.1)
            assert closed_by_server(sock)
    finally:
        served.state.read_timeout = 30.0


def test_the_command_line_gives_its_limits_to_the_server_and_the_app(monkeypatch):
    from grok.serve.__main__ import main
    configs = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, **_: configs.append(server.config))
    assert main(["--checkpoint", "demo", "--max-connections", "7", "--read-timeout", "2.5",
                 "--max-prompt-chars", "99", "--max-stop-chars", "3"]) == 1   # never started
    limits, state = configs[0].http.limits, configs[0].app.state.grok
    assert (limits.max_connections, limits.read_timeout) == (7, 2.5)
    assert (state.text_limits.prompt_chars, state.text_limits.stop_chars) == (99, 3)
    assert state.read_timeout == 2.5


# --- logprobs -------------------------------------------------------------------------------------
def _log_softmax(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module")
def logprob_bound(model):
    """How far a served log-probability (a cached decode) may be from numpy's log-softmax of a
    full forward: each logit by precision.logits_route_bound b_v (the two evaluations round
    float32 sums to bfloat16 differently), the logsumexp by at most max b (see
    tests/test_logprobs.py, which derives it)."""
    b = params_route_bound(model.runner.params, model.config)
    return b + b.max()


def test_logprobs_are_the_log_softmax_of_the_model_at_the_same_positions(client, model,
                                                                         logprob_bound):
    out = _complete(client, temperature=0, max_tokens=5, logprobs=3)
    lp = out.choices[0].logprobs
    ids = model.tokenizer.encode(PROMPT)
    generated = model.generate([ids], max_new_tokens=5)[0]
    assert [model.tokenizer.piece(t) for t in generated] == lp.tokens
    want = _log_softmax(model.logits([ids + generated])[0])[len(ids) - 1:]
    steps = np.arange(len(generated))
    assert_within(lp.token_logprobs, want[steps, generated], logprob_bound[generated],
                  "served logprobs")
    for i, top in enumerate(lp.top_logprobs):
        assert len(top) == 3 and list(top)[0] == lp.tokens[i]      # greedy: the most likely
        assert list(top.values()) == sorted(top.values(), reverse=True)
    chunks = [c.choices[0] for c in client.completions.create(
        model=NAME, prompt=PROMPT, temperature=0, max_tokens=5, logprobs=3, stream=True)
        if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.tokens]
    assert sum((c.logprobs.token_logprobs for c in chunks), []) == lp.token_logprobs
    # a token's offset: the length of the text before its event's (each chunk is one event)
    assert lp.text_offset == list(np.cumsum([0] + [len(c.text) for c in chunks[:-1]]))
    assert "".join(c.text for c in chunks) == out.choices[0].text


def test_echo_with_logprobs_scores_the_prompt_even_with_max_tokens_0(client, model,
                                                                    logprob_bound):
    """What a log-likelihood evaluation asks: the prompt's tokens' log-probabilities."""
    out = _complete(client, max_tokens=0, echo=True, logprobs=1)
    choice, ids = out.choices[0], model.tokenizer.encode(PROMPT)
    assert choice.text == PROMPT and out.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    want = _log_softmax(model.logits([ids])[0])
    steps = np.arange(len(ids) - 1)
    assert_within(lp.token_logprobs[1:], want[steps, ids[1:]], logprob_bound[ids[1:]],
                  "echoed prompt logprobs")
    both = _complete(client, temperature=0, max_tokens=2, echo=True, logprobs=2)
    lp = both.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 2
    # the prompt tokens' top alternatives: the 2 most likely, the greatest first
    assert lp.top_logprobs[0] is None and all(len(t) == 2 for t in lp.top_logprobs[1:])
    for top, chosen in zip(lp.top_logprobs[1:len(ids)], lp.token_logprobs[1:len(ids)]):
        values = list(top.values())
        assert values == sorted(values, reverse=True) and chosen <= values[0]   # both read from one log-softmax
    # offsets: each token's text starts where the ones before it end, in the echoed text
    offsets = lp.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert offsets[len(ids)] == len(PROMPT)


def test_default_limits_follow_the_machine_and_the_model(monkeypatch):
    """Without --max-connections the default shrinks to what ulimit -n leaves (a macOS shell's
    256 files: no error for running with no flags); without --max-prompt-chars the app allows
    32 characters a token of the model's context (Grok-2's 131,072 tokens: 4 Mi characters)."""
    import grok.serve.__main__ as command
    from grok.serve.protocol import prompt_chars_for
    monkeypatch.setattr(command, "open_files_limit", lambda: 256)
    assert command.parse_args([]).max_connections == 256 - command.SPARE_FILES
    assert prompt_chars_for(8192) == 1 << 18 and prompt_chars_for(131072) == 1 << 22
