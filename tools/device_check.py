"""The GPU check: one prepared script that runs every GPU-only test and benchmark and prints a table.

    python tools/device_check.py [--out DIR] [--skip NAME ...]

Sections run one after another in subprocesses, each with its own time limit, so one failure or
hang does not cost the others. Everything each section printed goes to DIR/device_check.log and a
summary (status, seconds, last lines) to DIR/device_check.json; the table goes to stdout.
Install what the GPU machine lacks first (msgspec, pyzmq, nvidia-cutlass wheels: see the device
notes in README.md). Record the figures in bench/results/ with the date and the hardware.
The limits add up to more than one 10-minute device call; the sections are expected to take about
10 minutes together on an H200. With a short lease, run it as two calls split with --skip.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, command, time limit in seconds); a section whose script is absent is skipped
SECTIONS: list[tuple[str, list[str], int]] = [
    ("env", [sys.executable, "-c", "import torch, triton; print(torch.__version__, triton.__version__, "
             "torch.cuda.get_device_name(), torch.version.cuda)"], 60),  # fmt: skip
    # the CUTLASS grouped GEMM (needs nvcc and the nvidia-cutlass wheel; cached, so the tests and
    # the benchmark below reuse it): built first so that its time shows apart from theirs
    ("cutlass-build", [sys.executable, "-m", "glm5c.ops.cutlass.build"], 300),
    # compiled Triton kernels (tests/conftest.py defaults to the interpreter, for the CPU)
    ("gpu-tests", ["env", "TRITON_INTERPRET=0", sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p",
                   "no:cacheprovider", "tests"], 300),  # fmt: skip
    # the DSA kernel tests (no `gpu` marker: on a CPU they run under the interpreter) compiled on the GPU
    ("dsa-triton-tests", ["env", "TRITON_INTERPRET=0", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_dsa_triton.py"], 240),  # fmt: skip
    ("dsa-kernels", [sys.executable, "bench/dsa_kernels.py"], 240),
    ("moe-kernels", [sys.executable, "bench/moe_kernels.py", "--cutlass"], 300),
    ("graphs", [sys.executable, "bench/bench_compile.py", "--device", "cuda", "--buckets", "1,8",
                "--max-model-len", "4096", "--batch", "1", "8"], 420),  # fmt: skip
    # the engine (eager) against transformers' generate on the GPU, and the server driven over its RPC
    ("bench-latency", [sys.executable, "-m", "glm5c.cli", "bench", "latency", "--device", "cuda", "--batch-size", "16",
                       "--output-len", "64", "--num-iters", "3", "--baseline", "transformers",
                       "--output-json", "{out}/latency-b16.json"], 240),  # fmt: skip
    ("bench-serve", [sys.executable, "-m", "glm5c.cli", "bench", "serve", "--launch", "--serve-args=--device cuda",
                     "--num-prompts", "64", "--concurrency-sweep", "1,16", "--ignore-eos", "--save-result",
                     "--result-dir", "{out}/serve"], 300),  # fmt: skip
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "device-check-out"))
    parser.add_argument("--skip", nargs="*", default=[], help="section names to leave out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with open(out / "device_check.log", "w") as log:
        for name, cmd, limit in SECTIONS:
            cmd = [c.replace("{out}", str(out)) for c in cmd]
            script = next((c for c in cmd if c.endswith(".py")), None)
            if name in args.skip or (script and not (ROOT / script).exists()):
                results.append({"section": name, "status": "skipped", "seconds": 0.0, "tail": ""})
                continue
            t = time.perf_counter()
            log.write(f"\n===== {name}: {' '.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
                status, text = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as e:
                status = f"timeout {limit}s"
                text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
            log.write(text)
            log.flush()
            tail = "\n".join(text.strip().splitlines()[-12:])
            results.append({"section": name, "status": status, "seconds": round(time.perf_counter() - t, 1),
                            "tail": tail})  # fmt: skip
            print(f"--- {name} [{status}, {results[-1]['seconds']} s]\n{tail}\n", flush=True)
    (out / "device_check.json").write_text(json.dumps(results, indent=2))
    print(f"{'section':14s} {'status':14s} {'seconds':>8s}")
    for r in results:
        print(f"{r['section']:14s} {r['status']:14s} {r['seconds']:8.1f}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
