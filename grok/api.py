"""The public entry points: `grok.load(path)` and the model object it returns."""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grok import families
from grok.checkpoint import loader, placement
from grok.checkpoint.convert import convert as convert_checkpoint
from grok.config import MAX_KV_TOKENS, PAGE_SIZE, PREFILL_TOKENS, GrokConfig, model_dir
from grok.errors import CheckpointError, RequestError, TokenizerError, one_line
from grok.kernels.plan import backend_report
from grok.leaves import abstract_params, checkpoint_entries, to_model_params
from grok.model import routing as routing_mod
from grok.model.routing import Routing
from grok.parallel import memory
from grok.parallel import rules as sharding
from grok.serving.engine import Engine, ModelRunner, Request, Result, bucket
from grok.serving.request import token_ids
from grok.serving.chat import ChatTemplate
from grok.serving.sampling import SamplingParams, describe, is_int, read_sampling_defaults
from grok.serving.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class Grok:
    """A loaded model: logits, generation and (with a tokenizer) text completion."""

    def __init__(self, params: dict[str, Any], config: GrokConfig, tokenizer: Tokenizer | None = None,
                 moe_impl: str = "auto", max_batch: int = 8, mesh: Any = None,
                 sampling_defaults: SamplingParams = SamplingParams(), family: Any = None,
                 kv_cache_tokens: int | None = None, prefix_cache: bool = True,
                 prefill_tokens: int = PREFILL_TOKENS):
        """`kv_cache_tokens`: the engine's KV pool, in token slots (rounded up to whole pages;
        default: `max_batch` x the context); `prefix_cache`: whether later prompts reuse the
        pages of earlier ones that start alike; `prefill_tokens`: the prefill budget a step.
        All are kept for `new_engine`."""
        _check_kv_cache(kv_cache_tokens, prefix_cache)
        self.prefill_tokens = prefill_tokens
        self.kv_cache_tokens = None if kv_cache_tokens is None else int(kv_cache_tokens)
        self.prefix_cache = bool(prefix_cache)
        self.config = config
        # The model family (grok.families; None: built from leaves in memory), and the chat
        # template `chat` renders conversations with (None: a base model).
        self.family = family
        self.chat_template: ChatTemplate | None = None
        self.tokenizer = tokenizer
        # The model directory's recommended settings (sampling.json): run.py applies them to the
        # flags not given; `generate` & co. keep their documented defaults.
        self.sampling_defaults = sampling_defaults
        self.max_batch = max_batch
        self.runner = ModelRunner(params, config, moe_impl=moe_impl, mesh=mesh)
        for line in self.runner.plan.describe():   # what runs and, for "auto", why (-v)
            log.info("execution plan: %s", line)
        # One engine for the model's lifetime: its paged KV pool (kv_cache_tokens slots) is made
        # at the first request. `model.engine.start()` drives it from a thread of its own (for
        # a server).
        self.engine = self.new_engine()
        self._routing_fn = None     # jitted on the first `routing` call

    def new_engine(self, prefill_tokens: int | None = None, steps: Any = None) -> Engine:
        """Give the model a new engine (the old one must be idle) and return it: at most
        `prefill_tokens` (default: the model's, 4096 unless `grok.load` was told) prompt tokens
        prefilled per step (longer prompts a chunk per step);
        `steps` its device side (default: this process's; a multi-host leader passes its
        `grok.serving.lockstep.Leader`, whose followers make the same pool by replaying its
        `new_pool` call). Its KV pool and prefix cache are the model's (`kv_cache_tokens`,
        `prefix_cache`)."""
        old = getattr(self, "engine", None)
        if old is not None and not old.idle:
            raise RequestError("the model's engine still has requests: let them finish first")
        self.engine = Engine(self.runner, batch_size=self.max_batch,
                             max_len=self.config.sequence_len, tokenizer=self.tokenizer,
                             prefill_tokens=self.prefill_tokens if prefill_tokens is None
                             else prefill_tokens, kv_cache_tokens=self.kv_cache_tokens,
                             prefix_cache=self.prefix_cache, steps=steps)
        return self.engine

    @property
    def mesh(self) -> Any:
        return self.runner.mesh

    @property
    def params(self) -> dict[str, Any]:
        return self.runner.params

    # --- scoring ----------------------------------------------------------------------------------
    def logits(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Float32 logits [B, T, V] of a full causal forward (no cache) over each token list.

        Ragged lists are right-padded with pad_token to the longest, T; padding is masked, so each
        row's logits at its real positions equal those of the list alone.
        """
        lists, padded = self._padded(token_lists)
        return self.runner.logits(padded)[:, :max(len(t) for t in lists)]

    def _padded(self, token_lists: Any) -> tuple[list[list[int]], np.ndarray]:
        """The checked token lists, and them right-padded with pad_token to a bucketed length."""
        lists = _token_lists(token_lists, self.config)
        longest = max(len(t) for t in lists)
        if longest > self.config.sequence_len:
            raise RequestError(f"a token list of {longest} tokens exceeds the context of "
                             f"{self.config.sequence_len}")
        padded = np.full((len(lists), bucket(longest, self.config.sequence_len)),
                         self.config.pad_token, np.int32)
        for row, tokens in enumerate(lists):
            padded[row, :len(tokens)] = tokens
        return lists, padded

    # --- generation -------------------------------------------------------------------------------
    def _requests(self, token_lists, max_new_tokens, sampling: dict[str, Any], seed, stop_ids,
                  stop_strings, truncate) -> list[Request]:
        params = SamplingParams(**sampling)
        if isinstance(stop_ids, (str, bytes)) or isinstance(stop_strings, (str, bytes)):
            raise RequestError("stop_ids and stop_strings take lists (stop_strings=['\\n'], "
                               "not '\\n')")
        # Every field is checked (and made a tuple) by the engine, at submit.
        return [Request(t, max_new_tokens, params, seed, stop_ids, stop_strings, truncate)
                for t in _token_lists(token_lists, self.config)]

    def run(self, requests: Sequence[Request]) -> list[Result]:
        """Run `grok.Request`s to completion, each with its own sampling settings and seed, up to
        `max_batch` at a time; returns their `grok.Result`s (tokens, finish reason, and the text
        when the model has a tokenizer) in order. Invalid requests raise RequestError (a
        ValueError) before any runs. They go through `model.engine`, beside whatever else it
        runs; a request a failed step ended has finish_reason "error" and its `error`."""
        if isinstance(requests, Request) or not isinstance(requests, Sequence) or not requests \
                or not all(isinstance(r, Request) for r in requests):
            raise RequestError("expected a non-empty list of grok.Request")
        ids = []
        try:
            ids = self.engine.submit_all(list(requests))   # all checked before any is queued
            return [self.engine.wait(rid) for rid in ids]
        finally:
            for rid in ids:           # interrupted: cancelled; then forgotten by the engine
                self.engine.cancel(rid)
                self.engine.pop(rid)

    def generate(self, token_lists: Sequence[Sequence[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                 truncate: str | None = None, *, repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0
                 ) -> list[list[int]]:
        """The new tokens of each prompt: greedy at temperature 0, ending after eos (included),
        a stop id or string, or `max_new_tokens`. Uses the KV cache: prompts prefilled together,
        then one token per step, with up to `max_batch` prompts decoding together. The settings
        apply to every prompt (`run` takes one `grok.Request` each); see `grok.SamplingParams`
        for the penalties. RuntimeError if a step failed."""
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k,
                        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                        frequency_penalty=frequency_penalty)
        requests = self._requests(token_lists, max_new_tokens, sampling, seed, stop_ids,
                                  stop_strings, truncate)
        results = self.run(requests)
        failed = next((r for r in results if r.finish_reason == "error"), None)
        if failed is not None:
            raise RuntimeError(f"generation failed: {failed.error}")
        return [r.tokens for r in results]

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
               stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
               truncate: str | None = None, *, repetition_penalty: float = 1.0,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0
               ) -> Iterator[tuple[int, str | None]]:
        """Yield (token id, new text or None without a tokenizer) for one prompt as each token is
        produced; the text never shows a partial character or the start of a stop string that
        may still complete (grok.serving.detokenizer). The request is checked and queued before
        the first token: bad input raises here. Dropping the iterator early cancels it."""
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k,
                        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                        frequency_penalty=frequency_penalty)
        requests = self._requests([self._encode(prompt)], max_new_tokens, sampling, seed,
                                  stop_ids, stop_strings, truncate)
        return _TokenStream(self.engine, self.engine.submit(requests[0]))

    def complete(self, text: str, max_new_tokens: int = 64, **kwargs: Any) -> str:
        """Continue `text` (needs a tokenizer); returns only the new text."""
        if not isinstance(text, str):
            raise RequestError(f"complete takes a string, got {type(text).__name__} (token ids: "
                               "use generate or stream)")
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: complete needs one")
        return "".join(piece or "" for _, piece in self.stream(text, max_new_tokens, **kwargs))

    # --- chat ------------------------------------------------------------------------------------
    @property
    def turn_end_ids(self) -> tuple[int, ...]:
        """The tokens that end an assistant's turn: the tokenizer's (Grok-2: <|separator|> and
        <|eos|>), else eos."""
        stops = getattr(self.tokenizer, "stop_ids", None)
        return tuple(stops) if stops else (self.config.eos_token,)

    def chat_ids(self, messages: Any, add_generation_prompt: bool = True) -> list[int]:
        """The prompt of a conversation: `messages` ([{"role": "system" | "user" | "assistant",
        "content": text}], OpenAI's form) through the model's chat template, tokenized, ending
        with the assistant's turn to speak (without `add_generation_prompt`: the conversation
        as it stands). RequestError for bad messages or a model without a chat template (a base
        model: grok.load(..., chat_template=FILE) gives it one)."""
        if self.chat_template is None:
            raise RequestError("this model has no chat template (a base model); load it with "
                               "chat_template=FILE (a Jinja template) to chat with it")
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer: chat needs one")
        tok = self.tokenizer
        specials = {"eos_token": tok.piece(tok.eos_id)}   # (templates written for HF name these)
        if tok.pad_id >= 0:
            specials["pad_token"] = tok.piece(tok.pad_id)
        return self._encode(self.chat_template.render(messages, add_generation_prompt,
                                                      special_tokens=specials))

    def chat(self, messages: Any, max_new_tokens: int = 256, *, stream: bool = False,
             **kwargs: Any) -> str | Iterator[str]:
        """The assistant's reply to `messages` (see chat_ids), ending at the end of its turn
        (turn_end_ids), a stop, or `max_new_tokens`; keyword arguments as `stream`'s. With
        `stream=True`, an iterator of the reply's text pieces as they are generated."""
        stops = tuple(kwargs.pop("stop_ids", ())) + self.turn_end_ids
        tokens = self.stream(self.chat_ids(messages), max_new_tokens, stop_ids=stops, **kwargs)
        pieces = (text or "" for _, text in tokens)
        return pieces if stream else "".join(pieces)

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: pass token ids, or load it with "
                                   "tokenizer=PATH")
            try:
                return self.tokenizer.encode(prompt)
            except RequestError:
                raise
            except (UnicodeError, TypeError, RuntimeError, ValueError) as err:
                raise RequestError(one_line(f"the prompt cannot be tokenized: {err}")) from None
        if isinstance(prompt, (bytes, bytearray)) \
                or not isinstance(prompt, (Sequence, np.ndarray)):
            raise RequestError(f"a prompt is a string or a list of token ids, got "
                               f"{describe(prompt)}")
        return prompt                 # its ids are checked with the request (token_ids)

    # --- routing --------------------------------------------------------------------------------
    def routing(self, tokens: str | Sequence[int] | Sequence[Sequence[int]]) -> Routing:
        """Which experts each layer routes each token to, with their gate weights and the router's
        full distribution (a `grok.Routing`), from a full causal forward as `logits` runs.

        `tokens`: one token list (or a string, with a tokenizer) -> arrays [L, T, ...]; a list of
        token lists -> [B, L, T, ...] padded to the longest (padding marked -1 / 0)."""
        single = isinstance(tokens, str) or (
            isinstance(tokens, np.ndarray) and tokens.ndim == 1) or (
            isinstance(tokens, Sequence) and len(tokens) > 0 and is_int(tokens[0]))
        lists, padded = self._padded([self._encode(tokens)] if single else tokens)
        runner = self.runner
        if self._routing_fn is None:    # the MoE evaluation the runner uses
            self._routing_fn = routing_mod.jitted(self.config, runner.scan, runner.plan)
        placed = runner.place.put("tokens", padded) if self.mesh is not None \
            else jnp.asarray(padded)
        arrays = [np.asarray(a) for a in self._routing_fn(runner.params, placed)]
        return routing_mod.from_arrays(*arrays, lists, single)

    def __repr__(self) -> str:
        c = self.config
        return (f"Grok(layers={c.num_layers}, d={c.emb_size}, experts={c.num_experts}/"
                f"top-{c.num_selected_experts}, vocab={c.vocab_size}, "
                f"tokenizer={'yes' if self.tokenizer else 'no'})")


