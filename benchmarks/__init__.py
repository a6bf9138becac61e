"""Benchmarks of the proxy against direct-to-backend; run with ``make bench``."""
