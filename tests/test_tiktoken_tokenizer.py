"""Grok-2's tiktoken tokenizer (grok/serving/tiktoken_tokenizer.py) on the tiny release's
tokenizer.tok.json: the ids tiktoken itself gives, specials read from the file, round trips of
characters split across tokens, streaming through the Detokenizer, and every malformed file
refused in one line naming the file and the field."""
from __future__ import annotations

import json
import os

import pytest

import grok2_release
from grok.errors import RequestError, TokenizerError
from grok.serving.detokenizer import Detokenizer
from grok.serving.tiktoken_tokenizer import ALLOWED_IN_TEXT, V1_PATTERN, TiktokenTokenizer

TEXTS = ["the cat sat on the mat.", "  leading and trailing  ", "naïve café 日本語 朝 😀😁",
         "x = f(1234567) // 3\r\n\n\tend", "I'll say they're 'quoted'", "",
         "a<|separator|>b<|eos|><|mask|><|reserved_4|><|control1|>"]
SPLIT = "朝😁"   # 朝 = e6 9c 9d, 😁 = f0 9f 98 81: their first bytes are merges, the rest not


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.tok.json"
    path.write_text(json.dumps(grok2_release.tokenizer_json()))
    return path


@pytest.fixture(scope="module")
def tok(tok_path):
    return TiktokenTokenizer(tok_path)


@pytest.fixture(scope="module")
def direct(tok_path):
    """tiktoken's own Encoding from the file, as SGLang builds it."""
    import tiktoken

    data = json.loads(tok_path.read_text())
    return tiktoken.Encoding(
        "direct", pat_str=V1_PATTERN,
        mergeable_ranks={bytes(t["bytes"]): t["token"] for t in data["regular_tokens"]},
        special_tokens={bytes(t["bytes"]).decode(): t["token"] for t in data["special_tokens"]},
        explicit_n_vocab=data["vocab_size"])


@pytest.mark.parametrize("text", TEXTS)
def test_ids_are_tiktokens_own(tok, direct, text):
    ids = tok.encode(text)
    assert ids == direct.encode(text, allowed_special=set(ALLOWED_IN_TEXT), disallowed_special=())
    assert tok.decode(ids) == text


def test_specials_come_from_the_file_and_only_sglangs_are_read_from_text(tok, tok_path):
    data = json.loads(tok_path.read_text())
    by_text = {bytes(t["bytes"]).decode(): t["token"] for t in data["special_tokens"]}
    assert tok.special_ids == by_text
    assert (tok.eos_id, tok.pad_id, tok.separator_id) == (
        by_text["<|eos|>"], by_text["<|pad|>"], by_text["<|separator|>"])
    assert tok.stop_ids == (by_text["<|separator|>"], by_text["<|eos|>"])
    assert tok.vocab_size == data["vocab_size"]
    ids = tok.encode("<|separator|><|mask|><|control1|>")
    assert ids[0] == by_text["<|separator|>"] and ids[-1] == by_text["<|control1|>"]
    assert by_text["<|mask|>"] not in ids and len(ids) > 3    # <|mask|> is plain text


def test_characters_split_across_tokens_round_trip_and_show_as_bytes(tok):
    ids = tok.encode(SPLIT)
    pieces = [tok.piece(i) for i in ids]
    assert pieces == ["<0xE6><0x9C>", "<0x9D>", "<0xF0><0x9F><0x98>", "<0x81>"]
    assert tok.decode(ids) == SPLIT
    assert tok.decode(ids[:1]) == "\ufffd"                     # half a character
    assert tok.decode(ids[:3]) == "朝\ufffd"


def test_streaming_never_shows_half_a_character(tok):
    text = "the 朝 cat 😁😀 naïve\n日本語朝朝 end 😁"
    ids = tok.encode(text)
    assert any(piece.startswith("<0x") for piece in map(tok.piece, ids))
    detok, shown = Detokenizer(tok), ""
    for k, token in enumerate(ids, 1):
        delta = detok.add(token)
        assert "\ufffd" not in delta
        shown += delta
        assert text.startswith(shown) and tok.decode(ids[:k]).startswith(shown)
    assert shown + detok.finish() == detok.text == text