def _token_lists(token_lists: Any, config: GrokConfig) -> list[list[int]]:
    if isinstance(token_lists, np.ndarray) and token_lists.ndim == 2:
        token_lists = list(token_lists)
    if isinstance(token_lists, (str, bytes, bytearray)) \
            or not isinstance(token_lists, Sequence) or not token_lists:
        raise RequestError(f"expected a non-empty list of token lists, got "
                           f"{describe(token_lists)}")
    return [token_ids(tokens, config.vocab_size, f"token list {i}")
            for i, tokens in enumerate(token_lists)]


class _TokenStream:
    """`Grok.stream`'s iterator of (token, text) over the engine's events; the request is
    cancelled and forgotten once finished, closed or dropped (even never iterated)."""

    def __init__(self, engine: Engine, rid: int):
        self._engine, self._rid = engine, rid
        self._events = engine.events(rid)
        self._open = True

    def __iter__(self) -> "_TokenStream":
        return self

    def __next__(self) -> tuple[int, str | None]:
        while self._open:
            event = next(self._events, None)
            if event is None or event.done:
                self.close()
            if event is not None and event.finish_reason == "error":
                raise RuntimeError(f"generation failed: {event.error}")
            if event is not None and event.token is not None:
                return event.token, event.text
        raise StopIteration

    def close(self) -> None:
        if self._open:
            self._open = False
            self._engine.release(self._rid)

    def __del__(self) -> None:
        self.close()


