"""Recording what happens during a run and turning it into steady-state metrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .result import mean_p50_p99, windowed_rate


def _percentile_time(times: np.ndarray, q: float) -> float:
    """Time by which a share ``q`` of the events in ``times`` (sorted) had happened."""
    return float(times[int(q * (times.size - 1))]) if times.size else 0.0


@dataclass(frozen=True)
class Summary:
    """Steady-state rates (per second, whole pool) and latency statistics (ms)."""

    num_finished: int
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    tpot_ms: tuple[float, float, float]
    ttft_ms: tuple[float, float, float]
    decode_step_ms_mean: float
    mean_decode_batch_per_dp: float
    makespan_s: float


class Recorder:
    """Per-request timestamps and per-step logs of one run."""

    def __init__(self, num_requests: int) -> None:
        self.arrival = np.full(num_requests, np.nan)
        self.first_token = np.full(num_requests, np.nan)
        self.prefilled = np.full(num_requests, np.nan)
        """When each prompt's prefill finished; in pd/afd the first token reaches the user
        later, when the decode pool takes the request (``first_token``)."""
        self.finish = np.full(num_requests, np.nan)
        self.step_end: list[float] = []
        self.step_tokens: list[float] = []
        self.step_ms: list[float] = []
        self.step_batch: list[float] = []
        self.prefill_end: list[float] = []
        self.prefill_tokens: list[float] = []

    def decode_step_started(self, duration_s: float, mean_batch: float) -> None:
        """Log a decode (or colocated) step as it is scheduled."""
        self.step_ms.append(duration_s * 1e3)
        self.step_batch.append(mean_batch)

    def decode_step_done(self, now: float, emitted_tokens: float) -> None:
        """Log the output tokens a finished decode step emitted."""
        self.step_end.append(now)
        self.step_tokens.append(emitted_tokens)

    def prefill_done(self, now: float, num_tokens: float) -> None:
        """Log prompt tokens computed by a step that just finished."""
        self.prefill_end.append(now)
        self.prefill_tokens.append(num_tokens)

    def _window_mean(self, values: list[float], t_lo: float, t_hi: float) -> float:
        n = len(self.step_end)
        if not n:
            return 0.0
        ends, vals = np.array(self.step_end), np.array(values[:n])
        mask = (ends > t_lo) & (ends <= t_hi)
        return float(vals[mask].mean() if mask.any() else vals.mean())

    def summarize(self, output_tokens: np.ndarray) -> Summary:
        """Rates over the steady windows and latency statistics of finished requests.

        Decode: between the 10th and 90th percentile of completions, ending at the last
        arrival if that is earlier (afterwards the pool only drains). Prefill: between the
        10th and 90th percentile of finished prefills.
        """
        done = ~np.isnan(self.finish)
        fin = np.sort(self.finish[done])
        t_lo, t_hi = _percentile_time(fin, 0.1), _percentile_time(fin, 0.9)
        if np.isfinite(self.arrival).any():
            last_arrival = float(np.nanmax(self.arrival))
            if last_arrival > t_lo:
                t_hi = min(t_hi, last_arrival)
        prefilled = np.sort(self.prefilled[~np.isnan(self.prefilled)])
        p_lo, p_hi = _percentile_time(prefilled, 0.1), _percentile_time(prefilled, 0.9)
        multi = done & (output_tokens > 1)
        tpot = (self.finish[multi] - self.first_token[multi]) / (output_tokens[multi] - 1) * 1e3
        ttft = (self.first_token[done] - self.arrival[done]) * 1e3
        return Summary(
            num_finished=int(done.sum()),
            decode_tokens_per_s=windowed_rate(np.array(self.step_end), np.array(self.step_tokens),
                                              t_lo, t_hi),
            prefill_tokens_per_s=windowed_rate(np.array(self.prefill_end),
                                               np.array(self.prefill_tokens), p_lo, p_hi),
            tpot_ms=mean_p50_p99(tpot), ttft_ms=mean_p50_p99(ttft),
            decode_step_ms_mean=self._window_mean(self.step_ms, t_lo, t_hi),
            mean_decode_batch_per_dp=self._window_mean(self.step_batch, t_lo, t_hi),
            makespan_s=float(fin[-1]) if fin.size else 0.0,
        )
