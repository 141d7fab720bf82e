"""Benchmarks: CALM vs the AR baseline (throughput.py, quality.py); shared helpers in bench_lib.py."""
