"""Maintained benchmarks: scripts a user reruns; each writes JSON and markdown with its machine, date and
command into results/."""
