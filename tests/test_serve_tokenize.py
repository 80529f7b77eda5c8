"""vLLM's tokenizer endpoints (grok/serve/tokenize.py): GET /tokenizer_info, POST /tokenize and
POST /detokenize on the demo model (SentencePiece, served with an API key) and a tiny Grok-2
release (tiktoken, its chat template), driven over loopback: tokens and texts equal the Python
tokenizer's and `model.chat_ids`, errors are 400 naming the field, the key is required, the
requests are counted and tokenized off the event loop. Then lm-evaluation-harness itself (when
installed: `pip install "lm-eval[api]"`, no torch): its remote tokenizer on both servers, and its
`local-completions` model with `tokenizer_backend=remote` running a multiple-choice and a
perplexity task from local files against the demo, its scores those of the Python API."""
from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest

from grok2_release import write_tiny_grok2

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client")

import grok                                                   # noqa: E402
from grok.serve import create_app                             # noqa: E402
from grok.serving.chat import GROK2_TEMPLATE                  # noqa: E402
from precision import assert_within, params_route_bound       # noqa: E402
from test_serve import Served, _logged, _metrics              # noqa: E402
from test_serve_chat import CONVERSATION, _error, _served_command   # noqa: E402

KEY = "tokenize-key"
NAME = "demo"
TEXTS = ["def fibonacci(n):", "naïve café? 日本語 😀", "  two  spaces\n\ttab", "x" * 300, "",
         "</s> is text here"]


# --- the servers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return grok.load("demo", progress=False)


@pytest.fixture(scope="module")
def served(model):
    served = Served(create_app(model, model_name=NAME, api_key=KEY))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def grok2(tmp_path_factory):
    """A tiny Grok-2 release served as `python -m grok.serve --checkpoint DIR` serves it."""
    release = tmp_path_factory.mktemp("grok2")
    write_tiny_grok2(release, ranks=2, seed=7)
    served = Served(_served_command(["--checkpoint", str(release), "--max-batch", "2"]))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def http2(grok2):
    with httpx.Client(base_url=grok2.url, timeout=60) as http:
        yield http


def _ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


# --- the demo model (SentencePiece, no chat template) -----------------------------------------
def test_tokenizer_info_names_the_special_tokens_and_the_context(http, model):
    info = _ok(http.get("/tokenizer_info"))
    tok = model.tokenizer
    assert info == {
        "tokenizer_class": "Tokenizer",
        "bos_token": None, "eos_token": "</s>", "pad_token": "<pad>",
        "bos_token_id": None, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": model.engine.max_context, "max_model_len": model.engine.max_context,
        "vocab_size": model.config.vocab_size,
    }
    assert info["eos_token"] == tok.piece(tok.eos_id) and tok.eos_id == model.config.eos_token
    assert "chat_template" not in info             # a base model has none (as vLLM leaves it out)


def test_tokenize_and_detokenize_equal_the_python_tokenizer(http, model):
    tok, context = model.tokenizer, model.engine.max_context
    for text in TEXTS:
        ids = tok.encode(text)
        for extra in ({}, {"add_special_tokens": False}, {"add_special_tokens": True},
                      {"model": NAME}):
            assert _ok(http.post("/tokenize", json={"prompt": text, **extra})) == {
                "tokens": ids, "count": len(ids), "max_model_len": context, "token_strs": None}
        assert _ok(http.post("/detokenize", json={"tokens": ids})) == {"prompt": tok.decode(ids)}
        if text.strip() == text:                   # (SentencePiece drops a leading space)
            assert tok.decode(ids) == text
    # a prompt longer than the context is tokenized: count and max_model_len tell it
    long = _ok(http.post("/tokenize", json={"prompt": "the cat sat " * 200}))
    assert long["count"] > long["max_model_len"] == context
    strs = _ok(http.post("/tokenize", json={"prompt": TEXTS[1], "return_token_strs": True}))
    assert strs["token_strs"] == [tok.piece(t) for t in tok.encode(TEXTS[1])]
    # every id of the vocabulary decodes as the tokenizer decodes it
    every = list(range(model.config.vocab_size))
    assert _ok(http.post("/detokenize", json={"tokens": every, "model": NAME}))["prompt"] == \
        tok.decode(every)
    assert _ok(http.post("/detokenize", json={"tokens": []})) == {"prompt": ""}