def device_params(flat: dict[str, Any], config: GrokConfig, scan: bool = True) -> dict[str, Any]:
    """Checkpoint leaves (numpy) -> the model's tree on device; each float leaf in its entry's
    dtype (the embedding tables and bf16 matrices in bfloat16, norms and router in float32)."""
    return jax.tree.map(jnp.asarray, _as_stored(flat, config, scan))


def _as_stored(flat: dict[str, Any], config: GrokConfig, scan: bool) -> dict[str, Any]:
    """The model's tree of checkpoint leaves, each float leaf in its entry's dtype (numpy)."""
    flat = {e.name: flat[e.name] if e.quantized else np.asarray(flat[e.name], e.float_dtype)
            for e in checkpoint_entries(config)}
    return to_model_params(flat, config, scan=scan)


def from_flat(flat: dict[str, Any], config: GrokConfig, tokenizer: Tokenizer | None = None,
              scan: bool = True, moe_impl: str = "auto", max_batch: int = 8, *,
              kv_cache_tokens: int | None = None, prefix_cache: bool = True,
              prefill_tokens: int = PREFILL_TOKENS) -> Grok:
    """A model from in-memory checkpoint leaves (e.g. `grok.leaves.random_flat(config)`);
    `kv_cache_tokens` and `prefix_cache` as `Grok`'s (None: `max_batch` x the context)."""
    _check_kv_cache(kv_cache_tokens, prefix_cache)   # before the weights go to the device
    return Grok(device_params(flat, config, scan), config, tokenizer, moe_impl, max_batch,
                kv_cache_tokens=kv_cache_tokens, prefix_cache=prefix_cache,
                prefill_tokens=prefill_tokens)


