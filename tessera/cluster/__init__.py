"""Pools of engine instances behind a router: data parallelism on one host (and, built on the
same parts, prefill/decode pools)."""
