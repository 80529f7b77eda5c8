"""OpenAI's /v1/chat/completions: the request checked with protocol.py's field checkers, the
conversation made a prompt on the server by the model's chat template (`Grok.chat_ids`), and
the answer shaped as chat completions (a message per choice, or a stream of deltas) over
generation.py's engine requests. A choice ends at the model's turn-end tokens (Grok-2:
<|separator|> or <|eos|>; a base model given a template: eos), which stay out of its content and
its logprobs."""
from __future__ import annotations

import logging
import re
from typing import Any

from grok.errors import RequestError, TokenizerError
from grok.serve.generation import FINISH, Generation, Shape, closing_error
from grok.serve.protocol import (MAX_N, ApiError, CompletionParams, Prompt, TextLimits, bad,
                                 boolean, check_model, check_user, integer, parse_json,
                                 refuse_unknown, sampling_fields, seed_of, stop_strings, streaming)
from grok.serve.state import ServerState
from grok.serving.chat import validate_messages
from grok.serving.request import Event
from grok.serving.sampling import MAX_LOGPROBS

log = logging.getLogger(__name__)
# Fields of OpenAI's chat completions request this server reads, plus vLLM's top_k and
# repetition_penalty; UNSUPPORTED ones are refused unless empty or asking for what is done anyway.
FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "top_k", "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stop",
          "n", "stream", "stream_options", "logprobs", "top_logprobs", "user", "tools",
          "tool_choice", "functions", "function_call", "response_format", "logit_bias")
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format",
               "logit_bias")
AS_DONE = {"tool_choice": "none", "function_call": "none", "response_format": {"type": "text"}}
NO_TEMPLATE = ("this is a base model without a chat template: use /v1/completions, or start "
               "the server with --chat-template FILE")
# A path into the messages, as grok.serving.chat's errors begin: messages[1].content[0].type
_MESSAGE_FIELD = re.compile(r"messages(\[\d+\](\.\w+)?)*")
# A byte that is no whole character, as tokenizers' `piece` spells it
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


def checked_chat(state: ServerState, body: bytes) -> CompletionParams:
    """A /v1/chat/completions body parsed and checked, its conversation rendered and tokenized
    (CPU work: run it off the event loop); ApiError otherwise."""
    data = parse_json(body)
    check_model(data, state.model_name)
    if state.closing:
        raise closing_error()
    if state.model.chat_template is None:
        raise ApiError(400, NO_TEMPLATE, None, "unsupported")
    return chat_params(data, state.model, state.engine.max_context, state.text_limits)


