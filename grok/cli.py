"""`python run.py "a prompt" ["another" ...]`: load a checkpoint and print completions.

Each argument is one prompt; several prompts (arguments, --prompts-file lines, --interactive
lines) are decoded together and their outputs told apart by a `--- prompt N ---` header, or
printed as one JSON object per line with --json. Errors are one line on stderr (exit 2); a closed
output pipe ends the run quietly (exit 0) and Ctrl-C at once (exit 130), without a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from grok.config import DEMO, DEMO_DIR, model_dir
from grok.errors import GrokError
from grok.launch import (DEFAULT_CHECKPOINT, GET_WEIGHTS, add_placement_flags,
                         check_placement, default_checkpoint, distributed_mesh,
                         enable_compile_cache, exit_on_interrupt, holds_model, load_options,
                         tokenizer_file)

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")


class CliError(Exception):
    """A problem to report in one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="run.py", description="Sample continuations of prompts from a Grok "
                "checkpoint. Sampling flags not given take the model's sampling.json, if it "
                "has one (the demo model does), else the defaults shown.")
    p.add_argument("prompt", nargs="*",
                   help="prompts, one per argument; several are decoded together")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="a Grok-1 directory (ckpt-0/ and optionally config.json, "
                        "tokenizer.model, sampling.json), a Grok-2 release as downloaded (its "
                        f"safetensors files and tokenizer.tok.json), a conversion, or '{DEMO}' "
                        f"for the demo model (default: {DEFAULT_CHECKPOINT}, or the demo model "
                        "when that holds no checkpoint)")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="FILE",
                   help="the tokenizer file (default: DIR/tokenizer.tok.json for Grok-2, else "
                        "DIR/tokenizer.model)")
    p.add_argument("--prompts-file", type=Path, default=None, metavar="FILE",
                   help="file with one prompt per line (blank lines skipped), after the "
                        "prompts given as arguments")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate per prompt (default: %(default)s)")
    sampling = p.add_argument_group("sampling (defaults: the model's sampling.json, else those "
                                    "shown)")
    sampling.add_argument("--temperature", type=float, default=None, metavar="T",
                          help="0 is greedy (default: 0)")
    sampling.add_argument("--top-p", type=float, default=None, metavar="P",
                          help="nucleus sampling mass, in (0, 1] (default: 1)")
    sampling.add_argument("--top-k", type=int, default=None, metavar="K",
                          help="sample among the K likeliest; 0: all (default: 0)")
    sampling.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                          help="divide the logits of tokens already in the prompt or output by "
                               "R (> 0; 1 is off; default: 1)")
    sampling.add_argument("--presence-penalty", type=float, default=None, metavar="X",
                          help="subtract X from tokens already in the output, in [-2, 2] "
                               "(default: 0)")
    sampling.add_argument("--frequency-penalty", type=float, default=None, metavar="X",
                          help="subtract X times a token's count in the output, in [-2, 2] "
                               "(default: 0)")
    sampling.add_argument("--seed", type=int, default=0,
                          help="random seed for sampling (default: %(default)s)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop a completion at TEXT (not printed); repeatable")
    p.add_argument("--truncate", choices=("left",), default=None,
                   help="'left': drop the start of a prompt too long for the context instead of "
                        "refusing it")
    p.add_argument("--max-batch", type=int, default=8, metavar="B",
                   help="prompts decoded together (default: %(default)s)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    out.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt and line: index, prompt, text, "
                          "tokens, prompt_tokens, finish_reason (eos, stop or length)")
    p.add_argument("--interactive", action="store_true",
                   help="after any prompts given, read prompts from stdin, one per line, "
                        "until EOF")
    p.add_argument("--chat", action="store_true",
                   help="a conversation through the model's chat template: each prompt given, "
                        "then each line of stdin until EOF, is your turn; the reply streams "
                        "and the history is kept (Grok-2; a base model needs --chat-template)")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="with --chat: a system message that opens the conversation")
    p.add_argument("--chat-template", type=Path, default=None, metavar="FILE",
                   help="a Jinja chat template (for a base model, or to replace the model's)")
    p.add_argument("--unrolled", action="store_true",
                   help="unroll the layers instead of scanning (slower compile)")
    add_placement_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log loading and compiling")
    args = p.parse_args(argv)
    _check_ranges(p, args)
    return args


