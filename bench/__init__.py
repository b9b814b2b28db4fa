"""Benchmarks of fti4cir (see bench/RESULTS.md)."""
