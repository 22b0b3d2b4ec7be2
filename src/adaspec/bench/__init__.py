"""Benchmarks: data, runner, costs, metrics, summary, report."""