def _check_kv_cache(kv_cache_tokens: Any, prefix_cache: Any) -> None:
    """RequestError (one line) unless `kv_cache_tokens` is None or an integer >= a page and
    `prefix_cache` a bool."""
    if kv_cache_tokens is not None and (not is_int(kv_cache_tokens)
                                        or not PAGE_SIZE <= kv_cache_tokens <= MAX_KV_TOKENS):
        raise RequestError(f"kv_cache_tokens must be an integer in [{PAGE_SIZE} (a page), "
                           f"{MAX_KV_TOKENS}], got {describe(kv_cache_tokens)}")
    if not isinstance(prefix_cache, (bool, np.bool_)):
        raise RequestError(f"prefix_cache must be True or False, got {describe(prefix_cache)}")


def load(path: str | os.PathLike = "demo", mesh: Any = None, *, tokenizer: str | os.PathLike | None = None,
         scan: bool = True, moe_impl: str = "auto", max_batch: int = 8, layout: str = "tensor",
         memory_gb: float | None = None, progress: bool = True,
         chat_template: str | os.PathLike | None = None, max_context: int | None = None,
         kv_cache_tokens: int | None = None, prefix_cache: bool = True,
         prefill_tokens: int = PREFILL_TOKENS) -> Grok:
    """Load a checkpoint directory holding `ckpt-0/` and optionally `config.json` (none: Grok-1)
    and `tokenizer.model` and `sampling.json` (recommended sampling settings, kept as
    `model.sampling_defaults`); "demo" (the default) is the small model shipped in
    checkpoints/demo. `tokenizer` overrides the tokenizer file. `scan=False` unrolls the layers
    (longer compile, no per-layer weight slicing). `progress`: progress bars while reading.

    `mesh`: a `jax.sharding.Mesh` with axes ("data", "model"), a (data, model) pair or "D,M":
    the weights are streamed from the files straight onto the devices that own each piece
    (grok.checkpoint.loader) by the partition rules of `layout` ("tensor" or "expert"; grok.parallel.rules).
    Before reading any weights the per-device memory (weights, the KV pool, workspace) is
    estimated against `memory_gb` (default: what the device reports; CPUs report nothing, so no
    check) and loading is refused, with the numbers, if it cannot fit.

    `kv_cache_tokens`: the engine's paged KV pool, in token slots shared by every sequence
    (rounded up to whole pages of 16). Default: where the device reports its memory (or
    `memory_gb` says), what fits beside the weights and workspace in 90% of it, at least a page a
    sequence and at most twice `max_batch` x the context (the rest as prefix cache); else
    `max_batch` x the context. The size chosen is logged. `prefix_cache=False`: no reuse of the
    pages of earlier prompts that start alike. `prefill_tokens`: the engine's prefill budget a
    step (`Grok.new_engine`), which the memory estimate's workspace is sized by too.

    The directory's family (grok.families: Grok-1's ckpt-0/, or Grok-2's release files) is
    detected and logged. `chat_template`: a Jinja chat template file for `model.chat` (a chat
    model's family has its own; a base model has none unless given one). `max_context`: the
    longest sequence (prompt and reply) to serve, if less than the model's (Grok-2's 131,072
    tokens make a full-length KV cache 32 GiB a sequence): what the memory check and the
    engine's cache are sized by."""
    _check_kv_cache(kv_cache_tokens, prefix_cache)
    if not is_int(prefill_tokens) or prefill_tokens < 1:
        raise RequestError(f"prefill_tokens must be an integer >= 1, got "
                           f"{describe(prefill_tokens)}")
    _report_backend()
    path = model_dir(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    family = families.detect(path)
    tok = family.tokenizer(path, tokenizer)
    config = family.read_config(path, tok)
    if max_context is not None:
        if not is_int(max_context) or not 1 <= max_context <= config.sequence_len:
            raise RequestError(f"max_context must be an integer in [1, {config.sequence_len}] "
                               f"(the model's context), got {max_context!r}")
        config = config.replace(sequence_len=max_context)
    log.info("%s: a %s checkpoint (%s weights)", path, family.name, config.weight_format)
    _check_vocab(tok, config)
    template = ChatTemplate.from_file(chat_template) if chat_template is not None \
        else ChatTemplate.grok2() if family.chat else None
    sampling = read_sampling_defaults(path)
    mesh = None if mesh is None else sharding.make_mesh(mesh)
    capacity = memory_gb * 1e9 if memory_gb is not None else memory.device_memory(
        jax.devices()[0] if mesh is None else mesh.devices.flat[0])
    kv_cache_tokens = _kv_pool(config, mesh, capacity, max_batch, layout, kv_cache_tokens,
                               prefill_tokens)
    if mesh is not None:
        memory.check_fits(config, mesh, capacity, batch=max_batch, layout=layout,
                          kv_cache_tokens=kv_cache_tokens, prefill_tokens=prefill_tokens)
        # The layout's rules place every leaf; the loader only follows the shardings given.
        shardings = sharding.params_shardings(abstract_params(config, scan), mesh, config, layout)
        if family.stream_leaves is None:   # files in the leaf table's layout: slices streamed
            params = loader.load_params(path, config, shardings, scan=scan, progress=progress)
        else:                              # assembled a leaf at a time, then its slices placed
            params = placement.place_leaves(family.stream_leaves(path, config), config,
                                            shardings, scan)
        log.info("loaded %s onto mesh %s: %s", path, dict(mesh.shape), config)
        model = Grok(params, config, tok, moe_impl, max_batch, mesh=mesh,
                     sampling_defaults=sampling, family=family,
                     kv_cache_tokens=kv_cache_tokens, prefix_cache=prefix_cache,
                     prefill_tokens=prefill_tokens)
        model.chat_template = template
        return model
    flat = family.read_weights(path, config, progress)
    log.info("loaded %s: %s", path, config)
    model = from_flat(flat, config, tok, scan=scan, moe_impl=moe_impl, max_batch=max_batch,
                      kv_cache_tokens=kv_cache_tokens, prefix_cache=prefix_cache,
                      prefill_tokens=prefill_tokens)
    model.sampling_defaults = sampling
    model.family, model.chat_template = family, template
    return model


def _kv_pool(config: GrokConfig, mesh: Any, capacity: float | None, max_batch: int,
             layout: str, asked: int | None, prefill_tokens: int) -> int:
    """The KV pool's token slots (whole pages) `load` makes: `asked`, else sized by
    `memory.default_kv_tokens` from the device's memory `capacity` (None: max_batch x the
    context); logged."""
    context = config.sequence_len
    if asked is not None:
        tokens, why = int(asked), "as asked"
    else:
        shape = (1, 1) if mesh is None else mesh   # one device: the estimate of a 1x1 mesh
        tokens = memory.default_kv_tokens(config, shape, capacity, batch=max_batch,
                                          layout=layout if mesh is not None else "tensor",
                                          prefill_tokens=prefill_tokens)
        why = (f"max_batch {max_batch} x the context: the device reports no memory"
               if capacity is None else
               f"what fits in {memory.KV_MEMORY_FRACTION:.0%} of {capacity / 1e9:.1f} GB a device "
               f"beside the weights and workspace, at most twice max_batch {max_batch} x the "
               "context")
    tokens = memory.kv_pages(tokens) * PAGE_SIZE
    log.info("%s, %s%s", memory.describe_pool(tokens, context), why,
             "" if tokens >= context else f"; requests are limited to {tokens} tokens")
    return tokens


def _check_vocab(tok: Any, config: GrokConfig) -> None:
    if tok is not None and tok.vocab_size > config.vocab_size:
        raise TokenizerError(f"{tok.path}: tokenizer has {tok.vocab_size} pieces but the "
                             f"model's vocabulary is {config.vocab_size}")


def convert(src: str | os.PathLike, dst: str | os.PathLike, bits: int,
            group_size: int | None = None, *, exact: bool = False,
            progress: bool = True) -> GrokConfig:
    """Convert the checkpoint at `src` (Grok-1's release, Grok-2's release as published, or a
    conversion) into int8 or int4 safetensors at `dst` (a new directory; see
    grok.checkpoint.convert). Returns dst's config."""
    _, _, config = families.read_source(src)
    return convert_checkpoint(src, dst, bits, group_size, exact=exact, config=config,
                              progress=progress)


@functools.cache
def _report_backend() -> None:
    """Log JAX's backend and devices (-v), and warn once a process where an accelerator is
    present that this JAX does not use."""
    line, warning = backend_report()
    log.info("%s", line)
    if warning:
        log.warning("%s", warning)


