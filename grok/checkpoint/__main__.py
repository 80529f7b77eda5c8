"""`python -m grok.checkpoint verify DIR [--full] [--sha256 MANIFEST]`,
`python -m grok.checkpoint convert SRC DST --bits {4,8} [--group-size G]` and
`python -m grok.checkpoint plan ... [--bits 4]`."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Callable, Iterator

import numpy as np

from grok.checkpoint.convert import DEFAULT_GROUP_SIZE, MANIFEST, convert, target_config
from grok.checkpoint.directory import CKPT_DIR, checkpoint_dir, read_config
from grok.families import config_file, read_source
from grok.checkpoint.grok2_release import is_release, open_release
from grok.checkpoint.digests import check_digests, plan_digests
from grok.checkpoint.verify import FileReport, verify
from grok.config import GROK1, GrokConfig
from grok.errors import GrokError, one_line
from grok.parallel import memory
from grok.parallel import rules as sharding   # the layouts' names, for --layout


def main(argv: list[str] | None = None) -> int:
    """`verify DIR [--config FILE] [--full] [--sha256 MANIFEST]`: check a downloaded checkpoint
    without loading it (exit 1 on any problem with a file, 2 on a bad argument, config or
    manifest). `convert SRC DST --bits {4,8} [--group-size G [--exact-group-size]]`: a release
    or converted checkpoint as safetensors, int8 or int4; an int4 SRC is only copied to its own
    groups (exit 2 on any error, DST left absent).
    `plan --devices N --memory GB [--batch B --length T] [--kv-cache-tokens N] [--bits 4
    [--group-size G]] [--config FILE]`: will the model (Grok-1 by default) fit, on which meshes,
    with how much KV cache (exit 1 if on none).
    Ctrl-C ends any of them with one line and status 130, SIGTERM with status 143 (convert
    removing its partial output first)."""
    parser = argparse.ArgumentParser(prog="python -m grok.checkpoint",
                                     description="Checkpoint checks and memory planning.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check a checkpoint's files without loading it")
    v.add_argument("directory", help="directory holding ckpt-0/ (or ckpt-0 itself)")
    v.add_argument("--config", default=None,
                   help="config.json (default: DIR/config.json, else Grok-1)")
    v.add_argument("--workers", type=int, default=4, help="files checked in parallel")
    v.add_argument("--full", action="store_true",
                   help="check every float value for NaN/Inf, not samples (reads all float data)")
    v.add_argument("--sha256", metavar="MANIFEST", default=None,
                   help="also check every file's SHA-256 against MANIFEST, sha256sum's format; "
                   "its paths relative to the directory holding ckpt-0/ if any starts with "
                   "ckpt-0/, else to ckpt-0/ (reads every byte)")
    v.add_argument("-q", "--quiet", action="store_true", help="report only the problems")
    c = sub.add_parser("convert", help="a checkpoint as safetensors, int8 or int4",
                       description="Write a release (int8 pickles) or converted (safetensors) "
                       "checkpoint as safetensors, int8 or int4. An int4 source is only copied "
                       "to its own groups: requantising it would compound the rounding error.")
    c.add_argument("source", help="checkpoint directory (holding ckpt-0/): the release, or one "
                   "convert wrote")
    c.add_argument("destination", help="new directory to write (must not exist)")
    c.add_argument("--bits", type=int, choices=(4, 8), required=True, help="weight bits")
    c.add_argument("--group-size", type=int, default=None,
                   help=f"int4: input rows per scale (default {DEFAULT_GROUP_SIZE}, or an int4 "
                   "source's own); each matrix takes the largest divisor of its input width not "
                   "above it")
    c.add_argument("--exact-group-size", action="store_true",
                   help="int4: every matrix must take --group-size itself (error if it does not "
                   "divide a matrix's input width)")
    c.add_argument("--config", default=None, help="config.json (default: SRC/config.json)")
    p = sub.add_parser("plan", help="per-device memory of a model on N devices")
    p.add_argument("--devices", type=int, required=True, help="number of devices")
    p.add_argument("--memory", type=float, required=True, help="memory per device, GB")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--length", type=int, default=None, help="tokens per sequence "
                   "(default: the context length)")
    p.add_argument("--kv-cache-tokens", type=int, default=None, metavar="N",
                   help="the KV pool's token slots, in whole pages of "
                   f"{memory.PAGE_SIZE} (default: batch x length)")
    p.add_argument("--layout", choices=sorted(sharding.LAYOUTS), default="tensor")
    p.add_argument("--config", default=None, help="config.json (default: Grok-1)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=None,
                   help="weight bits (default: the config's; 4: int4 with the default group size)")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"with --bits 4: input rows per scale (default {DEFAULT_GROUP_SIZE})")
    args = parser.parse_args(argv)
    restore = _terminate_by_exception()
    try:
        return _run(args, parser)
    except (GrokError, OSError) as err:   # checkpoint, config and mesh errors alike
        print(f"python -m grok.checkpoint: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # convert's partial output is gone by now (its finally ran)
        print("python -m grok.checkpoint: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("python -m grok.checkpoint: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        restore()


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that `finally` blocks (convert's removal of its
    partial output) run, as they do for Ctrl-C's KeyboardInterrupt."""


