"""Grok-2's tokenizer: tiktoken's byte-level BPE read from the release's `tokenizer.tok.json`.

The file: {"regular_tokens": [{"bytes": [ints], "token": id}, ...] (the BPE merges: a token's
id is its merge rank), "special_tokens": [same, the bytes UTF-8 text], "word_split": "V1",
optional "pat_str" (replaces V1's pattern), "default_allowed_special", "vocab_size"}. Keys not
listed are ignored, as SGLang and vLLM do. Special ids are read from the file, never assumed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from grok.errors import RequestError, TokenizerError, one_line
from grok.files import DuplicateKey, NotRegularFile, TooLarge, describe, read_limited, unique_keys
from grok.serving.tokenizer import check_text

# "V1" word split: GPT-4's pre-tokenizer pattern with every digit its own piece (as SGLang's and
# vLLM's Grok-2 tokenizers define it).
V1_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
              r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
EOS, PAD, SEPARATOR = "<|eos|>", "<|pad|>", "<|separator|>"
# The special tokens SGLang's encode reads as specials where they appear in text (any other
# special's text is encoded as plain bytes; SGLang drops the file's default_allowed_special),
# less <|pad|>: the model masks the pad id as padding, so typed it would vanish from the context.
ALLOWED_IN_TEXT = frozenset([SEPARATOR, EOS, *(f"<|control{i}|>" for i in range(1, 705)),
                             *(f"<|reserved_{i}|>" for i in range(3, 128))])
MAX_FILE_BYTES = 64 << 20     # the release's file is a few MB
MAX_VOCAB = 1 << 21           # 16x the release's 131,072 ids
MAX_PATTERN_CHARS = 4096      # V1's pattern is under 100 characters
UNKNOWN = "\ufffd"            # what an id the file does not define decodes as
_UNKNOWN_BYTES = UNKNOWN.encode("utf-8")
# Text of every kind a pattern must split into non-empty pieces that cover it all.
PATTERN_PROBE = "Hello, World! it's 2025-01-31\r\n\n\tx = [a_b]  // naïve 日本語 😀 \u00a0end  "


@dataclasses.dataclass(frozen=True)
class TokFile:
    """A checked tokenizer.tok.json: the BPE ranks {bytes: id}, the specials {text: id}, the
    split pattern, and the number of ids (the file's vocab_size, else the highest id + 1)."""

    ranks: dict[bytes, int]
    specials: dict[str, int]
    pattern: str
    vocab_size: int


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entries(where: str, data: dict, field: str, required: bool) -> list[tuple[bytes, int]]:
    """(bytes, id) of each {"bytes": [...], "token": id} entry of list `field`."""
    if required and field not in data:
        raise TokenizerError(f"{where}: {field} missing (a list of {{bytes, token}} entries)")
    items = data.get(field, [])
    if not isinstance(items, list):
        raise TokenizerError(f"{where}: {field} must be a list of {{bytes, token}} entries, "
                             f"got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        at = f"{where}: {field}[{i}]"
        if not isinstance(item, dict) or "bytes" not in item or "token" not in item:
            raise TokenizerError(f"{at}: expected an object with bytes and token")
        token, raw = item["token"], item["bytes"]
        if not _is_int(token) or not 0 <= token < MAX_VOCAB:
            raise TokenizerError(f"{at}.token: {one_line(repr(token), 40)} is not an id in "
                                 f"[0, {MAX_VOCAB})")
        out.append((_bytes_of(at + ".bytes", raw), token))
    return out


def _bytes_of(at: str, raw: Any) -> bytes:
    if not isinstance(raw, list) or not raw:
        raise TokenizerError(f"{at}: expected a non-empty list of bytes, got "
                             f"{one_line(repr(raw), 40)}")
    for j, b in enumerate(raw):
        if not _is_int(b) or not 0 <= b <= 255:
            raise TokenizerError(f"{at}[{j}]: {one_line(repr(b), 40)} is not a byte (0..255)")
    return bytes(raw)


def _text_of(at: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenizerError(f"{at}: {one_line(repr(raw), 80)} is not UTF-8 text") from None


def _pattern_problem(pattern: str) -> str:
    """Why tiktoken cannot encode with `pattern` ("" if it can, as far as a probe text shows):
    tiktoken crashes on an empty piece and silently drops text no piece covers."""
    import regex

    try:
        pieces = [m.group() for m in regex.finditer(pattern, PATTERN_PROBE, timeout=1.0)]
    except regex.error as err:
        return f"is not a valid pattern ({one_line(err, 120)})"
    except TimeoutError:
        return "takes over a second to split a short text"
    if not all(pieces):
        return "matches the empty string"
    if "".join(pieces) != PATTERN_PROBE:
        return "leaves text out of every piece"
    return ""


def read_tok_json(path: str | os.PathLike) -> TokFile:
    """The checked contents of a tokenizer.tok.json; a one-line TokenizerError naming the file
    and the field or entry otherwise."""
    where = one_line(describe(path), 300)
    try:
        raw = read_limited(path, MAX_FILE_BYTES)
        data = json.loads(raw.decode("utf-8-sig"), object_pairs_hook=unique_keys,
                          parse_constant=_no_constant)
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {where}") from None
    except (NotRegularFile, TooLarge, DuplicateKey) as err:
        raise TokenizerError(f"{where}: {err}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise TokenizerError(f"{where}: not a tokenizer.tok.json (invalid JSON: "
                             f"{one_line(err, 100)})") from None
    except OSError as err:
        raise TokenizerError(f"{where}: cannot be read ({err.strerror or err})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if data.get("word_split") != "V1":   # the only split the servers know (pat_str or not)
        raise TokenizerError(f"{where}: word_split {one_line(repr(data.get('word_split')), 40)} "
                             f"is not supported (only \"V1\")")
    pattern = data.get("pat_str", V1_PATTERN)
    if not isinstance(pattern, str) or not 0 < len(pattern) <= MAX_PATTERN_CHARS:
        raise TokenizerError(f"{where}: pat_str must be a pattern of 1 to {MAX_PATTERN_CHARS} "
                             f"characters, got {one_line(repr(pattern), 60)}")
    problem = _pattern_problem(pattern)
    if problem:
        raise TokenizerError(f"{where}: pat_str {problem}")
    regular = _entries(where, data, "regular_tokens", required=True)
    special = _entries(where, data, "special_tokens", required=False)
    allowed = data.get("default_allowed_special", [])
    if not isinstance(allowed, list):
        raise TokenizerError(f"{where}: default_allowed_special must be a list, got "
                             f"{type(allowed).__name__}")
    for i, item in enumerate(allowed):   # checked, then unused (as SGLang)
        _text_of(f"{where}: default_allowed_special[{i}]",
                 _bytes_of(f"{where}: default_allowed_special[{i}]", item))
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    owner: dict[int, str] = {}      # id -> the entry that holds it
    for field, entries in (("regular_tokens", regular), ("special_tokens", special)):
        for i, (raw_bytes, token) in enumerate(entries):
            at = f"{field}[{i}]"
            if token in owner:
                raise TokenizerError(f"{where}: {at}.token: id {token} is also {owner[token]}'s")
            owner[token] = at
            if field == "regular_tokens":
                if raw_bytes in ranks:
                    raise TokenizerError(f"{where}: {at}.bytes: {one_line(repr(raw_bytes), 80)} "
                                         f"is also token {ranks[raw_bytes]}'s")
                ranks[raw_bytes] = token
            else:
                text = _text_of(f"{where}: {at}.bytes", raw_bytes)
                if text in specials:
                    raise TokenizerError(f"{where}: {at}: {text!r} is also token "
                                         f"{specials[text]}'s")
                specials[text] = token
    # BPE starts from single bytes: text with a byte that is no token could not be encoded.
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{where}: regular_tokens lacks {len(missing)} of the 256 single "
                             f"bytes (the first: {missing[0]})")
    if EOS not in specials:
        raise TokenizerError(f"{where}: special_tokens has no {EOS} (the end of sequence)")
    highest = max(owner)
    vocab_size = data.get("vocab_size", highest + 1)
    if not _is_int(vocab_size) or not highest < vocab_size <= MAX_VOCAB:
        raise TokenizerError(f"{where}: vocab_size {one_line(repr(vocab_size), 40)} must be an "
                             f"integer in ({highest}, {MAX_VOCAB}]: {owner[highest]} has id "
                             f"{highest}")
    return TokFile(ranks, specials, pattern, vocab_size)


class TiktokenTokenizer:
    """Text <-> token ids with Grok-2's `tokenizer.tok.json`; the interface of
    grok.serving.tokenizer.Tokenizer, plus the special tokens (`special_ids`, `separator_id`,
    `stop_ids`)."""

    def __init__(self, path: str | os.PathLike):
        import tiktoken

        self.path = os.fspath(path)
        contents = read_tok_json(self.path)
        self._size = contents.vocab_size
        self._specials = contents.specials
        try:
            self._encoding = tiktoken.Encoding(
                self.path, pat_str=contents.pattern, mergeable_ranks=contents.ranks,
                special_tokens=contents.specials)
        except ValueError as err:   # the pattern does not compile
            raise TokenizerError(f"{one_line(self.path, 300)}: pat_str is not a valid pattern "
                                 f"({one_line(err, 120)})") from None
        self._allowed = ALLOWED_IN_TEXT & contents.specials.keys()
        self._bytes = {token: raw for raw, token in contents.ranks.items()}
        self._special_text = {token: text for text, token in contents.specials.items()}
        self._bytes.update((token, text.encode("utf-8")) for token, text in
                           self._special_text.items())

    @property
    def vocab_size(self) -> int:
        """The file's vocab_size, else one more than its highest id."""
        return self._size

    @property
    def special_ids(self) -> dict[str, int]:
        """{text: id} of the file's special tokens (a copy)."""
        return dict(self._specials)

    @property
    def eos_id(self) -> int:
        return self._specials[EOS]

    @property
    def pad_id(self) -> int:
        """`<|pad|>`'s id; -1 when the file has none (as SentencePiece reports no pad)."""
        return self._specials.get(PAD, -1)

    @property
    def separator_id(self) -> int | None:
        """`<|separator|>`'s id (it ends each chat turn); None when the file has none."""
        return self._specials.get(SEPARATOR)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a chat turn: the separator (when the file has one) and eos."""
        return tuple(i for i in (self.separator_id, self.eos_id) if i is not None)

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, as SGLang encodes it: the texts of <|separator|>, <|eos|>,
        <|controlN|> and <|reserved_N|> become their special ids (so a user's text can hold
        them), other specials' texts (and <|pad|>'s, which the model masks) are plain text. RequestError for anything but a
        string of valid Unicode (no lone surrogate)."""
        text = check_text(text)
        try:
            return self._encoding.encode(text, allowed_special=self._allowed,
                                         disallowed_special=())
        except ValueError as err:   # the pattern gave up (its backtracking limit)
            raise RequestError(f"the text cannot be tokenized: {one_line(err, 120)}") from None

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (specials as their text). Bytes that are no whole UTF-8 character
        (one split across tokens, cut off at the end) decode as U+FFFD, as an id the file
        does not define does."""
        data = b"".join(self._bytes.get(i, _UNKNOWN_BYTES) for i in map(int, ids))
        return data.decode("utf-8", "replace")

    def piece(self, token: int) -> str:
        """The text one token stands for, as a piece of a longer text: a special's text; bytes
        that are no whole character as <0xNN> names (SentencePiece's spelling of byte pieces);
        U+FFFD for an id the file does not define. What OpenAI's logprobs `tokens` show."""
        token = int(token)
        if token in self._special_text:
            return self._special_text[token]
        raw = self._bytes.get(token)
        if raw is None:
            return UNKNOWN
        text = raw.decode("utf-8", "surrogateescape")   # stray bytes as U+DC80..U+DCFF
        return "".join(f"<0x{ord(c) - 0xDC00:02X}>" if "\udc80" <= c <= "\udcff" else c
                       for c in text)

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({self.path!r}, vocab_size={self.vocab_size})"
