"""Peer engines measured alongside Tessera on the same model and workload.

``llamacpp`` drives llama.cpp through llama-cpp-python's low-level API; ``hf`` runs
transformers ``generate``. Both take a workload as ``list[tuple[list[int], int]]``:
(prompt token ids, number of output tokens) per request, built by ``make_workload``.
"""

from __future__ import annotations

import os
import random
import time

Workload = list[tuple[list[int], int]]

# Token ids below this are specials and byte-fallback tokens in the benchmark tokenizers.
FIRST_PLAIN_TOKEN_ID = 259


def make_workload(
    num_requests: int = 64,
    min_prompt_tokens: int = 32,
    max_prompt_tokens: int = 1024,
    min_output_tokens: int = 16,
    max_output_tokens: int = 256,
    vocab_size: int = 32000,
    seed: int = 0,
) -> Workload:
    """Seeded synthetic workload: prompt and output lengths uniform in the given (inclusive) ranges.

    Prompt ids are drawn uniformly from the plain (non-special, non-byte) part of the vocabulary.
    """
    rng = random.Random(seed)
    requests: Workload = []
    for _ in range(num_requests):
        num_prompt_tokens = rng.randint(min_prompt_tokens, max_prompt_tokens)
        num_output_tokens = rng.randint(min_output_tokens, max_output_tokens)
        prompt_ids = [
            rng.randrange(FIRST_PLAIN_TOKEN_ID, vocab_size) for _ in range(num_prompt_tokens)
        ]
        requests.append((prompt_ids, num_output_tokens))
    return requests


class CpuMeter:
    """Measures how much CPU a timed region got, to flag runs on a shared, busy machine.

    ``cpu_share`` = process CPU seconds / (wall seconds x threads): near 1.0 means the threads
    had their cores; well below 1.0 means other work took them. ``loadavg_1m`` is read at start.
    """

    def __init__(self, n_threads: int) -> None:
        self.n_threads = n_threads
        self.loadavg_1m = os.getloadavg()[0]
        self._cpu_start_s = time.process_time()
        self._wall_start_s = time.perf_counter()

    def stop(self) -> dict[str, float]:
        """Return ``cpu_s``, ``cpu_share`` and ``loadavg_1m`` for the region since construction."""
        cpu_s = time.process_time() - self._cpu_start_s
        wall_s = time.perf_counter() - self._wall_start_s
        return {
            "cpu_s": cpu_s,
            "cpu_share": cpu_s / max(wall_s * self.n_threads, 1e-9),
            "loadavg_1m": self.loadavg_1m,
        }


def summarize(
    wall_s: float, num_prompt_tokens: int, num_output_tokens: int, **extra: object
) -> dict[str, object]:
    """Standard result dict: totals and throughput figures for one timed run."""
    return {
        "wall_s": wall_s,
        "num_prompt_tokens": num_prompt_tokens,
        "num_output_tokens": num_output_tokens,
        "output_tokens_per_s": num_output_tokens / wall_s,
        "total_tokens_per_s": (num_prompt_tokens + num_output_tokens) / wall_s,
        **extra,
    }