def test_tokenize_counts_what_a_completion_of_the_prompt_runs_on(http, model):
    count = _ok(http.post("/tokenize", json={"prompt": TEXTS[0]}))["count"]
    done = _ok(http.post("/v1/completions", json={"model": NAME, "prompt": TEXTS[0],
                                                  "max_tokens": 1, "temperature": 0}))
    assert done["usage"]["prompt_tokens"] == count


PROMPT = {"prompt": "x"}


@pytest.mark.parametrize("path, body, param, code", [
    ("/tokenize", {}, "prompt", None),
    ("/tokenize", {"prompt": None}, "prompt", None),
    ("/tokenize", {"prompt": 3}, "prompt", None),
    ("/tokenize", {"prompt": ["a", "b"]}, "prompt", None),
    ("/tokenize", {"prompt": [1, 2]}, "prompt", None),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "messages",
     None),
    ("/tokenize", {**PROMPT, "foo": 1}, "foo", "unknown_field"),
    ("/tokenize", {**PROMPT, "add_special_tokens": "no"}, "add_special_tokens", None),
    ("/tokenize", {**PROMPT, "add_special_tokens": 0}, "add_special_tokens", None),
    ("/tokenize", {**PROMPT, "return_token_strs": 1}, "return_token_strs", None),
    ("/tokenize", {**PROMPT, "add_generation_prompt": True}, "add_generation_prompt", None),
    ("/tokenize", {**PROMPT, "model": 3}, "model", None),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}]}, "messages", "unsupported"),
    ("/detokenize", {}, "tokens", None),
    ("/detokenize", {"tokens": None}, "tokens", None),
    ("/detokenize", {"tokens": "1 2"}, "tokens", None),
    ("/detokenize", {"tokens": [[1, 2]]}, "tokens", None),
    ("/detokenize", {"tokens": [1, 4096]}, "tokens", None),
    ("/detokenize", {"tokens": [-1]}, "tokens", None),
    ("/detokenize", {"tokens": [1, 1.5]}, "tokens", None),
    ("/detokenize", {"tokens": [True]}, "tokens", None),
    ("/detokenize", {"tokens": [None]}, "tokens", None),
    ("/detokenize", {"tokens": [2 ** 70]}, "tokens", None),
    ("/detokenize", {"tokens": [1], "prompt": "x"}, "prompt", "unknown_field"),
    ("/detokenize", {"tokens": [1], "model": []}, "model", None),
])
def test_bad_requests_are_400_naming_the_field(http, path, body, param, code):
    with _logged("grok", "uvicorn", "fastapi", "starlette") as records:
        _error(http.post(path, json=body), 400, param, code)
    assert [r for r in records if r.levelno >= 30 or r.exc_info] == []


def test_errors_as_the_other_endpoints_answer_them(http, served):
    for path, body in (("/tokenize", PROMPT), ("/detokenize", {"tokens": [1]})):
        assert "gpt-4" in _error(http.post(path, json={**body, "model": "gpt-4"}), 404, "model",
                                 "model_not_found")
        _error(http.post(path, content=b"{"), 400, None, "invalid_json")
        _error(http.post(path, json=["x"]), 400, None, "invalid_json")
        _error(http.post(path, content=b"x" * ((4 << 20) + 1)), 413, None, "request_too_large")
        _error(http.get(path), 405, None, "method_not_allowed")
    _error(http.post("/tokenize", content=b'{"prompt": "a\\ud800b"}'), 400, "prompt",
           "invalid_unicode")
    _error(http.post("/tokenizer_info"), 405, None, "method_not_allowed")
    named = _error(http.post("/detokenize", json={"tokens": [5, 6, 99999]}), 400, "tokens")
    assert "tokens[2]" in named and "99999" in named


