"""Benchmarks (never timed assertions in tests). ``streaminfer bench`` lives in ``bench.e2e``."""
