"""Chat messages -> prompt text, through a Jinja chat template run in jinja2's sandbox.

`validate_messages` checks OpenAI-style messages ({"role", "content"}: a string, or a list of
{"type": "text", "text": ...} parts, joined with a space as SGLang joins them for a template
that takes strings). `ChatTemplate` renders them: `GROK2_TEMPLATE` (Grok-2's format, SGLang's
and vLLM's default for it) or a template file (vLLM's --chat-template FILE), with jinja2 set
up as Hugging Face's apply_chat_template sets it up (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`). The sandbox refuses unsafe attributes (`__class__`, ...) at once.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from grok.errors import RequestError, TokenizerError, one_line
from grok.files import NotRegularFile, TooLarge, describe, read_limited

# Grok-2's chat format: "System: " / "Human: " / "Assistant: " + text + "<|separator|>\n\n"
# per turn (the text stripped, except an assistant's), then "Assistant:" to prompt a reply.
GROK2_TEMPLATE = (
    "{%- set prefix = {'system': 'System: ', 'user': 'Human: ', 'assistant': 'Assistant: '} -%}"
    "{%- for message in messages -%}"
    "{%- set text = message.content if message.role == 'assistant' "
    "else message.content | trim -%}"
    "{{- prefix[message.role] ~ text ~ '<|separator|>\\n\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}")
ROLES = ("system", "user", "assistant")
# Bounds on a conversation, checked before any rendering or tokenizing: a turn costs at least
# four tokens of framing, so more turns than this cannot fit Grok-2's 131,072-token context.
MAX_MESSAGES = 1 << 15
MAX_CONTENT_PARTS = 1 << 15
# Characters of all contents together, and of a rendered prompt: 16 Mi (at most 64 MB of UTF-8
# to tokenize), far more than a 131,072-token context holds.
MAX_CHAT_CHARS = 1 << 24
MAX_TEMPLATE_BYTES = 1 << 20    # Hugging Face's longest chat templates are tens of kB


def _content(where: str, content: Any) -> str:
    """A message's content as one string (text parts joined with a space, as SGLang)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}: must be a string or a list of text parts, got "
                           f"{type(content).__name__}")
    if len(content) > MAX_CONTENT_PARTS:
        raise RequestError(f"{where}: {len(content)} parts, more than {MAX_CONTENT_PARTS}")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise RequestError(f"{at}: expected a {{\"type\": \"text\", \"text\": ...}} part, "
                               f"got {type(part).__name__}")
        if part.get("type") != "text":
            raise RequestError(f"{at}.type: {one_line(repr(part.get('type')), 40)} is not "
                               "supported (only \"text\")")
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{at}.text: must be a string, got "
                               f"{type(part.get('text')).__name__}")
        texts.append(part["text"])
    return " ".join(texts)


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """`messages` as [{"role", "content"}] with string contents; a one-line RequestError naming
    `messages[i].field` otherwise. A "name" and keys whose value is empty (null, [], {}, "", as
    clients echo an earlier reply) are dropped; any other key is refused."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError("messages: must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"messages: {len(messages)} messages, more than {MAX_MESSAGES}")
    out, chars = [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: expected a {{role, content}} object, got "
                               f"{type(message).__name__}")
        role = message.get("role")
        if role not in ROLES and role != "developer":
            shown = "missing" if "role" not in message else one_line(repr(message["role"]), 40)
            raise RequestError(f"{where}.role: {shown} is not one of {', '.join(ROLES)}")
        if "content" not in message:
            raise RequestError(f"{where}.content: missing")
        for key, value in message.items():
            if key not in ("role", "content", "name") and value not in (None, [], {}, ""):
                raise RequestError(f"{where}.{one_line(key, 40)}: not supported")
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise RequestError(f"{where}.name: must be a string, got "
                               f"{type(message['name']).__name__}")
        content = _content(f"{where}.content", message["content"])
        chars += len(content)
        if chars > MAX_CHAT_CHARS:
            raise RequestError(f"{where}.content: the messages exceed {MAX_CHAT_CHARS} characters")
        # OpenAI's newer clients send the system prompt as "developer": the same turn
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


class _Raised(Exception):
    """A template's raise_exception(message)."""


