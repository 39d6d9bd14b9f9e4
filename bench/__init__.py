"""Benchmarks: speed and memory as ratios against the reference libraries, measured in one run.

Run each as a module from the repository root: ``python -m bench.bench_lora_dora`` (``make bench`` runs all).
"""
