"""Benchmarks (never timed assertions in tests). `python -m bench` runs bench/e2e.py."""
