"""Multi-host runs on JAX's own distributed runtime.

Every host runs the same program (`python run.py ... --coordinator HOST:PORT --num-processes N
--process-id I`, or the environment variables below). `initialize` must run before anything
touches a jax device; afterwards `jax.devices()` lists the devices of all hosts, a mesh spans
them, and grok.checkpoint.loader makes each process read only the checkpoint slices of its own devices.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from grok.errors import ConfigError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {value!r}") \
            from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Any = None,
               auto: bool = False) -> bool:
    """Join a multi-process run: `coordinator` "host:port" (process 0 listens there),
    `num_processes`, this process's `process_id`. Missing values come from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID. With none of them (and `auto` False) this is a
    single-process run and nothing happens; `auto=True` lets jax detect a cluster (SLURM, Open MPI,
    Cloud TPU, ...). Returns whether the distributed runtime was initialised.

    CPU devices exchange data with gloo collectives (set here, before the runtime starts)."""
    import jax

    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator is None and num_processes is None and process_id is None and not auto:
        return False
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"the number of processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None \
            and not 0 <= process_id < num_processes:
        raise ConfigError(f"process id {process_id} is outside [0, {num_processes})")
    if num_processes == 1 and not auto:
        return False
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:   # an older or newer jax without the option: its default is used
        log.debug("jax_cpu_collectives_implementation not settable", exc_info=True)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    log.info("process %d of %d: %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_leader() -> bool:
    """True on the process that should print (process 0), and in single-process runs."""
    import jax
    return jax.process_index() == 0
