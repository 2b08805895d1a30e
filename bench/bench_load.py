"""Checkpoint loading: peak resident memory and speed, against reading the same files.

    python bench/bench_load.py [--model DIR] [--dtype bfloat16]

Each load runs in a fresh process. Peak RSS is the process's high-water mark during the load
minus its resident size just before it (after imports), compared with the checkpoint's size on
disk (target <= 1.3x). Speed is compared with `cat FILES > /dev/null` over the same files, and
with reading them into freshly allocated memory (what any loader must at least do: cat reuses
one small buffer, so it never pays for faulting in new pages), all with the files already in the
page cache (this machine cannot drop caches), reported as ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

_READ_FRESH = r"""
import sys, time
t = time.perf_counter()
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(f.seek(0, 2)); f.seek(0); f.readinto(buf)
print(time.perf_counter() - t)
"""

_CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
from glm5c.weights import build_model
def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = rss_bytes()
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
model = build_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]) if sys.argv[2] != "auto" else None)
load_s = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
param_bytes = sum(p.nbytes for p in model.parameters())
print(json.dumps({"load_s": load_s, "rss_before": before, "peak": peak, "peak_before": peak_before,
                  "rss_after": rss_bytes(), "param_bytes": param_bytes}))
"""


def measure(model_dir: Path, dtype: str, repeats: int = 3) -> dict:
    files = sorted(str(p) for p in model_dir.glob("*.safetensors"))
    disk_bytes = sum(Path(f).stat().st_size for f in files)
    cat_s = []
    for _ in range(repeats + 1):  # the first run warms the page cache
        t = time.perf_counter()
        subprocess.run(f"cat {' '.join(files)} > /dev/null", shell=True, check=True)
        cat_s.append(time.perf_counter() - t)
    fresh_s = min(
        float(subprocess.run([sys.executable, "-c", _READ_FRESH, *files], check=True, capture_output=True,
                             text=True).stdout)  # fmt: skip
        for _ in range(repeats)
    )
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(model_dir), dtype], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        runs.append(json.loads(out.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["load_s"])
    peak_delta = max(r["peak"] - r["rss_before"] for r in runs)
    cat_best = min(cat_s[1:])
    return {
        "model_dir": str(model_dir),
        "disk_bytes": disk_bytes,
        "param_bytes": best["param_bytes"],
        "peak_rss_delta_bytes": peak_delta,
        "peak_rss_over_disk": peak_delta / disk_bytes,
        "load_s": best["load_s"],
        "cat_s": cat_best,
        "load_GBps": disk_bytes / best["load_s"] / 1e9,
        "cat_GBps": disk_bytes / cat_best / 1e9,
        "load_over_cat_time": best["load_s"] / cat_best,
        "read_fresh_s": fresh_s,
        "load_over_read_fresh_time": best["load_s"] / fresh_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint dir (default: the built-in mini model)")
    parser.add_argument("--dtype", default="auto", help="load dtype (default: the checkpoint's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.model is None:
        from glm5c.default_model import default_model_dir

        args.model = default_model_dir()
    r = measure(Path(args.model), args.dtype, args.repeats)
    print(json.dumps(r, indent=2))
    print(
        f"\nload {r['disk_bytes'] / 1e6:.0f} MB: {r['load_s']:.3f} s ({r['load_GBps']:.2f} GB/s) vs cat "
        f"{r['cat_s']:.3f} s ({r['cat_GBps']:.2f} GB/s) -> {r['load_over_cat_time']:.2f}x cat's time, "
        f"{r['load_over_read_fresh_time']:.2f}x reading into fresh memory ({r['read_fresh_s']:.3f} s); "
        f"peak RSS +{r['peak_rss_delta_bytes'] / 1e6:.0f} MB = {r['peak_rss_over_disk']:.2f}x disk (target <= 1.3x)"
    )


if __name__ == "__main__":
    main()
