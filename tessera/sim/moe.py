"""Expert load imbalance and MoE token routing volumes.

Imbalance is the load of the busiest expert-parallel rank over the mean, which sets the MoE
layer time because every rank waits for the slowest one.

* Without a balancer the hottest expert carries about 30x the mean expert load (xDeepServe,
  arXiv 2508.02520, on production traffic); the rank that hosts it carries that expert plus
  average ones.
* With an expert-parallel load balancer (EPLB: hot experts replicated into redundant slots,
  DeepSeek-V3 report arXiv 2412.19437 section 3.4; xDeepServe) two things remain: sampling noise
  of the per-step routing (Poisson, max over ranks) and a drift between the placement, planned
  from past load, and the current batch. The drift is one global constant, read from the two
  published gaps between measured and perfect-EPLB prefill throughput (LMSYS large-scale EP blog,
  2025-05-05: 6288 vs 7417 tokens/s per GPU; CloudMatrix-Infer, arXiv 2506.12708: 5655 vs 6688),
  both about 0.85, which an MoE-dominated prefill step reproduces with about 25% residual skew.
"""

from __future__ import annotations

import math

HOTTEST_EXPERT_LOAD_RATIO = 30.0
EPLB_RESIDUAL_SKEW = 0.25
NOISE_SCALE = 1.0


def rank_imbalance(num_experts: int, num_ranks: int, num_routed_tokens: float,
                   load_balancer: bool) -> float:
    """Busiest-rank load over mean rank load for one MoE layer step.

    ``num_routed_tokens`` counts token-expert assignments in the step (tokens times top-k).
    """
    if num_ranks <= 1 or num_experts <= 0:
        return 1.0
    mean_per_rank = max(num_routed_tokens / num_ranks, 1e-9)
    noise = math.sqrt(2.0 * math.log(num_ranks) / mean_per_rank) if mean_per_rank >= 1 else 1.0
    noise *= NOISE_SCALE
    if load_balancer:
        return 1.0 + EPLB_RESIDUAL_SKEW + noise
    experts_per_rank = max(num_experts / num_ranks, 1.0)
    hot = (HOTTEST_EXPERT_LOAD_RATIO + experts_per_rank - 1.0) / experts_per_rank
    return max(hot, 1.0 + noise)


def remote_fraction(num_ranks: int) -> float:
    """Share of a token's expert visits that leave the device (uniform routing)."""
    return 0.0 if num_ranks <= 1 else (num_ranks - 1) / num_ranks
