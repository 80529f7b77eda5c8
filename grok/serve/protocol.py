"""The OpenAI completions request, checked by hand: every field typed and bounded, unknown fields
refused, and each refusal an `ApiError` naming the field in one line (never a 500). The field
checkers (`integer`, `number`, `streaming`, `sampling_fields`, ...) serve grok.serve.chat too."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import secrets
from typing import Any, Callable

from grok.errors import GrokError, one_line
from grok.serving.sampling import MAX_LOGPROBS, is_int   # OpenAI allows 5 logprobs; we give 20

DEFAULT_MAX_TOKENS = 16          # OpenAI's default for /v1/completions
MAX_N = 16                       # completions per prompt
MAX_CHOICES = 64                 # prompts x n in one request
MAX_STOPS = 4                    # OpenAI's limit on stop strings
SEED_LIMIT = 2 ** 32             # the engine's seeds are uint32
# Twice what Grok-1's 8192-token context holds at its tokenizer's longest piece (16 characters):
# no prompt that fits is refused, and tokenizing one stays under ~0.1 s. A longer context gets
# the same 32 characters a token (prompt_chars_for).
DEFAULT_MAX_PROMPT_CHARS = 1 << 18
CHARS_PER_TOKEN = 32


def prompt_chars_for(context: int) -> int:
    """The default longest prompt in characters for a model of `context` tokens."""
    return max(DEFAULT_MAX_PROMPT_CHARS, CHARS_PER_TOKEN * context)
# A stop string is a short marker; every token compares each stop string with the text's tail.
DEFAULT_MAX_STOP_CHARS = 256
# Only a \u escape can put a surrogate in a JSON string (UTF-8 input cannot hold one).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
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
        self.status, self.message, self.code = status, one_line(message), code
        # a field name is the client's text: made printable so that the answer can be encoded
        self.param = None if param is None else one_line(_escaped(param), 80)
        self.kind, self.headers = kind, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclasses.dataclass(frozen=True)
class TextLimits:
    """The longest prompt and stop string (in characters) a request may hold; checked before
    anything is tokenized."""

    prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    stop_chars: int = DEFAULT_MAX_STOP_CHARS


@dataclasses.dataclass
class Prompt:
    """One prompt: its text as given (or decoded from its ids; what `echo` shows) and its token
    ids. A chat prompt, never echoed, leaves its text empty."""

    text: str
    ids: list[int]


@dataclasses.dataclass
class CompletionParams:
    """A checked request for completions (of /v1/completions, or /v1/chat/completions' one
    prompt). `sampling` holds only the fields given (the rest take the model's defaults); `seed`
    is drawn at random when none is given; `stop_ids` end a choice (a chat's turn-end tokens),
    their token kept out of the text."""

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
    stop_ids: tuple[int, ...] = ()


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object of valid Unicode text; ApiError otherwise."""
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as err:
        raise bad(None, f"the body is not valid JSON: {err}", "invalid_json") from None
    if not isinstance(data, dict):
        raise bad(None, f"the body must be a JSON object, got {_kind(data)}", "invalid_json")
    if _SURROGATE_ESCAPE.search(body):
        _check_unicode(data)
    return data


def _check_unicode(data: dict[str, Any]) -> None:
    """Refuse a lone surrogate (a \\uD800-\\uDFFF escape without its pair) anywhere in the body,
    naming the top-level field: it is not text, so it can be neither tokenized nor answered."""
    for name, value in data.items():
        if not _encodable(name):
            raise bad(name, f"the field name {shown(name)} holds a lone surrogate: JSON text "
                            f"must be valid Unicode", "invalid_unicode")
        pending = [value]
        while pending:                # a loop, not recursion: JSON may nest ~1000 deep
            item = pending.pop()
            if isinstance(item, str) and not _encodable(item):
                raise bad(name, f"{name} holds a lone surrogate (a \\uD800-\\uDFFF escape "
                                f"without its pair): text must be valid Unicode",
                          "invalid_unicode")
            if isinstance(item, list):
                pending.extend(item)
            elif isinstance(item, dict):
                pending.extend(item)
                pending.extend(item.values())


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escaped(text: str) -> str:
    """`text` with any lone surrogate written as its escape (\\ud800), so that it encodes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), "a value")


def shown(value: Any) -> str:
    """A field's value as an error message shows it: JSON, at most 40 characters."""
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) \
        else _kind(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(data: dict, name: str, default: int | None, least: int, most: int) -> int | None:
    """Field `name`: an integer in [least, most], `default` when absent or null."""
    value = data.get(name)
    if value is None:
        return default
    if not is_int(value) or not least <= value <= most:
        raise bad(name, f"{name} must be an integer in [{least}, {most}], got {shown(value)}")
    return value


def number(data: dict, name: str, least: float, most: float, *, open_low: bool = False
           ) -> float | None:
    """Field `name`: a finite number in [least, most] ((least, most] with `open_low`), None
    when absent or null."""
    value = data.get(name)
    if value is None:
        return None
    result = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            result = float(value)
        except OverflowError:         # an integer beyond any float
            result = math.inf
    ok = math.isfinite(result) and (least < result if open_low else least <= result) \
        and result <= most
    if not ok:
        low = "(" if open_low else "["
        raise bad(name, f"{name} must be a number in {low}{least:g}, {most:g}], got "
                        f"{shown(value)}")
    return result


def boolean(data: dict, name: str) -> bool:
    """Field `name`: true or false, false when absent or null."""
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {shown(value)}")
    return value


def refuse_unknown(data: dict, fields: tuple[str, ...]) -> None:
    """400 unknown_field for the first field of `data` not in `fields`."""
    unknown = [k for k in data if k not in fields]
    if unknown:
        name = str(unknown[0])
        raise bad(name, f"unknown field {shown(name)} (known: {', '.join(fields)})",
                  "unknown_field")


def refuse_unsupported(data: dict, names: tuple[str, ...], why: str) -> None:
    """400 unsupported for the first of `names` that `data` gives a non-empty value."""
    for name in names:
        if data.get(name) not in (None, {}, [], ""):
            raise bad(name, f"{name} is not supported{why}", "unsupported")


def check_user(data: dict) -> None:
    """`user` (OpenAI's end-user id, ignored here): a string or null."""
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", f"user must be a string, got {shown(user)}")


def streaming(data: dict) -> tuple[bool, bool]:
    """`stream` and `stream_options.include_usage` (the options only with stream: true)."""
    stream = boolean(data, "stream")
    options = data.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("stream_options", "stream_options must be an object with the field "
                                    "include_usage")
    return stream, boolean(options, "include_usage")


def sampling_fields(data: dict) -> dict[str, float | int]:
    """The sampling fields given (temperature, top_p, top_k and the penalties), checked; those
    not given are left out, to take the model's defaults."""
    sampling: dict[str, float | int] = {}
    for name, low, high, open_low in (("temperature", 0, 2, False), ("top_p", 0, 1, True),
                                      ("presence_penalty", -2, 2, False),
                                      ("frequency_penalty", -2, 2, False),
                                      ("repetition_penalty", 0, 100, True)):
        value = number(data, name, low, high, open_low=open_low)
        if value is not None:
            sampling[name] = value
    top_k = integer(data, "top_k", None, -1, 2 ** 31 - 1)
    if top_k is not None:
        sampling["top_k"] = max(top_k, 0)         # vLLM's -1 and 0 both mean no limit
    return sampling


def seed_of(data: dict) -> int:
    """`seed`, or one drawn at random when none is given."""
    seed = integer(data, "seed", None, 0, SEED_LIMIT - 1)
    return secrets.randbelow(SEED_LIMIT) if seed is None else seed


def check_model(data: dict, served: str) -> None:
    """The `model` field must name the served model: 404 model_not_found otherwise, as OpenAI."""
    model = data.get("model")
    if model is None:
        raise bad("model", "model is required: give the served model's name (GET /v1/models)")
    if not isinstance(model, str):
        raise bad("model", f"model must be a string, got {shown(model)}")
    if model != served:
        raise ApiError(404, f"the model {shown(model)} does not exist: this server serves "
                            f"{json.dumps(served)}", "model", "model_not_found")


def completion_params(data: dict, tokenizer: Any, vocab_size: int, context: int,
                      limits: TextLimits = TextLimits()) -> CompletionParams:
    """Check every field of a /v1/completions body (the model already checked): the sizes
    first, so that no work is spent on a request that is refused."""
    refuse_unknown(data, FIELDS)
    refuse_unsupported(data, ("logit_bias",), "")
    if data.get("suffix") not in (None, ""):
        raise bad("suffix", "suffix is not supported: this is not an insertion model",
                  "unsupported")
    check_user(data)
    echo = boolean(data, "echo")
    logprobs = integer(data, "logprobs", None, 0, MAX_LOGPROBS)
    # max_tokens 0 asks only for the echoed prompt's logprobs (log-likelihood evaluations)
    least = 0 if echo and logprobs is not None else 1
    max_tokens = integer(data, "max_tokens", DEFAULT_MAX_TOKENS, least, context - 1)
    n = integer(data, "n", 1, 1, MAX_N)
    best_of = data.get("best_of")
    if best_of is not None and (not is_int(best_of) or best_of != n):
        raise bad("best_of", f"best_of must equal n ({n}) or be null: choosing among "
                             f"completions is not supported, got {shown(best_of)}")
    stream, include_usage = streaming(data)
    stops = stop_strings(data.get("stop"), limits.stop_chars)
    seed = seed_of(data)
    sampling = sampling_fields(data)
    # Cheap checks first: nothing is tokenized before the request's size is known to be fine.
    items = _prompt_items(data.get("prompt"))
    if len(items) * n > MAX_CHOICES:
        raise bad("n" if n > 1 else "prompt",
                  f"{len(items)} prompts x n={n} asks for more than {MAX_CHOICES} completions "
                  f"in one request")
    room = context - max(max_tokens, 1)                 # max_tokens 0 still runs one step
    prompts = _prompts(items, tokenizer, vocab_size, room, limits.prompt_chars,
                       lambda which, tokens: _too_long(which, tokens, max_tokens, context))
    return CompletionParams(prompts, max_tokens, n, stream, include_usage, echo, stops, seed,
                            sampling, logprobs)


def _too_long(which: str, tokens: int, max_tokens: int, context: int) -> ApiError:
    return bad("prompt", f"{which} is {tokens} tokens: with max_tokens={max_tokens} it exceeds "
                         f"the model's context of {context} tokens", "context_length_exceeded")


def stop_strings(stop: Any, max_chars: int) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if isinstance(stops, list) and len(stops) > MAX_STOPS:
        raise bad("stop", f"stop takes at most {MAX_STOPS} strings, got {len(stops)}")
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", f"stop must be a string or a list of strings, got {shown(stop)}")
    if any(not s for s in stops):
        raise bad("stop", "stop strings must not be empty")
    longest = max(map(len, stops))
    if longest > max_chars:
        raise bad("stop", f"a stop string is {longest} characters, more than this server's "
                          f"limit of {max_chars}", "string_above_max_length")
    return tuple(stops)


def _prompt_items(prompt: Any) -> list[Any]:
    """The prompts of `prompt`: a string, a list of strings, a list of token ids or a list of
    token-id lists (each item is checked by `_prompts`)."""
    if prompt is None:
        raise bad("prompt", "prompt is required")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        return [prompt] if is_int(prompt[0]) else prompt    # one token list, or a list of them
    raise bad("prompt", f"prompt must be a string, a list of strings, a list of token ids or a "
                        f"list of token-id lists (non-empty), got {shown(prompt)}")


def _prompts(items: list[Any], tokenizer: Any, vocab_size: int, room: int, max_chars: int,
             too_long: Callable[[str, int], ApiError]) -> list[Prompt]:
    """Each item checked by its size and type (every item before any is tokenized), then
    tokenized (or its ids decoded); `room` is the most tokens a prompt may have, `too_long`
    makes the error for one that has more."""
    if len({isinstance(item, str) for item in items if isinstance(item, (str, list))}) > 1:
        raise bad("prompt", "prompt mixes strings and token lists")
    names = ["the prompt"] if len(items) == 1 else [f"prompt {i}" for i in range(len(items))]
    for which, item in zip(names, items):
        if isinstance(item, str):
            if not item:
                raise bad("prompt", f"{which} is empty")
            if len(item) > max_chars:
                raise bad("prompt", f"{which} is {len(item)} characters, more than this "
                                    f"server's limit of {max_chars}", "string_above_max_length")
        elif isinstance(item, list) and item:
            if len(item) > room:
                raise too_long(which, len(item))
            wrong = next((i for i, t in enumerate(item) if not is_int(t)), None)
            if wrong is not None:         # by index: the bad value may itself be null
                raise bad("prompt", f"{which}: token ids are integers, got "
                                    f"{shown(item[wrong])}")
            outside = next((t for t in item if not 0 <= t < vocab_size), None)
            if outside is not None:
                raise bad("prompt", f"{which}: token id {shown(outside)} is outside the "
                                    f"vocabulary [0, {vocab_size})")
        else:
            raise bad("prompt", f"{which} must be a string or a non-empty list of integer "
                                f"token ids, got {shown(item)}")
    out = []
    for which, item in zip(names, items):
        if isinstance(item, str):
            try:
                ids = tokenizer.encode(item)
            except GrokError as err:  # text SentencePiece cannot take
                raise bad("prompt", f"{which}: {err}") from None
            if not ids:
                raise bad("prompt", f"{which} is empty after tokenization")
            if len(ids) > room:
                raise too_long(which, len(ids))
            out.append(Prompt(item, ids))
        else:
            out.append(Prompt(tokenizer.decode(item), list(item)))
    return out
