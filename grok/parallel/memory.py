"""Per-device memory of a model on a mesh, estimated before any weight is read: `grok.load`
refuses a mesh it cannot fit, and `python -m grok.checkpoint plan` lists the meshes that fit."""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from grok.config import (DEFAULT_GROUP_SIZE, PAGE_SIZE, PREFILL_TOKENS, GrokConfig,
                         prefill_chunk)
from grok.leaves import Entry, checkpoint_entries
from grok.parallel.rules import (DATA, MODEL, ShardingError, check_layout, leaf_specs, local_shape,
                                 mesh_shape)

GB = 1e9
# The share of a device's memory the default KV pool may bring the estimate up to (vLLM's
# gpu_memory_utilization default): the workspace is an estimate (XLA's temporaries and allocator
# fragmentation are not modelled), and a pool that takes the last byte fails at its first step.
KV_MEMORY_FRACTION = 0.9


# --- memory estimates ---------------------------------------------------------------------------
@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per device (the busiest one) of a model on a mesh."""

    mesh: tuple[int, int]
    weights: int
    kv_cache: int
    workspace: int
    capacity: int | None = None
    kv_pages: int = 0      # pages of PAGE_SIZE tokens the KV cache holds

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def describe(self) -> str:
        d, m = self.mesh
        cap = "" if self.capacity is None else f" of {self.capacity / GB:.1f} GB"
        verdict = "" if self.capacity is None else (" fits" if self.fits else " DOES NOT FIT")
        return (f"mesh {d}x{m}: {self.total / GB:.2f} GB per device{cap} (weights "
                f"{self.weights / GB:.2f} + KV cache {self.kv_cache / GB:.2f} + workspace "
                f"{self.workspace / GB:.2f}){verdict}")


def _leaf_layout(config: GrokConfig) -> Iterable[tuple[Entry, int, bool]]:
    """(entry, index of the part: 0 weight or array, 1 scales, per-layer?) of each params leaf of
    the embedding and of one layer."""
    for e in checkpoint_entries(config):
        if e.layer in (None, 0):
            for part in range(2 if e.quantized else 1):
                yield e, part, e.layer is not None


def _part_elements(entry: Entry, part: int, spec: Sequence[Any],
                   sizes: Mapping[str, int]) -> tuple[int, int]:
    """(values in the part's shard, bits each) for the logical shape (int4: two per byte)."""
    shape = entry.scales_shape if part else entry.shape
    if entry.quantized:    # the storage format's bits (a packed format: bits / 8 per weight)
        bits = 8 * np.dtype(entry.fmt.scales_dtype).itemsize if part else entry.fmt.bits
    else:                  # float32; the embedding tables and bf16 matrices in bfloat16
        bits = 8 * np.dtype(entry.float_dtype).itemsize
    return math.prod(local_shape(shape, spec, sizes)), bits


def _part_bytes(entry: Entry, part: int, spec: Sequence[Any], sizes: Mapping[str, int]) -> int:
    values, bits = _part_elements(entry, part, spec, sizes)
    return values * bits // 8


def estimate_memory(config: GrokConfig, mesh: Any, *, batch: int = 1, length: int | None = None,
                    layout: str = "tensor", capacity_gb: float | None = None,
                    overhead_gb: float = 1.0, prefill_tokens: int = PREFILL_TOKENS,
                    kv_cache_tokens: int | None = None) -> MemoryEstimate:
    """Per-device bytes on `mesh` ((data, model), a dict or a Mesh) for `batch` sequences of
    `length` tokens (default: the full context) decoded together:

    - weights: each leaf's shard under the layout's rules (embedding held in bfloat16);
    - KV cache: the engine's paged pool of `kv_cache_tokens` slots (default: `batch` x `length`)
      in whole pages of PAGE_SIZE, [L, pages, page, Hkv, K] bfloat16 x2 (keys, values), kv heads
      over "model" when they divide; pages are not split over "data" (every data shard holds
      the whole pool: grok.parallel.rules, "kv_pages");
    - workspace: one layer's weights gathered over "data" (the scan gathers a layer at a time)
      with a bfloat16 copy of the largest weight shard (int8 -> bf16 in the matmul), the
      activations of a prefill of `length`-token prompts (as many rows as the engine batches
      within `prefill_tokens`, at least one; a longer prompt a chunk at a time, its last chunk
      attending over all of it) or a batch decode step (MoE hidden [N, E, F] float32
      x2, attention scores, each row's pages of keys and values gathered, logits), and
      `overhead_gb` for the runtime.
    """
    sizes = mesh_shape(mesh)
    check_layout(config, sizes, layout)
    d, m = sizes[DATA], sizes[MODEL]
    length = config.sequence_len if length is None else int(length)
    weights = 0
    layer_gathered = 0
    largest = 0
    no_data = {DATA: 1, MODEL: m}
    for entry, part, per_layer in _leaf_layout(config):
        local = _part_bytes(entry, part, leaf_specs(entry, sizes, config, layout)[part], sizes)
        weights += local * (config.num_layers if per_layer else 1)
        if per_layer:
            values, bits = _part_elements(entry, part,
                                          leaf_specs(entry, no_data, config, layout)[part], no_data)
            layer_gathered += values * bits // 8 if d > 1 else 0
            largest = max(largest, values)   # its bfloat16 copy: 2 bytes a value
    kv_heads = config.num_kv_heads // m if config.num_kv_heads % m == 0 else config.num_kv_heads
    local_batch = batch // d if batch % d == 0 else batch
    pages = kv_pages(batch * length if kv_cache_tokens is None else kv_cache_tokens)
    kv = pages * page_bytes(config, (d, m))
    # activations (float32), per device, for the larger of prefill (R x T) and decode (B x 1)
    chunk = min(length, prefill_chunk(prefill_tokens))   # a longer prompt: a chunk at a time
    prefill_rows = max(1, min(batch, prefill_tokens // max(1, chunk)))
    f_local = config.ffn_size // m if config.ffn_size % m == 0 else config.ffn_size
    e_local = config.num_experts // m if layout == "expert" else config.num_experts
    hq_local = config.num_q_heads // m if config.num_q_heads % m == 0 else config.num_q_heads
    v_local = config.vocab_size // m if config.vocab_size % m == 0 else config.vocab_size
    acts = 0
    for rows, n_tokens, keys in ((prefill_rows, prefill_rows * chunk, length),
                                 (local_batch, local_batch, length)):
        moe = 2 * n_tokens * e_local * f_local * 4 + n_tokens * config.num_experts * \
            config.emb_size * 4
        scores = 2 * n_tokens * hq_local * keys * 4
        gathered = 2 * rows * keys * kv_heads * config.key_size * 2   # a layer's pages, bf16
        logits = n_tokens * v_local * 4
        resid = 4 * n_tokens * config.emb_size * 4
        acts = max(acts, moe + scores + gathered + logits + resid)
    workspace = layer_gathered + 2 * largest + acts + int(overhead_gb * GB)
    capacity = None if capacity_gb is None else int(capacity_gb * GB)
    return MemoryEstimate((d, m), int(weights), int(kv), int(workspace), capacity, pages)


def kv_pages(tokens: int, page_size: int = PAGE_SIZE) -> int:
    """Pages of `page_size` slots a pool of `tokens` slots takes (the engine rounds up)."""
    return -(-int(tokens) // page_size)


def page_bytes(config: GrokConfig, mesh: Any, page_size: int = PAGE_SIZE) -> int:
    """Bytes per device of one page of the KV pool: keys and values of every layer,
    [L, page, Hkv, K] bfloat16 x2, kv heads over "model" when they divide (not over "data")."""
    m = mesh_shape(mesh)[MODEL]
    kv_heads = config.num_kv_heads // m if config.num_kv_heads % m == 0 else config.num_kv_heads
    return 2 * config.num_layers * page_size * kv_heads * config.key_size * 2


def kv_room(config: GrokConfig, mesh: Any, memory_bytes: float, *, batch: int = 1,
            length: int | None = None, layout: str = "tensor",
            prefill_tokens: int = PREFILL_TOKENS) -> int:
    """The most KV pool slots, in whole pages, that fit in `memory_bytes` per device beside the
    weights and the workspace of `batch` sequences of `length` tokens (0 if none)."""
    rest = estimate_memory(config, mesh, batch=batch, length=length, layout=layout,
                           prefill_tokens=prefill_tokens, kv_cache_tokens=0)
    free = int(memory_bytes) - rest.weights - rest.workspace
    return max(0, free // page_bytes(config, mesh)) * PAGE_SIZE


def default_kv_tokens(config: GrokConfig, mesh: Any, memory_bytes: float | None, *,
                      batch: int, layout: str = "tensor",
                      prefill_tokens: int = PREFILL_TOKENS) -> int:
    """The KV pool `grok.load` makes when not told (slots, whole pages): `batch` sequences of the
    full context where the device does not report its memory (`memory_bytes` None: a CPU);
    else what fits in KV_MEMORY_FRACTION of it beside the weights and workspace, at least a page
    a sequence and at most twice `batch` x the context: a full batch of full-length sequences,
    and as many pages again for the prefix cache to keep finished prompts in (more would rarely
    be hit; the memory left unclaimed is headroom for the runtime)."""
    context = config.sequence_len
    if memory_bytes is None:
        return batch * context
    room = kv_room(config, mesh, memory_bytes * KV_MEMORY_FRACTION, batch=batch, layout=layout,
                   prefill_tokens=prefill_tokens)
    return min(max(room, batch * PAGE_SIZE), kv_pages(2 * batch * context) * PAGE_SIZE)


def describe_pool(tokens: int, length: int) -> str:
    """'KV pool: N pages of 16 = M tokens (x sequences of `length` tokens)'."""
    pages = kv_pages(tokens)
    return (f"KV pool: {pages} pages of {PAGE_SIZE} = {pages * PAGE_SIZE} tokens "
            f"({pages * PAGE_SIZE / length:.3g} sequences of {length} tokens)")


def mesh_shapes(devices: int) -> list[tuple[int, int]]:
    """Every (data, model) factorisation of `devices`, model-heaviest first."""
    return [(devices // m, m) for m in range(devices, 0, -1) if devices % m == 0]


def plan(config: GrokConfig, devices: int, memory_gb: float, *, batch: int = 1,
         length: int | None = None, layout: str = "tensor",
         kv_cache_tokens: int | None = None) -> list[MemoryEstimate]:
    """The estimate on every mesh of `devices` devices of `memory_gb` GB each (KV pool: as
    `estimate_memory`)."""
    out = []
    for shape in mesh_shapes(devices):
        try:
            out.append(estimate_memory(config, shape, batch=batch, length=length, layout=layout,
                                       capacity_gb=memory_gb, kv_cache_tokens=kv_cache_tokens))
        except ShardingError:
            continue
    return out


def plan_report(config: GrokConfig, devices: int, memory_gb: float, *, batch: int = 1,
                length: int | None = None, layout: str = "tensor",
                kv_cache_tokens: int | None = None) -> tuple[bool, str]:
    """(any mesh fits, a human-readable report) for `python -m grok.checkpoint plan`; with
    `kv_cache_tokens`, the KV cache is a pool of that many slots (whole pages), and the report
    names its pages and how large a pool would fit."""
    kv = kv_cache_tokens
    estimates = plan(config, devices, memory_gb, batch=batch, length=length, layout=layout,
                     kv_cache_tokens=kv)
    length = config.sequence_len if length is None else length
    lines = [f"{devices} device(s) x {memory_gb:g} GB, batch {batch}, length {length}, "
             f"layout {layout}:"]
    if kv is not None:
        lines.append(describe_pool(kv, length))
    lines += ["  " + e.describe() for e in estimates]
    fitting = [e for e in estimates if e.fits]
    if fitting:
        best = min(fitting, key=lambda e: e.total)
        lines.append(f"fits on mesh(es): {', '.join(f'{e.mesh[0]},{e.mesh[1]}' for e in fitting)}"
                     f" (least memory: --mesh {best.mesh[0]},{best.mesh[1]})")
        if kv is None:
            room = max((max_batch(config, e.mesh, memory_gb, length=length, layout=layout),
                        e.mesh) for e in fitting)
            lines.append(f"KV cache room: up to {room[0]} sequences of {length} tokens "
                         f"({room[0] * length} tokens) on --mesh {room[1][0]},{room[1][1]}")
        else:   # the pool is the flag's: how large one would fit beside `batch` sequences
            room = max((kv_room(config, e.mesh, memory_gb * GB, batch=batch, length=length,
                                layout=layout), e.mesh) for e in fitting)
            lines.append(f"KV cache room: up to {kv_pages(room[0])} pages of {PAGE_SIZE} "
                         f"({room[0]} tokens, {room[0] / length:.3g} sequences of {length} "
                         f"tokens) on --mesh {room[1][0]},{room[1][1]}")
    else:
        more = next((n for n in itertools.chain(range(devices + 1, 4 * devices + 1),
                                                (2 ** k for k in range(1, 16)))
                     if n > devices and any(e.fits for e in plan(
                         config, n, memory_gb, batch=batch, length=length, layout=layout,
                         kv_cache_tokens=kv))), None)
        hint = f"; {more} such devices would" if more else ""
        hint += _int4_hint(config, devices, memory_gb, batch, length, layout, kv)
        lines.append(f"does not fit on any mesh of {devices} device(s){hint}")
    return bool(fitting), "\n".join(lines)


def _int4_hint(config: GrokConfig, devices: int, memory_gb: float, batch: int, length: int,
               layout: str, kv_cache_tokens: int | None = None) -> str:
    """Where the weights do not fit: the first smaller format they would fit in (bf16 -> int8
    -> int4 with the converter's default groups) and on which mesh, as a clause of the report's
    last line ("" if none, or the weights are int4 already)."""
    smaller = {16: [(8, 0), (4, DEFAULT_GROUP_SIZE)], 8: [(4, DEFAULT_GROUP_SIZE)]}
    for bits, group in smaller.get(config.weight_bits, []):
        fitting = [e for e in plan(config.replace(weight_bits=bits, group_size=group), devices,
                                   memory_gb, batch=batch, length=length, layout=layout,
                                   kv_cache_tokens=kv_cache_tokens)
                   if e.fits]
        if fitting:
            best = min(fitting, key=lambda e: e.total)
            return (f"; in int{bits} (python -m grok.checkpoint convert SRC DST --bits {bits}) "
                    f"it would fit on --mesh {best.mesh[0]},{best.mesh[1]} "
                    f"({best.total / GB:.1f} GB per device)")
    return ""


def max_batch(config: GrokConfig, mesh: Any, memory_gb: float, *, length: int | None = None,
              layout: str = "tensor", most: int = 1 << 16,
              kv_cache_tokens: int | None = None) -> int:
    """The most sequences of `length` tokens (default: the context) whose KV cache and
    workspace fit beside the weights on `mesh` (0 if not even one; at most `most`). With
    `kv_cache_tokens` the pool is that size whatever the batch: the most decoded together whose
    workspace fits beside it."""
    def fits(batch: int) -> bool:
        return estimate_memory(config, mesh, batch=batch, length=length, layout=layout,
                               capacity_gb=memory_gb, kv_cache_tokens=kv_cache_tokens).fits
    low, high = 0, most
    while low < high:   # memory grows with the batch: bisect for the last that fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def check_fits(config: GrokConfig, mesh: Any, memory_bytes: int | None, *, batch: int = 1,
               length: int | None = None, layout: str = "tensor",
               kv_cache_tokens: int | None = None,
               prefill_tokens: int = PREFILL_TOKENS) -> MemoryEstimate:
    """Raise ShardingError with the numbers (and meshes that would fit) when the model, with a
    KV pool of `kv_cache_tokens` slots (default: `batch` x `length`) and the workspace of
    prefills of `prefill_tokens`, cannot fit in `memory_bytes` per device on `mesh`; None memory
    skips the check."""
    sizes = mesh_shape(mesh)
    cap_gb = None if memory_bytes is None else memory_bytes / GB
    estimate = estimate_memory(config, (sizes[DATA], sizes[MODEL]), batch=batch, length=length,
                               layout=layout, capacity_gb=cap_gb, kv_cache_tokens=kv_cache_tokens,
                               prefill_tokens=prefill_tokens)
    if not estimate.fits:
        devices = sizes[DATA] * sizes[MODEL]
        _, report = plan_report(config, devices, cap_gb, batch=batch, length=length,
                                layout=layout, kv_cache_tokens=kv_cache_tokens)
        others = report.splitlines()[-1]
        pool = "" if kv_cache_tokens is None else \
            f" with a KV pool of {estimate.kv_pages} pages of {PAGE_SIZE}"
        raise ShardingError(f"model does not fit{pool}: {estimate.describe()}; {others}")
    return estimate


def device_memory(device: Any) -> int | None:
    """Bytes of memory of one device, when the runtime says (None on CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:   # not implemented on some backends
        return None
    if not stats:
        return None
    return stats.get("bytes_limit") or None
