"""Loading benchmark: a synthetic release-format checkpoint of Grok-1 width (2 layers by default,
~13 GB) streamed by grok.loader, against `cat` of the same files, with peak host RSS.

    python benchmarks/load.py [--dir /tmp/grok-bench] [--layers 2] [--mesh 1,1] [--loads 2]
                              [--keep] [--reuse] [--root CHECKOUT] [--cold]

Order: write (or --reuse an existing one), then `--loads` times: cat (files as the previous step
left them in the page cache), load. Then cat once more. Each load runs in a fresh subprocess so
its peak RSS (ru_maxrss) is its own. On a CPU "device" the loaded weights live in host memory
too, so the RSS the loader itself adds is peak minus the params. `touch` is the rate at which a
fresh process can first-touch as much new memory as the params take (the page-fault ceiling
for anything that materialises them in host memory). `--root` measures another checkout's loader
(e.g. an older commit) on the same files. `--cold` empties the page cache before every `cat` and
every load (Linux, as root), so both read from the disk: the case of a checkpoint too large for
the host's memory, like Grok-1's 318 GB.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write(path: Path, layers: int) -> int:
    """Write the checkpoint tensor by tensor (random int8 bytes, bounded scales): no float
    weights are quantised, so 13 GB take a minute, not an hour."""
    import ml_dtypes

    from grok.checkpoint import save_tensor
    from grok.config import GROK1
    from grok.params import checkpoint_entries
    from grok.quant import QuantizedWeight8bit

    config = GROK1.replace(num_layers=layers)
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
import json, resource, sys, time
sys.path.insert(0, sys.argv[3])
import jax
from grok import loader
from grok.checkpoint import read_config
from grok.sharding import parse_mesh
path, mesh = sys.argv[1], parse_mesh(sys.argv[2])
config = read_config(path)
stats = loader.LoadStats()
start = time.perf_counter()
params = loader.load_params(path, config, mesh, stats=stats, progress=False)
jax.block_until_ready(params)
seconds = time.perf_counter() - start
nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps({"seconds": seconds, "bytes_read": stats.bytes_read, "params_bytes": nbytes,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "max_inflight_tensors": stats.max_inflight_tensors,
                  "max_inflight_bytes": stats.max_inflight_bytes}))
'''


def load(path: Path, mesh: str, root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, str(path), mesh, str(root)],
                         capture_output=True, text=True, check=True)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/grok-load-bench"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mesh", default="1,1")
    p.add_argument("--loads", type=int, default=2, help="cat + load rounds")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    p.add_argument("--reuse", action="store_true", help="use the checkpoint already in --dir")
    p.add_argument("--root", type=Path, default=ROOT, help="checkout whose grok.loader to run")
    p.add_argument("--cold", action="store_true",
                   help="empty the page cache before each cat and load (root)")
    args = p.parse_args()
    try:
        start = time.perf_counter()
        if args.reuse:
            total = sum(f.stat().st_size for f in (args.dir / "ckpt-0").iterdir())
        else:
            total = write(args.dir, args.layers)
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
            r = load(args.dir, args.mesh, args.root)
            rows.append(("grok.loader (cold)" if args.cold else "grok.loader (after cat)",
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
            print(f"{name:26s} {rate:6.2f} GB/s  {seconds:6.1f} s{extra}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
