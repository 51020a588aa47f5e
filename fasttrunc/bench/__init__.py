"""Benchmark grids behind `fasttrunc bench ...` and benchmarks/*.py (CUDA only; imported on demand)."""
