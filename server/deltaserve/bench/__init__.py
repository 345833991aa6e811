"""Benchmarks: kernel micro-benchmark and end-to-end serving benchmark."""
