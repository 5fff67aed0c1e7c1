"""Command-line entry points: ``benchmarks.run`` (one cell), ``benchmarks.speed`` (seconds per round)."""
