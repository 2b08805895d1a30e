"""Build the CUTLASS kernels (ops/cutlass/*.cu) with nvcc, ahead of time.

    python -m glm5c.ops.cutlass.build                  # the shared library, cached; prints its path
    python -m glm5c.ops.cutlass.build --compile-only   # the object file only (what CI checks)
    python -m glm5c.ops.cutlass.build --cache-dir DIR --force

Only sm_90a (Hopper with its arch-specific features: wgmma, TMA, clusters) is built: with
`compute_90` instead of `compute_90a` nvcc builds the CUTLASS SM90 kernels silently as stubs
that fail at run time, and without -DNDEBUG device asserts serialize the wgmma instructions.
The library links the CUDA runtime statically (--cudart=static) and finds the driver at run
time, so it loads on a machine without a GPU and fails cleanly when launched there.

The CUTLASS C++ headers come from the `nvidia-cutlass` wheel (the `cutlass` extra), found
through the files of its `cutlass_library` package without importing it: `pip install --no-deps`
of that one wheel suffices (checked), and its Python generator (`cutlass_cppgen`, which wants a
GPU and a cuda-python it predates) is never used.

Outputs are cached in GLM5C_KERNEL_CACHE (default ~/.cache/glm5c/kernels) under a key hashing
the source, the flags and `nvcc --version`, next to a JSON note of what went into them; the
loader (ops/cutlass_moe.py) finds a library by the source and flags hash alone, so it needs no
nvcc at run time. Nothing here runs on a request path: this script (or a compile step) builds.
Measured on the 2-core CPU machine (nvcc 13.0): the object ~50-55 s and 5.8 GB of peak memory
(both kernel configurations in one translation unit); linking the library from it, ~1 s.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = {"grouped_gemm_fp8": HERE / "grouped_gemm_fp8.cu"}
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"
ARCH_FLAGS = ["-gencode=arch=compute_90a,code=sm_90a"]
COMPILE_FLAGS = ["-std=c++17", "-O3", "-DNDEBUG", *ARCH_FLAGS, "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-c"]
LINK_FLAGS = ["-shared", "--cudart=static"]
DEFAULT_CUDA_ROOT = "/usr/local/cuda"


class CutlassBuildError(RuntimeError):
    """nvcc or the CUTLASS headers are missing, or the build failed (the message says which)."""


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    if override is not None:
        return Path(override)
    env = os.environ.get("GLM5C_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "glm5c" / "kernels"


def find_nvcc() -> Path:
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), DEFAULT_CUDA_ROOT):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return Path(root) / "bin" / "nvcc"
    raise CutlassBuildError(
        "nvcc not found (looked on PATH and in $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin): "
        "building the CUTLASS kernels needs the CUDA toolkit (12.8 or newer, for sm_90a)"
    )


def cutlass_include_dirs() -> list[Path]:
    """[include, tools/util/include] of the CUTLASS sources shipped in the nvidia-cutlass wheel."""
    spec = importlib.util.find_spec("cutlass_library")  # locates the package; does not import it
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        source = Path(loc) / "source"
        dirs = [source / "include", source / "tools" / "util" / "include"]
        if (dirs[0] / "cutlass" / "cutlass.h").is_file() and dirs[1].is_dir():
            return dirs
    raise CutlassBuildError(
        "the CUTLASS C++ headers were not found: they come with the nvidia-cutlass wheel "
        f"(`pip install {CUTLASS_PIN}`, or the project's `cutlass` extra), under "
        "cutlass_library/source/include" + (f"; looked in {locations}" if locations else "")
    )


_NVCC_VERSION: dict[str, str] = {}


def nvcc_version(nvcc: Path) -> str:
    if str(nvcc) not in _NVCC_VERSION:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60)
        _NVCC_VERSION[str(nvcc)] = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "unknown"
    return _NVCC_VERSION[str(nvcc)]


def source_key(name: str, compile_only: bool = False) -> str:
    """Hash of the source and the flags (not the include paths: the CUTLASS version is pinned,
    and the loader must find a library without nvcc or the headers)."""
    h = hashlib.sha256(SOURCES[name].read_bytes())
    h.update("\0".join(COMPILE_FLAGS + ([] if compile_only else LINK_FLAGS)).encode())
    return h.hexdigest()


def _run_nvcc(cmd: list[str], target: Path, what: str, timeout: float, verbose: bool) -> None:
    """Run cmd (whose last argument is the output path) into a temporary file, then move it to
    `target` atomically (a concurrent build of the same key writes the same bytes)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    cmd = [*cmd, tmp]
    if verbose:
        print(" ".join(cmd), file=sys.stderr)
    try:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise CutlassBuildError(f"nvcc timed out after {timeout:.0f} s {what}") from e
        if done.returncode != 0:
            raise CutlassBuildError(
                f"nvcc failed ({done.returncode}) {what}:\n{' '.join(cmd)}\n{(done.stdout + done.stderr)[-6000:]}"
            )
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)  # left only on failure or interruption


