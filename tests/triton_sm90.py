"""Compile Triton kernels for Hopper (sm_90) without a GPU, in a fresh process.

The process that runs the interpreter tests holds interpreted kernels, which the compiler cannot
take, so `compile_for_sm90` runs this file as a subprocess with TRITON_INTERPRET unset. Each job
names a kernel (module + attribute; autotune / heuristics wrappers are unwrapped), its
signature, constexprs, the arguments a launch would see as divisible by 16 (pointers and sizes:
without them loads are not vectorized and not pipelined) and launch options; the result says
what the PTX holds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any


def compile_for_sm90(jobs: list[dict[str, Any]], timeout: float = 300) -> list[dict[str, Any]]:
    """-> per job: {"mma": sorted MMA instructions in the PTX, "cp_async", "cubin_bytes",
    "shared_bytes"} or {"error": message}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, __file__], input=json.dumps(jobs), capture_output=True, text=True, env=env, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"sm_90 compile process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def _compile(job: dict[str, Any]) -> dict[str, Any]:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    # what a launch infers from 16-aligned pointers and sizes divisible by 16
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in job.get("divisible", [])}
    src = triton.compiler.ASTSource(fn=kernel, signature=job["signature"], constexprs=job["constexprs"], attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=job.get("options", {}))
    except Exception as e:  # reported, not raised: the test decides
        return {"error": f"{type(e).__name__}: {e}"[:2000]}
    ptx = compiled.asm["ptx"]
    return {
        "mma": sorted(set(re.findall(r"\b(wgmma\.mma_async\S*|mma\.sync\S*)", ptx))),
        "cp_async": "cp.async" in ptx,  # loads pipelined through shared memory
        "cubin_bytes": len(compiled.asm.get("cubin", b"")),
        "shared_bytes": compiled.metadata.shared,
    }


if __name__ == "__main__":
    print(json.dumps([_compile(job) for job in json.load(sys.stdin)]))
