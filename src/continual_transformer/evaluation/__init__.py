"""Measurement: metrics (pure functions), benchmarks, and the harness that runs strategies side by side."""