def build(name: str = "grouped_gemm_fp8", *, compile_only: bool = False, cache: str | os.PathLike | None = None,
          force: bool = False, verbose: bool = False, timeout: float = 1800) -> Path:  # fmt: skip
    """SOURCES[name] -> the cached object file (compile_only) or shared library; reuses cached
    outputs with the same key unless `force`. The library is linked from the (cached) object, so
    building both compiles once. Raises CutlassBuildError with nvcc's output on failure."""
    nvcc = find_nvcc()
    includes = cutlass_include_dirs()
    out_dir = cache_dir(cache)
    out_dir.mkdir(parents=True, exist_ok=True)
    version = nvcc_version(nvcc)
    key = hashlib.sha256(f"{source_key(name, compile_only)}\0{version}".encode()).hexdigest()[:16]
    target = out_dir / f"{name}-{key}{'.o' if compile_only else '.so'}"
    if target.is_file() and not force:
        return target
    start = time.perf_counter()
    if compile_only:
        cmd = [str(nvcc), *COMPILE_FLAGS, *(f"-I{d}" for d in includes), str(SOURCES[name]), "-o"]
        _run_nvcc(cmd, target, f"compiling {SOURCES[name].name}", timeout, verbose)
    else:
        obj = build(name, compile_only=True, cache=out_dir, force=force, verbose=verbose, timeout=timeout)
        _run_nvcc([str(nvcc), *LINK_FLAGS, str(obj), "-o"], target, f"linking {obj.name}", timeout, verbose)
    note = {
        "name": name, "source": str(SOURCES[name]), "source_key": source_key(name, compile_only),
        "flags": COMPILE_FLAGS + ([] if compile_only else LINK_FLAGS), "nvcc": version,
        "includes": [str(d) for d in includes], "build_s": round(time.perf_counter() - start, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    target.with_name(target.name + ".json").write_text(json.dumps(note, indent=1))
    return target


def find_built(name: str = "grouped_gemm_fp8", cache: str | os.PathLike | None = None) -> Path | None:
    """The newest cached shared library built from the current source and flags, or None.
    Needs neither nvcc nor the headers (run-time lookup)."""
    want = source_key(name)
    best: tuple[float, Path] | None = None
    for note_path in cache_dir(cache).glob(f"{name}-*.so.json"):
        try:
            note = json.loads(note_path.read_text())
        except (OSError, ValueError):
            continue
        lib = note_path.with_name(note_path.name[: -len(".json")])
        if note.get("source_key") == want and lib.is_file():
            mtime = lib.stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, lib)
    return best[1] if best else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile-only", action="store_true", help="build the object file only (no link)")
    parser.add_argument("--cache-dir", help="output directory (default $GLM5C_KERNEL_CACHE or ~/.cache/glm5c/kernels)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    parser.add_argument("--verbose", action="store_true", help="print the nvcc command")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        for name in SOURCES:
            path = build(name, compile_only=args.compile_only, cache=args.cache_dir, force=args.force,
                         verbose=args.verbose)  # fmt: skip
            print(f"{path}  ({time.perf_counter() - start:.1f} s)")
    except CutlassBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