@pytest.fixture
def tokenized(model, monkeypatch):
    """The length of every text the tokenizer encodes during the test, and the thread it
    runs on."""
    calls: list[tuple[int, threading.Thread]] = []
    encode = model.tokenizer.encode
    monkeypatch.setattr(model.tokenizer, "encode", lambda text: calls.append(
        (len(text), threading.current_thread())) or encode(text))
    return calls


def test_limits_hold_before_tokenizing_and_the_work_is_off_the_event_loop(http, served,
                                                                         tokenized):
    limit = served.state.text_limits.prompt_chars
    over = http.post("/tokenize", json={"prompt": "x" * (limit + 1)})
    assert f"{limit + 1} characters" in _error(over, 400, "prompt", "string_above_max_length")
    assert tokenized == []
    many = http.post("/detokenize", json={"tokens": [1] * (limit + 1)})
    assert f"{limit + 1} ids" in _error(many, 400, "tokens", "array_above_max_length")
    at = _ok(http.post("/tokenize", json={"prompt": "x" * limit}))
    assert at["count"] > 0 and [n for n, _ in tokenized] == [limit]
    # tokenized on a worker thread, not on the server's (the event loop's) thread
    assert tokenized[0][1] is not served.thread
    assert _ok(http.post("/detokenize", json={"tokens": [1] * limit}))["prompt"] is not None


def test_the_api_key_is_required(served):
    for method, path, body in (("GET", "/tokenizer_info", None), ("POST", "/tokenize", PROMPT),
                               ("POST", "/detokenize", {"tokens": [1]})):
        for headers in ({}, {"Authorization": "Bearer nope"},
                        [("Authorization", f"Bearer {KEY}")] * 2):
            response = httpx.request(method, f"{served.url}{path}", json=body, headers=headers)
            _error(response, 401, None, "invalid_api_key")
        keyed = httpx.request(method, f"{served.url}{path}", json=body,
                              headers={"Authorization": f"Bearer {KEY}"})
        assert keyed.status_code == 200, keyed.text


