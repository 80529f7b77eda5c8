"""Loading benchmark: a synthetic release-format checkpoint of Grok-1 width (2 layers by default,
~13 GB) streamed by grok.checkpoint.loader, against `cat` of the same files, with peak host RSS.

    python benchmarks/load.py [--dir /tmp/grok-load-bench] [--layers 2] [--mesh 1,1] [--loads 2]
                              [--keep] [--reuse] [--root CHECKOUT] [--cold] [--verify]
                              [--preset grok1|tiny|mid]

Order: write (or --reuse an existing one), then `--loads` times: cat (files as the previous step
left them in the page cache), load. Then cat once more. Each load runs in a fresh subprocess so
its peak RSS (ru_maxrss) is its own. On a CPU "device" the loaded weights live in host memory
too, so the RSS the loader itself adds is peak minus the params. `touch` is the rate at which a
fresh process can first-touch as much new memory as the params take (the page-fault ceiling
for anything that materialises them in host memory). `--root` measures another checkout's loader
(e.g. an older commit) on the same files. `--cold` empties the page cache before every `cat` and
every load (Linux, as root), so both read from the disk: the case of a checkpoint too large for
the host's memory, like Grok-1's 318 GB. `--verify` also checks that every loaded tensor holds
exactly the bytes written (a SHA-256 per tensor, as the model holds it: the embedding in
bfloat16; needs a fresh write, not --reuse). `--preset tiny` (or mid: the presets of grok.tools.bench)
writes a small checkpoint of that width instead, a quick check of the script itself.

Prints one line per step, `NAME  RATE GB/s  SECONDS s [details]`, and with --verify a line
`verified: N tensors match what was written`.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def preset_config(preset: str, layers: int):
    """Grok-1 (or a preset of grok.tools.bench) with `layers` layers."""
    from grok.config import GROK1
    if preset == "grok1":
        return GROK1.replace(num_layers=layers)
    from grok.tools.bench import PRESETS
    return PRESETS[preset].replace(num_layers=layers)


def digest(leaf, embed: bool) -> str:
    """SHA-256 of a tensor as the model holds it (int8 weight and bfloat16 scales of a quantised
    leaf; the embedding rounded to bfloat16; other float leaves float32)."""
    import ml_dtypes
    h = hashlib.sha256()
    if hasattr(leaf, "weight"):
        parts = [np.asarray(leaf.weight), np.asarray(leaf.scales)]
    else:
        parts = [np.asarray(leaf).astype(ml_dtypes.bfloat16 if embed else np.float32)]
    for part in parts:
        h.update(str((part.dtype, part.shape)).encode())
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def write(path: Path, config, digests: dict[str, str] | None = None) -> int:
    """Write the checkpoint tensor by tensor (random int8 bytes, bounded scales): no float
    weights are quantised, so 13 GB take a minute, not an hour. With `digests`, each tensor's
    digest goes there by name."""
    import ml_dtypes

    from grok.checkpoint import save_tensor
    from grok.leaves import checkpoint_entries
    from grok.quant import QuantizedWeight8bit

    ckpt = path / "ckpt-0"
    ckpt.mkdir(parents=True, exist_ok=True)
    config.to_json(path / "config.json")
    rng = np.random.default_rng(0)
    for entry in checkpoint_entries(config):
        n = int(np.prod(entry.shape))
        if entry.quantized:
            weight = np.frombuffer(rng.bytes(n), np.int8).reshape(entry.shape)
            scales = (rng.random(entry.scales_shape, np.float32) * 0.01 + 0.001
                      ).astype(ml_dtypes.bfloat16)
            leaf = QuantizedWeight8bit(weight, scales)
        else:
            leaf = np.empty(entry.shape, np.float32)
            flat = leaf.reshape(-1)
            for start in range(0, n, 1 << 27):
                stop = min(n, start + (1 << 27))
                flat[start:stop] = rng.random(stop - start, np.float32) - 0.5
        save_tensor(ckpt / entry.filename, leaf)
        if digests is not None:
            digests[entry.name] = digest(leaf, entry.param == "embeddings")
        del leaf
    return sum(f.stat().st_size for f in ckpt.iterdir())


def drop_caches() -> None:
    """Empty the page cache (clean pages only; needs root)."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        raise SystemExit(f"--cold: cannot write /proc/sys/vm/drop_caches ({err.strerror}); "
                         "run as root") from None
    time.sleep(1)


def cat(path: Path) -> float:
    files = sorted(str(f) for f in (path / "ckpt-0").iterdir())
    start = time.perf_counter()
    subprocess.run(f"cat {' '.join(files)} > /dev/null", shell=True, check=True)
    return time.perf_counter() - start


LOAD = r'''
import inspect, json, resource, sys, time
sys.path.insert(0, sys.argv[3])
import jax
from grok.checkpoint import loader
from grok.checkpoint import read_config
from grok.parallel.rules import make_mesh, params_shardings, parse_mesh
path, mesh, verify = sys.argv[1], parse_mesh(sys.argv[2]), sys.argv[4] == "1"
config = read_config(path)
stats = loader.LoadStats()
start = time.perf_counter()
if "shardings" in inspect.signature(loader.load_params).parameters:   # the loader is told
    from grok.leaves import abstract_params                          # where each leaf goes
    mesh = params_shardings(abstract_params(config), make_mesh(mesh), config)
# (a --root checkout from before that takes the mesh itself)
params = loader.load_params(path, config, mesh, stats=stats, progress=False)
jax.block_until_ready(params)
seconds = time.perf_counter() - start
nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps({"seconds": seconds, "bytes_read": stats.bytes_read, "params_bytes": nbytes,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "max_inflight_tensors": stats.max_inflight_tensors,
                  "max_inflight_bytes": stats.max_inflight_bytes,
                  "digests": digests(params, config) if verify else None}))
'''
# With --verify, the digests of the loaded params (after the timing and the RSS reading: the last
# entry of the dict above), by SPEC path, made by
# `digest` (its source is sent along).
VERIFY = r'''
import hashlib
import numpy as np
def digests(params, config):
    from grok.leaves import checkpoint_entries, from_model_params
    flat = from_model_params(params, config)
    return {e.name: digest(flat[e.name], e.param == "embeddings")
            for e in checkpoint_entries(config)}
'''