def _raise_exception(message: Any) -> None:
    raise _Raised(message)


def _environment() -> Any:
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class StrictSandbox(ImmutableSandboxedEnvironment):
        """jinja2's sandbox, failing at an unsafe attribute (it would otherwise render it as
        an empty string)."""

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} "
                                "object is unsafe")

    env = StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    return env


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template (`source`; `name` says where it came from, in errors), compiled
    once in jinja2's sandbox; a one-line TokenizerError if it does not compile."""

    source: str
    name: str = "chat template"
    _compiled: Any = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from jinja2 import TemplateSyntaxError

        try:
            compiled = _environment().from_string(self.source)
        except TemplateSyntaxError as err:
            raise TokenizerError(f"{one_line(self.name, 300)}: invalid template at line "
                                 f"{err.lineno}: {one_line(err.message, 200)}") from None
        object.__setattr__(self, "_compiled", compiled)

    @classmethod
    def grok2(cls) -> ChatTemplate:
        """Grok-2's chat format (GROK2_TEMPLATE)."""
        return cls(GROK2_TEMPLATE, "Grok-2 chat template")

    @classmethod
    def from_file(cls, path: Any) -> ChatTemplate:
        """The template in a UTF-8 Jinja file (vLLM's --chat-template FILE); a one-line
        TokenizerError naming the file if it is missing, unreadable, too large or invalid."""
        where = one_line(describe(path), 300)
        try:
            source = read_limited(path, MAX_TEMPLATE_BYTES).decode("utf-8")
        except FileNotFoundError:
            raise TokenizerError(f"chat template not found: {where}") from None
        except (NotRegularFile, TooLarge) as err:
            raise TokenizerError(f"{where}: {err}") from None
        except UnicodeDecodeError as err:
            raise TokenizerError(f"{where}: not UTF-8 text ({err.reason} at byte "
                                 f"{err.start})") from None
        except OSError as err:
            raise TokenizerError(f"{where}: cannot be read ({err.strerror or err})") from None
        return cls(source, where)

    def render(self, messages: Any, add_generation_prompt: bool = True,
               special_tokens: Mapping[str, str] | None = None) -> str:
        """The prompt text of `messages` (checked by validate_messages first). The template
        sees `messages`, `add_generation_prompt` and each of `special_tokens` (template
        variable -> token text, e.g. {"eos_token": "<|eos|>"}). RequestError if the template
        fails on these messages (its raise_exception included) or its text exceeds
        MAX_CHAT_CHARS; TokenizerError if the sandbox stops it."""
        from jinja2.exceptions import SecurityError

        variables = dict(special_tokens or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in variables.items()) \
                or {"messages", "add_generation_prompt"} & variables.keys():
            raise RequestError("special_tokens: expected {template variable: token text}, "
                               "not naming messages or add_generation_prompt")
        variables.update(messages=validate_messages(messages),
                         add_generation_prompt=bool(add_generation_prompt))
        chunks, length = [], 0
        try:
            for chunk in self._compiled.generate(**variables):
                length += len(chunk)
                if length > MAX_CHAT_CHARS:
                    raise RequestError(f"{one_line(self.name, 300)}: the prompt exceeds "
                                       f"{MAX_CHAT_CHARS} characters")
                chunks.append(chunk)
        except SecurityError as err:
            raise TokenizerError(f"{one_line(self.name, 300)}: stopped by the sandbox "
                                 f"({one_line(err, 200)})") from None
        except RequestError:
            raise
        except _Raised as err:
            raise RequestError(f"{one_line(self.name, 300)}: {one_line(err, 300)}") from None
        except Exception as err:   # the template's own failure: an undefined, a type error...
            raise RequestError(f"{one_line(self.name, 300)} failed: {type(err).__name__}: "
                               f"{one_line(err, 200)}") from None
        return "".join(chunks)
