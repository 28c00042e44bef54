"""``tessera sim calibrate``: measure this machine into a ``cpu-local`` chip profile.

Measures the bf16/fp32 matmul rate and memory bandwidth with torch and writes a JSON profile
that :func:`tessera.sim.hardware.local_system` loads. Engine step overheads come from
:func:`fit_step_overhead`, which takes (batch tokens, step seconds) samples measured by the
engine and returns the fixed cost per step and the cost per token.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .errors import OneLineArgumentParser, SimError
from .hardware import default_profile_path


def fit_step_overhead(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``step_s = overhead_s + per_token_s * tokens`` from engine samples."""
    if len(samples) < 2:
        raise SimError("need at least two (batch tokens, step time) samples")
    n = float(len(samples))
    sx = sum(t for t, _ in samples)
    sy = sum(s for _, s in samples)
    sxx = sum(t * t for t, _ in samples)
    sxy = sum(t * s for t, s in samples)
    den = n * sxx - sx * sx
    if den == 0:
        raise SimError("samples need at least two different batch sizes")
    slope = (n * sxy - sx * sy) / den
    return max((sy - slope * sx) / n, 0.0), max(slope, 0.0)


def _best_s(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def measure(size: int = 1024, repeats: int = 3) -> dict[str, object]:
    """Measure matmul TFLOPS per dtype and memory GB/s on this machine (torch, CPU)."""
    import torch

    tflops: dict[str, float] = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        secs = _best_s(lambda a=a, b=b: torch.mm(a, b), repeats)
        tflops[name] = 2.0 * size**3 / secs / 1e12
    src = torch.empty(64 * 1024 * 1024 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    secs = _best_s(lambda: dst.copy_(src), repeats)
    mem_gb_s = 2.0 * src.numel() * 4 / secs / 1e9
    launch_s = _best_s(lambda: torch.add(src[:16], 1.0), 50)
    try:
        import os

        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem_gb = pages / 1e9
    except (ValueError, OSError, AttributeError):
        mem_gb = 16.0
    return {
        "tflops": {"bf16": tflops["bf16"], "fp8": tflops["bf16"], "int8": tflops["bf16"]},
        "fp32_tflops": tflops["fp32"],
        "memory_gb": mem_gb,
        "memory_gb_s": mem_gb_s,
        "efficiency": {"matmul": 1.0, "attention": 0.5, "memory": 1.0, "fabric": 1.0,
                       "op_overhead_us": launch_s * 1e6, "ops_per_layer": 14,
                       "step_overhead_ms": 1.0},
        "source": "measured by tessera sim calibrate (torch on CPU); rates already effective",
    }


# TODO(engine): once ``from tessera import LLM, SamplingParams`` exists, drive it here: run
# ``LLM(model=dir).generate(prompts, SamplingParams(max_tokens=..., ignore_eos=True))`` at a
# few batch sizes, collect (batch tokens, step seconds) per engine step and store
# ``fit_step_overhead(samples)`` as efficiency.step_overhead_ms (and the per-token slope).


def calibrate_main(argv: list[str]) -> int:
    """Write the local profile (``--out`` or the default profile path)."""
    p = OneLineArgumentParser(prog="tessera sim calibrate")
    p.add_argument("--out", help="profile path (default: ~/.cache/tessera/cpu-local.json)")
    p.add_argument("--size", type=int, default=1024, help="matmul size")
    args = p.parse_args(argv)
    if args.size < 16:
        raise SimError("--size must be at least 16")
    profile = measure(args.size)
    path = Path(args.out) if args.out else default_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=2))
    print(json.dumps(profile))
    print(f"profile written to {path}")
    return 0
