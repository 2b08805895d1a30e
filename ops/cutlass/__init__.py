"""CUTLASS C++ kernels (built ahead of time with nvcc by `build.py`; loaded by ops/cutlass_moe.py)."""
