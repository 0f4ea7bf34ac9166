"""Helpers for bigbatch's own tests, benchmarks and docs; not public API (nothing here is in `bb.*`).

    benchmarking.py  the timing harness every benchmark and `bigbatch bench` go through
    comm_counter.py  AllReduceCounter: counts gradient all-reduces (tests and benchmarks)
    field_docs.py    config field docstrings read from the source (for --help and the docs)

Imports nothing from the rest of bigbatch; names may change without notice.
"""
