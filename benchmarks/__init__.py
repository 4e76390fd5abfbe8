"""Side-by-side speed measurements: `python -m benchmarks.run --quick` (see README.md)."""
