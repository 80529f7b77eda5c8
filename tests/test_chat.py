"""Chat messages -> prompt text (grok/serving/chat.py): Grok-2's format exactly, OpenAI's
content parts, bad messages refused in one line naming the field, template files, and
templates kept in jinja2's sandbox."""
from __future__ import annotations

import os
import random

import pytest

from grok.errors import RequestError, TokenizerError
from grok.serving import chat
from grok.serving.chat import GROK2_TEMPLATE, ChatTemplate, validate_messages

CONVERSATION = [
    {"role": "system", "content": " You are terse. "},
    {"role": "user", "content": "  Hi\n"},
    {"role": "assistant", "content": " Hello! "},
    {"role": "user", "content": "Bye "},
]


def _grok2_by_hand(messages, add_generation_prompt) -> str:
    """The format as grok2-release.md states it, in plain Python."""
    prefix = {"system": "System: ", "user": "Human: ", "assistant": "Assistant: "}
    out = ""
    for m in messages:
        text = m["content"] if m["role"] == "assistant" else m["content"].strip()
        out += f"{prefix[m['role']]}{text}<|separator|>\n\n"
    return out + ("Assistant:" if add_generation_prompt else "")


def test_grok2_format_exactly():
    assert ChatTemplate.grok2().render(CONVERSATION, add_generation_prompt=True) == (
        "System: You are terse.<|separator|>\n\n"
        "Human: Hi<|separator|>\n\n"
        "Assistant:  Hello! <|separator|>\n\n"
        "Human: Bye<|separator|>\n\n"
        "Assistant:")
    assert ChatTemplate.grok2().render(CONVERSATION[:2], add_generation_prompt=False) == (
        "System: You are terse.<|separator|>\n\nHuman: Hi<|separator|>\n\n")


def test_grok2_format_on_random_conversations_with_awkward_text():
    rng = random.Random(0)
    pieces = [" ", "\n", "\t", "x", "{{ 1 }}", "{% if %}", "<|separator|>", "日本", "'", '"', "\\n"]
    template = ChatTemplate(GROK2_TEMPLATE)
    for _ in range(200):
        messages = [{"role": rng.choice(chat.ROLES),
                     "content": "".join(rng.choices(pieces, k=rng.randrange(6)))}
                    for _ in range(rng.randrange(1, 5))]
        gen = rng.random() < 0.5
        assert template.render(messages, gen) == _grok2_by_hand(messages, gen)


def test_content_parts_join_with_a_space_as_sglang():
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                             {"type": "text", "text": "world "}]},
                {"role": "assistant", "content": [], "name": "bot", "tool_calls": None}]
    assert validate_messages(messages) == [{"role": "user", "content": "Hello world "},
                                           {"role": "assistant", "content": ""}]
    assert ChatTemplate.grok2().render(messages) == (
        "Human: Hello world<|separator|>\n\nAssistant: <|separator|>\n\nAssistant:")


BAD_MESSAGES = [
    ("not a list", "messages: must be a non-empty list"),
    ([], "messages: must be a non-empty list"),
    (["hi"], r"messages\[0\]: expected a \{role, content\} object, got str"),
    ([{"content": "x"}], r"messages\[0\].role: missing"),
    ([{"role": "tool", "content": "x"}], r"messages\[0\].role: 'tool' is not one of"),
    ([{"role": "user"}], r"messages\[0\].content: missing"),
    ([{"role": "user", "content": None}], r"messages\[0\].content: must be a string or a list"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content: must be .* got int"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": ["x"]}],
     r"messages\[1\].content\[0\]: expected a"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\].content\[0\].type: 'image_url' is not supported"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}],
     r"messages\[0\].content\[0\].text: must be a string, got int"),
    ([{"role": "user", "content": [{"type": "text"}]}],
     r"messages\[0\].content\[0\].text: must be a string, got NoneType"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}],
     r"messages\[0\].tool_calls: not supported"),
    ([{"role": "user", "content": "x", "name": 5}], r"messages\[0\].name: must be a string"),
]


@pytest.mark.parametrize("messages,fragment", BAD_MESSAGES)
def test_bad_messages_are_refused_naming_the_field(messages, fragment):
    with pytest.raises(RequestError, match=fragment) as err:
        ChatTemplate.grok2().render(messages)
    assert "\n" not in str(err.value)


def test_conversations_are_bounded(monkeypatch):
    monkeypatch.setattr(chat, "MAX_MESSAGES", 3)
    monkeypatch.setattr(chat, "MAX_CHAT_CHARS", 10)
    with pytest.raises(RequestError, match="messages: 4 messages, more than 3"):
        validate_messages([{"role": "user", "content": ""}] * 4)
    with pytest.raises(RequestError, match=r"messages\[1\].content: the messages exceed 10"):
        validate_messages([{"role": "user", "content": "123456"}] * 2)
    with pytest.raises(RequestError, match="the prompt exceeds 10 characters"):
        ChatTemplate.grok2().render([{"role": "user", "content": "123456"}])


def test_a_template_file_renders_with_the_special_tokens(tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text("{% for m in messages %}\n"
                    "<{{ m.role }}>{{ m.content }}{{ eos_token }}\n"
                    "{% endfor %}\n"
                    "{% if add_generation_prompt %}<assistant>{% endif %}\n")
    template = ChatTemplate.from_file(path)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    # trim_blocks and lstrip_blocks, as Hugging Face sets them: no newline after a tag
    assert template.render(messages, special_tokens={"eos_token": "<|eos|>"}) == (
        "<user>hi<|eos|>\n<assistant>yo<|eos|>\n<assistant>")
    assert str(path) in template.name
    with pytest.raises(RequestError, match="special_tokens"):
        template.render(messages, special_tokens={"messages": "x"})


def test_template_raise_exception_is_a_request_error():
    template = ChatTemplate("{% if messages[0].role != 'system' %}"
                            "{{ raise_exception('the first message must be the system') }}"
                            "{% endif %}")
    with pytest.raises(RequestError, match="chat template: the first message must be the system"):
        template.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("source", [
    "{{ ''.__class__ }}",
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{% set x = messages.append(1) %}",
])
def test_templates_that_leave_the_sandbox_fail_in_one_line(source):
    with pytest.raises((TokenizerError, RequestError)) as err:
        ChatTemplate(source).render([{"role": "user", "content": "x"}])
    assert "unsafe" in str(err.value) and "\n" not in str(err.value)


def test_bad_template_files_are_refused_in_one_line(tmp_path):
    invalid = tmp_path / "invalid.jinja"
    invalid.write_text("line one\n{% for m in messages %}{{ m.content }")
    binary = tmp_path / "binary.jinja"
    binary.write_bytes(b"\xff\xfe{{ x }}")
    big = tmp_path / "big.jinja"
    with open(big, "wb") as f:
        f.truncate(chat.MAX_TEMPLATE_BYTES + 1)
    fifo = tmp_path / "fifo.jinja"
    os.mkfifo(fifo)
    cases = [(invalid, "invalid template at line 2"), (binary, "not UTF-8"),
             (big, "more than the 1048576 allowed"), (fifo, "a FIFO"),
             (tmp_path, "a directory"), (tmp_path / "none.jinja", "chat template not found")]
    for path, fragment in cases:
        with pytest.raises(TokenizerError, match=fragment) as err:
            ChatTemplate.from_file(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)
