"""Benchmarks of the core library, run by tools/bench_core.py (CPU) and tools/bench_l3_gpu.py
(CUDA). They measure and report ratios side by side; they are not part of the test suite."""