def _check_ranges(p: _Parser, args: argparse.Namespace) -> None:
    checks = [
        ("--max-new-tokens", args.max_new_tokens, lambda v: v >= 1, ">= 1"),
        ("--temperature", args.temperature, lambda v: 0 <= v < float("inf"), ">= 0"),
        ("--top-p", args.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
        ("--top-k", args.top_k, lambda v: v >= 0, ">= 0"),
        ("--repetition-penalty", args.repetition_penalty, lambda v: 0 < v < float("inf"),
         "> 0"),
        ("--presence-penalty", args.presence_penalty, lambda v: -2 <= v <= 2, "in [-2, 2]"),
        ("--frequency-penalty", args.frequency_penalty, lambda v: -2 <= v <= 2, "in [-2, 2]"),
        ("--max-batch", args.max_batch, lambda v: v >= 1, ">= 1"),
    ]
    for flag, value, ok, words in checks:
        if value is not None and not ok(value):   # NaN fails every comparison, so it lands here
            p.error(f"{flag} must be {words}, got {value}")
    check_placement(p, args)


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    for i, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            raise CliError(f"prompt {i} is empty")
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise CliError(f"cannot read --prompts-file {args.prompts_file}: "
                           f"{getattr(err, 'strerror', None) or err}") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts and not args.interactive and not args.chat:
        raise CliError("no prompt given: pass one as an argument, use --prompts-file or "
                       "--interactive")
    return prompts


def _check_files(args: argparse.Namespace) -> None:
    if args.checkpoint is None:
        args.checkpoint = default_checkpoint()
        if args.checkpoint is None and (DEMO_DIR / "ckpt-0").is_dir():
            print(f"run.py: no checkpoint in {DEFAULT_CHECKPOINT} (see checkpoints/README.md); "
                  f"using the demo model {DEMO_DIR}", file=sys.stderr)
            args.checkpoint = DEMO_DIR
        args.checkpoint = args.checkpoint or DEFAULT_CHECKPOINT
    try:
        ckpt = model_dir(args.checkpoint)
    except GrokError as err:
        raise CliError(str(err)) from None
    if not holds_model(ckpt):
        raise CliError(f"checkpoint not found: {ckpt / 'ckpt-0'} is missing; {GET_WEIGHTS}")
    args.checkpoint = ckpt
    if args.chat_template is not None and not args.chat_template.is_file():
        raise CliError(f"chat template not found: --chat-template {args.chat_template} is not "
                       "a file")
    if args.tokenizer is not None:
        if not args.tokenizer.is_file():
            raise CliError(f"tokenizer not found: --tokenizer {args.tokenizer} is not a file")
        return
    args.tokenizer = tokenizer_file(ckpt)
    if not args.tokenizer.is_file():
        raise CliError(f"tokenizer not found: {args.tokenizer} is missing; {GET_WEIGHTS}, or "
                       "pass --tokenizer FILE")


def _sampling(args: argparse.Namespace, defaults: Any) -> Any:
    """The flags' SamplingParams: each flag given wins over the model's sampling.json (whose
    settings in use are named on stderr)."""
    given = {name: getattr(args, name) for name in SAMPLING_FLAGS
             if getattr(args, name) is not None}
    fallback = type(defaults)()
    taken = [f"--{name.replace('_', '-')} {getattr(defaults, name)}" for name in SAMPLING_FLAGS
             if name not in given and getattr(defaults, name) != getattr(fallback, name)]
    if taken:
        print(f"run.py: sampling with the model's sampling.json: {' '.join(taken)}",
              file=sys.stderr)
    return dataclasses.replace(defaults, **given)


class _Printer:
    """Prints completions, numbered when there can be several; checks each prompt first so that
    a bad one is reported in the CLI's words."""

    def __init__(self, model: Any, args: argparse.Namespace, numbered: bool):
        self.model, self.args, self.numbered = model, args, numbered
        self.sampling = _sampling(args, model.sampling_defaults)
        self.count = 0

    def request(self, index: int, prompt: str) -> Any:
        import grok
        tokens = self.model.tokenizer.encode(prompt)
        context, new = self.model.config.sequence_len, self.args.max_new_tokens
        if not tokens:
            raise CliError(f"prompt {index} is empty after tokenization")
        if new >= context:
            raise CliError(f"--max-new-tokens {new} leaves no room for a prompt in the model's "
                           f"context of {context} tokens")
        if len(tokens) + new > context and self.args.truncate is None:
            raise CliError(f"prompt {index} is {len(tokens)} tokens: with --max-new-tokens {new} "
                           f"it exceeds the model's context of {context} tokens (shorten it, "
                           "lower --max-new-tokens, or pass --truncate left to drop its start)")
        return grok.Request(tokens, new, self.sampling, self.args.seed, (),
                            tuple(self.args.stop), self.args.truncate)

    def complete(self, prompts: list[str]) -> None:
        if not prompts:
            return
        first = self.count + 1
        self.count += len(prompts)     # a refused prompt keeps its number too
        requests = [self.request(first + i, p) for i, p in enumerate(prompts)]  # all, first
        if self.args.stream:
            for i, (prompt, request) in enumerate(zip(prompts, requests)):
                pieces = self.model.stream(request.prompt, request.max_new_tokens,
                                           seed=request.seed, stop_strings=request.stop_strings,
                                           truncate=request.truncate,
                                           **dataclasses.asdict(request.sampling))
                self._header(first + i)
                print(prompt, end="", flush=True)
                for _, piece in pieces:
                    print(piece or "", end="", flush=True)
                print(flush=True)
            return
        for i, (prompt, result) in enumerate(zip(prompts, self.model.run(requests))):
            if self.args.json:
                print(json.dumps({"index": first + i, "prompt": prompt, "text": result.text,
                                  "tokens": result.tokens, "prompt_tokens": len(result.prompt),
                                  "finish_reason": result.finish_reason}), flush=True)
            else:
                self._header(first + i)
                print(prompt + result.text, flush=True)

    def _header(self, index: int) -> None:
        if self.numbered:
            print(f"--- prompt {index} ---", flush=True)


def _interactive(printer: _Printer) -> None:
    """Prompts from stdin, one per line; a `> ` marker on stderr when a person is typing (as
    Python's REPL does). A bad prompt is reported and the session goes on."""
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if not line.strip():
            continue
        try:
            printer.complete([line.rstrip("\n")])
        except (CliError, GrokError) as err:
            print(f"run.py: error: {err}", file=sys.stderr, flush=True)


def _chat(model: Any, args: argparse.Namespace, prompts: list[str]) -> None:
    """A conversation: the prompts given, then stdin's lines, are the user's turns; each reply
    streams as it is generated and joins the history. A turn the model refuses (too long for
    the context, a bad message) is reported and left out; the conversation goes on."""
    if model.chat_template is None:
        raise CliError("this model has no chat template (a base model): pass --chat-template "
                       "FILE, or use --interactive")
    sampling = dataclasses.asdict(_sampling(args, model.sampling_defaults))
    history = [{"role": "system", "content": args.system}] if args.system else []
    tty = sys.stdin.isatty()

    def turns() -> Iterator[str]:
        yield from prompts
        while True:
            if tty:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return
            if line.strip():
                yield line.rstrip("\n")
    for text in turns():
        history.append({"role": "user", "content": text})
        reply = []
        try:
            for piece in model.chat(history, args.max_new_tokens, stream=True, seed=args.seed,
                                    stop_strings=tuple(args.stop), **sampling):
                print(piece, end="", flush=True)
                reply.append(piece)
        except GrokError as err:
            history.pop()
            print(f"run.py: error: {err}", file=sys.stderr, flush=True)
            continue
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(reply)})


def main(argv: Sequence[str] | None = None) -> int:
    exit_on_interrupt()
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`run.py ... | head -1`): stop quietly; point stdout at /dev/null
        # so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        prompts = _prompts(args)
        _check_files(args)
        import grok  # deferred: importing jax takes a moment, and bad flags should fail fast
        enable_compile_cache()
        try:
            mesh = distributed_mesh(args)
            model = grok.load(args.checkpoint, mesh, tokenizer=args.tokenizer,
                              scan=not args.unrolled, max_batch=args.max_batch,
                              chat_template=args.chat_template, **load_options(args))
            if args.chat:
                _chat(model, args, prompts)
                return 0
            printer = _Printer(model, args, args.interactive or len(prompts) > 1)
            printer.complete(prompts)
            if args.interactive:
                _interactive(printer)
        except (GrokError, OSError) as err:   # bad input of any kind; unreadable files
            if isinstance(err, BrokenPipeError):
                raise
            raise CliError(str(err)) from None
        return 0
    except CliError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2
