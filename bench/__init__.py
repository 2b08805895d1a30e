"""Benchmarks. Harness code for `glm5c bench` (latency.py, serve.py, metrics.py, roofline.py,
plots.py) is imported as `glm5c.bench`; the bench_*.py scripts run on their own, each against a
baseline in the same run. Recorded runs live in results/, the latest figures in README.md."""
