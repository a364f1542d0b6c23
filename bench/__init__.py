"""Benchmarks and experiments that compare setups side by side in one run."""