def _terminate_by_exception() -> Callable[[], object]:
    """Make SIGTERM raise _Terminated (once: a second one during the cleanup is ignored) and
    SIGINT raise KeyboardInterrupt even where the launcher left it ignored (Python keeps an
    inherited SIG_IGN: a background job of a script, `nohup cmd &`, could then never be
    stopped that way); returns the function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, terminate),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "convert":
        # (the source's family reads its config: Grok-2's release keeps its token ids in its
        # tokenizer file)
        config = GrokConfig.from_json(args.config) if args.config \
            else read_source(args.source)[2]
        out = convert(args.source, args.destination, args.bits, args.group_size,
                      exact=args.exact_group_size, config=config)
        group = f", group size {out.group_size}" if out.weight_bits == 4 else ""
        print(f"wrote {args.destination}: int{out.weight_bits} safetensors{group}; "
              f"its files' SHA-256 in {args.destination}/SHA256SUMS")
        return 0
    if args.command == "plan":
        if args.devices < 1 or args.memory <= 0 or args.batch < 1 \
                or (args.length is not None and args.length < 1):
            parser.error("--devices, --memory, --batch and --length must be positive")
        if args.kv_cache_tokens is not None and args.kv_cache_tokens < memory.PAGE_SIZE:
            parser.error(f"--kv-cache-tokens must be >= {memory.PAGE_SIZE} (a page), got "
                         f"{args.kv_cache_tokens}")
        config = config_file(args.config) if args.config else GROK1
        if args.group_size is not None and args.bits != 4:
            parser.error("--group-size needs --bits 4")
        if args.bits is not None and (args.bits != config.weight_bits or args.group_size):
            config = target_config(config, args.bits, args.group_size)
        fits, report = memory.plan_report(config, args.devices, args.memory,
                                          batch=args.batch, length=args.length,
                                          layout=args.layout,
                                          kv_cache_tokens=args.kv_cache_tokens)
        print(report)
        return 0 if fits else 1
    if is_release(args.directory):   # Grok-2's release files: headers and shapes
        return _verify_release(args)
    config = GrokConfig.from_json(args.config) if args.config else read_config(args.directory)
    # The manifest is read (and a bad or ambiguous one refused) before any file is.
    plan = plan_digests(args.directory, args.sha256) if args.sha256 else None
    bad = _report(verify(args.directory, config, workers=args.workers, full=args.full),
                  args.quiet, "")
    if plan is not None:
        bad += _report(check_digests(plan, workers=args.workers), args.quiet, "sha256")
        if plan.uncovered:   # not a failure: a manifest relative to ckpt-0/ cannot name them
            print(f"sha256: not covered by {plan.manifest}, whose paths are relative to "
                  f"{CKPT_DIR}/: {', '.join(plan.uncovered)} beside it (a manifest whose paths "
                  f"start with {CKPT_DIR}/ can list them)")
    else:
        manifest = checkpoint_dir(args.directory).parent / MANIFEST
        if manifest.is_file():   # convert writes one: say how to check every byte with it
            print(f"(not read: {manifest}; --sha256 {manifest} checks every byte against it)")
    return 1 if bad else 0


def _verify_release(args: argparse.Namespace) -> int:
    """verify on a Grok-2 release directory: every header parsed strictly, every tensor the
    config needs present with its shape; --full also reads every value (NaN or Inf fail)."""
    if args.sha256:
        print("--sha256 on a Grok-2 release: not yet (the release publishes no SHA256SUMS)")
        return 2
    config = config_file(args.config) if args.config else read_source(args.directory)[2]
    release = open_release(args.directory, config)
    files = release.check()
    if args.full:
        for entry, leaf in release.leaves():   # (closes the files' maps however it ends)
            bad = int(np.count_nonzero(~np.isfinite(np.asarray(leaf, np.float32))))
            if bad:
                print(f"FAIL {entry.name}: {bad} NaN or Inf values")
                release.close()
                return 1
    print(f"{files} files ok ({'every value read' if args.full else 'headers and shapes'}; "
          f"Grok-2 release, {release.ranks} expert ranks)")
    return 0


def _report(reports: Iterator[FileReport], quiet: bool, check: str) -> int:
    """Print one line per report (only the failures if `quiet`) and a summary; the failures."""
    bad = total = 0
    for report in reports:
        total += 1
        bad += not report.ok
        if not report.ok or not quiet:
            status = "ok  " if report.ok else "FAIL"
            print(f"{status} {report.file} {check or report.leaf}: {report.message}", flush=True)
    print(f"{check + ': ' if check else ''}{total - bad} of {total} files ok"
          + (f", {bad} with problems" if bad else ""), flush=True)
    return bad


if __name__ == "__main__":
    sys.exit(main())