def test_the_requests_are_counted_by_endpoint_and_status(http):
    before = _metrics(http)
    _ok(http.get("/tokenizer_info"))
    _ok(http.post("/tokenize", json=PROMPT))
    _ok(http.post("/tokenize", json=PROMPT))
    _error(http.post("/tokenize", json={}), 400, "prompt")
    _ok(http.post("/detokenize", json={"tokens": [1]}))
    _error(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")
    samples = _metrics(http)
    grew = lambda endpoint, status: samples.get(
        f'grok_requests_total{{endpoint="{endpoint}",status="{status}"}}', 0.0) - before.get(
        f'grok_requests_total{{endpoint="{endpoint}",status="{status}"}}', 0.0)
    assert (grew("/tokenizer_info", 200), grew("/tokenize", 200), grew("/tokenize", 400),
            grew("/detokenize", 200), grew("/detokenize", 400)) == (1, 2, 1, 1, 1)
    assert samples.get("grok_prompt_tokens_total", 0.0) == before.get(
        "grok_prompt_tokens_total", 0.0)          # tokenizing runs nothing on the engine


# --- a tiny Grok-2 (tiktoken, a chat template) -----------------------------------------------
def test_grok2_tokenizer_info_gives_its_specials_and_chat_template(http2, grok2):
    model = grok2.state.model
    tok = model.tokenizer
    info = _ok(http2.get("/tokenizer_info"))
    assert info["tokenizer_class"] == "TiktokenTokenizer"
    assert (info["eos_token"], info["eos_token_id"]) == ("<|eos|>", tok.eos_id)
    assert (info["pad_token"], info["pad_token_id"]) == ("<|pad|>", tok.pad_id)
    assert info["bos_token"] is None and info["bos_token_id"] is None
    assert info["chat_template"] == GROK2_TEMPLATE == model.chat_template.source
    assert info["max_model_len"] == model.engine.max_context == model.config.sequence_len
    assert info["vocab_size"] == model.config.vocab_size
    # the eos text tokenizes to the eos id (what lm-eval's remote tokenizer reads it by)
    assert _ok(http2.post("/tokenize", json={"prompt": info["eos_token"]}))["tokens"] == \
        [tok.eos_id]


def test_grok2_prompts_round_trip_as_the_python_tokenizer(http2, grok2):
    tok = grok2.state.model.tokenizer
    for text in TEXTS + ["Human: hi<|separator|>\n\nAssistant:", "<|pad|> is text"]:
        ids = tok.encode(text)
        got = _ok(http2.post("/tokenize", json={"prompt": text, "add_special_tokens": True}))
        assert (got["tokens"], got["count"]) == (ids, len(ids))
        assert _ok(http2.post("/detokenize", json={"tokens": ids}))["prompt"] == text
    pieces = _ok(http2.post("/tokenize", json={"prompt": "naïve", "return_token_strs": True}))
    assert pieces["token_strs"] == [tok.piece(t) for t in pieces["tokens"]]


def test_grok2_messages_are_the_chat_template_s_prompt(http2, grok2):
    model = grok2.state.model
    ids = model.chat_ids(CONVERSATION)
    for extra in ({}, {"add_generation_prompt": True}, {"continue_final_message": False},
                  {"add_special_tokens": False}, {"model": "grok-2"}):
        got = _ok(http2.post("/tokenize", json={"messages": CONVERSATION, **extra}))
        assert (got["tokens"], got["count"]) == (ids, len(ids))
    parts = [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in CONVERSATION]
    assert _ok(http2.post("/tokenize", json={"messages": parts}))["tokens"] == ids
    # without the generation prompt: the conversation as the template renders it so
    bare = _ok(http2.post("/tokenize", json={"messages": CONVERSATION,
                                             "add_generation_prompt": False}))["tokens"]
    text = model.chat_template.render(CONVERSATION, add_generation_prompt=False)
    assert bare == model.tokenizer.encode(text) and not text.endswith("Assistant:")
    assert model.tokenizer.decode(ids) == text + "Assistant:"
    assert _ok(http2.post("/detokenize", json={"tokens": ids}))["prompt"] == text + "Assistant:"


@pytest.mark.parametrize("change, param, code", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}]},
     "messages[1].role", None),
    ({"messages": [{"role": "user"}]}, "messages[0].content", None),
    ({"messages": []}, "messages", None),
    ({"messages": "hi"}, "messages", None),
    ({"add_generation_prompt": "yes"}, "add_generation_prompt", None),
    ({"continue_final_message": True}, "continue_final_message", "unsupported"),
    ({"chat_template": "{{ messages }}"}, "chat_template", "unsupported"),
    ({"chat_template_kwargs": {"x": 1}}, "chat_template_kwargs", "unsupported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported"),
    ({"messages": [{"role": "user", "content": "x" * ((1 << 18) + 1)}]}, "messages",
     "string_above_max_length"),
])
def test_grok2_bad_messages_are_400_naming_the_field(http2, change, param, code):
    body = {"messages": [{"role": "user", "content": "hi"}], **change}
    _error(http2.post("/tokenize", json=body), 400, param, code)


# A base model given a template (--chat-template) that reads the special tokens chat_ids gives
TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}\n{% endfor %}"
            "{{ pad_token }}{% if add_generation_prompt %}assistant:{% endif %}")


