"""Finished experiments, kept with their results (experiments/results/) and an index (README.md)."""
