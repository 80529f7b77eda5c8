"""The OpenAI completions request, checked by hand: every field typed and bounded, unknown fields
refused, and each refusal an `ApiError` naming the field in one line (never a 500)."""
from __future__ import annotations

import dataclasses
import json
import math
import secrets
from typing import Any

from grok.errors import one_line
from grok.serving.sampling import MAX_LOGPROBS, is_int   # OpenAI allows 5 logprobs; we give 20

DEFAULT_MAX_TOKENS = 16          # OpenAI's default for /v1/completions
MAX_N = 16                       # completions per prompt
MAX_CHOICES = 64                 # prompts x n in one request
MAX_STOPS = 4                    # OpenAI's limit on stop strings
SEED_LIMIT = 2 ** 32             # the engine's seeds are uint32
# Fields OpenAI's /v1/completions defines, plus vLLM's top_k and repetition_penalty.
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
          "stream_options", "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "seed", "best_of", "logit_bias", "suffix", "user")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty",
                   "frequency_penalty")


class ApiError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(one_line(message))
        self.status, self.message, self.param, self.code = status, one_line(message), param, code
        self.kind, self.headers = kind, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclasses.dataclass
class Prompt:
    """One prompt: its text as given (or decoded from its ids) and its token ids."""

    text: str
    ids: list[int]


