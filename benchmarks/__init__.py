"""vqfast benchmark suite: ``python -m benchmarks --help``."""
