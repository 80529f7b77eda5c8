"""`python run.py "a prompt"`: load a checkpoint and print completions."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints"
DEMO_CHECKPOINT = DEFAULT_CHECKPOINT / "demo"   # the small model `python -m grok.train_demo` ships
GET_WEIGHTS = ("see checkpoints/README.md: download the Grok-1 release (ckpt-0/ and "
               "tokenizer.model) into that directory")


class CliError(Exception):
    """A problem to report in one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the whole usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _Parser(
        prog="run.py", description="Sample a continuation of a prompt from a Grok checkpoint.")
    p.add_argument("prompt", nargs="*", help="prompt text (several prompts are batched)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="directory holding ckpt-0/ and optionally config.json and tokenizer.model "
                        f"(default: {DEFAULT_CHECKPOINT}, or the demo model {DEMO_CHECKPOINT} "
                        "when that holds no ckpt-0/)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="SentencePiece tokenizer.model (default: CHECKPOINT/tokenizer.model)")
    p.add_argument("--prompts-file", type=Path, default=None,
                   help="file with one prompt per line, added to the prompts given")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest; 0: all")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--max-batch", type=int, default=8, help="prompts decoded together")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    p.add_argument("--interactive", action="store_true",
                   help="after any prompts given, read prompts from stdin, one per line, "
                        "until EOF")
    p.add_argument("--unrolled", action="store_true",
                   help="unroll the layers instead of scanning (slower compile)")
    p.add_argument("--mesh", default=None, metavar="DATA,MODEL",
                   help="shard over a (data, model) device mesh, e.g. 1,8; weights stream from "
                        "the files onto the devices that own them (default: one device, or "
                        "PROCESSES,LOCAL_DEVICES in a multi-host run)")
    p.add_argument("--layout", choices=("tensor", "expert"), default="tensor",
                   help="partition rules on a mesh: tensor-parallel (default) or experts over "
                        "the model axis")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-host: address of process 0 (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None,
                   help="multi-host: number of processes (or JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None,
                   help="multi-host: this process's index (or JAX_PROCESS_ID)")
    p.add_argument("-v", "--verbose", action="store_true", help="log loading and compiling")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        p.error(f"--top-k must be >= 0, got {args.top_k}")
    if args.max_batch < 1:
        p.error(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.mesh is not None:
        from grok.sharding import ShardingError, parse_mesh
        try:
            args.mesh = parse_mesh(args.mesh)
        except ShardingError as err:
            p.error(f"--mesh: {err}")
    if args.num_processes is not None and args.num_processes < 1:
        p.error(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and args.process_id < 0:
        p.error(f"--process-id must be >= 0, got {args.process_id}")
    return args


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = [" ".join(args.prompt)] if args.prompt else []
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text().splitlines()
        except OSError as err:
            raise CliError(f"cannot read --prompts-file {args.prompts_file}: {err.strerror}")
        prompts += [line for line in lines if line.strip()]
    if not prompts and not args.interactive:
        raise CliError("no prompt given: pass one as an argument, use --prompts-file or "
                       "--interactive")
    return prompts


def _check_files(args: argparse.Namespace) -> None:
    if args.checkpoint is None:
        args.checkpoint = DEFAULT_CHECKPOINT
        if not (DEFAULT_CHECKPOINT / "ckpt-0").is_dir() and (DEMO_CHECKPOINT / "ckpt-0").is_dir():
            print(f"run.py: no Grok-1 checkpoint in {DEFAULT_CHECKPOINT} (see checkpoints/README.md); "
                  f"using the demo model {DEMO_CHECKPOINT}", file=sys.stderr)
            args.checkpoint = DEMO_CHECKPOINT
    ckpt = args.checkpoint
    if not (ckpt / "ckpt-0").is_dir():
        raise CliError(f"checkpoint not found: {ckpt / 'ckpt-0'} is missing; {GET_WEIGHTS}")
    tok = args.tokenizer or ckpt / "tokenizer.model"
    if not tok.is_file():
        raise CliError(f"tokenizer not found: {tok} is missing; {GET_WEIGHTS}, or pass --tokenizer")
    args.tokenizer = tok


def _distributed_mesh(args: argparse.Namespace):
    """Join a multi-host run when asked (flags or JAX_* variables); the mesh to load onto.
    Every process runs the same program; only process 0 prints."""
    import os

    import jax

    from grok import distributed
    if distributed.initialize(args.coordinator, args.num_processes, args.process_id):
        if not distributed.is_leader():
            sys.stdout = open(os.devnull, "w")
        if args.mesh is None:
            return (jax.process_count(), jax.local_device_count())
    return args.mesh


def _complete(model, prompts: list[str], args: argparse.Namespace, settings: dict) -> None:
    """Print each prompt with its continuation: streamed token by token, or batched."""
    if not prompts:
        return
    if args.stream:
        for prompt in prompts:
            pieces = model.stream(prompt, args.max_new_tokens, **settings)  # checks the prompt
            print(prompt, end="", flush=True)
            for _, piece in pieces:
                print(piece or "", end="", flush=True)
            print(flush=True)
        return
    outputs = model.generate([model.tokenizer.encode(p) for p in prompts], args.max_new_tokens,
                             **settings)
    for prompt, out in zip(prompts, outputs):
        print(prompt + model.tokenizer.decode(out), flush=True)


def _enable_compile_cache() -> None:
    """Keep compiled steps on disk so that later runs skip XLA compiles: GROK_COMPILE_CACHE names
    the folder (default ~/.cache/grok/xla; "off" disables it)."""
    import os

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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        prompts = _prompts(args)
        _check_files(args)
        import grok  # deferred: importing jax takes a moment, and bad flags should fail fast
        _enable_compile_cache()
        from grok.checkpoint import CheckpointError
        from grok.config import ConfigError
        from grok.sharding import ShardingError
        from grok.tokenizer import TokenizerError
        try:
            mesh = _distributed_mesh(args)
            model = grok.load(args.checkpoint, mesh, tokenizer=args.tokenizer,
                              scan=not args.unrolled, max_batch=args.max_batch,
                              layout=args.layout)
            settings = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed)
            _complete(model, prompts, args, settings)
            if args.interactive:
                for line in sys.stdin:
                    if not line.strip():
                        continue
                    try:
                        _complete(model, [line.rstrip("\n")], args, settings)
                    except ValueError as err:   # one bad prompt does not end the session
                        print(f"run.py: error: {err}", file=sys.stderr, flush=True)
        except (CheckpointError, ConfigError, ShardingError, TokenizerError, ValueError) as err:
            raise CliError(str(err)) from None
        return 0
    except CliError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