def chat_params(data: dict, model: Any, context: int, limits: TextLimits = TextLimits()
                ) -> CompletionParams:
    """Check every field of a chat request (the model already checked) and make its prompt:
    the cheap checks first, the template and tokenizer last. Without max_tokens (or
    max_completion_tokens, which wins) a reply may fill the rest of the context."""
    refuse_unknown(data, FIELDS)
    for name in UNSUPPORTED:
        value = data.get(name)
        if value not in (None, {}, [], "") and value != AS_DONE.get(name):
            raise bad(name, f"{name} is not supported: this server answers with text only",
                      "unsupported")
    check_user(data)
    limit, max_tokens = "max_tokens", integer(data, "max_tokens", None, 1, context - 1)
    newer = integer(data, "max_completion_tokens", None, 1, context - 1)
    if newer is not None:
        limit, max_tokens = "max_completion_tokens", newer
    n = integer(data, "n", 1, 1, MAX_N)
    stream, include_usage = streaming(data)
    stops = stop_strings(data.get("stop"), limits.stop_chars)
    seed = seed_of(data)
    sampling = sampling_fields(data)
    logprobs = boolean(data, "logprobs")
    top = integer(data, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("top_logprobs", "top_logprobs needs logprobs: true")
    ids = prompt_ids(data.get("messages"), model, limits.prompt_chars)
    if max_tokens is None:
        if len(ids) >= context:
            raise bad("messages", f"the conversation is {len(ids)} tokens: it leaves no room "
                                  f"for a reply in the model's context of {context} tokens",
                      "context_length_exceeded")
        max_tokens = context - len(ids)
    elif len(ids) > context - max_tokens:
        raise bad("messages", f"the conversation is {len(ids)} tokens: with {limit}="
                              f"{max_tokens} it exceeds the model's context of {context} tokens",
                  "context_length_exceeded")
    return CompletionParams([Prompt("", ids)], max_tokens, n, stream, include_usage, False,
                            stops, seed, sampling, (top or 0) if logprobs else None,
                            tuple(model.turn_end_ids))


def prompt_ids(messages: Any, model: Any, max_chars: int, add_generation_prompt: bool = True
               ) -> list[int]:
    """The prompt of `messages` through the model's chat template (`model.chat_ids`; without
    `add_generation_prompt`, the same conversation not yet handed to the assistant): 400 naming
    the message's field (messages[1].role) when one is wrong, or when their contents are more
    than `max_chars` characters (checked before anything is rendered); 500 when the template
    itself fails (the server's template, not the client's request)."""
    try:
        checked = validate_messages(messages)
    except RequestError as err:
        raise _message_error(err) from None
    chars = sum(len(m["content"]) for m in checked)
    if chars > max_chars:
        raise bad("messages", f"the messages' contents are {chars} characters, more than this "
                              f"server's limit of {max_chars}", "string_above_max_length")
    try:
        ids = model.chat_ids(checked, add_generation_prompt)
    except TokenizerError as err:        # the sandbox stopped the template: the server's fault
        log.error("the chat template failed: %s", err)
        raise ApiError(500, f"the chat template failed: {err}", None, "chat_template_error",
                       kind="server_error") from None
    except RequestError as err:          # the template refused these messages
        raise _message_error(err) from None
    if not ids:
        raise bad("messages", "the conversation's prompt is empty")
    return list(ids)


def _message_error(err: RequestError) -> ApiError:
    """A 400 for a refused conversation, its param the field the message begins with."""
    message = str(err)
    head = message.split(":", 1)[0]
    return bad(head if _MESSAGE_FIELD.fullmatch(head) else "messages", message)


def piece_bytes(piece: str) -> bytes:
    """The bytes of a token's piece (`tokenizer.piece`): its text in UTF-8, each <0xNN> a byte
    of a character the token holds only part of."""
    out, last = bytearray(), 0
    for match in _BYTE_PIECE.finditer(piece):
        out += piece[last:match.start()].encode("utf-8", "replace")
        out.append(int(match.group(1), 16))
        last = match.end()
    out += piece[last:].encode("utf-8", "replace")
    return bytes(out)


class ChatShape(Shape):
    """Chat completions: each choice an assistant message (a stream: a first delta with the
    role, a delta per piece of content, a last empty delta with the finish_reason), and with
    logprobs OpenAI's {"content": [{"token", "logprob", "bytes", "top_logprobs"}]} for the
    content's tokens (the turn-end token is no content)."""

    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, state: ServerState, params: CompletionParams, gen: Generation):
        super().__init__(state, params, gen)
        count = len(gen.rids)
        self.tokenizer = state.model.tokenizer
        self.content = [""] * count
        self.reasons: list[str | None] = [None] * count
        self.scores: list[list[dict[str, Any]]] | None = \
            None if params.logprobs is None else [[] for _ in range(count)]

    def opening(self) -> list[dict[str, Any]]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in range(len(self.content))]

    def take(self, index: int, event: Event) -> list[dict[str, Any]]:
        text, scored = event.text or "", self._scored(event)
        self.content[index] += text
        out = []
        if self.scores is not None:
            self.scores[index] += scored
        if text or scored:
            out.append({"index": index, "delta": {"content": text},
                        "logprobs": None if self.scores is None else {"content": scored},
                        "finish_reason": None})
        if event.done:
            self.reasons[index] = FINISH.get(event.finish_reason, event.finish_reason)
            out.append({"index": index, "delta": {}, "logprobs": None,
                        "finish_reason": self.reasons[index]})
        return out

    def choices(self) -> list[dict[str, Any]]:
        return [{"index": i, "message": {"role": "assistant", "content": content},
                 "logprobs": None if self.scores is None else {"content": self.scores[i]},
                 "finish_reason": self.reasons[i]} for i, content in enumerate(self.content)]

    def _scored(self, event: Event) -> list[dict[str, Any]]:
        """The logprobs entry of the event's token (none without logprobs, or for the token
        that ended the turn)."""
        if self.scores is None or event.token is None or event.logprob is None:
            return []
        if event.finish_reason == "eos" or (event.finish_reason == "stop"
                                            and event.token in self.params.stop_ids):
            return []
        top = (event.top_logprobs or ())[:self.params.logprobs]
        return [dict(self._token(event.token, event.logprob),
                     top_logprobs=[self._token(t, value) for t, value in top])]

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        piece = self.tokenizer.piece(token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece_bytes(piece))}