def test_streaming_stops_at_a_stop_string_across_tokens(tok):
    ids = tok.encode("the cat 朝 sat on the mat")
    detok = Detokenizer(tok, ["朝 s"])
    shown = "".join(detok.add(t) for t in ids if not detok.stopped)
    assert detok.stopped and shown == detok.text == "the cat "


def test_unknown_ids_decode_as_replacement_not_a_crash(tok):
    gap = tok.vocab_size + 5
    assert tok.decode([tok.encode("a")[0], gap, -1]) == "a\ufffd\ufffd"
    assert tok.piece(gap) == "\ufffd" and tok.piece(tok.eos_id) == "<|eos|>"


@pytest.mark.parametrize("bad", [b"abc", "a\ud800b", None, ["a"]])
def test_encode_refuses_what_is_not_text(tok, bad):
    with pytest.raises(RequestError, match="cannot be tokenized|only text"):
        tok.encode(bad)


def test_the_tiny_release_tokenizer_loads(tmp_path):
    written = grok2_release.write_tiny_grok2(tmp_path)
    tok = TiktokenTokenizer(tmp_path / "tokenizer.tok.json")
    assert tok.vocab_size <= written["config"]["vocab_size"]
    assert "TiktokenTokenizer(" in repr(tok) and str(tmp_path) in repr(tok)


def _mutated(change):
    """The tiny tokenizer's JSON with `change` made (built when the test runs)."""
    def text():
        data = grok2_release.tokenizer_json()
        change(data)
        return json.dumps(data)
    return text


def _drop_byte(data):
    data["regular_tokens"] = [t for t in data["regular_tokens"] if t["bytes"] != [65]]


def _special(data, index, **fields):
    data["special_tokens"][index].update(fields)


