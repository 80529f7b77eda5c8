"""POST /v1/chat/completions (grok/serve/chat.py) on a tiny Grok-2 release (tests/grok2_release.py)
served as `python -m grok.serve --checkpoint DIR` serves it, driven by the real `openai` client:
answers equal to the Python API's `model.chat`, streams, the turn's end at <|separator|>, logprobs
in the chat format, errors naming the field; and the demo model, a base model, given a template
with --chat-template. One load of each model for the file."""
from __future__ import annotations

import json
import logging

import pytest

from grok2_release import write_tiny_grok2

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

import grok                                            # noqa: E402
from grok.serve.__main__ import main                   # noqa: E402
from grok.serve.chat import piece_bytes                # noqa: E402
from test_serve import Served, _cached, _logged, _metrics, _settled   # noqa: E402

NAME = "grok-2"                       # the family's name: the server's default
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "the cat sat on the mat"},
    {"role": "assistant", "content": "the hat is on the cat!"},
    {"role": "user", "content": "naïve café? 日本語"},
]
# Conversations tried, in order, for one whose greedy reply reaches <|separator|> (the first
# does with write_tiny_grok2(seed=7)).
SEPARATOR_CANDIDATES = [[{"role": "user", "content": a}, {"role": "assistant", "content": b},
                         {"role": "user", "content": "the end"}]
                        for a in ("the cat", "sat on", "the mat", "hat")
                        for b in ("the cat", "sat on", "the mat")]


def _served_command(argv: list[str]):
    """The app `python -m grok.serve ARGV` makes (uvicorn's run stubbed out: never started)."""
    configs = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(uvicorn.Server, "run", lambda server, **_: configs.append(server.config))
        assert main(argv) == 1
    return configs[0].app


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    release = tmp_path_factory.mktemp("grok2")
    write_tiny_grok2(release, ranks=2, seed=7)
    served = Served(_served_command(["--checkpoint", str(release), "--max-batch", "4"]))
    # the engine's cache at its largest at once: the tests compile for one cache shape
    model = served.state.model
    warm = model.engine.submit_all([grok.Request([1], model.config.sequence_len - 1)] * 4)
    for rid in warm:
        next(iter(model.engine.events(rid)))
        model.engine.release(rid)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def model(served):
    return served.state.model


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=60) as http:
        yield http


def _chat(client, messages=CONVERSATION, **kwargs):
    return client.chat.completions.create(model=NAME, messages=messages, **kwargs)


def _streamed(client, **kwargs):
    """Every chunk of a streamed chat."""
    return list(_chat(client, stream=True, **kwargs))