def load(path: Path, mesh: str, root: Path, verify: bool = False) -> dict:
    code = VERIFY + inspect.getsource(digest) + LOAD
    out = subprocess.run([sys.executable, "-c", code, str(path), mesh, str(root),
                          "1" if verify else "0"],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the load subprocess failed (exit {out.returncode}):\n"
                         f"{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


TOUCH = r'''
import mmap, sys, time
n = int(sys.argv[1])
start = time.perf_counter()
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE)
for offset in range(0, n, 4096):
    m[offset] = 1
print(time.perf_counter() - start)
'''


def touch(nbytes: int) -> float:
    out = subprocess.run([sys.executable, "-c", TOUCH, str(nbytes)], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def check_dir(path: Path) -> None:
    """Refuse to write into (and afterwards delete) a directory that holds anything but a
    checkpoint this script wrote."""
    if path.exists() and not path.is_dir():
        raise SystemExit(f"--dir {path} is not a directory")
    if path.is_dir() and not {p.name for p in path.iterdir()} <= {"config.json", "ckpt-0"}:
        raise SystemExit(f"--dir {path} holds other files; pass an empty or new directory")


def verify(written: dict[str, str], loaded: dict[str, str]) -> None:
    bad = sorted(name for name in written.keys() | loaded.keys()
                 if written.get(name) != loaded.get(name))
    if bad:
        raise SystemExit(f"verify: {len(bad)} of {len(written)} tensors differ from what was "
                         f"written, e.g. {bad[:3]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/grok-load-bench"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--preset", choices=["grok1", "mid", "tiny"], default="grok1",
                   help="width of the checkpoint written (tiny, mid: grok.tools.bench's presets)")
    p.add_argument("--mesh", default="1,1")
    p.add_argument("--loads", type=int, default=2, help="cat + load rounds")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    p.add_argument("--reuse", action="store_true", help="use the checkpoint already in --dir")
    p.add_argument("--root", type=Path, default=ROOT, help="checkout whose grok.checkpoint.loader to run")
    p.add_argument("--cold", action="store_true",
                   help="empty the page cache before each cat and load (root)")
    p.add_argument("--verify", action="store_true",
                   help="check every loaded tensor against what was written")
    args = p.parse_args(argv)
    from grok.parallel.rules import ShardingError, parse_mesh
    try:
        parse_mesh(args.mesh)
    except ShardingError as err:
        p.error(str(err))
    if args.layers < 1 or args.loads < 1:
        p.error("--layers and --loads must be >= 1")
    if args.verify and args.reuse:
        p.error("--verify checks a fresh write: it cannot be used with --reuse")
    if args.reuse and not (args.dir / "ckpt-0").is_dir():
        p.error(f"--reuse: no checkpoint in {args.dir}")
    if not args.reuse:
        check_dir(args.dir)
    written: dict[str, str] | None = {} if args.verify else None
    try:
        start = time.perf_counter()
        if args.reuse:
            total = sum(f.stat().st_size for f in (args.dir / "ckpt-0").iterdir())
        else:
            total = write(args.dir, preset_config(args.preset, args.layers), written)
            print(f"wrote {total / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
        largest = max(f.stat().st_size for f in (args.dir / "ckpt-0").iterdir())
        print(f"{total / 1e9:.2f} GB, largest file {largest / 1e9:.2f} GB; loader of {args.root}",
              flush=True)
        rows = []
        previous = "reuse" if args.reuse else "write"
        cold = drop_caches if args.cold else (lambda: None)
        for _ in range(args.loads):
            cold()
            t = cat(args.dir)
            rows.append(("cat (cold)" if args.cold else f"cat (after {previous})",
                         total / t / 1e9, t, None))
            cold()
            r = load(args.dir, args.mesh, args.root, verify=args.verify)
            if written is not None:
                verify(written, r["digests"])
            rows.append(("grok.checkpoint.loader (cold)" if args.cold else "grok.checkpoint.loader (after cat)",
                         r["bytes_read"] / r["seconds"] / 1e9, r["seconds"], r))
            previous = "load"
        if not args.cold:
            t = cat(args.dir)
            rows.append(("cat (after load)", total / t / 1e9, t, None))
        t = touch(r["params_bytes"])
        rows.append((f"touch {r['params_bytes'] / 1e9:.2f} GB", r["params_bytes"] / t / 1e9, t,
                     None))
        for name, rate, seconds, r in rows:
            extra = ""
            if r:
                extra = (f"  peak RSS {r['peak_rss'] / 1e9:.2f} GB (params {r['params_bytes'] / 1e9:.2f}"
                         f" GB, loader overhead {(r['peak_rss'] - r['params_bytes']) / 1e9:.2f} GB;"
                         f" target 2 x {largest / 1e9:.2f} + 1 = {(2 * largest + 1e9) / 1e9:.2f} GB),"
                         f" at most {r['max_inflight_tensors']} files / "
                         f"{r['max_inflight_bytes'] / 1e9:.2f} GB in flight")
            print(f"{name:26s} {rate:7.3f} GB/s  {seconds:7.3f} s{extra}", flush=True)
        if written is not None:
            print(f"verified: {len(written)} tensors match what was written ({args.loads} loads)",
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
