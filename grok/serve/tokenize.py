"""vLLM's tokenizer endpoints, with vLLM's field names: GET /tokenizer_info, POST /tokenize and
POST /detokenize, as lm-evaluation-harness's remote tokenizer reads them (`local-completions`
with `tokenizer_backend=remote`: it strips /v1/completions from its base_url, reads eos_token,
bos_token, pad_token and chat_template from /tokenizer_info, posts {"prompt", "add_special_tokens":
false} to /tokenize and reads "tokens", posts {"tokens"} to /detokenize and reads "prompt").

/tokenize tokenizes as the completions endpoints do (a prompt: `tokenizer.encode`; messages:
the chat template, `Grok.chat_ids`), so its tokens are those a completion of the same prompt
runs on. The requests are checked by hand, as protocol.py checks completions: unknown fields
refused, each refusal a 400 naming the field.
"""
from __future__ import annotations

from typing import Any

from grok.errors import GrokError
from grok.serve.chat import NO_TEMPLATE, prompt_ids
from grok.serve.protocol import (ApiError, bad, boolean, check_model, parse_json,
                                 refuse_unknown, refuse_unsupported, shown)
from grok.serve.state import ServerState
from grok.serving.sampling import is_int

# vLLM's TokenizeCompletionRequest and TokenizeChatRequest fields this server reads; the
# UNSUPPORTED ones are refused unless empty (or false).
TOKENIZE_FIELDS = ("model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                   "continue_final_message", "return_token_strs", "chat_template",
                   "chat_template_kwargs", "tools")
UNSUPPORTED = ("continue_final_message", "chat_template", "chat_template_kwargs", "tools")
CHAT_ONLY = ("add_generation_prompt", "continue_final_message", "chat_template",
             "chat_template_kwargs", "tools")
DETOKENIZE_FIELDS = ("model", "tokens")


def tokenizer_info(state: ServerState) -> dict[str, Any]:
    """The tokenizer's special tokens (text and id; null where it has none), the model's context
    and vocabulary, and its chat template's Jinja source where it has one. The names are those
    of a Hugging Face tokenizer_config.json, as vLLM's /tokenizer_info answers them
    (`model_max_length`), plus vLLM's `max_model_len` (the engine's context, as /tokenize
    answers it) and the ids. No prompt carries a BOS or EOS the client did not put there:
    add_bos_token and add_eos_token are false (Grok-1 was released encoding prompts without
    BOS; Grok-2's tokenizer has none)."""
    model, tok = state.model, state.model.tokenizer
    context = state.engine.max_context
    eos = tok.eos_id
    pad = tok.pad_id if tok.pad_id >= 0 else None
    info: dict[str, Any] = {
        "tokenizer_class": type(tok).__name__,
        "bos_token": None, "eos_token": tok.piece(eos),
        "pad_token": None if pad is None else tok.piece(pad),
        "bos_token_id": None, "eos_token_id": eos, "pad_token_id": pad,
        "add_bos_token": False, "add_eos_token": False,
        "model_max_length": context, "max_model_len": context,
        "vocab_size": model.config.vocab_size,
    }
    if model.chat_template is not None:
        info["chat_template"] = model.chat_template.source
    return info


def checked_tokenize(state: ServerState, body: bytes) -> dict[str, Any]:
    """A /tokenize body checked and tokenized (CPU work: run it off the event loop): {"tokens",
    "count", "max_model_len", "token_strs"}; ApiError otherwise. A prompt longer than the
    context is no error here: `count` and `max_model_len` say whether it fits."""
    data = parse_json(body)
    _check_optional_model(data, state.model_name)
    refuse_unknown(data, TOKENIZE_FIELDS)
    boolean(data, "add_special_tokens")      # checked; the same tokens either way (see above)
    strings = boolean(data, "return_token_strs")
    prompt, messages = data.get("prompt"), data.get("messages")
    if prompt is not None and messages is not None:
        raise bad("messages", "give either prompt (a string) or messages (a conversation), "
                              "not both")
    if prompt is None and messages is None:
        raise bad("prompt", "prompt (a string) or messages (a conversation) is required")
    model, tok = state.model, state.model.tokenizer
    limit = state.text_limits.prompt_chars
    if prompt is not None:
        given = [name for name in CHAT_ONLY if data.get(name) is not None]
        if given:
            raise bad(given[0], f"{given[0]} is only allowed with messages")
        if not isinstance(prompt, str):
            raise bad("prompt", f"prompt must be a string, got {shown(prompt)}")
        if len(prompt) > limit:
            raise bad("prompt", f"the prompt is {len(prompt)} characters, more than this "
                                f"server's limit of {limit}", "string_above_max_length")
        try:
            ids = tok.encode(prompt)
        except GrokError as err:       # text the tokenizer cannot take
            raise bad("prompt", f"the prompt: {err}") from None
    else:
        if data.get("continue_final_message") is False:
            data = {k: v for k, v in data.items() if k != "continue_final_message"}
        refuse_unsupported(data, UNSUPPORTED, ": the conversation is rendered by the server's "
                                              "chat template as it is")
        if model.chat_template is None:
            raise ApiError(400, NO_TEMPLATE, "messages", "unsupported")
        generation = data.get("add_generation_prompt")
        generation = True if generation is None else boolean(data, "add_generation_prompt")
        ids = prompt_ids(messages, model, limit, generation)
    ids = [int(t) for t in ids]
    return {"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_context,
            "token_strs": [tok.piece(t) for t in ids] if strings else None}


def checked_detokenize(state: ServerState, body: bytes) -> dict[str, Any]:
    """A /detokenize body checked and decoded (off the event loop): {"prompt": text}; 400
    naming `tokens` for anything but a list of ids in the model's vocabulary (as a completion's
    token prompt is checked), or a list longer than the longest prompt in characters."""
    data = parse_json(body)
    _check_optional_model(data, state.model_name)
    refuse_unknown(data, DETOKENIZE_FIELDS)
    tokens = data.get("tokens")
    if tokens is None:
        raise bad("tokens", "tokens is required: a list of token ids")
    if not isinstance(tokens, list):
        raise bad("tokens", f"tokens must be a list of token ids, got {shown(tokens)}")
    limit = state.text_limits.prompt_chars
    if len(tokens) > limit:
        raise bad("tokens", f"tokens holds {len(tokens)} ids, more than this server's limit of "
                            f"{limit}", "array_above_max_length")
    wrong = next((i for i, t in enumerate(tokens) if not is_int(t)), None)
    if wrong is not None:
        raise bad("tokens", f"tokens[{wrong}]: token ids are integers, got "
                            f"{shown(tokens[wrong])}")
    vocab = state.model.config.vocab_size
    outside = next((i for i, t in enumerate(tokens) if not 0 <= t < vocab), None)
    if outside is not None:
        raise bad("tokens", f"tokens[{outside}]: token id {shown(tokens[outside])} is outside "
                            f"the vocabulary [0, {vocab})")
    return {"prompt": state.model.tokenizer.decode(tokens)}


def _check_optional_model(data: dict, served: str) -> None:
    """`model` may be left out (as vLLM's tokenizer endpoints allow); given, it must name the
    served model (404 model_not_found otherwise)."""
    if data.get("model") is not None:
        check_model(data, served)
