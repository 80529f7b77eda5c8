"""What both command lines (`run.py`, `python -m grok.serve`) need to start: the default
checkpoint and where to get one, the mesh / multi-host / KV cache / MoE-evaluation flags and
their checks, joining a multi-host run, the compile cache, and Ctrl-C that ends the process at
once."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from grok.config import DEMO_DIR, MAX_KV_TOKENS, MOE_IMPLS, PAGE_SIZE

DEFAULT_CHECKPOINT = DEMO_DIR.parent
RELEASE_FILES = "pytorch_model-*-TP-common.safetensors"   # Grok-2's release (grok.families)
TOKENIZER_FILES = ("tokenizer.tok.json", "tokenizer.model")   # Grok-2's (first), Grok-1's
GET_WEIGHTS = ("see checkpoints/README.md: download the Grok-1 release (ckpt-0/ and "
               "tokenizer.model) or Grok-2's (its safetensors files and tokenizer.tok.json) "
               "into checkpoints/ or a directory given with --checkpoint")


def add_placement_flags(p: argparse.ArgumentParser) -> None:
    """The mesh, multi-host, KV cache and MoE-evaluation flags (run.py and `python -m
    grok.serve`); `check_placement` checks them; `load_options` turns them into grok.load's
    keyword arguments."""
    p.add_argument("--mesh", default=None, metavar="DATA,MODEL",
                   help="shard over a (data, model) device mesh, e.g. 1,8; weights stream from "
                        "the files onto the devices that own them (default: one device, or "
                        "PROCESSES,LOCAL_DEVICES in a multi-host run)")
    p.add_argument("--layout", choices=("tensor", "expert"), default="tensor",
                   help="partition rules on a mesh: tensor-parallel, or experts over the model "
                        "axis (default: %(default)s)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-host: address of process 0 (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="multi-host: number of processes (or JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="multi-host: this process's index (or JAX_PROCESS_ID)")
    p.add_argument("--max-context", type=int, default=None, metavar="TOKENS",
                   help="the longest sequence (prompt and output) to run, if less than the "
                        "model's context: sizes the KV cache and the memory check (Grok-2's "
                        "131,072 tokens take 32 GiB of cache a sequence)")
    p.add_argument("--kv-cache-tokens", type=int, default=None, metavar="N",
                   help="token slots of the paged KV cache, shared by every sequence (whole "
                        f"pages of {PAGE_SIZE}; a request can be at most this long) (default: "
                        "what fits in 90%% of the device's memory beside the weights, at most "
                        "twice --max-batch x the context, the rest as prefix cache; on CPU "
                        "--max-batch x the context)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not reuse the KV cache of earlier prompts that start with the same "
                        "tokens (a shared system prompt is then prefilled every time)")
    p.add_argument("--moe-impl", choices=MOE_IMPLS, default="auto",
                   help="the MoE's evaluation: auto (the measured best for this backend, card "
                        "and weight format), XLA's dense / gather / grouped, our Triton kernels "
                        "(pallas: GPU, int8; interpreted elsewhere, slow), or tokamax's ragged "
                        "dot (pip install 'grok[kernels]') (default: %(default)s)")


def check_placement(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Range-check the placement flags; parse --mesh (p.error on a bad value)."""
    for flag, value, least in (("--num-processes", args.num_processes, 1),
                               ("--process-id", args.process_id, 0),
                               ("--max-context", args.max_context, 1),
                               ("--kv-cache-tokens", args.kv_cache_tokens, PAGE_SIZE)):
        if value is not None and value < least:
            p.error(f"{flag} must be >= {least}, got {value}")
    if args.kv_cache_tokens is not None and args.kv_cache_tokens > MAX_KV_TOKENS:
        p.error(f"--kv-cache-tokens must be <= {MAX_KV_TOKENS}, got {args.kv_cache_tokens}")
    if args.mesh is not None:
        from grok.parallel.rules import ShardingError, parse_mesh
        try:
            args.mesh = parse_mesh(args.mesh)
        except ShardingError as err:
            p.error(f"--mesh: {err}")


def load_options(args: argparse.Namespace) -> dict:
    """grok.load's keyword arguments from the placement flags (the mesh aside:
    `distributed_mesh`)."""
    return dict(layout=args.layout, moe_impl=args.moe_impl, max_context=args.max_context,
                kv_cache_tokens=args.kv_cache_tokens, prefix_cache=args.prefix_cache)


def distributed_mesh(args: argparse.Namespace):
    """Join a multi-host run when asked (flags or JAX_* variables); the mesh to load onto.
    Every process runs the same program; only process 0 prints."""
    import jax

    from grok.parallel import distributed
    if distributed.initialize(args.coordinator, args.num_processes, args.process_id):
        if not distributed.is_leader():
            sys.stdout = open(os.devnull, "w")
        if args.mesh is None:
            return (jax.process_count(), jax.local_device_count())
    return args.mesh


def enable_compile_cache() -> None:
    """Keep compiled steps on disk so that later runs skip XLA compiles: GROK_COMPILE_CACHE names
    the folder (default ~/.cache/grok/xla; "off" disables it)."""
    import jax
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grok" / "xla"
    path = os.environ.get("GROK_COMPILE_CACHE", str(default))
    if path.strip().lower() in ("", "0", "off", "none"):
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError:
        logging.getLogger(__name__).warning("compile cache %s not writable; not caching", path)
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def exit_on_interrupt() -> None:
    """Make Ctrl-C end the process at once with status 130 and no traceback. Python delivers
    KeyboardInterrupt only between bytecodes of the main thread, so during a long compile or
    device call it would wait (or be lost inside a callback); the C-level handler's wake-up byte
    reaches a watcher thread at once instead."""
    if threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    signal.set_wakeup_fd(write_fd)

    def watch() -> None:
        while True:
            if signal.SIGINT in os.read(read_fd, 64):
                os._exit(130)

    threading.Thread(target=watch, name="grok-sigint", daemon=True).start()


def holds_model(path: Path) -> bool:
    """Whether `path` holds a checkpoint (a ckpt-0/ or Grok-2's release files); cheap: no
    header or config read, so a command line can fail fast before importing jax."""
    return (path / "ckpt-0").is_dir() or any(path.glob(RELEASE_FILES))


def default_checkpoint() -> Path | None:
    """checkpoints/ when it holds a model, else None (the command lines then take the demo)."""
    return DEFAULT_CHECKPOINT if holds_model(DEFAULT_CHECKPOINT) else None


def tokenizer_file(path: Path) -> Path:
    """The model directory's tokenizer file: Grok-2's tokenizer.tok.json where it is there or
    the directory holds Grok-2's release, else Grok-1's tokenizer.model (it may not exist)."""
    grok2 = path / TOKENIZER_FILES[0]
    return grok2 if grok2.is_file() or any(path.glob(RELEASE_FILES)) else path / TOKENIZER_FILES[1]