@dataclasses.dataclass
class CompletionParams:
    """A checked /v1/completions request. `sampling` holds only the fields given (the rest take
    the model's defaults); `seed` is drawn at random when none is given."""

    prompts: list[Prompt]
    max_tokens: int
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    stops: tuple[str, ...]
    seed: int
    sampling: dict[str, float | int]
    logprobs: int | None = None   # top alternatives per token (None: no logprobs)


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; ApiError otherwise."""
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as err:
        raise bad(None, f"the body is not valid JSON: {err}", "invalid_json") from None
    if not isinstance(data, dict):
        raise bad(None, f"the body must be a JSON object, got {_kind(data)}", "invalid_json")
    return data


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), "a value")


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) \
        else _kind(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(data: dict, name: str, default: int | None, least: int, most: int) -> int | None:
    value = data.get(name)
    if value is None:
        return default
    if not is_int(value) or not least <= value <= most:
        raise bad(name, f"{name} must be an integer in [{least}, {most}], got {_shown(value)}")
    return value


def _number(data: dict, name: str, least: float, most: float, *, open_low: bool = False
            ) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    number = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:         # an integer beyond any float
            number = math.inf
    ok = math.isfinite(number) and (least < number if open_low else least <= number) \
        and number <= most
    if not ok:
        low = "(" if open_low else "["
        raise bad(name, f"{name} must be a number in {low}{least:g}, {most:g}], got "
                        f"{_shown(value)}")
    return number


def _boolean(data: dict, name: str) -> bool:
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {_shown(value)}")
    return value


def check_model(data: dict, served: str) -> None:
    """The `model` field must name the served model: 404 model_not_found otherwise, as OpenAI."""
    model = data.get("model")
    if model is None:
        raise bad("model", "model is required: give the served model's name (GET /v1/models)")
    if not isinstance(model, str):
        raise bad("model", f"model must be a string, got {_shown(model)}")
    if model != served:
        raise ApiError(404, f"the model {_shown(model)} does not exist: this server serves "
                            f"{json.dumps(served)}", "model", "model_not_found")


def completion_params(data: dict, tokenizer: Any, vocab_size: int, context: int
                      ) -> CompletionParams:
    """Check every field of a /v1/completions body (the model already checked)."""
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        name = str(unknown[0])
        raise bad(name, f"unknown field {_shown(name)} (known: {', '.join(FIELDS)})",
                  "unknown_field")
    if data.get("logit_bias") not in (None, {}):
        raise bad("logit_bias", "logit_bias is not supported", "unsupported")
    if data.get("suffix") not in (None, ""):
        raise bad("suffix", "suffix is not supported: this is not an insertion model",
                  "unsupported")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", f"user must be a string, got {_shown(user)}")
    echo = _boolean(data, "echo")
    logprobs = _integer(data, "logprobs", None, 0, MAX_LOGPROBS)
    # max_tokens 0 asks only for the echoed prompt's logprobs (log-likelihood evaluations)
    least = 0 if echo and logprobs is not None else 1
    max_tokens = _integer(data, "max_tokens", DEFAULT_MAX_TOKENS, least, context - 1)
    n = _integer(data, "n", 1, 1, MAX_N)
    best_of = data.get("best_of")
    if best_of is not None and (not is_int(best_of) or best_of != n):
        raise bad("best_of", f"best_of must equal n ({n}) or be null: choosing among "
                             f"completions is not supported, got {_shown(best_of)}")
    stream = _boolean(data, "stream")
    include_usage = False
    options = data.get("stream_options")
    if options is not None:
        if not stream:
            raise bad("stream_options", "stream_options is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options", "stream_options must be an object with the field "
                                        "include_usage")
        include_usage = _boolean(options, "include_usage")
    stops = _stops(data.get("stop"))
    seed = _integer(data, "seed", None, 0, SEED_LIMIT - 1)
    sampling: dict[str, float | int] = {}
    for name, low, high, open_low in (("temperature", 0, 2, False), ("top_p", 0, 1, True),
                                      ("presence_penalty", -2, 2, False),
                                      ("frequency_penalty", -2, 2, False),
                                      ("repetition_penalty", 0, 100, True)):
        value = _number(data, name, low, high, open_low=open_low)
        if value is not None:
            sampling[name] = value
    top_k = _integer(data, "top_k", None, -1, 2 ** 31 - 1)
    if top_k is not None:
        sampling["top_k"] = max(top_k, 0)         # vLLM's -1 and 0 both mean no limit
    prompts = _prompts(data.get("prompt"), tokenizer, vocab_size)
    if len(prompts) * n > MAX_CHOICES:
        raise bad("n", f"{len(prompts)} prompts x n={n} asks for more than {MAX_CHOICES} "
                       f"completions in one request")
    for i, prompt in enumerate(prompts):
        if len(prompt.ids) + max(max_tokens, 1) > context:   # 0 still runs one step
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            raise bad("prompt", f"{which} is {len(prompt.ids)} tokens: with max_tokens="
                                f"{max_tokens} it exceeds the model's context of {context} "
                                f"tokens", "context_length_exceeded")
    if seed is None:
        seed = secrets.randbelow(SEED_LIMIT)
    return CompletionParams(prompts, max_tokens, n, stream, include_usage, echo, stops, seed,
                            sampling, logprobs)


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", f"stop must be a string or a list of strings, got {_shown(stop)}")
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"stop takes at most {MAX_STOPS} strings, got {len(stops)}")
    if any(not s for s in stops):
        raise bad("stop", "stop strings must not be empty")
    return tuple(stops)


def _prompts(prompt: Any, tokenizer: Any, vocab_size: int) -> list[Prompt]:
    """A string, a list of strings, a list of token ids or a list of token-id lists."""
    if prompt is None:
        raise bad("prompt", "prompt is required")
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise bad("prompt", f"prompt must be a string, a list of strings, a list of token ids "
                            f"or a list of token-id lists (non-empty), got {_shown(prompt)}")
    out = []
    for i, item in enumerate(items):
        which = "prompt" if len(items) == 1 else f"prompt {i}"
        if isinstance(item, str):
            if not item:
                raise bad("prompt", f"{which} is empty")
            ids = tokenizer.encode(item)
            if not ids:
                raise bad("prompt", f"{which} is empty after tokenization")
            out.append(Prompt(item, ids))
        elif isinstance(item, list) and item and all(is_int(t) for t in item):
            outside = next((t for t in item if not 0 <= t < vocab_size), None)
            if outside is not None:
                raise bad("prompt", f"{which}: token id {_shown(outside)} is outside the "
                                    f"vocabulary [0, {vocab_size})")
            out.append(Prompt(tokenizer.decode(item), list(item)))
        else:
            raise bad("prompt", f"{which} must be a string or a non-empty list of integer "
                                f"token ids, got {_shown(item)}")
    kinds = {isinstance(item, str) for item in items}
    if len(kinds) > 1:
        raise bad("prompt", "prompt mixes strings and token lists")
    return out
