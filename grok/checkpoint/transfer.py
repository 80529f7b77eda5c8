"""Host arrays -> device arrays for the streaming loader: which slices this process's devices
hold, global arrays assembled from per-device host slices (aliased where the device lets us),
and a layer's piece written in place into its slot of a stacked leaf on device."""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from grok.checkpoint import fileio
from grok.checkpoint.fileio import Index
from grok.errors import ShardingError


@functools.lru_cache(maxsize=None)
def aliases(device: Any) -> bool:
    """Whether jax.device_put onto `device` aliases aligned host memory instead of copying it
    (XLA's CPU client does): then a buffer handed over must never be written again."""
    probe = fileio.host_array((4096,), np.int8)
    probe[:] = 0
    try:
        return jax.device_put(probe, device, may_alias=True).unsafe_buffer_pointer() == \
            probe.ctypes.data
    except Exception:   # no unsafe_buffer_pointer on this backend: assume a copy
        return False


def layer_piece_sharding(sharding: Any, path: str) -> Any:
    """The sharding of one layer's piece of a stacked [L, ...] leaf sharded by `sharding`: the
    same spec without its first (layer) axis, which must not be sharded (each file is one layer)."""
    if not isinstance(sharding, NamedSharding):
        raise ShardingError(f"{path}: a stacked leaf needs a NamedSharding, got "
                            f"{type(sharding).__name__}")
    spec = tuple(sharding.spec)
    if spec and spec[0] is not None:
        raise ShardingError(f"{path}: the layer axis of a stacked leaf cannot be sharded "
                            f"(spec {sharding.spec})")
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))


def full_index(index: Any, ndim: int) -> Index:
    """`index` padded with whole slices to `ndim` dimensions."""
    return tuple(index) + (slice(None),) * (ndim - len(tuple(index)))


def local_indices(sharding: Any, shape: tuple[int, ...]) -> dict[tuple, Index]:
    """The distinct slices this process's devices hold of an array of `shape`, by slice key."""
    out: dict[tuple, Index] = {}
    for index in sharding.addressable_devices_indices_map(shape).values():
        index = full_index(index, len(shape))
        out.setdefault(fileio.slice_key(index), index)
    return out


def slice_shape(index: Index, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of `array[index]` for an array of `shape`."""
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape))


def to_device(host: np.ndarray, device: Any) -> Any:
    """One device's shard from host memory (on XLA's CPU client this aliases aligned memory)."""
    return jax.device_put(host, device)


def _aliased(array: Any, host: np.ndarray) -> bool:
    try:
        return array.unsafe_buffer_pointer() == host.ctypes.data
    except Exception:   # a backend without buffer pointers: it copied
        return False


def device_array(shape: tuple[int, ...], sharding: Any, host: dict[tuple, np.ndarray]
                 ) -> tuple[Any, bool]:
    """The global array of `shape` whose addressable shards are the host arrays `host` (by slice
    key), and whether any device took over host memory (then it must never be written again).
    A slice that several devices hold is handed over once; the others get copies."""
    arrays, taken = [], set()
    aliased = False
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = fileio.slice_key(full_index(index, len(shape)))
        source = host[key] if key not in taken else np.array(host[key])
        array = to_device(source, device)
        aliased |= key not in taken and _aliased(array, source)
        arrays.append(array)
        taken.add(key)
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays), aliased


def _put_layer(stacked: Any, piece: Any, layer: Any) -> Any:
    return jax.lax.dynamic_update_index_in_dim(stacked, piece, layer, 0)


@functools.lru_cache(maxsize=None)
def _jitted_put() -> Callable:
    return jax.jit(_put_layer, donate_argnums=0)


def put_layer(stacked: Any, piece: Any, layer: int) -> Any:
    """Write one layer's piece into slot `layer` of the stacked leaf (jitted with donation, so
    in place; the result keeps the stacked leaf's sharding)."""
    return _jitted_put()(stacked, piece, np.int32(layer))


@functools.lru_cache(maxsize=256)
def _zeros_fn(shape: tuple[int, ...], dtype: np.dtype, sharding: Any) -> Callable:
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def zeros(shape: tuple[int, ...], dtype: np.dtype, sharding: Any) -> Any:
    """A sharded array of zeros made on the devices (nothing in host memory)."""
    return _zeros_fn(shape, dtype, sharding)()