def _error(response, status: int, param: str | None, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert code is None or error["code"] == code, error
    assert "\n" not in error["message"]
    return error["message"]


def test_the_command_line_names_the_model_by_its_family(client, http, model):
    assert model.family.name == "grok-2"
    assert [m.id for m in client.models.list()] == [NAME]
    assert http.get("/health").json() == {"status": "ok", "model": NAME}


def test_a_conversation_answers_as_the_python_api(client, model):
    out = _chat(client, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.model == NAME and choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and choice.logprobs is None
    assert choice.message.content == model.chat(CONVERSATION, 12, temperature=0)
    assert choice.message.content
    prompt = len(model.chat_ids(CONVERSATION))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (prompt, 12, prompt + 12)
    # content as text parts; max_completion_tokens wins over max_tokens
    parts = [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in CONVERSATION]
    short = _chat(client, messages=parts, max_tokens=12, max_completion_tokens=5, temperature=0)
    assert short.choices[0].message.content == model.chat(CONVERSATION, 5, temperature=0)
    assert short.usage.completion_tokens == 5 and short.usage.prompt_tokens == prompt
    # the fields OpenAI's clients send with their defaults, and `user`, are accepted
    same = _chat(client, max_tokens=5, temperature=0, response_format={"type": "text"},
                 user="someone", tools=[], logprobs=False)
    assert same.choices[0].message.content == short.choices[0].message.content


def test_a_stream_gives_the_same_content_with_the_role_first_and_usage_last(client, model):
    whole = _chat(client, max_tokens=10, temperature=0)
    chunks = _streamed(client, max_tokens=10, temperature=0,
                       stream_options={"include_usage": True})
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    first = chunks[0].choices[0].delta
    assert (first.role, first.content) == ("assistant", "")
    *deltas, finish, usage = chunks
    assert all(c.choices[0].delta.role is None and c.choices[0].finish_reason is None
               for c in deltas[1:])
    assert "".join(c.choices[0].delta.content for c in deltas) == whole.choices[0].message.content
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert finish.choices[0].delta.content is None and finish.choices[0].delta.role is None
    details = {"prompt_tokens_details"}
    assert usage.choices == [] and \
        usage.usage.model_dump(exclude=details) == whole.usage.model_dump(exclude=details)
    # the same prompt again: the prefix cache serves its whole pages (the whole answer's)
    prompt = model.chat_ids(CONVERSATION)
    assert usage.usage.prompt_tokens_details.cached_tokens == \
        _cached(prompt, prompt, model.engine.page_size) > 0
    plain = _streamed(client, max_tokens=10, temperature=0)
    assert plain[-1].choices[0].finish_reason == "length" and plain[-1].usage is None


def test_n_choices_share_the_prompt_and_take_seeds_seed_plus_index(client, http):
    sampled = dict(max_tokens=8, temperature=1.0, top_p=1.0)
    alone = [_chat(client, seed=s, **sampled).choices[0].message.content for s in (40, 41)]
    both = _chat(client, seed=40, n=2, **sampled)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.message.content for c in both.choices] == alone and alone[0] != alone[1]
    assert both.usage.prompt_tokens == _chat(client, max_tokens=1).usage.prompt_tokens
    texts, roles, reasons = {}, {}, {}
    for chunk in _streamed(client, seed=40, n=2, **sampled):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            roles.setdefault(c.index, c.delta.role)           # each choice's first delta
            reasons[c.index] = c.finish_reason
    assert texts == {0: alone[0], 1: alone[1]}
    assert roles == {0: "assistant", 1: "assistant"} and reasons == {0: "length", 1: "length"}


@pytest.fixture(scope="module")
def separated(model):
    """(conversation, its greedy reply's tokens up to and with <|separator|>): the first
    candidate whose reply reaches the separator before eos."""
    sep, eos = model.tokenizer.separator_id, model.tokenizer.eos_id
    for messages in SEPARATOR_CANDIDATES:
        tokens = model.generate([model.chat_ids(messages)], 40)[0]   # ends at eos only
        if sep in tokens[:tokens.index(eos) if eos in tokens else None]:
            return messages, tokens[:tokens.index(sep) + 1]
    pytest.fail("no candidate conversation reaches <|separator|>: add one that does")


def test_the_turn_ends_at_the_separator_which_stays_out_of_the_content(client, model,
                                                                       separated):
    messages, tokens = separated
    assert model.turn_end_ids == (model.tokenizer.separator_id, model.tokenizer.eos_id)
    out = _chat(client, messages=messages, max_tokens=40, temperature=0)
    content = out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len(tokens)              # the separator generated
    assert "<|separator|>" not in content and content == model.chat(messages, 40)
    # /v1/completions on the same prompt goes on past the separator (it stops at eos only):
    # the chat's content is its text up to the separator's
    text = client.completions.create(
        model=NAME, prompt=model.chat_ids(messages), max_tokens=len(tokens),
        temperature=0).choices[0].text
    assert text.endswith("<|separator|>") and content == text[:-len("<|separator|>")]
    # streamed, and with no max_tokens (a reply may fill the rest of the context)
    chunks = _streamed(client, messages=messages, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content
    assert chunks[-1].choices[0].finish_reason == "stop"
    scored = _chat(client, messages=messages, temperature=0, logprobs=True)
    assert len(scored.choices[0].logprobs.content) == len(tokens) - 1   # no separator entry


def test_logprobs_in_the_chat_format(client, model):
    out = _chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content, entries = out.choices[0].message.content, out.choices[0].logprobs.content
    generated = model.generate([model.chat_ids(CONVERSATION)], 6)[0]
    assert [e.token for e in entries] == [model.tokenizer.piece(t) for t in generated]
    assert all(e.bytes == list(piece_bytes(e.token)) for e in entries)
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == content
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token   # greedy
        assert e.top_logprobs[0].logprob == e.logprob < 0
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert all(t.bytes == list(piece_bytes(t.token)) for t in e.top_logprobs)
    # the same numbers as /v1/completions gives for the same prompt (tests/test_serve.py checks
    # those against the model's log-softmax); its logprobs 0 still gives each token's own
    legacy = client.completions.create(
        model=NAME, prompt=model.chat_ids(CONVERSATION), max_tokens=6, temperature=0,
        logprobs=0).choices[0].logprobs
    assert legacy.token_logprobs == [e.logprob for e in entries]
    assert legacy.top_logprobs == [{e.token: e.logprob} for e in entries]
    # top_logprobs 0 (or none): each token's own log-probability, no alternatives
    for extra in ({"top_logprobs": 0}, {}):
        bare = _chat(client, max_tokens=6, temperature=0, logprobs=True, **extra)
        assert [(e.token, e.logprob, e.top_logprobs) for e in bare.choices[0].logprobs.content] \
            == [(e.token, e.logprob, []) for e in entries]
    streamed = [e for c in _streamed(client, max_tokens=6, temperature=0, logprobs=True,
                                     top_logprobs=3)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == entries


CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("change, param, code", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}]},
     "messages[1].role", None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type", None),
    ({"messages": [{"role": "user"}]}, "messages[0].content", None),
    ({"messages": [{"role": "user", "content": "a", "tool_calls": [{"id": "x"}]}]},
     "messages[0].tool_calls", None),
    ({"messages": []}, "messages", None),
    ({"messages": None}, "messages", None),
    ({"messages": [{"role": "user", "content": "the cat " * 80}]}, "messages",
     "context_length_exceeded"),
    ({"max_tokens": 125}, "messages", "context_length_exceeded"),
    ({"foo": 1}, "foo", "unknown_field"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported"),
    ({"logit_bias": {"5": 10}}, "logit_bias", "unsupported"),
    ({"top_logprobs": 2}, "top_logprobs", None),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
    ({"logprobs": 1}, "logprobs", None),
    ({"max_tokens": 0}, "max_tokens", None),
    ({"max_completion_tokens": 128}, "max_completion_tokens", None),
    ({"n": 17}, "n", None),
    ({"temperature": 2.5}, "temperature", None),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ({"stream_options": {"include_usage": True}}, "stream_options", None),
    ({"user": 5}, "user", None),
    ({"seed": -1}, "seed", None),
])
def test_bad_requests_are_400_naming_the_field(http, change, param, code):
    with _logged("grok", "uvicorn", "fastapi", "starlette") as records:
        _error(http.post("/v1/chat/completions", json={**CHAT, **change}), 400, param, code)
    assert [r for r in records if r.levelno >= logging.WARNING or r.exc_info] == []


