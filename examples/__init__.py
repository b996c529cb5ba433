"""Runnable examples (scripts; importable for their helpers, e.g. by benchmarks/)."""
