"""Benchmark clients (``tessera bench serve``)."""