def test_a_template_file_sees_the_same_special_tokens_with_or_without_the_generation_prompt(
        tmp_path):
    file = tmp_path / "chat.jinja"
    file.write_text(TEMPLATE)
    served = Served(_served_command(["--checkpoint", "demo", "--chat-template", str(file)]))
    try:
        demo = served.state.model
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        info = _ok(httpx.get(f"{served.url}/tokenizer_info"))
        assert info["chat_template"] == TEMPLATE
        url = f"{served.url}/tokenize"
        prompt = _ok(httpx.post(url, json={"messages": messages}))["tokens"]
        assert prompt == demo.chat_ids(messages)
        bare = _ok(httpx.post(url, json={"messages": messages, "add_generation_prompt": False}))
        text = "system: be brief</s>\nuser: hi</s>\n<pad>"
        assert demo.tokenizer.decode(prompt) == text + "assistant:"
        assert bare["tokens"] == demo.tokenizer.encode(text)
    finally:
        served.stop()


# --- lm-evaluation-harness --------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_eval(tmp_path_factory):
    """lm-eval (skipped when not installed), with the Hugging Face libraries kept offline and
    their caches in a temporary directory."""
    home = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("HF_HOME", str(home)), ("HF_DATASETS_OFFLINE", "1"),
                            ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_CACHE", str(home / "ds"))):
            patch.setenv(name, value)
        yield pytest.importorskip("lm_eval")


def test_lm_eval_s_remote_tokenizer_reads_these_endpoints(lm_eval, served, grok2, model):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support
    base = f"{served.url}/v1/completions"
    assert check_remote_tokenizer_support(base, auth_token=KEY)       # its auto-detection
    assert not check_remote_tokenizer_support(base, auth_token="nope", max_retries=1)
    remote = RemoteTokenizer(base, auth_token=KEY)
    tok = model.tokenizer
    for text in TEXTS:
        assert remote.encode(text) == tok.encode(text)
        assert remote.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert (remote.eos_token, remote.bos_token, remote.pad_token) == ("</s>", None, "<pad>")
    # Grok-2: its eos text is its eos id, and lm-eval's own rendering of the served chat
    # template (its Jinja environment, not the server's) gives the server's prompt
    remote2 = RemoteTokenizer(f"{grok2.url}/v1/completions")
    model2 = grok2.state.model
    assert remote2.eos_token_id == model2.tokenizer.eos_id and remote2.bos_token_id is None
    rendered = remote2.apply_chat_template(CONVERSATION)
    assert remote2.encode(rendered) == model2.chat_ids(CONVERSATION)


MC = [  # question, choices (lm-eval puts a space before each), answer
    ("def fibonacci(n):", ["\n    if n < 2:", "banana banana banana", "42"], 0),
    ("import numpy as", ["np", "the quick brown fox", "cat cat"], 0),
    ("if __name__ ==", ["'__main__':", "banana", "}}}}"], 0),
    ("class Foo(", ["object):", "the the the", "@@@@"], 1),
    ("return", ["x", "zebra zebra zebra", "]]]]"], 0),
]
PPL = ["def add(a, b):\n    return a + b\n",
       "import os\nimport sys\n\n\ndef main():\n    print(os.getcwd(), sys.argv)\n" * 3]
MAX_LENGTH = 64          # lm-eval's max_length: short, so the long document takes several windows


