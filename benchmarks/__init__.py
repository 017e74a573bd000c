"""Benchmarks: scripts that print JSON (never timed unit tests). See each script's Usage block."""