BAD_FILES = {
    "not JSON": ("{", "invalid JSON"),
    "NaN": ('{"vocab_size": NaN}', "NaN is not JSON"),
    "duplicate key": ('{"word_split": "V1", "word_split": "V1"}', "duplicate key 'word_split'"),
    "deep nesting": ("[" * 200000 + "]" * 200000, "invalid JSON"),
    "a list": ("[]", "expected a JSON object"),
    "other split": (_mutated(lambda d: d.update(word_split="V2")), "word_split 'V2'"),
    "no regular tokens": (_mutated(lambda d: d.pop("regular_tokens")), "regular_tokens missing"),
    "regular not a list": (_mutated(lambda d: d.update(regular_tokens={})),
                           "regular_tokens must be a list of .bytes, token. entries, got dict"),
    "byte 256": (_mutated(lambda d: d["regular_tokens"][280].update(bytes=[1, 256])),
                 r"regular_tokens\[280\].bytes\[1\]: 256"),
    "a bool byte": (_mutated(lambda d: d["regular_tokens"][7].update(bytes=[True])),
                    r"regular_tokens\[7\].bytes\[0\]: True"),
    "empty bytes": (_mutated(lambda d: d["regular_tokens"][7].update(bytes=[])),
                    r"regular_tokens\[7\].bytes"),
    "string id": (_mutated(lambda d: d["regular_tokens"][3].update(token="3")),
                  r"regular_tokens\[3\].token: '3'"),
    "negative id": (_mutated(lambda d: _special(d, 2, token=-1)), r"special_tokens\[2\].token"),
    "entry no object": (_mutated(lambda d: d["special_tokens"].append(5)),
                        r"special_tokens\[7\]: expected an object"),
    "shared id": (_mutated(lambda d: _special(d, 2, token=5)),
                  r"special_tokens\[2\].token: id 5 is also regular_tokens"),
    "shared bytes": (_mutated(lambda d: d["regular_tokens"][270].update(bytes=[116, 104])),
                     r"regular_tokens\[\d+\].bytes: b'th' is also token"),
    "shared text": (_mutated(lambda d: _special(d, 6, bytes=list(b"<|mask|>"))),
                    r"special_tokens\[6\]: .<\|mask\|>. is also token 291"),
    "special not UTF-8": (_mutated(lambda d: _special(d, 3, bytes=[255])),
                          r"special_tokens\[3\].bytes: b'\\xff' is not UTF-8"),
    "a missing byte": (_mutated(_drop_byte), "lacks 1 of the 256 single bytes .the first: 65"),
    "no eos": (_mutated(lambda d: d.update(special_tokens=d["special_tokens"][:2])),
               "no <|eos|>"),
    "small vocab": (_mutated(lambda d: d.update(vocab_size=100)), "vocab_size 100 must be"),
    "huge vocab": (_mutated(lambda d: d.update(vocab_size=1 << 40)), "vocab_size 1099511627776"),
    "allowed not bytes": (_mutated(lambda d: d.update(default_allowed_special=[[300]])),
                          r"default_allowed_special\[0\]\[0\]: 300"),
    "pattern invalid": (_mutated(lambda d: d.update(pat_str="(")), "pat_str is not a valid"),
    "pattern empty match": (_mutated(lambda d: d.update(pat_str=r"\p{L}*")),
                            "pat_str matches the empty string"),
    "pattern drops text": (_mutated(lambda d: d.update(pat_str=r"\p{L}+")),
                           "pat_str leaves text out"),
    "pattern no string": (_mutated(lambda d: d.update(pat_str=5)), "pat_str must be"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_files_are_refused_in_one_line(tmp_path, case):
    text, fragment = BAD_FILES[case]
    path = tmp_path / "tokenizer.tok.json"
    path.write_text(text if isinstance(text, str) else text())
    with pytest.raises(TokenizerError, match=fragment) as err:
        TiktokenTokenizer(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_files_that_are_not_a_small_regular_file_are_refused(tmp_path):
    big = tmp_path / "big.tok.json"
    with open(big, "wb") as f:
        f.truncate((64 << 20) + 1)          # sparse: nothing is written or read
    fifo = tmp_path / "fifo.tok.json"
    os.mkfifo(fifo)
    for path, fragment in ((big, "more than the 67108864 allowed"), (fifo, "a FIFO"),
                           (tmp_path, "a directory"), (tmp_path / "none", "not found")):
        with pytest.raises(TokenizerError, match=fragment) as err:
            TiktokenTokenizer(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_file_without_pad_or_separator_has_eos_alone_as_its_stop(tmp_path):
    data = grok2_release.tokenizer_json()
    data["special_tokens"] = [t for t in data["special_tokens"]
                              if bytes(t["bytes"]) not in (b"<|pad|>", b"<|separator|>")]
    path = tmp_path / "tokenizer.tok.json"
    path.write_text(json.dumps(data))
    tok = TiktokenTokenizer(path)
    assert (tok.pad_id, tok.separator_id, tok.stop_ids) == (-1, None, (tok.eos_id,))
    assert len(tok.encode("<|separator|>")) > 1          # no special: plain text


def test_typed_pad_text_is_plain_text_not_the_masked_pad_id(tmp_path):
    """The model masks the pad id as padding: "<|pad|>" typed in a prompt must not become it
    (it would vanish from the context), while "<|separator|>" becomes its special id as in
    SGLang."""
    path = tmp_path / "tokenizer.tok.json"
    path.write_text(json.dumps(grok2_release.tokenizer_json()))
    tok = TiktokenTokenizer(path)
    ids = tok.encode("a<|pad|>b<|separator|>")
    assert tok.pad_id not in ids and tok.separator_id in ids
    assert tok.decode(ids) == "a<|pad|>b<|separator|>"