def _write_tasks(root) -> None:
    (root / "mc.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in MC))
    (root / "ppl.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in PPL))
    for name, kind, lines in (
            ("grok_mc", "multiple_choice", ["doc_to_text: question", "doc_to_target: answer",
                                            "doc_to_choice: choices",
                                            "metric_list:", "  - metric: acc"]),
            ("grok_ppl", "loglikelihood_rolling",
             ['doc_to_text: ""', "doc_to_target: text", "metric_list:",
              "  - metric: word_perplexity", "  - metric: byte_perplexity",
              "  - metric: bits_per_byte"])):
        data = root / ("mc.jsonl" if kind == "multiple_choice" else "ppl.jsonl")
        (root / f"{name}.yaml").write_text("\n".join([
            f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
            f"    test: {data}", "test_split: test", f"output_type: {kind}", *lines]) + "\n")


def _log_softmax(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _scored(model, context: list[int], continuation: list[int], bound) -> tuple[float, float]:
    """The Python API's log-likelihood of `continuation` after `context` (from a full forward
    of the model) and how far a served one may be from it (the sum of its tokens' bounds)."""
    ids = context + continuation
    lsm = _log_softmax(model.logits([ids])[0])
    steps = np.arange(len(context) - 1, len(ids) - 1)
    chosen = np.asarray(continuation)
    return float(lsm[steps, chosen].sum()), float(bound[chosen].sum())


def test_lm_eval_local_completions_scores_as_the_python_api(lm_eval, served, model, tmp_path,
                                                            monkeypatch):
    """lm-eval's `local-completions` with `tokenizer_backend=remote` against the demo (behind
    its API key: the completions read OPENAI_API_KEY, the tokenizer `auth_token`): a
    multiple-choice task and a perplexity task run from local files, each log-likelihood the
    Python API's within the bound of a served log-probability (tests/test_serve.py)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    _write_tasks(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tok = model.tokenizer
    eos = _ok(httpx.get(f"{served.url}/tokenizer_info",
                        headers={"Authorization": f"Bearer {KEY}"}))["eos_token_id"]
    out = simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{served.url}/v1/completions", "model": NAME,
                    "tokenizer_backend": "remote", "auth_token": KEY,
                    "max_length": MAX_LENGTH, "custom_prefix_token_id": eos,
                    "max_retries": 1, "timeout": 120},
        tasks=["grok_mc", "grok_ppl"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
        torch_random_seed=None, fewshot_random_seed=0)
    b = params_route_bound(model.runner.params, model.config)
    bound = b + b.max()
    # multiple choice: lm-eval's (context, " choice") pairs, tokenized as it does
    samples = sorted(out["samples"]["grok_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(MC)
    correct = 0
    for sample, (question, choices, answer) in zip(samples, MC):
        got = [r[0] for r in sample["filtered_resps"]]
        want, tolerance = [], []
        for choice in choices:
            whole, context = tok.encode(f"{question} {choice}"), tok.encode(question)
            value, slack = _scored(model, context, whole[len(context):], bound)
            want.append(value)
            tolerance.append(slack)
        assert_within(got, want, tolerance, "lm-eval multiple-choice log-likelihoods")
        ranked = sorted(range(len(want)), key=lambda i: want[i], reverse=True)
        assert want[ranked[0]] - want[ranked[1]] > tolerance[ranked[0]] + tolerance[ranked[1]]
        correct += ranked[0] == answer
    assert 0 < correct < len(MC)                  # the model gets some right, some wrong
    assert out["results"]["grok_mc"]["acc,none"] == correct / len(MC)
    # perplexity: each document's rolling windows (the long one several), prefixed by eos
    samples = sorted(out["samples"]["grok_ppl"], key=lambda s: s["doc_id"])
    assert len(samples) == len(PPL)
    total, slack, size = 0.0, 0.0, 0
    for sample, text in zip(samples, PPL):
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
            tok.encode(text), prefix_token=eos, max_seq_len=MAX_LENGTH - 2, context_len=1)]
        assert (len(windows) > 1) == (text is PPL[1])
        scored = [_scored(model, list(context), list(continuation), bound)
                  for context, continuation in windows]
        want, tolerance = sum(v for v, _ in scored), sum(s for _, s in scored)
        assert isinstance(sample["filtered_resps"][0], float)
        assert_within([sample["filtered_resps"][0]], [want], [tolerance],
                      "lm-eval rolling log-likelihood")
        total, slack = total + want, slack + tolerance
        size += len(text.encode("utf-8"))
    # bits per byte: the documents' log-likelihoods over their bytes, in bits
    assert_within([out["results"]["grok_ppl"]["bits_per_byte,none"]],
                  [-total / size / math.log(2)], [slack / size / math.log(2)],
                  "lm-eval bits per byte")
