"""The streaming detokenizer with the demo model's real SentencePiece tokenizer: byte pieces of
multi-byte characters, leading spaces, and stop strings that span tokens."""
from __future__ import annotations

from pathlib import Path

import pytest

from grok.serving.detokenizer import CONTEXT, Detokenizer
from grok.serving.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "demo"
MULTIBYTE = "héllo wörld 中文 😀 end"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(DEMO / "tokenizer.model")


def _stream(tok, ids, stops=()):
    """Feed `ids` one at a time until a stop string; the deltas (with finish's last) and the
    detokenizer."""
    detok = Detokenizer(tok, stops)
    deltas = []
    for token in ids:
        deltas.append(detok.add(token))
        if detok.stopped:
            break
    deltas.append(detok.finish())
    return deltas, detok


def test_multibyte_characters_split_across_byte_tokens_are_shown_whole(tok):
    ids = tok.encode(MULTIBYTE)
    pieces = [tok._sp.IdToPiece(i) for i in ids]
    assert sum(p.startswith("<0x") for p in pieces) >= 9, "the text no longer needs byte pieces"
    deltas, detok = _stream(tok, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == detok.text == tok.decode(ids) == MULTIBYTE
    # each character appears in one delta: the three bytes of 中 never show as U+FFFD first
    assert any("中" in d for d in deltas) and "😀" in "".join(deltas)


def test_deltas_match_the_whole_decode_on_real_text_with_spaces_and_code(tok):
    text = (DEMO / "heldout.txt").read_text("utf-8")[:3000]
    ids = tok.encode(text)
    shown = ""
    detok = Detokenizer(tok)
    for k, token in enumerate(ids, 1):
        shown += detok.add(token)
        assert tok.decode(ids[:k]).startswith(shown)     # never shows what later changes
    shown += detok.finish()
    assert shown == tok.decode(ids) == detok.text


def test_each_token_decodes_a_short_window_not_the_whole_sequence(tok):
    lengths = []

    class Counting:
        def decode(self, ids):
            lengths.append(len(ids))
            return tok.decode(ids)

    ids = tok.encode((DEMO / "heldout.txt").read_text("utf-8")[:2000])
    deltas, _ = _stream(Counting(), ids)
    assert "".join(deltas) == tok.decode(ids)
    assert len(ids) > 200 and max(lengths) <= CONTEXT + 8


def test_a_stop_string_spanning_tokens_is_never_shown_and_cuts_the_text(tok):
    text = "def f(x):\n    return x"
    ids = tok.encode(text)
    assert [tok.decode([i]) for i in ids[2:6]] == ["f", "(", "x", "):"]    # "(x)" spans 3 tokens
    deltas, detok = _stream(tok, ids, stops=("(x)",))
    assert detok.stopped and detok.text == "".join(deltas) == "def f"
    assert all("(" not in d for d in deltas)
    # the same stop string across byte pieces: 中文 is six byte tokens
    ids = tok.encode(MULTIBYTE)
    deltas, detok = _stream(tok, ids, stops=("中文",))
    assert detok.stopped and "".join(deltas) == detok.text == "héllo wörld "
    assert not any("中" in d or "\ufffd" in d for d in deltas)


def test_a_held_back_stop_prefix_is_released_when_the_stop_does_not_complete(tok):
    text = "def f(x):\n    return x"
    ids = tok.encode(text)
    detok = Detokenizer(tok, ("(y)", "x:"))
    shown = [detok.add(t) for t in ids[:4]]              # "def f(": "(" may start "(y)"
    assert "".join(shown) == "def f"
    shown.append(detok.add(ids[4]))                      # "(x": no longer, but "x" may start "x:"
    assert "".join(shown) == "def f("
    shown += [detok.add(t) for t in ids[5:]] + [detok.finish()]
    assert not detok.stopped and "".join(shown) == detok.text == text
    # generation ending on a held-back prefix shows it at finish
    detok = Detokenizer(tok, ("(x)",))
    assert "".join(detok.add(t) for t in ids[:4]) == "def f"
    assert detok.finish() == "(" and detok.text == "def f("


def test_spaces_between_words_survive_with_the_grok1_tokenizer():
    """Grok-1's tokenizer drops a sequence's leading space: decoding each new token alone would
    glue the words together ("Helloworld")."""
    from conftest import tokenizer_path
    grok1 = Tokenizer(tokenizer_path())
    text = "Hello world, this is 中文 ok"
    ids = grok1.encode(text)
    assert grok1.decode(ids[1:2]) == "world"                # the space goes when decoded alone
    deltas, detok = _stream(grok1, ids)
    assert "".join(deltas) == detok.text == text
