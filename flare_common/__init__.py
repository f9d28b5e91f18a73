"""Tooling shared by the engine, the evaluation harness, the benchmarks and training: files written so that
no reader sees a partial one (files.py), the machine a figure was measured on (machine.py), and where
results go (results.py). Nothing here imports torch at module level."""