def test_unknown_models_bodies_and_the_client_library_errors(http, client):
    assert "gpt-4" in _error(http.post("/v1/chat/completions", json=dict(CHAT, model="gpt-4")),
                             404, "model", "model_not_found")
    _error(http.post("/v1/chat/completions", content=b"{"), 400, None, "invalid_json")
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\]\.role"):
        _chat(client, messages=[{"role": "user", "content": "a"}, {"role": "robot",
                                                                   "content": "b"}])


def test_chats_are_counted_and_a_client_that_leaves_is_cancelled(served, client, http, model):
    before = _metrics(http)
    out = _chat(client, max_tokens=3, temperature=0)
    _error(http.post("/v1/chat/completions", json=dict(CHAT, n=0)), 400, "n")
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", timeout=60,
                      json=dict(CHAT, max_tokens=100, temperature=0, stream=True)) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(next(lines)[6:])["choices"][0]["delta"]["role"] == "assistant"
        next(lines)
        assert served.state.live
    assert _settled(model.engine, state=served.state)
    samples = _metrics(http)
    grew = lambda name: samples.get(name, 0.0) - before.get(name, 0.0)
    assert grew('grok_requests_total{endpoint="/v1/chat/completions",status="200"}') == 2
    assert grew('grok_requests_total{endpoint="/v1/chat/completions",status="400"}') == 1
    assert grew("grok_prompt_tokens_total") == \
        out.usage.prompt_tokens + len(model.chat_ids(CHAT["messages"]))


def test_a_conversation_going_on_reports_its_cached_prompt_tokens(client, http, model):
    """A conversation going on from an earlier one (its prompt begins as the earlier one's)
    reports the prompt tokens the prefix cache served (whole pages; none for the first), whole
    and streamed (the usage chunk); /metrics counts the same tokens."""
    page = model.engine.page_size
    first = [{"role": "system", "content": "Prefix caching: " + "the cat sat on the mat. " * 4},
             {"role": "user", "content": "the hat"}]
    later = first + [{"role": "assistant", "content": "on the cat"},
                     {"role": "user", "content": "the end"}]
    ids = [model.chat_ids(m) for m in (first, later)]
    expected, whole = _cached(ids[1], ids[0], page), _cached(ids[1], ids[1], page)
    assert page <= expected < whole < len(ids[1])       # the prompts are long enough to tell
    before = _metrics(http)
    raw = http.post("/v1/chat/completions", json={"model": NAME, "messages": first,
                                                  "max_tokens": 3, "temperature": 0}).json()
    assert raw["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    out = _chat(client, messages=later, max_tokens=3, temperature=0)
    assert out.usage.prompt_tokens == len(ids[1])
    assert out.usage.prompt_tokens_details.cached_tokens == expected
    *_, last = _streamed(client, messages=later, max_tokens=3, temperature=0,
                         stream_options={"include_usage": True})
    assert last.choices == [] and last.usage.prompt_tokens_details.cached_tokens == whole
    assert _settled(model.engine)
    samples = _metrics(http)
    grew = lambda name: samples.get(name, 0.0) - before.get(name, 0.0)
    assert grew("grok_prefix_cache_queried_tokens_total") == len(ids[0]) + 2 * len(ids[1])
    assert grew("grok_prefix_cache_hit_tokens_total") == expected + whole
    assert samples["grok_kv_pages_used"] == 0 and samples["grok_kv_pages_cached"] > 0


# --- a base model: the demo, given a template with --chat-template ----------------------------
TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def test_the_demo_model_chats_with_a_template_file_and_refuses_without(tmp_path, capsys):
    file = tmp_path / "chat.jinja"
    file.write_text(TEMPLATE)
    served = Served(_served_command(["--checkpoint", "demo", "--chat-template", str(file)]))
    try:
        demo = served.state.model
        assert served.state.model_name == "demo"
        messages = [{"role": "user", "content": "def fibonacci(n):"}]
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0)
        # the demo's sampling.json sets a repetition penalty the Python API does not apply
        out = client.chat.completions.create(model="demo", messages=messages, max_tokens=4,
                                             temperature=0,
                                             extra_body={"repetition_penalty": 1.0})
        assert out.choices[0].message.content == demo.chat(messages, 4, temperature=0)
        assert out.usage.prompt_tokens == len(demo.chat_ids(messages)) \
            == len(demo.tokenizer.encode("user: def fibonacci(n):\nassistant:"))
        with pytest.MonkeyPatch.context() as patch:       # as loaded without --chat-template
            patch.setattr(demo, "chat_template", None)
            response = httpx.post(f"{served.url}/v1/chat/completions", timeout=60,
                                  json={"model": "demo", "messages": messages})
            assert "use /v1/completions" in _error(response, 400, None, "unsupported")
    finally:
        served.stop()
    # a template file that is missing or does not compile: one line, status 2, before loading
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    capsys.readouterr()
    for path in (tmp_path / "missing.jinja", tmp_path / "bad.jinja"):
        assert main(["--checkpoint", "demo", "--chat-template", str(path)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(path.name) in err, err
